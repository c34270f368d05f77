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
//! A group is committed in two steps: its batch is appended to the WAL and applied (one
//! `write` without fsync), then the WAL is fsynced (per the sync mode). Outcomes that may leave
//! early (`write_early`) leave between the two: a minted version is shipped to other replicas
//! only once it is in this node's own copy (memtable and OS page cache), so a failed append
//! never ships anything, and a process crash can never make this node forget a version it
//! shipped. Only a power loss (or a failed fsync) can; both renew the actor (below).
//!
//! Identity (docs/architecture.md, "Who mints"): the node's actor id is
//! `node tag ‖ incarnation stamp` (`version::actor_id`). A new incarnation (a new actor) starts
//! when this node's copy may lack one of its own versions, and only then:
//! - a fresh data dir, or one restored from a backup (`--new-incarnation`);
//! - an unclean stop followed by a machine restart (or an unknown boot id): writes the OS had
//!   not yet flushed may be gone, in every sync mode (shipped versions are fsynced after they
//!   leave, and `none` never fsyncs);
//! - a failed WAL fsync (the OS may drop the unsynced pages);
//! - amnesia: a context or a replica's state shows our actor ahead of our own copy of that key,
//!   or ahead of our counter.
//!
//! An unclean stop on the same boot (`kill -9`, OOM, panic) keeps the actor: every write was
//! handed to the OS before it was acknowledged or shipped, and the page cache survived.
//! Counters are one monotone sequence per actor, shared by all keys, reserved in leases of
//! `COUNTER_LEASE` that are persisted (and fsynced) in the same batch as the first write that
//! uses them.

use crate::clock::now_ms;
use crate::metrics::Counter;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use ringkv_protocol::limits::{MAX_OBJECT_LEN, MAX_SIBLINGS, MAX_STATE_LEN, MAX_STATE_SIBLINGS};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::hints::{
    decode_hint, encode_hint, hint_first_ms, hint_key, mark_key, mark_value, partition_of,
    prefix_end, split_hint_key, split_mark_key, target_prefix, DropReason, HintBook, HintLimits,
    HintSize, MARK_PREFIX,
};
use super::state_cache::{StateCache, STATE_CACHE_BYTES};
use super::{
    data_key, key_after, scan_all, Batch, BatchOp, Cached, Cf, Engine, HexKey, ScanBatch,
    ScanRange, StorageError,
};
use crate::version::{
    actor_id, actor_stamp, actor_tag, node_tag, Actor, Dot, KeyState, VersionVector, ACTOR_EPOCH_MS,
};

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
/// `Store::make_durable` waits for a place in a full writer queue this many times 20 ms
/// (1 s) before it gives up (its caller retries later).
const SYNC_QUEUE_TRIES: u32 = 50;
/// `Store::make_durable` gives up on the writer's answer after this long (its caller retries).
const SYNC_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How deep the writer's queue is for pacing background work (0..=1): two groups' worth of
/// jobs, or of bytes, is full. Both count: a few large merges are as much work waiting as
/// many small writes.
pub fn writer_pressure(jobs: usize, bytes: usize) -> f64 {
    let by_jobs = jobs as f64 / (2 * MAX_GROUP_JOBS) as f64;
    let by_bytes = bytes as f64 / (2 * MAX_GROUP_BYTES) as f64;
    by_jobs.max(by_bytes).min(1.0)
}
/// Bytes (values and merged states) queued for the writer. Counting jobs alone would let a
/// queue of large values or merge states (up to `MAX_STATE_LEN` each) hold tens of GB; 256 MiB
/// is 16 full groups of `MAX_GROUP_BYTES`, far more than one fsync's worth. A job larger than
/// the budget is still taken when the queue is empty, so no valid write is refused forever.
pub const MAX_QUEUE_BYTES: usize = 256 << 20;
/// The retry-after hint of a write refused because the writer queue (or a hint cap) is full:
/// a few group commits' time.
pub const WRITER_RETRY_AFTER_MS: u64 = 20;
/// Sibling count above which a write logs a warning naming the key (Riak's `warn_siblings`).
pub const WARN_SIBLINGS: usize = 25;

const META_NODE_ID: &[u8] = b"node_id";
const META_IDENTITY: &[u8] = b"identity";
const META_CLEAN: &[u8] = b"clean_shutdown";
/// The kernel boot id of the run that last opened the store.
const META_BOOT: &[u8] = b"boot_id";
/// `actor u64 BE ‖ counter u64 BE`: the highest counter of that actor (this node's current one)
/// found in a purged tombstone (see `Writer::purge_floor`).
const META_PURGE_FLOOR: &[u8] = b"purge_floor";
/// Present from the first open of a new data dir until anti-entropy has synced this node's
/// ranges from every other replica (`Store::mark_synced`): until then the node holds only
/// what it was sent since, and must not answer reads as a replica.
const META_UNSYNCED: &[u8] = b"unsynced";

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

/// Rows derived from a key's data that must commit with it (anti-entropy tree leaves, hints):
/// the writer calls the hook, on its own thread, for every change of a key's state, and the
/// rows it appends go into the same atomic batch as the new state. A failed batch applies
/// neither. The hook may write only `Cf::Hints` and `Cf::Aae`, and must not block.
pub trait ChangeHook: Send + 'static {
    /// `new_encoded` is `new.encode()`, the bytes stored for the key in this batch.
    fn on_change(
        &mut self,
        key: &[u8],
        old: &KeyState,
        new: &KeyState,
        new_encoded: &[u8],
        batch: &mut Batch,
    );
    /// The group is about to be written: append rows that sum up its changes (once per row,
    /// however many changes touched it).
    fn prepare(&mut self, _batch: &mut Batch) {}
    /// The group's batch was written (`true`) or failed (`false`, nothing of it applied):
    /// state the hook keeps beside the rows follows the batch's fate.
    fn on_commit(&mut self, _committed: bool) {}
    /// Recomputes the derived rows of the ring positions `first..=last` from `rows`, every
    /// stored `(key, encoded state)` there (`Store::rescan`, run by the writer between groups,
    /// so no write interleaves), appending the rows to `batch`.
    fn rescan(
        &mut self,
        _first: u64,
        _last: u64,
        _rows: &[(Vec<u8>, Vec<u8>)],
        _mode: RescanMode,
        _batch: &mut Batch,
    ) -> RescanOutcome {
        RescanOutcome::default()
    }
}

/// What a rescan of derived rows is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RescanMode {
    /// The rows of the range are not trusted yet (a tree being rebuilt): set them.
    Rebuild,
    /// The rows are trusted: compare, count and fix mismatches (bit rot, bugs).
    Verify,
}

/// What a rescan found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RescanOutcome {
    /// Keys scanned.
    pub keys: u64,
    /// Bytes of the rows scanned (keys and values): what the step read, and held, in the
    /// writer.
    pub bytes: u64,
    /// Derived rows found wrong and fixed (verify), or set (rebuild).
    pub mismatches: u64,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub node_id: String,
    pub sync: SyncMode,
    /// This machine's current boot id (`/proc/sys/kernel/random/boot_id`); `None` = unknown,
    /// which makes every unclean stop count as one across a reboot.
    pub boot_id: Option<String>,
    /// Start with a new actor whatever the previous stop (after restoring a backup).
    pub new_incarnation: bool,
    /// Byte caps of the hint store.
    pub hint_limits: HintLimits,
}

/// A mutation for the writer thread.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A client write coordinated on this replica: mint a dot and `update`.
    Update {
        key: Bytes,
        /// The writer's context: the versions the new one replaces (empty = a blind write).
        ctx: VersionVector,
        /// `None` writes a tombstone.
        value: Option<Bytes>,
        timestamp_ms: u64,
        /// Primaries of the key that will miss this write (down, and no fallback took a
        /// hint for them): the new state is also merged into this node's hint for each, in
        /// the same batch. A hint that does not fit the caps marks the target's partition
        /// for anti-entropy instead; the write itself succeeds.
        hint_for: Vec<String>,
    },
    /// Merge a replica's state (replication, read repair, hint replay, anti-entropy): a pure
    /// `sync`.
    Merge { key: Bytes, state: KeyState },
    /// Merge `state` into this node's hint for (target, key), for a down primary: the hint
    /// store only, never this node's own data. Refused (`HintsFull`) past the byte caps.
    Hint {
        target: String,
        key: Bytes,
        state: KeyState,
        /// This hint is the copy the target is to get the state from (a coordinator's own, a
        /// fallback's): one that cannot be kept (full, or unstorable) is counted as dropped
        /// and marks the target's partition for anti-entropy. False when the caller keeps the
        /// state meanwhile (a redirect keeps the removed node's hint): a refusal is only an
        /// error (found in review: it was counted as a drop, at every redirect pass).
        last_copy: bool,
    },
    /// Delete the hint row for (target, key) only if its stored bytes still equal `expected`
    /// (compare-and-delete: a hint merged meanwhile is kept and replayed again). With `drop`,
    /// the hint is given up (expired) and the target's partition is marked for anti-entropy.
    DeleteHint {
        target: String,
        key: Bytes,
        expected: Vec<u8>,
        drop: Option<DropReason>,
    },
    /// Tombstone GC: delete the key's state only if it is tombstones only and its encoding
    /// still equals `expected` (compare-and-delete: a state that changed is kept), with its
    /// tree contribution and index row, in one batch.
    Purge { key: Bytes, expected: Bytes },
    /// A ring change: delete the state of a key this node no longer replicates (its owners
    /// merged it first) only if its encoding still equals `expected`, like `Purge` for any
    /// state; the purge floor keeps "Who mints" true as for a purge.
    Release { key: Bytes, expected: Bytes },
}

impl WriteOp {
    fn key(&self) -> &Bytes {
        match self {
            WriteOp::Update { key, .. }
            | WriteOp::Merge { key, .. }
            | WriteOp::Hint { key, .. }
            | WriteOp::DeleteHint { key, .. }
            | WriteOp::Purge { key, .. }
            | WriteOp::Release { key, .. } => key,
        }
    }

    /// Memory the job holds while queued (for the queue's byte budget and group sizes).
    fn approx_bytes(&self) -> usize {
        match self {
            WriteOp::Update {
                key, value, ctx, ..
            } => key.len() + value.as_ref().map_or(0, |v| v.len()) + 16 * ctx.len(),
            WriteOp::Merge { key, state } | WriteOp::Hint { key, state, .. } => {
                key.len()
                    + state.value_bytes()
                    + 40 * state.siblings().len()
                    + 16 * state.context().len()
            }
            WriteOp::DeleteHint { key, expected, .. } => key.len() + expected.len(),
            WriteOp::Purge { key, expected } | WriteOp::Release { key, expected } => {
                key.len() + expected.len()
            }
        }
    }
}

/// A read with a deadline gave no answer by it (`Store::read_stored_by`): it was dropped
/// unexecuted, or its answer came too late to be of use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Late;

