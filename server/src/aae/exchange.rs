//! The `anti_entropy` worker: every interval, one exchange with each other replica this node
//! shares ranges with (one peer per step, one exchange at a time), repairing what differs in
//! both directions, at a keys/s budget that yields to foreground CPU use.
//!
//! An exchange with a peer, over all the spans they share (`ranges::shared_spans`):
//! 1. Descent: the top-level cells covering each span's whole leaves, then the children of the
//!    cells whose hashes differ, level by level (one `CellHashes` round trip per level, at most
//!    `MAX_CELLS` cells per request). When more than half the top cells differ (a new or
//!    wiped replica), descent is skipped and the spans are streamed by digests instead.
//! 2. Confirmation: the differing leaves are asked again; a leaf that now matches was a write
//!    in flight, not a difference.
//! 3. Keys: over the positions of the leaves that still differ and of each span's partial edge
//!    leaves, both sides' (key, digest) lists in storage order (`KeyDigests`, paged), merged;
//!    a key only here or different is pushed, a key only there or different is fetched.
//! 4. Repair: `FetchStates` then a local merge; `PushStates` of the local states; batches of
//!    at most `MAX_STATES` keys and `STATES_BATCH_BYTES`, paced by the keys/s and bytes/s
//!    budgets (the tighter one).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_protocol::peer::aae::{MAX_CELLS, MAX_DIGESTS, MAX_STATES, STATES_BATCH_BYTES};
use ringkv_protocol::peer::{AaeRequest, AaeResponse, CellRef};
use ringkv_protocol::ring::key_position;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::service::{AntiEntropy, Merge};
use crate::background::load::{CpuLoad, Rates};
use crate::background::{Progress, Worker, WorkerState, MERGE_DEADLINE};
use crate::membership::layout::LayoutId;
use crate::membership::Membership;
use crate::merkle::{leaf_end, leaf_span, leaf_start, Cell};
use crate::ring::ranges::{clip_spans, covers, push_span, shared_spans, ShownSpans, Span};
use crate::rpc::{PeerPool, Transport};
use crate::storage::hints::partition_span;
use crate::storage::AaeMark;

/// Deadline of one request of an exchange.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The first cycle starts this long after the node (or the interval, if shorter).
pub const FIRST_CYCLE_DELAY: Duration = Duration::from_secs(10);
/// While the data dir is unsynced (new or wiped), cycles start at once and repeat this often
/// (or at the interval, if shorter) until every peer has been synced from.
pub const UNSYNCED_RETRY: Duration = Duration::from_secs(2);
/// An exchange with a peer waits for a hint replay between the two (the replay delivers what
/// the exchange would find, paced to the target's load, where the exchange would repeat it as
/// a burst of digests and states), but at most this long.
pub const MAX_REPLAY_DEFER: Duration = Duration::from_secs(600);
/// Digests compared per second, in multiples of the keys/s budget (before the CPU yield): a
/// digest is read and hashed on each side, not merged and written, as in the tree rebuild
/// (`scan::REBUILD_SPEEDUP`, the same ratio).
pub const DIGEST_SPEEDUP: f64 = super::scan::REBUILD_SPEEDUP;

/// Whether a hint replay runs between this node and a peer (`Handoff::replay_running_with`).
pub type ReplayProbe = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What one exchange found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub spans: usize,
    pub spans_differing: usize,
    pub cells: u64,
    pub keys_compared: u64,
    pub sent: u64,
    pub received: u64,
    /// Bytes of the states pushed (key and state).
    pub bytes_sent: u64,
    /// Bytes of the states fetched (key and state).
    pub bytes_received: u64,
    /// Payload bytes both ways (cells and hashes, digests, states; frame headers not counted).
    pub wire_bytes: u64,
    pub rounds: usize,
}

pub struct AaeWorker<T: Transport = PeerPool> {
    node_id: String,
    aae: Arc<AntiEntropy>,
    membership: Membership,
    transport: Arc<T>,
    interval: Duration,
    rates: Rates,
    cpu: CpuLoad,
    next_cycle: Instant,
    /// Peers left in the current cycle.
    queue: VecDeque<String>,
    cycle_started: Option<Instant>,
    /// The running cycle covers only these positions (`kvctl repair --range`).
    cycle_range: Option<Span>,
    /// The running cycle was asked for (`kvctl repair`, a peer's `RequestCycle`): it does not
    /// wait for hint replays.
    cycle_requested: bool,
    cycle: Outcome,
    detail: String,
    /// Peers unavailable since when (to sync a peer back from a long absence at once).
    down_since: HashMap<String, Instant>,
    /// Peers back from a long absence, exchanged with before the next cycle.
    returned: VecDeque<String>,
    /// A peer unavailable at least this long is exchanged with as soon as it is back (it may
    /// have missed writes no hint delivers: hints off, dropped or expired).
    long_absence: Duration,
    replaying: Option<ReplayProbe>,
    /// Peers whose exchange waits for a hint replay, since when.
    deferred: Vec<(String, Instant)>,
    /// Cancelled when the node shuts down: a paced wait then ends the exchange at once.
    stop: CancellationToken,
}

impl<T: Transport> AaeWorker<T> {
    pub fn new(
        aae: Arc<AntiEntropy>,
        membership: Membership,
        transport: Arc<T>,
        interval: Duration,
        keys_per_sec: u32,
        bytes_per_sec: u64,
        long_absence: Duration,
    ) -> AaeWorker<T> {
        // A new data dir syncs at once; otherwise the first cycle waits a little.
        let next_cycle = if aae.store().unsynced() {
            Instant::now()
        } else {
            Instant::now() + interval.min(FIRST_CYCLE_DELAY)
        };
        AaeWorker {
            node_id: membership.view().me.to_string(),
            aae,
            membership,
            transport,
            interval,
            rates: Rates::new(keys_per_sec, bytes_per_sec),
            cpu: CpuLoad::default(),
            next_cycle,
            queue: VecDeque::new(),
            cycle_started: None,
            cycle_range: None,
            cycle_requested: false,
            cycle: Outcome::default(),
            detail: "first cycle pending".into(),
            down_since: HashMap::new(),
            returned: VecDeque::new(),
            long_absence,
            replaying: None,
            deferred: Vec::new(),
            stop: CancellationToken::new(),
        }
    }

    /// The anti-entropy service this worker exchanges for.
    pub fn service(&self) -> &Arc<AntiEntropy> {
        &self.aae
    }

    /// The token whose cancellation ends this worker's paced waits (the runner's, given to
    /// each step; a `TransferWorker` passes its own on).
    pub fn set_stop(&mut self, stop: &CancellationToken) {
        self.stop = stop.clone();
    }

