//! Inter-node RPC: the peer pool (outgoing connections), the authenticated handshake (both
//! sides), and the fan-out helper every coordinating service uses.
//!
//! Services talk to peers through the [`Transport`] trait (the pool in production, scripted
//! replies in the coordinator's unit tests), never through sockets.

pub mod fanout;
pub mod handshake;
pub mod pool;

use std::sync::Arc;
use std::time::Duration;

use ringkv_protocol::peer::{PeerRequest, PeerResponse};
use ringkv_protocol::ErrorReply;
use std::future::Future;

pub use fanout::{FanOut, LateReplies, LateWait, Tracker};
pub use handshake::{Authenticator, ListenerHandshake, PeerIdentity, HANDSHAKE_TIMEOUT};
pub use pool::{PeerPool, PEER_PIPELINE_DEPTH};

/// Sends one request to the peer at `addr` and waits for its reply, at most `timeout`. The
/// future owns everything it needs, so unfinished calls can move to a background task.
/// Services are generic over it (not `dyn`): a peer call is on every request's path, and a
/// boxed future per call showed in the allocator's share of a profile.
pub trait Transport: Send + Sync + 'static {
    fn call(
        self: Arc<Self>,
        addr: String,
        req: PeerRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<PeerResponse, PeerError>> + Send + 'static;
}

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
    /// What was left of the request's deadline ran out before it was sent (while its
    /// connection was dialed or it was queued behind others): never sent, nothing done.
    #[error("not sent: its {0} ms ran out before it could be sent")]
    Expired(u32),
    /// The peer answered with an error.
    #[error("{}: {}", .0.kind.name(), .0.message)]
    Remote(ErrorReply),
}

impl PeerError {
    /// True when the request certainly did not reach the peer.
    pub fn not_sent(&self) -> bool {
        matches!(self, PeerError::Unreachable(_) | PeerError::Expired(_))
    }
}