#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// The key's state after the write.
    pub state: KeyState,
    /// The dot minted (updates only).
    pub dot: Option<Dot>,
    /// Whether the op changed what is stored: a merge or hint that added nothing, or a
    /// compare-and-delete that found the hint changed, did not.
    pub changed: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("key {key} would hold {count} siblings, limit {limit}: resolve them first: read the key and write the value you want with that read's context (it replaces every sibling the read returned)")]
    TooManySiblings {
        key: HexKey,
        count: usize,
        limit: usize,
    },
    #[error("key {key} would hold {size} bytes of values, limit {limit}: resolve its siblings first (read, then write with the read's context) or write a smaller value")]
    TooLarge {
        key: HexKey,
        size: usize,
        limit: usize,
    },
    /// A merge would grow a replica's state past the state bounds; the replica keeps what it
    /// has (nothing is lost) until a client resolves the key.
    #[error("key {key}: merging a replica's state would hold {count} siblings / {size} bytes, beyond the state bounds ({max_count} / {max_size}); kept this replica's state: resolve the key's siblings (read, then write with the read's context)")]
    MergeTooLarge {
        key: HexKey,
        count: usize,
        size: usize,
        max_count: usize,
        max_size: usize,
    },
    #[error("key {key}: writer queue full ({jobs} jobs, {bytes} bytes queued; limits {QUEUE_CAPACITY} jobs, {MAX_QUEUE_BYTES} bytes): node overloaded")]
    Overloaded {
        key: HexKey,
        jobs: usize,
        bytes: usize,
    },
    /// The hint store is at a byte cap: the hint was not kept (its target's partition is marked
    /// for anti-entropy).
    #[error("hint for node {target}, key {key}: the hint store is full ({pending} bytes pending, cap {limit}); the target's range is marked for anti-entropy")]
    HintsFull {
        target: String,
        key: HexKey,
        pending: u64,
        limit: u64,
    },
    /// A write still queued when the time its requester had left ran out: dropped by the
    /// writer, never applied.
    #[error("{what} exceeded the {timeout_ms} ms left of the deadline")]
    DeadlinePassed { what: String, timeout_ms: u32 },
    /// The writer did not answer within the time the requester had left: the write is either
    /// still queued (then dropped, `DeadlinePassed`) or was taken before its deadline and may
    /// still commit (a slow disk). Indefinite.
    #[error("{what}: the writer did not answer within the {timeout_ms} ms left of the deadline; it may still be applied")]
    Unanswered { what: String, timeout_ms: u32 },
    #[error("key {0}: the store is shutting down")]
    ShuttingDown(HexKey),
    #[error("key {key}: {source}")]
    Storage {
        key: HexKey,
        #[source]
        source: StorageError,
    },
}

impl WriteError {
    /// The error kind a client (or a coordinating peer) is answered with.
    pub fn kind(&self) -> ringkv_protocol::ErrorKind {
        use ringkv_protocol::ErrorKind;
        match self {
            WriteError::TooManySiblings { count, limit, .. } => ErrorKind::TooManySiblings {
                count: *count as u64,
                limit: *limit as u64,
            },
            WriteError::TooLarge { size, limit, .. } => ErrorKind::TooLarge {
                size: *size as u64,
                limit: *limit as u64,
            },
            WriteError::MergeTooLarge {
                count, max_count, ..
            } => ErrorKind::TooManySiblings {
                count: *count as u64,
                limit: *max_count as u64,
            },
            WriteError::Overloaded { .. } | WriteError::HintsFull { .. } => ErrorKind::Overloaded {
                retry_after_ms: WRITER_RETRY_AFTER_MS,
            },
            WriteError::DeadlinePassed { .. } | WriteError::Unanswered { .. } => {
                ErrorKind::Timeout { acks: 0, needed: 1 }
            }
            WriteError::ShuttingDown(_) => ErrorKind::Unavailable {
                alive: 0,
                needed: 1,
            },
            WriteError::Storage { .. } => ErrorKind::Internal,
        }
    }

    /// A merge (of a replica's, a hint's or anti-entropy's state) refused for a cause that
    /// sending the state again cannot change: past the state bounds (the replica keeps its state
    /// until a client resolves the key), or this node's record of the key is corrupt.
    pub fn refuses_merge_for_good(&self) -> bool {
        matches!(
            self,
            WriteError::MergeTooLarge { .. }
                | WriteError::Storage {
                    source: StorageError::Corrupt { .. },
                    ..
                }
        )
    }

    /// True when the write certainly did not reach storage. A refused write (limits, full
    /// queue) never reached it; a batch the engine rejected (full disk on append, failed read)
    /// applied nothing. A failed WAL write or fsync and a writer that exited with the job are
    /// unknown: the WAL bytes may still reach the disk and be replayed.
    pub fn is_definite(&self) -> bool {
        match self {
            WriteError::Storage { source, .. } => !may_have_applied(source),
            WriteError::Unanswered { .. } => false,
            _ => true,
        }
    }
}

/// Whether a failed engine write may still have applied (or may yet reach the disk): a failed
/// WAL write or fsync. A full disk while appending to the WAL applies nothing; one reported
/// by the fsync after the append (RocksDB: "While fdatasync …") leaves the bytes in the WAL,
/// as does any failed `sync_wal` (the writes are even applied).
fn may_have_applied(e: &StorageError) -> bool {
    match e {
        StorageError::Io { op, .. } => matches!(*op, "write" | "sync_wal"),
        StorageError::NoSpace { op, cause } => {
            *op == "sync_wal" || cause.contains("While fdatasync") || cause.contains("While fsync")
        }
        StorageError::Corrupt { .. } | StorageError::Open { .. } => false,
    }
}

crate::metrics::metric_set! {
    /// Writer and read-path metrics (registered under `storage.`).
    pub struct StoreStats {
        updates: Counter = "updates", "client writes applied (versions minted)";
        merges: Counter = "merges", "replicated states merged";
        merges_noop: Counter = "merges_noop", "merges that changed nothing";
        batches: Counter = "write_batches", "write batches committed";
        synced_batches: Counter = "synced_batches", "write batches whose WAL was fsynced";
        /// `Store::make_durable` under `sync = none`.
        handover_syncs: Counter = "handover_syncs", "WAL fsyncs under sync = none before answering a request on whose answer another node deletes data, or before a transfer checkpoint";
        /// Set by a failed WAL fsync (or a failed synced write that may have applied): what
        /// was applied since the last good fsync may not be durable. Cleared once every
        /// memtable is flushed to fsynced table files (`Store::make_durable` tries it).
        durability_lost: Gauge = "durability_lost", "1 after a failed WAL fsync until every memtable is flushed to fsynced files: this node takes nothing another node gives away meanwhile";
        largest_group: Gauge = "largest_group", "most jobs committed in one batch";
        write_errors: Counter = "write_errors", "batches that failed to commit";
        overloaded: Counter = "overloaded", "writes refused because the writer queue was full";
        expired: Counter = "expired", "writes dropped unapplied: still queued when their deadline passed";
        purged: Counter = "tombstones_purged", "tombstones purged by tombstone GC (compare-and-delete)";
        purges_kept: Counter = "purges_kept", "purges refused: the state changed (or is no tombstone) since the check";
        released: Counter = "released", "keys this node no longer replicates, deleted once their owners merged them (ring changes)";
        rejected_siblings: Counter = "rejected_siblings", "writes refused at the sibling cap";
        rejected_size: Counter = "rejected_size", "writes refused at the object size cap";
        sibling_warnings: Counter = "sibling_warnings", "states that crossed the sibling warning level";
        /// Amnesia found for a key: a context or incoming state ahead of this node's copy.
        amnesia_detected: Counter = "amnesia_detected", "keys whose local copy was behind this node's own actor";
        /// New incarnations started while running (amnesia, failed fsync), not at open.
        actor_renewals: Counter = "actor_renewals", "actor renewals while running";
        /// Failed WAL fsyncs (each renews the actor).
        sync_errors: Counter = "sync_errors", "failed WAL fsyncs";
        /// Merges refused because they would grow a state past the state bounds.
        merges_refused: Counter = "merges_refused", "merges refused at the state bounds";
        /// Version-vector entries of retired actors pruned from states.
        vv_entries_pruned: Counter = "vv_entries_pruned", "version-vector entries of retired actors pruned";
        next_counter: Gauge = "next_dot", "the next dot counter this node's actor mints";
        /// Reads answered from memory on the calling task.
        reads_cached: Counter = "reads_cached", "reads answered from memory";
        /// Reads that needed the disk and ran on the blocking pool.
        reads_blocking: Counter = "reads_blocking", "reads that went to disk";
        /// Reads with a deadline dropped unexecuted on the blocking pool (`read_stored_by`).
        reads_expired: Counter = "reads_expired", "reads dropped unexecuted: their deadline passed while they waited for a blocking-pool thread";
        /// Writer read-modify-writes that found the key's state in the writer's state cache.
        state_cache_hits: Counter = "state_cache_hits", "writer state-cache hits";
        /// Writer read-modify-writes that read the key's state from the engine.
        state_cache_misses: Counter = "state_cache_misses", "writer state-cache misses";
        /// Entries in the writer's state cache (after the last group).
        state_cache_entries: Gauge = "state_cache_entries", "entries in the writer's state cache";
        incarnation: Gauge = "incarnation", "this node's incarnation (renewed actors)";
    }
}

