//! The root: opens storage, binds the listeners, builds the services, registers every metric,
//! starts the workers, serves, and shuts down in order (listeners, then workers within a
//! deadline, then storage). Nothing imports this module but `lib.rs` and `main.rs`.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use ringkv_protocol::limits::{MAX_HANDSHAKE_BODY_LEN, MAX_PEER_BODY_LEN, MAX_REQUEST_BODY_LEN};
use ringkv_protocol::peer::MemberInfo;
use ringkv_protocol::{MemberStatus, RING_STATUS_NAMES, SWIM_STATE_NAMES};

use crate::aae::exchange::AaeWorker;
use crate::aae::gc::{GcMetrics, GcWorker};
use crate::aae::release::{ReleaseMetrics, ReleaseWorker};
use crate::aae::scan::TreeScanWorker;
use crate::aae::service::AntiEntropy;
use crate::aae::transfer::{TransferMetrics, TransferStatus, TransferWorker};
use crate::admission::{Budget, ReplyBytes};
use crate::api::admin::Admin;
use crate::api::client::{ClientApi, ClientHandler};
use crate::api::http::AdminHttp;
use crate::api::peer::{PeerApi, PeerHandler};
use crate::api::RequestMetrics;
use crate::background::load::Rates;
use crate::background::{Progress, RunState, Runner};
use crate::clock::now_ms;
use crate::cluster::worker::LayoutWorker;
use crate::cluster::ClusterService;
use crate::config::Config;
use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::handoff::replay::ReplayWorker;
use crate::handoff::Handoff;
use crate::membership::phi::PhiConfig;
use crate::membership::swim::{self, SwimConfig};
use crate::membership::{Membership, WriteEpochs};
use crate::metrics::{ListenerMetrics, Registry};
use crate::net::{self, ListenerConfig};
use crate::replica::Replica;
use crate::rpc::{Authenticator, LateReplies, PeerIdentity, PeerPool, HANDSHAKE_TIMEOUT};
use crate::storage::hints::HintLimits;
use crate::storage::rocks::{RocksConfig, RocksEngine};
use crate::storage::store::{writer_pressure, StoreOpenError, MAX_QUEUE_BYTES, QUEUE_CAPACITY};
use crate::storage::tree::{open_tree, TreeHook};
use crate::storage::{Cf, Engine, ReadGate, Store, StoreConfig};
use ringkv_protocol::auth::PeerKey;

/// File in the data dir holding the ring: every member's identity and metadata, one JSON line
/// each (loaded at start; its members are also seeds).
pub const RING_FILE: &str = "ring.jsonl";
/// The cluster layout this node has (docs/architecture.md, "Ring changes").
pub const LAYOUT_FILE: &str = "layout.json";
/// The checkpoint of the ranges this node is receiving (`aae::transfer`).
pub const TRANSFER_FILE: &str = "transfer.json";

/// How long shutdown waits for the workers (after the listeners drained) before aborting them.
pub const WORKER_SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// Another, older live process has this node id; the message names it (and this node).
    #[error("{0}")]
    DuplicateNodeId(String),
    /// The saved ring-change grants (`cluster::vote`) cannot be read.
    #[error("node {node}: ring-change grants: {cause}")]
    Votes { node: String, cause: String },
}

