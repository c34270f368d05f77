//! The `transfer` worker: while a committed plan runs, this node receives every range it gains
//! from the range's current replicas, before it owns them.
//!
//! The transfer of a gained range is an anti-entropy exchange over it with each of its current
//! replicas that is up (`AaeWorker::exchange`: the differing keys are fetched and merged with
//! the version-vector logic; streaming by digests when most of it differs, as for a new node).
//! Pulling from every live source, not one, gets every acknowledged write (W of them hold it);
//! a source that leaves is waited for while it is down (`Layout::leaving`): it may hold what no
//! other node has (a write acknowledged with W=1), and retired it would never hand that over.
//! It starts once every live member has the plan's layout (so every coordinator already sends
//! writes to the new replicas too) and no write begun under an older layout is in flight on any
//! of them (their gossip `drained`), and [`SETTLE`] later; then writes made meanwhile are in the
//! data the exchanges see, and later ones arrive directly. When every source is done, the node
//! says so in its gossip metadata (`synced`), and the claimant switches ownership once every
//! gaining node has.
//!
//! Each source's spans are pulled [`CHUNK_SPANS`] at a time. Checkpoint: how many spans of each
//! source are done for the running layout (version and digest) is saved in `<data_dir>/transfer.json` after
//! each chunk, so a restarted node resumes at the chunk it was in; re-running that chunk's
//! exchange re-fetches only keys that still differ (digests compare equal for what it already
//! merged), so at most the batch in flight when it stopped is sent again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::exchange::AaeWorker;
use crate::background::{Progress, Worker, WorkerState};
use crate::membership::layout::{gains_covered, moves, per_node, share, LayoutId, NodeMoves};
use crate::membership::Membership;
use crate::ring::ranges::{ShownSpans, Span};
use crate::rpc::{PeerPool, Transport};

/// Wait this long after every live member has a plan's layout before pulling (writes begun
/// under the previous layout finish meanwhile).
pub const SETTLE: Duration = Duration::from_secs(2);
/// After a failed exchange with a source, try again this much later.
pub const RETRY: Duration = Duration::from_secs(2);
/// Spans per exchange (and per checkpoint).
pub const CHUNK_SPANS: usize = 32;

crate::metrics::metric_set! {
    /// Range transfers into this node (registered under `transfer.`).
    pub struct TransferMetrics {
        keys_received: Counter = "keys_received", "keys fetched and merged by transfers into this node";
        bytes_received: Counter = "bytes_received", "bytes (key and state) of the states fetched by transfers into this node";
        bytes_sent: Counter = "bytes_sent", "bytes (key and state) of the states pushed back to sources that lacked them";
        exchange_bytes: Counter = "exchange_bytes", "payload bytes of transfer exchanges both ways (cells, hashes, digests, states)";
        sources_done: Counter = "sources_done", "sources this node finished pulling its gained ranges from";
        failures: Counter = "failures", "transfer exchanges that failed (retried)";
        completed: Counter = "completed", "transitions whose gained ranges this node received in full";
        active: Gauge = "active", "1 while this node is receiving ranges";
        share_pending: Ratio = "share_pending_ratio", "share of the ring still to receive, 0 to 1";
    }
}

/// The checkpoint: what is done for which layout. Keyed by the layout's version *and* digest:
/// two claimants that committed the same version concurrently made two layouts with different
/// moves, and what was pulled or completed for one says nothing of the other.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub layout: LayoutId,
    /// Per source, how many of its spans (in order) are done.
    pub progress: BTreeMap<String, usize>,
    /// The newest layout whose transfers completed (said again in gossip after a restart).
    pub synced: LayoutId,
}

impl Checkpoint {
    /// Whether this node's transfers for `layout` (or a layout superseding it) are complete.
    pub fn is_synced(&self, layout: LayoutId) -> bool {
        self.synced >= layout
    }

    /// Makes the progress that of `layout`: kept if it already is, cleared otherwise. True if
    /// it was cleared.
    pub fn begin(&mut self, layout: LayoutId) -> bool {
        if self.layout == layout {
            return false;
        }
        self.layout = layout;
        self.progress.clear();
        true
    }
}

