//! ringkv node. See docs/architecture.md for the code map and invariants.
//!
//! `main.rs` only parses flags and calls [`run`]; everything else lives here so that tests and
//! tools can embed the pieces.

pub mod config;
pub mod coordinator;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod node;
pub mod ring;
pub mod storage;
pub mod version;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use ringkv_protocol::limits::{MAX_HANDSHAKE_BODY_LEN, MAX_PEER_BODY_LEN, MAX_REQUEST_BODY_LEN};
use ringkv_protocol::peer::MemberInfo;

use crate::config::Config;
use crate::membership::phi::PhiConfig;
use crate::membership::swim::{self, SwimConfig};

/// File in the data dir holding the ring: every member's identity and metadata, one JSON line
/// each (loaded at start; its members are also seeds).
pub const RING_FILE: &str = "ring.jsonl";
use crate::membership::Membership;
use crate::net::client::ClientHandler;
use crate::net::peer::{PeerHandler, PeerIdentity, PeerPool, RefusalLog, HANDSHAKE_TIMEOUT};
use crate::net::ListenerConfig;
use crate::node::Node;
use crate::storage::rocks::{RocksConfig, RocksEngine};
use crate::storage::store::StoreOpenError;
use crate::storage::{Engine, Store, StoreConfig};
use ringkv_protocol::auth::PeerKey;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("node {node}: cannot create data dir {dir}: {cause}")]
    DataDir {
        node: String,
        dir: String,
        cause: String,
    },
    #[error("node {node}: {source}")]
    Storage {
        node: String,
        #[source]
        source: StoreOpenError,
    },
    #[error("node {node}: cannot listen on {addr}: {cause}")]
    Listen {
        node: String,
        addr: String,
        cause: String,
    },
}