/// Runs a node until `shutdown` is cancelled, then stops accepting, lets in-flight requests
/// finish (bounded by `net::SHUTDOWN_GRACE`), drains the writer and closes storage cleanly.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ServerError> {
    let node_id = config.node_id.clone();
    // Started before any listener: frames read during a stall are dated to its start.
    let stalls = crate::clock::StallWatch::global();
    std::fs::create_dir_all(&config.data_dir).map_err(|e| ServerError::DataDir {
        node: node_id.clone(),
        dir: config.data_dir.display().to_string(),
        cause: e.to_string(),
    })?;
    // A stale address file from a previous run must not be mistaken for readiness.
    let _ = std::fs::remove_file(config.addr_file());
    let votes = crate::cluster::vote::Votes::open(
        Some(config.data_dir.join(crate::cluster::vote::VOTES_FILE)),
        config.data_dir.join(LAYOUT_FILE).exists(),
    )
    .map_err(|cause| ServerError::Votes {
        node: node_id.clone(),
        cause,
    })?;

    let rocks_cfg = RocksConfig {
        block_cache_bytes: config.block_cache_mb << 20,
        write_buffer_bytes: config.write_buffer_mb << 20,
    };
    let store_cfg = StoreConfig {
        node_id: node_id.clone(),
        sync: config.sync,
        boot_id: boot_id(),
        new_incarnation: config.new_incarnation,
        hint_limits: HintLimits {
            max_bytes: config.hints.max_bytes,
            max_bytes_per_target: config.hints.max_bytes_per_target,
        },
    };
    let dir = config.data_dir.join("db");
    let tree_node = node_id.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<_, StoreOpenError> {
        let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(&dir, &rocks_cfg)?);
        let (tree, tombstones, ready, how) = open_tree(engine.as_ref(), &tree_node)?;
        info!(node = %tree_node, ?how, "anti-entropy tree open");
        let hook = Box::new(TreeHook::new(
            tree.clone(),
            tombstones.clone(),
            ready.clone(),
        ));
        Ok((
            Store::open_with_hook(engine, store_cfg, Some(hook))?,
            tree,
            tombstones,
            ready,
        ))
    })
    .await
    .expect("storage open task does not panic")
    .map_err(|source| ServerError::Storage {
        node: node_id.clone(),
        source,
    })?;
    let (store, tree, tombstones, tree_ready) = opened;
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
    let admin_listener = match config.admin_listen {
        None => None,
        Some(addr) => match bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                let s = store.clone();
                let _ = tokio::task::spawn_blocking(move || s.close()).await;
                return Err(e);
            }
        },
    };
    let admin_addr = admin_listener
        .as_ref()
        .map(|l| l.local_addr().expect("bound listener has an address"));
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
        generation: boot_generation(&config)?,
    };
    let auth = Arc::new(Authenticator::new(PeerIdentity {
        cluster: config.cluster_name.clone(),
        n: config.n,
        me: me.clone(),
        key: PeerKey::new(config.cluster_secret.expose(), &config.cluster_name),
    }));
    let pool = Arc::new(PeerPool::new(auth.clone()));
    let pool_metrics = pool.metrics.clone();
    // Seeds: the configured ones plus every member of the ring this node saved before.
    let ring_file = config.data_dir.join(RING_FILE);
    let mut seeds = config.seeds.clone();
    for m in swim::load_ring(&node_id, &ring_file) {
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
        layout_file: Some(config.data_dir.join(LAYOUT_FILE)),
        auto_join: config.auto_join,
        phi: PhiConfig {
            threshold: config.phi_threshold,
            ..PhiConfig::default()
        },
        vnodes: config.vnodes,
        generation_file: Some(config.data_dir.join(GENERATION_FILE)),
    };
    let registry = Arc::new(Registry::default());
    let runner = Runner::new(node_id.clone(), registry.clone());
    let (membership, membership_worker) =
        Membership::start(me.clone(), gossip_socket, swim, shutdown.clone());
    runner.spawn(membership_worker);
    // A peer dialed at a member's address must prove itself as that member.
    let view_of = membership.clone();
    pool.expect_nodes(Box::new(move |addr| view_of.view().nodes_at(addr)));
    let (late, late_worker) = LateReplies::new();
    runner.spawn(late_worker);
    observe_writer(&runner, &store);

    let aae = Arc::new(AntiEntropy::new(
        node_id.clone(),
        store.clone(),
        tree.clone(),
        tree_ready,
        membership.clone(),
        config.n as usize,
        config.aae.enabled,
    ));
    let tree_scan = TreeScanWorker::new(
        aae.clone(),
        config.aae.keys_per_sec,
        std::time::Duration::from_secs(config.aae.verify_hours * 3600),
    );
    tree_scan.metrics.register(&registry, "aae.");
    runner.spawn(tree_scan);
    let ready = aae.tree_ready().clone();
    registry.probe(
        "aae.tree_ready_leaves",
        "leaves of the anti-entropy tree trusted (2^20 = all; fewer while it is rebuilt)",
        move || ready.load(std::sync::atomic::Ordering::Relaxed) as u64,
    );
    if store.unsynced() && config.aae.enabled {
        info!(node = %node_id, "the data dir is new: this node answers no replica reads until \
              anti-entropy has synced its ranges from every other replica");
    }
    // A new (or wiped) data dir does not count toward R until anti-entropy synced it.
    let gate: ReadGate = {
        let aae = aae.clone();
        Arc::new(move |key: &[u8]| aae.may_answer(key))
    };
    let write_epochs = Arc::new(WriteEpochs::default());
    let coordinator = Arc::new(
        Coordinator::new(
            CoordinatorConfig::from_config(&config),
            store.clone(),
            pool.clone(),
            membership.clone(),
            late,
        )
        .with_read_gate(gate.clone())
        .with_write_epochs(write_epochs.clone()),
    );
    let takes_data: crate::membership::DataGate = {
        let m = membership.clone();
        Arc::new(move || m.view().takes_no_data())
    };
    let handoff = Arc::new(
        Handoff::new(node_id.clone(), store.clone(), config.hints)
            .with_data_gate(takes_data.clone()),
    );
    runner.spawn(ReplayWorker::new(
        handoff.clone(),
        membership.clone(),
        pool.clone(),
        config.n as usize,
    ));
    if config.aae.enabled {
        runner.spawn(
            AaeWorker::new(
                aae.clone(),
                membership.clone(),
                pool.clone(),
                std::time::Duration::from_secs(config.aae.interval_secs),
                config.aae.keys_per_sec,
                config.aae.kib_per_sec << 10,
                std::time::Duration::from_secs(config.aae.return_after_secs),
            )
            .with_replay_probe({
                let handoff = handoff.clone();
                Arc::new(move |peer: &str| handoff.replay_running_with(peer))
            }),
        );
    }
    let cluster = Arc::new(ClusterService::new(
        node_id.clone(),
        config.n as usize,
        membership.clone(),
        store.clone(),
        pool.clone(),
        votes,
    ));
    runner.spawn(LayoutWorker::new(cluster.clone(), write_epochs.clone()));
    let transfer_metrics = Arc::new(TransferMetrics::default());
    transfer_metrics.register(&registry, "transfer.");
    let transfer_status = TransferStatus::default();
    runner.spawn(TransferWorker::new(
        config.n as usize,
        membership.clone(),
        pool.clone(),
        AaeWorker::new(
            aae.clone(),
            membership.clone(),
            pool.clone(),
            std::time::Duration::from_secs(config.aae.interval_secs),
            config.aae.transfer_keys_per_sec,
            config.aae.transfer_kib_per_sec << 10,
            std::time::Duration::from_secs(config.aae.return_after_secs),
        ),
        Some(config.data_dir.join(TRANSFER_FILE)),
        transfer_metrics,
        transfer_status.clone(),
    ));
    let release_metrics = Arc::new(ReleaseMetrics::default());
    release_metrics.register(&registry, "release.");
    runner.spawn(ReleaseWorker::new(
        config.n as usize,
        membership.clone(),
        store.clone(),
        pool.clone(),
        Rates::new(
            config.aae.transfer_keys_per_sec,
            config.aae.transfer_kib_per_sec << 10,
        ),
        // Data sent to a node before it was retired lands within the settle time (half for
        // the request's deadline, half for the peer-write limit); without GC nothing waits.
        config.aae.settle().unwrap_or_default(),
        release_metrics,
    ));
    cluster.metrics.register(&registry, "cluster.");
    let gc_metrics = Arc::new(GcMetrics::default());
    if let Some(settle) = config.aae.settle() {
        // Nothing sent before a tombstone's first stability check may land after the second.
        store.limit_peer_writes(settle / 2);
        runner.spawn(GcWorker::new(
            aae.clone(),
            membership.clone(),
            pool,
            std::time::Duration::from_secs(config.aae.interval_secs),
            settle,
            config.aae.keys_per_sec,
            gc_metrics.clone(),
        ));
    }
    // A node that knows the ring answers replica reads only for keys it replicates in its view.
    let owns: ReadGate = {
        let membership = membership.clone();
        let n = config.n as usize;
        Arc::new(move |key: &[u8]| {
            let view = membership.view();
            !view.ready || view.replicates(&view.me, ringkv_protocol::ring::key_position(key), n)
        })
    };
    let replica = Arc::new(
        Replica::new(node_id.clone(), store.clone(), gate)
            .with_data_gate(takes_data)
            .with_ownership(owns),
    );
    let requests = RequestMetrics::new(&registry);
    let client_budget = Budget::new(
        "client",
        config.client_budget,
        ReplyBytes::Counted,
        &registry,
    );
    let peer_budget = Budget::new(
        "peer",
        config.peer_budget,
        ReplyBytes::NotCounted,
        &registry,
    );
    {
        // Background work (replay, anti-entropy, transfers, GC) slows down as the client
        // budget, the peer budget (a replica flooded by coordinators) or the writer queue
        // fills.
        let (budget, peers, store) = (client_budget.clone(), peer_budget.clone(), store.clone());
        crate::background::load::set_foreground_pressure(move || {
            let writer = writer_pressure(store.queue_depth(), store.queued_bytes());
            budget.fill().max(peers.fill()).max(writer)
        });
    }
    registry.probe_f64(
        "admission.foreground_pressure_ratio",
        "how full the client budget, the peer budget or the writer queue is, the fullest (1 = full): background work slows past 0.5",
        crate::background::load::foreground_pressure,
    );
    registry.probe_counter(
        "process.stalls",
        "times the process was seen stopped or starved for more than 250 ms (frames read then are dated to the stall's start)",
        move || stalls.stalls.load(std::sync::atomic::Ordering::Relaxed),
    );
    let client_net = ListenerMetrics::default();
    let peer_net = ListenerMetrics::default();
    coordinator.metrics.register(&registry, "");
    replica.metrics.register(&registry, "peer.");
    handoff.metrics.register(&registry, "hints.");
    aae.metrics.register(&registry, "aae.");
    gc_metrics.register(&registry, "tombstones.");
    registry.probe(
        "tombstones.live",
        "tombstone-only keys stored on this node",
        move || tombstones.load(std::sync::atomic::Ordering::Relaxed),
    );
    register_hints(&registry, &store);
    auth.metrics.register(&registry, "peer.");
    pool_metrics.register(&registry, "peer.");
    client_net.register(&registry, "net.");
    peer_net.register(&registry, "peer_net.");
    register_storage(&registry, &store);
    membership.stats.register(&registry, "gossip.");
    register_cluster(&registry, &membership);
    register_workers(&registry, &runner);

    let admin = Arc::new(Admin {
        info: static_info(&config, &me, gossip_addr),
        config: config.clone(),
        membership: membership.clone(),
        registry: registry.clone(),
        workers: runner.clone(),
        store: store.clone(),
        handoff: handoff.clone(),
        tree: tree.clone(),
        aae: aae.clone(),
        cluster: cluster.clone(),
        transfers: transfer_status,
        started: std::time::Instant::now(),
    });
    let client_api = Arc::new(ClientApi {
        node_id: node_id.clone(),
        coordinator: coordinator.clone(),
        admin,
        requests,
        net: client_net.clone(),
        budget: client_budget,
        timeouts: config.timeouts,
        cluster_admin_remote: config.cluster_admin_remote,
    });
    let admin_http = {
        let (m, s, draining) = (membership.clone(), store.clone(), shutdown.clone());
        Arc::new(AdminHttp::new(
            node_id.clone(),
            registry.clone(),
            Box::new(move || node_ready(&m.view(), &s, &draining)),
        ))
    };
    let peer_api = Arc::new(PeerApi {
        auth,
        replica,
        coordinator,
        handoff,
        aae,
        cluster,
        net: peer_net.clone(),
        budget: peer_budget,
        membership: membership.clone(),
    });

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
        max_in_flight: crate::rpc::PEER_PIPELINE_DEPTH,
        unadmitted_max_body: MAX_HANDSHAKE_BODY_LEN,
        admission_timeout: HANDSHAKE_TIMEOUT,
        ..client_cfg.clone()
    };
    if lone {
        // A cluster of one is ready as soon as the gossip worker published its first view:
        // wait for it before announcing the node (the address file), so that a client that
        // connects as soon as the node is announced is not told "joining".
        membership
            .wait_ready(std::time::Duration::from_secs(5))
            .await;
    }
    write_addr_file(&config, client_addr, peer_addr, gossip_addr, admin_addr);
    info!(node = %node_id, client = %client_addr, peer = %peer_addr, gossip = %gossip_addr, admin = ?admin_addr, cluster = %config.cluster_name,
          seeds = ?config.seeds, n = config.n, r = config.r, w = config.w,
          data_dir = %config.data_dir.display(), sync = %config.sync, "ringkv node ready");

    // The admin listener outlives the others: while connections drain, /ready answers 503
    // ("shutting down") and /metrics is still scraped.
    let admin_stop = CancellationToken::new();
    tokio::join!(
        async {
            tokio::join!(
                net::serve(
                    client_listener,
                    client_cfg,
                    client_net,
                    move |remote: std::net::SocketAddr, local: Option<std::net::SocketAddr>| {
                        Arc::new(ClientHandler::new(
                            client_api.clone(),
                            crate::cluster::from_this_host(remote.ip(), local.map(|l| l.ip())),
                        ))
                    },
                    shutdown.clone(),
                ),
                net::serve(
                    peer_listener,
                    peer_cfg,
                    peer_net,
                    move |remote, _local| Arc::new(PeerHandler::new(peer_api.clone(), remote)),
                    shutdown.clone(),
                ),
            );
            admin_stop.cancel();
        },
        async {
            if let Some(listener) = admin_listener {
                crate::api::http::serve(listener, admin_http, admin_stop.clone()).await;
            }
        },
    );

    // Workers stop before storage closes: nothing writes after the writer drained.
    runner.shutdown(WORKER_SHUTDOWN_DEADLINE).await;
    info!(node = %node_id, "closing storage");
    let s = store.clone();
    let _ = tokio::task::spawn_blocking(move || s.close()).await;
    info!(node = %node_id, "stopped");
    match membership.fatal() {
        Some(why) => Err(ServerError::DuplicateNodeId(why)),
        None => Ok(()),
    }
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
    admin: Option<std::net::SocketAddr>,
) {
    // Written to a temp name and renamed, so readers never see a partial file.
    let tmp = config.data_dir.join(".ringkv.addr.tmp");
    let admin = admin.map_or(String::new(), |a| format!("admin={a}\n"));
    let ok = std::fs::write(
        &tmp,
        format!("client={client}\npeer={peer}\ngossip={gossip}\n{admin}"),
    )
    .and_then(|()| std::fs::rename(&tmp, config.addr_file()));
    if let Err(e) = ok {
        tracing::warn!(node = %config.node_id, error = %e, "could not write the address file");
    }
}