/// The saved checkpoint; none (a transfer starts from its first chunk, re-fetching only keys
/// that differ) when the file is missing, or unreadable (said in the log, with the cause).
fn load_checkpoint(node_id: &str, path: &std::path::Path) -> Checkpoint {
    let parsed = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Checkpoint::default(),
        Err(e) => Err(e.to_string()),
    };
    parsed.unwrap_or_else(|cause| {
        warn!(node = %node_id, file = %path.display(), %cause,
              "transfer checkpoint unreadable: a running transfer starts again from its first chunk");
        Checkpoint::default()
    })
}

/// One source's part of the running transfer, for `status` and `kvctl cluster status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceStatus {
    pub state: &'static str,
    pub spans: usize,
    pub spans_done: usize,
    pub share: f64,
    pub keys: u64,
    /// Bytes of the states received (key and state), to compare with `est_bytes`.
    pub bytes: u64,
    /// Estimated keys and bytes this source has for this node: its own counts (`Stats`) times
    /// the share of its ranges that move here. None until asked.
    pub est_keys: Option<u64>,
    pub est_bytes: Option<u64>,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
}

/// The transfer's status lines (`transfer.<source>`), shared with the admin service.
pub type TransferStatus = Arc<Mutex<BTreeMap<String, SourceStatus>>>;

/// `transfer.<source>` = `state=… spans=done/total share_ppm=… keys=done/~estimate
/// bytes=done/~estimate rate=… eta_s=…` (the bytes are wire bytes of the exchanges).
pub fn status_lines(status: &TransferStatus) -> Vec<(String, String)> {
    let now = Instant::now();
    let map = status.lock().expect("transfer status lock poisoned");
    let total: f64 = map.values().map(|s| s.share).sum();
    let done: f64 = map
        .values()
        .map(|s| s.share * s.spans_done as f64 / s.spans.max(1) as f64)
        .sum();
    let first = map.values().filter_map(|s| s.started).min();
    // Share of the ring per second over what is done so far: the ETA of what remains.
    let eta = first.and_then(|t| {
        let secs = now.duration_since(t).as_secs_f64();
        (done > 0.0 && secs > 0.0).then(|| (total - done) / (done / secs))
    });
    map.iter()
        .map(|(src, s)| {
            let secs = s
                .started
                .map(|t| s.finished.unwrap_or(now).duration_since(t).as_secs_f64())
                .unwrap_or(0.0);
            let rate = if secs > 0.0 {
                s.keys as f64 / secs
            } else {
                0.0
            };
            (
                format!("transfer.{src}"),
                format!(
                    "state={} spans={}/{} share_ppm={} keys={}/{} bytes={}/{} rate={:.0} eta_s={}",
                    s.state,
                    s.spans_done,
                    s.spans,
                    (s.share * 1e6).round() as u64,
                    s.keys,
                    s.est_keys.map_or("?".to_string(), |k| format!("~{k}")),
                    s.bytes,
                    s.est_bytes.map_or("?".to_string(), |b| format!("~{b}")),
                    rate,
                    eta.map_or("-".to_string(), |e| format!("{e:.0}"))
                ),
            )
        })
        .collect()
}

pub struct TransferWorker<T: Transport = PeerPool> {
    node_id: String,
    n: usize,
    membership: Membership,
    transport: Arc<T>,
    exchanger: AaeWorker<T>,
    checkpoint: Checkpoint,
    path: Option<PathBuf>,
    metrics: Arc<TransferMetrics>,
    status: TransferStatus,
    /// When every live member was first seen with the running layout.
    all_have_it: Option<(LayoutId, Instant)>,
    retry_at: BTreeMap<String, Instant>,
    said_synced: bool,
    detail: String,
}

