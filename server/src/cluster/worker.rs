//! The `layout` worker: keeps this node's layout the newest one any member has (fetching it
//! when gossip shows a newer one), and, on the claimant, joins the running nodes that own
//! nothing and ask for it (`--auto-join`, in their gossip metadata), switches ownership once every node that gains ranges has them, and records the retired nodes that say they hold
//! nothing (the layout's `released`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{gainers_waiting, ClusterService};
use crate::background::{Progress, Worker, WorkerState};
use crate::membership::layout::{Change, LayoutId};
use crate::membership::WriteEpochs;
use crate::rpc::{PeerPool, Transport};

/// How often the worker looks at the view.
pub const TICK: Duration = Duration::from_millis(250);
/// A running node that owns nothing is joined automatically once it has been seen with the
/// current layout this long (so nodes started together join in one plan).
pub const JOIN_SETTLE: Duration = Duration::from_secs(1);

pub struct LayoutWorker<T: Transport = PeerPool> {
    cluster: Arc<ClusterService<T>>,
    /// The writes this node coordinates, by layout version: published as `drained`.
    epochs: Arc<WriteEpochs>,
    drained: LayoutId,
    /// Non-owners seen alive with the current layout, since when.
    joiners: HashMap<String, Instant>,
    detail: String,
}

impl<T: Transport> LayoutWorker<T> {
    pub fn new(cluster: Arc<ClusterService<T>>, epochs: Arc<WriteEpochs>) -> LayoutWorker<T> {
        LayoutWorker {
            cluster,
            epochs,
            drained: LayoutId::default(),
            joiners: HashMap::new(),
            detail: "starting".into(),
        }
    }

    /// Fetches a newer layout a member advertises; true if one was adopted.
    async fn catch_up(&mut self) -> bool {
        let view = self.cluster.membership().view();
        let mine = view.layout_id();
        let newer = view
            .seen
            .iter()
            .filter(|(id, s)| **id != view.me && view.is_alive(id) && s.layout() > mine)
            .max_by_key(|(_, s)| s.layout())
            .map(|(id, _)| id.clone());
        let Some(from) = newer else {
            return false;
        };
        let Some(addr) = view.peer_addr(&from).map(str::to_string) else {
            return false;
        };
        match self.cluster.fetch_layout(&from, &addr).await {
            Ok(adopted) => adopted,
            Err(e) => {
                warn!(node = %view.me, peer = %from, error = %e, "could not fetch the newer layout");
                false
            }
        }
    }

    /// The claimant's duties; true if it changed the layout.
    async fn claim(&mut self) -> bool {
        let view = self.cluster.membership().view();
        let me = view.me.to_string();
        if view.layout.claimant(&|n: &str| view.is_alive(n)).as_deref() != Some(me.as_str()) {
            self.joiners.clear();
            return false;
        }
        // Not before this node knows the cluster's ring and layout (found in review: a gainer
        // restarted on its saved transition layout, alone before any contact, took itself
        // for the claimant and switched a transition the cluster had aborted).
        if !view.ready {
            self.detail = "claimant: waiting until this node knows the ring".into();
            return false;
        }
        if !self.cluster.may_commit(view.layout.version) {
            self.detail =
                "claimant: started on an empty data dir; waiting for contact before deciding"
                    .into();
            return false;
        }
        if view.layout.next.is_some() {
            let waiting = gainers_waiting(&view, self.cluster.n());
            let quorum = view
                .layout
                .decision_quorum(&*view)
                .and_then(|()| self.cluster.unsettled(&view).map_or(Ok(()), Err));
            self.detail = if let (true, Err(why)) = (waiting.is_empty(), &quorum) {
                format!("claimant: every gainer synced; the switch waits: {why}")
            } else if waiting.is_empty() {
                "claimant: switching ownership".into()
            } else {
                format!(
                    "claimant: layout v{} transferring; waiting for {}",
                    view.layout.version,
                    waiting.join(", ")
                )
            };
            return waiting.is_empty() && self.cluster.switch_if_synced().await;
        }
        self.detail = format!("claimant: layout v{}", view.layout.version);
        // Retired nodes that say they hold nothing are recorded: tombstone GC waits for the
        // others.
        if self.cluster.record_released().await {
            return true;
        }
        // Staged changes do not hold joins back: they were staged against this layout, and a
        // commit after the join is refused as stale (the operator plans again).
        let now = Instant::now();
        let candidates: Vec<String> = view
            .members
            .keys()
            .filter(|id| {
                !view.layout.is_owner(id)
                    && !view.layout.retired.contains(&***id)
                    && view.is_alive(id)
                    && view
                        .seen
                        .get(&***id)
                        .is_some_and(|s| s.auto_join && s.version == view.layout.version)
            })
            .map(|id| id.to_string())
            .collect();
        self.joiners.retain(|id, _| candidates.contains(id));
        for c in &candidates {
            self.joiners.entry(c.clone()).or_insert(now);
        }
        // Wait until the newest joiner has settled: nodes started together join together.
        let settled = !self.joiners.is_empty()
            && self
                .joiners
                .values()
                .all(|since| now.duration_since(*since) >= JOIN_SETTLE);
        if !settled {
            return false;
        }
        let changes: Vec<Change> = self
            .joiners
            .keys()
            .map(|node| Change::Join {
                node: node.clone(),
                vnodes: view.members.get(node.as_str()).map_or(256, |m| m.vnodes),
            })
            .collect();
        match self.cluster.commit(view.layout.version, &changes).await {
            Ok(version) => {
                info!(node = %me, version, joined = ?self.joiners.keys().collect::<Vec<_>>(),
                      "auto-join: new nodes committed");
                self.joiners.clear();
                true
            }
            Err(e) => {
                warn!(node = %me, joining = ?self.joiners.keys().collect::<Vec<_>>(), error = %e,
                      "auto-join commit refused");
                false
            }
        }
    }
}

impl<T: Transport> Worker for LayoutWorker<T> {
    fn name(&self) -> String {
        "layout".into()
    }

    fn progress(&self) -> Progress {
        let view = self.cluster.membership().view();
        Progress {
            detail: format!(
                "layout v{}{}; {}",
                view.layout.version,
                if view.layout.next.is_some() {
                    " (transition running)"
                } else {
                    ""
                },
                self.detail
            ),
            queue: None,
        }
    }

    async fn work(&mut self, _stop: &CancellationToken) -> Result<WorkerState, String> {
        // Every write still coordinated here started under `drained` or newer: a ring change
        // pulls data only once no write of an older layout is in flight anywhere.
        let version = self.cluster.membership().view().layout_id();
        let drained = self.epochs.oldest().map_or(version, |o| o.min(version));
        if drained != self.drained {
            self.drained = drained;
            self.cluster.membership().set_drained(drained).await;
        }
        self.cluster.note_known(&self.cluster.membership().view());
        if self.catch_up().await {
            return Ok(WorkerState::Busy);
        }
        if self.claim().await {
            return Ok(WorkerState::Busy);
        }
        Ok(WorkerState::Idle)
    }

    async fn wait_for_work(&mut self) -> WorkerState {
        tokio::time::sleep(TICK).await;
        WorkerState::Busy
    }
}
