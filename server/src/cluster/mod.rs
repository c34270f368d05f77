//! The cluster service: the layout (who owns the ring) and the staged ring changes.
//!
//! Every node serves `GetLayout` (peers fetch a newer layout they saw in gossip) and `Stats`.
//! `kvctl cluster …` requests go to the **claimant**, the smallest alive owner id: whichever
//! node the client contacted forwards them. The claimant keeps the staged changes (in memory:
//! a new claimant starts with none), answers `plan` (a dry run: the rings before and after,
//! what each node gains and loses), commits, and, from its worker (`worker.rs`), joins new
//! nodes automatically (`--auto-join`) and switches ownership once every node that gains
//! ranges has received them. docs/architecture.md, "Ring changes".

pub mod vote;
pub mod worker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ringkv_protocol::peer::{ClusterRequest, ClusterResponse, PeerRequest, PeerResponse};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::membership::layout::{moves, per_node, share, Change, Layout, LayoutId, PlanError};
use crate::membership::{ClusterView, Membership};
use crate::rpc::{PeerPool, Transport};
use crate::storage::{Cf, Store};

/// Deadline of one cluster request to a peer (a forwarded admin request, a layout fetch).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline of a request for a grant (`vote`): a voter answers from memory and a small file,
/// and the claimant holds its lock meanwhile.
pub const VOTE_TIMEOUT: Duration = Duration::from_secs(1);

crate::metrics::metric_set! {
    /// The layout and ring changes (registered under `cluster.`).
    pub struct ClusterMetrics {
        layouts_fetched: Counter = "layouts_fetched", "newer layouts fetched from peers";
        commits: Counter = "commits", "plans this node committed as claimant (auto-joins included)";
        switches: Counter = "switches", "transitions this node completed as claimant (ownership switched)";
        aborts: Counter = "aborts", "transitions this node aborted as claimant (kvctl cluster abort: the ring stays as before the commit)";
        released: Counter = "released", "retired nodes this node recorded as claimant as holding nothing (tombstone GC stops waiting for them)";
        admin_requests: Counter = "admin_requests", "kvctl cluster requests served as claimant";
        admin_forwarded: Counter = "admin_forwarded", "kvctl cluster requests forwarded to the claimant";
        grants: Counter = "grants", "decisions on a running ring change this node granted as a voter (switch or abort; a repeat of one it gave counts again)";
        grants_refused: Counter = "grants_refused", "grants this node refused: it had granted the other decision on that change, or could not save the grant";
        decisions_unsettled: Counter = "decisions_unsettled", "switches and aborts this node tried as claimant without gathering the grants of a majority of the change's voters";
        /// Ring changes and repairs refused from another host (`--cluster-admin-remote`).
        admin_refused_remote: Counter = "admin_refused_remote", "ring changes and repairs refused because they came from another host than this node's (see --cluster-admin-remote)";
    }
}

/// A `kvctl cluster` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Add a change to the staged plan.
    Stage(Change),
    /// Drop the staged changes.
    Clear,
    /// The staged plan, as a dry run.
    Plan,
    /// Commit the staged plan; with `plan`, only if it is still the plan of that id.
    Commit { plan: Option<u64> },
    /// The layout, the staged changes and every member's place.
    Status,
    /// Abort the running transition: the ring stays as before its commit. Refused unless a
    /// strict majority of its voters grant it (`vote`).
    Abort,
    /// `kvctl cluster abort --force`: abort without grants, for an operator who knows the
    /// unreachable voters are gone, not on the other side of a partition.
    ForceAbort,
}

impl AdminRequest {
    /// Whether the request changes the staged plan or the ring (else it only reads them).
    pub fn changes(&self) -> bool {
        matches!(
            self,
            AdminRequest::Stage(_)
                | AdminRequest::Clear
                | AdminRequest::Commit { .. }
                | AdminRequest::Abort
                | AdminRequest::ForceAbort
        )
    }
}

/// Whether a client connection from `remote`, accepted on the node's address `local`, comes
/// from this node's own host, and so may change the ring or start a repair (from other hosts
/// only with `--cluster-admin-remote`: the client port is not authenticated). Either a
/// loopback address, or the very address it connected to: kvctl run on the node against any of
/// the node's addresses gets that address as its source. Another host cannot pass for it: the
/// kernel drops IPv4 packets from outside that claim a local source (`accept_local` is off by
/// default), and a spoofed source (IPv4 or IPv6) never receives the SYN-ACK it would need to
/// complete the handshake. A proxy on this host forwarding to the node does pass (documented).
pub fn from_this_host(remote: std::net::IpAddr, local: Option<std::net::IpAddr>) -> bool {
    let remote = remote.to_canonical();
    remote.is_loopback() || local.is_some_and(|l| l.to_canonical() == remote)
}

/// Why `what` (ring changes, repairs) from another host was refused (`from_this_host`).
pub fn remote_admin_refusal(what: &str) -> String {
    format!(
        "{what} are accepted only from this node's own host (run kvctl on it), or from anywhere \
         with --cluster-admin-remote true: the client port is not authenticated"
    )
}

/// One owner's share of a ring, for the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerRow {
    pub node: String,
    pub vnodes: u32,
    pub tokens_of: String,
    /// Share of the ring it replicates (0..=1).
    pub share: f64,
}

/// What one node gains and loses in a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDelta {
    pub node: String,
    pub ranges_gained: usize,
    pub ranges_lost: usize,
    pub share_gained: f64,
    pub share_lost: f64,
    /// Estimated from the ring shares and the owners' key and byte counts.
    pub keys_gained: u64,
    pub keys_lost: u64,
    pub bytes_gained: u64,
    pub bytes_lost: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    pub claimant: String,
    /// A digest of (base version, changes): `commit --plan ID` commits only this plan.
    pub id: u64,
    pub base: u64,
    pub changes: Vec<Change>,
    pub before: Vec<OwnerRow>,
    pub after: Vec<OwnerRow>,
    pub nodes: Vec<NodeDelta>,
    /// Estimated distinct keys and bytes in the cluster (the owners' counts over N).
    pub keys: u64,
    pub bytes: u64,
    pub warnings: Vec<String>,
}

