//! Cluster membership and liveness: SWIM gossip (foca) over UDP plus a phi-accrual detector.
//!
//! The driver worker (`swim.rs`) owns foca, the socket, the timers and the detector, and publishes
//! an immutable `ClusterView` through a `watch` channel; the rest of the node only reads
//! snapshots (`Membership::view`) or asks for details (`Membership::members`).
//!
//! A member is **available** for routing while foca does not consider it Down *and* its phi is
//! at most the threshold. Members stay in the ring while down (Dynamo-style: routing skips them,
//! they are not removed); only the `Removed` ring status takes a node out.

pub mod layout;
pub mod phi;
pub mod swim;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ringkv_protocol::peer::MemberInfo;
use ringkv_protocol::peer::PeerResponse;
use ringkv_protocol::{ErrorKind, MembersReply};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::ring::{NodeId, Ring};
use layout::{Layout, LayoutId};
use swim::{Command, Driver, GossipStats, MembershipWorker, RingId, SwimConfig};

/// What a member says of its layout in its gossip metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayoutSeen {
    pub version: u64,
    pub digest: u64,
    /// The newest layout whose incoming transfers the member completed.
    pub synced: LayoutId,
    /// It asks to be joined automatically while it owns nothing.
    pub auto_join: bool,
    /// Every write it is still coordinating started under this layout or a newer one.
    pub drained: LayoutId,
    /// It was retired and holds no data and no hint any more (`aae::release`).
    pub holds_nothing: bool,
}

impl LayoutSeen {
    /// The layout the member has.
    pub fn layout(&self) -> LayoutId {
        LayoutId {
            version: self.version,
            digest: self.digest,
        }
    }
}

/// The writes this node is coordinating, by the layout version each started under: a ring
/// change's transfers start only once no write begun under an older layout is still in
/// flight anywhere (such a write goes to the old replicas only, and could land after the
/// transfer passed its key).
#[derive(Debug, Default)]
pub struct WriteEpochs {
    counts: std::sync::Mutex<BTreeMap<LayoutId, usize>>,
}

/// One write in flight under a layout; dropped when its last replica call ended.
#[derive(Debug)]
pub struct EpochGuard {
    epochs: Arc<WriteEpochs>,
    version: LayoutId,
}

impl WriteEpochs {
    pub fn enter(self: &Arc<Self>, version: LayoutId) -> EpochGuard {
        *self
            .counts
            .lock()
            .expect("epochs lock poisoned")
            .entry(version)
            .or_insert(0) += 1;
        EpochGuard {
            epochs: self.clone(),
            version,
        }
    }

    /// A write's view (`current`), with the write entered under that view's layout. The view
    /// is read again after the enter, until the layout held across it: the layout worker reads
    /// the view, then the writes in flight, so a write it did not see reads a view at least as
    /// new as the one it published `drained` from (the lock orders the two). Read once, a view
    /// published between the read and the enter would leave the write under the old layout,
    /// its old replicas only, while every node says no write of that layout is in flight.
    pub fn enter_with<V>(
        self: &Arc<Self>,
        mut current: impl FnMut() -> V,
        layout: impl Fn(&V) -> LayoutId,
    ) -> (EpochGuard, V) {
        let mut view = current();
        loop {
            let guard = self.enter(layout(&view));
            let again = current();
            if layout(&again) == guard.version {
                return (guard, again);
            }
            view = again;
        }
    }

    /// The oldest layout a write still in flight started under.
    pub fn oldest(&self) -> Option<LayoutId> {
        self.counts
            .lock()
            .expect("epochs lock poisoned")
            .keys()
            .next()
            .copied()
    }
}

impl Drop for EpochGuard {
    fn drop(&mut self) {
        let mut counts = self.epochs.counts.lock().expect("epochs lock poisoned");
        if let Some(c) = counts.get_mut(&self.version) {
            *c -= 1;
            if *c == 0 {
                counts.remove(&self.version);
            }
        }
    }
}

