//! The `Store`: versioned key states on an `Engine`.
//!
//! One writer thread owns every mutation (shared/notes/rocksdb.md §3–4): async tasks hand it
//! jobs over a bounded crossbeam channel; it takes one job, then whatever else is queued (up to
//! `MAX_GROUP_JOBS`), runs each job's read-modify-write against the stored state plus an overlay
//! of what the group already wrote, and commits the whole group as one atomic write batch — with
//! one fsync in `group` mode. Serializing per-key RMW in one thread is what makes minting dots
//! safe (two puts never mint from the same read). Reads run elsewhere and see the old or the new
//! state, never a torn one.
//!
//! Identity: the node's actor id is random per incarnation. A new incarnation starts on a fresh
//! data dir, and after an unclean shutdown when writes are not fsynced (`sync = none`), because
//! then acknowledged dots may have been lost and must never be minted again. Counters are one
//! monotone sequence per actor, shared by all keys, reserved in leases of `COUNTER_LEASE` that
//! are persisted in the same batch as the first write that uses them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use ringkv_protocol::limits::{MAX_OBJECT_LEN, MAX_SIBLINGS};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::state_cache::{StateCache, STATE_CACHE_BYTES};
use super::{data_key, Batch, Cached, Cf, Engine, HexKey, StorageError};
use crate::version::{Actor, Dot, KeyState, VersionVector};

/// Counters reserved per persisted lease. A restart skips the unused rest of a lease, so the
/// lease only needs to be small compared with 2^64; 10 000 is Riak's vnode counter lease.
pub const COUNTER_LEASE: u64 = 10_000;
/// Most jobs committed in one write batch: bounds the latency a job waits for its group and
/// the memory of the overlay. At ~4 µs per key the largest group costs ~4 ms.
pub const MAX_GROUP_JOBS: usize = 1024;
/// Byte cap of one group's batch, for the same reason with large values.
pub const MAX_GROUP_BYTES: usize = 16 << 20;
/// Jobs queued for the writer. A full queue answers `Overloaded` at once (backpressure to the
/// client) instead of letting latency grow without bound.
pub const QUEUE_CAPACITY: usize = 16 * 1024;
/// Sibling count above which a write logs a warning naming the key (Riak's `warn_siblings`).
pub const WARN_SIBLINGS: usize = 25;

const META_NODE_ID: &[u8] = b"node_id";
const META_IDENTITY: &[u8] = b"identity";
const META_CLEAN: &[u8] = b"clean_shutdown";

/// Durability of acknowledged writes (see docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// WAL written, not fsynced: survives a process crash, not a power loss.
    None,
    /// One fsync per group of writes: survives power loss; the default.
    Group,
    /// One fsync per write, no grouping: survives power loss; slowest.
    Always,
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(SyncMode::None),
            "group" => Ok(SyncMode::Group),
            "always" => Ok(SyncMode::Always),
            other => Err(format!(
                "invalid sync mode {other:?}: expected none, group or always"
            )),
        }
    }
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncMode::None => "none",
            SyncMode::Group => "group",
            SyncMode::Always => "always",
        })
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub node_id: String,
    pub sync: SyncMode,
}

/// A mutation for the writer thread.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A client write coordinated on this replica: mint a dot and `update`.
    Update {
        key: Bytes,
        /// The writer's context; `None` = this replica's own current context (a delete
        /// without context removes every version this replica holds).
        ctx: Option<VersionVector>,
        /// `None` writes a tombstone.
        value: Option<Bytes>,
        timestamp_ms: u64,
    },
    /// Merge a replica's state (replication, read repair, hints, anti-entropy): a pure `sync`.
    Merge { key: Bytes, state: KeyState },
}

impl WriteOp {
    fn key(&self) -> &Bytes {
        match self {
            WriteOp::Update { key, .. } | WriteOp::Merge { key, .. } => key,
        }
    }

