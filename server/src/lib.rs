//! ringkv node. See docs/architecture.md for the code map and invariants.
//!
//! `main.rs` only parses flags and calls [`run`]; everything else lives here so that tests and
//! tools can embed the pieces.

pub mod config;
pub mod metrics;
pub mod net;
pub mod node;
pub mod storage;
pub mod version;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::node::Node;
use crate::storage::rocks::{RocksConfig, RocksEngine};
use crate::storage::store::StoreOpenError;
use crate::storage::{Engine, Store, StoreConfig};

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

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServerError::Listen {
            node: node_id.clone(),
            addr: config.listen.to_string(),
            cause: e.to_string(),
        });
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.close()).await;
            return Err(e);
        }
    };
    let bound = listener
        .local_addr()
        .expect("bound listener has an address");
    write_addr_file(&config, bound);
    info!(node = %node_id, client = %bound, data_dir = %config.data_dir.display(),
          sync = %config.sync, "ringkv node ready");

    let node = Arc::new(Node::new(config, store.clone()));
    net::serve(listener, node, shutdown).await;

    info!(node = %node_id, "closing storage");
    let s = store.clone();
    let _ = tokio::task::spawn_blocking(move || s.close()).await;
    info!(node = %node_id, "stopped");
    Ok(())
}

fn write_addr_file(config: &Config, bound: std::net::SocketAddr) {
    // Written to a temp name and renamed, so readers never see a partial file.
    let tmp = config.data_dir.join(".ringkv.addr.tmp");
    let ok = std::fs::write(&tmp, format!("client={bound}\n"))
        .and_then(|()| std::fs::rename(&tmp, config.addr_file()));
    if let Err(e) = ok {
        tracing::warn!(node = %config.node_id, error = %e, "could not write the address file");
    }
}
