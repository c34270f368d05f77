//! The outgoing side of inter-node RPC: one multiplexed, authenticated connection per peer,
//! dialed on first use (the dialer's half of the handshake is in `handshake.rs`), reconnected
//! with backoff after a failure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringkv_client::conn::{Conn, ConnError};
use ringkv_protocol::peer::{PeerRequest, PeerResponse};

use super::handshake::{Authenticator, HANDSHAKE_TIMEOUT};
use super::{PeerError, Transport};

/// Requests queued per peer connection.
pub const PEER_PIPELINE_DEPTH: usize = 4096;
/// First and longest wait before reconnecting to a peer that could not be reached. Short
/// enough that a restarted node is used again within about a second.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(1000);
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

#[derive(Default)]
struct Slot {
    conn: Option<Conn>,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: String,
}

/// One peer's connection state: read on every request under a plain lock (no waiting);
/// `dialing` serialises (re)connects so only one request dials.
#[derive(Default)]
struct PeerSlot {
    state: Mutex<Slot>,
    dialing: tokio::sync::Mutex<()>,
}

impl PeerSlot {
    /// The cached outcome, if there is one: a live connection, or the backoff error.
    fn cached(&self, addr: &str) -> Option<Result<Conn, PeerError>> {
        let slot = self.state.lock().expect("peer slot lock poisoned");
        if let Some(c) = slot.conn.as_ref().filter(|c| c.is_alive()) {
            return Some(Ok(c.clone()));
        }
        match slot.retry_at {
            Some(at) if Instant::now() < at => Some(Err(PeerError::Unreachable(format!(
                "{addr}: backing off after: {}",
                slot.last_error
            )))),
            _ => None,
        }
    }
}

pub struct PeerPool {
    auth: Arc<Authenticator>,
    /// Source IP of outgoing connections: this node's peer listen IP (unless unspecified).
    local_ip: Option<std::net::IpAddr>,
    slots: Mutex<HashMap<String, Arc<PeerSlot>>>,
    next_id: AtomicU64,
}