/// This process's SWIM generation (`swim::next_generation`), persisted (written, fsynced and
/// renamed into `<data_dir>/generation`) before the node joins.
fn boot_generation(config: &Config) -> Result<u64, ServerError> {
    use crate::membership::swim::{load_generation, next_generation, save_generation};
    let path = config.data_dir.join(GENERATION_FILE);
    let generation = next_generation(load_generation(&path), now_ms());
    save_generation(&path, generation).map_err(|e| ServerError::DataDir {
        node: config.node_id.clone(),
        dir: path.display().to_string(),
        cause: format!("cannot write the process generation: {e}"),
    })?;
    Ok(generation)
}

/// The file in the data dir holding the last process's SWIM generation.
pub const GENERATION_FILE: &str = "generation";

/// Settings `status` shows, fixed at start.
fn static_info(
    config: &Config,
    me: &MemberInfo,
    gossip: std::net::SocketAddr,
) -> Vec<(String, String)> {
    vec![
        ("cluster_name".into(), config.cluster_name.clone()),
        ("listen".into(), me.client_addr.clone()),
        ("peer_listen".into(), me.peer_addr.clone()),
        ("gossip_listen".into(), gossip.to_string()),
        ("data_dir".into(), config.data_dir.display().to_string()),
        ("sync_mode".into(), config.sync.to_string()),
        ("replication_factor".into(), config.n.to_string()),
        ("default_r".into(), config.r.to_string()),
        ("default_w".into(), config.w.to_string()),
        ("vnodes".into(), config.vnodes.to_string()),
        ("phi_threshold".into(), config.phi_threshold.to_string()),
    ]
}

