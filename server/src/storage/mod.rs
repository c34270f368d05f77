//! Storage: a small `Engine` trait over column families, the RocksDB engine (`rocks.rs`, the only
//! file that imports `rocksdb`), an in-memory engine for unit tests, and the `Store` that owns
//! every mutation through one writer thread (group commit, per-key read-modify-write).

pub mod hints;
pub mod memory;
pub mod rocks;
pub mod state_cache;
pub mod store;
pub mod tree;

use std::fmt;

pub use store::{
    AaeMark, ChangeHook, Late, RescanMode, RescanOutcome, Store, StoreConfig, StoreStats,
    WriteError, WriteOp, WriteOutcome,
};

/// Column families, all declared at open and never created or dropped at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// `key_position(key) BE ‖ key` → encoded `KeyState`.
    Data,
    /// Node identity: node id, actor, incarnation, counter lease, clean-shutdown flag.
    Meta,
    /// Hinted handoff (sloppy quorum), planned.
    Hints,
    /// Merkle-tree leaves for anti-entropy, planned.
    Aae,
}

impl Cf {
    pub const ALL: [Cf; 4] = [Cf::Data, Cf::Meta, Cf::Hints, Cf::Aae];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Data => "data",
            Cf::Meta => "meta",
            Cf::Hints => "hints",
            Cf::Aae => "aae",
        }
    }
}

#[derive(Debug, Clone)]
pub enum BatchOp {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
}

/// Mutations applied atomically (one WAL record).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub ops: Vec<BatchOp>,
}

impl Batch {
    pub fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(BatchOp::Put(cf, key, value));
    }
    pub fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.ops.push(BatchOp::Delete(cf, key));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("disk full during {op}: {cause}")]
    NoSpace { op: &'static str, cause: String },
    #[error("storage i/o error during {op}: {cause}")]
    Io { op: &'static str, cause: String },
    #[error("corrupt record in {cf} at key {key}: {cause}")]
    Corrupt {
        cf: &'static str,
        key: HexKey,
        cause: String,
    },
    #[error("cannot open data dir {dir}: {cause}")]
    Open { dir: String, cause: String },
}

/// A key printed for operators: UTF-8 when printable, else hex, truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HexKey(pub Vec<u8>);

impl fmt::Display for HexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.0;
        let shown = &key[..key.len().min(64)];
        match std::str::from_utf8(shown) {
            Ok(s) if s.chars().all(|c| !c.is_control()) => write!(f, "{s:?}")?,
            _ => {
                write!(f, "0x")?;
                for b in shown {
                    write!(f, "{b:02x}")?;
                }
            }
        }
        if key.len() > shown.len() {
            write!(f, "…(+{} bytes)", key.len() - shown.len())?;
        }
        Ok(())
    }
}

/// The outcome of `Engine::get_cached`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// Answered from memory (`None` = the key is absent).
    Hit(Option<Vec<u8>>),
    /// Not decidable without reading from disk.
    Miss,
}

/// Whether this node's copy of a key may answer a read as a replica (false while a new or
/// wiped data dir has not been synced from the key's other replicas; anti-entropy decides).
pub type ReadGate = std::sync::Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// A gate that lets every read through.
pub fn open_gate() -> ReadGate {
    std::sync::Arc::new(|_| true)
}

/// A key range of one column family: `start` inclusive, `end` exclusive (`None` = to the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

/// One batch of a range scan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScanBatch {
    /// Entries in key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the next batch starts (pass it as the next `start`); `None` = the range is done.
    pub resume: Option<Vec<u8>>,
}

/// The smallest key after `key`: the cursor that resumes a scan after `key`.
pub fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// Calls `f` on every entry of `range` in `cf`, scan batch by scan batch (blocks on the disk);
/// an `Err(cause)` from `f` stops the scan as a `Corrupt` error naming the row.
pub fn scan_all(
    engine: &dyn Engine,
    cf: Cf,
    mut range: ScanRange,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), String>,
) -> Result<(), StorageError> {
    loop {
        let batch = engine.scan(cf, &range, MAX_SCAN_BATCH)?;
        for (k, v) in &batch.entries {
            f(k, v).map_err(|cause| StorageError::Corrupt {
                cf: cf.name(),
                key: HexKey(k.clone()),
                cause,
            })?;
        }
        match batch.resume {
            Some(next) => range.start = next,
            None => return Ok(()),
        }
    }
}

/// Most entries one `scan` call returns: a caller that asks for more gets this many (a batch
/// must stay a bounded unit of a worker's work).
pub const MAX_SCAN_BATCH: usize = 10_000;