    /// Exchanges with a peer wait while a hint replay runs between the two.
    pub fn with_replay_probe(mut self, probe: ReplayProbe) -> AaeWorker<T> {
        self.replaying = Some(probe);
        self
    }

    /// Whether the exchange with `peer` waits for a replay (and is then remembered, to run as
    /// soon as the replay ends): not for a new or wiped data dir (it must sync to answer
    /// reads), and not past [`MAX_REPLAY_DEFER`].
    fn defer_for_replay(&mut self, peer: &str) -> bool {
        let Some(probe) = &self.replaying else {
            return false;
        };
        if self.aae.store().unsynced() || !probe(peer) {
            return false;
        }
        let now = Instant::now();
        let since = match self.deferred.iter().find(|(p, _)| p == peer) {
            Some((_, since)) => *since,
            None => {
                self.deferred.push((peer.to_string(), now));
                now
            }
        };
        if now.duration_since(since) >= MAX_REPLAY_DEFER {
            self.deferred.retain(|(p, _)| p != peer);
            return false;
        }
        self.aae.metrics.deferred.inc();
        debug!(node = %self.node_id, %peer, "anti-entropy exchange waits for the hint replay with the peer");
        true
    }

    /// A deferred peer whose replay has ended, to exchange with now.
    fn replay_ended(&mut self) -> Option<String> {
        let probe = self.replaying.as_ref()?;
        let i = self.deferred.iter().position(|(p, _)| !probe(p))?;
        Some(self.deferred.remove(i).0)
    }

    /// Notes which peers are down, and queues those back after at least `long_absence`.
    fn watch_returns(&mut self) {
        let view = self.membership.view();
        let now = Instant::now();
        for peer in view.members.keys().filter(|m| **m != view.me) {
            if !view.is_alive(peer) {
                self.down_since.entry(peer.to_string()).or_insert(now);
            } else if let Some(since) = self.down_since.remove(&**peer) {
                let away = now.duration_since(since);
                if away >= self.long_absence && !self.returned.iter().any(|p| **p == **peer) {
                    info!(node = %self.node_id, %peer, away_s = away.as_secs(),
                          "peer back after a long absence: anti-entropy exchange with it now");
                    self.returned.push_back(peer.to_string());
                }
            }
        }
    }

    /// After a complete exchange with `peer` over `spans`: its marks whose partition lies in
    /// those spans are in sync now and cleared; for marks of ranges this node does not share
    /// with it, the peer is asked to run a cycle of its own (which reaches their replicas),
    /// and they are cleared once it agreed.
    async fn settle_marks(&mut self, peer: &str, addr: &str, spans: &[Span]) {
        // Read now: marks made since the cycle started (or outside any cycle) count too.
        let mine: Vec<AaeMark> = match self.aae.store().aae_mark_rows().await {
            Ok(marks) => marks.into_iter().filter(|m| m.target == peer).collect(),
            Err(e) => {
                warn!(node = %self.node_id, error = %e, "could not read the anti-entropy marks");
                return;
            }
        };
        if mine.is_empty() {
            return;
        }
        let (covered, elsewhere): (Vec<AaeMark>, Vec<AaeMark>) = mine.into_iter().partition(|m| {
            let (first, last) = partition_span(m.partition);
            covers(spans, first, last)
        });
        let mut clear = covered;
        if !elsewhere.is_empty() {
            match self.call(addr, AaeRequest::RequestCycle).await {
                Ok(AaeResponse::Merged(started)) if started.first() == Some(&true) => {
                    clear.extend(elsewhere)
                }
                Ok(_) => warn!(node = %self.node_id, %peer, marks = elsewhere.len(),
                               "peer runs no anti-entropy: its marked ranges wait for their replicas' cycles"),
                Err(cause) => {
                    warn!(node = %self.node_id, %peer, %cause, "could not ask the peer for a cycle; marks kept")
                }
            }
        }
        let cleared = self.clear_marks(&clear).await;
        if cleared > 0 {
            info!(node = %self.node_id, %peer, cleared, "ranges marked by dropped hints are in sync");
        }
    }

    /// Clears `marks` (each only if unchanged), counted in `marks_cleared`; how many it cleared.
    async fn clear_marks(&self, marks: &[AaeMark]) -> u64 {
        let mut cleared = 0;
        for mark in marks {
            match self.aae.store().clear_mark(mark).await {
                Ok(true) => cleared += 1,
                Ok(false) => {}
                Err(e) => warn!(node = %self.node_id, target = %mark.target, error = %e,
                                "could not clear an anti-entropy mark"),
            }
        }
        self.aae.metrics.marks_cleared.inc_by(cleared);
        cleared
    }

    fn count_exchange(&mut self, o: &Outcome) {
        let m = &self.aae.metrics;
        m.exchanges.inc();
        m.cells_compared.inc_by(o.cells);
        m.keys_compared.inc_by(o.keys_compared);
        m.keys_sent.inc_by(o.sent);
        m.keys_received.inc_by(o.received);
        m.bytes_sent.inc_by(o.bytes_sent);
        m.bytes_received.inc_by(o.bytes_received);
        m.exchange_bytes.inc_by(o.wire_bytes);
        let c = &mut self.cycle;
        c.spans += o.spans;
        c.spans_differing += o.spans_differing;
        c.sent += o.sent;
        c.received += o.received;
    }

    /// One exchange with `peer` over every span both replicate, counted.
    async fn exchange_step(&mut self, peer: String) {
        let view = self.membership.view();
        let spans = shared_spans(&view.ring, &view.me, self.aae.n());
        let (Some(addr), Some(spans)) = (
            view.peer_addr(&peer).map(str::to_string),
            spans.get(peer.as_str()),
        ) else {
            return;
        };
        if !view.is_alive(&peer) {
            return;
        }
        if !self.cycle_requested && self.defer_for_replay(&peer) {
            return;
        }
        // Only the trusted part of the tree takes part while it is being rebuilt, and only
        // the requested range in a cycle asked for one.
        let clipped = clip_spans(
            spans,
            self.cycle_started.and(self.cycle_range),
            self.aae.untrusted_from(),
        );
        let whole = clipped.is_none();
        let spans: Vec<Span> = clipped.unwrap_or_else(|| spans.clone());
        if spans.is_empty() {
            return;
        }
        let started = Instant::now();
        match self.exchange(&addr, &spans).await {
            Ok(o) if !whole => {
                self.count_exchange(&o);
                info!(node = %self.node_id, %peer, spans = spans.len(), sent = o.sent, received = o.received,
                      "anti-entropy exchange over part of the ring (a requested range, or the trusted part of a tree being rebuilt)");
            }
            Ok(o) => {
                self.aae.exchange_done(&peer);
                self.aae.check_synced();
                self.count_exchange(&o);
                if o.sent + o.received > 0 {
                    info!(node = %self.node_id, %peer, spans = o.spans, differing = o.spans_differing,
                          sent = o.sent, received = o.received, cells = o.cells, rounds = o.rounds,
                          keys_compared = o.keys_compared, wire_bytes = o.wire_bytes,
                          ms = started.elapsed().as_millis() as u64, "anti-entropy exchange repaired keys");
                } else {
                    debug!(node = %self.node_id, %peer, cells = o.cells, "anti-entropy exchange: in sync");
                }
                self.settle_marks(&peer, &addr, &spans).await;
            }
            Err(cause) => {
                if self.stop.is_cancelled() {
                    // Cut short by shutdown: not a failure.
                    return;
                }
                self.aae.metrics.exchange_errors.inc();
                warn!(node = %self.node_id, %peer, spans = %ShownSpans(&spans), %cause,
                      "anti-entropy exchange failed; retried next cycle");
            }
        }
    }

