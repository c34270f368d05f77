//! Cluster membership and liveness (seed-based; SWIM gossip replaces the liveness part later).
//!
//! One task owns the member list and the liveness set; the rest of the node reads an immutable
//! `ClusterView` snapshot from a `watch` channel and reports what it learns through `report`.
//!
//! - A node starts knowing itself and its `--seeds` (peer addresses). Every `GOSSIP_INTERVAL`
//!   it sends its member list to every known member and seed; the reply is the receiver's list.
//!   Lists merge by node id, the newest `generation` (process start time) winning, so every node
//!   converges on the same members and therefore computes the same ring.
//! - Liveness: a member is alive while exchanges with it succeed; a failed exchange (or any
//!   failed RPC the node reports) marks it down until an exchange succeeds again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ringkv_protocol::peer::{MemberInfo, PeerRequest, PeerResponse};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::net::peer::PeerPool;
use crate::ring::{NodeId, Ring};

/// Period of the member-list exchange (which doubles as the liveness probe).
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(500);
/// Deadline of one exchange: a member silent for longer counts as down.
pub const GOSSIP_TIMEOUT: Duration = Duration::from_millis(1000);

/// An immutable snapshot of the cluster as this node sees it.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub me: NodeId,
    pub members: BTreeMap<NodeId, MemberInfo>,
    pub ring: Ring,
    /// Remote members currently reachable (this node is always alive to itself).
    pub alive: BTreeSet<NodeId>,
    /// Bumped on every change of members or liveness.
    pub version: u64,
}

impl ClusterView {
    pub fn is_alive(&self, id: &str) -> bool {
        *self.me == *id || self.alive.contains(id)
    }

    pub fn peer_addr(&self, id: &str) -> Option<&str> {
        self.members.get(id).map(|m| m.peer_addr.as_str())
    }

    pub fn member_list(&self) -> Vec<MemberInfo> {
        self.members.values().cloned().collect()
    }
}

#[derive(Debug)]
pub enum Event {
    /// Member infos learned from a peer (gossip reply or request, handshake).
    Learned(Vec<MemberInfo>),
    Up(NodeId),
    Down(NodeId, String),
}

/// The node's handle on membership.
#[derive(Clone)]
pub struct Membership {
    view: watch::Receiver<Arc<ClusterView>>,
    events: mpsc::UnboundedSender<Event>,
}

impl Membership {
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// Reports what the node learned (e.g. an RPC to a peer failed).
    pub fn report(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Starts the membership task.
    pub fn start(
        me: MemberInfo,
        seeds: Vec<String>,
        peers: Arc<PeerPool>,
        shutdown: CancellationToken,
    ) -> Membership {
        let my_id: NodeId = me.node_id.as_str().into();
        let mut members = BTreeMap::new();
        members.insert(my_id.clone(), me.clone());
        let view = Arc::new(ClusterView {
            me: my_id.clone(),
            ring: Ring::new([(me.node_id.as_str(), me.vnodes)]),
            members,
            alive: BTreeSet::new(),
            version: 1,
        });
        let (view_tx, view_rx) = watch::channel(view);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let task = Task {
            me: my_id,
            seeds,
            peers,
            view: view_tx,
            events_tx: events_tx.clone(),
        };
        tokio::spawn(task.run(events_rx, shutdown));
        Membership {
            view: view_rx,
            events: events_tx,
        }
    }
}

struct Task {
    me: NodeId,
    seeds: Vec<String>,
    peers: Arc<PeerPool>,
    view: watch::Sender<Arc<ClusterView>>,
    events_tx: mpsc::UnboundedSender<Event>,
}

impl Task {
    async fn run(self, mut events: mpsc::UnboundedReceiver<Event>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(GOSSIP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.gossip_round(),
                Some(ev) = events.recv() => {
                    let mut batch = vec![ev];
                    while let Ok(more) = events.try_recv() {
                        batch.push(more);
                    }
                    self.apply(batch);
                }
            }
        }
    }

    /// Sends our member list to every other member and to seeds we have not identified yet.
    fn gossip_round(&self) {
        let view = self.view.borrow().clone();
        let list = view.member_list();
        let mut targets: Vec<(Option<NodeId>, String)> = view
            .members
            .iter()
            .filter(|(id, _)| **id != self.me)
            .map(|(id, m)| (Some(id.clone()), m.peer_addr.clone()))
            .collect();
        for seed in &self.seeds {
            if !view.members.values().any(|m| &m.peer_addr == seed) {
                targets.push((None, seed.clone()));
            }
        }
        for (id, addr) in targets {
            let peers = self.peers.clone();
            let events = self.events_tx.clone();
            let req = PeerRequest::Gossip(list.clone());
            tokio::spawn(async move {
                match peers.call(&addr, &req, GOSSIP_TIMEOUT).await {
                    Ok(PeerResponse::Members(ms)) => {
                        let responder = ms
                            .iter()
                            .find(|m| m.peer_addr == addr)
                            .map(|m| NodeId::from(m.node_id.as_str()))
                            .or(id);
                        let _ = events.send(Event::Learned(ms));
                        if let Some(r) = responder {
                            let _ = events.send(Event::Up(r));
                        }
                    }
                    Ok(other) => {
                        if let Some(id) = id {
                            let _ = events.send(Event::Down(
                                id,
                                format!("unexpected gossip reply {other:?}"),
                            ));
                        }
                    }
                    Err(e) => {
                        if let Some(id) = id {
                            let _ = events.send(Event::Down(id, e.to_string()));
                        }
                    }
                }
            });
        }
    }

    fn apply(&self, events: Vec<Event>) {
        let current = self.view.borrow().clone();
        let mut members = current.members.clone();
        let mut alive = current.alive.clone();
        let mut ring_changed = false;
        for ev in events {
            match ev {
                Event::Learned(infos) => {
                    for info in infos {
                        let id: NodeId = info.node_id.as_str().into();
                        if id == self.me {
                            continue;
                        }
                        match members.get(&id) {
                            Some(known) if known.generation >= info.generation => {}
                            known => {
                                let vnodes_changed = known.is_none_or(|k| k.vnodes != info.vnodes);
                                if known.is_none() {
                                    info!(node = %self.me, member = %id, peer = %info.peer_addr, "member joined");
                                } else {
                                    info!(node = %self.me, member = %id, peer = %info.peer_addr, generation = info.generation, "member restarted");
                                }
                                ring_changed |= vnodes_changed;
                                members.insert(id, info);
                            }
                        }
                    }
                }
                Event::Up(id) => {
                    if id != self.me && members.contains_key(&id) && alive.insert(id.clone()) {
                        info!(node = %self.me, member = %id, "member up");
                    }
                }
                Event::Down(id, cause) => {
                    if alive.remove(&id) {
                        warn!(node = %self.me, member = %id, %cause, "member down");
                    }
                }
            }
        }
        if members == current.members && alive == current.alive {
            return;
        }
        let ring = if ring_changed {
            Ring::new(members.values().map(|m| (m.node_id.as_str(), m.vnodes)))
        } else {
            current.ring.clone()
        };
        self.view.send_replace(Arc::new(ClusterView {
            me: self.me.clone(),
            members,
            ring,
            alive,
            version: current.version + 1,
        }));
    }
}
