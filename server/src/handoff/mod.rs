//! Hinted handoff: the hints this node keeps for down primaries (the handoff message family) and
//! the replay worker that gives them back.
//!
//! Life cycle of a hint (docs/architecture.md, "Hinted handoff"):
//! 1. A coordinator cannot reach a primary of a key (down per SWIM/phi, or it failed or was
//!    slow to answer): it sends the key's state to a fallback (`StoreHint`), or keeps the hint
//!    itself when no fallback is up. The writer merges it into the one hint row per
//!    (target, key) in `Cf::Hints`, in one atomic batch.
//! 2. The replay worker of each holder sees the target available again, asks it for credits
//!    (its replay budget, shared by every holder), sends a batch of hints (`Replay`), and
//!    deletes each acknowledged hint **only if it did not change meanwhile**
//!    (compare-and-delete): a hint merged during replay is replayed again.
//! 3. Hints past the caps or older than the window are not kept: the drop is counted and the
//!    target's partition of the ring is marked for anti-entropy (`storage::hints`).

pub mod budget;
pub mod replay;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ringkv_protocol::peer::{HandoffRequest, HandoffResponse, PeerResponse};
use ringkv_protocol::ErrorKind;

use crate::background::load::CpuLoad;
use crate::background::paced_chunks;
use crate::clock::now_ms;
use crate::config::HintSettings;
use crate::membership::DataGate;
use crate::storage::{HexKey, Store, WriteError, WriteOp};
use crate::version::KeyState;
use budget::ReplayBudget;

crate::metrics::metric_set! {
    /// Hinted handoff as a target and as a holder (registered under `hints.`).
    pub struct HandoffMetrics {
        hints_received: Counter = "received", "hints fallbacks asked this node to keep";
        hint_reads: Counter = "reads", "hint reads served for sloppy reads";
        credits_granted: Counter = "credits_granted_keys", "replay keys this node allowed holders to send";
        credits_refused: Counter = "credits_refused", "credit requests answered with nothing (budget spent)";
        replay_received: Counter = "replay_received_keys", "hinted keys replayed into this node";
        replay_received_bytes: Counter = "replay_received_bytes", "bytes of hinted states replayed into this node";
        replay_merge_failed: Counter = "replay_merge_failed", "replayed states this node could not merge";
        replayed: Counter = "replayed", "hints this node replayed that their target merged (then deleted)";
        replay_refused: Counter = "replay_refused", "hints a target could not merge (kept)";
        replay_batches: Counter = "replay_batches", "replay batches sent";
        holder_rests: Counter = "replay_holder_rests", "rests this node took between hint steps (replay batches; expiry and redirect batches) because its own foreground queues were deep (for expiry and redirect, also its CPUs busy)";
        replay_errors: Counter = "replay_errors", "replay batches or credit requests that failed";
        replay_rate: Gauge = "replay_rate_per_second", "hints replayed per second (last pass)";
        redirected: Counter = "redirected", "hints for a node taken out of the ring handed to the key's current owners (then deleted)";
        replay_pace: Ratio = "replay_pace_ratio", "share of this node's replay budget granted at the last credit request, 0 to 1 (lower while its CPUs are busy)";
    }
}

/// What the replay worker is doing for one target (for `kvctl hints`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetReplay {
    /// waiting (target down), replaying, paced (no credits), idle.
    pub state: &'static str,
    /// Hints replayed in the current pass, and pending when it started.
    pub done: u64,
    pub total: u64,
}

/// The handoff service: serves the handoff family and reports hint status.
pub struct Handoff {
    node_id: String,
    store: Arc<Store>,
    budget: Mutex<ReplayBudget>,
    pub settings: HintSettings,
    pub metrics: Arc<HandoffMetrics>,
    /// Per target, the replay worker's state.
    replay: Arc<Mutex<BTreeMap<String, TargetReplay>>>,
    /// Held while a replayed chunk merges and for its tranquil pause: the chunks of every
    /// holder go to the writer one at a time, paced by how long the last one took.
    applying: tokio::sync::Mutex<()>,
    /// The machine's CPU use: the replay budget yields to foreground work.
    cpu: Mutex<CpuLoad>,
    /// When this node last granted replay credits (ms since the epoch, 0 = never).
    last_grant_ms: AtomicU64,
    /// Whether this node takes data now: retired or not knowing the ring yet, it takes no hint
    /// and no replay.
    takes_data: DataGate,
}