/// One member as the claimant sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRow {
    pub node: String,
    /// normal, joining, leaving, removed (as `kvctl members`).
    pub role: String,
    pub alive: bool,
    pub layout_version: u64,
    /// The newest layout version whose incoming transfers it completed.
    pub synced: u64,
    /// Whether it gains ranges in the running transition (and so must sync before the switch).
    pub gains: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub claimant: String,
    pub layout: Layout,
    pub staged: Option<(u64, Vec<Change>)>,
    pub members: Vec<MemberRow>,
    /// Why the running transition can be neither switched nor aborted now without `--force`
    /// (no majority of its voters reachable from the claimant, or they refused its last
    /// request for grants); absent when it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undecidable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminReply {
    Staged {
        base: u64,
        changes: Vec<Change>,
    },
    Plan(PlanReport),
    Committed {
        version: u64,
    },
    /// The running transition was aborted: `version` is the layout without it; `retired` the
    /// nodes that were to become owners, `forfeited` those of them that were down.
    Aborted {
        version: u64,
        retired: Vec<String>,
        forfeited: Vec<String>,
    },
    Status(StatusReport),
    Error {
        message: String,
    },
}

/// The staged changes and the layout they were staged against (`base` its version, shown to
/// operators; `base_digest` tells apart two layouts of one version, committed concurrently).
#[derive(Debug, Clone, Default)]
struct Staged {
    base: u64,
    base_digest: u64,
    changes: Vec<Change>,
}

impl Staged {
    /// Refused if the layout is no longer the one the changes were staged against.
    fn check_base(&self, view: &ClusterView) -> Result<(), PlanError> {
        if self.base != view.layout.version {
            return Err(PlanError::Stale {
                staged: self.base,
                now: view.layout.version,
            });
        }
        self.check_digest(view)
    }

    /// Refused if the layout has the staged version but is another layout of it (the version
    /// itself, and a transition running, are `Layout::commit`'s checks).
    fn check_digest(&self, view: &ClusterView) -> Result<(), PlanError> {
        if self.base == view.layout.version && self.base_digest != view.epoch {
            return Err(PlanError::Invalid(format!(
                "another layout of v{} was adopted since the changes were staged (a concurrent \
                 commit won): stage them again",
                self.base
            )));
        }
        Ok(())
    }
}

pub struct ClusterService<T: Transport = PeerPool> {
    node_id: String,
    n: usize,
    membership: Membership,
    store: Arc<Store>,
    transport: Arc<T>,
    staged: Mutex<Option<Staged>>,
    /// Serializes commits and switches on this node (one plan at a time).
    deciding: tokio::sync::Mutex<()>,
    /// The grants this node gave as a voter of ring changes.
    votes: vote::Votes,
    /// Why this node, as claimant, last failed to gather the grants for a decision, and on
    /// which change (shown while that change runs).
    unsettled: Mutex<Option<Unsettled>>,
    /// The last grant this node refused as a voter (logged once, not at every request).
    last_refusal: Mutex<Option<(LayoutId, vote::Decision)>>,
    pub metrics: Arc<ClusterMetrics>,
}

/// A decision this node, as claimant, failed to gather the grants for.
#[derive(Debug, Clone)]
struct Unsettled {
    id: LayoutId,
    decision: vote::Decision,
    why: String,
    /// The voters that did not grant it.
    refusers: Vec<String>,
    /// The voters that hold the other decision on this change.
    opposed: Vec<String>,
    /// The voters that say a switch may have been decided (their layout is newer, or they
    /// granted the switch of another change of this version): an abort, even forced, must
    /// not follow.
    may_switched: Vec<String>,
    /// The grants a decision needs.
    need: usize,
    at: std::time::Instant,
}

/// What a voter that did not grant says of the other decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stance {
    /// It holds the other decision on this change.
    Opposed,
    /// A switch may have been decided (see `Unsettled::may_switched`).
    MaySwitched,
    /// Nothing (down, unreachable, not voting, or it holds this very decision).
    Unknown,
}

impl Stance {
    /// What a voter that refused `asked` says of the other decision, from the `held` code
    /// of its refusal (`vote::Refusal::held_code`; the same for this node's own refusals).
    fn of(held: Option<u8>, asked: vote::Decision) -> Stance {
        use ringkv_protocol::peer::cluster::decision::{OTHER_SWITCHED, SUPERSEDED};
        match held {
            Some(SUPERSEDED | OTHER_SWITCHED) => Stance::MaySwitched,
            Some(code) => match vote::Decision::from_code(code) {
                Some(d) if d != asked => Stance::Opposed,
                _ => Stance::Unknown,
            },
            None => Stance::Unknown,
        }
    }
}

impl Unsettled {
    /// Whether the other decision has the grants of a majority: it was made (perhaps by a
    /// claimant that stopped before adopting it).
    fn other_decided(&self) -> bool {
        self.opposed.len() >= self.need
    }
}

/// Why a voter refused, from the `held` code of its `Vote` reply (docs/protocol.md).
fn held_reason(held: u8) -> String {
    use ringkv_protocol::peer::cluster::decision::{OTHER_SWITCHED, SUPERSEDED};
    match (held, vote::Decision::from_code(held)) {
        (SUPERSEDED, _) => "its layout is newer than the change (decided)".to_string(),
        (OTHER_SWITCHED, _) => "granted the switch of another change of this version".to_string(),
        (_, Some(d)) => format!("granted {d} on this change before"),
        (_, None) => format!("refused (code {held})"),
    }
}

/// After failing to gather the grants for a switch, the claimant asks again this much later
/// (its worker ticks every 250 ms, and a request to a paused voter waits `VOTE_TIMEOUT`).
pub const REGATHER: Duration = Duration::from_secs(2);

fn reply(r: &AdminReply) -> Bytes {
    Bytes::from(serde_json::to_vec(r).expect("an admin reply serializes"))
}