    async fn call(&self, addr: &str, req: AaeRequest) -> Result<AaeResponse, String> {
        super::call(&self.transport, addr, req).await
    }

    /// The peer's hashes of `cells`, in order (chunked by `MAX_CELLS`).
    async fn remote_hashes(&self, addr: &str, cells: &[Cell]) -> Result<Vec<u64>, String> {
        let mut out = Vec::with_capacity(cells.len());
        for chunk in cells.chunks(MAX_CELLS) {
            let refs = chunk
                .iter()
                .map(|c| CellRef {
                    level: c.level,
                    first: c.first,
                    last: c.last,
                })
                .collect();
            match self
                .call(addr, AaeRequest::CellHashes { cells: refs })
                .await?
            {
                AaeResponse::Hashes(h) if h.len() == chunk.len() => out.extend(h),
                other => return Err(format!("unexpected answer to cell hashes: {other:?}")),
            }
        }
        Ok(out)
    }

    fn local_hashes(&self, cells: &[Cell]) -> Vec<u64> {
        let tree = self.aae.tree().read().expect("tree lock poisoned");
        cells.iter().map(|c| tree.cell_hash(c)).collect()
    }

    /// One round trip: the cells whose hashes differ between the peer and this node.
    async fn differing(
        &self,
        addr: &str,
        cells: &[Cell],
        out: &mut Outcome,
    ) -> Result<Vec<Cell>, String> {
        out.rounds += 1;
        out.cells += cells.len() as u64;
        let theirs = self.remote_hashes(addr, cells).await?;
        out.wire_bytes += 17 * cells.len() as u64;
        let mine = self.local_hashes(cells);
        Ok(cells
            .iter()
            .zip(theirs.iter().zip(&mine))
            .filter(|(_, (t, m))| t != m)
            .map(|(c, _)| *c)
            .collect())
    }

