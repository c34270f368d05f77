//! Inter-node RPC: the outgoing `PeerPool` (one multiplexed connection per peer, handshake,
//! reconnect with backoff) and the incoming `PeerHandler` (handshake check, then requests).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringkv_client::conn::{Conn, ConnError};
use ringkv_protocol::peer::{Hello, PeerRequest, PeerResponse};
use ringkv_protocol::{ErrorKind, ErrorReply, Frame};
use tracing::warn;

use super::{FrameHandler, Reply};
use crate::metrics::inc;
use crate::node::Node;

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
    hello: Hello,
    /// Source IP of outgoing connections: this node's peer listen IP (unless unspecified).
    local_ip: Option<std::net::IpAddr>,
    slots: Mutex<HashMap<String, Arc<PeerSlot>>>,
    next_id: AtomicU64,
}

impl PeerPool {
    pub fn new(hello: Hello) -> PeerPool {
        let local_ip = hello
            .me
            .peer_addr
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        PeerPool {
            hello,
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let hello = PeerRequest::Hello(self.hello.clone()).to_frame(id);
        let frame = tokio::time::timeout(CONNECT_TIMEOUT, conn.call(hello))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| format!("handshake failed: {e:?}"))?;
        match PeerResponse::decode(frame.opcode, frame.body) {
            Ok(PeerResponse::HelloAck(_)) => Ok(conn),
            Ok(PeerResponse::Error(e)) => {
                warn!(node = %self.hello.me.node_id, peer = addr, kind = e.kind.name(), cause = %e.message,
                      "peer refused our handshake");
                Err(format!(
                    "handshake refused: {}: {}",
                    e.kind.name(),
                    e.message
                ))
            }
            Ok(other) => Err(format!("unexpected handshake reply {other:?}")),
            Err(e) => Err(format!("undecodable handshake reply: {e}")),
        }
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

/// Serves one incoming peer connection: the first request must be a valid `Hello`.
pub struct PeerHandler {
    pub node: Arc<Node>,
    pub greeted: AtomicBool,
}

impl FrameHandler for PeerHandler {
    async fn handle(self: Arc<Self>, frame: Frame) -> Reply {
        let id = frame.request_id;
        let node = &self.node;
        let reply = |resp: PeerResponse, close: bool| Reply {
            frame: resp.to_frame(id),
            close,
        };
        let error = |kind: ErrorKind, msg: String| {
            PeerResponse::Error(ErrorReply {
                kind,
                definite: true,
                message: format!("node {}: {msg}", node.config.node_id),
            })
        };
        let req = match PeerRequest::decode(frame.opcode, frame.body) {
            Ok(r) => r,
            Err(e) => {
                inc(&node.peer_net.malformed);
                return reply(
                    error(ErrorKind::Malformed, format!("malformed peer request: {e}")),
                    false,
                );
            }
        };
        match req {
            PeerRequest::Hello(hello) => match node.accept_hello(&hello) {
                Ok(me) => {
                    self.greeted.store(true, Ordering::Release);
                    reply(PeerResponse::HelloAck(me), false)
                }
                Err(msg) => reply(error(ErrorKind::WrongCluster, msg), true),
            },
            _ if !self.greeted.load(Ordering::Acquire) => reply(
                error(
                    ErrorKind::InvalidRequest,
                    "peer request before the Hello handshake".into(),
                ),
                true,
            ),
            req => reply(node.handle_peer(req).await, false),
        }
    }
}
