//! Storage: a small `Engine` trait over column families, the RocksDB engine (`rocks.rs`, the only
//! file that imports `rocksdb`), an in-memory engine for unit tests, and the `Store` that owns
//! every mutation through one writer thread (group commit, per-key read-modify-write).

pub mod memory;
pub mod rocks;
pub mod state_cache;
pub mod store;

use std::fmt;

pub use store::{Store, StoreConfig, StoreStats, WriteError, WriteOp, WriteOutcome};

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

/// The storage engine: point reads and atomic batches over the column families.
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
    /// Integer properties for metrics (e.g. `rocksdb.estimate-num-keys`), None when unknown.
    fn property(&self, cf: Cf, name: &str) -> Option<u64>;
}

pub use ringkv_protocol::ring::key_position;

/// Storage key of a user key in `Cf::Data`: `position BE ‖ key`.
pub fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&key_position(key).to_be_bytes());
    k.extend_from_slice(key);
    k
}