/// The storage writer is a thread of its own (blocking RocksDB calls), not a runner task: the
/// runner lists it with a status read from the store.
fn observe_writer(runner: &Runner, store: &Arc<Store>) {
    let store = store.clone();
    runner.observe("writer", move || {
        let depth = store.queue_depth();
        let state = if !store.is_running() {
            RunState::Stopped
        } else if depth > 0 {
            RunState::Busy
        } else {
            RunState::Idle
        };
        let progress = Progress {
            detail: format!(
                "{} of {QUEUE_CAPACITY} jobs, {} of {MAX_QUEUE_BYTES} bytes queued; {} batches",
                depth,
                store.queued_bytes(),
                store.stats().batches.get()
            ),
            queue: Some(depth as u64),
        };
        (state, progress)
    });
}

/// The store's metrics, its queue, and the engine's properties.
fn register_storage(registry: &Registry, store: &Arc<Store>) {
    store.stats().register(registry, "storage.");
    let s = store.clone();
    registry.probe_family(
        "storage.actor_info",
        "this node's current actor id, as the label actor (hex); the value is 1",
        move || {
            vec![(
                vec![("actor".to_string(), format!("{:016x}", s.actor()))],
                1.0,
            )]
        },
    );
    let s = store.clone();
    registry.probe(
        "storage.writer_queue",
        "write jobs waiting for the writer thread",
        move || s.queue_depth() as u64,
    );
    let s = store.clone();
    registry.probe(
        "storage.writer_queue_bytes",
        "bytes of write jobs waiting for the writer thread",
        move || s.queued_bytes() as u64,
    );
    // Per column family (data, meta, hints, aae): a series each.
    for (name, prop, help) in [
        (
            "rocksdb.estimate_keys",
            "rocksdb.estimate-num-keys",
            "estimated keys, per column family",
        ),
        (
            "rocksdb.live_sst_bytes",
            "rocksdb.live-sst-files-size",
            "bytes of live SST files, per column family",
        ),
        (
            "rocksdb.memtable_bytes",
            "rocksdb.cur-size-all-mem-tables",
            "bytes in memtables, per column family",
        ),
        (
            "rocksdb.pending_compaction_bytes",
            "rocksdb.estimate-pending-compaction-bytes",
            "bytes RocksDB estimates compaction must rewrite, per column family (write stalls follow when high)",
        ),
        (
            "rocksdb.total_sst_bytes",
            "rocksdb.total-sst-files-size",
            "bytes of all SST files (obsolete ones not yet deleted included), per column family",
        ),
    ] {
        let engine = store.engine().clone();
        registry.probe_family(name, help, move || {
            Cf::ALL
                .iter()
                .filter_map(|cf| {
                    let v = engine.property(*cf, prop)?;
                    Some((vec![("cf".to_string(), cf.name().to_string())], v as f64))
                })
                .collect()
        });
    }
    // Whole database. RocksDB's count of background errors (failed flushes and compactions:
    // it then refuses writes until it recovers) only rises: a counter.
    let engine = store.engine().clone();
    registry.probe_counter(
        "rocksdb.background_errors",
        "RocksDB background errors (failed flushes and compactions) since the node started",
        move || {
            engine
                .property(Cf::Data, "rocksdb.background-errors")
                .unwrap_or(0)
        },
    );
    for (name, prop, help) in [
        (
            "rocksdb.write_stopped",
            "rocksdb.is-write-stopped",
            "1 while RocksDB stops writes (too many L0 files or pending compaction bytes)",
        ),
        (
            "rocksdb.delayed_write_rate_bytes_per_second",
            "rocksdb.actual-delayed-write-rate",
            "bytes/s RocksDB slows writes to while it stalls them (0 = no stall)",
        ),
        (
            "rocksdb.running_compactions",
            "rocksdb.num-running-compactions",
            "compactions running now",
        ),
    ] {
        let engine = store.engine().clone();
        registry.probe(name, help, move || {
            engine.property(Cf::Data, prop).unwrap_or(0)
        });
    }
    // Write stalls since the node started, counted by RocksDB per column family and kind: a
    // stop or slowdown shorter than the scrape interval still shows.
    let engine = store.engine().clone();
    registry.probe_counter_family(
        "rocksdb.write_stalls",
        "times RocksDB delayed (kind=delay) or stopped (kind=stop) writes, per column family",
        move || {
            let mut out = Vec::new();
            for cf in Cf::ALL {
                let Some(text) = engine.property_text(cf, "rocksdb.cf-write-stall-stats") else {
                    continue;
                };
                for (kind, field) in [("delay", "total-delays"), ("stop", "total-stops")] {
                    if let Some(n) = crate::storage::rocks::stall_count(&text, field) {
                        let labels = vec![
                            ("cf".to_string(), cf.name().to_string()),
                            ("kind".to_string(), kind.to_string()),
                        ];
                        out.push((labels, n as f64));
                    }
                }
            }
            out
        },
    );
}