/// Runs a node until `shutdown` is cancelled, then stops accepting, lets in-flight requests
/// finish (bounded by `net::SHUTDOWN_GRACE`), drains the writer and closes storage cleanly.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ServerError> {
    let node_id = config.node_id.clone();
    std::fs::create_dir_all(&config.data_dir).map_err(|e| ServerError::DataDir {
        node: node_id.clone(),
        dir: config.data_dir.display().to_string(),
        cause: e.to_string(),
    })?;
    // A stale address file from a previous run must not be mistaken for readiness.
    let _ = std::fs::remove_file(config.addr_file());

    let rocks_cfg = RocksConfig {
        block_cache_bytes: config.block_cache_mb << 20,
        write_buffer_bytes: config.write_buffer_mb << 20,
    };
    let store_cfg = StoreConfig {
        node_id: node_id.clone(),
        sync: config.sync,
        boot_id: boot_id(),
        new_incarnation: config.new_incarnation,
    };
    let dir = config.data_dir.join("db");
    let store = tokio::task::spawn_blocking(move || -> Result<Store, StoreOpenError> {
        let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(&dir, &rocks_cfg)?);
        Store::open(engine, store_cfg)
    })
    .await
    .expect("storage open task does not panic")
    .map_err(|source| ServerError::Storage {
        node: node_id.clone(),
        source,
    })?;
    let store = Arc::new(store);

    let bind = |addr: std::net::SocketAddr| {
        let node_id = node_id.clone();
        async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| ServerError::Listen {
                    node: node_id,
                    addr: addr.to_string(),
                    cause: e.to_string(),
                })
        }
    };
    let listeners = match bind(config.listen).await {
        Ok(c) => bind(config.peer_listen).await.map(|p| (c, p)),
        Err(e) => Err(e),
    };
    let (client_listener, peer_listener) = match listeners {
        Ok(l) => l,
        Err(e) => {
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.close()).await;
            return Err(e);
        }
    };
    let client_addr = client_listener
        .local_addr()
        .expect("bound listener has an address");
    let peer_addr = peer_listener
        .local_addr()
        .expect("bound listener has an address");
    let gossip_socket = match tokio::net::UdpSocket::bind(config.gossip_listen).await {
        Ok(sock) => sock,
        Err(e) => {
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.close()).await;
            return Err(ServerError::Listen {
                node: node_id.clone(),
                addr: format!("{} (udp)", config.gossip_listen),
                cause: e.to_string(),
            });
        }
    };
    let gossip_addr = gossip_socket
        .local_addr()
        .expect("bound socket has an address");
    if config.default_secret {
        tracing::warn!(
            node = %node_id,
            "no --cluster-secret given: gossip is authenticated with the built-in default \
             secret, which anyone can know; set one for any real deployment"
        );
    }

    let me = MemberInfo {
        node_id: node_id.clone(),
        client_addr: client_addr.to_string(),
        peer_addr: peer_addr.to_string(),
        vnodes: config.vnodes,
        generation: node::now_ms(),
    };
    let peers = Arc::new(PeerPool::new(PeerIdentity {
        cluster: config.cluster_name.clone(),
        n: config.n,
        me: me.clone(),
        key: PeerKey::new(&config.cluster_secret, &config.cluster_name),
    }));
    // Seeds: the configured ones plus every member of the ring this node saved before.
    let ring_file = config.data_dir.join(RING_FILE);
    let mut seeds = config.seeds.clone();
    for m in swim::load_ring(&ring_file) {
        if m.id.node_id != node_id && m.id.gossip != gossip_addr && !seeds.contains(&m.id.gossip) {
            seeds.push(m.id.gossip);
        }
    }
    let lone = seeds.is_empty();
    let swim = SwimConfig {
        cluster_name: config.cluster_name.clone(),
        secret: config.cluster_secret.clone(),
        seeds,
        ring_file: Some(ring_file),
        lone,
        phi: PhiConfig {
            threshold: config.phi_threshold,
            ..PhiConfig::default()
        },
        vnodes: config.vnodes,
    };
    let membership = Membership::start(me.clone(), gossip_socket, swim, shutdown.clone());
    let node = Arc::new(Node::new(
        config.clone(),
        store.clone(),
        peers,
        membership,
        me,
        gossip_addr.to_string(),
    ));

    let client_cfg = ListenerConfig {
        node_id: node_id.clone(),
        kind: "client",
        max_connections: config.max_connections,
        max_in_flight: config.max_in_flight,
        max_request_body: MAX_REQUEST_BODY_LEN,
        // Clients are not authenticated (the client port is for applications).
        unadmitted_max_body: MAX_REQUEST_BODY_LEN,
        admission_timeout: std::time::Duration::MAX,
    };
    let peer_cfg = ListenerConfig {
        kind: "peer",
        // Peers multiplex everything on one connection each; replicated states can be as
        // large as a whole key state at its bounds, once the peer has authenticated.
        max_request_body: MAX_PEER_BODY_LEN,
        max_in_flight: crate::net::peer::PEER_PIPELINE_DEPTH,
        unadmitted_max_body: MAX_HANDSHAKE_BODY_LEN,
        admission_timeout: HANDSHAKE_TIMEOUT,
        ..client_cfg.clone()
    };
    write_addr_file(&config, client_addr, peer_addr, gossip_addr);
    info!(node = %node_id, client = %client_addr, peer = %peer_addr, gossip = %gossip_addr, cluster = %config.cluster_name,
          seeds = ?config.seeds, n = config.n, r = config.r, w = config.w,
          data_dir = %config.data_dir.display(), sync = %config.sync, "ringkv node ready");

    let client_node = node.clone();
    let peer_node = node.clone();
    let refusals = Arc::new(RefusalLog::default());
    tokio::join!(
        net::serve(
            client_listener,
            client_cfg,
            node.client_net.clone(),
            move |_remote| Arc::new(ClientHandler {
                node: client_node.clone()
            }),
            shutdown.clone(),
        ),
        net::serve(
            peer_listener,
            peer_cfg,
            node.peer_net.clone(),
            move |remote| Arc::new(PeerHandler::new(
                peer_node.clone(),
                remote,
                refusals.clone()
            )),
            shutdown.clone(),
        ),
    );

    info!(node = %node_id, "closing storage");
    let s = store.clone();
    let _ = tokio::task::spawn_blocking(move || s.close()).await;
    info!(node = %node_id, "stopped");
    Ok(())
}

/// Where the kernel's boot id is read: it changes on every boot, so a store can tell a process
/// crash (the page cache, holding every written WAL byte, survived) from a machine restart.
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

/// This machine's boot id, or `None` when it cannot be read (every unclean stop then counts as
/// one across a reboot). `RINGKV_BOOT_ID` overrides it: tests set it to simulate a reboot
/// between two runs of a node (docs/operations.md).
pub fn boot_id() -> Option<String> {
    if let Ok(id) = std::env::var("RINGKV_BOOT_ID") {
        return Some(id);
    }
    std::fs::read_to_string(BOOT_ID_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn write_addr_file(
    config: &Config,
    client: std::net::SocketAddr,
    peer: std::net::SocketAddr,
    gossip: std::net::SocketAddr,
) {
    // Written to a temp name and renamed, so readers never see a partial file.
    let tmp = config.data_dir.join(".ringkv.addr.tmp");
    let ok = std::fs::write(
        &tmp,
        format!("client={client}\npeer={peer}\ngossip={gossip}\n"),
    )
    .and_then(|()| std::fs::rename(&tmp, config.addr_file()));
    if let Err(e) = ok {
        tracing::warn!(node = %config.node_id, error = %e, "could not write the address file");
    }
}