impl<T: Transport> TransferWorker<T> {
    pub fn new(
        n: usize,
        membership: Membership,
        transport: Arc<T>,
        exchanger: AaeWorker<T>,
        path: Option<PathBuf>,
        metrics: Arc<TransferMetrics>,
        status: TransferStatus,
    ) -> TransferWorker<T> {
        let node_id = membership.view().me.to_string();
        let checkpoint = path
            .as_deref()
            .map(|p| load_checkpoint(&node_id, p))
            .unwrap_or_default();
        TransferWorker {
            node_id,
            n,
            membership,
            transport,
            exchanger,
            checkpoint,
            path,
            metrics,
            status,
            all_have_it: None,
            retry_at: BTreeMap::new(),
            said_synced: false,
            detail: "no transfer".into(),
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let bytes = serde_json::to_vec(&self.checkpoint).expect("a checkpoint serializes");
        if let Err(e) = crate::durable::write_file(path, &bytes) {
            error!(node = %self.node_id, file = %path.display(), error = %e,
                   "could not save the transfer checkpoint (a restart redoes its sources)");
        }
    }

    /// Estimates what `source` will send for `spans`: its key and byte counts (`Stats`) times
    /// the share of its own ranges those spans are. None if it does not answer.
    async fn estimate(&self, addr: &str, source: &str, spans: &[Span]) -> Option<(u64, u64)> {
        use ringkv_protocol::peer::{ClusterRequest, ClusterResponse, PeerRequest, PeerResponse};
        let resp = self
            .transport
            .clone()
            .call(
                addr.to_string(),
                PeerRequest::Cluster(ClusterRequest::Stats),
                Duration::from_secs(5),
            )
            .await
            .ok()?;
        let PeerResponse::Cluster(ClusterResponse::Stats { keys, bytes }) = resp else {
            return None;
        };
        let view = self.membership.view();
        let owned = 1.0
            - share(&crate::ring::ranges::foreign_spans(
                &view.ring, source, self.n,
            ));
        let part = (share(spans) / owned.max(1e-9)).min(1.0);
        Some((
            (keys as f64 * part).round() as u64,
            (bytes as f64 * part).round() as u64,
        ))
    }

    /// A chunk from `source` failed: counted, shown as retrying, tried again after `RETRY`.
    fn retry_later(&mut self, source: String) {
        self.metrics.failures.inc();
        self.status
            .lock()
            .expect("transfer status lock poisoned")
            .entry(source.clone())
            .or_default()
            .state = "retrying";
        self.retry_at.insert(source, Instant::now() + RETRY);
    }

    fn done(&self, source: &str, spans: &[Span]) -> bool {
        self.checkpoint.progress.get(source).copied().unwrap_or(0) >= spans.len()
    }

    fn covered(&self, moves: &NodeMoves) -> bool {
        gains_covered(moves, &|src: &str| {
            moves
                .gains_from
                .get(src)
                .is_some_and(|spans| self.done(src, spans))
        })
    }
}

impl<T: Transport> Worker for TransferWorker<T> {
    fn name(&self) -> String {
        "transfer".into()
    }

