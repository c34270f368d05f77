//! The `tombstone_gc` worker: purges a deleted key's tombstones once they are **causally
//! stable**, instead of after a fixed grace period (Cassandra's 10 days) or a blind delay (Riak's
//! 3 s reap).
//!
//! Each node checks the tombstones of the keys it is the first replica of (its tombstone index,
//! `storage::tree`, never a scan of the data), a page at a time, against **every member** of the
//! cluster (`TombstoneCheck`). A tombstone state T of key k is stable when:
//! 1. every member of the ring is available (a down member could hold a hint, or be a replica
//!    that missed the delete: it blocks every purge, whatever its downtime; see `verdict`), and
//!    so is every retired node that has not said it holds nothing (`unreleased_member`);
//! 2. every current replica of k holds exactly T (`EQUAL`), and every member agrees on which
//!    nodes those are (ring views that differ mean the ring is changing);
//! 3. no member holds a hint for k (a hint could carry an older state back after the purge).
//!
//! A key is purged only when two checks at least `settle` apart both found it stable with the
//! same T (`Candidates`). Between them every request that was in flight at the first check has
//! passed its deadline (`settle` ≥ the longest request deadline, `config::Timeouts`): the writer drops peer writes
//! still queued past their deadline (`Store::write_within`), so no state older than T can still
//! arrive anywhere. Replicas then only hold T or newer, so nothing older than T exists in the
//! cluster, and deleting T cannot let an older value come back (no resurrection).
//!
//! The purge is a compare-and-delete of exactly T on every replica (`WriteOp::Purge`), which
//! updates its tree in the same batch. A replica that kept T (the purge lost, or T changed) makes
//! anti-entropy copy T back to the others: harmless, the next pass purges it again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_protocol::peer::aae::{status, MAX_STATES, STATES_BATCH_BYTES};
use ringkv_protocol::peer::{AaeRequest, AaeResponse};
use ringkv_protocol::ring::key_position;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::call;
use super::service::AntiEntropy;
use crate::background::load::CpuLoad;
use crate::background::{Progress, Worker, WorkerState};
use crate::membership::{ClusterView, Membership};
use crate::ring::NodeId;
use crate::rpc::{PeerPool, Transport};
use crate::storage::tree::tombstone_row;
use crate::storage::HexKey;
use crate::version::KeyState;

/// Most candidates remembered between two checks (about 100 bytes each); tombstones beyond
/// it are checked again by a later pass.
pub const MAX_CANDIDATES: usize = 100_000;

crate::metrics::metric_set! {
    /// Tombstone GC on this node (registered under `tombstones.`).
    pub struct GcMetrics {
        passes: Counter = "gc_passes", "passes over this node's tombstone index completed";
        blocked: Counter = "gc_passes_blocked", "passes not run because a member was unavailable or a ring change ran (tombstones kept)";
        checked: Counter = "checked", "tombstones checked against every member";
        failed: Counter = "purge_checks_failed", "checks that found a replica without the same tombstone, a hint for the key, or differing ring views";
        check_errors: Counter = "check_errors", "pages whose check could not reach every member (retried next pass)";
        candidates: Gauge = "candidates", "tombstones found stable once, waiting for the second check";
        purges_sent: Counter = "purges_sent", "purge requests sent to other replicas (keys)";
    }
}

/// Why a tombstone is not stable (for the debug log and the tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unstable {
    /// The member is a replica of the key but does not hold exactly the tombstone.
    NotEqual(NodeId),
    /// The member holds a hint for the key.
    Hinted(NodeId),
    /// The member is not a replica of the key but stores a state of it other than the
    /// tombstone (a copy it has not handed over since it lost the range): that copy would be
    /// handed to the replicas after the purge and bring the deleted value back.
    HeldElsewhere(NodeId),
    /// The member's ring disagrees with this node's on whether it replicates the key.
    RingDiffers(NodeId),
    /// The member did not answer.
    NoAnswer(NodeId),
}

