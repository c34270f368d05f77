//! Hinted handoff rows (`Cf::Hints`) and the anti-entropy marks that replace a hint that could
//! not be kept (`Cf::Aae`), with the in-memory book of what is pending per target.
//!
//! A hint is **one merged key state per (target, key)**: a node holding writes for a down
//! primary keeps the merge of every state it was given for that key, so the backlog for a target
//! is bounded by its distinct keys, not by the writes, and replaying it is idempotent.
//!
//! Row: `u8 len ‖ target ‖ key` → `u8 format ‖ u64 first_ms ‖ encoded KeyState`, where
//! `first_ms` is when the oldest write in the hint was first stored (the age that expires it).
//! Mark: `'N' ‖ u8 len ‖ target ‖ u16 partition` → `u8 reason ‖ u64 ms`: the target's copy of
//! that ring partition missed writes no hint will deliver; anti-entropy must sync it first.
//! The writer thread is the only one that changes either (`Store` write ops).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::storage::{key_position, HexKey, StorageError};
use crate::version::KeyState;

/// Hint row format version.
const HINT_FORMAT: u8 = 1;
/// Prefix of anti-entropy marks in `Cf::Aae` (the Merkle rows of the anti-entropy issue use
/// other prefixes).
pub const MARK_PREFIX: u8 = b'N';
/// The ring is cut into `2^PARTITION_BITS` equal partitions for marks: fine enough that a few
/// dropped hints mark a small share of a target's data (1/1024 each), coarse enough that the
/// marks of a whole target fit in memory.
pub const PARTITION_BITS: u32 = 10;

/// The partition of the ring a key falls in (by its ring position).
pub fn partition_of(key: &[u8]) -> u16 {
    (key_position(key) >> (64 - PARTITION_BITS)) as u16
}

/// The ring positions of a partition, inclusive.
pub fn partition_span(partition: u16) -> (u64, u64) {
    let shift = 64 - PARTITION_BITS;
    let first = (partition as u64) << shift;
    (first, first | ((1u64 << shift) - 1))
}

/// `u8 len ‖ target`: every hint row of `target` starts with it.
pub fn target_prefix(target: &str) -> Vec<u8> {
    let t = target.as_bytes();
    debug_assert!(
        t.len() <= u8::MAX as usize,
        "node ids are at most 255 bytes"
    );
    let mut k = Vec::with_capacity(1 + t.len());
    k.push(t.len().min(u8::MAX as usize) as u8);
    k.extend_from_slice(&t[..t.len().min(u8::MAX as usize)]);
    k
}

pub fn hint_key(target: &str, key: &[u8]) -> Vec<u8> {
    let mut k = target_prefix(target);
    k.extend_from_slice(key);
    k
}

/// The (target, key) of a hint row.
pub fn split_hint_key(row: &[u8]) -> Option<(String, &[u8])> {
    let len = *row.first()? as usize;
    let target = row.get(1..1 + len)?;
    Some((
        String::from_utf8_lossy(target).into_owned(),
        &row[1 + len..],
    ))
}

/// The first key after every key starting with `prefix` (exclusive scan end), `None` = none.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

pub fn encode_hint(first_ms: u64, state: &KeyState) -> Vec<u8> {
    let body = state.encode();
    let mut v = Vec::with_capacity(9 + body.len());
    v.push(HINT_FORMAT);
    v.extend_from_slice(&first_ms.to_be_bytes());
    v.extend_from_slice(&body);
    v
}

/// `first_ms` of a hint row without decoding its state.
pub fn hint_first_ms(value: &[u8]) -> Option<u64> {
    (value.len() >= 9 && value[0] == HINT_FORMAT)
        .then(|| u64::from_be_bytes(value[1..9].try_into().expect("8 bytes")))
}

/// The encoded state of a hint row (the wire form), without decoding it.
pub fn hint_state_bytes(value: &[u8]) -> Option<&[u8]> {
    hint_first_ms(value).map(|_| &value[9..])
}