enum Msg {
    Job(Job),
    /// Recompute derived rows of a range of positions (alone, between two groups).
    Rescan {
        first: u64,
        last: u64,
        mode: RescanMode,
        reply: oneshot::Sender<Result<RescanOutcome, StorageError>>,
    },
    /// Fsync the WAL (`Store::make_durable`), alone between two groups.
    Sync {
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    Shutdown,
}

struct Job {
    op: WriteOp,
    reply: Reply,
    /// What the job counts against the queue's byte budget.
    bytes: usize,
    /// A peer's write: past this instant (the time the peer had left, in ms) its requester
    /// has given up, and the writer drops it instead of applying it late.
    deadline: Option<(Instant, u32)>,
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

/// (target, partition) of hints refused because the writer's queue was full: the writer marks
/// them for anti-entropy with its next group (a mark is a write, and the queue was full).
/// Bounded by targets × `hints::PARTITIONS`: a set, not a log.
type RefusedHints = Arc<Mutex<std::collections::HashSet<(String, u16)>>>;

pub struct Store {
    engine: Arc<dyn Engine>,
    tx: Sender<Msg>,
    /// Bytes of the jobs waiting in the queue (`MAX_QUEUE_BYTES`).
    queued_bytes: Arc<AtomicUsize>,
    writer: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<StoreStats>,
    hint_book: Arc<HintBook>,
    hint_stats: Arc<HintStoreStats>,
    /// Targets' partitions of hints refused at the full queue, for the writer to mark.
    refused_hints: RefusedHints,
    config: StoreConfig,
    /// The longest a peer's write may wait to be applied here, whatever time its requester
    /// has left (`limit_peer_writes`); `u32::MAX` = no limit of its own.
    peer_write_limit_ms: AtomicU32,
    /// See `unsynced`.
    unsynced: std::sync::atomic::AtomicBool,
    /// The data dir was new at this open (no identity stored yet).
    fresh: bool,
    /// This node's current actor id (the writer renews it).
    actor: Arc<AtomicU64>,
}

crate::metrics::metric_set! {
    /// The hint store, as the writer changes it (registered under `hints.`).
    pub struct HintStoreStats {
        stored: Counter = "stored", "hints written (new rows and merges into a held hint)";
        merged: Counter = "merged", "hints merged into a hint already held for the same key";
        unchanged: Counter = "unchanged", "hints that added nothing to the hint held";
        deleted: Counter = "deleted", "hints deleted after their target acknowledged them";
        kept_changed: Counter = "kept_changed", "hints kept at delete because they changed during replay";
        dropped_cap: Counter = "dropped_cap", "hints not kept because the store was at a byte cap";
        dropped_unstorable: Counter = "dropped_unstorable", "hints given up to anti-entropy (their partition marked): a coordinator's own hint that could not be stored (an unreadable hint row, the state bounds, a storage error), or a hint its live target refused 5 times in a row";
        dropped_expired: Counter = "dropped_expired", "hints given up after the hint window";
        dropped_late: Counter = "dropped_late", "hints dropped unapplied because their deadline passed while queued for the writer (marked for anti-entropy)";
        dropped_overloaded: Counter = "dropped_overloaded", "hint writes refused because the writer's queue was full (the partition is marked for anti-entropy with the writer's next group; the caller may keep the hint elsewhere)";
        marks: Counter = "aae_marks", "target partitions marked for anti-entropy";
    }
}

/// A partition of a target's ranges marked for anti-entropy (hints for it were dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AaeMark {
    pub target: String,
    pub partition: u16,
    /// When it was (last) marked, ms since the epoch.
    pub marked_ms: u64,
    value: Vec<u8>,
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

/// Clears the stale-incarnation mark once a new identity is durable; false (logged) if it
/// could not be: the next start then renews the actor once more, which is safe.
fn clear_stale_mark(engine: &dyn Engine, node_id: &str) -> bool {
    match engine.clear_stale_incarnation() {
        Ok(()) => true,
        Err(e) => {
            warn!(node = %node_id, error = %e,
                  "could not clear the stale-incarnation mark: the next start renews the actor again");
            false
        }
    }
}

/// The next incarnation of `node_id` after `previous` (none for a fresh data dir): its stamp
/// is above the previous one and at least the clock (ms since `ACTOR_EPOCH_MS`), so a node that
/// lost its data dir still gets a stamp above every one it used, unless the clock went back.
fn next_identity(node_id: &str, previous: Option<Identity>) -> Identity {
    let clock = now_ms().saturating_sub(ACTOR_EPOCH_MS).max(1);
    let after = previous
        .filter(|p| actor_tag(p.actor) == node_tag(node_id))
        .map_or(0, |p| actor_stamp(p.actor) + 1);
    Identity {
        actor: actor_id(node_id, clock.max(after)),
        incarnation: previous.map_or(1, |p| p.incarnation + 1),
    }
}

/// No actor's counter gets anywhere near this (2^62: ~146 000 years at a million writes per
/// second); a stored lease beyond it is a corrupt record, and the node starts a new incarnation
/// rather than mint counters that would overflow (`mint` adds `COUNTER_LEASE` to them).
const MAX_SANE_LEASE_END: u64 = 1 << 62;

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
        Store::open_with_hook(engine, config, None)
    }

