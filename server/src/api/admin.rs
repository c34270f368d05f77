//! Admin requests: status (a loop over the metrics registry and the worker runner), the ring,
//! the members.

use std::sync::Arc;
use std::time::Instant;

use ringkv_protocol::{ErrorKind, Response, RingMember, RingReply, StatusReply};

use crate::aae::service::AntiEntropy;
use crate::background::Runner;
use crate::cluster::ClusterService;
use crate::config::Config;
use crate::handoff::Handoff;
use crate::membership::Membership;
use crate::metrics::Registry;
use crate::storage::tree::SharedTree;
use crate::storage::Store;

pub struct Admin {
    pub config: Config,
    pub membership: Membership,
    pub registry: Arc<Registry>,
    pub workers: Arc<Runner>,
    /// Informational lines of `status` fixed at start (addresses, settings).
    pub info: Vec<(String, String)>,
    /// Read for this node's current actor (it changes when the actor is renewed).
    pub store: Arc<Store>,
    /// Pending hints and replay state per target (`hints.target.<node>` lines).
    pub handoff: Arc<Handoff>,
    /// The anti-entropy tree (`aae.tree_root`).
    pub tree: SharedTree,
    /// Anti-entropy: `repair` starts a cycle.
    pub aae: Arc<AntiEntropy>,
    pub cluster: Arc<ClusterService>,
    /// The transfers into this node (`transfer.<source>` lines).
    pub transfers: crate::aae::transfer::TransferStatus,
    pub started: Instant,
}

impl Admin {
    pub fn status(&self) -> StatusReply {
        let view = self.membership.view();
        let mut info = self.info.clone();
        let actor = self.store.actor();
        info.push(("actor".into(), format!("{actor:016x}")));
        info.push(("ring_epoch".into(), format!("{:016x}", view.epoch)));
        // The node's wall clock when it answered (ms since the Unix epoch): clock skew
        // between nodes shows by comparing it with the asker's.
        info.push(("clock_ms".into(), crate::clock::now_ms().to_string()));
        info.extend(
            self.workers
                .statuses()
                .into_iter()
                .map(|w| (format!("worker.{}", w.name), w.summary())),
        );
        info.extend(self.handoff.status_lines());
        info.extend(crate::aae::transfer::status_lines(&self.transfers));
        info.push((
            "layout".into(),
            format!(
                "v{}{}",
                view.layout.version,
                if view.layout.next.is_some() {
                    " (transition running)"
                } else {
                    ""
                }
            ),
        ));
        let root = self.tree.read().expect("tree lock poisoned").root();
        info.push(("aae.tree_root".into(), format!("{root:016x}")));
        StatusReply {
            node_id: self.config.node_id.clone(),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            metrics: self.registry.snapshot(),
            info,
        }
    }

    /// Starts an anti-entropy cycle now (or right after the running one), over the ring
    /// positions `range` only if given.
    pub fn repair(&self, range: Option<(u64, u64)>) -> Response {
        match self.aae.request_cycle(range) {
            Some(reply) => Response::Repair(reply),
            None => Response::error(
                ErrorKind::Unavailable {
                    alive: 0,
                    needed: 1,
                },
                true,
                format!(
                    "node {}: anti-entropy is off on this node (--anti-entropy false)",
                    self.config.node_id
                ),
            ),
        }
    }

    pub fn ring(&self) -> RingReply {
        let view = self.membership.view();
        let members = view
            .ring
            .ownership()
            .into_iter()
            .map(|o| {
                let info = view.members.get(&o.node);
                RingMember {
                    node_id: o.node.to_string(),
                    client_addr: info.map(|i| i.client_addr.clone()).unwrap_or_default(),
                    peer_addr: info.map(|i| i.peer_addr.clone()).unwrap_or_default(),
                    tokens: o.tokens,
                    primary_ppm: (o.primary_share * 1_000_000.0).round() as u32,
                    alive: view.is_alive(&o.node),
                    tokens_of: view
                        .layout
                        .current
                        .get(&*o.node)
                        .map_or_else(|| o.node.to_string(), |m| m.tokens_of.clone()),
                }
            })
            .collect();
        RingReply {
            n: self.config.n,
            r: self.config.r,
            w: self.config.w,
            epoch: view.epoch,
            members,
        }
    }

    /// This node's view of every member, but a node that never joined the ring and has been
    /// gone a while (`swim::gone_outsider`).
    pub async fn members(&self) -> Response {
        match self.membership.members().await {
            Some(mut m) => {
                let layout = self.membership.view().layout.clone();
                m.members
                    .retain(|x| !crate::membership::swim::gone_outsider(&layout, x));
                Response::Members(m)
            }
            None => Response::error(
                ErrorKind::Internal,
                true,
                format!(
                    "node {}: the membership worker is not running",
                    self.config.node_id
                ),
            ),
        }
    }
}