    fn approx_bytes(&self) -> usize {
        match self {
            WriteOp::Update { key, value, .. } => key.len() + value.as_ref().map_or(0, |v| v.len()),
            WriteOp::Merge { key, state } => key.len() + state.value_bytes(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// The key's state after the write.
    pub state: KeyState,
    /// The dot minted (updates only).
    pub dot: Option<Dot>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("key {key} would hold {count} siblings, limit {limit}: resolve siblings by writing with the read's context")]
    TooManySiblings {
        key: HexKey,
        count: usize,
        limit: usize,
    },
    #[error("key {key} would hold {size} bytes of values, limit {limit}")]
    TooLarge {
        key: HexKey,
        size: usize,
        limit: usize,
    },
    #[error("write queue full ({capacity} jobs): node overloaded")]
    Overloaded { capacity: usize },
    #[error("store is shutting down")]
    ShuttingDown,
    #[error("key {key}: {source}")]
    Storage {
        key: HexKey,
        #[source]
        source: StorageError,
    },
}

impl WriteError {
    /// True when the write certainly did not reach storage. A refused write (limits, full
    /// queue) never reached it; a batch the engine rejected (full disk on append, failed read)
    /// applied nothing. A failed WAL write or fsync and a writer that exited with the job are
    /// unknown: the WAL bytes may still reach the disk and be replayed.
    pub fn is_definite(&self) -> bool {
        match self {
            WriteError::Storage { source, .. } => match source {
                StorageError::Io { op, .. } => !matches!(*op, "write" | "sync_wal"),
                // A full disk while appending to the WAL applies nothing; one reported by the
                // fsync after the append (RocksDB: "While fdatasync …") leaves the bytes in
                // the WAL, as does any failed `sync_wal` (the writes are even applied).
                StorageError::NoSpace { op, cause } => *op != "sync_wal" && !cause.contains("sync"),
                StorageError::Corrupt { .. } | StorageError::Open { .. } => true,
            },
            _ => true,
        }
    }
}

/// Writer metrics, read by `status`.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub updates: AtomicU64,
    pub merges: AtomicU64,
    pub merges_noop: AtomicU64,
    pub batches: AtomicU64,
    pub synced_batches: AtomicU64,
    pub largest_group: AtomicU64,
    pub write_errors: AtomicU64,
    pub rejected_siblings: AtomicU64,
    pub rejected_size: AtomicU64,
    pub overloaded: AtomicU64,
    pub amnesia_detected: AtomicU64,
    pub sibling_warnings: AtomicU64,
    pub actor: AtomicU64,
    pub incarnation: AtomicU64,
    pub next_counter: AtomicU64,
    /// Reads answered from memory on the calling task.
    pub reads_cached: AtomicU64,
    /// Reads that needed the disk and ran on the blocking pool.
    pub reads_blocking: AtomicU64,
    /// Writer read-modify-writes that found the key's state in the writer's state cache.
    pub state_cache_hits: AtomicU64,
    /// Writer read-modify-writes that read the key's state from the engine.
    pub state_cache_misses: AtomicU64,
    /// Entries in the writer's state cache (after the last group).
    pub state_cache_entries: AtomicU64,
}

enum Msg {
    Job(Job),
    Shutdown,
}

struct Job {
    op: WriteOp,
    reply: Reply,
}

type OutcomeTx = oneshot::Sender<Result<WriteOutcome, WriteError>>;
type CommitTx = oneshot::Sender<Result<(), WriteError>>;
/// A job's key, how to answer it, and its result until sent.
type Answer = (Bytes, Reply, Option<Result<WriteOutcome, WriteError>>);

/// How the writer answers a job.
enum Reply {
    /// The outcome once the group is committed.
    Committed(OutcomeTx),
    /// The outcome as soon as it is computed, before the commit, then the commit's result
    /// (`Store::write_early`). Released early only when no dot of the group depends on a
    /// counter lease still to be persisted; otherwise both are sent after the commit.
    Early {
        applied: OutcomeTx,
        committed: CommitTx,
    },
    /// The outcome was released early; the commit's result is still owed.
    CommitOnly(CommitTx),
    /// Everything was answered (a refused write released early).
    Done,
}

pub struct Store {
    engine: Arc<dyn Engine>,
    tx: Sender<Msg>,
    writer: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<StoreStats>,
    config: StoreConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    #[error("data dir belongs to node {found:?}, not {expected:?}: refusing to mix identities (use the right --node-id or another --data-dir)")]
    WrongNode { found: String, expected: String },
    #[error("corrupt node metadata: {0}")]
    CorruptMeta(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug, Clone, Copy)]
struct Identity {
    actor: Actor,
    incarnation: u64,
}

fn new_actor() -> Actor {
    loop {
        let a: u64 = rand::random();
        if a != 0 {
            return a;
        }
    }
}

fn encode_identity(id: Identity, lease_end: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&id.actor.to_be_bytes());
    v.extend_from_slice(&id.incarnation.to_be_bytes());
    v.extend_from_slice(&lease_end.to_be_bytes());
    v
}