/// What became of one replayed hint on its target.
#[derive(Debug, PartialEq, Eq)]
enum Replayed {
    Merged,
    /// Sending it again changes nothing (undecodable, past the state bounds, a corrupt record):
    /// answered `false`.
    Refused(String),
    /// Its deadline passed before it was applied.
    Late,
    /// A cause that passes (a full writer, a storage error).
    Failed(String),
}

/// The retry-after hint of a replay batch answered as an error (some hints not merged for now).
const REPLAY_RETRY_AFTER_MS: u64 = 1_000;

/// A target that granted replay credits this recently counts as being replayed into.
pub const REPLAY_ACTIVE_MS: u64 = 5_000;

impl Handoff {
    pub fn new(node_id: String, store: Arc<Store>, settings: HintSettings) -> Handoff {
        Handoff {
            node_id,
            store,
            budget: Mutex::new(ReplayBudget::new(
                settings.replay_keys_per_sec,
                settings.replay_bytes_per_sec,
            )),
            settings,
            metrics: Arc::new(HandoffMetrics::default()),
            replay: Arc::default(),
            applying: tokio::sync::Mutex::new(()),
            cpu: Mutex::default(),
            last_grant_ms: AtomicU64::new(0),
            takes_data: Arc::new(|| None),
        }
    }

    /// Refuse hints and replays while `gate` says this node takes no data: retired (found in
    /// review: a coordinator or holder with an older view could still leave data on it,
    /// which then kept it from ever holding nothing, or, as a hint for itself, became data of
    /// ranges it no longer replicates) or not knowing the ring yet. Hint reads are still
    /// served.
    pub fn with_data_gate(mut self, gate: DataGate) -> Handoff {
        self.takes_data = gate;
        self
    }

    /// Whether a hint replay runs between this node and `peer`: this node's replay worker is
    /// replaying (or pacing) its hints for `peer`, or this node granted replay credits within
    /// [`REPLAY_ACTIVE_MS`] (holders are replaying into it; which ones is not recorded, so
    /// every peer counts). Anti-entropy exchanges wait for it (`aae::exchange`).
    pub fn replay_running_with(&self, peer: &str) -> bool {
        let holding = self
            .replay
            .lock()
            .expect("replay lock poisoned")
            .get(peer)
            .is_some_and(|r| matches!(r.state, "replaying" | "paced"));
        let granted = self.last_grant_ms.load(Ordering::Relaxed);
        holding || (granted > 0 && now_ms().saturating_sub(granted) < REPLAY_ACTIVE_MS)
    }

    fn error(&self, kind: ErrorKind, definite: bool, msg: String) -> PeerResponse {
        PeerResponse::error(kind, definite, format!("node {}: {msg}", self.node_id))
    }

    /// Serves one request of the handoff family, read at `arrived` (`net`'s stall-safe
    /// dating: a replay's merges are bounded from then).
    pub async fn serve(&self, req: HandoffRequest, arrived: std::time::Instant) -> PeerResponse {
        if !matches!(req, HandoffRequest::ReadHint { .. }) {
            if let Some(no) = (self.takes_data)() {
                return no.refusal(&self.node_id, "a hint or a hint replay");
            }
        }
        match req {
            HandoffRequest::StoreHint {
                target,
                key,
                state,
                timeout_ms,
            } => self.store_hint(target, key, state, timeout_ms).await,
            HandoffRequest::ReadHint {
                target,
                key,
                timeout_ms,
            } => {
                self.metrics.hint_reads.inc();
                let deadline = std::time::Instant::now() + Duration::from_millis(timeout_ms as u64);
                // Every hint held for the key, whatever its target (`Store::read_hints_by`).
                match self.store.read_hints_by(&target, &key, deadline).await {
                    Ok(Ok(state)) => PeerResponse::Handoff(HandoffResponse::HintState(
                        Bytes::from(state.encode()),
                    )),
                    Ok(Err(e)) => self.error(
                        ErrorKind::Internal,
                        true,
                        format!("hint for {target}, key {}: {e}", HexKey(key.to_vec())),
                    ),
                    Err(_) => self.error(
                        ErrorKind::Timeout { acks: 0, needed: 1 },
                        true,
                        format!(
                            "hint for {target}, key {}: read exceeded the {timeout_ms} ms left",
                            HexKey(key.to_vec())
                        ),
                    ),
                }
            }
            HandoffRequest::ReplayCredits {
                want_keys,
                want_bytes,
            } => {
                let pace = self.cpu.lock().expect("cpu load lock poisoned").pace();
                let (grant, granted_pace) = {
                    let mut budget = self.budget.lock().expect("budget lock poisoned");
                    budget.set_pace(now_ms(), pace);
                    (budget.grant(now_ms(), want_keys, want_bytes), budget.pace())
                };
                // The share the budget applies (never below its least rate), not the raw yield.
                self.metrics.replay_pace.set(granted_pace);
                if grant.keys == 0 {
                    self.metrics.credits_refused.inc();
                }
                self.metrics.credits_granted.inc_by(grant.keys as u64);
                self.last_grant_ms.store(now_ms(), Ordering::Relaxed);
                PeerResponse::Handoff(HandoffResponse::Credits {
                    keys: grant.keys,
                    bytes: grant.bytes,
                    retry_after_ms: grant.retry_after_ms,
                })
            }
            HandoffRequest::Replay { entries } => self.replayed_into_me(entries, arrived).await,
        }
    }