pub fn decode_hint(row: &[u8], value: &[u8]) -> Result<(u64, KeyState), StorageError> {
    let corrupt = |cause: String| StorageError::Corrupt {
        cf: "hints",
        key: HexKey(row.to_vec()),
        cause,
    };
    let first_ms = hint_first_ms(value).ok_or_else(|| corrupt("unknown hint row format".into()))?;
    let state = KeyState::decode(&value[9..]).map_err(|e| corrupt(e.to_string()))?;
    Ok((first_ms, state))
}

/// Why a hint was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Storing it would pass the total or per-target byte cap.
    Cap = 1,
    /// It was older than the hint window.
    Expired = 2,
    /// Its write was still queued at its deadline (the writer stalled past the peer-write
    /// limit), and was dropped unapplied.
    Late = 3,
    /// The writer's queue was full when it came (`Overloaded`): it was never queued.
    Overloaded = 4,
    /// It could not be stored: its row here is unreadable, the merged hint would pass the
    /// state bounds, or reading the row failed.
    Unstorable = 5,
}

impl DropReason {
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Cap => "cap",
            DropReason::Expired => "expired",
            DropReason::Late => "late",
            DropReason::Overloaded => "overloaded",
            DropReason::Unstorable => "unstorable",
        }
    }
}

pub fn mark_key(target: &str, partition: u16) -> Vec<u8> {
    let mut k = vec![MARK_PREFIX];
    k.extend_from_slice(&target_prefix(target));
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

pub fn mark_value(reason: DropReason, ms: u64) -> Vec<u8> {
    let mut v = vec![reason as u8];
    v.extend_from_slice(&ms.to_be_bytes());
    v
}

/// A mark row's (target, partition), `None` for other `Cf::Aae` rows.
pub fn split_mark_key(row: &[u8]) -> Option<(String, u16)> {
    if row.first() != Some(&MARK_PREFIX) || row.len() < 4 {
        return None;
    }
    let (target, rest) = split_hint_key(&row[1..])?;
    (rest.len() == 2).then(|| (target, u16::from_be_bytes([rest[0], rest[1]])))
}

/// Byte caps of the hint store, enforced by the writer when a hint grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HintLimits {
    pub max_bytes: u64,
    pub max_bytes_per_target: u64,
}

impl Default for HintLimits {
    fn default() -> Self {
        HintLimits {
            max_bytes: 1 << 30,
            max_bytes_per_target: 256 << 20,
        }
    }
}

/// What is pending for one target (a summary: cheap to copy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetHints {
    pub keys: u64,
    pub bytes: u64,
    oldest_ms: Option<u64>,
}

impl TargetHints {
    /// When the oldest pending write for this target was first hinted (ms since the epoch,
    /// to the second).
    pub fn oldest_ms(&self) -> Option<u64> {
        self.oldest_ms
    }
}

/// The book's entry for one target: the counts, and hints by the second their oldest write
/// was stored (for the oldest age).
#[derive(Debug, Default)]
struct TargetEntry {
    keys: u64,
    bytes: u64,
    by_second: BTreeMap<u64, u64>,
}

impl TargetEntry {
    fn summary(&self) -> TargetHints {
        TargetHints {
            keys: self.keys,
            bytes: self.bytes,
            oldest_ms: self.by_second.keys().next().map(|s| s * 1000),
        }
    }
}

/// The pending hints per target, kept by the writer as it commits hint rows (loaded by one
/// scan at open), read by the replay worker, the metrics and `kvctl hints`.
#[derive(Debug, Default)]
pub struct HintBook {
    inner: Mutex<BTreeMap<String, TargetEntry>>,
}

/// One row's contribution to the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HintSize {
    pub first_ms: u64,
    pub bytes: u64,
}