/// An immutable snapshot of the cluster as this node sees it.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub me: NodeId,
    /// Every known member (down ones, non-owners and retired ones included), with its
    /// addresses and vnodes; `layout` says which own ranges.
    pub members: BTreeMap<NodeId, MemberInfo>,
    /// The ring of the layout's current owners: reads and coordination use it.
    pub ring: Ring,
    /// While a committed plan's transfers run: the ring after it (writes also go to its
    /// replicas).
    pub next: Option<Ring>,
    /// The layout the rings come from.
    pub layout: Arc<Layout>,
    /// Per other member, what its gossip metadata says of its layout.
    pub seen: BTreeMap<NodeId, LayoutSeen>,
    /// Remote members currently available for routing (this node is always available to itself).
    pub alive: BTreeSet<NodeId>,
    /// Bumped on every published change.
    pub version: u64,
    /// Fingerprint of the layout (its digest): equal on converged nodes.
    pub epoch: u64,
    /// False while this node does not know the ring yet (just started, not in contact with the
    /// cluster, metadata missing): it must not coordinate requests, or it would route to the
    /// wrong replicas.
    pub ready: bool,
    /// This process has had a view in which it was ready and not retired (latched): it may
    /// have coordinated or taken data then. A retired node whose process never did (started
    /// after its retirement, e.g. on a wiped data dir) has nothing of its own still landing.
    pub served: bool,
}

/// Whether a node may hand over (release, replay) what it holds. Not when it was taken out of
/// the ring and either
/// - it was taken out while the cluster could not reach it (removed, replaced: the layout
///   names it `forfeited`): tombstone GC stopped waiting for it then, whether its process was
///   down or ran on unreachable (paused, partitioned, even on a data dir new at its start),
///   so values deleted since may have had their tombstones purged and handing its copies over
///   would bring them back (the other nodes refuse them too, `api::peer`); or
/// - its data dir is older than this process and this process never saw it own ranges in a
///   layout the cluster agreed on: it was down when it was taken out (it left, then stopped
///   before handing everything over), with the same consequence.
#[derive(Debug, Default)]
pub struct HandOverGuard {
    /// This process saw the node own ranges in a layout the cluster agreed on, or its data
    /// dir was new at this start.
    owned_this_run: bool,
}

impl HandOverGuard {
    /// `fresh_data_dir`: the store was new when this process opened it.
    pub fn new(fresh_data_dir: bool) -> HandOverGuard {
        HandOverGuard {
            owned_this_run: fresh_data_dir,
        }
    }

    /// Why the node must keep what it holds, if it must (called on every turn of a worker
    /// that hands data over, with the current view).
    pub fn withheld(&mut self, view: &ClusterView) -> Option<String> {
        if !self.owned_this_run && view.owner_in_agreed_layout() {
            self.owned_this_run = true;
        }
        if !view.retired() {
            return None;
        }
        if view.layout.forfeited.contains(&*view.me) {
            return Some(format!(
                "withheld: node {} was removed from the ring while the cluster could not reach it \
                 (layout v{}); the data it holds may predate deletes purged since and is not \
                 handed over: stop it, and wipe its data dir before it joins again",
                view.me, view.layout.version
            ));
        }
        (!self.owned_this_run).then(|| {
            format!(
                "withheld: node {} was taken out of the ring (layout v{}) before this start; the \
                 data it holds may predate deletes purged since and is not handed over: stop it \
                 and wipe its data dir",
                view.me, view.layout.version
            )
        })
    }
}

/// Why a node takes no data now (replica writes, hints, hint replays, anti-entropy merges):
/// `ClusterView::takes_no_data`. So every view under which a node takes data is one in which
/// it knew the ring and was in it, which the gossip driver counts in `ClusterView::served`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoData {
    /// A completed plan (left, removed, replaced) took it out of the ring.
    Retired,
    /// It does not know the ring yet (just started, or not in contact with the cluster; found
    /// in review: a restarted node took replica writes then, under a stale saved layout).
    NotReady,
}

impl NoData {
    /// Why a node that knows the ring (`ready`) or not, and is `retired` or not, takes no
    /// data, if it takes none: the one rule behind `ClusterView::takes_no_data` and the
    /// gossip driver's `served` latch.
    pub fn of(ready: bool, retired: bool) -> Option<NoData> {
        if retired {
            Some(NoData::Retired)
        } else if !ready {
            Some(NoData::NotReady)
        } else {
            None
        }
    }