    async fn store_hint(
        &self,
        target: String,
        key: Bytes,
        state: Bytes,
        timeout_ms: u32,
    ) -> PeerResponse {
        self.metrics.hints_received.inc();
        let state = match KeyState::decode(&state) {
            Ok(s) => s,
            Err(e) => {
                return self.error(
                    ErrorKind::Malformed,
                    true,
                    format!("hint for {target}, key {}: {e}", HexKey(key.to_vec())),
                )
            }
        };
        // Named only if the write fails or times out (formatted then, not on every hint).
        let (what_target, what_key) = (target.clone(), key.clone());
        let what = move || {
            format!(
                "hint for {what_target}, key {}: hint write",
                HexKey(what_key.to_vec())
            )
        };
        // A hint for this node itself (the sender saw it down): it is the data. Not the last
        // copy: a coordinator whose fallback refused keeps the hint itself, and counts the
        // drop if that fails too (found in review: a refusal here counted a drop as well).
        let op = if target == self.node_id {
            WriteOp::Merge { key, state }
        } else {
            WriteOp::Hint {
                target,
                key,
                state,
                last_copy: false,
            }
        };
        match self.store.write_within(op, timeout_ms, what).await {
            Ok(_) => PeerResponse::Handoff(HandoffResponse::HintStored),
            Err(e) => self.error(e.kind(), e.is_definite(), e.to_string()),
        }
    }

