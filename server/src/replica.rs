//! The replica service: what peers ask of a replica of a key (the replica message family):
//! read this node's copy, merge a state into it. Both are bounded by the time the coordinator
//! has left, and a merge never overwrites (version-vector `sync`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ringkv_protocol::peer::{PeerResponse, ReplicaRequest, ReplicaResponse};
use ringkv_protocol::ErrorKind;

use crate::membership::{DataGate, NoData};
use crate::storage::{HexKey, ReadGate, Store, WriteOp};
use crate::version::KeyState;

crate::metrics::metric_set! {
    /// Requests served as a replica (registered under `peer.`).
    pub struct ReplicaMetrics {
        read_local: Counter = "read_local", "replica reads served to coordinators";
        replicate: Counter = "replicate", "replicated states merged for coordinators";
    }
}

pub struct Replica {
    node_id: String,
    store: Arc<Store>,
    pub metrics: ReplicaMetrics,
    /// Whether this node's copy of a key may answer a coordinator's read.
    gate: ReadGate,
    /// Whether this node takes data now: retired, it refuses all replica traffic; not knowing
    /// the ring yet, replica writes.
    takes_data: DataGate,
    /// Whether this node replicates a key in its own ring view (now, or in the next ring while
    /// a change runs): a read of a key it does not is refused, not answered with nothing.
    owns: ReadGate,
}

impl Replica {
    pub fn new(node_id: String, store: Arc<Store>, gate: ReadGate) -> Replica {
        Replica {
            node_id,
            store,
            metrics: ReplicaMetrics::default(),
            gate,
            takes_data: Arc::new(|| None),
            owns: crate::storage::open_gate(),
        }
    }

    /// Refuse reads of keys `owns` says this node does not replicate.
    pub fn with_ownership(mut self, owns: ReadGate) -> Replica {
        self.owns = owns;
        self
    }

    /// Refuse replica traffic while `gate` says this node is retired, and replica writes while
    /// it says the node does not know the ring yet.
    pub fn with_data_gate(mut self, gate: DataGate) -> Replica {
        self.takes_data = gate;
        self
    }

    fn error(&self, kind: ErrorKind, definite: bool, msg: String) -> PeerResponse {
        PeerResponse::error(kind, definite, format!("node {}: {msg}", self.node_id))
    }

    pub async fn serve(&self, req: ReplicaRequest) -> PeerResponse {
        match (self.takes_data)() {
            Some(NoData::Retired) => {
                return NoData::Retired.refusal(&self.node_id, "replica traffic");
            }
            Some(NoData::NotReady) if matches!(req, ReplicaRequest::Replicate { .. }) => {
                return NoData::NotReady.refusal(&self.node_id, "a replica write");
            }
            _ => {}
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

    /// A replica read refused before anything was read (definite): no answer for the quorum.
    fn refuse_read(&self, key: &[u8], why: &str) -> PeerResponse {
        self.error(
            ErrorKind::Unavailable {
                alive: 0,
                needed: 1,
            },
            true,
            format!("key {}: {why}", HexKey(key.to_vec())),
        )
    }

    async fn read_local(&self, key: Bytes, timeout_ms: u32) -> PeerResponse {
        self.metrics.read_local.inc();
        // A coordinator whose view is behind (paused across a ring change's switch) asks an
        // old owner that released the key: its empty copy would count toward R and hide writes
        // acknowledged under the new layout (found in review). Refused, it counts as no answer.
        if !(self.owns)(&key) {
            return self.refuse_read(
                &key,
                "this node does not replicate the key in its ring view (a ring change moved \
                 it); the reading coordinator's view is behind",
            );
        }
        if !(self.gate)(&key) {
            return self.refuse_read(
                &key,
                "not synced yet: this node's data dir is new and anti-entropy has not synced \
                 the key's range from every other replica",
            );
        }
        let limit = Duration::from_millis(timeout_ms as u64);
        // The stored bytes are the wire encoding of the state: sent as they are, and the
        // coordinator decodes (and names this replica if they do not decode).
        let deadline = std::time::Instant::now() + limit;
        let state = match self.store.read_stored_by(&key, deadline).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryEngine;

    /// A read of a key this node does not replicate in its view is refused (definite), not
    /// answered with its empty copy; a key it replicates is read.
    #[tokio::test]
    async fn a_read_of_a_key_this_node_does_not_replicate_is_refused() {
        let store = crate::testkit::open_store(Arc::new(MemoryEngine::new()), "a");
        let replica = Replica::new("a".into(), store, crate::storage::open_gate())
            .with_ownership(Arc::new(|key: &[u8]| key != b"moved"));
        let read = |key: &'static [u8]| ReplicaRequest::ReadLocal {
            key: Bytes::from_static(key),
            timeout_ms: 1000,
        };
        match replica.serve(read(b"moved")).await {
            PeerResponse::Error(e) => {
                assert!(
                    e.definite && matches!(e.kind, ErrorKind::Unavailable { .. }),
                    "{e:?}"
                );
                assert!(
                    e.message.contains("node a") && e.message.contains("does not replicate"),
                    "{}",
                    e.message
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            replica.serve(read(b"kept")).await,
            PeerResponse::Replica(ReplicaResponse::State(_))
        ));
    }
}
