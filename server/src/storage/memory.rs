//! In-memory engine for unit tests of the store logic. It can be told to fail writes, to test
//! error paths (e.g. a full disk) deterministically.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::{
    key_after, Batch, BatchOp, Cached, Cf, Engine, ScanBatch, ScanRange, StorageError,
    MAX_SCAN_BATCH,
};

type Table = BTreeMap<(Cf, Vec<u8>), Vec<u8>>;
/// A key and its value before an unsynced write (`None`: absent).
type Undo = ((Cf, Vec<u8>), Option<Vec<u8>>);

#[derive(Default)]
pub struct MemoryEngine {
    data: Mutex<Table>,
    /// Undo entries of the writes since the last sync (the previous value of each key they
    /// touched), oldest first: what a power loss takes back.
    unsynced: Mutex<Vec<Undo>>,
    fail_writes: AtomicBool,
    fail_syncs: AtomicBool,
    cache_misses: AtomicBool,
    /// Held by a test to stall every write (the writer thread blocks in `write`).
    gate: Mutex<()>,
    /// Held by a test to stall every `sync_wal` (a group's fsync in progress).
    sync_gate: Mutex<()>,
    /// `sync_wal` calls waiting at the sync gate now (a test knows the writer is held there).
    pub syncs_held: AtomicU64,
    pub synced_writes: AtomicU64,
    pub writes: AtomicU64,
    /// The stale-incarnation mark (`Engine::mark_stale_incarnation`).
    stale: AtomicBool,
}

impl MemoryEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// While set, `get_cached` answers `Miss` (as if nothing were in memory).
    pub fn set_cache_misses(&self, miss: bool) {
        self.cache_misses.store(miss, Ordering::SeqCst);
    }

    /// A power loss: every write since the last sync (a `sync` write or `sync_wal`) is lost.
    pub fn lose_unsynced(&self) {
        let mut data = self.data.lock().expect("memory engine lock poisoned");
        let mut undo = self.unsynced.lock().expect("memory engine lock poisoned");
        for (k, old) in undo.drain(..).rev() {
            match old {
                Some(v) => data.insert(k, v),
                None => data.remove(&k),
            };
        }
    }

    /// While set, every write fails with `NoSpace` (a full disk).
    pub fn set_fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// While set, every fsync fails with an I/O error; the writes themselves still apply
    /// (they are in the "page cache" until `lose_unsynced`).
    pub fn set_fail_syncs(&self, fail: bool) {
        self.fail_syncs.store(fail, Ordering::SeqCst);
    }

    /// Stalls every write until the guard is dropped.
    pub fn hold_writes(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().expect("memory engine gate poisoned")
    }

    /// Stalls every `sync_wal` until the guard is dropped (writes still apply).
    pub fn hold_syncs(&self) -> MutexGuard<'_, ()> {
        self.sync_gate
            .lock()
            .expect("memory engine sync gate poisoned")
    }

    fn sync_failure(&self) -> Result<(), StorageError> {
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Err(StorageError::Io {
                op: "sync_wal",
                cause: "injected: fsync failed (EIO)".into(),
            });
        }
        Ok(())
    }
}

impl Engine for MemoryEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let data = self.data.lock().expect("memory engine lock poisoned");
        Ok(data.get(&(cf, key.to_vec())).cloned())
    }

    fn get_cached(&self, cf: Cf, key: &[u8]) -> Result<Cached, StorageError> {
        if self.cache_misses.load(Ordering::SeqCst) {
            return Ok(Cached::Miss);
        }
        self.get(cf, key).map(Cached::Hit)
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), StorageError> {
        drop(self.hold_writes());
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StorageError::NoSpace {
                op: "write",
                cause: "injected: no space left on device".into(),
            });
        }
        let mut data = self.data.lock().expect("memory engine lock poisoned");
        let mut undo = self.unsynced.lock().expect("memory engine lock poisoned");
        for op in batch.ops {
            let key = match &op {
                BatchOp::Put(cf, k, _) | BatchOp::Delete(cf, k) => (*cf, k.clone()),
            };
            undo.push((key.clone(), data.get(&key).cloned()));
            match op {
                BatchOp::Put(_, _, v) => {
                    data.insert(key, v);
                }
                BatchOp::Delete(..) => {
                    data.remove(&key);
                }
            }
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        if sync {
            self.sync_failure()?;
            undo.clear();
            self.synced_writes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn sync_wal(&self) -> Result<(), StorageError> {
        self.syncs_held.fetch_add(1, Ordering::SeqCst);
        drop(self.hold_syncs());
        self.syncs_held.fetch_sub(1, Ordering::SeqCst);
        let _data = self.data.lock().expect("memory engine lock poisoned");
        self.sync_failure()?;
        self.unsynced
            .lock()
            .expect("memory engine lock poisoned")
            .clear();
        self.synced_writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush_memtables(&self) -> Result<(), StorageError> {
        self.sync_wal()
    }

    fn scan(&self, cf: Cf, range: &ScanRange, limit: usize) -> Result<ScanBatch, StorageError> {
        let limit = limit.clamp(1, MAX_SCAN_BATCH);
        let data = self.data.lock().expect("memory engine lock poisoned");
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let from = (cf, range.start.clone());
        for ((c, k), v) in data.range(from..) {
            if *c != cf || range.end.as_ref().is_some_and(|end| k >= end) {
                break;
            }
            if entries.len() == limit {
                // More remain: resume after the last one returned.
                let (last, _) = entries.last().expect("limit >= 1");
                return Ok(ScanBatch {
                    resume: Some(key_after(last)),
                    entries,
                });
            }
            entries.push((k.clone(), v.clone()));
        }
        Ok(ScanBatch {
            entries,
            resume: None,
        })
    }

    fn property_text(&self, _cf: Cf, _name: &str) -> Option<String> {
        None
    }

    /// A file of its own in a real engine: not undone by `lose_unsynced`, and not failed by
    /// the injected write or sync failures.
    fn mark_stale_incarnation(&self) -> Result<(), StorageError> {
        self.stale.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn stale_incarnation(&self) -> bool {
        self.stale.load(Ordering::SeqCst)
    }

    fn clear_stale_incarnation(&self) -> Result<(), StorageError> {
        self.stale.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn property(&self, cf: Cf, name: &str) -> Option<u64> {
        (name == "rocksdb.estimate-num-keys").then(|| {
            let data = self.data.lock().expect("memory engine lock poisoned");
            data.keys().filter(|(c, _)| *c == cf).count() as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_scans_follow_the_contract() {
        super::super::check_scan_contract(&MemoryEngine::new(), &|| {});
    }
}