impl<T: Transport> ClusterService<T> {
    pub fn new(
        node_id: String,
        n: usize,
        membership: Membership,
        store: Arc<Store>,
        transport: Arc<T>,
        votes: vote::Votes,
    ) -> ClusterService<T> {
        ClusterService {
            node_id,
            n,
            membership,
            store,
            transport,
            staged: Mutex::new(None),
            deciding: tokio::sync::Mutex::new(()),
            votes,
            unsettled: Mutex::new(None),
            last_refusal: Mutex::new(None),
            metrics: Arc::new(ClusterMetrics::default()),
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    fn error(&self, message: impl std::fmt::Display) -> AdminReply {
        AdminReply::Error {
            message: format!("node {}: {message}", self.node_id),
        }
    }

    pub async fn serve(&self, req: ClusterRequest) -> PeerResponse {
        match req {
            ClusterRequest::GetLayout => {
                let layout = self.membership.view().layout.clone();
                PeerResponse::Cluster(ClusterResponse::Layout(Bytes::from(
                    serde_json::to_vec(&*layout).expect("a layout serializes"),
                )))
            }
            ClusterRequest::Admin(json) => {
                let reply = match serde_json::from_slice::<AdminRequest>(&json) {
                    Ok(req) => self.decide(req).await,
                    Err(e) => self.error(format!("malformed cluster request: {e}")),
                };
                PeerResponse::Cluster(ClusterResponse::AdminReply(self::reply(&reply)))
            }
            ClusterRequest::Stats => {
                let (keys, bytes) = self.stats();
                PeerResponse::Cluster(ClusterResponse::Stats { keys, bytes })
            }
            ClusterRequest::Vote {
                version,
                digest,
                decision,
            } => {
                let Some(d) = vote::Decision::from_code(decision) else {
                    return PeerResponse::error(
                        ringkv_protocol::ErrorKind::InvalidRequest,
                        true,
                        format!(
                            "node {}: unknown ring-change decision {decision}",
                            self.node_id
                        ),
                    );
                };
                let id = LayoutId { version, digest };
                let view = self.membership.view();
                match self.grant(&view, id, d) {
                    Ok(()) => PeerResponse::Cluster(ClusterResponse::Vote {
                        granted: true,
                        held: 0,
                    }),
                    Err(e) => match e.held_code() {
                        Some(held) => PeerResponse::Cluster(ClusterResponse::Vote {
                            granted: false,
                            held,
                        }),
                        None => PeerResponse::error(
                            match e {
                                vote::Refusal::Unsaved(_) => ringkv_protocol::ErrorKind::Internal,
                                _ => ringkv_protocol::ErrorKind::InvalidRequest,
                            },
                            true,
                            format!("node {}: layout {id}: {e}", self.node_id),
                        ),
                    },
                }
            }
        }
    }

    /// Whether this node may commit a change to a layout of `version` now
    /// (`vote::Votes::votes_above`; `note_known` fixes the floor it compares with).
    pub fn may_commit(&self, version: u64) -> bool {
        self.votes.votes_above(version)
    }

    /// A node that started without its grants fixes the floor below which it does not vote
    /// (`vote::Votes::note_ready`) once it knows the cluster: ready, in contact with a
    /// member, and behind none (a wiped node started alone makes a layout of its own
    /// first). Looked at by the layout worker on every tick and by every commit and grant
    /// on the view it decides with, so a commit made the moment the second node of a new
    /// cluster is seen is not refused until the worker's next tick.
    pub fn note_known(&self, view: &ClusterView) {
        if !(view.ready && !view.live_member_ahead() && view.alive.iter().any(|id| *id != view.me))
        {
            return;
        }
        if let Err(e) = self.votes.note_ready(view.layout.version) {
            warn!(node = %self.node_id, error = %e,
                  "could not save the grants file (started without one): retried; this node does not vote until it is saved");
        }
    }

    /// Grants `decision` on the change `id` as a voter (`vote`), counted and logged; refused
    /// also when this node's own layout is newer (the change was decided or superseded).
    fn grant(
        &self,
        view: &ClusterView,
        id: LayoutId,
        decision: vote::Decision,
    ) -> Result<(), vote::Refusal> {
        self.note_known(view);
        // What it granted on that version comes first: a voter that granted the switch and
        // has since adopted it must say so, not merely that its layout is newer.
        let answer = match self.votes.held_on_version(id.version) {
            None if view.layout_id() > id => Err(vote::Refusal::Superseded(view.layout.version)),
            _ => self.votes.grant(id, decision),
        };
        match &answer {
            Ok(()) => {
                self.metrics.grants.inc();
            }
            Err(e) => {
                self.metrics.grants_refused.inc();
                let mut last = self.last_refusal.lock().expect("refusal lock poisoned");
                if *last != Some((id, decision)) {
                    *last = Some((id, decision));
                    warn!(node = %self.node_id, layout = %id, %decision, reason = %e,
                          "refused to grant a ring-change decision (logged once per change)");
                }
            }
        }
        answer
    }

    /// Gathers grants for `decision` on the running change of `view` from a strict majority
    /// of its voters (this node's own among them, if it votes), asking every voter it sees
    /// alive at once. `Err` says who granted, who refused and why, and who holds the other
    /// decision.
    async fn gather(&self, view: &ClusterView, decision: vote::Decision) -> Result<(), Unsettled> {
        let id = view.layout_id();
        let voters = view.layout.voters();
        let need = crate::membership::layout::majority(voters.len());
        // Per voter: granted, or why not and what it says of the other decision.
        let asks = voters.iter().map(|v| async move {
            if *v == self.node_id {
                let answer = self.grant(view, id, decision);
                return (
                    v,
                    answer.map_err(|e| (e.to_string(), Stance::of(e.held_code(), decision))),
                );
            }
            if !view.is_alive(v) {
                return (v, Err(("down".to_string(), Stance::Unknown)));
            }
            let Some(addr) = view.peer_addr(v) else {
                return (v, Err(("no known address".to_string(), Stance::Unknown)));
            };
            let req = PeerRequest::Cluster(ClusterRequest::Vote {
                version: id.version,
                digest: id.digest,
                decision: decision.code(),
            });
            let answer = match self
                .transport
                .clone()
                .call(addr.to_string(), req, VOTE_TIMEOUT)
                .await
            {
                Ok(PeerResponse::Cluster(ClusterResponse::Vote { granted: true, .. })) => Ok(()),
                Ok(PeerResponse::Cluster(ClusterResponse::Vote { held, .. })) => {
                    Err((held_reason(held), Stance::of(Some(held), decision)))
                }
                Ok(PeerResponse::Error(e)) => Err((e.message, Stance::Unknown)),
                Ok(other) => Err((format!("answered {other:?}"), Stance::Unknown)),
                Err(e) => Err((e.to_string(), Stance::Unknown)),
            };
            (v, answer)
        });
        let answers = futures::future::join_all(asks).await;
        let granted: Vec<&str> = answers
            .iter()
            .filter(|(_, a)| a.is_ok())
            .map(|(v, _)| v.as_str())
            .collect();
        let mut unsettled = self.unsettled.lock().expect("unsettled lock poisoned");
        if granted.len() >= need {
            *unsettled = None;
            return Ok(());
        }
        self.metrics.decisions_unsettled.inc();
        let refused: Vec<(&str, &str)> = answers
            .iter()
            .filter_map(|(v, a)| a.as_ref().err().map(|(e, _)| (v.as_str(), e.as_str())))
            .collect();
        let with = |stance: Stance| -> Vec<String> {
            answers
                .iter()
                .filter(|(_, a)| matches!(a, Err((_, s)) if *s == stance))
                .map(|(v, _)| v.to_string())
                .collect()
        };
        let (opposed, may_switched) = (with(Stance::Opposed), with(Stance::MaySwitched));
        let why = format!(
            "layout {id}: {} of the {} nodes that vote on the change granted the {decision}, \
             {need} needed (granted: {}; {})",
            granted.len(),
            voters.len(),
            if granted.is_empty() {
                "none".to_string()
            } else {
                granted.join(", ")
            },
            refused
                .iter()
                .map(|(v, e)| format!("{v}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        // Logged when who refused changes, not at every attempt (transport errors vary).
        let refusers: Vec<String> = refused.iter().map(|(v, _)| v.to_string()).collect();
        if unsettled
            .as_ref()
            .is_none_or(|u| u.id != id || u.decision != decision || u.refusers != refusers)
        {
            warn!(node = %self.node_id, %why, "ring change not decided: the voters did not grant it");
        }
        let failed = Unsettled {
            id,
            decision,
            why,
            refusers,
            opposed,
            may_switched,
            need,
            at: std::time::Instant::now(),
        };
        *unsettled = Some(failed.clone());
        Err(failed)
    }

    /// Whether this node failed to gather the grants for `decision` on the change `id` less
    /// than `REGATHER` ago (it waits before asking the voters again).
    fn recently_unsettled(&self, id: LayoutId, decision: vote::Decision) -> bool {
        let unsettled = self.unsettled.lock().expect("unsettled lock poisoned");
        unsettled
            .as_ref()
            .is_some_and(|u| u.id == id && u.decision == decision && u.at.elapsed() < REGATHER)
    }

    /// Why the last decision this node tried on the running change of `view` was not
    /// granted, if it was not.
    pub fn unsettled(&self, view: &ClusterView) -> Option<String> {
        let unsettled = self.unsettled.lock().expect("unsettled lock poisoned");
        match &*unsettled {
            Some(u) if view.layout.next.is_some() && u.id == view.layout_id() => {
                Some(u.why.clone())
            }
            _ => None,
        }
    }

    /// This node's estimated key count and bytes of data (RocksDB's estimates: live SST data
    /// plus memtables).
    fn stats(&self) -> (u64, u64) {
        let e = self.store.engine();
        (
            e.property(Cf::Data, "rocksdb.estimate-num-keys")
                .unwrap_or(0),
            e.property(Cf::Data, "rocksdb.estimate-live-data-size")
                .unwrap_or(0)
                + e.property(Cf::Data, "rocksdb.cur-size-all-mem-tables")
                    .unwrap_or(0),
        )
    }

    /// A client's `kvctl cluster` request (JSON), answered by the claimant.
    /// A `kvctl cluster` request from a client; `may_change` = from a host allowed to change
    /// the ring (`from_this_host` or `--cluster-admin-remote`).
    pub async fn admin(&self, json: &[u8], may_change: bool) -> Bytes {
        let req: AdminRequest = match serde_json::from_slice(json) {
            Ok(r) => r,
            Err(e) => return reply(&self.error(format!("malformed cluster request: {e}"))),
        };
        if req.changes() && !may_change {
            self.metrics.admin_refused_remote.inc();
            return reply(&self.error(remote_admin_refusal("ring changes")));
        }
        let view = self.membership.view();
        let claimant = view.layout.claimant(&|n: &str| view.is_alive(n));
        match claimant {
            Some(c) if c == self.node_id => reply(&self.decide(req).await),
            Some(c) => {
                self.metrics.admin_forwarded.inc();
                let Some(addr) = view.peer_addr(&c) else {
                    return reply(&self.error(format!("the claimant {c} has no known address")));
                };
                let body = Bytes::from(serde_json::to_vec(&req).expect("a request serializes"));
                match self
                    .transport
                    .clone()
                    .call(
                        addr.to_string(),
                        PeerRequest::Cluster(ClusterRequest::Admin(body)),
                        CALL_TIMEOUT,
                    )
                    .await
                {
                    Ok(PeerResponse::Cluster(ClusterResponse::AdminReply(json))) => json,
                    Ok(PeerResponse::Error(e)) => {
                        reply(&self.error(format!("the claimant {c} answered: {}", e.message)))
                    }
                    Ok(other) => reply(&self.error(format!("the claimant {c} answered {other:?}"))),
                    Err(e) => reply(&self.error(format!("the claimant {c} did not answer: {e}"))),
                }
            }
            None => reply(
                &self.error("this node knows no layout yet (it has not heard from the cluster)"),
            ),
        }
    }

    /// Serves an admin request as the claimant (refused if this node is not it).
    async fn decide(&self, req: AdminRequest) -> AdminReply {
        let view = self.membership.view();
        let live = |n: &str| view.is_alive(n);
        match view.layout.claimant(&live) {
            Some(c) if c == self.node_id => {}
            Some(c) => return self.error(format!("not the claimant ({c} is)")),
            None => return self.error("no layout yet"),
        }
        if req.changes() && !view.ready {
            return self.error(
                "this node does not know the cluster's ring and layout yet (just started, or not \
                 in contact): retry in a moment",
            );
        }
        self.metrics.admin_requests.inc();
        match req {
            AdminRequest::Stage(change) => {
                let mut staged = self.staged.lock().expect("staged lock poisoned");
                let mut s = staged.clone().unwrap_or(Staged {
                    base: view.layout.version,
                    base_digest: view.epoch,
                    changes: Vec::new(),
                });
                s.changes.push(change);
                // Checked now (against the layout they will be committed to), so a bad change
                // is refused when it is typed, not at commit.
                if let Err(e) = view.layout.target(&s.changes, &*view) {
                    return self.error(e);
                }
                let reply = AdminReply::Staged {
                    base: s.base,
                    changes: s.changes.clone(),
                };
                *staged = Some(s);
                reply
            }
            AdminRequest::Clear => {
                let old = self.staged.lock().expect("staged lock poisoned").take();
                AdminReply::Staged {
                    base: view.layout.version,
                    changes: old.map(|s| s.changes).unwrap_or_default(),
                }
            }
            AdminRequest::Plan => {
                let staged = self.staged.lock().expect("staged lock poisoned").clone();
                let Some(staged) = staged else {
                    return self.error(PlanError::Empty);
                };
                match self.plan(&view, &staged).await {
                    Ok(p) => AdminReply::Plan(p),
                    Err(e) => self.error(e),
                }
            }
            AdminRequest::Commit { plan } => {
                let staged = self.staged.lock().expect("staged lock poisoned").clone();
                let Some(staged) = staged else {
                    return self.error(PlanError::Empty);
                };
                if let Some(id) = plan {
                    let now = plan_id(staged.base, &staged.changes);
                    if id != now {
                        return self.error(format!(
                            "the staged plan changed since plan {id:016x} (it is {now:016x} now): run kvctl cluster plan again"
                        ));
                    }
                }
                if let Err(e) = staged.check_digest(&view) {
                    self.staged.lock().expect("staged lock poisoned").take();
                    return self.error(e);
                }
                match self.commit(staged.base, &staged.changes).await {
                    Ok(version) => {
                        self.staged.lock().expect("staged lock poisoned").take();
                        AdminReply::Committed { version }
                    }
                    Err(e @ PlanError::Stale { .. }) => {
                        // A stale plan cannot become valid again: it must be staged anew.
                        self.staged.lock().expect("staged lock poisoned").take();
                        self.error(e)
                    }
                    Err(e) => self.error(e),
                }
            }
            AdminRequest::Abort | AdminRequest::ForceAbort => {
                match self.abort(req == AdminRequest::ForceAbort).await {
                    Ok((version, retired, forfeited)) => AdminReply::Aborted {
                        version,
                        retired,
                        forfeited,
                    },
                    Err(e) => self.error(e),
                }
            }
            AdminRequest::Status => {
                let staged = self
                    .staged
                    .lock()
                    .expect("staged lock poisoned")
                    .clone()
                    .map(|s| (s.base, s.changes));
                let mut report = status_report(&self.node_id, &view, self.n, staged);
                if report.undecidable.is_none() {
                    report.undecidable = self.unsettled(&view);
                }
                AdminReply::Status(report)
            }
        }
    }

    /// Commits `changes` staged against `base`: the transition layout, adopted here and
    /// gossiped. One at a time on this node; refused if stale or a transition runs.
    pub async fn commit(&self, base: u64, changes: &[Change]) -> Result<u64, PlanError> {
        let _one = self.deciding.lock().await;
        let view = self.membership.view();
        self.note_known(&view);
        if !self.may_commit(view.layout.version) {
            return Err(PlanError::Invalid(
                "this node started on an empty data dir and is not yet in contact with the \
                 cluster, so it could not vote on the change: retry in a moment"
                    .into(),
            ));
        }
        let next = commit_on(&view, base, changes)?;
        let version = next.version;
        // Only on the layout it was planned on (found in review: adopted on whatever this
        // node held by then, a commit could discard a concurrent one of the same version that
        // `catch_up`, which does not take the lock, adopted meanwhile).
        if !self
            .membership
            .adopt_layout_on(view.layout_id(), next)
            .await
        {
            return Err(PlanError::Invalid(
                "the layout changed while committing; stage the changes again".into(),
            ));
        }
        self.metrics.commits.inc();
        info!(node = %self.node_id, version, changes = %changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "),
              "plan committed: transfers start once every node has the layout");
        Ok(version)
    }

    /// Aborts the running transition (`Layout::aborted`): the layout without it, adopted here
    /// and gossiped. Under the claimant's lock, so it cannot cross a switch; refused while a
    /// live member has a newer layout (a concurrent commit that wins: it is adopted first),
    /// and, unless `force`, without the grants of a majority of the change's voters (`vote`).
    pub async fn abort(&self, force: bool) -> Result<(u64, Vec<String>, Vec<String>), PlanError> {
        let _one = self.deciding.lock().await;
        let view = self.membership.view();
        if view.live_member_ahead() {
            return Err(PlanError::Invalid(
                "a live member has a newer layout than this claimant: retry in a moment".into(),
            ));
        }
        if view.layout.next.is_none() {
            // `aborted` names the layout: nothing runs.
            view.layout.aborted(&*view)?;
        }
        let refusal = |why: &str| {
            PlanError::Invalid(format!(
                "{why}. Wait until enough voters are back and ask again; only if the missing \
                 ones are gone for good (not on the other side of a partition): kvctl cluster \
                 abort --force"
            ))
        };
        let gathered = match (view.layout.decision_quorum(&*view), force) {
            (Err(why), false) => return Err(refusal(&why)),
            // Forced, the reachable voters are still asked: a switch they granted stands.
            _ => self.gather(&view, vote::Decision::Abort).await,
        };
        let forced = match gathered {
            Ok(()) => None,
            Err(u) if u.other_decided() => {
                return Err(PlanError::Invalid(format!(
                    "{}: a majority of the voters granted the switch ({}): the change completes \
                     (kvctl cluster status); nothing to abort",
                    u.id,
                    u.opposed.join(", ")
                )))
            }
            Err(u) if !u.may_switched.is_empty() => {
                return Err(PlanError::Invalid(format!(
                    "{}: the switch may have been decided elsewhere ({}); nothing to abort: look \
                     at kvctl cluster status",
                    u.why,
                    u.may_switched.join(", ")
                )))
            }
            Err(u) if !force => return Err(refusal(&u.why)),
            Err(u) => Some(u.why),
        };
        self.adopt_abort(&view, forced).await
    }

    /// Adopts the abort of the running change of `view` (decided: granted, or `forced` with
    /// the reason it was not), only while this node still holds that layout.
    async fn adopt_abort(
        &self,
        view: &ClusterView,
        forced: Option<String>,
    ) -> Result<(u64, Vec<String>, Vec<String>), PlanError> {
        let (aborted, retired, forfeited) = view.layout.aborted(view)?;
        let version = aborted.version;
        if !self
            .membership
            .adopt_layout_on(view.layout_id(), aborted)
            .await
        {
            return Err(PlanError::Invalid(
                "the layout changed while aborting; look at kvctl cluster status and retry".into(),
            ));
        }
        self.staged.lock().expect("staged lock poisoned").take();
        self.metrics.aborts.inc();
        if let Some(why) = forced {
            warn!(node = %self.node_id, version, %why, "ring change aborted by force, without a majority");
        }
        warn!(node = %self.node_id, version, from = view.layout.version,
              retired = %retired.join(", "), forfeited = %forfeited.join(", "),
              "ring change aborted: the ring stays as before its commit; the nodes that were to \
               join are retired (those down forfeit what they received)");
        Ok((version, retired, forfeited))
    }

    /// Switches ownership if the running transition's gainers have all synced; true if it did.
    pub async fn switch_if_synced(&self) -> bool {
        let _one = self.deciding.lock().await;
        let view = self.membership.view();
        let Some(switched) = view.layout.switched() else {
            return false;
        };
        let waiting = gainers_waiting(&view, self.n);
        if !waiting.is_empty() {
            return false;
        }
        // A live member has a newer layout (a concurrent commit that wins): adopt it first
        // (`catch_up`), never switch the one it supersedes.
        if view.live_member_ahead() {
            return false;
        }
        // Only with the grants of a majority of the change's voters: no other claimant can
        // then abort it (the worker shows why it waits).
        if view.layout.decision_quorum(&*view).is_err() {
            return false;
        }
        if self.recently_unsettled(view.layout_id(), vote::Decision::Switch) {
            return false;
        }
        match self.gather(&view, vote::Decision::Switch).await {
            Ok(()) => {}
            // A majority granted the abort (its claimant stopped before adopting it, or this
            // one was overtaken): that is the decision, and this claimant carries it out.
            Err(u) if u.other_decided() => {
                info!(node = %self.node_id, layout = %u.id, voters = %u.opposed.join(", "),
                      "the abort of this ring change was granted by a majority: adopting it");
                return self.adopt_abort(&view, None).await.is_ok();
            }
            Err(_) => return false,
        }
        let version = switched.version;
        if self
            .membership
            .adopt_layout_on(view.layout_id(), switched)
            .await
        {
            self.metrics.switches.inc();
            info!(node = %self.node_id, version, "every node that gains ranges has received them: ownership switched");
            true
        } else {
            false
        }
    }

    /// Records in the layout the retired nodes that say, with this layout, that they hold
    /// nothing (`released`: tombstone GC stops waiting for them); true if it did. Chosen under
    /// the claimant's lock from the view of that moment, and not while a transition runs or
    /// a live member has a newer layout (a concurrent commit that wins: adopt it first).
    pub async fn record_released(&self) -> bool {
        let _one = self.deciding.lock().await;
        let view = self.membership.view();
        if view.layout.next.is_some() || view.live_member_ahead() {
            return false;
        }
        let id = view.layout_id();
        let nodes: Vec<String> = view
            .layout
            .retired
            .iter()
            .filter(|n| {
                !view.layout.released.contains(*n)
                    && view.is_alive(n)
                    && view
                        .seen
                        .get(n.as_str())
                        .is_some_and(|s| s.holds_nothing && s.layout() == id)
            })
            .cloned()
            .collect();
        if nodes.is_empty() {
            return false;
        }
        let released = view.layout.with_released(&nodes);
        let version = released.version;
        if self.membership.adopt_layout_on(id, released).await {
            self.metrics.released.inc_by(nodes.len() as u64);
            info!(node = %self.node_id, version, nodes = %nodes.join(", "),
                  "retired nodes hold nothing any more: recorded (tombstone GC no longer waits for them)");
            true
        } else {
            false
        }
    }

    async fn plan(&self, view: &ClusterView, staged: &Staged) -> Result<PlanReport, PlanError> {
        staged.check_base(view)?;
        let target = view.layout.target(&staged.changes, view)?;
        let before = view.layout.current_ring();
        let after = Layout::ring(&target);
        let ms = moves(&before, &after, self.n);
        let pn = per_node(&ms);
        // Distinct keys and bytes: every owner's counts over N (each key is on N owners).
        let (mut keys, mut bytes) = (0u64, 0u64);
        for owner in view.layout.current.keys() {
            let (k, b) = if *owner == self.node_id {
                self.stats()
            } else {
                self.peer_stats(view, owner).await.unwrap_or((0, 0))
            };
            keys += k;
            bytes += b;
        }
        let n = self.n.min(view.layout.current.len()).max(1) as u64;
        let (keys, bytes) = (keys / n, bytes / n);
        let rows = |owners: &crate::membership::layout::Owners, ring: &crate::ring::Ring| {
            owners
                .iter()
                .map(|(id, o)| OwnerRow {
                    node: id.clone(),
                    vnodes: o.vnodes,
                    tokens_of: o.tokens_of.clone(),
                    share: replicated_share(ring, id, self.n),
                })
                .collect::<Vec<_>>()
        };
        let nodes = pn
            .iter()
            .map(|(node, m)| {
                let (g, l) = (share(&m.gains), share(&m.loses));
                NodeDelta {
                    node: node.clone(),
                    ranges_gained: m.gains.len(),
                    ranges_lost: m.loses.len(),
                    share_gained: g,
                    share_lost: l,
                    keys_gained: (g * keys as f64).round() as u64,
                    keys_lost: (l * keys as f64).round() as u64,
                    bytes_gained: (g * bytes as f64).round() as u64,
                    bytes_lost: (l * bytes as f64).round() as u64,
                }
            })
            .collect();
        let mut warnings = Vec::new();
        if target.len() < self.n {
            warnings.push(format!(
                "{} owners after the plan, fewer than N={}: keys will have fewer replicas",
                target.len(),
                self.n
            ));
        }
        for m in &ms {
            if m.from.iter().all(|s| !view.is_alive(s)) {
                warnings.push(format!(
                    "positions {:016x}..={:016x}: no current replica is up ({}); that data cannot move until one is",
                    m.span.0,
                    m.span.1,
                    m.from.join(", ")
                ));
                break;
            }
        }
        Ok(PlanReport {
            claimant: self.node_id.clone(),
            id: plan_id(staged.base, &staged.changes),
            base: staged.base,
            changes: staged.changes.clone(),
            before: rows(&view.layout.current, &before),
            after: rows(&target, &after),
            nodes,
            keys,
            bytes,
            warnings,
        })
    }

    async fn peer_stats(&self, view: &ClusterView, node: &str) -> Option<(u64, u64)> {
        if !view.is_alive(node) {
            return None;
        }
        let addr = view.peer_addr(node)?.to_string();
        match self
            .transport
            .clone()
            .call(
                addr,
                PeerRequest::Cluster(ClusterRequest::Stats),
                CALL_TIMEOUT,
            )
            .await
        {
            Ok(PeerResponse::Cluster(ClusterResponse::Stats { keys, bytes })) => {
                Some((keys, bytes))
            }
            _ => None,
        }
    }

    /// Fetches `from`'s layout and adopts it if it supersedes ours; true if it did.
    pub async fn fetch_layout(&self, from: &str, addr: &str) -> Result<bool, String> {
        let resp = self
            .transport
            .clone()
            .call(
                addr.to_string(),
                PeerRequest::Cluster(ClusterRequest::GetLayout),
                CALL_TIMEOUT,
            )
            .await
            .map_err(|e| format!("layout fetch from {from}: {e}"))?;
        let json = match resp {
            PeerResponse::Cluster(ClusterResponse::Layout(json)) => json,
            other => return Err(format!("layout fetch from {from}: answered {other:?}")),
        };
        let layout: Layout = serde_json::from_slice(&json)
            .map_err(|e| format!("layout from {from} does not decode: {e}"))?;
        layout
            .check()
            .map_err(|e| format!("layout from {from} refused: {e}"))?;
        let adopted = self.membership.adopt_layout(layout).await;
        if adopted {
            self.metrics.layouts_fetched.inc();
        }
        Ok(adopted)
    }
}

/// The id `plan` prints and `commit --plan` checks.
pub fn plan_id(base: u64, changes: &[Change]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&serde_json::to_vec(&(base, changes)).expect("changes serialize"))
}

/// The share of the ring `node` replicates (as one of the first `n` replicas).
fn replicated_share(ring: &crate::ring::Ring, node: &str, n: usize) -> f64 {
    let spans = crate::ring::ranges::shared_spans(ring, node, n);
    let mut all: Vec<(u64, u64)> = spans.into_values().flatten().collect();
    all.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in all {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    share(&merged)
}

/// The transition layout that commits `changes` staged against `base` on `view`'s layout;
/// refused while a live member has a newer layout (a concurrent commit that wins: `catch_up`
/// adopts it first), as switch, abort and release records are (found in review: a commit did
/// not check, and could then supersede a layout it never saw).
fn commit_on(view: &ClusterView, base: u64, changes: &[Change]) -> Result<Layout, PlanError> {
    if view.live_member_ahead() {
        return Err(PlanError::Invalid(
            "a live member has a newer layout than this node: retry in a moment".into(),
        ));
    }
    view.layout.commit(base, changes, view)
}

/// The gainers of the running transition that have not reported their transfers done.
pub fn gainers_waiting(view: &ClusterView, n: usize) -> Vec<String> {
    let Some(next) = &view.next else {
        return Vec::new();
    };
    let id = view.layout_id();
    per_node(&moves(&view.ring, next, n))
        .into_iter()
        .filter(|(_, m)| !m.gains.is_empty())
        .map(|(node, _)| node)
        // Synced for this very layout: one of the same version with another digest had other
        // moves, and a greater one means this node must catch up before deciding anything.
        .filter(|node| view.seen.get(node.as_str()).is_none_or(|s| s.synced != id))
        .collect()
}

pub fn status_report(
    claimant: &str,
    view: &ClusterView,
    n: usize,
    staged: Option<(u64, Vec<Change>)>,
) -> StatusReport {
    let gaining: Vec<String> = match &view.next {
        Some(next) => per_node(&moves(&view.ring, next, n))
            .into_iter()
            .filter(|(_, m)| !m.gains.is_empty())
            .map(|(node, _)| node)
            .collect(),
        None => Vec::new(),
    };
    let mut nodes: Vec<String> = view.members.keys().map(|k| k.to_string()).collect();
    nodes.extend(view.layout.retired.iter().cloned());
    nodes.sort();
    nodes.dedup();
    let members = nodes
        .into_iter()
        .map(|node| {
            let seen = view.seen.get(node.as_str()).copied().unwrap_or_default();
            MemberRow {
                role: match crate::membership::swim::ring_role(&view.layout, &node) {
                    crate::membership::swim::RingStatus::Joining => "joining",
                    crate::membership::swim::RingStatus::Normal => "normal",
                    crate::membership::swim::RingStatus::Leaving => "leaving",
                    crate::membership::swim::RingStatus::Removed => "removed",
                }
                .into(),
                alive: view.is_alive(&node),
                layout_version: seen.version,
                synced: seen.synced.version,
                gains: gaining.contains(&node),
                node,
            }
        })
        .collect();
    StatusReport {
        claimant: claimant.to_string(),
        layout: (*view.layout).clone(),
        staged,
        members,
        undecidable: view.layout.decision_quorum(view).err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A voter's refusal says the same of the other decision whether the claimant is that
    /// voter (the `Refusal` itself) or asked it over the wire (its `held` code): one mapping,
    /// `Refusal::held_code` then `Stance::of`.
    #[test]
    fn a_refusal_means_the_same_to_the_claimant_locally_and_over_the_wire() {
        use vote::{Decision, Refusal};
        let other = LayoutId {
            version: 7,
            digest: 42,
        };
        let cases = [
            (
                Refusal::Held(Decision::Abort),
                Decision::Switch,
                Stance::Opposed,
            ),
            (
                Refusal::Held(Decision::Switch),
                Decision::Abort,
                Stance::Opposed,
            ),
            (Refusal::Superseded(9), Decision::Abort, Stance::MaySwitched),
            (
                Refusal::OtherChange(other, Decision::Switch),
                Decision::Abort,
                Stance::MaySwitched,
            ),
            (
                Refusal::OtherChange(other, Decision::Abort),
                Decision::Switch,
                Stance::Unknown,
            ),
            (Refusal::Amnesic(Some(3)), Decision::Abort, Stance::Unknown),
            (
                Refusal::Unsaved("disk full".into()),
                Decision::Switch,
                Stance::Unknown,
            ),
        ];
        for (refusal, asked, stance) in cases {
            let held = refusal.held_code();
            assert_eq!(Stance::of(held, asked), stance, "{refusal:?} asked {asked}");
            if let Some(code) = held {
                assert!(
                    !held_reason(code).starts_with("refused (code"),
                    "{refusal:?}: its code {code} has a reason"
                );
            }
        }
        // A voter holding the very decision asked grants it again rather than refusing; a
        // code naming it says nothing of the other decision.
        assert_eq!(
            Stance::of(Some(Decision::Switch.code()), Decision::Switch),
            Stance::Unknown
        );
        assert_eq!(Stance::of(Some(200), Decision::Switch), Stance::Unknown);
        assert_eq!(held_reason(200), "refused (code 200)");
    }

    /// Found in review: anyone who could reach the (unauthenticated) client port could stage
    /// and commit ring changes: `remove` of a briefly unreachable node forfeits its data.
    /// Changes and repairs come from this host only, unless the operator allows others.
    #[test]
    fn ring_changes_come_from_this_host_unless_allowed() {
        let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let local_too: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let other: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let other6: std::net::IpAddr = "2001:db8::7".parse().unwrap();
        for ip in [local, local_too, mapped, "::1".parse().unwrap()] {
            assert!(from_this_host(ip, None), "{ip}");
            assert!(from_this_host(ip, Some(other)), "{ip}");
        }
        for ip in [other, other6] {
            assert!(!from_this_host(ip, None), "{ip}");
            assert!(!from_this_host(ip, Some(local)), "{ip}");
            // Connected to the very address it comes from: this host.
            assert!(from_this_host(ip, Some(ip)), "{ip}");
        }
        let mapped_other: std::net::IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(from_this_host(mapped_other, Some(other)));
        assert!(!from_this_host(other, Some("192.0.2.8".parse().unwrap())));
        let changes = [
            AdminRequest::Stage(Change::Remove { node: "n2".into() }),
            AdminRequest::Clear,
            AdminRequest::Commit { plan: None },
            AdminRequest::Abort,
        ];
        assert!(changes.iter().all(AdminRequest::changes));
        assert!(!AdminRequest::Plan.changes() && !AdminRequest::Status.changes());
    }
    use crate::membership::layout::LayoutId;

    fn synced(view: &mut ClusterView, node: &str, synced: LayoutId) {
        let id = view.layout_id();
        view.seen
            .insert(node.into(), crate::testkit::layout_seen(id, synced, id));
    }

    /// A commit waits while a live member has a newer layout than this node's: it is adopted
    /// first (`catch_up`), and the staged changes are checked against it.
    #[test]
    fn a_commit_waits_while_a_live_member_has_a_newer_layout() {
        let mut v = crate::testkit::view(&["a", "b", "c"], "a", &["a", "b", "c"]);
        let id = v.layout_id();
        let leave = [Change::Leave { node: "c".into() }];
        commit_on(&v, id.version, &leave).expect("control: nobody is ahead");
        let ahead = LayoutId {
            version: id.version + 1,
            digest: 7,
        };
        v.seen
            .insert("b".into(), crate::testkit::layout_seen(ahead, id, id));
        let err = commit_on(&v, id.version, &leave).unwrap_err();
        assert!(err.to_string().contains("newer layout"), "{err}");
        // Down, b's newer layout does not hold the commit up.
        v.alive.remove(&crate::ring::NodeId::from("b"));
        commit_on(&v, id.version, &leave).expect("b is not alive");
    }

    /// b is replaced by d: d gains every range. The switch waits until d said it is synced
    /// for this very layout, not for another layout of the same version.
    #[test]
    fn a_gainer_synced_for_another_layout_of_the_same_version_is_still_waited_for() {
        let mut v = crate::testkit::b_replaced_by_d(&["b", "c", "d"]);
        let id = v.layout_id();
        let with_digest = |digest| LayoutId {
            version: id.version,
            digest,
        };
        assert_eq!(gainers_waiting(&v, 3), vec!["d".to_string()]);
        synced(&mut v, "d", with_digest(id.digest.wrapping_sub(1)));
        assert_eq!(
            gainers_waiting(&v, 3),
            vec!["d".to_string()],
            "d's transfers were for the other layout of v{}",
            id.version
        );
        synced(&mut v, "d", id);
        assert!(gainers_waiting(&v, 3).is_empty());
        synced(&mut v, "d", with_digest(id.digest.wrapping_add(1)));
        assert_eq!(
            gainers_waiting(&v, 3),
            vec!["d".to_string()],
            "synced for a layout this view does not hold is not synced for this one"
        );
    }
}