impl PeerPool {
    pub fn new(auth: Arc<Authenticator>) -> PeerPool {
        let local_ip = auth
            .identity
            .me
            .peer_addr
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        PeerPool {
            auth,
            local_ip,
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn slot(&self, addr: &str) -> Arc<PeerSlot> {
        let mut slots = self.slots.lock().expect("peer slot map lock poisoned");
        if let Some(slot) = slots.get(addr) {
            return slot.clone();
        }
        slots.entry(addr.to_string()).or_default().clone()
    }

    async fn conn(&self, addr: &str) -> Result<Conn, PeerError> {
        let slot = self.slot(addr);
        if let Some(cached) = slot.cached(addr) {
            return cached;
        }
        let _dialing = slot.dialing.lock().await;
        // Another request may have connected (or failed) while this one waited.
        if let Some(cached) = slot.cached(addr) {
            return cached;
        }
        let result = self.connect(addr).await;
        let mut slot = slot.state.lock().expect("peer slot lock poisoned");
        match result {
            Ok(c) => {
                *slot = Slot {
                    conn: Some(c.clone()),
                    ..Slot::default()
                };
                Ok(c)
            }
            Err(e) => {
                slot.conn = None;
                slot.backoff =
                    (slot.backoff * 2).clamp(RECONNECT_BACKOFF_MIN, RECONNECT_BACKOFF_MAX);
                slot.retry_at = Some(Instant::now() + slot.backoff);
                slot.last_error = e.clone();
                Err(PeerError::Unreachable(format!("{addr}: {e}")))
            }
        }
    }

    async fn connect(&self, addr: &str) -> Result<Conn, String> {
        let conn =
            Conn::connect_from(addr, self.local_ip, CONNECT_TIMEOUT, PEER_PIPELINE_DEPTH).await?;
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            self.auth.dial(&conn, addr, &self.next_id),
        )
        .await
        .map_err(|_| format!("handshake timed out after {HANDSHAKE_TIMEOUT:?}"))??;
        Ok(conn)
    }

    /// Sends one request and waits for its reply, at most `timeout`.
    pub async fn request(
        &self,
        addr: &str,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let conn = self.conn(addr).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = match tokio::time::timeout(timeout, conn.call(req.to_frame(id))).await {
            Err(_) => return Err(PeerError::Timeout(timeout)),
            Ok(Err(ConnError::Lost(e))) | Ok(Err(ConnError::Protocol(e))) => {
                return Err(PeerError::Lost(format!("{addr}: {e}")))
            }
            Ok(Ok(frame)) => frame,
        };
        match PeerResponse::decode(frame.opcode, frame.body) {
            Ok(PeerResponse::Error(e)) => Err(PeerError::Remote(e)),
            Ok(resp) => Ok(resp),
            Err(e) => Err(PeerError::Lost(format!("{addr}: undecodable reply: {e}"))),
        }
    }
}

impl Transport for PeerPool {
    async fn call(
        self: Arc<Self>,
        addr: String,
        req: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        self.request(&addr, &req, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::PeerIdentity;
    use futures::{SinkExt, StreamExt};
    use ringkv_protocol::auth::{PeerKey, Role, Transcript, NONCE_LEN};
    use ringkv_protocol::peer::{Challenge, MemberInfo, SessionRequest, SessionResponse};
    use ringkv_protocol::{FrameCodec, Inbound};
    use tokio::net::TcpListener;
    use tokio_util::codec::Framed;

    fn identity(secret: &str) -> PeerIdentity {
        PeerIdentity {
            cluster: "ringkv".into(),
            n: 3,
            me: MemberInfo {
                node_id: "n1".into(),
                client_addr: "127.0.0.1:1".into(),
                peer_addr: "127.0.0.1:0".into(),
                vnodes: 8,
                generation: 1,
            },
            key: PeerKey::new(secret, "ringkv"),
        }
    }

    /// A listener that answers `Hello` with a challenge proven with `secret`, and records
    /// whether the dialer ever sent its proof or a request.
    async fn fake_listener(secret: &'static str) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut framed = Framed::new(socket, FrameCodec::new(1 << 20));
            let mut opcodes = Vec::new();
            while let Some(Ok(Inbound::Frame(frame))) = framed.next().await {
                opcodes.push(frame.opcode);
                let req = PeerRequest::decode(frame.opcode, frame.body).unwrap();
                let resp = match req {
                    PeerRequest::Session(SessionRequest::Hello(hello)) => {
                        let nonce = [5u8; NONCE_LEN];
                        let me = MemberInfo {
                            node_id: "n2".into(),
                            ..hello.me.clone()
                        };
                        let t = Transcript {
                            dialer_nonce: &hello.nonce,
                            listener_nonce: &nonce,
                            dialer_id: &hello.me.node_id,
                            listener_id: "n2",
                        };
                        let proof = PeerKey::new(secret, "ringkv").proof(Role::Listener, &t);
                        PeerResponse::Session(SessionResponse::Challenge(Challenge {
                            me,
                            nonce,
                            proof,
                        }))
                    }
                    PeerRequest::Session(SessionRequest::HelloProof(_)) => {
                        PeerResponse::Session(SessionResponse::HelloAck)
                    }
                    _ => PeerResponse::Session(SessionResponse::Pong),
                };
                framed.send(resp.to_frame(frame.request_id)).await.unwrap();
            }
            opcodes
        });
        (addr, task)
    }

    /// A node dials a "peer" that cannot prove the cluster secret: it never sends its own
    /// proof or any request, counts the failure and reports the peer unreachable.
    #[tokio::test]
    async fn a_listener_without_the_secret_is_never_used() {
        let (addr, listener) = fake_listener("not-the-secret").await;
        let pool = PeerPool::new(Arc::new(Authenticator::new(identity("the-secret"))));
        let err = pool
            .request(
                &addr,
                &PeerRequest::Session(SessionRequest::Ping),
                Duration::from_secs(2),
            )
            .await
            .expect_err("must not talk to an unproven listener");
        assert!(err.not_sent(), "{err}");
        assert!(
            err.to_string()
                .contains("failed to prove the cluster secret"),
            "{err}"
        );
        assert_eq!(pool.auth.metrics.auth_failures_outgoing.get(), 1);
        drop(pool);
        let opcodes = listener.await.unwrap();
        assert_eq!(
            opcodes,
            vec![ringkv_protocol::peer::peer_opcode::HELLO],
            "only the Hello was sent"
        );
    }

    /// Control: the same listener with the right secret completes the handshake.
    #[tokio::test]
    async fn a_listener_with_the_secret_is_used() {
        let (addr, listener) = fake_listener("the-secret").await;
        let pool = PeerPool::new(Arc::new(Authenticator::new(identity("the-secret"))));
        let resp = pool
            .request(
                &addr,
                &PeerRequest::Session(SessionRequest::Ping),
                Duration::from_secs(2),
            )
            .await
            .unwrap();
        assert_eq!(resp, PeerResponse::Session(SessionResponse::Pong));
        drop(pool);
        let opcodes = listener.await.unwrap();
        use ringkv_protocol::peer::peer_opcode::*;
        assert_eq!(opcodes, vec![HELLO, HELLO_PROOF, PING]);
    }
}
