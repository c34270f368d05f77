//! Inter-node RPC: the outgoing `PeerPool` (one multiplexed connection per peer, handshake,
//! reconnect with backoff) and the incoming `PeerHandler` (handshake, then requests).
//!
//! Every connection is mutually authenticated with the cluster secret before anything else is
//! served (`ringkv_protocol::auth`): the dialer sends `Hello` with a fresh nonce, the listener
//! answers a `Challenge` with its own nonce and its proof, the dialer checks it and sends its
//! proof, the listener checks that and answers `HelloAck`. Refusals are counted and logged
//! with the remote address (at most one line per reason per `REFUSAL_LOG_INTERVAL`), never
//! with the secret.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringkv_client::conn::{Conn, ConnError};
use ringkv_protocol::auth::{PeerKey, Role, Transcript, NONCE_LEN};
use ringkv_protocol::peer::{Challenge, Hello, MemberInfo, PeerRequest, PeerResponse};
use ringkv_protocol::{ErrorKind, ErrorReply, Frame};
use tracing::warn;

use super::{FrameHandler, Reply};
use crate::metrics::inc;
use crate::node::Node;

/// How long a new peer connection may take to complete the handshake before it is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Refusals of the same kind are logged at most this often (each one is counted).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

/// At most one log line per refusal reason per interval: a stranger hammering the peer port
/// must not flood the log. Counters record every refusal.
#[derive(Default)]
pub struct RefusalLog {
    last: Mutex<HashMap<&'static str, Instant>>,
}

impl RefusalLog {
    pub fn due(&self, reason: &'static str) -> bool {
        let mut last = self.last.lock().expect("refusal log lock poisoned");
        let now = Instant::now();
        match last.get(reason) {
            Some(t) if now.duration_since(*t) < REFUSAL_LOG_INTERVAL => false,
            _ => {
                last.insert(reason, now);
                true
            }
        }
    }
}

/// What a node presents when it dials a peer.
pub struct PeerIdentity {
    pub cluster: String,
    pub n: u8,
    pub me: MemberInfo,
    pub key: PeerKey,
}

/// Requests queued per peer connection.
pub const PEER_PIPELINE_DEPTH: usize = 4096;
/// First and longest wait before reconnecting to a peer that could not be reached. Short
/// enough that a restarted node is used again within about a second.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(1000);
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The request was not sent (connect or handshake failed, or backing off).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The connection broke after sending: the outcome is unknown.
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The peer answered with an error.
    #[error("{}: {}", .0.kind.name(), .0.message)]
    Remote(ErrorReply),
}

impl PeerError {
    /// True when the request certainly did not reach the peer.
    pub fn not_sent(&self) -> bool {
        matches!(self, PeerError::Unreachable(_))
    }
}

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
    identity: PeerIdentity,
    /// Source IP of outgoing connections: this node's peer listen IP (unless unspecified).
    local_ip: Option<std::net::IpAddr>,
    slots: Mutex<HashMap<String, Arc<PeerSlot>>>,
    next_id: AtomicU64,
    /// Peers we dialed that failed to prove the secret (or refused ours).
    pub auth_failures: AtomicU64,
    refusals: RefusalLog,
}