    /// A holder's batch of hinted states for this node's replicas, read at `arrived`: each
    /// merged (never overwritten) within [`MERGE_DEADLINE`](crate::background::MERGE_DEADLINE)
    /// and the peer-write limit of its arrival, or not at all; the answer says which.
    async fn replayed_into_me(
        &self,
        entries: Vec<(Bytes, Bytes)>,
        arrived: std::time::Instant,
    ) -> PeerResponse {
        let bytes: u64 = entries
            .iter()
            .map(|(k, s)| (k.len() + s.len()) as u64)
            .sum();
        self.budget
            .lock()
            .expect("budget lock poisoned")
            .spend_bytes(now_ms(), bytes);
        self.metrics.replay_received.inc_by(entries.len() as u64);
        self.metrics.replay_received_bytes.inc_by(bytes);
        // Merged by the deadline or not at all (never late: tombstone GC relies on it), counted
        // from the batch's arrival, not per write: a batch merged in paced chunks, or read
        // late from a paused connection, must not land its last states later than the
        // peer-write limit allows (half the tombstone settle time).
        let within = crate::background::MERGE_DEADLINE.min(self.store.peer_write_limit());
        let deadline = arrived + within;
        let merge = |(key, state): (Bytes, Bytes)| async move {
            let hkey = HexKey(key.to_vec());
            let state = match KeyState::decode(&state) {
                Ok(s) => s,
                Err(e) => {
                    return Replayed::Refused(format!("key {hkey}: replayed hint's state: {e}"))
                }
            };
            match self
                .store
                .write_by(WriteOp::Merge { key, state }, deadline, || {
                    "replayed hint merge".into()
                })
                .await
            {
                Ok(_) => Replayed::Merged,
                // Counted by the store, logged once below.
                Err(WriteError::DeadlinePassed { .. }) => Replayed::Late,
                // Sending it again changes nothing (the holder gives it up to anti-entropy
                // after a few refusals).
                Err(e) if e.refuses_merge_for_good() => {
                    Replayed::Refused(format!("key {hkey}: {e}"))
                }
                Err(e) => Replayed::Failed(format!("key {hkey}: {e}")),
            }
        };
        // One chunk at a time over every holder, paced by how long each took.
        let results = paced_chunks(entries, Some(&self.applying), merge, |_| false).await;
        let (mut late, mut failed, mut first_failure) = (0usize, 0usize, None);
        for r in &results {
            match r {
                Replayed::Merged => {}
                Replayed::Refused(cause) => {
                    self.metrics.replay_merge_failed.inc();
                    tracing::warn!(node = %self.node_id, %cause, "replayed hint refused");
                }
                Replayed::Late => {
                    self.metrics.replay_merge_failed.inc();
                    late += 1;
                }
                Replayed::Failed(cause) => {
                    self.metrics.replay_merge_failed.inc();
                    failed += 1;
                    first_failure.get_or_insert(cause.as_str());
                }
            }
        }
        if late + failed > 0 {
            // Not merged for a cause that passes (the deadline, a full writer, a storage
            // error): the whole batch is answered as an error, so the holder keeps every hint
            // and replays the batch again after a pause, instead of counting them as refused
            // (which, five times in a row, gives a hint up to anti-entropy). The states that
            // did merge merge again as no-ops.
            let merged = results.iter().filter(|r| **r == Replayed::Merged).count();
            let message = format!(
                "replay batch of {}: {merged} merged, {late} not merged by their deadline \
                 ({} ms from arrival, waited {} ms), {failed} failed for now{}; send it again",
                results.len(),
                within.as_millis(),
                arrived.elapsed().as_millis(),
                first_failure.map_or(String::new(), |c| format!(" (first: {c})")),
            );
            tracing::warn!(node = %self.node_id, "{message}");
            return self.error(
                ErrorKind::Overloaded {
                    retry_after_ms: REPLAY_RETRY_AFTER_MS,
                },
                false,
                message,
            );
        }
        // The holder deletes each hint answered merged: under `sync = none` the merged states
        // are made durable first, or the batch is answered as an error and kept there.
        if let Err(e) = self.store.make_durable("a replayed hint batch").await {
            let message = format!(
                "replay batch of {}: merged, but not made durable ({e}); send it again",
                results.len()
            );
            tracing::warn!(node = %self.node_id, "{message}");
            return self.error(ErrorKind::Internal, false, message);
        }
        let merged = results.iter().map(|r| *r == Replayed::Merged).collect();
        PeerResponse::Handoff(HandoffResponse::Replayed(merged))
    }

    /// One `status` info line per target with pending hints or a replay state:
    /// `hints.target.<node>` = `keys=… bytes=… oldest_s=… state=… replayed=…/…`.
    pub fn status_lines(&self) -> Vec<(String, String)> {
        let book = self.store.hint_book().targets();
        let replay = self.replay.lock().expect("replay lock poisoned").clone();
        let now = now_ms();
        let mut targets: Vec<&String> = book.keys().chain(replay.keys()).collect();
        targets.sort();
        targets.dedup();
        targets
            .into_iter()
            .map(|t| {
                let pending = book.get(t).cloned().unwrap_or_default();
                let r = replay.get(t).cloned().unwrap_or_default();
                let oldest = pending
                    .oldest_ms()
                    .map_or(0, |ms| now.saturating_sub(ms) / 1000);
                (
                    format!("hints.target.{t}"),
                    format!(
                        "keys={} bytes={} oldest_s={oldest} state={} replayed={}/{}",
                        pending.keys,
                        pending.bytes,
                        shown_state(r.state, pending.keys),
                        r.done,
                        r.total
                    ),
                )
            })
            .collect()
    }

    pub(crate) fn replay_states(&self) -> Arc<Mutex<BTreeMap<String, TargetReplay>>> {
        self.replay.clone()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

/// The replay state shown for a target: what the replay worker last set, except that hints
/// it has not looked at since they were stored (no state yet, or `idle` from a pass that ended
/// before they came) are `pending`: `idle` is said only of a target with nothing pending.
fn shown_state(recorded: &'static str, pending_keys: u64) -> &'static str {
    match recorded {
        "" | "idle" if pending_keys > 0 => "pending",
        "" => "idle",
        state => state,
    }
}
