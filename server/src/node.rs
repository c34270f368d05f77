//! The root: opens storage, binds the listeners, builds the services, registers every metric,
//! starts the workers, serves, and shuts down in order (listeners, then workers within a
//! deadline, then storage). Nothing imports this module but `lib.rs` and `main.rs`.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use ringkv_protocol::limits::{MAX_HANDSHAKE_BODY_LEN, MAX_PEER_BODY_LEN, MAX_REQUEST_BODY_LEN};
use ringkv_protocol::peer::MemberInfo;

use crate::aae::exchange::AaeWorker;
use crate::aae::gc::{GcMetrics, GcWorker};
use crate::aae::release::{ReleaseMetrics, ReleaseWorker};
use crate::aae::scan::TreeScanWorker;
use crate::aae::service::AntiEntropy;
use crate::aae::transfer::{TransferMetrics, TransferStatus, TransferWorker};
use crate::api::admin::Admin;
use crate::api::client::{ClientApi, ClientHandler};
use crate::api::peer::{PeerApi, PeerHandler};
use crate::api::RequestMetrics;
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
use crate::storage::store::{StoreOpenError, MAX_QUEUE_BYTES, QUEUE_CAPACITY};
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
        generation: now_ms(),
    };
    let auth = Arc::new(Authenticator::new(PeerIdentity {
        cluster: config.cluster_name.clone(),
        n: config.n,
        me: me.clone(),
        key: PeerKey::new(&config.cluster_secret, &config.cluster_name),
    }));
    let pool = Arc::new(PeerPool::new(auth.clone()));
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
        layout_file: Some(config.data_dir.join(LAYOUT_FILE)),
        auto_join: config.auto_join,
        phi: PhiConfig {
            threshold: config.phi_threshold,
            ..PhiConfig::default()
        },
        vnodes: config.vnodes,
    };
    let registry = Arc::new(Registry::default());
    let runner = Runner::new(node_id.clone(), registry.clone());
    let (membership, membership_worker) =
        Membership::start(me.clone(), gossip_socket, swim, shutdown.clone());
    runner.spawn(membership_worker);
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
    let handoff = Arc::new(Handoff::new(node_id.clone(), store.clone(), config.hints));
    runner.spawn(ReplayWorker::new(
        handoff.clone(),
        membership.clone(),
        pool.clone(),
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
        config.aae.transfer_keys_per_sec,
        release_metrics,
    ));
    cluster.metrics.register(&registry, "cluster.");
    let gc_metrics = Arc::new(GcMetrics::default());
    if config.aae.tombstone_gc {
        // Nothing sent before a tombstone's first stability check may land after the second.
        store.limit_peer_writes(std::time::Duration::from_millis(
            config.aae.tombstone_settle_secs * 1000 / 2,
        ));
        runner.spawn(GcWorker::new(
            aae.clone(),
            membership.clone(),
            pool,
            std::time::Duration::from_secs(config.aae.interval_secs),
            std::time::Duration::from_secs(config.aae.tombstone_settle_secs),
            config.aae.keys_per_sec,
            gc_metrics.clone(),
        ));
    }
    let replica = Arc::new(
        Replica::new(node_id.clone(), store.clone(), gate).with_retired({
            let m = membership.clone();
            Arc::new(move || m.view().retired())
        }),
    );
    let requests = RequestMetrics::default();
    let client_net = ListenerMetrics::default();
    let peer_net = ListenerMetrics::default();
    requests.register(&registry, "");
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
    let s = store.clone();
    registry.probe(
        "tombstones.purged",
        "tombstones this node purged (compare-and-delete after two stable checks)",
        move || s.stats().purged.get(),
    );
    register_hints(&registry, &store);
    auth.metrics.register(&registry, "peer.");
    client_net.register(&registry, "net.");
    peer_net.register(&registry, "peer_net.");
    register_storage(&registry, &store);
    membership.stats.register(&registry, "gossip.");
    register_cluster(&registry, &membership);

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
    });
    let peer_api = Arc::new(PeerApi {
        auth,
        replica,
        coordinator,
        handoff,
        aae,
        cluster,
        net: peer_net.clone(),
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
    write_addr_file(&config, client_addr, peer_addr, gossip_addr);
    info!(node = %node_id, client = %client_addr, peer = %peer_addr, gossip = %gossip_addr, cluster = %config.cluster_name,
          seeds = ?config.seeds, n = config.n, r = config.r, w = config.w,
          data_dir = %config.data_dir.display(), sync = %config.sync, "ringkv node ready");

    tokio::join!(
        net::serve(
            client_listener,
            client_cfg,
            client_net,
            move |_remote| Arc::new(ClientHandler {
                api: client_api.clone()
            }),
            shutdown.clone(),
        ),
        net::serve(
            peer_listener,
            peer_cfg,
            peer_net,
            move |remote| Arc::new(PeerHandler::new(peer_api.clone(), remote)),
            shutdown.clone(),
        ),
    );

    // Workers stop before storage closes: nothing writes after the writer drained.
    runner.shutdown(WORKER_SHUTDOWN_DEADLINE).await;
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
    for (name, prop, help) in [
        (
            "rocksdb.estimate_keys",
            "rocksdb.estimate-num-keys",
            "estimated keys in the data column family",
        ),
        (
            "rocksdb.live_sst_bytes",
            "rocksdb.live-sst-files-size",
            "bytes of live SST files",
        ),
        (
            "rocksdb.memtable_bytes",
            "rocksdb.cur-size-all-mem-tables",
            "bytes in memtables",
        ),
        (
            "rocksdb.background_errors",
            "rocksdb.background-errors",
            "RocksDB background errors",
        ),
    ] {
        let engine = store.engine().clone();
        registry.probe(name, help, move || {
            engine.property(Cf::Data, prop).unwrap_or(0)
        });
    }
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

fn register_cluster(registry: &Registry, membership: &Membership) {
    let m = membership.clone();
    registry.probe(
        "cluster.members",
        "ring members, down ones included",
        move || m.view().members.len() as u64,
    );
    let m = membership.clone();
    registry.probe(
        "cluster.members_alive",
        "members available for routing, this node included",
        move || (m.view().alive.len() + 1) as u64,
    );
}