    fn progress(&self) -> Progress {
        Progress {
            detail: self.detail.clone(),
            queue: None,
        }
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<WorkerState, String> {
        self.exchanger.set_stop(stop);
        if !self.said_synced && self.checkpoint.synced > LayoutId::default() {
            self.said_synced = true;
            self.membership.set_synced(self.checkpoint.synced).await;
        }
        let view = self.membership.view();
        let id = view.layout_id();
        let version = id.version;
        let Some(next) = &view.next else {
            self.metrics.active.set(0);
            self.metrics.share_pending.set(0.0);
            self.detail = "no transfer".into();
            return Ok(WorkerState::Idle);
        };
        if self.checkpoint.is_synced(id) {
            self.metrics.active.set(0);
            self.detail = format!("layout v{version}: every gained range received");
            return Ok(WorkerState::Idle);
        }
        // A node that does not know the ring takes no data (`NoData::NotReady`): a chunk
        // pulled now would be refused and still counted done (found in review: a gainer
        // restarted during a transition could say it was synced with nothing received).
        if !view.ready {
            self.detail = format!("layout v{version}: waiting until this node knows the ring");
            return Ok(WorkerState::Idle);
        }
        let mine = per_node(&moves(&view.ring, next, self.n))
            .remove(&*view.me)
            .unwrap_or_default();
        if self.checkpoint.begin(id) {
            self.status
                .lock()
                .expect("transfer status lock poisoned")
                .clear();
        }
        if mine.gains.is_empty() {
            self.checkpoint.synced = id;
            self.save();
            self.membership.set_synced(id).await;
            self.detail = format!("layout v{version}: this node gains no range");
            return Ok(WorkerState::Idle);
        }
        // Every live member must have the layout (so it sends writes here too) and no write
        // it began under an older layout in flight (that one goes to the old replicas only);
        // then SETTLE.
        let behind = view.members_behind();
        if !behind.is_empty() {
            self.all_have_it = None;
            self.detail = format!(
                "layout v{version}: waiting for {} to have the layout and finish older writes",
                behind.join(", ")
            );
            return Ok(WorkerState::Idle);
        }
        let since = match self.all_have_it {
            Some((v, at)) if v == id => at,
            _ => {
                let now = Instant::now();
                self.all_have_it = Some((id, now));
                now
            }
        };
        if since.elapsed() < SETTLE {
            return Ok(WorkerState::Idle);
        }
        {
            let mut st = self.status.lock().expect("transfer status lock poisoned");
            for (src, spans) in &mine.gains_from {
                let done = self.checkpoint.progress.get(src).copied().unwrap_or(0);
                let e = st.entry(src.clone()).or_default();
                e.spans = spans.len();
                e.spans_done = done.min(spans.len());
                e.share = share(spans);
                if done >= spans.len() {
                    e.state = "done";
                } else if e.state.is_empty() || e.state == "done" {
                    e.state = "pending";
                }
            }
        }
        let pending: f64 = mine
            .gains_from
            .iter()
            .map(|(s, spans)| {
                let done = self.checkpoint.progress.get(s).copied().unwrap_or(0);
                share(&spans[done.min(spans.len())..])
            })
            .sum();
        self.metrics.share_pending.set(pending);
        // The next live source not done and not waiting for a retry.
        let now = Instant::now();
        let next_source = mine.gains_from.iter().find(|(src, spans)| {
            !self.done(src, spans)
                && view.is_alive(src)
                && self.retry_at.get(*src).is_none_or(|t| now >= *t)
        });
        let Some((source, all_spans)) = next_source.map(|(s, sp)| (s.clone(), sp.clone())) else {
            // Done when every live source is, and every gained range came from one of them,
            // but never without a source that leaves: down, it is waited for (found in
            // review: the switch retired a leaving node that was down, and once restarted it
            // withheld what only it held, a write acknowledged with W=1).
            let live_left = mine
                .gains_from
                .iter()
                .any(|(s, spans)| !self.done(s, spans) && view.is_alive(s));
            let leaver_down = mine
                .gains_from
                .iter()
                .find(|(s, spans)| {
                    !self.done(s, spans) && !view.is_alive(s) && view.layout.leaving(s)
                })
                .map(|(s, _)| s.clone());
            if let Some(leaver) = &leaver_down {
                self.detail = format!(
                    "layout v{version}: waiting for {leaver}, which leaves and is down, to hand \
                     its ranges over (gone for good: kvctl cluster abort, then remove it)"
                );
            } else if !live_left && self.covered(&mine) {
                self.checkpoint.synced = id;
                self.save();
                self.metrics.completed.inc();
                self.metrics.active.set(0);
                if !view.layout.current.contains_key(&*view.me) {
                    // Everything it will own came from every live replica: a new node's data
                    // dir is synced (it answers reads once it owns them).
                    self.exchanger.service().synced_by_transfer();
                }
                self.membership.set_synced(id).await;
                info!(node = %self.node_id, version, "every gained range received; told the claimant");
                self.detail = format!("layout v{version}: every gained range received");
            } else if !live_left {
                self.detail = format!(
                    "layout v{version}: some gained ranges have no live source yet; waiting for one"
                );
            }
            return Ok(WorkerState::Idle);
        };
        let Some(addr) = view.peer_addr(&source).map(str::to_string) else {
            return Ok(WorkerState::Idle);
        };
        let unestimated = self
            .status
            .lock()
            .expect("transfer status lock poisoned")
            .get(&source)
            .is_none_or(|e| e.est_keys.is_none());
        if unestimated {
            if let Some((k, b)) = self.estimate(&addr, &source, &all_spans).await {
                let mut st = self.status.lock().expect("transfer status lock poisoned");
                let e = st.entry(source.clone()).or_default();
                e.est_keys = Some(k);
                e.est_bytes = Some(b);
            }
        }
        let from = self.checkpoint.progress.get(&source).copied().unwrap_or(0);
        let to = (from + CHUNK_SPANS).min(all_spans.len());
        let spans = all_spans[from..to].to_vec();
        self.metrics.active.set(1);
        self.detail = format!(
            "layout v{version}: receiving {:.1}% of the ring from {source} (spans {from}..{to} of {})",
            share(&all_spans) * 100.0,
            all_spans.len()
        );
        let started = Instant::now();
        {
            let mut st = self.status.lock().expect("transfer status lock poisoned");
            let e = st.entry(source.clone()).or_default();
            e.state = "running";
            e.started.get_or_insert(started);
        }
        match self.exchanger.exchange(&addr, &spans as &[Span]).await {
            Ok(o) => {
                self.metrics.keys_received.inc_by(o.received);
                self.metrics.bytes_received.inc_by(o.bytes_received);
                self.metrics.bytes_sent.inc_by(o.bytes_sent);
                self.metrics.exchange_bytes.inc_by(o.wire_bytes);
                // The checkpoint says these spans are here: under `sync = none` they are made
                // durable first, or the chunk is fetched again.
                let store = self.exchanger.service().store();
                if let Err(e) = store.make_durable("a transfer chunk").await {
                    warn!(node = %self.node_id, %source, version, spans = %ShownSpans(&spans),
                          error = %e, "transfer chunk received but not made durable; fetched again");
                    self.retry_later(source);
                    return Ok(WorkerState::Busy);
                }
                let finished = to == all_spans.len();
                if finished {
                    self.metrics.sources_done.inc();
                }
                {
                    let mut st = self.status.lock().expect("transfer status lock poisoned");
                    let e = st.entry(source.clone()).or_default();
                    e.state = if finished { "done" } else { "running" };
                    e.spans_done = to;
                    e.keys += o.received;
                    e.bytes += o.bytes_received;
                    if finished {
                        e.finished = Some(Instant::now());
                    }
                }
                if finished {
                    info!(node = %self.node_id, %source, version, spans = all_spans.len(),
                          "gained ranges received from a source");
                }
                tracing::debug!(node = %self.node_id, %source, version, from, to, keys = o.received,
                                wire_bytes = o.wire_bytes, ms = started.elapsed().as_millis() as u64,
                                "transfer chunk done");
                self.checkpoint.progress.insert(source, to);
                self.save();
            }
            Err(_) if stop.is_cancelled() => {
                // Cut short by shutdown (a paced wait): not a failure; what this exchange
                // fetched is fetched again after the restart, from the last checkpoint.
            }
            Err(cause) => {
                warn!(node = %self.node_id, %source, version, spans = %ShownSpans(&spans), %cause,
                      "transfer from a source failed; retried");
                self.retry_later(source);
            }
        }
        Ok(WorkerState::Busy)
    }

    async fn wait_for_work(&mut self) -> WorkerState {
        tokio::time::sleep(Duration::from_millis(250)).await;
        WorkerState::Busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layouts of one version (two claimants committed concurrently): what was done for
    /// one is not done for the other.
    #[test]
    fn a_checkpoint_of_one_layout_says_nothing_of_another_with_the_same_version() {
        let l1 = LayoutId {
            version: 3,
            digest: 10,
        };
        let l2 = LayoutId {
            version: 3,
            digest: 20,
        };
        let mut c = Checkpoint::default();
        assert!(c.begin(l1), "a new checkpoint starts its layout");
        c.progress.insert("n2".into(), 5);
        assert!(!c.begin(l1), "the same layout keeps its progress");
        assert_eq!(c.progress.get("n2"), Some(&5));
        c.synced = l1;
        assert!(c.is_synced(l1));
        assert!(
            !c.is_synced(l2),
            "synced for v3 digest 10 is not synced for v3 digest 20"
        );
        assert!(
            c.begin(l2),
            "another layout of the same version starts over"
        );
        assert!(
            c.progress.is_empty(),
            "its spans differ: no progress carries over"
        );
        assert!(c.is_synced(LayoutId {
            version: 2,
            digest: 99
        }));
        // Saved and loaded (a restart) it is the same checkpoint.
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("transfer.json");
        std::fs::write(&path, serde_json::to_vec(&c).expect("serializes")).expect("write");
        assert_eq!(load_checkpoint("n1", &path), c);
    }
}