/// The stability verdict for one key from every member's `status` flags (this node's own
/// included): `replicas` is the key's preference list in this node's ring.
pub fn verdict(replicas: &[NodeId], answers: &[(NodeId, Option<u8>)]) -> Result<(), Unstable> {
    for (member, flags) in answers {
        let Some(flags) = *flags else {
            return Err(Unstable::NoAnswer(member.clone()));
        };
        let replica = replicas.contains(member);
        if (flags & status::REPLICA != 0) != replica {
            return Err(Unstable::RingDiffers(member.clone()));
        }
        if replica && flags & status::EQUAL == 0 {
            return Err(Unstable::NotEqual(member.clone()));
        }
        if flags & status::HINTED != 0 {
            return Err(Unstable::Hinted(member.clone()));
        }
        if !replica && flags & status::HELD != 0 && flags & status::EQUAL == 0 {
            return Err(Unstable::HeldElsewhere(member.clone()));
        }
    }
    // Every replica must have answered (a replica missing from the members is unknown).
    match replicas
        .iter()
        .find(|r| !answers.iter().any(|(m, _)| m == *r))
    {
        Some(r) => Err(Unstable::NoAnswer(r.clone())),
        None => Ok(()),
    }
}

/// What to do with a key after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Stable at two checks `settle` apart with the same state: purge it.
    Purge,
    /// Stable now; wait for the second check.
    Wait,
    /// Not stable: forget any earlier check.
    Reset,
}

/// Tombstones found stable once: key → (the state found, when). Pure: time is passed in.
#[derive(Debug, Default)]
pub struct Candidates {
    seen: HashMap<Bytes, (Bytes, Instant)>,
}