/// The storage engine: point reads, bounded range scans and atomic batches over the column
/// families.
/// Every method but `get_cached` may block on the disk; call them from the writer thread or
/// `spawn_blocking`.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Like `get`, but only from memory (memtables and block cache): `Miss` when answering
    /// would need disk I/O. Never blocks on the disk, so async code may call it inline.
    fn get_cached(&self, cf: Cf, key: &[u8]) -> Result<Cached, StorageError>;
    /// Applies the batch atomically; `sync` = fsync the WAL before returning.
    fn write(&self, batch: Batch, sync: bool) -> Result<(), StorageError>;
    /// Makes every earlier write durable (fsync the WAL).
    fn sync_wal(&self) -> Result<(), StorageError>;
    /// Makes every earlier write durable without the WAL: every memtable is written to a new,
    /// fsynced table file (after a failed WAL fsync, whose pages the OS may have dropped).
    fn flush_memtables(&self) -> Result<(), StorageError>;
    /// At most `limit` entries of `range` (capped at `MAX_SCAN_BATCH`), in key order, and where
    /// to resume. Scans do not fill the block cache (they would evict the hot set). Not a
    /// snapshot across batches: a key written between two batches is seen if it sorts after
    /// the cursor.
    fn scan(&self, cf: Cf, range: &ScanRange, limit: usize) -> Result<ScanBatch, StorageError>;
    /// Integer properties for metrics (e.g. `rocksdb.estimate-num-keys`), None when unknown.
    fn property(&self, cf: Cf, name: &str) -> Option<u64>;
    /// A text property of `cf` (e.g. `rocksdb.cf-write-stall-stats`), if the engine has it.
    fn property_text(&self, cf: Cf, name: &str) -> Option<String>;
    /// Records, durably and outside the engine's own write path (which may be what failed),
    /// that the next open must start a new incarnation: a WAL fsync failed and the new
    /// identity could not be written either.
    fn mark_stale_incarnation(&self) -> Result<(), StorageError>;
    /// Whether that mark is set.
    fn stale_incarnation(&self) -> bool;
    /// Clears the mark (once a new identity is durable).
    fn clear_stale_incarnation(&self) -> Result<(), StorageError>;
}

pub use ringkv_protocol::ring::key_position;

/// Storage key of a user key in `Cf::Data`: `position BE ‖ key`.
pub fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&key_position(key).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The range-scan contract, checked on every engine: batches in key order, bounded, resumable,
/// within the range and the column family, the hash memtable's prefixes notwithstanding.
/// `flush` moves what was written so far out of memory (SST files), when the engine has that.
#[cfg(test)]
pub(crate) fn check_scan_contract(engine: &dyn Engine, flush: &dyn Fn()) {
    use std::collections::BTreeMap;
    let mut expected = BTreeMap::new();
    let mut batch = Batch::default();
    for i in 0..300u32 {
        let key = data_key(format!("key-{i}").as_bytes());
        let value = format!("value-{i}").into_bytes();
        batch.put(Cf::Data, key.clone(), value.clone());
        expected.insert(key, value);
        if i == 150 {
            // Half on disk, half in the memtable.
            engine.write(std::mem::take(&mut batch), false).unwrap();
            flush();
        }
    }
    // Other column families must not show up.
    batch.put(Cf::Hints, vec![0; 9], b"hint".to_vec());
    batch.put(Cf::Meta, vec![0xff; 9], b"meta".to_vec());
    engine.write(batch, false).unwrap();

    let scan_all = |range: ScanRange, limit: usize| {
        let mut got = Vec::new();
        let mut range = range;
        let mut batches = 0;
        loop {
            let b = engine.scan(Cf::Data, &range, limit).unwrap();
            assert!(b.entries.len() <= limit, "a batch holds at most its limit");
            batches += 1;
            got.extend(b.entries);
            match b.resume {
                Some(next) => range.start = next,
                None => break,
            }
        }
        (got, batches)
    };
    let all: Vec<(Vec<u8>, Vec<u8>)> = expected.clone().into_iter().collect();
    let (got, batches) = scan_all(
        ScanRange {
            start: Vec::new(),
            end: None,
        },
        7,
    );
    assert_eq!(got, all, "every entry once, in key order");
    assert!(batches >= 300 / 7, "bounded batches: {batches}");

    // A sub-range (a ring arc): exactly the keys inside it.
    let (lo, hi) = (all[40].0.clone(), all[260].0.clone());
    let (got, _) = scan_all(
        ScanRange {
            start: lo.clone(),
            end: Some(hi.clone()),
        },
        50,
    );
    assert_eq!(got, all[40..260].to_vec());
    // An empty range, and a limit above the cap.
    let none = engine
        .scan(
            Cf::Data,
            &ScanRange {
                start: hi.clone(),
                end: Some(hi),
            },
            10,
        )
        .unwrap();
    assert_eq!(none, ScanBatch::default());
    let capped = engine
        .scan(
            Cf::Data,
            &ScanRange {
                start: Vec::new(),
                end: None,
            },
            usize::MAX,
        )
        .unwrap();
    assert_eq!(capped.entries.len(), 300);
    assert_eq!(capped.resume, None);
    let hints = engine
        .scan(
            Cf::Hints,
            &ScanRange {
                start: Vec::new(),
                end: None,
            },
            10,
        )
        .unwrap();
    assert_eq!(hints.entries, vec![(vec![0; 9], b"hint".to_vec())]);
}