/// The hint store: what the writer changed, and what is pending now.
fn register_hints(registry: &Registry, store: &Arc<Store>) {
    store.hint_stats().register(registry, "hints.");
    let s = store.clone();
    registry.probe(
        "hints.pending_keys",
        "hints held for other nodes",
        move || s.hint_book().totals().0,
    );
    let s = store.clone();
    registry.probe(
        "hints.pending_bytes",
        "bytes of hints held for other nodes",
        move || s.hint_book().totals().1,
    );
    let s = store.clone();
    registry.probe(
        "hints.pending_targets",
        "nodes this node holds hints for",
        move || s.hint_book().targets().len() as u64,
    );
    let s = store.clone();
    registry.probe_family(
        "hints.pending_bytes_by_target",
        "bytes of hints held for each target node",
        move || {
            s.hint_book()
                .targets()
                .iter()
                .map(|(target, t)| {
                    (
                        vec![("target".to_string(), target.to_string())],
                        t.bytes as f64,
                    )
                })
                .collect()
        },
    );
    let s = store.clone();
    registry.probe(
        "hints.oldest_age_seconds",
        "age of the oldest hint held (0 = none)",
        move || {
            let oldest = s
                .hint_book()
                .targets()
                .values()
                .filter_map(|t| t.oldest_ms())
                .min();
            oldest.map_or(0, |ms| now_ms().saturating_sub(ms) / 1000)
        },
    );
}