    /// One exchange with `peer` over `spans`.
    pub async fn exchange(&mut self, addr: &str, spans: &[Span]) -> Result<Outcome, String> {
        // What is pushed or merged must still be a replica's under the layout the exchange
        // compared with: checked before each push and merge (`same_layout`).
        let layout = self.membership.view().layout_id();
        let mut out = Outcome {
            spans: spans.len(),
            ..Outcome::default()
        };
        // Position ranges to compare key by key: each span's partial edge leaves, then the
        // leaves that differ.
        let mut ranges: Vec<Span> = Vec::new();
        let mut frontier: Vec<Cell> = Vec::new();
        for &(first, last) in spans {
            let s = leaf_span(first, last);
            for leaf in s.partial {
                ranges.push((first.max(leaf_start(leaf)), last.min(leaf_end(leaf))));
            }
            if let Some((lo, hi)) = s.whole {
                frontier.extend(Cell::top(lo, hi));
            }
        }
        let mut leaves: Vec<Cell> = Vec::new();
        let mut top = true;
        while !frontier.is_empty() {
            let differ = self.differing(addr, &frontier, &mut out).await?;
            if top && differ.len() * 2 > frontier.len() && frontier.len() >= 4 {
                // Most of it differs: stream the differing cells' keys instead of descending.
                debug!(node = %self.node_id, peer = addr, cells = differ.len(), "streaming instead of descending");
                for c in &differ {
                    ranges.push((leaf_start(c.first), leaf_end(c.last)));
                }
                break;
            }
            top = false;
            frontier = Vec::new();
            for c in differ {
                if c.level == 0 {
                    leaves.push(c);
                } else {
                    frontier.extend(c.children());
                }
            }
        }
        if !leaves.is_empty() {
            // Ask again: a leaf that matches now was a write in flight.
            for c in self.differing(addr, &leaves, &mut out).await? {
                ranges.push((leaf_start(c.first), leaf_end(c.last)));
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<Span> = Vec::new();
        for r in ranges {
            push_span(&mut merged, r);
        }
        let mut differing_spans = vec![false; spans.len()];
        for &(first, last) in &merged {
            let (compared, digest_bytes, push, fetch) =
                self.compare_keys(addr, first, last).await?;
            out.keys_compared += compared;
            out.wire_bytes += digest_bytes;
            if !push.is_empty() || !fetch.is_empty() {
                for (i, &(a, b)) in spans.iter().enumerate() {
                    if a <= last && first <= b {
                        differing_spans[i] = true;
                    }
                }
            }
            self.same_layout(layout)?;
            let (sent, bytes) = self.push(addr, push).await?;
            out.sent += sent;
            out.bytes_sent += bytes;
            let (received, state_bytes, fetched_bytes) = self.fetch(addr, fetch, layout).await?;
            out.received += received;
            out.bytes_received += state_bytes;
            out.wire_bytes += bytes + fetched_bytes;
        }
        out.spans_differing = differing_spans.iter().filter(|d| **d).count();
        Ok(out)
    }

    /// Both sides' (key, digest) over `first..=last`, merged in storage order: the number of
    /// keys compared, the digest bytes received, the keys to push (only here, or different),
    /// the keys to fetch (only there, or different).
    /// Digests are read and compared at `DIGEST_SPEEDUP` times the keys/s budget, scaled by
    /// the CPU yield (`repay` after each page, for the digests both sides read): a comparison
    /// streaming a whole range (most of it differs) is a scan of both nodes' data and was read
    /// page after page without pause (found in review); the few keys of an in-sync exchange's
    /// edge leaves owe next to nothing.
    async fn compare_keys(
        &mut self,
        addr: &str,
        first: u64,
        last: u64,
    ) -> Result<(u64, u64, Vec<Bytes>, Vec<Bytes>), String> {
        let mut mine = Pager::new();
        let mut theirs = Pager::new();
        let (mut compared, mut push, mut fetch) = (0u64, Vec::new(), Vec::new());
        let mut wire = 0u64;
        loop {
            let mut read = 0;
            if mine.buf.is_empty() && mine.more {
                let (entries, more) = self
                    .aae
                    .store()
                    .scan_digests(first, last, &mine.after, MAX_DIGESTS)
                    .await
                    .map_err(|e| format!("local digests {first:016x}..={last:016x}: {e}"))?;
                read += entries.len();
                mine.take(entries, more);
            }
            if theirs.buf.is_empty() && theirs.more {
                let req = AaeRequest::KeyDigests {
                    first,
                    last,
                    after: theirs.after.clone(),
                    limit: MAX_DIGESTS as u32,
                };
                match self.call(addr, req).await? {
                    AaeResponse::Digests { entries, more } => {
                        wire += 21 + theirs.after.len() as u64;
                        wire += entries
                            .iter()
                            .map(|(k, _)| 12 + k.len() as u64)
                            .sum::<u64>();
                        read += entries.len();
                        theirs.take(entries, more)
                    }
                    other => return Err(format!("unexpected answer to digests: {other:?}")),
                }
            }
            if read > 0 {
                // At a pace of DIGEST_SPEEDUP: that many times the keys budget.
                let owed = self.rates.pause(read, 0, DIGEST_SPEEDUP);
                self.cpu.repay(owed, &self.stop).await?;
            }
            let order = match (mine.buf.front(), theirs.buf.front()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((a, _)), Some((b, _))) => {
                    (key_position(a), a.as_ref()).cmp(&(key_position(b), b.as_ref()))
                }
            };
            compared += 1;
            match order {
                std::cmp::Ordering::Less => {
                    let (k, _) = mine.buf.pop_front().expect("front exists");
                    push.push(k);
                }
                std::cmp::Ordering::Greater => {
                    let (k, _) = theirs.buf.pop_front().expect("front exists");
                    fetch.push(k);
                }
                std::cmp::Ordering::Equal => {
                    let (k, a) = mine.buf.pop_front().expect("front exists");
                    let (_, b) = theirs.buf.pop_front().expect("front exists");
                    if a != b {
                        push.push(k.clone());
                        fetch.push(k);
                    }
                }
            }
        }
        Ok((compared, wire, push, fetch))
    }

    /// Waits as long as `keys` keys and `bytes` bytes of repair take at the budgets (the
    /// tighter of the two), scaled down by the CPU yield as the wait goes (`repay`). Found in
    /// review: each wait was cut at 10 s, so a small budget or a busy machine let batches of
    /// 256 keys through at up to 25.6 keys/s whatever the budget said.
    async fn pace(&mut self, keys: usize, bytes: u64) -> Result<(), String> {
        let owed = self.rates.pause(keys, bytes, 1.0);
        self.cpu.repay(owed, &self.stop).await
    }

    /// Pushes this node's states of `keys`: (keys the peer merged, bytes sent).
    async fn push(&mut self, addr: &str, keys: Vec<Bytes>) -> Result<(u64, u64), String> {
        let (mut sent, mut bytes) = (0u64, 0u64);
        let mut batch: Vec<(Bytes, Bytes)> = Vec::new();
        let mut size = 0;
        let mut keys = keys.into_iter().peekable();
        while keys.peek().is_some() || !batch.is_empty() {
            if let Some(key) = keys.next() {
                let state = self
                    .aae
                    .store()
                    .read_stored(&key)
                    .await
                    .map_err(|e| format!("reading a state to push: {e}"))?;
                if let Some(state) = state {
                    size += key.len() + state.len();
                    batch.push((key, Bytes::from(state)));
                }
                if batch.len() < MAX_STATES && size < STATES_BATCH_BYTES && keys.peek().is_some() {
                    continue;
                }
            }
            if batch.is_empty() {
                break;
            }
            let n = batch.len();
            let entries = std::mem::take(&mut batch);
            match super::push(&self.transport, addr, entries, self.aae.store()).await? {
                AaeResponse::Merged(m) if m.len() == n => {
                    sent += m.iter().filter(|x| **x).count() as u64;
                }
                other => return Err(format!("unexpected answer to a push: {other:?}")),
            }
            bytes += size as u64;
            self.pace(n, size as u64).await?;
            size = 0;
        }
        Ok((sent, bytes))
    }

    /// Fetches the peer's states of `keys` and merges them here: (keys merged, bytes of the
    /// states that came (key and state, as `push` counts), payload bytes both ways).
    /// States older than the peer-write limit (half tombstone GC's settle time: the peer read
    /// them at the latest when it answered, at the earliest when this node asked) or fetched
    /// under a layout that has changed since are not merged: the exchange fails and runs again
    /// next cycle. A fetch that hung (the peer paused, say) would otherwise apply states read
    /// before a delete whose tombstone was purged meanwhile.
    async fn fetch(
        &mut self,
        addr: &str,
        keys: Vec<Bytes>,
        layout: LayoutId,
    ) -> Result<(u64, u64, u64), String> {
        let (mut received, mut state_bytes, mut bytes) = (0, 0u64, 0u64);
        let mut failed = 0;
        let limit = self.aae.store().peer_write_limit();
        for chunk in keys.chunks(MAX_STATES) {
            let asked = Instant::now();
            let states = match self
                .call(
                    addr,
                    AaeRequest::FetchStates {
                        keys: chunk.to_vec(),
                    },
                )
                .await?
            {
                AaeResponse::States(s) if s.len() == chunk.len() => s,
                other => return Err(format!("unexpected answer to a fetch: {other:?}")),
            };
            let fetched = chunk.iter().map(|k| 4 + k.len() as u64).sum::<u64>()
                + states.iter().map(|s| 4 + s.len() as u64).sum::<u64>();
            bytes += fetched;
            state_bytes += super::states_bytes(chunk, &states);
            let entries: Vec<(Bytes, Bytes)> = chunk
                .iter()
                .cloned()
                .zip(states)
                .filter(|(_, s)| !s.is_empty())
                .collect();
            let took = asked.elapsed();
            if took >= limit {
                return Err(format!(
                    "states fetched from {addr} came back after {} ms, later than the {} ms a \
                     peer's state may take to land here (half the tombstone settle time); not \
                     merged",
                    took.as_millis(),
                    limit.as_millis()
                ));
            }
            self.same_layout(layout)?;
            let deadline = (asked + limit).min(Instant::now() + MERGE_DEADLINE);
            let merged = self.aae.merge_by(entries, deadline).await;
            received += merged.iter().filter(|m| **m == Merge::Merged).count() as u64;
            // A state not merged for a passing cause (the writer full or late, storage) leaves
            // the key unsynced here: the exchange fails (after the other chunks), so a transfer
            // does not checkpoint past it and an unsynced node does not count the peer synced.
            failed += merged.iter().filter(|m| **m == Merge::Failed).count();
            self.pace(chunk.len(), fetched).await?;
        }
        if failed > 0 {
            return Err(format!(
                "{failed} of {} states fetched from {addr} failed to merge here (causes logged \
                 per key, late ones once per batch); retried",
                keys.len()
            ));
        }
        Ok((received, state_bytes, bytes))
    }

    /// Err if the layout changed since `at_start` (the exchange then stops; its next run
    /// compares again under the new one).
    fn same_layout(&self, at_start: LayoutId) -> Result<(), String> {
        let now = self.membership.view().layout_id();
        if now == at_start {
            Ok(())
        } else {
            Err(format!(
                "the layout changed during the exchange (v{} to v{}); nothing more pushed or \
                 merged",
                at_start.version, now.version
            ))
        }
    }

    async fn start_cycle(&mut self) {
        // Marks (dropped hints): their targets go first (`settle_marks` clears them).
        let marks = match self.aae.store().aae_mark_rows().await {
            Ok(marks) => marks,
            Err(e) => {
                warn!(node = %self.node_id, error = %e, "could not read the anti-entropy marks");
                Vec::new()
            }
        };
        // Marks for a node taken out of the ring: it replicates nothing any more, and the
        // owners of its ranges pulled them from every live replica; nothing is left to sync
        // with it (before, such marks stayed forever and aged the oldest-mark gauge).
        let view = self.membership.view();
        let (gone, marks): (Vec<AaeMark>, Vec<AaeMark>) =
            marks.into_iter().partition(|m| view.taken_out(&m.target));
        let cleared = self.clear_marks(&gone).await;
        if cleared > 0 {
            info!(node = %self.node_id, cleared, "anti-entropy marks of nodes taken out of the ring cleared");
        }
        let m = &self.aae.metrics;
        m.marked_partitions.set(marks.len() as u64);
        let oldest = marks.iter().map(|m| m.marked_ms).min();
        m.oldest_mark_age_seconds
            .set(oldest.map_or(0, |ms| crate::clock::now_ms().saturating_sub(ms) / 1000));
        let spans = shared_spans(&view.ring, &view.me, self.aae.n());
        let mut queue: Vec<String> = spans
            .keys()
            .filter(|p| view.is_alive(p))
            .map(|p| p.to_string())
            .collect();
        // Peers with marked ranges (writes they missed beyond their hints) first.
        queue.sort_by_key(|p| !marks.iter().any(|m| m.target == *p));
        self.queue = queue.into();
        self.cycle_started = Some(Instant::now());
        self.cycle = Outcome::default();
        self.aae.set_running(true);
    }

    fn finish_cycle(&mut self) {
        let m = &self.aae.metrics;
        self.aae.set_running(false);
        self.cycle_range = None;
        self.cycle_requested = false;
        if let Some(started) = self.cycle_started.take() {
            m.cycles.inc();
            m.last_cycle_seconds.set(started.elapsed().as_secs());
        }
        m.spans_in_sync
            .set((self.cycle.spans - self.cycle.spans_differing) as u64);
        m.spans_out_of_sync.set(self.cycle.spans_differing as u64);
        self.detail = format!(
            "last cycle: {} spans, {} differed, {} keys sent, {} received; next in {} s{}",
            self.cycle.spans,
            self.cycle.spans_differing,
            self.cycle.sent,
            self.cycle.received,
            self.interval.as_secs(),
            if self.aae.store().unsynced() {
                " (data dir new: not answering reads until synced from every replica)"
            } else {
                ""
            }
        );
        let wait = if self.aae.check_synced() {
            UNSYNCED_RETRY.min(self.interval)
        } else {
            self.interval
        };
        self.next_cycle = Instant::now() + wait;
    }
}

/// One side's digests of a span, page by page.
struct Pager {
    buf: VecDeque<(Bytes, u64)>,
    after: Bytes,
    more: bool,
}

impl Pager {
    fn new() -> Pager {
        Pager {
            buf: VecDeque::new(),
            after: Bytes::new(),
            more: true,
        }
    }

