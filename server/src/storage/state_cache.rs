//! The writer's cache of the states it last wrote, so a hot key's next read-modify-write skips
//! the memtable lookup and the decode (together ~9% of a node's CPU under a zipfian write load;
//! docs/benchmarks.md).
//!
//! Coherence: the writer thread is the only mutator of the data column family and the only
//! user of this cache. States enter it only after their batch is committed; a lookup *takes*
//! the entry out, so a group whose batch then fails leaves the key uncached (the next write
//! reads the store again) rather than cached with a value that was never written.
//!
//! Eviction is two generations (an approximate LRU at O(1) per operation): entries go to
//! `hot`; when `hot` holds half the byte budget it becomes `cold` and the old `cold` is
//! dropped. A hit in either generation takes the entry out; the writer puts it back into `hot`
//! after the commit. Cached values are copied out of the request buffers they arrived in, so an
//! entry never pins a whole network read buffer.

use std::collections::HashMap;

use crate::version::KeyState;

/// Bytes of the writer's state cache, both generations together. Counted as key + value
/// bytes plus a per-entry and per-sibling overhead estimate.
pub const STATE_CACHE_BYTES: usize = 32 << 20;

/// Estimated bookkeeping per entry (hash slot, key and sibling vectors, version vector node).
const ENTRY_OVERHEAD: usize = 96;
/// Estimated bookkeeping per sibling and per version-vector entry.
const ITEM_OVERHEAD: usize = 48;

/// Approximate memory of one cached entry.
fn entry_bytes(key_len: usize, state: &KeyState) -> usize {
    ENTRY_OVERHEAD
        + key_len
        + state.value_bytes()
        + ITEM_OVERHEAD * (state.siblings().len() + state.context().len())
}

pub struct StateCache {
    /// Byte budget of one generation (half the total).
    generation_bytes: usize,
    hot: HashMap<Vec<u8>, KeyState>,
    hot_bytes: usize,
    cold: HashMap<Vec<u8>, KeyState>,
}

impl StateCache {
    pub fn new(total_bytes: usize) -> Self {
        StateCache {
            generation_bytes: total_bytes / 2,
            hot: HashMap::new(),
            hot_bytes: 0,
            cold: HashMap::new(),
        }
    }

    /// Removes and returns the cached state of `key`.
    pub fn take(&mut self, key: &[u8]) -> Option<KeyState> {
        if let Some(state) = self.hot.remove(key) {
            self.hot_bytes -= entry_bytes(key.len(), &state);
            return Some(state);
        }
        self.cold.remove(key)
    }

    /// Caches `state` as the committed state of `key`. A state larger than a generation is
    /// not cached.
    pub fn insert(&mut self, key: Vec<u8>, state: KeyState) {
        let key_len = key.len();
        let size = entry_bytes(key_len, &state);
        if size > self.generation_bytes {
            self.take(&key);
            return;
        }
        self.cold.remove(&key);
        let state = state.detached();
        if let Some(old) = self.hot.insert(key, state) {
            // The key is back in `hot`; its old entry's bytes are replaced by the new one's.
            self.hot_bytes -= entry_bytes(key_len, &old);
        }
        self.hot_bytes += size;
        if self.hot_bytes > self.generation_bytes {
            let old_cold = std::mem::replace(&mut self.cold, std::mem::take(&mut self.hot));
            self.hot_bytes = 0;
            drop_elsewhere(old_cold);
        }
    }

    /// Entries in both generations.
    pub fn len(&self) -> usize {
        self.hot.len() + self.cold.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hot.is_empty() && self.cold.is_empty()
    }

    /// Approximate bytes held (both generations).
    pub fn bytes(&self) -> usize {
        self.hot_bytes
            + self
                .cold
                .iter()
                .map(|(k, s)| entry_bytes(k.len(), s))
                .sum::<usize>()
    }
}

