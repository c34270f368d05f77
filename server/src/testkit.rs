//! Helpers shared by the unit tests of several modules.

use std::collections::BTreeMap;
use std::time::Duration;

use ringkv_protocol::peer::MemberInfo;

use crate::membership::ClusterView;
use crate::ring::NodeId;

/// The peer address test views give `node`.
pub fn peer_addr(node: &str) -> String {
    format!("{node}.peer:1")
}

/// A ready view of `nodes` (16 vnodes each) as `me` sees it, with `alive` reachable (`me` is
/// always available to itself).
pub fn view(nodes: &[&str], me: &str, alive: &[&str]) -> ClusterView {
    let members: BTreeMap<NodeId, MemberInfo> = nodes
        .iter()
        .map(|id| {
            let info = MemberInfo {
                node_id: id.to_string(),
                client_addr: String::new(),
                peer_addr: peer_addr(id),
                vnodes: 16,
                generation: 1,
            };
            (NodeId::from(*id), info)
        })
        .collect();
    let layout = crate::membership::layout::Layout {
        version: 1,
        current: nodes
            .iter()
            .map(|id| {
                (
                    id.to_string(),
                    crate::membership::layout::Owner::new(id, 16),
                )
            })
            .collect(),
        next: None,
        retired: Default::default(),
        forfeited: Default::default(),
        released: Default::default(),
    };
    ClusterView {
        me: me.into(),
        ring: layout.current_ring(),
        next: None,
        epoch: layout.digest(),
        layout: std::sync::Arc::new(layout),
        seen: BTreeMap::new(),
        members,
        alive: alive.iter().map(|id| NodeId::from(*id)).collect(),
        version: 1,
        ready: true,
        served: true,
    }
}

/// Like [`view`] while a ring change runs from `nodes` to `next` (which may name nodes that
/// are not in `nodes`: they are members too).
pub fn view_changing(nodes: &[&str], next: &[&str], me: &str, alive: &[&str]) -> ClusterView {
    let mut all: Vec<&str> = nodes.to_vec();
    all.extend(next.iter().filter(|n| !nodes.contains(n)));
    let mut v = view(&all, me, alive);
    let owners = |ids: &[&str]| {
        ids.iter()
            .map(|id| {
                (
                    id.to_string(),
                    crate::membership::layout::Owner::new(id, 16),
                )
            })
            .collect()
    };
    let layout = crate::membership::layout::Layout {
        version: 2,
        current: owners(nodes),
        next: Some(owners(next)),
        retired: Default::default(),
        forfeited: Default::default(),
        released: Default::default(),
    };
    v.ring = layout.current_ring();
    v.next = layout.next_ring();
    v.epoch = layout.digest();
    v.layout = std::sync::Arc::new(layout);
    v
}

/// Node "a"'s view while a ring change replacing "b" by "d" runs (N=3 on three nodes: every
/// node replicates every key): the current replicas are a, b, c, the next ones a, c, d.
pub fn b_replaced_by_d(alive: &[&str]) -> ClusterView {
    view_changing(&["a", "b", "c"], &["a", "c", "d"], "a", alive)
}

/// What a member's gossip says of its layout: it has `layout`, completed its transfers for
/// `synced`, and coordinates no write begun under a layout older than `drained`.
pub fn layout_seen(
    layout: crate::membership::layout::LayoutId,
    synced: crate::membership::layout::LayoutId,
    drained: crate::membership::layout::LayoutId,
) -> crate::membership::LayoutSeen {
    crate::membership::LayoutSeen {
        version: layout.version,
        digest: layout.digest,
        synced,
        auto_join: false,
        drained,
        holds_nothing: false,
    }
}

/// Waits (up to 5 s) until `cond` holds.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never happened: {what}");
}

/// A store over `engine` for node `node_id`: group commit, a fixed boot id, default hint
/// limits.
pub fn open_store(
    engine: std::sync::Arc<dyn crate::storage::Engine>,
    node_id: &str,
) -> std::sync::Arc<crate::storage::Store> {
    open_store_syncing(engine, node_id, crate::storage::store::SyncMode::Group)
}

/// `open_store` with the sync mode `sync`.
pub fn open_store_syncing(
    engine: std::sync::Arc<dyn crate::storage::Engine>,
    node_id: &str,
    sync: crate::storage::store::SyncMode,
) -> std::sync::Arc<crate::storage::Store> {
    let config = crate::storage::StoreConfig {
        node_id: node_id.into(),
        sync,
        boot_id: Some("boot".into()),
        new_incarnation: false,
        hint_limits: Default::default(),
    };
    std::sync::Arc::new(crate::storage::Store::open(engine, config).expect("open a test store"))
}