impl PeerPool {
    pub fn new(identity: PeerIdentity) -> PeerPool {
        let local_ip = identity
            .me
            .peer_addr
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        PeerPool {
            identity,
            local_ip,
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            auth_failures: AtomicU64::new(0),
            refusals: RefusalLog::default(),
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
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&conn, addr))
            .await
            .map_err(|_| format!("handshake timed out after {HANDSHAKE_TIMEOUT:?}"))??;
        Ok(conn)
    }

    /// One round trip of the handshake.
    async fn exchange(&self, conn: &Conn, req: PeerRequest) -> Result<PeerResponse, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = conn
            .call(req.to_frame(id))
            .await
            .map_err(|e| format!("handshake failed: {e:?}"))?;
        PeerResponse::decode(frame.opcode, frame.body)
            .map_err(|e| format!("undecodable handshake reply: {e}"))
    }

    /// The dialer's side of the handshake: the listener proves the secret first.
    async fn handshake(&self, conn: &Conn, addr: &str) -> Result<(), String> {
        let me = &self.identity.me;
        let dialer_nonce = nonce();
        let hello = PeerRequest::Hello(Hello {
            cluster: self.identity.cluster.clone(),
            n: self.identity.n,
            me: me.clone(),
            nonce: dialer_nonce,
        });
        let challenge = match self.exchange(conn, hello).await? {
            PeerResponse::Challenge(c) => c,
            PeerResponse::Error(e) => return Err(self.refused(addr, &e)),
            other => return Err(format!("unexpected handshake reply {other:?}")),
        };
        let transcript = Transcript {
            dialer_nonce: &dialer_nonce,
            listener_nonce: &challenge.nonce,
            dialer_id: &me.node_id,
            listener_id: &challenge.me.node_id,
        };
        let key = &self.identity.key;
        if !key.verify(Role::Listener, &transcript, &challenge.proof) {
            self.auth_failures.fetch_add(1, Ordering::Relaxed);
            if self.refusals.due("listener proof") {
                warn!(node = %me.node_id, peer = addr, claimed = %challenge.me.node_id,
                      "peer failed to prove the cluster secret (another secret, or not a ringkv node of this cluster); not using it");
            }
            return Err(format!(
                "peer {} ({addr}) failed to prove the cluster secret",
                challenge.me.node_id
            ));
        }
        let proof = PeerRequest::HelloProof(key.proof(Role::Dialer, &transcript));
        match self.exchange(conn, proof).await? {
            PeerResponse::HelloAck => Ok(()),
            PeerResponse::Error(e) => Err(self.refused(addr, &e)),
            other => Err(format!("unexpected handshake reply {other:?}")),
        }
    }

    fn refused(&self, addr: &str, e: &ErrorReply) -> String {
        if e.kind == ErrorKind::Unauthenticated {
            self.auth_failures.fetch_add(1, Ordering::Relaxed);
        }
        if self.refusals.due(e.kind.name()) {
            warn!(node = %self.identity.me.node_id, peer = addr, kind = e.kind.name(), cause = %e.message,
                  "peer refused our handshake");
        }
        format!("handshake refused: {}: {}", e.kind.name(), e.message)
    }

    /// Sends one request and waits for its reply, at most `timeout`.
    pub async fn call(
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

/// Where the listener's side of one connection's handshake stands.
enum Handshake {
    /// Waiting for `Hello`.
    Start,
    /// `Challenge` sent; waiting for the dialer's proof.
    Challenged {
        dialer_nonce: [u8; NONCE_LEN],
        listener_nonce: [u8; NONCE_LEN],
        dialer_id: String,
    },
    /// Authenticated: peer requests are served.
    Done,
    /// Refused: the connection is closing.
    Failed,
}

/// Serves one incoming peer connection: the handshake first, then peer requests.
pub struct PeerHandler {
    pub node: Arc<Node>,
    pub remote: SocketAddr,
    state: Mutex<Handshake>,
    done: AtomicBool,
    refusals: Arc<RefusalLog>,
}

impl PeerHandler {
    pub fn new(node: Arc<Node>, remote: SocketAddr, refusals: Arc<RefusalLog>) -> PeerHandler {
        PeerHandler {
            node,
            remote,
            state: Mutex::new(Handshake::Start),
            done: AtomicBool::new(false),
            refusals,
        }
    }

    fn error(&self, kind: ErrorKind, msg: String) -> PeerResponse {
        PeerResponse::Error(ErrorReply {
            kind,
            definite: true,
            message: format!("node {}: {msg}", self.node.config.node_id),
        })
    }

    /// Refuses the connection: counted, logged (rate-limited) with the remote address.
    fn refuse(&self, reason: &'static str, detail: String) -> PeerResponse {
        inc(&self.node.requests.peer_auth_failures);
        *self.state.lock().expect("handshake lock poisoned") = Handshake::Failed;
        if self.refusals.due(reason) {
            warn!(node = %self.node.config.node_id, remote = %self.remote, reason, %detail,
                  "refused peer connection");
        }
        self.error(ErrorKind::Unauthenticated, format!("{reason}: {detail}"))
    }

    /// One step of the handshake; `None` once it is complete (serve the request).
    fn handshake(&self, req: &PeerRequest) -> Option<(PeerResponse, bool)> {
        let node = &self.node;
        let mut state = self.state.lock().expect("handshake lock poisoned");
        if matches!(*state, Handshake::Done) {
            return None;
        }
        // Any step that does not set a new state leaves the connection refused.
        let step = std::mem::replace(&mut *state, Handshake::Failed);
        match (step, req) {
            (Handshake::Start, PeerRequest::Hello(hello)) => {
                if let Err(msg) = node.check_hello(hello, self.remote) {
                    return Some((self.error(ErrorKind::WrongCluster, msg), true));
                }
                let listener_nonce = nonce();
                let transcript = Transcript {
                    dialer_nonce: &hello.nonce,
                    listener_nonce: &listener_nonce,
                    dialer_id: &hello.me.node_id,
                    listener_id: &node.me.node_id,
                };
                let proof = node.peer_key.proof(Role::Listener, &transcript);
                *state = Handshake::Challenged {
                    dialer_nonce: hello.nonce,
                    listener_nonce,
                    dialer_id: hello.me.node_id.clone(),
                };
                Some((
                    PeerResponse::Challenge(Challenge {
                        me: node.me.clone(),
                        nonce: listener_nonce,
                        proof,
                    }),
                    false,
                ))
            }
            (
                Handshake::Challenged {
                    dialer_nonce,
                    listener_nonce,
                    dialer_id,
                },
                PeerRequest::HelloProof(proof),
            ) => {
                let transcript = Transcript {
                    dialer_nonce: &dialer_nonce,
                    listener_nonce: &listener_nonce,
                    dialer_id: &dialer_id,
                    listener_id: &node.me.node_id,
                };
                if node.peer_key.verify(Role::Dialer, &transcript, proof) {
                    *state = Handshake::Done;
                    self.done.store(true, Ordering::Release);
                    Some((PeerResponse::HelloAck, false))
                } else {
                    drop(state);
                    let detail =
                        format!("peer claiming to be {dialer_id} did not prove the cluster secret");
                    Some((self.refuse("bad proof", detail), true))
                }
            }
            (Handshake::Failed, _) => Some((
                self.error(ErrorKind::Unauthenticated, "handshake failed".into()),
                true,
            )),
            (_, other) => {
                drop(state);
                let what = format!(
                    "request 0x{:02x} out of handshake order",
                    other.to_frame(0).opcode
                );
                Some((self.refuse("request before handshake", what), true))
            }
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
                inc(&self.node.peer_net.malformed);
                let resp = self.error(ErrorKind::Malformed, format!("malformed peer request: {e}"));
                // Before the handshake nothing but the handshake is understood.
                return reply(resp, !self.admitted());
            }
        };
        match self.handshake(&req) {
            Some((resp, close)) => reply(resp, close),
            None => reply(self.node.handle_peer(req).await, false),
        }
    }

    fn admitted(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn admission_timed_out(&self) {
        inc(&self.node.requests.peer_auth_failures);
        if self.refusals.due("handshake timeout") {
            warn!(node = %self.node.config.node_id, remote = %self.remote, timeout = ?HANDSHAKE_TIMEOUT,
                  "refused peer connection: no completed handshake in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
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
                    PeerRequest::Hello(hello) => {
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
                        PeerResponse::Challenge(Challenge { me, nonce, proof })
                    }
                    PeerRequest::HelloProof(_) => PeerResponse::HelloAck,
                    _ => PeerResponse::Pong,
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
        let pool = PeerPool::new(identity("the-secret"));
        let err = pool
            .call(&addr, &PeerRequest::Ping, Duration::from_secs(2))
            .await
            .expect_err("must not talk to an unproven listener");
        assert!(err.not_sent(), "{err}");
        assert!(
            err.to_string()
                .contains("failed to prove the cluster secret"),
            "{err}"
        );
        assert_eq!(pool.auth_failures.load(Ordering::Relaxed), 1);
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
        let pool = PeerPool::new(identity("the-secret"));
        let resp = pool
            .call(&addr, &PeerRequest::Ping, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(resp, PeerResponse::Pong);
        drop(pool);
        let opcodes = listener.await.unwrap();
        use ringkv_protocol::peer::peer_opcode::*;
        assert_eq!(opcodes, vec![HELLO, HELLO_PROOF, PING]);
    }
}
