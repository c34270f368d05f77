//! The anti-entropy service: answers a peer's exchange (the aae family) from this node's tree
//! and data, and merges the states it pushes, for keys this node replicates only.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_protocol::peer::aae::{status, MAX_DIGESTS, MAX_STATES};
use ringkv_protocol::peer::{AaeRequest, AaeResponse, PeerResponse};
use ringkv_protocol::ring::key_position;
use ringkv_protocol::{ErrorKind, RepairReply};

use crate::background::load::CpuLoad;
use crate::background::{paced_chunks, MERGE_DEADLINE};
use crate::membership::{Membership, NoData};
use crate::merkle::LEAVES;
use crate::storage::tree::{untrusted_from, SharedTree, TreeReady};
use crate::storage::{HexKey, Store, WriteError, WriteOp};
use crate::version::KeyState;

crate::metrics::metric_set! {
    /// Anti-entropy on this node (registered under `aae.`), as initiator and as peer.
    pub struct AaeMetrics {
        exchanges: Counter = "exchanges", "exchanges this node ran with a peer (complete)";
        exchange_errors: Counter = "exchange_errors", "exchanges that failed (retried next cycle)";
        spans_in_sync: Gauge = "spans_in_sync", "shared spans found equal in the last cycle";
        spans_out_of_sync: Gauge = "spans_out_of_sync", "shared spans that differed in the last cycle";
        cells_compared: Counter = "cells_compared", "tree cells compared with peers";
        keys_compared: Counter = "keys_compared", "keys compared by digest with peers";
        keys_sent: Counter = "keys_repaired_sent", "states pushed to peers that lacked or differed";
        keys_received: Counter = "keys_repaired_received", "states fetched from peers and merged here";
        bytes_sent: Counter = "bytes_sent", "bytes (key and state) of the states pushed to peers";
        bytes_received: Counter = "bytes_received", "bytes (key and state) of the states fetched from peers";
        exchange_bytes: Counter = "exchange_bytes", "payload bytes of exchanges both ways (cells, hashes, digests, states)";
        last_cycle_seconds: Gauge = "last_cycle_seconds", "duration of the last full cycle";
        cycles: Counter = "cycles", "full cycles over every peer completed";
        served: Counter = "requests_served", "aae requests answered for peers";
        states_served: Counter = "states_served", "key states sent to peers that fetched them (exchanges and transfers)";
        state_bytes_served: Counter = "state_bytes_served", "bytes (key and state) of the key states sent to peers that fetched them (exchanges and transfers)";
        push_refused: Counter = "push_refused", "pushed states refused (this node is not a replica of the key)";
        unsynced: Gauge = "unsynced", "1 while this node's data dir is new and not yet synced from every other replica (it answers no replica reads)";
        unsynced_peers: Gauge = "unsynced_peers", "peers this node shares ranges with and has not completed an exchange with since its data dir was new";
        refused_reads: Counter = "unsynced_reads_refused", "replica reads refused because the key's range is not synced yet";
        marked_partitions: Gauge = "marked_partitions", "partitions of other nodes this node marked for anti-entropy (dropped hints), as of the last cycle's start";
        oldest_mark_age_seconds: Gauge = "oldest_mark_age_seconds", "age of the oldest such mark at the last cycle's start (0: none): how long a range has waited to be synced";
        marks_cleared: Counter = "marks_cleared", "marks cleared after an exchange synced their partition (or the target agreed to run a cycle)";
        return_syncs: Counter = "return_syncs", "exchanges run at once with a peer back from a long absence";
        deferred: Counter = "exchanges_deferred", "exchanges put off while a hint replay ran with the peer";
        serve_rests: Counter = "serve_rests", "answers to peers' exchanges, transfers and hand-overs this node held back because its own foreground queues were deep or its CPUs busy (the peer's work slows to this node's pace)";
    }
}