impl HintBook {
    /// Replaces a row's contribution (`None` = absent) for `target`.
    pub fn apply(&self, target: &str, old: Option<HintSize>, new: Option<HintSize>) {
        let mut book = self.inner.lock().expect("hint book lock poisoned");
        let t = book.entry(target.to_string()).or_default();
        if let Some(o) = old {
            t.keys = t.keys.saturating_sub(1);
            t.bytes = t.bytes.saturating_sub(o.bytes);
            let sec = o.first_ms / 1000;
            if let Some(c) = t.by_second.get_mut(&sec) {
                *c -= 1;
                if *c == 0 {
                    t.by_second.remove(&sec);
                }
            }
        }
        if let Some(n) = new {
            t.keys += 1;
            t.bytes += n.bytes;
            *t.by_second.entry(n.first_ms / 1000).or_default() += 1;
        }
        if t.keys == 0 {
            book.remove(target);
        }
    }

    pub fn target(&self, target: &str) -> TargetHints {
        let book = self.inner.lock().expect("hint book lock poisoned");
        book.get(target)
            .map(TargetEntry::summary)
            .unwrap_or_default()
    }

    /// Every target with pending hints.
    pub fn targets(&self) -> BTreeMap<String, TargetHints> {
        let book = self.inner.lock().expect("hint book lock poisoned");
        book.iter().map(|(t, e)| (t.clone(), e.summary())).collect()
    }

    /// (keys, bytes) pending over all targets.
    pub fn totals(&self) -> (u64, u64) {
        let book = self.inner.lock().expect("hint book lock poisoned");
        book.values()
            .fold((0, 0), |(k, b), t| (k + t.keys, b + t.bytes))
    }

    /// Bytes pending for `target` and over all targets.
    pub fn bytes(&self, target: &str) -> (u64, u64) {
        let book = self.inner.lock().expect("hint book lock poisoned");
        let total = book.values().map(|t| t.bytes).sum();
        (book.get(target).map_or(0, |t| t.bytes), total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_sort_by_target() {
        let k = hint_key("node-b", b"user:1");
        assert_eq!(
            split_hint_key(&k),
            Some(("node-b".to_string(), &b"user:1"[..]))
        );
        assert!(k.starts_with(&target_prefix("node-b")));
        // One target's rows are contiguous: a longer id is a different prefix.
        assert!(!hint_key("node-bb", b"x").starts_with(&target_prefix("node-b")));
        let end = prefix_end(&target_prefix("node-b")).unwrap();
        assert!(k < end && target_prefix("node-b") <= k);
        assert!(
            hint_key("node-bb", b"").as_slice() >= end.as_slice()
                || !hint_key("node-bb", b"").starts_with(&target_prefix("node-b"))
        );
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        let m = mark_key("node-b", 1023);
        assert_eq!(split_mark_key(&m), Some(("node-b".to_string(), 1023)));
        assert_eq!(split_mark_key(b"Xabc"), None);
    }

    #[test]
    fn the_book_counts_keys_bytes_and_the_oldest() {
        let book = HintBook::default();
        let a = HintSize {
            first_ms: 5_000,
            bytes: 10,
        };
        let b = HintSize {
            first_ms: 9_000,
            bytes: 20,
        };
        book.apply("t", None, Some(a));
        book.apply("t", None, Some(b));
        let t = book.target("t");
        assert_eq!((t.keys, t.bytes, t.oldest_ms()), (2, 30, Some(5_000)));
        // A merge replaces a row's contribution: same key count.
        book.apply(
            "t",
            Some(a),
            Some(HintSize {
                first_ms: 5_000,
                bytes: 15,
            }),
        );
        assert_eq!(book.target("t").bytes, 35);
        book.apply(
            "t",
            Some(HintSize {
                first_ms: 5_000,
                bytes: 15,
            }),
            None,
        );
        let t = book.target("t");
        assert_eq!((t.keys, t.bytes, t.oldest_ms()), (1, 20, Some(9_000)));
        book.apply("t", Some(b), None);
        assert!(book.targets().is_empty(), "an empty target is forgotten");
        assert_eq!(book.totals(), (0, 0));
    }
}