/// `/ready`: the node knows the ring, its storage is open, and it is neither shutting down
/// nor taken out of the ring.
fn node_ready(
    view: &crate::membership::ClusterView,
    store: &Store,
    draining: &CancellationToken,
) -> Result<(), String> {
    if draining.is_cancelled() {
        return Err("shutting down (draining its connections)".into());
    }
    if !store.is_running() {
        return Err("its storage is closed".into());
    }
    if !view.ready {
        return Err("joining: the ring is not known yet".into());
    }
    if view.retired() {
        return Err(format!(
            "taken out of the ring by layout v{}",
            view.layout.version
        ));
    }
    Ok(())
}

/// Every worker's state as a labelled gauge (1 for the state it is in).
fn register_workers(registry: &Registry, runner: &Arc<Runner>) {
    let r = runner.clone();
    registry.probe_family(
        "workers.state",
        "background workers by state (1 = the worker is in this state)",
        move || {
            let mut out = Vec::new();
            for w in r.statuses() {
                for state in [
                    RunState::Busy,
                    RunState::Idle,
                    RunState::BackingOff,
                    RunState::Stopped,
                ] {
                    out.push((
                        vec![
                            ("worker".to_string(), w.name.clone()),
                            ("state".to_string(), state.name().replace(' ', "_")),
                        ],
                        (w.state == state) as u8 as f64,
                    ));
                }
            }
            out
        },
    );
}