impl Candidates {
    /// A check whose flags were read between `began` and `ended` (members are asked one
    /// after another) found `key` with `state`, `stable` or not. A first check counts from
    /// its end and a second from its beginning, so that every flag of the second was read at
    /// least `settle` after every flag of the first (found in review: with the end of both, a
    /// member read early in a slow second check could be read before a late hint landed, and
    /// the key was purged under it).
    pub fn observe(
        &mut self,
        key: &Bytes,
        state: &Bytes,
        stable: bool,
        (began, ended): (Instant, Instant),
        settle: Duration,
    ) -> Decision {
        if !stable {
            self.seen.remove(key);
            return Decision::Reset;
        }
        match self.seen.get(key) {
            Some((seen, at)) if seen == state => {
                if began.saturating_duration_since(*at) >= settle {
                    self.seen.remove(key);
                    Decision::Purge
                } else {
                    Decision::Wait
                }
            }
            _ => {
                if self.seen.len() < MAX_CANDIDATES || self.seen.contains_key(key) {
                    self.seen.insert(key.clone(), (state.clone(), ended));
                }
                Decision::Wait
            }
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// When the earliest candidate becomes due (its first check plus `settle`).
    pub fn next_due(&self, settle: Duration) -> Option<Instant> {
        self.seen.values().map(|(_, at)| *at + settle).min()
    }

    /// Forgets candidates this node no longer holds as tombstones (purged, rewritten).
    pub fn retain(&mut self, mut keep: impl FnMut(&Bytes) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }
}

/// Whether `member` is asked about tombstones: every owner (current or next), every retired
/// node that has not said it holds nothing (`awaiting_release`), up or not, and any other
/// retired node while it is up: until it has handed over what it held (or been wiped), its
/// copies could bring a purged value back. A member asked that does not answer stops the pass,
/// so one that goes out of reach during a pass (after `unreleased_member` was checked at its
/// start) holds the purges back as an owner does (found in review).
pub fn consulted(view: &ClusterView, member: &str) -> bool {
    view.layout.is_owner(member)
        || view.layout.awaiting_release().any(|n| n == member)
        || (view.layout.retired.contains(member) && view.is_alive(member))
}

/// The first owner (current or next) found unavailable, if any: from the layout, not from the
/// members this node has heard from (an owner down since before this node joined, or since
/// its data dir was wiped, is in the layout only, and may hold a hint or a copy all the same).
/// Nodes that own nothing (not joined yet, or retired) hold no replica and no hint: they do
/// not take part.
pub fn unavailable_member(view: &ClusterView) -> Option<NodeId> {
    view.layout
        .owners()
        .find(|m| !view.is_alive(m))
        .map(|m| NodeId::from(m.as_str()))
}

/// The first retired node found unavailable that may still hold data (`awaiting_release`:
/// it left, then went out of reach before it said it holds nothing). Its copies would be
/// handed over when it is back, after purges of the keys deleted meanwhile; it is consulted
/// while up (`consulted`), so purges wait while it is not, until it is back and empty or
/// removed (`kvctl cluster remove`: its copies are then refused).
pub fn unreleased_member(view: &ClusterView) -> Option<NodeId> {
    view.layout
        .awaiting_release()
        .find(|m| !view.is_alive(m))
        .map(|m| NodeId::from(m.as_str()))
}

pub struct GcWorker<T: Transport = PeerPool> {
    node_id: String,
    aae: Arc<AntiEntropy>,
    membership: Membership,
    transport: Arc<T>,
    interval: Duration,
    settle: Duration,
    keys_per_sec: f64,
    cpu: CpuLoad,
    pub metrics: Arc<GcMetrics>,
    candidates: Candidates,
    next_pass: Instant,
    /// The index row to resume the running pass from (`Some(None)`: from the start).
    cursor: Option<Option<Vec<u8>>>,
    /// Keys of this pass still tombstones here (to forget other candidates at its end).
    seen_this_pass: Vec<Bytes>,
    pass_purged: u64,
    detail: String,
}

impl<T: Transport> GcWorker<T> {
    pub fn new(
        aae: Arc<AntiEntropy>,
        membership: Membership,
        transport: Arc<T>,
        interval: Duration,
        settle: Duration,
        keys_per_sec: u32,
        metrics: Arc<GcMetrics>,
    ) -> GcWorker<T> {
        GcWorker {
            node_id: membership.view().me.to_string(),
            aae,
            membership,
            transport,
            interval,
            settle,
            keys_per_sec: keys_per_sec.max(1) as f64,
            cpu: CpuLoad::default(),
            metrics,
            candidates: Candidates::default(),
            next_pass: Instant::now() + interval.min(super::exchange::FIRST_CYCLE_DELAY),
            cursor: None,
            seen_this_pass: Vec::new(),
            pass_purged: 0,
            detail: "first pass pending".into(),
        }
    }

    /// One page of the index: checks this node's primary tombstones with every member and
    /// purges those stable at two checks. `Ok(None)` when the pass is over.
    async fn page(
        &mut self,
        view: &ClusterView,
        start: Option<Vec<u8>>,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<u8>>, String> {
        let store = self.aae.store().clone();
        let (rows, resume) = store
            .scan_tombstones(start, MAX_STATES)
            .await
            .map_err(|e| format!("tombstone index: {e}"))?;
        let n = self.aae.n();
        // This node's primary tombstones, as stored now.
        let mut entries: Vec<(Bytes, Bytes)> = Vec::new();
        // Each entry's preference list, for the verdict.
        let mut replica_lists: Vec<Vec<NodeId>> = Vec::new();
        let mut bytes = 0;
        for (key, _) in rows {
            let replicas = view.ring.preference_list(key_position(&key), n);
            if replicas.first() != Some(&view.me) {
                continue;
            }
            let stored = store
                .read_stored(&key)
                .await
                .map_err(|e| format!("key {}: {e}", HexKey(key.to_vec())))?;
            let Some(stored) = stored else { continue };
            if !KeyState::decode(&stored).is_ok_and(|s| s.is_tombstone()) {
                continue;
            }
            bytes += key.len() + stored.len();
            self.seen_this_pass.push(key.clone());
            entries.push((key, Bytes::from(stored)));
            replica_lists.push(replicas);
            if bytes >= STATES_BATCH_BYTES {
                break;
            }
        }
        let resume = if bytes >= STATES_BATCH_BYTES {
            // Resume after the last key taken (the rest of the page is read again).
            entries
                .last()
                .map(|(k, _)| crate::storage::key_after(&tombstone_row(k)))
        } else {
            resume
        };
        if entries.is_empty() {
            return Ok(resume);
        }
        // Every member's flags, this node's own included.
        let began = Instant::now();
        let mut answers: Vec<Vec<(NodeId, Option<u8>)>> = vec![Vec::new(); entries.len()];
        for member in view.members.keys().filter(|m| consulted(view, m)) {
            let flags = if *member == view.me {
                let mut own = Vec::with_capacity(entries.len());
                for (key, state) in &entries {
                    own.push(
                        self.aae
                            .tombstone_status(key, state)
                            .await
                            .map_err(|e| format!("key {}: {e}", HexKey(key.to_vec())))?,
                    );
                }
                // As a peer's answer (`TombstoneCheck`): durable before anything is purged
                // on it (under `sync = none`, a tombstone held, or a release or hint delete
                // behind "not held", may still be in the unsynced WAL).
                self.aae
                    .store()
                    .make_durable("this node's own tombstone check")
                    .await
                    .map_err(|e| e.to_string())?;
                own
            } else {
                let addr = view
                    .peer_addr(member)
                    .ok_or_else(|| format!("no address for member {member}"))?;
                let req = AaeRequest::TombstoneCheck {
                    entries: entries.clone(),
                };
                match call(&self.transport, addr, req).await {
                    Ok(AaeResponse::TombstoneStatus(f)) if f.len() == entries.len() => f,
                    Ok(other) => {
                        return Err(format!(
                            "member {member}: unexpected answer to a tombstone check: {other:?}"
                        ))
                    }
                    Err(e) => return Err(format!("member {member}: tombstone check: {e}")),
                }
            };
            for (i, f) in flags.into_iter().enumerate() {
                answers[i].push((member.clone(), Some(f)));
            }
        }
        let now = Instant::now();
        let mut purge: Vec<(Bytes, Bytes, Vec<NodeId>)> = Vec::new();
        for (((key, state), answers), replicas) in entries.iter().zip(&answers).zip(replica_lists) {
            self.metrics.checked.inc();
            let v = verdict(&replicas, answers);
            if let Err(why) = &v {
                self.metrics.failed.inc();
                debug!(node = %self.node_id, key = %HexKey(key.to_vec()), ?why, "tombstone not stable yet");
            }
            if self
                .candidates
                .observe(key, state, v.is_ok(), (began, now), self.settle)
                == Decision::Purge
            {
                purge.push((key.clone(), state.clone(), replicas));
            }
        }
        self.metrics.candidates.set(self.candidates.len() as u64);
        if !purge.is_empty() {
            self.purge(view, purge).await;
        }
        // Pace: the page's keys at the keys/s budget, yielding to foreground CPU use as the
        // wait goes (found in review: each wait was cut at 5 s, above the budget on a busy
        // machine); cut short only by shutdown (the page's work is done).
        let owed = Duration::from_secs_f64(entries.len() as f64 / self.keys_per_sec);
        let _ = self.cpu.repay(owed, stop).await;
        Ok(resume)
    }

    /// Purges on the other replicas, then here (compare-and-delete everywhere).
    async fn purge(&mut self, view: &ClusterView, keys: Vec<(Bytes, Bytes, Vec<NodeId>)>) {
        let mut by_replica: HashMap<NodeId, Vec<(Bytes, Bytes)>> = HashMap::new();
        for (key, state, replicas) in &keys {
            for r in replicas.iter().filter(|r| **r != view.me) {
                by_replica
                    .entry(r.clone())
                    .or_default()
                    .push((key.clone(), state.clone()));
            }
        }
        for (replica, entries) in by_replica {
            let Some(addr) = view.peer_addr(&replica) else {
                continue;
            };
            self.metrics.purges_sent.inc_by(entries.len() as u64);
            match call(&self.transport, addr, AaeRequest::Purge { entries }).await {
                Ok(AaeResponse::Merged(done)) => {
                    let kept = done.iter().filter(|d| !**d).count();
                    if kept > 0 {
                        debug!(node = %self.node_id, %replica, kept,
                               "tombstones kept by a replica (changed since the check)");
                    }
                }
                Ok(other) => {
                    warn!(node = %self.node_id, %replica, "unexpected answer to a purge: {other:?}")
                }
                // Its tombstones stay; anti-entropy copies them back, a later pass purges.
                Err(cause) => {
                    warn!(node = %self.node_id, %replica, %cause, "tombstone purge request failed")
                }
            }
        }
        let local: Vec<(Bytes, Bytes)> = keys.into_iter().map(|(k, s, _)| (k, s)).collect();
        let done = self.aae.purge(local, None).await;
        self.pass_purged += done.iter().filter(|d| **d).count() as u64;
    }

    /// A pass not run (`why` in the worker's detail; counted); the next try is at most 10 s
    /// away.
    fn blocked(&mut self, why: String) -> WorkerState {
        self.metrics.blocked.inc();
        self.detail = why;
        self.next_pass = Instant::now() + self.interval.min(Duration::from_secs(10));
        WorkerState::Idle
    }

    fn finish_pass(&mut self) {
        self.metrics.passes.inc();
        let seen: std::collections::HashSet<Bytes> = std::mem::take(&mut self.seen_this_pass)
            .into_iter()
            .collect();
        self.candidates.retain(|k| seen.contains(k));
        self.metrics.candidates.set(self.candidates.len() as u64);
        if self.pass_purged > 0 {
            info!(node = %self.node_id, purged = self.pass_purged,
                  waiting = self.candidates.len(), "tombstone GC pass purged stable tombstones");
        }
        self.detail = format!(
            "last pass purged {}, {} stable once (purged at the next check ≥ {} s later)",
            self.pass_purged,
            self.candidates.len(),
            self.settle.as_secs()
        );
        self.pass_purged = 0;
        let now = Instant::now();
        // The next pass: at the interval, or as soon as the earliest candidate is due.
        self.next_pass = self
            .candidates
            .next_due(self.settle)
            .map_or(now + self.interval, |due| {
                due.clamp(now + Duration::from_secs(1), now + self.interval)
            });
        self.cursor = None;
    }
}

impl<T: Transport> Worker for GcWorker<T> {
    fn name(&self) -> String {
        "tombstone_gc".into()
    }

    fn progress(&self) -> Progress {
        Progress {
            detail: if self.cursor.is_some() {
                format!(
                    "pass running: {} tombstones checked so far",
                    self.seen_this_pass.len()
                )
            } else {
                self.detail.clone()
            },
            queue: Some(self.candidates.len() as u64),
        }
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<WorkerState, String> {
        let view = self.membership.view();
        if view.next.is_some() {
            // A ring change runs: replicas are moving, so no check can show a tombstone stable;
            // checks made before it say nothing about after it.
            self.cursor = None;
            self.candidates = Candidates::default();
            return Ok(self.blocked(format!(
                "blocked: a ring change is running (layout v{}); tombstones kept until it ends",
                view.layout.version
            )));
        }
        let start = match self.cursor.take() {
            Some(start) => start,
            None => {
                if Instant::now() < self.next_pass || !view.ready {
                    return Ok(WorkerState::Idle);
                }
                let why = unavailable_member(&view)
                    .map(|down| {
                        format!(
                            "blocked: member {down} is unavailable (it may hold a hint or miss \
                             a delete); tombstones kept until every member is back"
                        )
                    })
                    .or_else(|| {
                        unreleased_member(&view).map(|gone| {
                            format!(
                                "blocked: node {gone} left the ring and went out of reach \
                                 before it said it holds nothing (it may hand over copies of \
                                 keys deleted since); tombstones kept until it is back and \
                                 empty, or removed (kvctl cluster remove {gone})"
                            )
                        })
                    });
                if let Some(why) = why {
                    return Ok(self.blocked(why));
                }
                None
            }
        };
        match self.page(&view, start, stop).await {
            Ok(Some(resume)) => {
                self.cursor = Some(Some(resume));
                Ok(WorkerState::Busy)
            }
            Ok(None) => {
                self.finish_pass();
                Ok(WorkerState::Idle)
            }
            Err(cause) => {
                self.metrics.check_errors.inc();
                self.seen_this_pass.clear();
                self.cursor = None;
                self.next_pass = Instant::now() + self.interval.min(Duration::from_secs(10));
                Err(format!("tombstone GC pass stopped: {cause}"))
            }
        }
    }

    async fn wait_for_work(&mut self) -> WorkerState {
        let wait = self
            .next_pass
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        tokio::time::sleep(wait).await;
        WorkerState::Busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<NodeId> {
        v.iter().map(|s| NodeId::from(*s)).collect()
    }

    const R: u8 = status::REPLICA;
    const E: u8 = status::EQUAL | status::COVERED;

    fn answers(v: &[(&str, Option<u8>)]) -> Vec<(NodeId, Option<u8>)> {
        v.iter().map(|(m, f)| (NodeId::from(*m), *f)).collect()
    }

    #[test]
    fn stable_only_when_every_replica_holds_it_and_nobody_holds_a_hint() {
        let replicas = ids(&["a", "b", "c"]);
        let all = |d: Option<u8>| {
            answers(&[
                ("a", Some(R | E)),
                ("b", Some(R | E)),
                ("c", Some(R | E)),
                ("d", d),
            ])
        };
        assert_eq!(verdict(&replicas, &all(Some(0))), Ok(()));
        // A non-replica holding a hint for the key.
        assert_eq!(
            verdict(&replicas, &all(Some(status::HINTED))),
            Err(Unstable::Hinted("d".into()))
        );
        // A non-replica still holding an older copy (a range it lost, not yet handed over):
        // purging now would let the hand-over bring the deleted value back.
        assert_eq!(
            verdict(&replicas, &all(Some(status::HELD))),
            Err(Unstable::HeldElsewhere("d".into()))
        );
        // One holding exactly the tombstone may: handing it over brings back only a tombstone.
        assert_eq!(verdict(&replicas, &all(Some(status::HELD | E))), Ok(()));
        // A member that thinks it replicates the key (its ring differs).
        assert_eq!(
            verdict(&replicas, &all(Some(R))),
            Err(Unstable::RingDiffers("d".into()))
        );
        assert_eq!(
            verdict(&replicas, &all(None)),
            Err(Unstable::NoAnswer("d".into()))
        );
        // A replica with a newer state (covered but not equal) or none.
        let newer = answers(&[
            ("a", Some(R | E)),
            ("b", Some(R | status::COVERED)),
            ("c", Some(R | E)),
        ]);
        assert_eq!(
            verdict(&replicas, &newer),
            Err(Unstable::NotEqual("b".into()))
        );
        // A replica that did not answer at all.
        let missing = answers(&[("a", Some(R | E)), ("b", Some(R | E))]);
        assert_eq!(
            verdict(&replicas, &missing),
            Err(Unstable::NoAnswer("c".into()))
        );
    }

    /// A node taken out of the ring is asked while it is up (it may still hold copies it has
    /// not handed over), and while down too until it has said it holds nothing (its
    /// unanswered check stops the pass); once emptied and down, it is not asked.
    #[test]
    fn owners_and_live_retired_members_are_consulted() {
        let mut v = crate::testkit::view(&["a", "b", "c", "d"], "a", &["a", "b", "c", "d"]);
        let mut layout = (*v.layout).clone();
        layout.current.remove("d");
        layout.retired.insert("d".into());
        v.layout = std::sync::Arc::new(layout);
        assert!(consulted(&v, "a") && consulted(&v, "b"));
        assert!(consulted(&v, "d"), "retired and up");
        v.alive.remove(&NodeId::from("d"));
        assert!(
            consulted(&v, "d"),
            "retired, down, and not known to hold nothing: asked, so the pass stops"
        );
        let mut released = (*v.layout).clone();
        released.released.insert("d".into());
        v.layout = std::sync::Arc::new(released);
        assert!(!consulted(&v, "d"), "retired, down, and emptied");
        assert!(!consulted(&v, "e"), "not a member");
    }

    /// An owner this node has never heard from (down since before this node joined, or since
    /// its data dir was wiped: no gossip metadata, so not among `members`) may hold a hint or
    /// a copy all the same: it blocks purges like any owner that is down (found in review:
    /// only known members were looked at).
    #[test]
    fn a_retired_node_out_of_reach_blocks_purges_until_released_or_forfeited() {
        let mut v = crate::testkit::view(&["a", "b", "c", "d"], "a", &["a", "b", "c"]);
        let mut layout = (*v.layout).clone();
        layout.current.remove("d");
        layout.retired.insert("d".into());
        v.layout = Arc::new(layout.clone());
        assert_eq!(unavailable_member(&v), None, "d owns nothing");
        assert_eq!(unreleased_member(&v), Some(NodeId::from("d")));
        v.members.remove("d");
        assert_eq!(
            unreleased_member(&v),
            Some(NodeId::from("d")),
            "a retired node never heard from is awaited too"
        );
        v.alive.insert("d".into());
        assert_eq!(unreleased_member(&v), None, "up, it is consulted instead");
        v.alive.remove("d");
        let mut released = layout.clone();
        released.released.insert("d".into());
        v.layout = Arc::new(released);
        assert_eq!(unreleased_member(&v), None, "it said it holds nothing");
        let mut forfeited = layout;
        forfeited.forfeited.insert("d".into());
        v.layout = Arc::new(forfeited);
        assert_eq!(
            unreleased_member(&v),
            None,
            "removed: its copies are refused"
        );
    }

    #[test]
    fn an_owner_never_heard_from_blocks_purges() {
        let mut v = crate::testkit::view(&["a", "b", "c", "d"], "a", &["a", "b", "c"]);
        assert_eq!(unavailable_member(&v), Some(NodeId::from("d")));
        v.members.remove("d");
        assert_eq!(
            unavailable_member(&v),
            Some(NodeId::from("d")),
            "an owner missing from the members is not available"
        );
        v.alive.insert(NodeId::from("d"));
        let mut layout = (*v.layout).clone();
        layout.current.remove("d");
        v.layout = std::sync::Arc::new(layout);
        assert_eq!(unavailable_member(&v), None, "d owns nothing any more");
    }

    /// A check made at one instant.
    fn at(t: Instant) -> (Instant, Instant) {
        (t, t)
    }

    #[test]
    fn purged_only_after_two_stable_checks_settle_apart_with_the_same_state() {
        let settle = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut c = Candidates::default();
        let (k, t, t2) = (
            Bytes::from_static(b"k"),
            Bytes::from_static(b"T"),
            Bytes::from_static(b"T2"),
        );
        assert_eq!(c.observe(&k, &t, true, at(t0), settle), Decision::Wait);
        assert_eq!(c.next_due(settle), Some(t0 + settle));
        // Too soon.
        assert_eq!(
            c.observe(&k, &t, true, at(t0 + Duration::from_secs(5)), settle),
            Decision::Wait
        );
        // Not stable in between: starts over.
        assert_eq!(
            c.observe(&k, &t, false, at(t0 + Duration::from_secs(6)), settle),
            Decision::Reset
        );
        assert!(c.is_empty());
        let t1 = t0 + Duration::from_secs(7);
        assert_eq!(c.observe(&k, &t, true, at(t1), settle), Decision::Wait);
        // Another tombstone state (a second delete): starts over from it.
        assert_eq!(
            c.observe(&k, &t2, true, at(t1 + settle), settle),
            Decision::Wait
        );
        assert_eq!(
            c.observe(&k, &t2, true, at(t1 + settle + settle), settle),
            Decision::Purge
        );
        assert!(c.is_empty(), "a purged key is forgotten");
    }

    /// Members are asked one after another, so a check's flags are read over a span: the
    /// first check counts from its end, the second from its beginning (found in review: a
    /// slow second check that ended `settle` after the first had read a member too early).
    #[test]
    fn a_second_check_counts_from_its_first_read_and_a_first_from_its_last() {
        let settle = Duration::from_secs(10);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let (k, t) = (Bytes::from_static(b"k"), Bytes::from_static(b"T"));
        let mut c = Candidates::default();
        // The first check read its flags from t0 to t0 + 3 s.
        assert_eq!(
            c.observe(&k, &t, true, (t0, t0 + s(3)), settle),
            Decision::Wait
        );
        // A second check that began 10 s after the first one began, but only 7 s after it
        // ended: too soon, even though it ended 20 s after.
        assert_eq!(
            c.observe(&k, &t, true, (t0 + s(10), t0 + s(20)), settle),
            Decision::Wait
        );
        // One that began `settle` after the first ended.
        assert_eq!(
            c.observe(&k, &t, true, (t0 + s(13), t0 + s(14)), settle),
            Decision::Purge
        );
    }
}