pub struct AntiEntropy {
    node_id: String,
    store: Arc<Store>,
    tree: SharedTree,
    /// The leaves below which the tree is trusted (the rest is being rebuilt).
    tree_ready: TreeReady,
    membership: Membership,
    n: usize,
    pub metrics: Arc<AaeMetrics>,
    /// Whether this node runs the `anti_entropy` worker (cycles can be requested).
    enabled: bool,
    /// A cycle was requested (`kvctl repair`), over a range or everything (`Some(None)`): the
    /// worker starts one at once.
    requested: Mutex<Option<Option<(u64, u64)>>>,
    /// A cycle is running.
    running: AtomicBool,
    /// While the store is unsynced: the peers an exchange completed with since this start.
    synced_with: Mutex<BTreeSet<String>>,
    /// The ring epoch this node last saw and since when (an unsynced node trusts its list of
    /// peers only once the ring stopped changing for `RING_SETTLE`).
    epoch_since: Mutex<Option<(u64, std::time::Instant)>>,
    /// The pace (CPU yield and foreground pressure) this node serves peers' background
    /// requests at (`serve_rest`).
    load: Mutex<ServePace>,
}

/// Where [`AntiEntropy::serve`] reads its pace from.
enum ServePace {
    /// This node's CPU use and foreground pressure (`CpuLoad::pace`).
    Load(CpuLoad),
    /// A fixed pace (tests: the machine's own load is not theirs to set).
    #[cfg(test)]
    Fixed(f64),
}

/// The longest an answer to a peer's background request is held back (`serve_rest`): well
/// within the caller's timeout (`exchange::CALL_TIMEOUT`), as a hint holder rests at most
/// `handoff::replay::MAX_HOLDER_REST` between batches.
pub const MAX_SERVE_REST: Duration = Duration::from_secs(1);

/// How long to hold back the answer to a peer's background request that took `worked` to
/// serve, at this node's background `pace` (0..=1): so that serving one peer's exchange,
/// transfer or hand-over takes at most that share of this node's time, as its own background
/// work does (`background::load::duty_rest`); at most `cap`.
///
/// The initiator paces an exchange by its own load; without this a busy peer was slowed only
/// by answering late, or stopped by refusing (Riak's anti-entropy throttle reads the vnode
/// queues of every node for the same reason; Scylla runs the serving side of repair and
/// streaming in its maintenance scheduling group, at the serving shard's priority).
pub fn serve_rest(worked: Duration, pace: f64, cap: Duration) -> Duration {
    crate::background::load::duty_rest(worked, pace).min(cap)
}

/// How long the ring must stay the same before an unsynced node takes its peers as complete
/// (a node that just joined may not have heard of every member yet).
pub const RING_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// What became of one state handed to [`AntiEntropy::merge_by`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// In this node's replica now (or there was nothing to merge).
    Merged,
    /// Not taken, and taking it again would not change that: this node does not replicate the
    /// key (or does not know the ring yet), the state does not decode, the merge would grow
    /// the replica past the state bounds, or this node's stored record of the key is corrupt.
    Refused,
    /// Not merged for a cause that passes (the writer was full or late, storage failed): an
    /// exchange that fetched it has not synced the key, and is retried.
    Failed,
}

impl AntiEntropy {
    pub fn new(
        node_id: String,
        store: Arc<Store>,
        tree: SharedTree,
        tree_ready: TreeReady,
        membership: Membership,
        n: usize,
        enabled: bool,
    ) -> AntiEntropy {
        let metrics = Arc::new(AaeMetrics::default());
        metrics.unsynced.set((enabled && store.unsynced()) as u64);
        AntiEntropy {
            node_id,
            store,
            tree,
            tree_ready,
            membership,
            n,
            metrics,
            enabled,
            requested: Mutex::new(None),
            running: AtomicBool::new(false),
            synced_with: Mutex::new(BTreeSet::new()),
            epoch_since: Mutex::new(None),
            load: Mutex::new(ServePace::Load(CpuLoad::default())),
        }
    }

    /// Whether this node's copy of `key` may answer a read as a replica: always, unless its
    /// data dir is new (or was wiped) and some other replica of the key has not completed an
    /// exchange with it yet. Such a copy holds only what arrived since the start: counting it
    /// toward R could answer not-found for a key written before. With anti-entropy off
    /// nothing would ever sync it, so the guard is off too (documented).
    pub fn may_answer(&self, key: &[u8]) -> bool {
        if !self.enabled || !self.store.unsynced() {
            return true;
        }
        let view = self.membership.view();
        let synced = self.synced_with.lock().expect("synced set lock poisoned");
        let ok = view
            .ring
            .preference_list(key_position(key), self.n)
            .iter()
            .all(|p| *p == view.me || synced.contains(&**p));
        if !ok {
            self.metrics.refused_reads.inc();
        }
        ok
    }