fn decode_identity(b: &[u8]) -> Result<(Identity, u64), StoreOpenError> {
    if b.len() != 24 {
        return Err(StoreOpenError::CorruptMeta(format!(
            "identity record is {} bytes, expected 24",
            b.len()
        )));
    }
    let u = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8-byte slice"));
    Ok((
        Identity {
            actor: u(0),
            incarnation: u(8),
        },
        u(16),
    ))
}

impl Store {
    /// Opens the store: checks the data dir belongs to this node, chooses the incarnation,
    /// persists a fresh counter lease (fsynced) and starts the writer thread.
    pub fn open(engine: Arc<dyn Engine>, config: StoreConfig) -> Result<Store, StoreOpenError> {
        if let Some(found) = engine.get(Cf::Meta, META_NODE_ID)? {
            let found = String::from_utf8_lossy(&found).into_owned();
            if found != config.node_id {
                return Err(StoreOpenError::WrongNode {
                    found,
                    expected: config.node_id.clone(),
                });
            }
        }
        let previous = match engine.get(Cf::Meta, META_IDENTITY)? {
            Some(b) => Some(decode_identity(&b)?),
            None => None,
        };
        let clean = engine.get(Cf::Meta, META_CLEAN)?.as_deref() == Some(&[1u8][..]);
        let (identity, next_counter, reason) = match previous {
            None => (
                Identity {
                    actor: new_actor(),
                    incarnation: 1,
                },
                1,
                "fresh data dir",
            ),
            Some((old, _)) if !clean && config.sync == SyncMode::None => (
                Identity {
                    actor: new_actor(),
                    incarnation: old.incarnation + 1,
                },
                1,
                "unclean shutdown with sync=none: acknowledged dots may be lost",
            ),
            Some((old, lease_end)) => (
                old,
                lease_end + 1,
                if clean {
                    "clean restart"
                } else {
                    "unclean restart, writes were fsynced"
                },
            ),
        };
        let lease_end = next_counter + COUNTER_LEASE - 1;
        let mut batch = Batch::default();
        batch.put(
            Cf::Meta,
            META_NODE_ID.to_vec(),
            config.node_id.as_bytes().to_vec(),
        );
        batch.put(
            Cf::Meta,
            META_IDENTITY.to_vec(),
            encode_identity(identity, lease_end),
        );
        batch.put(Cf::Meta, META_CLEAN.to_vec(), vec![0]);
        engine.write(batch, true)?;
        info!(
            node = %config.node_id,
            actor = format!("{:016x}", identity.actor),
            incarnation = identity.incarnation,
            next_counter,
            reason,
            "storage opened"
        );

        let stats = Arc::new(StoreStats::default());
        stats.actor.store(identity.actor, Ordering::Relaxed);
        stats
            .incarnation
            .store(identity.incarnation, Ordering::Relaxed);
        stats.next_counter.store(next_counter, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
        let mut writer = Writer {
            engine: engine.clone(),
            rx,
            identity,
            next_counter,
            lease_persisted: lease_end,
            sync: config.sync,
            stats: stats.clone(),
            node_id: config.node_id.clone(),
            cache: StateCache::new(STATE_CACHE_BYTES),
        };
        let handle = std::thread::Builder::new()
            .name("ringkv-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StorageError::Io {
                op: "spawn writer thread",
                cause: e.to_string(),
            })?;
        Ok(Store {
            engine,
            tx,
            writer: Mutex::new(Some(handle)),
            stats,
            config,
        })
    }