    /// Like `open`, with a hook the writer calls on every change of a key's state to add
    /// derived rows (anti-entropy leaves, hints) to the same atomic batch.
    pub fn open_with_hook(
        engine: Arc<dyn Engine>,
        config: StoreConfig,
        hook: Option<Box<dyn ChangeHook>>,
    ) -> Result<Store, StoreOpenError> {
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
        let last_boot = engine.get(Cf::Meta, META_BOOT)?;
        let same_boot = config
            .boot_id
            .as_ref()
            .is_some_and(|b| last_boot.as_deref() == Some(b.as_bytes()));
        let fresh = previous.is_none();
        let stale = engine.stale_incarnation();
        let (identity, next_counter, reason) = match previous {
            None => (next_identity(&config.node_id, None), 1, "fresh data dir"),
            Some((old, _)) if stale => (
                next_identity(&config.node_id, Some(old)),
                1,
                "a WAL fsync failed in an earlier run and the new incarnation could not be \
                 written then: the OS may have dropped writes it could not make durable, so \
                 versions of the old actor may be missing here",
            ),
            Some((old, _)) if config.new_incarnation => (
                next_identity(&config.node_id, Some(old)),
                1,
                "requested (--new-incarnation): the data dir was restored or copied",
            ),
            Some((old, _)) if !clean && !same_boot => (
                next_identity(&config.node_id, Some(old)),
                1,
                "unclean stop across a machine restart (or an unknown boot id): writes not yet \
                 on disk may be lost, so versions of the old actor may be missing here",
            ),
            // A lease at the end of the counter range (only corruption gets there: 10 000 a
            // lease): the next lease would overflow, so a new actor, as for an unknown past.
            Some((old, lease_end)) if lease_end >= MAX_SANE_LEASE_END => (
                next_identity(&config.node_id, Some(old)),
                1,
                "the counter lease on disk is beyond any counter a node reaches (a corrupt identity record)",
            ),
            Some((old, lease_end)) => (
                old,
                lease_end + 1,
                if clean {
                    "clean restart"
                } else {
                    "unclean stop on the same boot: every acknowledged write reached the OS"
                },
            ),
        };
        let lease_end = next_counter + COUNTER_LEASE - 1;
        let mut batch = Batch::default();
        if let Some(boot) = &config.boot_id {
            batch.put(Cf::Meta, META_BOOT.to_vec(), boot.as_bytes().to_vec());
        } else {
            batch
                .ops
                .push(BatchOp::Delete(Cf::Meta, META_BOOT.to_vec()));
        }
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
        if previous.is_none() {
            batch.put(Cf::Meta, META_UNSYNCED.to_vec(), vec![1]);
        }
        engine.write(batch, true)?;
        if stale {
            // The new identity is durable: the mark has done its work.
            clear_stale_mark(engine.as_ref(), &config.node_id);
        }
        let unsynced = engine.get(Cf::Meta, META_UNSYNCED)?.is_some();
        info!(
            node = %config.node_id,
            actor = format!("{:016x}", identity.actor),
            incarnation = identity.incarnation,
            next_counter,
            reason,
            "storage opened"
        );

        let purge_floor = match engine.get(Cf::Meta, META_PURGE_FLOOR)? {
            Some(b) if b.len() == 16 && b[..8] == identity.actor.to_be_bytes() => {
                u64::from_be_bytes(b[8..].try_into().expect("8-byte slice"))
            }
            _ => 0,
        };
        let (hint_book, unreadable) = load_hint_book(engine.as_ref())?;
        let hint_book = Arc::new(hint_book);
        let hint_stats = Arc::new(HintStoreStats::default());
        if !unreadable.is_empty() {
            // Found in review: such a row is in no hint book, so replay, expiry and redirect
            // never reach it unless readable hints of its target come with it, and tombstone
            // GC, finding it, answered "hinted" for its key for ever. Given up to
            // anti-entropy: deleted, counted, its partition marked.
            let mut batch = Batch::default();
            for (target, key, row) in &unreadable {
                batch.ops.push(BatchOp::Delete(Cf::Hints, row.clone()));
                batch.put(
                    Cf::Aae,
                    mark_key(target, partition_of(key)),
                    mark_value(DropReason::Unstorable, now_ms()),
                );
            }
            engine.write(batch, true)?;
            hint_stats
                .dropped_unstorable
                .inc_by(unreadable.len() as u64);
            hint_stats.marks.inc_by(unreadable.len() as u64);
            let targets: std::collections::BTreeSet<&str> =
                unreadable.iter().map(|(t, _, _)| t.as_str()).collect();
            warn!(node = %config.node_id, rows = unreadable.len(), ?targets,
                  "hint rows whose record does not parse given up; their ranges are marked for anti-entropy");
        }
        let refused_hints = RefusedHints::default();
        let stats = Arc::new(StoreStats::default());
        let actor = Arc::new(AtomicU64::new(identity.actor));
        stats.incarnation.set(identity.incarnation);
        stats.next_counter.set(next_counter);
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let mut writer = Writer {
            engine: engine.clone(),
            rx,
            queued_bytes: queued_bytes.clone(),
            identity,
            next_counter,
            lease_persisted: lease_end,
            stale_marked: false,
            purge_floor,
            sync: config.sync,
            stats: stats.clone(),
            actor: actor.clone(),
            node_id: config.node_id.clone(),
            cache: StateCache::new(STATE_CACHE_BYTES),
            hook,
            hint_limits: config.hint_limits,
            hint_book: hint_book.clone(),
            hint_stats: hint_stats.clone(),
            refused_hints: refused_hints.clone(),
            durability_lost: false,
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
            queued_bytes,
            writer: Mutex::new(Some(handle)),
            stats,
            hint_book,
            hint_stats,
            refused_hints,
            config,
            peer_write_limit_ms: AtomicU32::new(u32::MAX),
            unsynced: std::sync::atomic::AtomicBool::new(unsynced),
            fresh,
            actor,
        })
    }

    /// The data dir was new when this process opened it: everything in it arrived during
    /// this run.
    pub fn opened_fresh(&self) -> bool {
        self.fresh
    }

    /// True while this data dir has not been synced from the other replicas since it was
    /// created (a new node, or a wiped one under a known id): persisted, so a restart
    /// mid-sync keeps it.
    pub fn unsynced(&self) -> bool {
        self.unsynced.load(Ordering::Acquire)
    }

    /// Anti-entropy synced every range of this node from every other replica: it answers
    /// reads from now on. The flag is cleared in memory even if recording it fails (a full
    /// disk): the data is synced either way, and a restart would only sync it again. Not
    /// fsynced: a power loss that takes the record back takes back what was written before it
    /// too (the WAL is recovered as a prefix), and the node syncs again. An fsync here could
    /// be the first to cover groups shipped under `none`, outside the writer that renews the
    /// actor when one fails (found in review).
    pub fn mark_synced(&self) -> Result<(), StorageError> {
        self.unsynced.store(false, Ordering::Release);
        let mut batch = Batch::default();
        batch.delete(Cf::Meta, META_UNSYNCED.to_vec());
        self.engine.write(batch, false)
    }

    /// Peer writes (`write_within`, `write_by`) are applied within `limit` of their arrival or
    /// dropped, even when their requester would wait longer. Tombstone GC sets it to half its
    /// settle time, so that no state can land later than the settle time after it was sent.
    pub fn limit_peer_writes(&self, limit: std::time::Duration) {
        let ms = limit.as_millis().clamp(1, u32::MAX as u128) as u32;
        self.peer_write_limit_ms.store(ms, Ordering::Relaxed);
    }

    /// How long after it was read a peer's state may still be applied here (`limit_peer_writes`;
    /// unbounded, about 49 days, when tombstone GC is off).
    pub fn peer_write_limit(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.peer_write_limit_ms.load(Ordering::Relaxed) as u64)
    }

    /// Queues a write; resolves when its group is committed (durable per the sync mode).
    pub async fn write(&self, op: WriteOp) -> Result<WriteOutcome, WriteError> {
        let key = op.key().clone();
        let (reply, rx) = oneshot::channel();
        self.submit(op, Reply::Committed(reply), None)?;
        rx.await.unwrap_or_else(|_| Err(writer_exited(&key)))
    }

    /// A write a peer asked for, bounded by the `timeout_ms` it has left; `what` names it in
    /// the error ("key k: replica write"). A job still queued when that time is up is dropped
    /// by the writer, never applied late (`DeadlinePassed`, definite): nothing a requester gave
    /// up on is applied after its deadline (tombstone GC counts on it, see `aae::gc`). When the
    /// writer has not answered by then (`Unanswered`, indefinite), it may have taken the job
    /// in time and still be committing it.
    pub async fn write_within(
        &self,
        op: WriteOp,
        timeout_ms: u32,
        what: impl FnOnce() -> String,
    ) -> Result<WriteOutcome, WriteError> {
        let timeout_ms = timeout_ms.min(self.peer_write_limit_ms.load(Ordering::Relaxed));
        let limit = std::time::Duration::from_millis(timeout_ms as u64);
        let key = op.key().clone();
        let (reply, rx) = oneshot::channel();
        self.submit(
            op,
            Reply::Committed(reply),
            Some((Instant::now() + limit, timeout_ms)),
        )?;
        let write = async move { rx.await.unwrap_or_else(|_| Err(writer_exited(&key))) };
        match tokio::time::timeout(limit, write).await {
            Ok(result) => result,
            // The writer may have taken the job before its deadline and be committing it.
            Err(_) => Err(WriteError::Unanswered {
                what: what(),
                timeout_ms,
            }),
        }
    }

    /// `write_within` until the instant `deadline` (a state received from a peer is merged by
    /// then or not at all); refused at once when it has passed.
    pub async fn write_by(
        &self,
        op: WriteOp,
        deadline: Instant,
        what: impl FnOnce() -> String,
    ) -> Result<WriteOutcome, WriteError> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis();
        if left == 0 {
            self.stats.expired.inc();
            return Err(WriteError::DeadlinePassed {
                what: what(),
                timeout_ms: 0,
            });
        }
        self.write_within(op, left.min(u32::MAX as u128) as u32, what)
            .await
    }

    /// Queues a write and resolves with its outcome as soon as its group is in this node's own
    /// copy — appended to the WAL and applied, before the WAL fsync — plus a future of the
    /// fsync. A coordinator ships the new state to the other replicas while its own fsync runs,
    /// instead of after.
    ///
    /// Safe because (1) the outcome leaves only after the append succeeded, so a failed append
    /// (full disk) ships nothing and this node's copy holds every version it shipped; a process
    /// crash keeps them (the OS has the WAL bytes); a power loss or failed fsync, which could
    /// lose them, renews the actor; and (2) a minted dot leaves early only under an already
    /// durable counter lease, so it is never minted twice. The outcome is not durable here
    /// until the commit future says so.
    ///
    /// `deadline`: the request's; a job still queued when it passes is dropped unapplied
    /// (`DeadlinePassed`), never minted after its client was told it timed out.
    pub async fn write_early(
        &self,
        op: WriteOp,
        deadline: Instant,
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
        let left_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .min(u32::MAX as u128) as u32;
        self.submit(
            op,
            Reply::Early { applied, committed },
            Some((deadline, left_ms)),
        )?;
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

    fn submit(
        &self,
        op: WriteOp,
        reply: Reply,
        deadline: Option<(Instant, u32)>,
    ) -> Result<(), WriteError> {
        let bytes = op.approx_bytes();
        let queued = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        let overloaded = |store: &Store, op: &WriteOp, queued: usize| {
            store.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            store.stats.overloaded.inc();
            WriteError::Overloaded {
                key: HexKey(op.key().to_vec()),
                jobs: store.tx.len(),
                bytes: queued,
            }
        };
        if queued > 0 && queued + bytes > MAX_QUEUE_BYTES {
            self.hint_refused(&op);
            return Err(overloaded(self, &op, queued));
        }
        match self.tx.try_send(Msg::Job(Job {
            op,
            reply,
            bytes,
            deadline,
        })) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Msg::Job(job))) => {
                self.hint_refused(&job.op);
                Err(overloaded(self, &job.op, queued))
            }
            Err(TrySendError::Disconnected(Msg::Job(job))) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                Err(WriteError::ShuttingDown(HexKey(job.op.key().to_vec())))
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                unreachable!("submit sends only jobs")
            }
        }
    }

    /// A hint the full queue refused is dropped: counted, and its target's partition left for
    /// the writer to mark for anti-entropy (as a hint dropped for any other reason).
    fn hint_refused(&self, op: &WriteOp) {
        if let WriteOp::Hint {
            target,
            key,
            last_copy: true,
            ..
        } = op
        {
            self.hint_stats.dropped_overloaded.inc();
            self.refused_hints
                .lock()
                .expect("refused hints lock poisoned")
                .insert((target.clone(), partition_of(key)));
        }
    }

    /// Bytes of the jobs waiting for the writer.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
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
        if let Cached::Hit(v) = self.read_cached(&dkey)? {
            return Ok(v);
        }
        self.blocking("get", move |engine| engine.get(Cf::Data, &dkey))
            .await
    }

    /// A data row (`data_key`) from memory when the engine can answer without the disk,
    /// counted as a cached read, or else as one that goes to disk.
    fn read_cached(&self, dkey: &[u8]) -> Result<Cached, StorageError> {
        let cached = self.engine.get_cached(Cf::Data, dkey)?;
        match cached {
            Cached::Hit(_) => self.stats.reads_cached.inc(),
            Cached::Miss => self.stats.reads_blocking.inc(),
        };
        Ok(cached)
    }

    /// `read` by `deadline` (`read_stored_by`).
    pub async fn read_by(
        self: &Arc<Self>,
        key: Bytes,
        deadline: Instant,
    ) -> Result<Result<KeyState, StorageError>, Late> {
        Ok(self
            .read_stored_by(&key, deadline)
            .await?
            .and_then(|stored| decode_state(stored, &key)))
    }

    /// `read_stored` for a request with a deadline: `Err(Late)` when the deadline passed
    /// before the answer. A read that must go to disk and is still waiting for a blocking-pool
    /// thread at its deadline is then dropped unexecuted (`storage.reads_expired`), instead of
    /// running after its requester gave up (during a disk stall such reads would otherwise
    /// pile up in the pool's queue and run ahead of fresh ones once the disk recovers).
    pub async fn read_stored_by(
        self: &Arc<Self>,
        key: &[u8],
        deadline: Instant,
    ) -> Result<Result<Option<Vec<u8>>, StorageError>, Late> {
        let dkey = data_key(key);
        match self.read_cached(&dkey) {
            Ok(Cached::Hit(v)) => return Ok(Ok(v)),
            Err(e) => return Ok(Err(e)),
            Ok(Cached::Miss) => {}
        }
        self.blocking_by("get", deadline, move |engine| engine.get(Cf::Data, &dkey))
            .await
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// This node's current actor id (an identifier: in metrics a label of
    /// `storage.actor_info`, not a value).
    pub fn actor(&self) -> u64 {
        self.actor.load(Ordering::Relaxed)
    }

    /// What hints are pending per target (kept by the writer).
    pub fn hint_book(&self) -> &Arc<HintBook> {
        &self.hint_book
    }

    pub fn hint_stats(&self) -> &HintStoreStats {
        &self.hint_stats
    }

    /// Every hint this node holds for `key`, merged (empty if none), on the blocking pool,
    /// within `deadline`: `target`'s and every other target's. A sloppy read asks a fallback
    /// for one down primary's hint, but which fallback stands in for which primary is decided
    /// by position, and a write may have paired them otherwise (a primary down since, a spare
    /// for a slow one): the hint held for another primary of the key is as much an
    /// acknowledged version of it (found in review: a read missed such a write).
    pub async fn read_hints_by(
        self: &Arc<Self>,
        target: &str,
        key: &[u8],
        deadline: Instant,
    ) -> Result<Result<KeyState, StorageError>, Late> {
        let mut targets: Vec<String> = self.hint_book.targets().into_keys().collect();
        if !targets.iter().any(|t| t == target) {
            targets.push(target.to_string());
        }
        let key = key.to_vec();
        self.blocking_by("get", deadline, move |engine| {
            let mut merged = KeyState::new();
            for t in &targets {
                let row = hint_key(t, &key);
                if let Some(value) = engine.get(Cf::Hints, &row)? {
                    let (_, state) = decode_hint(&row, &value)?;
                    merged = merged.sync(&state);
                }
            }
            Ok(merged)
        })
        .await
    }

    /// This node's hint row for (target, key) as stored, `None` when it holds none.
    pub async fn read_hint(
        self: &Arc<Self>,
        target: &str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let hkey = hint_key(target, key);
        self.blocking("get", move |engine| engine.get(Cf::Hints, &hkey))
            .await
    }

    /// Up to `limit` hint rows for `target` from `start` (a row key; `None` = the first), in
    /// key order, on the blocking pool: `(row key, row value)` and where to resume.
    pub async fn scan_hints(
        self: &Arc<Self>,
        target: &str,
        start: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<ScanBatch, StorageError> {
        let prefix = target_prefix(target);
        let range = ScanRange {
            start: start.unwrap_or_else(|| prefix.clone()),
            end: prefix_end(&prefix),
        };
        self.blocking("scan", move |engine| engine.scan(Cf::Hints, &range, limit))
            .await
    }

    /// (key, anti-entropy digest) of the stored keys with positions in `first..=last`, in
    /// storage order, after the key `after` (empty = from `first`), at most `limit`; and
    /// whether the span holds more. The digest is the key's tree contribution.
    pub async fn scan_digests(
        self: &Arc<Self>,
        first: u64,
        last: u64,
        after: &[u8],
        limit: usize,
    ) -> Result<(Vec<(Bytes, u64)>, bool), StorageError> {
        let range = ScanRange {
            start: if after.is_empty() {
                first.to_be_bytes().to_vec()
            } else {
                key_after(&data_key(after))
            },
            end: last.checked_add(1).map(|e| e.to_be_bytes().to_vec()),
        };
        self.blocking("scan", move |engine| {
            let batch = engine.scan(Cf::Data, &range, limit)?;
            let mut out = Vec::with_capacity(batch.entries.len());
            for (dkey, value) in &batch.entries {
                let key = &dkey[8.min(dkey.len())..];
                // A scan may catch a memtable entry being rewritten in place: a state that
                // does not decode gets a digest of its bytes, which differs from the peer's,
                // so the exchange reads the key properly (a locked point read) and merges.
                let digest = match KeyState::decode(value) {
                    Ok(state) => super::tree::state_contribution(key, &state),
                    Err(_) => xxhash_rust::xxh3::xxh3_64(value) | 1,
                };
                out.push((Bytes::copy_from_slice(key), digest));
            }
            Ok((out, batch.resume.is_some()))
        })
        .await
    }

    /// Up to `limit` keys of the tombstone index from the row `start` (`None` = the first),
    /// in ring order: (key, newest sibling timestamp ms), and where to resume.
    pub async fn scan_tombstones(
        self: &Arc<Self>,
        start: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<(Vec<(Bytes, u64)>, Option<Vec<u8>>), StorageError> {
        use super::tree::TOMBSTONE_PREFIX;
        let range = ScanRange {
            start: start.unwrap_or_else(|| vec![TOMBSTONE_PREFIX]),
            end: Some(vec![TOMBSTONE_PREFIX + 1]),
        };
        self.blocking("scan", move |engine| {
            let batch = engine.scan(Cf::Aae, &range, limit)?;
            let entries = batch
                .entries
                .iter()
                .filter_map(|(row, value)| {
                    // 'D' ‖ position (8 bytes) ‖ key.
                    let key = row.get(9..)?;
                    let ms = u64::from_be_bytes(value.as_slice().try_into().ok()?);
                    Some((Bytes::copy_from_slice(key), ms))
                })
                .collect();
            Ok((entries, batch.resume))
        })
        .await
    }

    /// Whether this node holds a hint for `key`, for any target (a point read per target the
    /// hint book shows hints for).
    pub async fn holds_hint(self: &Arc<Self>, key: &[u8]) -> Result<bool, StorageError> {
        let targets: Vec<String> = self
            .hint_book
            .targets()
            .into_iter()
            .filter(|(_, t)| t.keys > 0)
            .map(|(target, _)| target)
            .collect();
        if targets.is_empty() {
            return Ok(false);
        }
        let key = key.to_vec();
        self.blocking("get", move |engine| {
            for target in targets {
                if engine.get(Cf::Hints, &hint_key(&target, &key))?.is_some() {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await
    }

    /// Whether this node stores no key state (live or tombstone) and holds no hint: what a
    /// retired node says once it has handed everything over (`aae::release`).
    pub async fn holds_nothing(self: &Arc<Self>) -> Result<bool, StorageError> {
        if self.hint_book.totals().0 > 0 {
            return Ok(false);
        }
        let all = ScanRange {
            start: Vec::new(),
            end: None,
        };
        self.blocking("scan", move |engine| {
            Ok(engine.scan(Cf::Data, &all, 1)?.entries.is_empty())
        })
        .await
    }

    /// Every (target, partition) marked for anti-entropy because a hint was dropped, with when
    /// it was marked and its stored row value.
    pub async fn aae_mark_rows(self: &Arc<Self>) -> Result<Vec<AaeMark>, StorageError> {
        self.blocking("scan", |engine| {
            let range = ScanRange {
                start: vec![MARK_PREFIX],
                end: Some(vec![MARK_PREFIX + 1]),
            };
            let mut marks = Vec::new();
            scan_all(engine, Cf::Aae, range, |k, v| {
                if let Some((target, partition)) = split_mark_key(k) {
                    let marked_ms = v
                        .get(1..9)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_be_bytes);
                    marks.push(AaeMark {
                        target,
                        partition,
                        marked_ms,
                        value: v.to_vec(),
                    });
                }
                Ok(())
            })?;
            Ok(marks)
        })
        .await
    }

    /// Recomputes the derived rows (tree leaves, tombstone index) of positions `first..=last`
    /// from the stored data, in the writer between two groups (no write interleaves): to
    /// rebuild an untrusted tree range by range, or to verify a trusted one.
    pub async fn rescan(
        &self,
        first: u64,
        last: u64,
        mode: RescanMode,
    ) -> Result<RescanOutcome, StorageError> {
        let (reply, rx) = oneshot::channel();
        let closed = || StorageError::Io {
            op: "rescan",
            cause: "the writer is shut down".into(),
        };
        match self.tx.try_send(Msg::Rescan {
            first,
            last,
            mode,
            reply,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(StorageError::Io {
                    op: "rescan",
                    cause: "the writer queue is full; retried later".into(),
                })
            }
            Err(TrySendError::Disconnected(_)) => return Err(closed()),
        }
        rx.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Makes every write visible so far durable against a power loss, for `what` (named in
    /// the error). It goes through the writer queue in every mode, so it also covers a group
    /// whose states are visible while its fsync still runs (a two-step group; a tombstone
    /// check reads them); under `group` and `always` the writer then answers at once, under
    /// `none` it fsyncs the WAL (a failed fsync renews the actor, as in a group's own fsync).
    /// A node calls it before it answers a request on whose answer another node deletes or
    /// drops data (a pushed state, a replayed hint, a tombstone check), before tombstone GC
    /// purges on its own word, and before it checkpoints a transfer, so that `none` loses at
    /// most the last writes in a power loss, never data another node gave away.
    ///
    /// After a failed WAL fsync, in any mode, what was applied since the last good one may not
    /// be durable however often the WAL is synced again (the OS may have dropped the pages it
    /// could not write, and a later fsync need not say so), and a merge sent again is a no-op
    /// answered at once. So from then on this fails until the writer has flushed every
    /// memtable to fsynced table files, which each call tries.
    pub async fn make_durable(&self, what: &str) -> Result<(), StorageError> {
        let failed = |cause: &str| StorageError::Io {
            op: "sync_wal",
            cause: format!("{what}: {cause}"),
        };
        let (reply, rx) = oneshot::channel();
        let mut msg = Msg::Sync { reply };
        // A full queue is a burst of foreground writes: wait a little for a place.
        let mut tries = 0;
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if tries < SYNC_QUEUE_TRIES => {
                    msg = back;
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(TrySendError::Full(_)) => {
                    return Err(failed("the writer queue stayed full; retried later"))
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Err(failed("the writer is shut down"))
                }
            }
        }
        // A flush after a failed fsync can wait on a write stall: never forever.
        match tokio::time::timeout(SYNC_ANSWER_TIMEOUT, rx).await {
            Err(_) => Err(failed("the writer did not answer in time; retried later")),
            Ok(Err(_)) => Err(failed("the writer is shut down")),
            // The writer's own error, named for what it was for.
            Ok(Ok(result)) => result.map_err(|e| match e {
                StorageError::Io { op, cause } => StorageError::Io {
                    op,
                    cause: format!("{what}: {cause}"),
                },
                other => other,
            }),
        }
    }

    /// Deletes `mark` if its row is unchanged (a mark made again since keeps its place; a
    /// mark re-made between the read and the delete is lost, which only reorders work: every
    /// range is still exchanged every cycle). True if deleted.
    pub async fn clear_mark(self: &Arc<Self>, mark: &AaeMark) -> Result<bool, StorageError> {
        let row = mark_key(&mark.target, mark.partition);
        let expected = mark.value.clone();
        self.blocking("clear mark", move |engine| {
            if engine.get(Cf::Aae, &row)?.as_deref() != Some(&expected[..]) {
                return Ok(false);
            }
            let mut batch = Batch::default();
            batch.delete(Cf::Aae, row);
            engine.write(batch, false)?;
            Ok(true)
        })
        .await
    }

    /// `blocking` for a request with a deadline: `f` is not run once `deadline` has passed
    /// (counted in `storage.reads_expired`), and `Err(Late)` when no answer came by then.
    async fn blocking_by<T: Send + 'static>(
        self: &Arc<Self>,
        op: &'static str,
        deadline: Instant,
        f: impl FnOnce(&dyn Engine) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<Result<T, StorageError>, Late> {
        let store = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            if Instant::now() >= deadline {
                store.stats.reads_expired.inc();
                return None;
            }
            Some(f(store.engine.as_ref()))
        });
        match tokio::time::timeout_at(deadline.into(), task).await {
            Ok(Ok(Some(result))) => Ok(result),
            Ok(Ok(None)) | Err(_) => Err(Late),
            Ok(Err(e)) => Ok(Err(StorageError::Io {
                op,
                cause: format!("storage task failed: {e}"),
            })),
        }
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        op: &'static str,
        f: impl FnOnce(&dyn Engine) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(store.engine.as_ref()))
            .await
            .unwrap_or_else(|e| {
                Err(StorageError::Io {
                    op,
                    cause: format!("storage task failed: {e}"),
                })
            })
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

/// A hint row whose record does not parse: its target, key and row key.
type UnreadableHint = (String, Vec<u8>, Vec<u8>);

/// The hint book from one scan of the hint store (at open; bounded by the byte caps), and the
/// rows whose record does not parse (their key does).
fn load_hint_book(engine: &dyn Engine) -> Result<(HintBook, Vec<UnreadableHint>), StorageError> {
    let book = HintBook::default();
    let mut unreadable = Vec::new();
    let all = ScanRange {
        start: Vec::new(),
        end: None,
    };
    scan_all(engine, Cf::Hints, all, |row, value| {
        let Some((target, key)) = split_hint_key(row) else {
            return Ok(());
        };
        match hint_first_ms(value) {
            Some(first_ms) => {
                let size = HintSize {
                    first_ms,
                    bytes: (row.len() + value.len()) as u64,
                };
                book.apply(&target, None, Some(size));
            }
            None => unreadable.push((target.to_string(), key.to_vec(), row.to_vec())),
        }
        Ok(())
    })?;
    Ok((book, unreadable))
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
    /// Shared with `Store::submit`: the writer subtracts what it takes off the queue.
    queued_bytes: Arc<AtomicUsize>,
    identity: Identity,
    next_counter: u64,
    /// Highest counter covered by a durable lease of the current actor.
    lease_persisted: u64,
    /// This run set the stale-incarnation mark (its renewal could not be written at once);
    /// cleared with the first durable lease of the new identity.
    stale_marked: bool,
    /// The highest counter of the current actor in a tombstone this node purged. A key absent
    /// here may have been purged, so a context or a replica's state showing our actor ahead of
    /// our copy is amnesia only above this floor (a tombstone still held elsewhere, or a
    /// client's context read from it, shows counters up to it).
    purge_floor: u64,
    sync: SyncMode,
    stats: Arc<StoreStats>,
    /// Shared with `Store::actor`.
    actor: Arc<AtomicU64>,
    node_id: String,
    /// States of recently written keys, as committed (see `state_cache`).
    cache: StateCache,
    hook: Option<Box<dyn ChangeHook>>,
    hint_limits: HintLimits,
    hint_book: Arc<HintBook>,
    hint_stats: Arc<HintStoreStats>,
    refused_hints: RefusedHints,
    /// Set by a failed WAL fsync, cleared by a memtable flush (`StoreStats::durability_lost`).
    durability_lost: bool,
}

/// Per-group scratch state.
#[derive(Default)]
struct Group {
    /// Each touched key's state as of this group (committed state plus the group's writes).
    overlay: HashMap<Vec<u8>, KeyState>,
    /// Each touched hint row as of this group (`None` = deleted).
    hints: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Changes to the hint book, applied once the batch committed.
    hint_changes: Vec<(String, Option<HintSize>, Option<HintSize>)>,
    batch: Batch,
    /// Lease end to persist with this batch, if the group runs past the durable lease.
    lease: Option<u64>,
    /// Hint counters to count once the batch committed (what they count is in it).
    counts: Vec<Counter>,
    /// (target, partition) marked for anti-entropy in this batch: written again with a later
    /// group if the batch fails (a drop's mark must not be lost with it).
    marked: Vec<(String, u16)>,
    /// The purge floor this batch persists (actor, counter): taken as the writer's once the
    /// batch is appended (raised before, a failed batch would leave it raised in memory while
    /// the key and the old floor stay stored, and amnesia below it would go unseen).
    purge_floor: Option<(Actor, u64)>,
}

impl Group {
    /// Counts `counter` once this group's batch committed.
    fn count(&mut self, counter: &Counter) {
        self.counts.push(counter.clone());
    }

    /// Bytes this group adds to `target`'s hints (and to all hints) beyond the book.
    fn hint_growth(&self, target: &str) -> (i64, i64) {
        let delta = |o: &Option<HintSize>, n: &Option<HintSize>| {
            n.map_or(0, |s| s.bytes as i64) - o.map_or(0, |s| s.bytes as i64)
        };
        self.hint_changes
            .iter()
            .fold((0, 0), |(t, all), (tgt, o, n)| {
                let d = delta(o, n);
                (if tgt == target { t + d } else { t }, all + d)
            })
    }
}

impl Writer {
    fn run(&mut self) {
        let max_jobs = if self.sync == SyncMode::Always {
            1
        } else {
            MAX_GROUP_JOBS
        };
        let mut shutting_down = false;
        // A message that ended the collection of the previous group (a rescan, a sync) or of
        // a run of syncs (anything else): it is taken before the next one in the queue.
        let mut carry: Option<Msg> = None;
        while !shutting_down {
            let next = match carry.take() {
                Some(msg) => Ok(msg),
                None => self.rx.recv(),
            };
            let first = match next {
                Ok(Msg::Job(job)) => job,
                Ok(Msg::Rescan {
                    first,
                    last,
                    mode,
                    reply,
                }) => {
                    let _ = reply.send(self.rescan(first, last, mode));
                    continue;
                }
                Ok(Msg::Sync { reply }) => {
                    // Sync requests queued right behind this one are served by the same
                    // fsync: each needs only what was written before it was queued.
                    let mut replies = vec![reply];
                    loop {
                        match self.rx.try_recv() {
                            Ok(Msg::Sync { reply }) => replies.push(reply),
                            Ok(other) => {
                                carry = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let result = self.make_durable();
                    for reply in replies {
                        let _ = reply.send(result.clone());
                    }
                    continue;
                }
                Ok(Msg::Shutdown) | Err(_) => break,
            };
            self.dequeued(&first);
            let mut bytes = first.op.approx_bytes();
            let mut jobs = vec![first];
            while jobs.len() < max_jobs && bytes < MAX_GROUP_BYTES {
                match self.rx.try_recv() {
                    Ok(Msg::Job(job)) => {
                        self.dequeued(&job);
                        bytes += job.op.approx_bytes();
                        jobs.push(job);
                    }
                    Ok(msg @ (Msg::Rescan { .. } | Msg::Sync { .. })) => {
                        carry = Some(msg);
                        break;
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
                self.dequeued(&job);
                rest.push(job);
            }
        }
        // The last group also writes the marks of hints refused since the one before (a mark
        // is a write, and the queue was full when they were refused).
        let marks_pending = !self
            .refused_hints
            .lock()
            .expect("refused hints lock poisoned")
            .is_empty();
        if !rest.is_empty() || marks_pending {
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
            Err(e) => {
                error!(node = %self.node_id, error = %e, "could not mark clean shutdown");
                // Under `none` this fsync was the first to cover what was shipped since the
                // last one: the next start must not take the page cache as having kept it.
                if may_have_applied(&e) {
                    self.wal_sync_failed();
                }
            }
        }
    }

    /// Recomputes the change hook's rows for positions `first..=last` from the stored data.
    /// Runs between groups: every earlier write is in the engine and none is in flight.
    fn rescan(
        &mut self,
        first: u64,
        last: u64,
        mode: RescanMode,
    ) -> Result<RescanOutcome, StorageError> {
        let Some(hook) = self.hook.as_mut() else {
            return Ok(RescanOutcome::default());
        };
        let range = ScanRange {
            start: first.to_be_bytes().to_vec(),
            end: last.checked_add(1).map(|e| e.to_be_bytes().to_vec()),
        };
        let mut rows = Vec::new();
        scan_all(self.engine.as_ref(), Cf::Data, range, |dkey, value| {
            rows.push((dkey[8.min(dkey.len())..].to_vec(), value.to_vec()));
            Ok(())
        })?;
        let mut batch = Batch::default();
        let mut outcome = hook.rescan(first, last, &rows, mode, &mut batch);
        outcome.keys = rows.len() as u64;
        outcome.bytes = rows.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
        assert_hook_rows(&batch.ops);
        let written = if batch.is_empty() {
            Ok(())
        } else {
            self.engine.write(batch, false)
        };
        hook.on_commit(written.is_ok());
        written.map(|()| outcome)
    }

    /// The group's batch is durable: so is the lease it persisted, if any.
    fn synced(&mut self, lease: Option<u64>) {
        self.stats.synced_batches.inc();
        if let Some(lease_end) = lease {
            self.lease_persisted = lease_end;
            // The identity written with this lease is the current one: durable now.
            if self.stale_marked {
                self.stale_marked = !clear_stale_mark(self.engine.as_ref(), &self.node_id);
            }
        }
    }

    /// `Store::make_durable`: everything committed so far is in the engine, and the last
    /// group's fsync is done. After a failed WAL fsync, flush every memtable to fsynced table
    /// files (the WAL can no longer be trusted); otherwise, under `sync = none`, fsync the WAL.
    /// (A restart clears the flag: RocksDB's recovery writes the replayed memtables to table
    /// files, `avoid_flush_during_recovery` being off.)
    fn make_durable(&mut self) -> Result<(), StorageError> {
        if self.durability_lost {
            return match self.engine.flush_memtables() {
                Ok(()) => {
                    self.durability_lost = false;
                    self.stats.durability_lost.set(0);
                    info!(node = %self.node_id,
                          "every memtable flushed to fsynced files after a failed WAL fsync: durable again");
                    Ok(())
                }
                Err(e) => {
                    warn!(node = %self.node_id, error = %e,
                          "memtable flush after a failed WAL fsync failed: still taking nothing given away");
                    Err(StorageError::Io {
                        op: "sync_wal",
                        cause: format!(
                            "a WAL fsync failed earlier and the memtable flush that would make \
                             up for it failed too: {e}"
                        ),
                    })
                }
            };
        }
        if self.sync != SyncMode::None {
            return Ok(());
        }
        match self.engine.sync_wal() {
            Ok(()) => {
                self.stats.handover_syncs.inc();
                Ok(())
            }
            Err(e) => {
                error!(node = %self.node_id, error = %e,
                       "WAL fsync failed: data handed to this node may not be durable; not acknowledged");
                self.wal_sync_failed();
                Err(e)
            }
        }
    }

    /// A WAL fsync failed (a group's or `make_durable`'s). The OS may drop the pages it
    /// failed to write: versions this actor shipped could vanish from our copy at the next
    /// start, so it never mints again, and nothing is taken as durable until a memtable flush.
    fn wal_sync_failed(&mut self) {
        self.stats.sync_errors.inc();
        self.lost_durability();
        self.renew_actor("a WAL fsync failed", None, 0);
    }

    /// A WAL fsync failed (or a synced write that may have applied): see
    /// `StoreStats::durability_lost`.
    fn lost_durability(&mut self) {
        self.durability_lost = true;
        self.stats.durability_lost.set(1);
    }

    fn dequeued(&self, job: &Job) {
        self.queued_bytes.fetch_sub(job.bytes, Ordering::AcqRel);
    }

    /// Applies a group of jobs and commits it: append (one batch, no fsync), release the early
    /// outcomes, fsync (per the sync mode), answer everything else.
    fn commit_group(&mut self, jobs: Vec<Job>) {
        let mut group = Group {
            overlay: HashMap::with_capacity(jobs.len()),
            ..Group::default()
        };
        let refused = std::mem::take(
            &mut *self
                .refused_hints
                .lock()
                .expect("refused hints lock poisoned"),
        );
        for (target, partition) in &refused {
            self.mark_partition(target, *partition, DropReason::Overloaded, &mut group);
        }
        // Answers of merges and hints that added nothing, given while durability is lost.
        let mut noops_held = Vec::new();
        let mut answers: Vec<Answer> = jobs
            .into_iter()
            .enumerate()
            .map(|(i, job)| {
                let result = match job.deadline {
                    Some((at, timeout_ms)) if Instant::now() > at => {
                        self.stats.expired.inc();
                        // A dropped hint's replica is synced by anti-entropy instead.
                        if let WriteOp::Hint {
                            target,
                            key,
                            last_copy: true,
                            ..
                        } = &job.op
                        {
                            self.hint_stats.dropped_late.inc();
                            self.mark_for_anti_entropy(target, key, DropReason::Late, &mut group);
                        }
                        Err(WriteError::DeadlinePassed {
                            what: format!(
                                "key {}: queued write (dropped unapplied)",
                                HexKey(job.op.key().to_vec())
                            ),
                            timeout_ms,
                        })
                    }
                    _ => self.apply(&job.op, &mut group),
                };
                if self.durability_lost
                    && matches!(job.op, WriteOp::Merge { .. } | WriteOp::Hint { .. })
                    && matches!(&result, Ok(o) if !o.changed)
                {
                    noops_held.push(i);
                }
                (job.op.key().clone(), job.reply, Some(result))
            })
            .collect();
        let count = answers.len();
        if let Some(hook) = self.hook.as_mut() {
            let before = group.batch.ops.len();
            hook.prepare(&mut group.batch);
            assert_hook_rows(&group.batch.ops[before..]);
        }
        if let Some(lease_end) = group.lease {
            group.batch.put(
                Cf::Meta,
                META_IDENTITY.to_vec(),
                encode_identity(self.identity, lease_end),
            );
        }
        // A batch that persists a counter lease is always fsynced, whatever the mode: a lease
        // lost in a power loss could hand out its dots a second time after a restart that does
        // not start a new incarnation (one fsync per COUNTER_LEASE dots).
        let wants_sync = self.sync != SyncMode::None || group.lease.is_some();
        // Early outcomes may leave between the append and the fsync, unless a dot of the group
        // waits for its lease to become durable. Only a group that has such outcomes needs the
        // two steps; any other group (replicas' merges, held-back outcomes) is committed with
        // one write that includes the fsync, as nothing of it leaves before the commit.
        let release_between = group.lease.is_none()
            && answers
                .iter()
                .any(|(_, r, res)| matches!((r, res), (Reply::Early { .. }, Some(Ok(_)))));
        let mut append_failure = None;
        let mut sync_failure = None;
        if group.batch.is_empty() {
            answers = release_early(answers);
        } else {
            let one_step_sync = wants_sync && !release_between;
            let purge_floor = self.purge_floor(&group);
            match self.engine.write(group.batch, one_step_sync) {
                Ok(()) => {
                    self.stats.batches.inc();
                    self.stats
                        .largest_group
                        .inner()
                        .fetch_max(count as u64, Ordering::Relaxed);
                    self.purge_floor = purge_floor;
                    if one_step_sync {
                        self.synced(group.lease);
                    }
                }
                Err(e) => {
                    self.stats.write_errors.inc();
                    error!(node = %self.node_id, jobs = count, error = %e, "write batch failed; nothing in it was shipped");
                    // Its fsync may be the first to cover earlier unsynced groups (`none`):
                    // renewed as after any failed WAL fsync.
                    if one_step_sync && may_have_applied(&e) {
                        self.wal_sync_failed();
                    }
                    append_failure = Some(e);
                }
            }
            if append_failure.is_none() && release_between {
                // The group is in this node's copy (memtable and OS page cache): its minted
                // states may leave while the fsync runs.
                answers = release_early(answers);
                if wants_sync {
                    match self.engine.sync_wal() {
                        Ok(()) => self.synced(group.lease),
                        Err(e) => {
                            error!(node = %self.node_id, jobs = count, error = %e,
                                   "WAL fsync failed: the group is applied here but may not be durable");
                            self.wal_sync_failed();
                            sync_failure = Some(e);
                        }
                    }
                }
            }
        }
        if let Some(hook) = self.hook.as_mut() {
            hook.on_commit(append_failure.is_none());
        }
        if append_failure.is_some() {
            // Nothing of the batch was applied: its marks (of refused hints, and of hints
            // dropped while it was built) go with a later group.
            self.refused_hints
                .lock()
                .expect("refused hints lock poisoned")
                .extend(std::mem::take(&mut group.marked));
        }
        if append_failure.is_none() {
            // Only applied states are cached; after a failed write the keys this group took
            // out of the cache stay uncached and are read from the store next time.
            for (dkey, state) in group.overlay {
                self.cache.insert(dkey, state);
            }
            for (target, old, new) in group.hint_changes {
                self.hint_book.apply(&target, old, new);
            }
            for counter in group.counts {
                counter.inc();
            }
        }
        self.stats.state_cache_entries.set(self.cache.len() as u64);
        self.stats.next_counter.set(self.next_counter);
        let failure = append_failure.or(sync_failure);
        // A merge or hint that added nothing says this node holds the state, which since a
        // failed WAL fsync may be in the memtable only (found in review: it was acknowledged
        // at once, and a coordinator counted it toward W). It is answered once the memtables
        // are flushed (`make_durable`), and is an error while that fails.
        let noop_failure = match (&failure, noops_held.is_empty()) {
            (None, false) => self.make_durable().err(),
            _ => None,
        };
        for (i, (key, reply, mut result)) in answers.into_iter().enumerate() {
            if let Some(e) = &noop_failure {
                if noops_held.contains(&i) {
                    result = Some(Err(WriteError::Storage {
                        key: HexKey(key.to_vec()),
                        source: e.clone(),
                    }));
                }
            }
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
                    // Held back (a failed append, or a lease persisted with this group): now
                    // both at once.
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
            self.stats.state_cache_hits.inc();
            return Ok(s);
        }
        self.stats.state_cache_misses.inc();
        read_state(self.engine.as_ref(), dkey, key).map_err(|source| WriteError::Storage {
            key: HexKey(key.to_vec()),
            source,
        })
    }

    /// Starts a new incarnation: this node's copy may lack versions of the current actor, so
    /// minting on with it could cover (erase) them at the replicas that hold them. The new
    /// identity is written at once (fsynced, with its first lease), so a restart before the
    /// next dot does not go back to the old actor; if that write fails (after a failed fsync
    /// the engine's writes usually do), a mark outside the engine's write path makes the next
    /// open renew, and the first dot's batch writes the identity and lease as usual.
    fn renew_actor(&mut self, why: &str, key: Option<&[u8]>, seen: u64) {
        let old = self.identity;
        self.identity = next_identity(&self.node_id, Some(old));
        self.next_counter = 1;
        self.lease_persisted = 0;
        self.purge_floor = 0;
        let mut batch = Batch::default();
        batch.put(
            Cf::Meta,
            META_IDENTITY.to_vec(),
            encode_identity(self.identity, COUNTER_LEASE),
        );
        match self.engine.write(batch, true) {
            Ok(()) => self.lease_persisted = COUNTER_LEASE,
            Err(e) => {
                error!(node = %self.node_id, error = %e,
                       "could not write the new incarnation; marking the data dir so that the next start renews the actor");
                match self.engine.mark_stale_incarnation() {
                    Ok(()) => self.stale_marked = true,
                    Err(e) => error!(node = %self.node_id, error = %e,
                                     "could not mark the data dir either: start this node with --new-incarnation"),
                }
            }
        }
        self.stats.actor_renewals.inc();
        self.actor.store(self.identity.actor, Ordering::Relaxed);
        self.stats.incarnation.set(self.identity.incarnation);
        warn!(
            node = %self.node_id,
            key = %key.map(|k| HexKey(k.to_vec()).to_string()).unwrap_or_default(),
            old_actor = format!("{:016x}", old.actor),
            seen_counter = seen,
            new_actor = format!("{:016x}", self.identity.actor),
            incarnation = self.identity.incarnation,
            "{why}: starting a new incarnation"
        );
    }

    /// Our own actor appears ahead of what our copy of the key (or our counter) knows: this
    /// replica lost versions it had minted (restored backup, lost WAL, dropped data). Minting
    /// on would reuse dots or cover the lost ones; start a new incarnation instead (Riak's
    /// key-amnesia handling).
    fn amnesia(&mut self, key: &[u8], seen: u64) {
        self.stats.amnesia_detected.inc();
        self.renew_actor(
            "amnesia: a version of our actor is missing from our copy",
            Some(key),
            seen,
        );
    }

    /// The highest counter of ours found in a purged tombstone, as of this group.
    fn purge_floor(&self, group: &Group) -> u64 {
        match group.purge_floor {
            Some((actor, floor)) if actor == self.identity.actor => floor.max(self.purge_floor),
            _ => self.purge_floor,
        }
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
        match op {
            WriteOp::Hint {
                target,
                key,
                state,
                last_copy,
            } => {
                let (state, changed) = self.merge_hint(target, key, state, *last_copy, group)?;
                return Ok(WriteOutcome {
                    state,
                    dot: None,
                    changed,
                });
            }
            WriteOp::DeleteHint {
                target,
                key,
                expected,
                drop,
            } => {
                let changed = self.delete_hint(target, key, expected, *drop, group)?;
                return Ok(WriteOutcome {
                    state: KeyState::new(),
                    dot: None,
                    changed,
                });
            }
            WriteOp::Purge { key, expected } | WriteOp::Release { key, expected } => {
                let tombstone_only = matches!(op, WriteOp::Purge { .. });
                let changed = self.purge(key, expected, tombstone_only, group)?;
                return Ok(WriteOutcome {
                    state: KeyState::new(),
                    dot: None,
                    changed,
                });
            }
            WriteOp::Update { .. } | WriteOp::Merge { .. } => {}
        }
        let key = op.key();
        let dkey = data_key(key);
        let current = self.current(group, &dkey, key)?;
        let (mut next, dot) = match op {
            WriteOp::Update {
                ctx,
                value,
                timestamp_ms,
                ..
            } => {
                self.stats.updates.inc();
                let me = self.identity.actor;
                let ours = current.context().get(me);
                // Per key: every dot of ours on this key was minted on this copy, so a context
                // ahead of it means the copy lost one. Globally: nothing may be ahead of the
                // counter.
                if (ctx.get(me) > ours && ctx.get(me) > self.purge_floor(group))
                    || ours.max(ctx.get(me)) >= self.next_counter
                {
                    self.amnesia(key, ours.max(ctx.get(me)));
                }
                let dot = self.mint(group);
                let next = current.update(ctx, dot, *timestamp_ms, value.clone());
                self.check_limits(key, &current, &next)?;
                (next, Some(dot))
            }
            WriteOp::Hint { .. }
            | WriteOp::DeleteHint { .. }
            | WriteOp::Purge { .. }
            | WriteOp::Release { .. } => {
                unreachable!("hint and purge ops return above")
            }
            WriteOp::Merge { state, .. } => {
                self.stats.merges.inc();
                let me = self.identity.actor;
                let theirs = state.context().get(me);
                // A peer can only hold versions of ours that it got from this copy.
                if (theirs > current.context().get(me) && theirs > self.purge_floor(group))
                    || theirs >= self.next_counter
                {
                    self.amnesia(key, theirs);
                }
                let next = current.sync(state);
                self.check_merge(key, &current, &next)?;
                (next, None)
            }
        };
        let pruned = next.prune_retired();
        if pruned > 0 {
            self.stats.vv_entries_pruned.inc_by(pruned as u64);
        }
        if dot.is_none() && next == current {
            self.stats.merges_noop.inc();
            // Unchanged and committed: back into the overlay so it is cached again.
            group.overlay.insert(dkey, current.clone());
            return Ok(WriteOutcome {
                state: current,
                dot: None,
                changed: false,
            });
        }
        let encoded = next.encode();
        self.changed(key, &current, &next, &encoded, group);
        group.batch.put(Cf::Data, dkey.clone(), encoded);
        group.overlay.insert(dkey, next.clone());
        if let WriteOp::Update { hint_for, .. } = op {
            for target in hint_for {
                // The write stands without the hint: `merge_hint` counted the drop and marked
                // the target's partition for anti-entropy.
                let _ = self.merge_hint(target, key, &next, true, group);
            }
        }
        Ok(WriteOutcome {
            state: next,
            dot,
            changed: true,
        })
    }

    /// Tells the change hook (tree, tombstone index) about a change of `key` in this group.
    fn changed(
        &mut self,
        key: &[u8],
        old: &KeyState,
        new: &KeyState,
        new_encoded: &[u8],
        group: &mut Group,
    ) {
        if let Some(hook) = self.hook.as_mut() {
            let before = group.batch.ops.len();
            hook.on_change(key, old, new, new_encoded, &mut group.batch);
            assert_hook_rows(&group.batch.ops[before..]);
        }
    }

    /// Tombstone GC's (and a ring change's) compare-and-delete: true if the key's state was
    /// exactly `expected` (tombstones only, with `tombstone_only`) and is now deleted, with its
    /// tree contribution and index row.
    fn purge(
        &mut self,
        key: &[u8],
        expected: &[u8],
        tombstone_only: bool,
        group: &mut Group,
    ) -> Result<bool, WriteError> {
        let dkey = data_key(key);
        let current = self.current(group, &dkey, key)?;
        if (tombstone_only && !current.is_tombstone())
            || current.is_empty()
            || current.encode() != expected
        {
            self.stats.purges_kept.inc();
            // Back into the overlay so it is cached again (`current` took it out).
            group.overlay.insert(dkey, current);
            return Ok(false);
        }
        let absent = KeyState::new();
        self.changed(key, &current, &absent, &[], group);
        group.batch.delete(Cf::Data, dkey.clone());
        group.overlay.insert(dkey, absent);
        let ours = current.context().get(self.identity.actor);
        if ours > self.purge_floor(group) {
            group.purge_floor = Some((self.identity.actor, ours));
            let mut floor = self.identity.actor.to_be_bytes().to_vec();
            floor.extend_from_slice(&ours.to_be_bytes());
            group.batch.put(Cf::Meta, META_PURGE_FLOOR.to_vec(), floor);
        }
        if tombstone_only {
            self.stats.purged.inc();
        } else {
            self.stats.released.inc();
        }
        Ok(true)
    }

    /// A hint row as of this group.
    fn hint_row(
        &self,
        group: &Group,
        hkey: &[u8],
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, WriteError> {
        if let Some(row) = group.hints.get(hkey) {
            return Ok(row.clone());
        }
        self.engine
            .get(Cf::Hints, hkey)
            .map_err(|source| WriteError::Storage {
                key: HexKey(key.to_vec()),
                source,
            })
    }

    /// Merges `state` into the hint for (target, key); returns the hint's state and whether
    /// the row changed. Past a byte cap it is refused (`HintsFull`). A hint that is the
    /// `last_copy` of the state and is not kept, for any cause, is counted as dropped
    /// (`dropped_cap` or `dropped_unstorable`) and the target's partition marked for
    /// anti-entropy (found in review: only a full hint store counted, and for every caller).
    fn merge_hint(
        &mut self,
        target: &str,
        key: &[u8],
        state: &KeyState,
        last_copy: bool,
        group: &mut Group,
    ) -> Result<(KeyState, bool), WriteError> {
        let merged = self.merge_hint_row(target, key, state, group);
        if let (Err(e), true) = (&merged, last_copy) {
            let (dropped, reason) = match e {
                WriteError::HintsFull { .. } => (&self.hint_stats.dropped_cap, DropReason::Cap),
                _ => (&self.hint_stats.dropped_unstorable, DropReason::Unstorable),
            };
            dropped.inc();
            warn!(node = %self.node_id, %target, error = %e,
                  "hint not kept; the target's range is marked for anti-entropy");
            self.mark_for_anti_entropy(target, key, reason, group);
        }
        merged
    }

    /// `merge_hint`'s merge, which counts no drop.
    fn merge_hint_row(
        &mut self,
        target: &str,
        key: &[u8],
        state: &KeyState,
        group: &mut Group,
    ) -> Result<(KeyState, bool), WriteError> {
        let hkey = hint_key(target, key);
        let old_row = self.hint_row(group, &hkey, key)?;
        let (first_ms, old) = match &old_row {
            Some(row) => decode_hint(&hkey, row).map_err(|source| WriteError::Storage {
                key: HexKey(key.to_vec()),
                source,
            })?,
            None => (now_ms(), KeyState::new()),
        };
        let merged = old.sync(state);
        if old_row.is_some() && merged == old {
            self.hint_stats.unchanged.inc();
            return Ok((old, false));
        }
        self.check_merge(key, &old, &merged)?;
        let row = encode_hint(first_ms, &merged);
        let old_size = old_row.as_ref().map(|r| HintSize {
            first_ms,
            bytes: (hkey.len() + r.len()) as u64,
        });
        let new_size = HintSize {
            first_ms,
            bytes: (hkey.len() + row.len()) as u64,
        };
        let growth = new_size.bytes as i64 - old_size.map_or(0, |s| s.bytes as i64);
        if growth > 0 {
            let (target_bytes, total_bytes) = self.hint_book.bytes(target);
            let (g_target, g_total) = group.hint_growth(target);
            let target_after = target_bytes as i64 + g_target + growth;
            let total_after = total_bytes as i64 + g_total + growth;
            let limits = self.hint_limits;
            let over = if target_after > limits.max_bytes_per_target as i64 {
                Some((target_after - growth, limits.max_bytes_per_target))
            } else if total_after > limits.max_bytes as i64 {
                Some((total_after - growth, limits.max_bytes))
            } else {
                None
            };
            if let Some((pending, limit)) = over {
                return Err(WriteError::HintsFull {
                    target: target.to_string(),
                    key: HexKey(key.to_vec()),
                    pending: pending.max(0) as u64,
                    limit,
                });
            }
        }
        if old_row.is_some() {
            group.count(&self.hint_stats.merged);
        }
        group.count(&self.hint_stats.stored);
        group.batch.put(Cf::Hints, hkey.clone(), row.clone());
        group.hints.insert(hkey, Some(row));
        group
            .hint_changes
            .push((target.to_string(), old_size, Some(new_size)));
        Ok((merged, true))
    }

    /// Compare-and-delete of a hint row; true if it was deleted.
    fn delete_hint(
        &mut self,
        target: &str,
        key: &[u8],
        expected: &[u8],
        drop: Option<DropReason>,
        group: &mut Group,
    ) -> Result<bool, WriteError> {
        let hkey = hint_key(target, key);
        let Some(row) = self.hint_row(group, &hkey, key)? else {
            return Ok(false);
        };
        if row != expected {
            self.hint_stats.kept_changed.inc();
            return Ok(false);
        }
        let old_size = hint_first_ms(&row).map(|first_ms| HintSize {
            first_ms,
            bytes: (hkey.len() + row.len()) as u64,
        });
        group
            .batch
            .ops
            .push(BatchOp::Delete(Cf::Hints, hkey.clone()));
        group.hints.insert(hkey, None);
        group
            .hint_changes
            .push((target.to_string(), old_size, None));
        match drop {
            Some(reason) => {
                match reason {
                    DropReason::Expired => group.count(&self.hint_stats.dropped_expired),
                    DropReason::Unstorable => group.count(&self.hint_stats.dropped_unstorable),
                    _ => {}
                }
                self.mark_for_anti_entropy(target, key, reason, group);
            }
            None => group.count(&self.hint_stats.deleted),
        }
        Ok(true)
    }

    /// Records that `target`'s copy of the partition of `key` missed writes no hint delivers.
    fn mark_for_anti_entropy(
        &mut self,
        target: &str,
        key: &[u8],
        reason: DropReason,
        group: &mut Group,
    ) {
        self.mark_partition(target, partition_of(key), reason, group);
    }

    fn mark_partition(
        &mut self,
        target: &str,
        partition: u16,
        reason: DropReason,
        group: &mut Group,
    ) {
        group.count(&self.hint_stats.marks);
        group.marked.push((target.to_string(), partition));
        group.batch.put(
            Cf::Aae,
            mark_key(target, partition),
            mark_value(reason, now_ms()),
        );
    }

    /// Client writes that *grow* a key past the write caps are refused; writes that resolve
    /// siblings always pass.
    fn check_limits(&self, key: &[u8], old: &KeyState, new: &KeyState) -> Result<(), WriteError> {
        let count = new.siblings().len();
        if count > MAX_SIBLINGS && count > old.siblings().len() {
            self.stats.rejected_siblings.inc();
            return Err(WriteError::TooManySiblings {
                key: HexKey(key.to_vec()),
                count,
                limit: MAX_SIBLINGS,
            });
        }
        let size = new.value_bytes();
        if size > MAX_OBJECT_LEN && size > old.value_bytes() {
            self.stats.rejected_size.inc();
            return Err(WriteError::TooLarge {
                key: HexKey(key.to_vec()),
                size,
                limit: MAX_OBJECT_LEN,
            });
        }
        if count > WARN_SIBLINGS {
            self.stats.sibling_warnings.inc();
            warn!(node = %self.node_id, key = %HexKey(key.to_vec()), siblings = count,
                  "many siblings: clients are writing without (or with stale) context");
        }
        Ok(())
    }

    /// Merges keep everything both sides hold (they never drop data), so they may exceed the
    /// write caps; only growth past the state bounds is refused, keeping this replica's state.
    fn check_merge(&self, key: &[u8], old: &KeyState, new: &KeyState) -> Result<(), WriteError> {
        let (count, size) = (new.siblings().len(), new.value_bytes());
        let grows_past = (count > MAX_STATE_SIBLINGS && count > old.siblings().len())
            || (size > MAX_STATE_LEN && size > old.value_bytes());
        if grows_past {
            self.stats.merges_refused.inc();
            let e = WriteError::MergeTooLarge {
                key: HexKey(key.to_vec()),
                count,
                size,
                max_count: MAX_STATE_SIBLINGS,
                max_size: MAX_STATE_LEN,
            };
            warn!(node = %self.node_id, error = %e, "merge refused");
            return Err(e);
        }
        if count > MAX_SIBLINGS && count > old.siblings().len() {
            self.stats.sibling_warnings.inc();
            warn!(node = %self.node_id, key = %HexKey(key.to_vec()), siblings = count,
                  "a merge left more siblings than a write may: coordinators wrote to this key without seeing each other (a partition); reads return them all, resolve with one write");
        }
        Ok(())
    }
}

/// A change hook may write only the hints and aae column families (never data or meta).
fn assert_hook_rows(ops: &[BatchOp]) {
    assert!(
        ops.iter().all(|op| matches!(
            op,
            BatchOp::Put(Cf::Hints | Cf::Aae, ..) | BatchOp::Delete(Cf::Hints | Cf::Aae, _)
        )),
        "a change hook writes only the hints and aae column families"
    );
}

/// Sends the outcomes of `write_early` jobs now; their commit (fsync) result is sent later.
fn release_early(answers: Vec<Answer>) -> Vec<Answer> {
    answers
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
        .collect()
}

#[cfg(test)]
mod tests;