    /// An exchange with `peer` over every span both replicate completed.
    pub fn exchange_done(&self, peer: &str) {
        if self.store.unsynced() {
            self.synced_with
                .lock()
                .expect("synced set lock poisoned")
                .insert(peer.to_string());
        }
    }

    /// While unsynced: once this node knows the ring and has completed an exchange with every
    /// peer it shares ranges with, the store is marked synced (durably). True while still
    /// unsynced.
    pub fn check_synced(&self) -> bool {
        if !self.store.unsynced() {
            self.metrics.unsynced.set(0);
            return false;
        }
        self.metrics.unsynced.set(1);
        let view = self.membership.view();
        if !view.ready {
            return true;
        }
        let settled = {
            let mut since = self.epoch_since.lock().expect("epoch lock poisoned");
            match *since {
                Some((epoch, at)) if epoch == view.epoch => at.elapsed() >= RING_SETTLE,
                _ => {
                    *since = Some((view.epoch, std::time::Instant::now()));
                    false
                }
            }
        };
        let shared = crate::ring::ranges::shared_spans(&view.ring, &view.me, self.n);
        let left: Vec<String> = {
            let synced = self.synced_with.lock().expect("synced set lock poisoned");
            shared
                .keys()
                .filter(|p| !synced.contains(&***p))
                .map(|p| p.to_string())
                .collect()
        };
        self.metrics.unsynced_peers.set(left.len() as u64);
        if !left.is_empty() || !settled {
            return true;
        }
        let recorded = self.store.mark_synced();
        self.metrics.unsynced.set(0);
        tracing::info!(node = %self.node_id, peers = shared.len(),
            "data synced from every replica since the data dir was new: this node answers reads for all its ranges");
        if let Err(e) = recorded {
            tracing::warn!(node = %self.node_id, error = %e,
                "could not record that the data is synced: after a restart this node syncs again");
        }
        false
    }

    /// A node that owned nothing received every range it is about to own (a ring change's
    /// transfers, from every live replica): its data is synced as if by exchanges.
    pub fn synced_by_transfer(&self) {
        if !self.store.unsynced() {
            return;
        }
        if let Err(e) = self.store.mark_synced() {
            tracing::warn!(node = %self.node_id, error = %e,
                "could not record that the data is synced: after a restart this node syncs again");
        }
        self.metrics.unsynced.set(0);
        tracing::info!(node = %self.node_id,
            "every range this node is about to own was transferred to it: it answers reads for them");
    }

    /// Asks the worker for a cycle now, over the positions `range` only if given: `None`
    /// when this node runs none. The reply's `done_at` is the completed-cycle count
    /// (`aae.cycles`) at which a cycle that started after this request has finished. Requests
    /// waiting together are served by one cycle over the smallest range holding them all.
    pub fn request_cycle(&self, range: Option<(u64, u64)>) -> Option<RepairReply> {
        if !self.enabled {
            return None;
        }
        let completed = self.metrics.cycles.get();
        // A running cycle may have passed some peers already: the requested one is the next.
        let done_at = completed + 1 + self.running.load(Ordering::Acquire) as u64;
        let mut pending = self.requested.lock().expect("request lock poisoned");
        *pending = Some(match (*pending, range) {
            (None, r) => r,
            (Some(None), _) | (_, None) => None,
            (Some(Some((a, b))), Some((c, d))) => Some((a.min(c), b.max(d))),
        });
        Some(RepairReply { completed, done_at })
    }