    /// Queues a write; resolves when its group is committed (durable per the sync mode).
    pub async fn write(&self, op: WriteOp) -> Result<WriteOutcome, WriteError> {
        let key = op.key().clone();
        let (reply, rx) = oneshot::channel();
        self.submit(op, Reply::Committed(reply))?;
        rx.await.unwrap_or_else(|_| Err(writer_exited(&key)))
    }

    /// Queues a write and resolves with its outcome as soon as the writer has computed it —
    /// usually before the group's commit (fsync) — plus a future of the commit. A coordinator
    /// ships the new state to the other replicas while its own fsync runs, instead of after.
    ///
    /// Safe because a minted dot only leaves the writer early when the counter lease covering
    /// it is already durable: if the commit is then lost (crash, full disk), a restart resumes
    /// past that lease and never mints the dot again. The outcome is not durable here until
    /// the commit future says so.
    pub async fn write_early(
        &self,
        op: WriteOp,
    ) -> Result<
        (
            WriteOutcome,
            impl Future<Output = Result<(), WriteError>> + Send + 'static,
        ),
        WriteError,
    > {
        let key = op.key().clone();
        let (applied, applied_rx) = oneshot::channel();
        let (committed, committed_rx) = oneshot::channel();
        self.submit(op, Reply::Early { applied, committed })?;
        let outcome = applied_rx
            .await
            .unwrap_or_else(|_| Err(writer_exited(&key)))?;
        let commit = async move {
            committed_rx
                .await
                .unwrap_or_else(|_| Err(writer_exited(&key)))
        };
        Ok((outcome, commit))
    }

    fn submit(&self, op: WriteOp, reply: Reply) -> Result<(), WriteError> {
        match self.tx.try_send(Msg::Job(Job { op, reply })) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(WriteError::Overloaded {
                    capacity: QUEUE_CAPACITY,
                })
            }
            Err(TrySendError::Disconnected(_)) => Err(WriteError::ShuttingDown),
        }
    }

    /// Reads a key's state, blocking (tests; async code uses `read`). Absent = empty state.
    #[cfg(test)]
    pub fn get(&self, key: &[u8]) -> Result<KeyState, StorageError> {
        read_state(self.engine.as_ref(), &data_key(key), key)
    }

    /// Reads a key's state from async code: inline when the engine can answer from memory
    /// (memtable or block cache, a few microseconds), else on the blocking pool. Most reads of
    /// a hot working set thus cost no thread hand-off.
    pub async fn read(self: &Arc<Self>, key: Bytes) -> Result<KeyState, StorageError> {
        let stored = self.read_stored(&key).await?;
        decode_state(stored, &key)
    }

    /// A key's state as stored (`KeyState::encode`), `None` when absent, read like `read`.
    /// For a replica that only forwards the state: no decode and re-encode.
    pub async fn read_stored(
        self: &Arc<Self>,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let dkey = data_key(key);
        if let Cached::Hit(v) = self.engine.get_cached(Cf::Data, &dkey)? {
            self.stats.reads_cached.fetch_add(1, Ordering::Relaxed);
            return Ok(v);
        }
        self.stats.reads_blocking.fetch_add(1, Ordering::Relaxed);
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.engine.get(Cf::Data, &dkey))
            .await
            .unwrap_or_else(|e| {
                Err(StorageError::Io {
                    op: "get",
                    cause: format!("read task failed: {e}"),
                })
            })
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn is_running(&self) -> bool {
        self.writer
            .lock()
            .expect("writer handle lock poisoned")
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }

    /// Drains queued writes, marks the shutdown clean and fsyncs the WAL. Blocking; idempotent.
    pub fn close(&self) {
        let handle = self
            .writer
            .lock()
            .expect("writer handle lock poisoned")
            .take();
        if let Some(handle) = handle {
            // Blocking send: the writer is draining, so space frees up.
            let _ = self.tx.send(Msg::Shutdown);
            if handle.join().is_err() {
                error!(node = %self.config.node_id, "writer thread panicked during shutdown");
            }
        }
    }
}