    pub fn why(self) -> &'static str {
        match self {
            NoData::Retired => {
                "this node was taken out of the ring by a completed plan (left, removed or \
                 replaced): it is a replica of nothing"
            }
            NoData::NotReady => {
                "this node does not know the ring yet (just started, or not in contact with the \
                 cluster): it takes no data until it does"
            }
        }
    }

    /// The refusal of `what` by `node_id`: `Unavailable`, definite (nothing was kept); a
    /// coordinator counts it as a missing replica (hints cover it), a hint holder keeps its
    /// hints.
    pub fn refusal(self, node_id: &str, what: &str) -> PeerResponse {
        PeerResponse::error(
            ErrorKind::Unavailable {
                alive: 0,
                needed: 1,
            },
            true,
            format!("node {node_id}: {what} refused: {}", self.why()),
        )
    }
}

/// A service's look at whether this node takes data now (`ClusterView::takes_no_data` of
/// the current view).
pub type DataGate = Arc<dyn Fn() -> Option<NoData> + Send + Sync>;

/// Liveness for ring changes: gossip's, and what members say they hold.
impl layout::Liveness for ClusterView {
    fn is_alive(&self, node: &str) -> bool {
        ClusterView::is_alive(self, node)
    }

    fn holds_nothing(&self, node: &str) -> bool {
        self.seen.get(node).is_some_and(|s| s.holds_nothing)
    }
}

impl ClusterView {
    /// The layout this view holds (`epoch` is its digest).
    pub fn layout_id(&self) -> LayoutId {
        LayoutId {
            version: self.layout.version,
            digest: self.epoch,
        }
    }

    /// The members whose peer address is `addr` (usually one; two while one that moved away
    /// is still listed), sorted.
    pub fn nodes_at(&self, addr: &str) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.peer_addr == addr)
            .map(|m| m.node_id.clone())
            .collect()
    }

    /// Whether a live member has a layout newer than this view's (a concurrent commit that
    /// wins): the claimant adopts it before it changes the layout itself.
    pub fn live_member_ahead(&self) -> bool {
        let id = self.layout_id();
        self.seen
            .iter()
            .any(|(m, s)| self.is_alive(m) && s.layout() > id)
    }

    /// Live members that do not have this view's layout (nor a newer one), or that still
    /// coordinate a write begun under an older one: a ring change's transfers and releases
    /// wait for them.
    pub fn members_behind(&self) -> Vec<&str> {
        let id = self.layout_id();
        self.members
            .keys()
            .filter(|m| self.is_alive(m))
            .filter(|m| {
                self.seen
                    .get(*m)
                    .is_none_or(|s| s.layout() < id || s.drained < id)
            })
            .map(|m| &**m)
            .collect()
    }

    /// Whether `node` was taken out of the ring for good as far as this view knows: retired,
    /// owner of nothing now or next, not this node, and no ring change runs (the owners are
    /// settled). What is held for it (hints, anti-entropy marks) goes to the keys' owners.
    pub fn taken_out(&self, node: &str) -> bool {
        self.ready && self.next.is_none() && self.out_of_ring(node)
    }

    /// Whether `node` (not this node) is retired and owns nothing now or next, ring change or
    /// not: it takes no hint and no replay (`Handoff::serve`), so what is held for it waits
    /// for [`Self::taken_out`] to go to the keys' owners.
    pub fn out_of_ring(&self, node: &str) -> bool {
        *self.me != *node && self.layout.retired.contains(node) && !self.layout.is_owner(node)
    }

    pub fn is_alive(&self, id: &str) -> bool {
        *self.me == *id || self.alive.contains(id)
    }

    pub fn peer_addr(&self, id: &str) -> Option<&str> {
        self.members.get(id).map(|m| m.peer_addr.as_str())
    }

    /// `id`'s peer address while it is available for routing.
    pub fn live_peer_addr(&self, id: &str) -> Option<String> {
        self.is_alive(id)
            .then(|| self.peer_addr(id).map(str::to_string))
            .flatten()
    }

    /// Why this node takes no data now, if it takes none: it is retired, or it does not know
    /// the ring yet.
    pub fn takes_no_data(&self) -> Option<NoData> {
        NoData::of(self.ready, self.retired())
    }

    /// Whether this node was taken out of the ring by a completed plan.
    pub fn retired(&self) -> bool {
        self.layout.retired.contains(&*self.me)
    }

    /// Whether this node owns ranges in a layout the cluster agrees on: it is an owner, and
    /// at least one other live member was seen with this layout and none with another. A
    /// node started again with the layout it had before it went down (which may have
    /// retired it since) does not pass this until it has the cluster's layout.
    pub fn owner_in_agreed_layout(&self) -> bool {
        if !self.ready || !self.layout.is_owner(&self.me) {
            return false;
        }
        let id = self.layout.id();
        let mut others = self
            .members
            .keys()
            .filter(|m| **m != self.me && self.is_alive(m))
            .peekable();
        others.peek().is_some()
            && others.all(|m| self.seen.get(m).is_some_and(|s| s.layout() == id))
    }

    /// Whether `node` replicates `key`'s position now or after the running transition.
    pub fn replicates(&self, node: &str, position: u64, n: usize) -> bool {
        let is = |ring: &Ring| {
            ring.preference_list(position, n)
                .iter()
                .any(|p| **p == *node)
        };
        is(&self.ring) || self.next.as_ref().is_some_and(is)
    }
}