    fn take(&mut self, entries: Vec<(Bytes, u64)>, more: bool) {
        if let Some((k, _)) = entries.last() {
            self.after = k.clone();
        }
        self.more = more && !entries.is_empty();
        self.buf.extend(entries);
    }
}

impl<T: Transport> Worker for AaeWorker<T> {
    fn name(&self) -> String {
        "anti_entropy".into()
    }

    fn progress(&self) -> Progress {
        Progress {
            detail: if self.cycle_started.is_some() {
                format!("cycle running: {} peers left", self.queue.len())
            } else {
                self.detail.clone()
            },
            queue: Some(self.queue.len() as u64),
        }
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<WorkerState, String> {
        self.set_stop(stop);
        self.watch_returns();
        // Before the node knows the ring nothing is exchanged (it takes no data then,
        // `NoData::NotReady`: every fetched state would be refused and the exchange still
        // counted done; found in review); requests and returns stay pending.
        if !self.membership.view().ready {
            return Ok(WorkerState::Idle);
        }
        if self.cycle_started.is_none() {
            if let Some(peer) = self.replay_ended() {
                self.exchange_step(peer).await;
                return Ok(WorkerState::Busy);
            }
            if let Some(peer) = self.returned.pop_front() {
                self.aae.metrics.return_syncs.inc();
                self.exchange_step(peer).await;
                return Ok(WorkerState::Busy);
            }
            let interval_due = Instant::now() >= self.next_cycle;
            let requested = self.aae.take_request();
            self.cycle_requested = requested.is_some();
            self.cycle_range = match (interval_due, requested) {
                (false, None) => return Ok(WorkerState::Idle),
                (true, _) => None,
                (false, Some(range)) => range,
            };
            self.start_cycle().await;
        }
        let Some(peer) = self.queue.pop_front() else {
            self.finish_cycle();
            return Ok(WorkerState::Idle);
        };
        self.exchange_step(peer).await;
        Ok(WorkerState::Busy)
    }

    async fn wait_for_work(&mut self) -> WorkerState {
        let wait = self
            .next_cycle
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        tokio::time::sleep(wait).await;
        WorkerState::Busy
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::sync::RwLock;

    use ringkv_protocol::peer::{PeerRequest, PeerResponse};

    use super::*;
    use crate::merkle::Tree;
    use crate::rpc::PeerError;
    use crate::storage::memory::MemoryEngine;
    use crate::testkit::{open_store_syncing, view};
    use crate::version::{Dot, KeyState, VersionVector};

    /// A peer that answers every fetch with the same state for each key asked, merges every
    /// push, and records each call's timeout.
    struct Source(Bytes, std::sync::Mutex<Vec<Duration>>);

    impl Transport for Source {
        fn call(
            self: Arc<Self>,
            _addr: String,
            req: PeerRequest,
            timeout: Duration,
        ) -> impl std::future::Future<Output = Result<PeerResponse, PeerError>> + Send + 'static
        {
            self.1.lock().unwrap().push(timeout);
            let reply = match req {
                PeerRequest::Aae(AaeRequest::FetchStates { keys }) => {
                    PeerResponse::Aae(AaeResponse::States(vec![self.0.clone(); keys.len()]))
                }
                PeerRequest::Aae(AaeRequest::PushStates { entries }) => {
                    PeerResponse::Aae(AaeResponse::Merged(vec![true; entries.len()]))
                }
                other => panic!("unexpected {other:?}"),
            };
            std::future::ready(Ok(reply))
        }
    }

    type NodeA = (
        Arc<MemoryEngine>,
        Arc<crate::storage::Store>,
        Membership,
        Arc<AntiEntropy>,
    );

    /// Node "a" of `v`: its memory engine, store, membership and anti-entropy service.
    fn node_a(v: crate::membership::ClusterView) -> NodeA {
        node_a_syncing(v, crate::storage::store::SyncMode::Group)
    }

    /// `node_a` with the sync mode `sync`.
    fn node_a_syncing(
        v: crate::membership::ClusterView,
        sync: crate::storage::store::SyncMode,
    ) -> NodeA {
        let engine = Arc::new(MemoryEngine::new());
        let store = open_store_syncing(engine.clone(), "a", sync);
        // The view stays as given: nothing sends another (as in the coordinator's harness).
        let (membership, _) = crate::membership::Membership::fixed(v);
        let aae = Arc::new(AntiEntropy::new(
            "a".into(),
            store.clone(),
            Arc::new(RwLock::new(Tree::new())),
            Arc::new(AtomicU32::new(crate::merkle::LEAVES as u32)),
            membership.clone(),
            3,
            true,
        ));
        (engine, store, membership, aae)
    }

    /// One encoded state: a sibling of actor 7.
    fn one_state() -> Bytes {
        let state = KeyState::new().update(
            &VersionVector::new(),
            Dot {
                actor: 7,
                counter: 1,
            },
            5,
            Some(Bytes::from_static(b"v")),
        );
        Bytes::from(state.encode())
    }

    /// Found in review: a fetched state the writer refused (full queue, late, storage error)
    /// was counted as not received, yet the exchange succeeded: a transfer checkpointed past
    /// the key and a node with a new data dir could be marked synced without it.
    #[tokio::test]
    async fn an_exchange_fails_on_unmerged_fetches_and_bounds_its_pushes() {
        let v = view(&["a", "b", "c"], "a", &["a", "b", "c"]);
        let layout = v.layout_id();
        let (engine, store, membership, aae) = node_a(v);
        let source = Arc::new(Source(one_state(), Default::default()));
        let mut worker = AaeWorker::new(
            aae,
            membership,
            source,
            Duration::from_secs(60),
            1_000_000,
            1 << 40,
            Duration::from_secs(60),
        );
        let key = Bytes::from_static(b"k");
        engine.set_fail_writes(true);
        let failed = worker.fetch("b.peer:1", vec![key.clone()], layout).await;
        let e = failed.expect_err("a state not merged is not synced");
        assert!(e.contains("failed to merge"), "{e}");
        engine.set_fail_writes(false);
        let (received, ..) = worker
            .fetch("b.peer:1", vec![key.clone()], layout)
            .await
            .expect("merged once the writer can write");
        assert_eq!(received, 1);
        assert!(store.read_stored(&key).await.unwrap().is_some());

        // Found in review: a push of states read now could be sent up to the 30 s call timeout
        // later, and the peer then applies it within half the settle time of its arrival: past
        // the settle time. Pushes are bounded by the peer-write limit.
        store.limit_peer_writes(Duration::from_secs(2));
        let source = worker.transport.clone();
        source.1.lock().unwrap().clear();
        let (pushed, _) = worker.push("b.peer:1", vec![key]).await.unwrap();
        assert_eq!(pushed, 1);
        assert_eq!(*source.1.lock().unwrap(), vec![Duration::from_secs(2)]);
    }

    /// A peer holding `pages` full pages of digests (keys no one else has), each answered
    /// after `delay`.
    struct Digests {
        pages: u32,
        delay: Duration,
        served: std::sync::Mutex<u32>,
    }

    impl Transport for Digests {
        fn call(
            self: Arc<Self>,
            _addr: String,
            req: PeerRequest,
            _timeout: Duration,
        ) -> impl std::future::Future<Output = Result<PeerResponse, PeerError>> + Send + 'static
        {
            let PeerRequest::Aae(AaeRequest::KeyDigests { limit, .. }) = req else {
                panic!("unexpected {req:?}");
            };
            let page = {
                let mut served = self.served.lock().unwrap();
                *served += 1;
                *served
            };
            let entries: Vec<(Bytes, u64)> = (0..limit)
                .map(|i| (Bytes::from(format!("p{page:02}k{i:05}")), u64::from(i)))
                .collect();
            let more = page < self.pages;
            let delay = self.delay;
            async move {
                tokio::time::sleep(delay).await;
                Ok(PeerResponse::Aae(AaeResponse::Digests { entries, more }))
            }
        }
    }

    /// Found in review: comparing digests key by key (a range most of which differs, streamed
    /// instead of descended) read page after page here and on the peer without any pause,
    /// whatever the CPU use: a full scan of both nodes' data outside every budget. The
    /// digests read are now paced at `DIGEST_SPEEDUP` times the keys budget, with the yield.
    #[tokio::test]
    async fn comparing_digests_is_paced_by_the_digests_read() {
        let v = view(&["a", "b"], "a", &["a", "b"]);
        let (_engine, _store, membership, aae) = node_a(v);
        let peer = Arc::new(Digests {
            pages: 2,
            delay: Duration::ZERO,
            served: Default::default(),
        });
        let mut worker = AaeWorker::new(
            aae,
            membership,
            peer.clone(),
            Duration::from_secs(60),
            10_000,
            1 << 40,
            Duration::from_secs(60),
        );
        let started = Instant::now();
        let (compared, _, push, fetch) =
            worker.compare_keys("b.peer:1", 0, u64::MAX).await.unwrap();
        assert_eq!(compared, 2 * MAX_DIGESTS as u64);
        assert!(push.is_empty());
        assert_eq!(fetch.len(), 2 * MAX_DIGESTS);
        assert_eq!(*peer.served.lock().unwrap(), 2);
        // 8 192 digests at 10 times 10 000 keys/s: 82 ms at the whole budget, more while the
        // CPUs are busy (a fresh reading starts at the floor and rises).
        let owed = Duration::from_secs_f64(8_192.0 / (10_000.0 * DIGEST_SPEEDUP));
        assert!(
            started.elapsed() >= owed,
            "{:?} for two pages, {owed:?} owed",
            started.elapsed()
        );
    }

    /// Each paced wait of an exchange is taken whole, through `repay` (found in review: it was
    /// cut at 10 s, so with a small budget or a busy machine batches of 256 keys went
    /// through at up to 25.6 keys/s whatever the budget said; `repay`'s own test covers the
    /// whole wait, which a test here could only show by waiting over 10 s); shutdown ends a
    /// wait at once, as an error that stops the exchange.
    #[tokio::test]
    async fn an_exchange_waits_out_its_pace_until_shutdown() {
        let v = view(&["a", "b"], "a", &["a", "b"]);
        let (_engine, _store, membership, aae) = node_a(v);
        let mut worker = AaeWorker::new(
            aae,
            membership,
            Arc::new(Source(one_state(), Default::default())),
            Duration::from_secs(60),
            1_000,
            1 << 40,
            Duration::from_secs(60),
        );
        let started = Instant::now();
        worker.pace(100, 0).await.unwrap();
        // 100 keys at 1 000 keys/s: 100 ms at the whole budget, longer while the CPUs are busy.
        assert!(started.elapsed() >= Duration::from_millis(100));
        let stop = CancellationToken::new();
        worker.set_stop(&stop);
        stop.cancel();
        let cut = worker.pace(1_000_000, 0).await;
        assert_eq!(cut, Err(crate::background::STOPPED.to_string()));
    }

    /// Found in review: a pushed batch was merged in paced chunks, each write bounded by the
    /// peer-write limit from its own submission: with a slow writer, later chunks landed
    /// long after the batch arrived, past what tombstone GC's settle time allows. The limit
    /// counts from the batch's arrival.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pushed_batch_lands_within_the_peer_write_limit_of_its_arrival() {
        let v = view(&["a"], "a", &["a"]);
        let (engine, store, _membership, aae) = node_a(v);
        store.limit_peer_writes(Duration::from_millis(100));
        let encoded = one_state();
        let entries: Vec<(Bytes, Bytes)> = (0..64)
            .map(|i| (Bytes::from(format!("k{i:02}")), encoded.clone()))
            .collect();
        // The writer is stuck for 300 ms (a slow disk) as the batch arrives.
        let held = engine.clone();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let _gate = held.hold_writes();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        locked_rx.recv().unwrap();
        let merged = aae.merge_pushed(entries, std::time::Instant::now()).await;
        holder.join().unwrap();
        assert_eq!(merged.len(), 64);
        // The first chunk went to the writer before the limit ran out (it may land with the
        // slow write); every later one is dropped unapplied.
        for (i, ok) in merged.iter().enumerate().skip(32) {
            assert!(!ok, "k{i:02} merged after the limit");
            let key = format!("k{i:02}");
            assert!(
                store.read_stored(key.as_bytes()).await.unwrap().is_none(),
                "{key}"
            );
        }
    }

    /// Found in review: a push's merge deadline was counted from when its handler ran, not
    /// from when its frame arrived, so a push read late (a paused connection, a stalled
    /// process: `net` dates such frames back to their arrival) got the whole peer-write limit
    /// again and could land after the tombstone settle time.
    #[tokio::test]
    async fn a_push_that_waited_past_the_peer_write_limit_since_its_arrival_merges_nothing() {
        let v = view(&["a"], "a", &["a"]);
        let (_engine, store, _membership, aae) = node_a(v);
        store.limit_peer_writes(Duration::from_millis(100));
        let entries = vec![(Bytes::from_static(b"late"), one_state())];
        let arrived = std::time::Instant::now() - Duration::from_millis(150);
        let PeerResponse::Aae(AaeResponse::Merged(merged)) =
            aae.serve(AaeRequest::PushStates { entries }, arrived).await
        else {
            panic!("a push is answered with its merges")
        };
        assert_eq!(merged, vec![false]);
        assert!(store.read_stored(b"late").await.unwrap().is_none());
        // The same push, just arrived: merged.
        let entries = vec![(Bytes::from_static(b"late"), one_state())];
        assert_eq!(
            aae.merge_pushed(entries, std::time::Instant::now()).await,
            vec![true]
        );
    }

    /// A peer's background request (here a digest page) is answered at once at a whole pace,
    /// and held back by this node's pace when it is busy: the peer's exchange, transfer or
    /// hand-over slows to what this node can spare, not only to its own load. GC checks are
    /// never held back. (Counted, not timed.)
    #[tokio::test]
    async fn answers_to_peers_background_requests_wait_out_this_nodes_pace() {
        let v = view(&["a"], "a", &["a"]);
        let (_engine, _store, _membership, aae) = node_a(v);
        let digests = || AaeRequest::KeyDigests {
            first: 0,
            last: u64::MAX,
            after: Bytes::new(),
            limit: 16,
        };
        aae.set_serve_pace(1.0);
        let r = aae.serve(digests(), std::time::Instant::now()).await;
        assert!(
            matches!(r, PeerResponse::Aae(AaeResponse::Digests { .. })),
            "{r:?}"
        );
        assert_eq!(aae.metrics.serve_rests.get(), 0);

        aae.set_serve_pace(crate::background::load::FLOOR);
        let r = aae.serve(digests(), std::time::Instant::now()).await;
        assert!(
            matches!(r, PeerResponse::Aae(AaeResponse::Digests { .. })),
            "{r:?}"
        );
        assert_eq!(aae.metrics.serve_rests.get(), 1);

        // Tombstone GC's check is answered at once at any pace.
        let check = AaeRequest::TombstoneCheck {
            entries: vec![(Bytes::from_static(b"k"), one_state())],
        };
        let r = aae.serve(check, std::time::Instant::now()).await;
        assert!(
            matches!(r, PeerResponse::Aae(AaeResponse::TombstoneStatus(_))),
            "{r:?}"
        );
        assert_eq!(aae.metrics.serve_rests.get(), 1);
    }

    /// A push's answer is held back at most a quarter of the peer-write limit from its
    /// arrival (its caller gives up at the limit): one that arrived that long ago is answered
    /// at once however busy this node is.
    #[tokio::test]
    async fn a_pushs_answer_is_held_back_within_its_callers_limit() {
        let v = view(&["a"], "a", &["a"]);
        let (_engine, store, _membership, aae) = node_a(v);
        store.limit_peer_writes(Duration::from_millis(400));
        aae.set_serve_pace(crate::background::load::FLOOR);
        let entries = vec![(Bytes::from_static(b"k"), one_state())];
        let arrived = std::time::Instant::now() - Duration::from_millis(100);
        let r = aae.serve(AaeRequest::PushStates { entries }, arrived).await;
        assert_eq!(r, PeerResponse::Aae(AaeResponse::Merged(vec![true])));
        assert_eq!(aae.metrics.serve_rests.get(), 0);
    }

    /// Found in review: a peer's tombstone purge carried no deadline, so one served after its
    /// sender had given up (queued behind a slow writer, read late from a paused connection)
    /// was still applied. It is now dropped once the limit a pushed state has is up.
    #[tokio::test]
    async fn a_peers_purge_served_after_its_deadline_is_never_applied() {
        let v = view(&["a"], "a", &["a"]);
        let (_engine, store, _membership, aae) = node_a(v);
        store.limit_peer_writes(Duration::from_millis(400));
        let key = Bytes::from_static(b"k");
        let tombstone = Bytes::from(
            KeyState::new()
                .update(
                    &VersionVector::new(),
                    Dot {
                        actor: 7,
                        counter: 1,
                    },
                    5,
                    None,
                )
                .encode(),
        );
        let merged = aae
            .merge_pushed(
                vec![(key.clone(), tombstone.clone())],
                std::time::Instant::now(),
            )
            .await;
        assert_eq!(merged, vec![true]);
        let purge = || AaeRequest::Purge {
            entries: vec![(key.clone(), tombstone.clone())],
        };
        let late = std::time::Instant::now() - Duration::from_secs(1);
        let r = aae.serve(purge(), late).await;
        assert_eq!(r, PeerResponse::Aae(AaeResponse::Merged(vec![false])));
        // Still there: the same purge in time takes exactly that tombstone.
        let r = aae.serve(purge(), std::time::Instant::now()).await;
        assert_eq!(r, PeerResponse::Aae(AaeResponse::Merged(vec![true])));
    }

    /// Under `sync = none` a pushed state (which its sender may delete once merged here) and
    /// a tombstone this node says it holds (which the sender may purge everywhere else) are
    /// made durable before the answer: a power loss right after it keeps them. Without that
    /// fsync, the answer is that nothing was merged, or an error.
    #[tokio::test]
    async fn what_a_push_or_tombstone_check_answers_held_survives_a_power_loss_under_none() {
        let v = view(&["a"], "a", &["a"]);
        let (engine, store, _membership, aae) =
            node_a_syncing(v, crate::storage::store::SyncMode::None);
        let tombstone = |actor| {
            Bytes::from(
                KeyState::new()
                    .update(&VersionVector::new(), Dot { actor, counter: 1 }, 5, None)
                    .encode(),
            )
        };
        let push = |key: &'static [u8], state: Bytes| AaeRequest::PushStates {
            entries: vec![(Bytes::from_static(key), state)],
        };
        let now = std::time::Instant::now;
        let r = aae.serve(push(b"pushed", one_state()), now()).await;
        assert_eq!(r, PeerResponse::Aae(AaeResponse::Merged(vec![true])));
        engine.lose_unsynced();
        assert!(
            !store.get(b"pushed").unwrap().is_empty(),
            "the push was not durable"
        );

        // A tombstone merged by this node's own exchange (not made durable by itself), then
        // checked by a peer's tombstone GC.
        let merged = aae
            .merge_by(
                vec![(Bytes::from_static(b"deleted"), tombstone(7))],
                now() + Duration::from_secs(5),
            )
            .await;
        assert_eq!(merged, vec![Merge::Merged]);
        let check = AaeRequest::TombstoneCheck {
            entries: vec![(Bytes::from_static(b"deleted"), tombstone(7))],
        };
        // Whether a check's answer says the key is held here.
        let held = |r: PeerResponse| {
            let PeerResponse::Aae(AaeResponse::TombstoneStatus(flags)) = r else {
                panic!("{r:?}")
            };
            flags[0] & ringkv_protocol::peer::aae::status::HELD != 0
        };
        assert!(held(aae.serve(check.clone(), now()).await));
        engine.lose_unsynced();
        assert!(
            !store.get(b"deleted").unwrap().is_empty(),
            "the tombstone was not durable"
        );

        // A key handed over and deleted here (the release worker's compare-and-delete, not
        // durable by itself): the check's "not held" is durable too, or a power loss would
        // bring the old value back after the tombstone was purged elsewhere.
        let r = aae.serve(push(b"released", one_state()), now()).await;
        assert_eq!(r, PeerResponse::Aae(AaeResponse::Merged(vec![true])));
        store
            .write(crate::storage::WriteOp::Release {
                key: Bytes::from_static(b"released"),
                expected: one_state(),
            })
            .await
            .unwrap();
        let released = AaeRequest::TombstoneCheck {
            entries: vec![(Bytes::from_static(b"released"), tombstone(8))],
        };
        assert!(!held(aae.serve(released, now()).await));
        engine.lose_unsynced();
        assert!(
            store.get(b"released").unwrap().is_empty(),
            "the release's delete was not durable"
        );

        // The fsync fails: a push is answered as not merged, a check as an error.
        engine.set_fail_syncs(true);
        let r = aae.serve(push(b"other", one_state()), now()).await;
        assert_eq!(r, PeerResponse::Aae(AaeResponse::Merged(vec![false])));
        let r = aae.serve(check, now()).await;
        let PeerResponse::Error(e) = r else {
            panic!("{r:?}")
        };
        assert!(
            e.message.contains("tombstone check") && e.message.contains("fsync failed"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_serve_rest_is_the_duty_rest_within_its_cap() {
        use crate::aae::service::serve_rest;
        let ms = Duration::from_millis;
        assert_eq!(serve_rest(ms(10), 1.0, ms(1000)), Duration::ZERO);
        assert_eq!(serve_rest(ms(10), 0.5, ms(1000)), ms(10));
        assert_eq!(serve_rest(ms(10), 0.1, ms(1000)), ms(90));
        assert_eq!(serve_rest(ms(100), 0.02, ms(1000)), ms(1000));
        assert_eq!(serve_rest(ms(100), 0.02, Duration::ZERO), Duration::ZERO);
    }
}