/// The writer answers every job it takes; a dropped reply means it exited mid-group.
fn writer_exited(key: &[u8]) -> WriteError {
    WriteError::Storage {
        key: HexKey(key.to_vec()),
        source: StorageError::Io {
            op: "write",
            cause: "writer thread exited".into(),
        },
    }
}

fn read_state(engine: &dyn Engine, dkey: &[u8], key: &[u8]) -> Result<KeyState, StorageError> {
    decode_state(engine.get(Cf::Data, dkey)?, key)
}

fn decode_state(stored: Option<Vec<u8>>, key: &[u8]) -> Result<KeyState, StorageError> {
    match stored {
        None => Ok(KeyState::new()),
        Some(bytes) => KeyState::decode(&bytes).map_err(|e| StorageError::Corrupt {
            cf: Cf::Data.name(),
            key: HexKey(key.to_vec()),
            cause: e.to_string(),
        }),
    }
}

struct Writer {
    engine: Arc<dyn Engine>,
    rx: Receiver<Msg>,
    identity: Identity,
    next_counter: u64,
    /// Highest counter covered by a durable lease of the current actor.
    lease_persisted: u64,
    sync: SyncMode,
    stats: Arc<StoreStats>,
    node_id: String,
    /// States of recently written keys, as committed (see `state_cache`).
    cache: StateCache,
}

/// Per-group scratch state.
struct Group {
    /// Each touched key's state as of this group (committed state plus the group's writes).
    overlay: HashMap<Vec<u8>, KeyState>,
    batch: Batch,
    /// Lease end to persist with this batch, if the group runs past the durable lease.
    lease: Option<u64>,
}