/// The node's handle on membership.
#[derive(Clone)]
pub struct Membership {
    view: watch::Receiver<Arc<ClusterView>>,
    commands: mpsc::Sender<Command>,
    pub stats: Arc<GossipStats>,
    members_seen: Arc<std::sync::Mutex<Option<MembersReply>>>,
    fatal: Arc<std::sync::Mutex<Option<String>>>,
}

impl Membership {
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// Waits until the view says this node knows the ring, at most `timeout`; true if it does.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let mut view = self.view.clone();
        tokio::time::timeout(timeout, view.wait_for(|v| v.ready))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The members as last refreshed with the view (every `swim::VIEW_REFRESH`), without
    /// asking the driver: for metrics. None before the first refresh.
    pub fn members_seen(&self) -> Option<MembersReply> {
        self.members_seen
            .lock()
            .expect("members snapshot lock poisoned")
            .clone()
    }

    /// Why this process had to stop, if the membership driver stopped it: an older live
    /// process has this node id (`swim::judge_own_id`).
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().expect("fatal slot lock poisoned").clone()
    }

    /// Per-member details (SWIM state, incarnation, phi, last heard); None if the driver stopped.
    pub async fn members(&self) -> Option<MembersReply> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Members(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Adopts `layout` if it supersedes this node's (saved, gossiped, and the rings rebuilt
    /// before this returns); true if it did. False also when the driver stopped.
    pub async fn adopt_layout(&self, layout: Layout) -> bool {
        self.adopt(layout, None).await
    }

    /// Adopts `layout`, decided on the layout `on`, only if this node still holds `on` (and
    /// `layout` supersedes it); true if it did.
    pub async fn adopt_layout_on(&self, on: LayoutId, layout: Layout) -> bool {
        self.adopt(layout, Some(on)).await
    }

    async fn adopt(&self, layout: Layout, on: Option<LayoutId>) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Adopt(Box::new(layout), on, tx))
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Tells the cluster (gossip metadata) that this node received every range it gains in
    /// layout `version`.
    pub async fn set_synced(&self, version: LayoutId) {
        let _ = self.commands.send(Command::Synced(version)).await;
    }

    /// Tells the cluster whether this node, retired, holds no data and no hint any more.
    pub async fn set_holds_nothing(&self, empty: bool) {
        let _ = self.commands.send(Command::HoldsNothing(empty)).await;
    }

    /// Tells the cluster that every write this node still coordinates started under layout
    /// `version` or newer.
    pub async fn set_drained(&self, version: LayoutId) {
        let _ = self.commands.send(Command::Drained(version)).await;
    }

    /// The gossip driver on an already bound UDP socket, as a worker to start on the runner,
    /// and the handle the services read the view from. `leave` is the node's shutdown signal
    /// (the driver then tells the cluster it is leaving).
    pub fn start(
        me: MemberInfo,
        socket: UdpSocket,
        cfg: SwimConfig,
        leave: CancellationToken,
    ) -> (Membership, MembershipWorker) {
        let gossip_addr = socket
            .local_addr()
            .expect("a bound UDP socket has an address");
        let parse = |s: &str| {
            s.parse()
                .expect("member addresses come from bound listeners")
        };
        let id = RingId {
            node_id: me.node_id.clone(),
            gossip: gossip_addr,
            peer: parse(&me.peer_addr),
            client: parse(&me.client_addr),
            generation: me.generation,
        };
        let my_id: NodeId = me.node_id.as_str().into();
        let mut members = BTreeMap::new();
        members.insert(my_id.clone(), me.clone());
        let view = Arc::new(ClusterView {
            me: my_id,
            ring: Ring::new(std::iter::empty::<(&str, u32)>()),
            next: None,
            layout: Arc::new(Layout::default()),
            seen: BTreeMap::new(),
            members,
            alive: BTreeSet::new(),
            version: 1,
            epoch: 0,
            ready: false,
            served: false,
        });
        let (view_tx, view_rx) = watch::channel(view);
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let stats = Arc::new(GossipStats::default());
        let driver = Driver::new(id, cfg, socket, view_tx, stats.clone());
        let membership = Membership {
            view: view_rx,
            commands: cmd_tx,
            stats,
            members_seen: driver.members_seen.clone(),
            fatal: driver.fatal.clone(),
        };
        (membership, driver.into_worker(cmd_rx, leave))
    }

    /// A handle on a view set by the caller, with no gossip behind it (unit tests of the
    /// services): `members()` answers `None`.
    pub fn fixed(view: ClusterView) -> (Membership, watch::Sender<Arc<ClusterView>>) {
        let (view_tx, view_rx) = watch::channel(Arc::new(view));
        let (commands, _) = mpsc::channel(1);
        let membership = Membership {
            view: view_rx,
            commands,
            stats: Arc::new(GossipStats::default()),
            members_seen: Default::default(),
            fatal: Default::default(),
        };
        (membership, view_tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(version: u64, digest: u64) -> LayoutId {
        LayoutId { version, digest }
    }

    /// A view of a, b, c, d as `me` sees it, every member up and seen with its layout.
    fn agreed(layout: layout::Layout, me: &str) -> ClusterView {
        let mut v = crate::testkit::view(&["a", "b", "c", "d"], me, &["a", "b", "c", "d"]);
        v.epoch = layout.digest();
        v.ring = layout.current_ring();
        v.layout = Arc::new(layout);
        let id = v.layout_id();
        for m in ["a", "b", "c", "d"] {
            v.seen
                .insert(m.into(), crate::testkit::layout_seen(id, id, id));
        }
        v
    }

    /// A node removed from the ring while the cluster could not reach it (paused, partitioned:
    /// its process kept running) hands nothing over when it is back, although this process saw
    /// it own ranges: tombstone GC did not wait for it, so what it holds may predate purged
    /// deletes (found in review: the guard only caught a restart). A node that left (in
    /// contact, handing its ranges off) still hands over what it holds.
    #[test]
    fn a_node_removed_while_unreachable_hands_nothing_over_even_without_a_restart() {
        let before = crate::testkit::view(&["a", "b", "c", "d"], "d", &["a", "b", "c", "d"])
            .layout
            .as_ref()
            .clone();
        // The layout after `change`, committed (with d up or down) and switched.
        let after = |change: layout::Change, d_up: bool| {
            before
                .commit(1, &[change], &|n: &str| d_up || n != "d")
                .unwrap()
                .switched()
                .unwrap()
        };
        let removed = after(layout::Change::Remove { node: "d".into() }, false);
        let mut guard = HandOverGuard::new(false);
        assert_eq!(
            guard.withheld(&agreed(before.clone(), "d")),
            None,
            "an owner"
        );
        let why = guard.withheld(&agreed(removed.clone(), "d"));
        assert!(
            why.as_deref().is_some_and(|w| w.contains("removed")),
            "removed while unreachable: {why:?}"
        );
        let left = after(layout::Change::Leave { node: "d".into() }, true);
        let mut guard = HandOverGuard::new(false);
        assert_eq!(guard.withheld(&agreed(before.clone(), "d")), None);
        assert_eq!(
            guard.withheld(&agreed(left, "d")),
            None,
            "a node that left hands over what it holds"
        );
        // Even on a data dir new at its start (its process may have run on, unreachable).
        let mut wiped = HandOverGuard::new(true);
        assert!(wiped.withheld(&agreed(removed, "d")).is_some());
    }

    /// The oldest layout in flight is the oldest guard still alive.
    #[test]
    fn write_epochs_track_the_oldest_layout_a_write_in_flight_started_under() {
        let e = Arc::new(WriteEpochs::default());
        assert_eq!(e.oldest(), None);
        let a = e.enter(id(4, 9));
        let b = e.enter(id(4, 9));
        let c = e.enter(id(5, 1));
        let d = e.enter(id(4, 10));
        assert_eq!(e.oldest(), Some(id(4, 9)));
        drop(a);
        assert_eq!(
            e.oldest(),
            Some(id(4, 9)),
            "one write of v4 is still in flight"
        );
        drop(b);
        assert_eq!(
            e.oldest(),
            Some(id(4, 10)),
            "a write under the other layout of v4 (greater digest) is"
        );
        drop(d);
        assert_eq!(e.oldest(), Some(id(5, 1)));
        drop(c);
        assert_eq!(e.oldest(), None);
    }

    /// The layout worker publishes `drained` from the view it read, then the writes in
    /// flight. A write that read its view just before a new layout was published, and entered
    /// just after the worker looked, would be coordinated under the old layout (its old
    /// replicas only) while every node says nothing older than the new one is in flight: the
    /// gainers' pulls could pass its key before it lands (found in review). Whatever the
    /// interleaving, the layout a write is coordinated under is at least the `drained` the
    /// worker published without seeing it.
    #[test]
    fn a_write_entered_as_a_new_layout_is_published_is_coordinated_under_it() {
        let epochs = Arc::new(WriteEpochs::default());
        let published = std::cell::Cell::new(id(4, 1));
        let drained = std::cell::Cell::new(None);
        let mut reads = 0;
        let (guard, layout) = epochs.enter_with(
            || {
                reads += 1;
                let seen = published.get();
                if reads == 1 {
                    // The worker's tick, between this read and the write's enter: the new
                    // layout is published, and no write is in flight yet.
                    published.set(id(5, 1));
                    let version = published.get();
                    drained.set(Some(epochs.oldest().map_or(version, |o| o.min(version))));
                }
                seen
            },
            |l| *l,
        );
        let drained = drained.get().expect("the worker ran");
        assert_eq!(drained, id(5, 1), "the worker did not see the write");
        assert!(
            layout >= drained,
            "coordinated under {layout:?}, though the worker published drained {drained:?}"
        );
        assert_eq!(
            epochs.oldest(),
            Some(layout),
            "the write is in flight under it"
        );
        drop(guard);
        assert_eq!(epochs.oldest(), None);
        // Without a tick in between, one read and one enter.
        let (_g, layout) = epochs.enter_with(|| id(5, 1), |l| *l);
        assert_eq!(layout, id(5, 1));
        assert_eq!(epochs.oldest(), Some(id(5, 1)));
    }

    /// Two claimants committed version 2 concurrently: the view holds the one with the
    /// greater digest; a member with the other one, or still coordinating a write begun under
    /// it, is behind, though the versions are equal.
    #[test]
    fn a_member_with_the_other_layout_of_the_same_version_is_behind() {
        let mut v = crate::testkit::b_replaced_by_d(&["b", "c", "d"]);
        let mut other = (*v.layout).clone();
        other.next = Some(other.current.clone());
        let (mine, theirs) = (v.layout.id(), other.id());
        assert_eq!((mine.version, theirs.version), (2, 2));
        assert_ne!(mine, theirs);
        // The view holds the greater one (what every node converges on).
        let (greater, lesser) = if mine > theirs {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        if greater != mine {
            v.layout = Arc::new(other);
            v.epoch = greater.digest;
        }
        assert_eq!(v.layout_id(), greater);
        let seen = |layout: LayoutId, drained: LayoutId| {
            crate::testkit::layout_seen(layout, LayoutId::default(), drained)
        };
        for m in ["a", "b", "c", "d"] {
            v.seen.insert(m.into(), seen(greater, greater));
        }
        assert!(v.members_behind().is_empty());
        v.seen.insert("b".into(), seen(lesser, lesser));
        assert_eq!(
            v.members_behind(),
            vec!["b"],
            "b has the other layout of v2"
        );
        v.seen.insert("b".into(), seen(greater, lesser));
        assert_eq!(
            v.members_behind(),
            vec!["b"],
            "b still coordinates a write begun under the other layout of v2"
        );
        v.seen.insert("b".into(), seen(greater, greater));
        v.alive.remove("c");
        v.seen.insert("c".into(), seen(lesser, lesser));
        assert!(
            v.members_behind().is_empty(),
            "a member that is down is not waited for"
        );
    }
}
