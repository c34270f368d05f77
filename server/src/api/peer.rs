//! Peer frames: the handshake first (in `rpc::handshake`), then each message family to the
//! service that serves it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_protocol::peer::{PeerRequest, PeerResponse, SessionRequest, SessionResponse};
use ringkv_protocol::{ErrorKind, Frame};

use crate::aae::service::AntiEntropy;
use crate::admission::{Budget, ConnShare, Permit};
use crate::cluster::ClusterService;
use crate::coordinator::Coordinator;
use crate::handoff::Handoff;
use crate::membership::Membership;
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
    /// The node-wide budget of peer requests in flight (separate from the clients').
    pub budget: Arc<Budget>,
    pub membership: Membership,
}

impl PeerApi {
    /// Serves one request of an authenticated connection, read at `arrived`: over the peer
    /// budget it is refused `Overloaded`; a request whose sender's deadline passed before it
    /// could run is dropped unexecuted (`Timeout`). An admitted request's place in the
    /// budget comes back with its answer, kept until the reply is written.
    async fn admit_and_dispatch(
        &self,
        mut req: PeerRequest,
        body_len: usize,
        conn: &Arc<ConnShare>,
        peer: Option<&str>,
        arrived: Instant,
    ) -> (PeerResponse, Option<Permit>) {
        // The session family (pings) and layout fetches are never shed: liveness and the
        // ring must get through an overloaded node.
        if matches!(req, PeerRequest::Session(_) | PeerRequest::Cluster(_)) {
            return (self.dispatch(req, arrived).await, None);
        }
        if let Some(refusal) = peer.and_then(|p| self.forfeited(p)) {
            return (refusal, None);
        }
        let waited = arrived.elapsed();
        if let Some(timeout_ms) = req.timeout_ms_mut() {
            let left = Duration::from_millis(*timeout_ms as u64).saturating_sub(waited);
            if left.is_zero() {
                self.budget.expired.inc();
                let resp = self.auth.error(
                    ErrorKind::Timeout { acks: 0, needed: 0 },
                    format!(
                        "peer request dropped unexecuted: its {timeout_ms} ms deadline passed \
                         before it was dispatched (waited {} ms)",
                        waited.as_millis()
                    ),
                );
                return (resp, None);
            }
            *timeout_ms = left.as_millis().clamp(1, u32::MAX as u128) as u32;
        }
        let mut permit = match self.budget.try_admit(conn, body_len) {
            Ok(p) => p,
            Err(shed) => {
                let resp = self.auth.error(
                    ErrorKind::Overloaded {
                        retry_after_ms: self.budget.retry_after_ms(),
                    },
                    format!("{}; nothing was done", shed.describe("peer")),
                );
                return (resp, None);
            }
        };
        let resp = self.dispatch(req, arrived).await;
        permit.answered();
        (resp, Some(permit))
    }

    /// The refusal of every data request (reads, writes, repairs, hints, anti-entropy,
    /// hand-overs) from `peer` if the layout names it forfeited (removed or replaced while
    /// the cluster could not reach it) and it owns nothing: what it holds may predate deletes
    /// whose tombstones were purged without it, whatever path it would come by (a release or
    /// hint replay, an anti-entropy exchange or a read repair run under the layout it had
    /// before it was removed). Its session and layout requests still pass, so it learns it
    /// was removed. The sender's own `HandOverGuard` says the same; this holds even for a
    /// sender that has not learned it yet.
    ///
    /// The same for a retired node recorded `released` (it said it held nothing, and tombstone
    /// GC stopped waiting for it): whatever it holds now reached it after that (found in
    /// review), and is refused too.
    fn forfeited(&self, peer: &str) -> Option<PeerResponse> {
        let view = self.membership.view();
        if view.layout.is_owner(peer) {
            return None;
        }
        let why = if view.layout.forfeited.contains(peer) {
            "was removed from the ring while the cluster could not reach it"
        } else if view.layout.released.contains(peer) {
            "left the ring and said it held nothing"
        } else {
            return None;
        };
        Some(self.auth.error(
            ErrorKind::Unavailable {
                alive: 0,
                needed: 1,
            },
            format!(
                "refused: node {peer} {why} (layout v{}); nothing it holds is taken (stop it \
                 and wipe its data dir)",
                view.layout.version
            ),
        ))
    }

    async fn dispatch(&self, req: PeerRequest, arrived: Instant) -> PeerResponse {
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
            PeerRequest::Coordinator(req) => self.coordinator.serve_peer(req, arrived).await,
            PeerRequest::Handoff(req) => self.handoff.serve(req, arrived).await,
            PeerRequest::Aae(req) => self.aae.serve(req, arrived).await,
            PeerRequest::Cluster(req) => self.cluster.serve(req).await,
        }
    }
}

/// One incoming peer connection: its handshake state and the shared dispatch.
pub struct PeerHandler {
    api: Arc<PeerApi>,
    handshake: ListenerHandshake,
    /// This connection's share of the peer budget (one connection per peer node).
    share: Arc<ConnShare>,
}

impl PeerHandler {
    pub fn new(api: Arc<PeerApi>, remote: SocketAddr) -> PeerHandler {
        PeerHandler {
            api,
            handshake: ListenerHandshake::new(remote),
            share: ConnShare::new(),
        }
    }
}

impl FrameHandler for PeerHandler {
    async fn handle(self: Arc<Self>, frame: Frame, arrived: Instant) -> Reply {
        let id = frame.request_id;
        let len = frame.body.len();
        let reply = |resp: PeerResponse, close: bool| Reply {
            frame: resp.to_frame(id),
            close,
            hold: None,
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
            None => {
                let (resp, hold) = self
                    .api
                    .admit_and_dispatch(req, len, &self.share, self.handshake.peer(), arrived)
                    .await;
                Reply {
                    hold,
                    ..reply(resp, false)
                }
            }
        }
    }

    fn admitted(&self) -> bool {
        self.handshake.is_done()
    }

    fn admission_timed_out(&self) {
        self.api.auth.timed_out(self.handshake.remote());
    }
}