impl Writer {
    fn run(&mut self) {
        let max_jobs = if self.sync == SyncMode::Always {
            1
        } else {
            MAX_GROUP_JOBS
        };
        let mut shutting_down = false;
        while !shutting_down {
            let first = match self.rx.recv() {
                Ok(Msg::Job(job)) => job,
                Ok(Msg::Shutdown) | Err(_) => break,
            };
            let mut bytes = first.op.approx_bytes();
            let mut jobs = vec![first];
            while jobs.len() < max_jobs && bytes < MAX_GROUP_BYTES {
                match self.rx.try_recv() {
                    Ok(Msg::Job(job)) => {
                        bytes += job.op.approx_bytes();
                        jobs.push(job);
                    }
                    Ok(Msg::Shutdown) => {
                        shutting_down = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(jobs);
        }
        // Jobs queued behind the shutdown marker are still answered, then the store is closed.
        let mut rest = Vec::new();
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Job(job) = msg {
                rest.push(job);
            }
        }
        if !rest.is_empty() {
            self.commit_group(rest);
        }
        let mut batch = Batch::default();
        batch.put(Cf::Meta, META_CLEAN.to_vec(), vec![1]);
        let result = self
            .engine
            .write(batch, true)
            .and_then(|()| self.engine.sync_wal());
        match result {
            Ok(()) => info!(node = %self.node_id, "storage closed cleanly"),
            Err(e) => error!(node = %self.node_id, error = %e, "could not mark clean shutdown"),
        }
    }

    fn commit_group(&mut self, jobs: Vec<Job>) {
        let mut group = Group {
            overlay: HashMap::with_capacity(jobs.len()),
            batch: Batch::default(),
            lease: None,
        };
        let mut answers: Vec<Answer> = jobs
            .into_iter()
            .map(|job| {
                let result = self.apply(&job.op, &mut group);
                (job.op.key().clone(), job.reply, Some(result))
            })
            .collect();
        let count = answers.len();
        if let Some(lease_end) = group.lease {
            group.batch.put(
                Cf::Meta,
                META_IDENTITY.to_vec(),
                encode_identity(self.identity, lease_end),
            );
        } else {
            // Every dot of this group is under a durable lease: early outcomes may leave now.
            answers = answers
                .into_iter()
                .map(|(key, reply, result)| match (reply, result) {
                    (Reply::Early { applied, committed }, Some(result)) => {
                        let ok = result.is_ok();
                        let _ = applied.send(result);
                        // A refused write (limits) is final: no commit result is owed.
                        let rest = if ok {
                            Reply::CommitOnly(committed)
                        } else {
                            Reply::Done
                        };
                        (key, rest, None)
                    }
                    (reply, result) => (key, reply, result),
                })
                .collect();
        }
        let mut failure = None;
        if !group.batch.is_empty() {
            // A batch that persists a counter lease is always fsynced, whatever the mode: a
            // lease lost in a power loss could hand out its dots a second time after a
            // restart that does not start a new incarnation (one fsync per COUNTER_LEASE dots).
            let sync = self.sync != SyncMode::None || group.lease.is_some();
            match self.engine.write(group.batch, sync) {
                Ok(()) => {
                    if let Some(lease_end) = group.lease {
                        self.lease_persisted = lease_end;
                    }
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    if sync {
                        self.stats.synced_batches.fetch_add(1, Ordering::Relaxed);
                    }
                    self.stats
                        .largest_group
                        .fetch_max(count as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    error!(node = %self.node_id, jobs = count, error = %e, "write batch failed; nothing in it was applied");
                    failure = Some(e);
                }
            }
        }
        if failure.is_none() {
            // Only committed states are cached; after a failed batch the keys this group took
            // out of the cache stay uncached and are read from the store next time.
            for (dkey, state) in group.overlay {
                self.cache.insert(dkey, state);
            }
        }
        self.stats
            .state_cache_entries
            .store(self.cache.len() as u64, Ordering::Relaxed);
        self.stats
            .next_counter
            .store(self.next_counter, Ordering::Relaxed);
        for (key, reply, result) in answers {
            let storage_error = |e: &StorageError| WriteError::Storage {
                key: HexKey(key.to_vec()),
                source: e.clone(),
            };
            // The requester may have given up (timeout); the write stands regardless.
            match reply {
                Reply::Done => {}
                Reply::Committed(tx) => {
                    let result = result.expect("results are only taken by early release");
                    let _ = tx.send(match (&failure, result) {
                        (Some(e), Ok(_)) => Err(storage_error(e)),
                        (_, result) => result,
                    });
                }
                Reply::CommitOnly(tx) => {
                    let _ = tx.send(failure.as_ref().map_or(Ok(()), |e| Err(storage_error(e))));
                }
                Reply::Early { applied, committed } => {
                    // Held back (a lease was persisted with this group): now both at once.
                    let result = result.expect("results are only taken by early release");
                    match (&failure, result) {
                        (Some(e), Ok(_)) => {
                            let _ = applied.send(Err(storage_error(e)));
                        }
                        (_, result) => {
                            let ok = result.is_ok();
                            let _ = applied.send(result);
                            if ok {
                                let _ = committed.send(Ok(()));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The key's state as of this group: the group's own writes, else the state cache, else
    /// the engine.
    fn current(&mut self, group: &Group, dkey: &[u8], key: &[u8]) -> Result<KeyState, WriteError> {
        if let Some(s) = group.overlay.get(dkey) {
            return Ok(s.clone());
        }
        if let Some(s) = self.cache.take(dkey) {
            self.stats.state_cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(s);
        }
        self.stats
            .state_cache_misses
            .fetch_add(1, Ordering::Relaxed);
        read_state(self.engine.as_ref(), dkey, key).map_err(|source| WriteError::Storage {
            key: HexKey(key.to_vec()),
            source,
        })
    }

    /// Our own actor appears ahead of our counter: this replica lost writes it had
    /// acknowledged (restored backup, lost WAL). Minting on would reuse dots; start a new
    /// incarnation with a fresh actor instead (Riak's key-amnesia handling).
    fn amnesia(&mut self, key: &[u8], seen: u64) {
        self.stats.amnesia_detected.fetch_add(1, Ordering::Relaxed);
        let old = self.identity;
        self.identity = Identity {
            actor: new_actor(),
            incarnation: old.incarnation + 1,
        };
        self.next_counter = 1;
        self.lease_persisted = 0;
        self.stats
            .actor
            .store(self.identity.actor, Ordering::Relaxed);
        self.stats
            .incarnation
            .store(self.identity.incarnation, Ordering::Relaxed);
        warn!(
            node = %self.node_id,
            key = %HexKey(key.to_vec()),
            old_actor = format!("{:016x}", old.actor),
            seen_counter = seen,
            new_actor = format!("{:016x}", self.identity.actor),
            "amnesia: our actor is ahead of our counter; starting a new incarnation"
        );
    }

    fn mint(&mut self, group: &mut Group) -> Dot {
        let counter = self.next_counter;
        self.next_counter += 1;
        let covered = group.lease.unwrap_or(self.lease_persisted);
        if counter > covered {
            group.lease = Some(counter + COUNTER_LEASE - 1);
        }
        Dot {
            actor: self.identity.actor,
            counter,
        }
    }

    fn apply(&mut self, op: &WriteOp, group: &mut Group) -> Result<WriteOutcome, WriteError> {
        let key = op.key();
        let dkey = data_key(key);
        let current = self.current(group, &dkey, key)?;
        let (next, dot) = match op {
            WriteOp::Update {
                ctx,
                value,
                timestamp_ms,
                ..
            } => {
                self.stats.updates.fetch_add(1, Ordering::Relaxed);
                let ctx = ctx.clone().unwrap_or_else(|| current.context().clone());
                let needed = current.min_fresh_counter(&ctx, self.identity.actor);
                if needed > self.next_counter {
                    self.amnesia(key, needed - 1);
                }
                let dot = self.mint(group);
                let next = current.update(&ctx, dot, *timestamp_ms, value.clone());
                self.check_limits(key, &current, &next)?;
                (next, Some(dot))
            }
            WriteOp::Merge { state, .. } => {
                self.stats.merges.fetch_add(1, Ordering::Relaxed);
                let ours = state.context().get(self.identity.actor);
                if ours >= self.next_counter {
                    self.amnesia(key, ours);
                }
                let next = current.sync(state);
                if next == current {
                    self.stats.merges_noop.fetch_add(1, Ordering::Relaxed);
                    // Unchanged and committed: back into the overlay so it is cached again.
                    group.overlay.insert(dkey, current.clone());
                    return Ok(WriteOutcome {
                        state: current,
                        dot: None,
                    });
                }
                (next, None)
            }
        };
        group.batch.put(Cf::Data, dkey.clone(), next.encode());
        group.overlay.insert(dkey, next.clone());
        Ok(WriteOutcome { state: next, dot })
    }

    /// Client writes that *grow* a key past the limits are refused; writes that resolve
    /// siblings always pass, and merges are never refused (replicas must converge).
    fn check_limits(&self, key: &[u8], old: &KeyState, new: &KeyState) -> Result<(), WriteError> {
        let count = new.siblings().len();
        if count > MAX_SIBLINGS && count > old.siblings().len() {
            self.stats.rejected_siblings.fetch_add(1, Ordering::Relaxed);
            return Err(WriteError::TooManySiblings {
                key: HexKey(key.to_vec()),
                count,
                limit: MAX_SIBLINGS,
            });
        }
        let size = new.value_bytes();
        if size > MAX_OBJECT_LEN && size > old.value_bytes() {
            self.stats.rejected_size.fetch_add(1, Ordering::Relaxed);
            return Err(WriteError::TooLarge {
                key: HexKey(key.to_vec()),
                size,
                limit: MAX_OBJECT_LEN,
            });
        }
        if count > WARN_SIBLINGS {
            self.stats.sibling_warnings.fetch_add(1, Ordering::Relaxed);
            warn!(node = %self.node_id, key = %HexKey(key.to_vec()), siblings = count,
                  "many siblings: clients are writing without (or with stale) context");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
