//! In-memory engine for unit tests of the store logic. It can be told to fail writes, to test
//! error paths (e.g. a full disk) deterministically.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::{Batch, BatchOp, Cached, Cf, Engine, StorageError};

type Table = BTreeMap<(Cf, Vec<u8>), Vec<u8>>;

#[derive(Default)]
pub struct MemoryEngine {
    data: Mutex<Table>,
    fail_writes: AtomicBool,
    cache_misses: AtomicBool,
    pub synced_writes: AtomicU64,
    pub writes: AtomicU64,
}

impl MemoryEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// While set, `get_cached` answers `Miss` (as if nothing were in memory).
    pub fn set_cache_misses(&self, miss: bool) {
        self.cache_misses.store(miss, Ordering::SeqCst);
    }

    /// While set, every write fails with `NoSpace` (a full disk).
    pub fn set_fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
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
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StorageError::NoSpace {
                op: "write",
                cause: "injected: no space left on device".into(),
            });
        }
        let mut data = self.data.lock().expect("memory engine lock poisoned");
        for op in batch.ops {
            match op {
                BatchOp::Put(cf, k, v) => {
                    data.insert((cf, k), v);
                }
                BatchOp::Delete(cf, k) => {
                    data.remove(&(cf, k));
                }
            }
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        if sync {
            self.synced_writes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn sync_wal(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn property(&self, cf: Cf, name: &str) -> Option<u64> {
        (name == "rocksdb.estimate-num-keys").then(|| {
            let data = self.data.lock().expect("memory engine lock poisoned");
            data.keys().filter(|(c, _)| *c == cf).count() as u64
        })
    }
}
