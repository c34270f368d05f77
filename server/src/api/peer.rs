//! Peer frames: the handshake first (in `rpc::handshake`), then each message family to the
//! service that serves it.

use std::net::SocketAddr;
use std::sync::Arc;

use ringkv_protocol::peer::{PeerRequest, PeerResponse, SessionRequest, SessionResponse};
use ringkv_protocol::{ErrorKind, Frame};

use crate::aae::service::AntiEntropy;
use crate::cluster::ClusterService;
use crate::coordinator::Coordinator;
use crate::handoff::Handoff;
use crate::metrics::ListenerMetrics;
use crate::net::{FrameHandler, Reply};
use crate::replica::Replica;
use crate::rpc::{Authenticator, ListenerHandshake};

/// Everything a peer connection dispatches to (shared by all peer connections).
pub struct PeerApi {
    pub auth: Arc<Authenticator>,
    pub replica: Arc<Replica>,
    pub coordinator: Arc<Coordinator>,
    pub handoff: Arc<Handoff>,
    pub aae: Arc<AntiEntropy>,
    pub cluster: Arc<ClusterService>,
    pub net: ListenerMetrics,
}

impl PeerApi {
    /// Serves one request of an authenticated connection.
    async fn dispatch(&self, req: PeerRequest) -> PeerResponse {
        match req {
            PeerRequest::Session(SessionRequest::Ping) => {
                PeerResponse::Session(SessionResponse::Pong)
            }
            // The handshake answered these (`ListenerHandshake::step`).
            PeerRequest::Session(SessionRequest::Hello(_) | SessionRequest::HelloProof(_)) => {
                self.auth.error(
                    ErrorKind::InvalidRequest,
                    "the handshake is already complete on this connection".into(),
                )
            }
            PeerRequest::Replica(req) => self.replica.serve(req).await,
            PeerRequest::Coordinator(req) => self.coordinator.serve_peer(req).await,
            PeerRequest::Handoff(req) => self.handoff.serve(req).await,
            PeerRequest::Aae(req) => self.aae.serve(req).await,
            PeerRequest::Cluster(req) => self.cluster.serve(req).await,
        }
    }
}

/// One incoming peer connection: its handshake state and the shared dispatch.
pub struct PeerHandler {
    api: Arc<PeerApi>,
    handshake: ListenerHandshake,
}

impl PeerHandler {
    pub fn new(api: Arc<PeerApi>, remote: SocketAddr) -> PeerHandler {
        PeerHandler {
            api,
            handshake: ListenerHandshake::new(remote),
        }
    }
}

impl FrameHandler for PeerHandler {
    async fn handle(self: Arc<Self>, frame: Frame) -> Reply {
        let id = frame.request_id;
        let reply = |resp: PeerResponse, close: bool| Reply {
            frame: resp.to_frame(id),
            close,
        };
        let req = match PeerRequest::decode(frame.opcode, frame.body) {
            Ok(r) => r,
            Err(e) => {
                self.api.net.malformed.inc();
                let resp = self
                    .api
                    .auth
                    .error(ErrorKind::Malformed, format!("malformed peer request: {e}"));
                // Before the handshake nothing but the handshake is understood.
                return reply(resp, !self.admitted());
            }
        };
        match self.handshake.step(&self.api.auth, &req) {
            Some((resp, close)) => reply(resp, close),
            None => reply(self.api.dispatch(req).await, false),
        }
    }

    fn admitted(&self) -> bool {
        self.handshake.is_done()
    }

    fn admission_timed_out(&self) {
        self.api.auth.timed_out(self.handshake.remote());
    }
}