/// Dropping a generation frees tens of thousands of allocations (a few ms): done on a
/// short-lived thread so the writer does not stall its group. If no thread can start, the
/// closure, and the generation with it, is dropped right here.
fn drop_elsewhere(generation: HashMap<Vec<u8>, KeyState>) {
    if generation.is_empty() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("ringkv-cache-drop".into())
        .spawn(move || drop(generation));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Dot, VersionVector};
    use bytes::Bytes;

    fn state(counter: u64, value: &[u8]) -> KeyState {
        KeyState::new().update(
            &VersionVector::new(),
            Dot { actor: 7, counter },
            0,
            Some(Bytes::copy_from_slice(value)),
        )
    }

    #[test]
    fn take_removes_the_entry() {
        let mut c = StateCache::new(1 << 20);
        c.insert(b"k".to_vec(), state(1, b"v1"));
        assert_eq!(c.take(b"k"), Some(state(1, b"v1")));
        assert_eq!(
            c.take(b"k"),
            None,
            "a taken entry is gone until re-inserted"
        );
        assert_eq!(c.bytes(), 0);
        assert!(c.is_empty());
    }

    #[test]
    fn insert_replaces_and_accounts_bytes() {
        let mut c = StateCache::new(1 << 20);
        c.insert(b"k".to_vec(), state(1, b"short"));
        c.insert(b"k".to_vec(), state(2, &[9; 500]));
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), entry_bytes(1, &state(2, &[9; 500])));
        assert_eq!(c.take(b"k"), Some(state(2, &[9; 500])));
    }

    #[test]
    fn generations_rotate_and_bound_memory() {
        let one = entry_bytes(8, &state(1, &[0; 100]));
        // Room for 10 entries per generation.
        let mut c = StateCache::new(2 * 10 * one + one / 2);
        for i in 0..100u64 {
            c.insert(i.to_be_bytes().to_vec(), state(i + 1, &[0; 100]));
            assert!(
                c.bytes() <= 2 * 10 * one + one,
                "cache grew past its budget"
            );
        }
        // The most recent entries survive; the oldest were dropped with their generation.
        assert!(c.take(&99u64.to_be_bytes()).is_some());
        assert!(c.take(&0u64.to_be_bytes()).is_none());
        assert!(c.len() >= 10);
    }

    #[test]
    fn a_cold_hit_survives_one_more_rotation_when_reinserted() {
        let one = entry_bytes(8, &state(1, &[0; 100]));
        let mut c = StateCache::new(2 * 4 * one + one / 2);
        c.insert(1000u64.to_be_bytes().to_vec(), state(1, &[0; 100]));
        for i in 0..4u64 {
            c.insert(i.to_be_bytes().to_vec(), state(1, &[0; 100]));
        }
        // Key 1000 is now in `cold`; the writer takes it and puts the new state back.
        let s = c.take(&1000u64.to_be_bytes()).expect("cold entry found");
        c.insert(1000u64.to_be_bytes().to_vec(), s);
        for i in 10..13u64 {
            c.insert(i.to_be_bytes().to_vec(), state(1, &[0; 100]));
        }
        assert!(c.take(&1000u64.to_be_bytes()).is_some());
    }

    #[test]
    fn oversized_state_is_not_cached_and_evicts_the_old_one() {
        let mut c = StateCache::new(1000);
        c.insert(b"k".to_vec(), state(1, b"v"));
        c.insert(b"k".to_vec(), state(2, &[0; 2000]));
        assert_eq!(c.take(b"k"), None);
    }

    #[test]
    fn cached_values_do_not_share_the_request_buffer() {
        let frame = Bytes::from(vec![5u8; 4096]);
        let value = frame.slice(100..200);
        let s = KeyState::new().update(
            &VersionVector::new(),
            Dot {
                actor: 1,
                counter: 1,
            },
            0,
            Some(value),
        );
        let mut c = StateCache::new(1 << 20);
        c.insert(b"k".to_vec(), s.clone());
        drop(s);
        let cached = c.take(b"k").expect("cached");
        let v = cached.siblings()[0].value.clone().expect("a value");
        assert_eq!(v.len(), 100);
        // `frame` is the only owner of its buffer again: the cache holds a copy.
        assert!(frame.is_unique());
    }
}