/// The members this node sees: `all` of them, or only those that count as members
/// (`swim::counted_member`: not retired, and when down an owner now or after the running change).
fn counted_members(m: &Membership, all: bool) -> Vec<MemberStatus> {
    let layout = m.view().layout.clone();
    let mut members = m.members_seen().map(|r| r.members).unwrap_or_default();
    members.retain(|x| all || crate::membership::swim::counted_member(&layout, x));
    members
}

/// A `cluster.members_by_*` family: the members this node sees (`all`, or those that count,
/// `counted_members`), counted under `label` by `name_of` (every one of `names` exported, 0
/// when none; other names are not counted).
fn register_members_by(
    registry: &Registry,
    membership: &Membership,
    family: &'static str,
    help: &'static str,
    (label, names): (&'static str, &'static [&'static str]),
    name_of: fn(&MemberStatus) -> &'static str,
    all: bool,
) {
    let m = membership.clone();
    registry.probe_family(family, help, move || {
        let mut counts = vec![0u32; names.len()];
        for x in counted_members(&m, all) {
            if let Some(i) = names.iter().position(|n| *n == name_of(&x)) {
                counts[i] += 1;
            }
        }
        names
            .iter()
            .zip(counts)
            .map(|(n, c)| (vec![(label.to_string(), n.to_string())], f64::from(c)))
            .collect()
    });
}

fn register_cluster(registry: &Registry, membership: &Membership) {
    let m = membership.clone();
    registry.probe_fraction_family(
        "gossip.phi",
        "phi-accrual suspicion of each peer (above the threshold = unavailable; absent until a first heartbeat, or for a restarted peer until 20 s without one)",
        move || {
            m.members_seen()
                .map(|r| {
                    r.members
                        .iter()
                        .filter(|x| !x.is_self && x.phi_milli != u32::MAX)
                        .map(|x| {
                            (
                                vec![("peer".to_string(), x.node_id.clone())],
                                x.phi_milli as f64 / 1000.0,
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        },
    );
    register_members_by(
        registry,
        membership,
        "cluster.members_by_state",
        "ring members by SWIM state as this node sees them (alive, suspect, down; owners now or after the running change, and running non-owners: not removed nodes)",
        ("state", &SWIM_STATE_NAMES),
        MemberStatus::swim_state_name,
        false,
    );
    register_members_by(
        registry,
        membership,
        "cluster.members_by_ring_status",
        "ring members by their place in the layout as this node sees them (joining, normal, leaving, removed)",
        ("status", &RING_STATUS_NAMES),
        MemberStatus::ring_status_name,
        true,
    );
    let m = membership.clone();
    registry.probe(
        "cluster.layout_version",
        "version of the cluster layout this node has (rises with every committed ring change)",
        move || m.view().layout.version,
    );
    let m = membership.clone();
    registry.probe(
        "cluster.ring_epoch",
        "fingerprint of the ring this node routes by (equal on nodes that agree; changes with membership)",
        move || m.view().epoch & ((1 << 53) - 1),
    );
    let m = membership.clone();
    registry.probe(
        "cluster.members",
        "ring members, down ones included (as cluster.members_by_state counts them: not removed nodes)",
        move || counted_members(&m, false).len() as u64,
    );
    let m = membership.clone();
    registry.probe(
        "cluster.members_alive",
        "members available for routing, this node included",
        move || (m.view().alive.len() + 1) as u64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryEngine;
    use crate::testkit::{open_store, view};

    /// `/ready` refuses, naming why, a node that must get no traffic: draining, storage
    /// closed, ring not known yet, taken out of the ring.
    #[test]
    fn ready_names_each_reason_a_node_must_get_no_traffic() {
        let store = open_store(Arc::new(MemoryEngine::new()), "a");
        let draining = CancellationToken::new();
        let mut v = view(&["a", "b", "c"], "a", &["b", "c"]);
        assert_eq!(node_ready(&v, &store, &draining), Ok(()));
        let refused = |v: &crate::membership::ClusterView| {
            node_ready(v, &store, &draining).expect_err("not ready")
        };
        v.ready = false;
        assert!(refused(&v).contains("ring is not known"), "{}", refused(&v));
        v.ready = true;
        let mut layout = (*v.layout).clone();
        layout.retired.insert("a".into());
        v.layout = Arc::new(layout);
        assert!(
            refused(&v).contains("taken out of the ring"),
            "{}",
            refused(&v)
        );
        store.close();
        assert!(refused(&v).contains("storage is closed"), "{}", refused(&v));
        draining.cancel();
        assert!(refused(&v).contains("shutting down"), "{}", refused(&v));
    }
}
