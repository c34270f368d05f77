//! The replica service: what peers ask of a replica of a key (the replica message family):
//! read this node's copy, merge a state into it. Both are bounded by the time the coordinator
//! has left, and a merge never overwrites (version-vector `sync`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ringkv_protocol::peer::{PeerResponse, ReplicaRequest, ReplicaResponse};
use ringkv_protocol::ErrorKind;

use crate::storage::{HexKey, ReadGate, Store, WriteOp};
use crate::version::KeyState;

crate::metrics::metric_set! {
    /// Requests served as a replica (registered under `peer.`).
    pub struct ReplicaMetrics {
        read_local: Counter = "read_local", "replica reads served to coordinators";
        replicate: Counter = "replicate", "replicated states merged for coordinators";
    }
}

/// Whether a completed plan (left, removed, replaced) took this node out of the ring, as its
/// membership view says now. A retired node is a replica of nothing: its replica and handoff
/// services refuse data.
pub type Retired = Arc<dyn Fn() -> bool + Send + Sync>;

/// The refusal of `what` (replica traffic, a hint) by `node_id`, retired: definite, nothing
/// was done; the sender goes to the key's current owners.
pub(crate) fn retired_refusal(node_id: &str, what: &str) -> PeerResponse {
    PeerResponse::error(
        ErrorKind::Unavailable {
            alive: 0,
            needed: 1,
        },
        true,
        format!(
            "node {node_id}: {what} refused: this node was taken out of the ring by a completed \
             plan (left, removed or replaced): it is a replica of nothing"
        ),
    )
}

pub struct Replica {
    node_id: String,
    store: Arc<Store>,
    pub metrics: ReplicaMetrics,
    /// Whether this node's copy of a key may answer a coordinator's read.
    gate: ReadGate,
    /// Whether a completed plan took this node out of the ring: it then is a replica of
    /// nothing and refuses replica traffic.
    retired: Retired,
}

impl Replica {
    pub fn new(node_id: String, store: Arc<Store>, gate: ReadGate) -> Replica {
        Replica {
            node_id,
            store,
            metrics: ReplicaMetrics::default(),
            gate,
            retired: Arc::new(|| false),
        }
    }

    /// Refuse replica traffic while `retired` says this node is out of the ring.
    pub fn with_retired(mut self, retired: Retired) -> Replica {
        self.retired = retired;
        self
    }

    fn error(&self, kind: ErrorKind, definite: bool, msg: String) -> PeerResponse {
        PeerResponse::error(kind, definite, format!("node {}: {msg}", self.node_id))
    }

    pub async fn serve(&self, req: ReplicaRequest) -> PeerResponse {
        if (self.retired)() {
            return retired_refusal(&self.node_id, "replica traffic");
        }
        match req {
            ReplicaRequest::ReadLocal { key, timeout_ms } => self.read_local(key, timeout_ms).await,
            ReplicaRequest::Replicate {
                key,
                state,
                timeout_ms,
            } => self.merge(key, state, timeout_ms).await,
        }
    }

    async fn read_local(&self, key: Bytes, timeout_ms: u32) -> PeerResponse {
        self.metrics.read_local.inc();
        if !(self.gate)(&key) {
            return self.error(
                ErrorKind::Unavailable {
                    alive: 0,
                    needed: 1,
                },
                true,
                format!(
                    "key {}: not synced yet: this node's data dir is new and anti-entropy has not \
                     synced the key's range from every other replica",
                    HexKey(key.to_vec())
                ),
            );
        }
        let limit = Duration::from_millis(timeout_ms as u64);
        // The stored bytes are the wire encoding of the state: sent as they are, and the
        // coordinator decodes (and names this replica if they do not decode).
        let state = match tokio::time::timeout(limit, self.store.read_stored(&key)).await {
            Ok(Ok(Some(stored))) => Bytes::from(stored),
            Ok(Ok(None)) => Bytes::from(KeyState::new().encode()),
            Ok(Err(e)) => {
                return self.error(
                    ErrorKind::Internal,
                    true,
                    format!("key {}: {e}", HexKey(key.to_vec())),
                )
            }
            Err(_) => {
                return self.error(
                    ErrorKind::Timeout { acks: 0, needed: 1 },
                    true,
                    format!(
                        "key {}: replica read exceeded the {timeout_ms} ms left of the deadline",
                        HexKey(key.to_vec())
                    ),
                )
            }
        };
        PeerResponse::Replica(ReplicaResponse::State(state))
    }

    async fn merge(&self, key: Bytes, state: Bytes, timeout_ms: u32) -> PeerResponse {
        self.metrics.replicate.inc();
        let state = match KeyState::decode(&state) {
            Ok(s) => s,
            Err(e) => {
                return self.error(
                    ErrorKind::Malformed,
                    true,
                    format!("key {}: replicated state: {e}", HexKey(key.to_vec())),
                )
            }
        };
        // Named only if the write fails or times out (formatted then, not on every merge).
        let named = key.clone();
        let what = move || format!("key {}: replica write", HexKey(named.to_vec()));
        // On timeout the merge may still commit later: merges are idempotent.
        let merge = WriteOp::Merge { key, state };
        match self.store.write_within(merge, timeout_ms, what).await {
            Ok(_) => PeerResponse::Replica(ReplicaResponse::Ack),
            Err(e) => self.error(e.kind(), e.is_definite(), e.to_string()),
        }
    }
}