    /// The worker: the requested cycle, if any (`Some(None)`: over everything), clearing it.
    pub fn take_request(&self) -> Option<Option<(u64, u64)>> {
        self.requested.lock().expect("request lock poisoned").take()
    }

    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Release);
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn tree(&self) -> &SharedTree {
        &self.tree
    }

    pub fn tree_ready(&self) -> &TreeReady {
        &self.tree_ready
    }

    /// The first ring position whose tree leaves are not trusted yet (being rebuilt), `None`
    /// when the whole tree is: exchanges use only the positions below it.
    pub fn untrusted_from(&self) -> Option<u64> {
        untrusted_from(&self.tree_ready)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn error(&self, kind: ErrorKind, msg: String) -> PeerResponse {
        PeerResponse::error(kind, true, format!("node {}: {msg}", self.node_id))
    }

    /// Serves one request of the anti-entropy family, read at `arrived` (`net`'s stall-safe
    /// dating: a push's merges are bounded from then), then holds the answer back by this
    /// node's background pace ([`serve_rest`]) if the request is a peer's background data
    /// work: tree cells, digests, fetches and pushes (exchanges, transfers, hand-overs).
    /// Tombstone GC's checks and purges are answered at once (GC paces itself; its checks'
    /// timing stays the initiator's to reason about), and so are requested cycles.
    pub async fn serve(&self, req: AaeRequest, arrived: Instant) -> PeerResponse {
        // Held back: peers' data work, a push's answer (its caller waits at most the
        // peer-write limit from sending it) only within a quarter of that from its arrival.
        let (held, push) = match &req {
            AaeRequest::CellHashes { .. }
            | AaeRequest::KeyDigests { .. }
            | AaeRequest::FetchStates { .. } => (true, false),
            AaeRequest::PushStates { .. } => (true, true),
            AaeRequest::TombstoneCheck { .. }
            | AaeRequest::Purge { .. }
            | AaeRequest::RequestCycle => (false, false),
        };
        let started = Instant::now();
        let resp = self.answer(req, arrived).await;
        if held {
            let cap = if push {
                MAX_SERVE_REST
                    .min((self.store.peer_write_limit() / 4).saturating_sub(arrived.elapsed()))
            } else {
                MAX_SERVE_REST
            };
            let pace = match &mut *self.load.lock().expect("serve load lock poisoned") {
                ServePace::Load(load) => load.pace(),
                #[cfg(test)]
                ServePace::Fixed(p) => *p,
            };
            let rest = serve_rest(started.elapsed(), pace, cap);
            if !rest.is_zero() {
                self.metrics.serve_rests.inc();
                tokio::time::sleep(rest).await;
            }
        }
        resp
    }

    /// Serves at a fixed background pace from now on.
    #[cfg(test)]
    pub fn set_serve_pace(&self, pace: f64) {
        *self.load.lock().expect("serve load lock poisoned") = ServePace::Fixed(pace);
    }

    /// The answer to one request of the anti-entropy family (`serve`).
    async fn answer(&self, req: AaeRequest, arrived: Instant) -> PeerResponse {
        self.metrics.served.inc();
        match req {
            AaeRequest::CellHashes { cells } => {
                if let Some(c) = cells.iter().find(|c| c.last as usize >= LEAVES) {
                    return self.error(
                        ErrorKind::InvalidRequest,
                        format!("cell up to leaf {} (the tree has {LEAVES})", c.last),
                    );
                }
                let ready = self.tree_ready.load(Ordering::Acquire);
                if let Some(c) = cells.iter().find(|c| c.last >= ready) {
                    return self.error(
                        ErrorKind::Unavailable {
                            alive: 0,
                            needed: 1,
                        },
                        format!(
                            "cell up to leaf {}: the anti-entropy tree is being rebuilt (trusted below leaf {ready})",
                            c.last
                        ),
                    );
                }
                let tree = self.tree.read().expect("tree lock poisoned");
                let hashes = cells
                    .iter()
                    .map(|c| tree.range_hash(c.first, c.last))
                    .collect();
                PeerResponse::Aae(AaeResponse::Hashes(hashes))
            }
            AaeRequest::KeyDigests {
                first,
                last,
                after,
                limit,
            } => {
                if self.untrusted_from().is_some_and(|from| last >= from) {
                    return self.error(
                        ErrorKind::Unavailable {
                            alive: 0,
                            needed: 1,
                        },
                        format!(
                            "digests up to position {last:016x}: the anti-entropy tree is being rebuilt"
                        ),
                    );
                }
                let limit = (limit as usize).clamp(1, MAX_DIGESTS);
                match self.store.scan_digests(first, last, &after, limit).await {
                    Ok((entries, more)) => {
                        PeerResponse::Aae(AaeResponse::Digests { entries, more })
                    }
                    Err(e) => self.error(
                        ErrorKind::Internal,
                        format!("digests of positions {first:016x}..={last:016x}: {e}"),
                    ),
                }
            }
            AaeRequest::FetchStates { keys } => {
                let mut states = Vec::with_capacity(keys.len().min(MAX_STATES));
                for key in &keys {
                    match self.store.read_stored(key).await {
                        Ok(s) => states.push(s.map(Bytes::from).unwrap_or_default()),
                        Err(e) => {
                            return self.error(
                                ErrorKind::Internal,
                                format!("key {}: {e}", HexKey(key.to_vec())),
                            )
                        }
                    }
                }
                self.metrics
                    .states_served
                    .inc_by(states.iter().filter(|s| !s.is_empty()).count() as u64);
                self.metrics
                    .state_bytes_served
                    .inc_by(super::states_bytes(&keys, &states));
                PeerResponse::Aae(AaeResponse::States(states))
            }
            AaeRequest::PushStates { entries } => {
                // Refused as a whole while this node does not know the ring, so the sender's
                // exchange, transfer or hand-over fails and is retried (per-key refusals would
                // read as "not a replica" and be settled).
                if !self.membership.view().ready {
                    return NoData::NotReady.refusal(&self.node_id, "an anti-entropy push");
                }
                PeerResponse::Aae(AaeResponse::Merged(
                    self.merge_pushed(entries, arrived).await,
                ))
            }
            AaeRequest::TombstoneCheck { entries } => {
                let mut flags = Vec::with_capacity(entries.len());
                for (key, state) in &entries {
                    match self.tombstone_status(key, state).await {
                        Ok(f) => flags.push(f),
                        Err(e) => {
                            return self.error(
                                ErrorKind::Internal,
                                format!("tombstone check of key {}: {e}", HexKey(key.to_vec())),
                            )
                        }
                    }
                }
                // The sender purges on these flags: under `sync = none` they are made durable
                // first. A power loss that took back a tombstone held here, or a delete behind
                // "not held" / "no hint" (a release, a replayed hint's), would bring the
                // deleted value back everywhere once the tombstone is purged.
                if let Err(e) = self.store.make_durable("a tombstone check").await {
                    return self.error(
                        ErrorKind::Internal,
                        format!("tombstone check of {} keys: {e}", entries.len()),
                    );
                }
                PeerResponse::Aae(AaeResponse::TombstoneStatus(flags))
            }
            AaeRequest::Purge { entries } => {
                // A peer's purge is applied within the limit a pushed state has, or not at all:
                // the sender gave up on it by then (and purges again on a later pass).
                let within = MERGE_DEADLINE.min(self.store.peer_write_limit());
                let purged = self.purge(entries, Some(arrived + within)).await;
                PeerResponse::Aae(AaeResponse::Merged(purged))
            }
            AaeRequest::RequestCycle => PeerResponse::Aae(AaeResponse::Merged(vec![self
                .request_cycle(None)
                .is_some()])),
        }
    }

    /// What this node holds of `key` against the tombstone state `encoded` (`status` flags).
    /// A state that does not decode is covered by nothing (the check fails, nothing purges).
    pub async fn tombstone_status(
        &self,
        key: &Bytes,
        encoded: &[u8],
    ) -> Result<u8, crate::storage::StorageError> {
        let mut flags = 0;
        if self.replicates(key) {
            flags |= status::REPLICA;
        }
        if let Ok(tombstone) = KeyState::decode(encoded) {
            let local = self.store.read(key.clone()).await?;
            if !local.is_empty() {
                flags |= status::HELD;
            }
            if !local.is_empty() && local.context().descends(tombstone.context()) {
                flags |= status::COVERED;
            }
            if local == tombstone {
                flags |= status::EQUAL;
            }
        }
        if self.store.holds_hint(key).await? {
            flags |= status::HINTED;
        }
        Ok(flags)
    }

    /// Purges each key this node replicates whose state is still exactly the given tombstone
    /// state (compare-and-delete in the writer); true per key purged. With a `deadline` (a
    /// peer's purge), a purge still queued then is dropped, never applied late (false).
    pub async fn purge(
        &self,
        entries: Vec<(Bytes, Bytes)>,
        deadline: Option<std::time::Instant>,
    ) -> Vec<bool> {
        let purge = |(key, expected): (Bytes, Bytes)| async move {
            if !self.replicates(&key) {
                return false;
            }
            let op = WriteOp::Purge {
                key: key.clone(),
                expected,
            };
            let written = match deadline {
                Some(deadline) => {
                    let named = key.clone();
                    let what = move || format!("key {}: tombstone purge", HexKey(named.to_vec()));
                    self.store.write_by(op, deadline, what).await
                }
                None => self.store.write(op).await,
            };
            match written {
                Ok(outcome) => outcome.changed,
                Err(e) => {
                    tracing::warn!(node = %self.node_id, key = %HexKey(key.to_vec()), error = %e,
                                   "tombstone purge failed; retried by a later GC pass");
                    false
                }
            }
        };
        paced_chunks(entries, None, purge, |_| false).await
    }

    /// Whether this node is among the first `n` replicas of `key` in its current ring, or in
    /// the next one while a transition runs (it is receiving the key's range).
    pub fn replicates(&self, key: &[u8]) -> bool {
        let view = self.membership.view();
        view.replicates(&view.me, key_position(key), self.n)
    }

    /// Merges states (from a peer's push, or fetched by this node's own exchange) into this
    /// node's replicas, a chunk at a time with tranquil pauses, within [`MERGE_DEADLINE`] (and
    /// the peer-write limit) of their arrival at `arrived` (what is not merged by then is
    /// dropped, never applied late: tombstone GC relies on it); a key this node does not
    /// replicate is refused (false), never stored.
    pub async fn merge_pushed(
        &self,
        entries: Vec<(Bytes, Bytes)>,
        arrived: std::time::Instant,
    ) -> Vec<bool> {
        // From arrival, not per write nor from dispatch: a batch merged in paced chunks, or
        // read late from a paused connection, must not land its last states later than the
        // peer-write limit allows (tombstone GC's settle time).
        let within = MERGE_DEADLINE.min(self.store.peer_write_limit());
        let merged: Vec<bool> = self
            .merge_by(entries, arrived + within)
            .await
            .into_iter()
            .map(|m| m == Merge::Merged)
            .collect();
        // The sender may delete what this node answers merged (a released key, a handed-over
        // one): under `sync = none` it is made durable first, or none of it counts as merged.
        if merged.iter().any(|m| *m) {
            if let Err(e) = self.store.make_durable("an anti-entropy push").await {
                tracing::warn!(node = %self.node_id, keys = merged.len(), error = %e,
                               "pushed states merged but not made durable; answered as not merged");
                return vec![false; merged.len()];
            }
        }
        merged
    }

    /// [`merge_pushed`](Self::merge_pushed) by `deadline` (a fetch sets it from when it asked,
    /// not from when the answer came).
    pub async fn merge_by(
        &self,
        entries: Vec<(Bytes, Bytes)>,
        deadline: std::time::Instant,
    ) -> Vec<Merge> {
        // Not while this node does not know the ring (`NoData::NotReady`): its ring may be a
        // stale saved one. (Its own exchanges and transfers wait for the ring, and a push is
        // refused as a whole before: this is the last guard.) Read once: `ready` is latched.
        let ready = self.membership.view().ready;
        // Writes dropped because the deadline passed before they were applied: counted by the
        // store, logged once for the batch below instead of once per key.
        let late = std::sync::atomic::AtomicUsize::new(0);
        let late = &late;
        let merge = |(key, state): (Bytes, Bytes)| async move {
            if !ready || !self.replicates(&key) {
                self.metrics.push_refused.inc();
                return Merge::Refused;
            }
            let state = match KeyState::decode(&state) {
                Ok(s) if !s.is_empty() => s,
                Ok(_) => return Merge::Merged,
                Err(e) => {
                    tracing::warn!(node = %self.node_id, key = %HexKey(key.to_vec()),
                                   error = %e, "anti-entropy state does not decode");
                    return Merge::Refused;
                }
            };
            let write = WriteOp::Merge {
                key: key.clone(),
                state,
            };
            let named = key.clone();
            let what = move || format!("key {}: anti-entropy merge", HexKey(named.to_vec()));
            match self.store.write_by(write, deadline, what).await {
                Ok(_) => Merge::Merged,
                Err(WriteError::DeadlinePassed { .. }) => {
                    late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Merge::Failed
                }
                // Past the state bounds, or a corrupt record here: trying again changes nothing.
                Err(e) if e.refuses_merge_for_good() => {
                    tracing::warn!(node = %self.node_id, key = %HexKey(key.to_vec()), error = %e,
                                   "anti-entropy merge refused");
                    Merge::Refused
                }
                Err(e) => {
                    tracing::warn!(node = %self.node_id, key = %HexKey(key.to_vec()), error = %e,
                                   "anti-entropy merge failed");
                    Merge::Failed
                }
            }
        };
        let outcomes = paced_chunks(entries, None, merge, |_| false).await;
        let late = late.load(std::sync::atomic::Ordering::Relaxed);
        if late > 0 {
            tracing::warn!(node = %self.node_id, late,
                           "anti-entropy states not merged: their deadline passed before they \
                            were applied (a stalled writer or a late batch); not applied late");
        }
        outcomes
    }
}
