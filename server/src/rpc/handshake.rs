//! The authenticated peer handshake, both sides, in one place.
//!
//! Every peer connection is mutually authenticated with the cluster secret before anything else
//! is served (`ringkv_protocol::auth`): the dialer sends `Hello` with a fresh nonce, the listener
//! answers a `Challenge` with its own nonce and its proof, the dialer checks it and sends its
//! proof, the listener checks that and answers `HelloAck`. Refusals are counted and logged with
//! the remote address (at most one line per reason and remote per `REFUSAL_LOG_INTERVAL`), never
//! with the secret.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ringkv_client::conn::Conn;
use ringkv_protocol::auth::{PeerKey, Role, Transcript, NONCE_LEN};
use ringkv_protocol::peer::{
    Challenge, Hello, MemberInfo, PeerRequest, PeerResponse, SessionRequest, SessionResponse,
};
use ringkv_protocol::{ErrorKind, ErrorReply};
use tracing::warn;

/// How long a new peer connection may take to complete the handshake before it is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Refusals of the same kind are logged at most this often (each one is counted).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

/// How many (reason, remote) pairs a `RefusalLog` keeps apart; beyond them, remotes share one
/// slot per reason until old entries expire.
pub const REFUSAL_LOG_REMOTES: usize = 64;

/// At most one log line per refusal reason and remote per interval: a stranger hammering the
/// peer port must not flood the log, nor keep another remote's refusal out of it (a genuine
/// misconfiguration elsewhere still gets its line). Counters record every refusal.
#[derive(Default)]
pub struct RefusalLog {
    /// `(reason, remote)` → when last logged; remote `None` is the shared overflow slot.
    last: Mutex<HashMap<(&'static str, Option<String>), Instant>>,
}

impl RefusalLog {
    /// Whether a refusal for `reason` from `remote` (an IP address, or the address dialed) is
    /// to be logged now.
    pub fn due(&self, reason: &'static str, remote: &str) -> bool {
        self.due_at(reason, remote, Instant::now())
    }

    fn due_at(&self, reason: &'static str, remote: &str, now: Instant) -> bool {
        let mut last = self.last.lock().expect("refusal log lock poisoned");
        let mut slot = (reason, Some(remote.to_string()));
        if !last.contains_key(&slot) && last.len() >= REFUSAL_LOG_REMOTES {
            last.retain(|_, t| now.duration_since(*t) < REFUSAL_LOG_INTERVAL);
            if last.len() >= REFUSAL_LOG_REMOTES {
                slot.1 = None;
            }
        }
        match last.get(&slot) {
            Some(t) if now.duration_since(*t) < REFUSAL_LOG_INTERVAL => false,
            _ => {
                last.insert(slot, now);
                true
            }
        }
    }
}

/// What a node presents to its peers.
pub struct PeerIdentity {
    pub cluster: String,
    pub n: u8,
    pub me: MemberInfo,
    /// Derived from the cluster secret: what peers prove knowledge of (never logged).
    pub key: PeerKey,
}

crate::metrics::metric_set! {
    /// Handshake outcomes, both directions (registered under `peer.`).
    pub struct AuthMetrics {
        /// Incoming connections that failed to prove the secret or broke the handshake.
        auth_failures: Counter = "auth_failures", "incoming peer connections refused for authentication";
        /// Peers this node dialed that failed to prove the secret (or refused ours).
        auth_failures_outgoing: Counter = "auth_failures_outgoing", "peers dialed that failed to prove the secret or refused ours";
        /// Incoming handshakes refused for a wrong cluster name or N.
        handshakes_refused: Counter = "handshakes_refused", "incoming handshakes of another cluster or replication factor";
    }
}

/// This node's identity and the shared refusal bookkeeping: dials and answers handshakes.
pub struct Authenticator {
    pub identity: PeerIdentity,
    pub metrics: AuthMetrics,
    refusals: RefusalLog,
}

impl Authenticator {
    pub fn new(identity: PeerIdentity) -> Authenticator {
        Authenticator {
            identity,
            metrics: AuthMetrics::default(),
            refusals: RefusalLog::default(),
        }
    }

    fn node_id(&self) -> &str {
        &self.identity.me.node_id
    }

    /// One round trip of the dialer's handshake.
    async fn exchange(
        &self,
        conn: &Conn,
        req: SessionRequest,
        ids: &AtomicU64,
    ) -> Result<PeerResponse, String> {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let frame = conn
            .call(PeerRequest::Session(req).to_frame(id))
            .await
            .map_err(|e| format!("handshake failed: {e:?}"))?;
        PeerResponse::decode(frame.opcode, frame.body)
            .map_err(|e| format!("undecodable handshake reply: {e}"))
    }

    /// The dialer's side: the listener proves the secret first, and this node sends its own
    /// proof only to a listener that did, and only to one of the `expected` nodes when the
    /// address is known as theirs.
    ///
    /// Found in review: the dialer took whichever node answered. Someone holding an address
    /// nodes still dial (a member's old address, taken over) could pass their `Hello` on to
    /// any node and its `Challenge` back, and pass the dialer's proof on too: the node that
    /// proved itself then served the relay as the dialer, with no secret known.
    pub async fn dial(
        &self,
        conn: &Conn,
        addr: &str,
        expected: &[String],
        ids: &AtomicU64,
    ) -> Result<(), String> {
        let me = &self.identity.me;
        let dialer_nonce = nonce();
        let hello = SessionRequest::Hello(Hello {
            cluster: self.identity.cluster.clone(),
            n: self.identity.n,
            me: me.clone(),
            nonce: dialer_nonce,
        });
        let challenge = match self.exchange(conn, hello, ids).await? {
            PeerResponse::Session(SessionResponse::Challenge(c)) => c,
            PeerResponse::Error(e) => return Err(self.refused(addr, &e)),
            other => return Err(format!("unexpected handshake reply {other:?}")),
        };
        if !expected.is_empty() && !expected.contains(&challenge.me.node_id) {
            self.metrics.auth_failures_outgoing.inc();
            if self.refusals.due("unexpected node", addr) {
                warn!(node = %me.node_id, peer = addr, claimed = ?challenge.me.node_id,
                      expected = ?expected,
                      "the peer address answered as another node (an address taken over, or a member moved); not using it");
            }
            return Err(format!(
                "{addr} answered as node {:?}, not as {} (the node this address belongs to)",
                challenge.me.node_id,
                expected.join(" or ")
            ));
        }
        let transcript = Transcript {
            dialer_nonce: &dialer_nonce,
            listener_nonce: &challenge.nonce,
            dialer_id: &me.node_id,
            listener_id: &challenge.me.node_id,
        };
        let key = &self.identity.key;
        if !key.verify(Role::Listener, &transcript, &challenge.proof) {
            self.metrics.auth_failures_outgoing.inc();
            if self.refusals.due("listener proof", addr) {
                warn!(node = %me.node_id, peer = addr, claimed = ?challenge.me.node_id,
                      "peer failed to prove the cluster secret (another secret, or not a ringkv node of this cluster); not using it");
            }
            return Err(format!(
                "peer {} ({addr}) failed to prove the cluster secret",
                challenge.me.node_id
            ));
        }
        let proof = SessionRequest::HelloProof(key.proof(Role::Dialer, &transcript));
        match self.exchange(conn, proof, ids).await? {
            PeerResponse::Session(SessionResponse::HelloAck) => Ok(()),
            PeerResponse::Error(e) => Err(self.refused(addr, &e)),
            other => Err(format!("unexpected handshake reply {other:?}")),
        }
    }

    fn refused(&self, addr: &str, e: &ErrorReply) -> String {
        if e.kind == ErrorKind::Unauthenticated {
            self.metrics.auth_failures_outgoing.inc();
        }
        if self.refusals.due(e.kind.name(), addr) {
            warn!(node = %self.node_id(), peer = addr, kind = e.kind.name(), cause = ?e.message,
                  "peer refused our handshake");
        }
        format!("handshake refused: {}: {}", e.kind.name(), e.message)
    }

    /// Checks the public part of a peer's `Hello`: same cluster name and replication factor.
    /// (The secret is checked by the challenge–response that follows.)
    fn check_hello(&self, hello: &Hello, remote: SocketAddr) -> Result<(), String> {
        let problem = if hello.cluster != self.identity.cluster {
            Some((
                "cluster name",
                format!(
                    "cluster name {:?} differs from ours {:?}",
                    hello.cluster, self.identity.cluster
                ),
            ))
        } else if hello.n != self.identity.n {
            Some((
                "replication factor",
                format!(
                    "replication factor N={} differs from ours N={}",
                    hello.n, self.identity.n
                ),
            ))
        } else {
            None
        };
        if let Some((reason, p)) = problem {
            self.metrics.handshakes_refused.inc();
            // A misconfigured node redials every second: counted every time, logged at most
            // once per reason per interval.
            if self.refusals.due(reason, &remote.ip().to_string()) {
                warn!(node = %self.node_id(), peer = ?hello.me.node_id, %remote,
                      "refused peer {:?}: {p}", hello.me.node_id);
            }
            return Err(format!("refused peer {}: {p}", hello.me.node_id));
        }
        Ok(())
    }

    /// A connection closed for not completing the handshake in time.
    pub fn timed_out(&self, remote: SocketAddr) {
        self.metrics.auth_failures.inc();
        if self
            .refusals
            .due("handshake timeout", &remote.ip().to_string())
        {
            warn!(node = %self.node_id(), %remote, timeout = ?HANDSHAKE_TIMEOUT,
                  "refused peer connection: no completed handshake in time");
        }
    }

    pub fn error(&self, kind: ErrorKind, msg: String) -> PeerResponse {
        PeerResponse::error(kind, true, format!("node {}: {msg}", self.node_id()))
    }
}

/// Where the listener's side of one connection's handshake stands.
enum Step {
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

/// The listener's side of one incoming connection's handshake.
pub struct ListenerHandshake {
    remote: SocketAddr,
    step: Mutex<Step>,
    /// The node id the dialer proved the secret under, once it has (set when the handshake
    /// completes: `is_done`).
    peer: std::sync::OnceLock<String>,
}

impl ListenerHandshake {
    pub fn new(remote: SocketAddr) -> ListenerHandshake {
        ListenerHandshake {
            remote,
            step: Mutex::new(Step::Start),
            peer: std::sync::OnceLock::new(),
        }
    }

    /// The authenticated dialer's node id (None until the handshake is done).
    pub fn peer(&self) -> Option<&str> {
        self.peer.get().map(String::as_str)
    }

    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// True once the dialer proved the secret.
    pub fn is_done(&self) -> bool {
        self.peer.get().is_some()
    }

    /// Refuses the connection: counted, logged (rate-limited) with the remote address.
    fn refuse(&self, auth: &Authenticator, reason: &'static str, detail: String) -> PeerResponse {
        auth.metrics.auth_failures.inc();
        *self.step.lock().expect("handshake lock poisoned") = Step::Failed;
        if auth.refusals.due(reason, &self.remote.ip().to_string()) {
            warn!(node = %auth.node_id(), remote = %self.remote, reason, %detail,
                  "refused peer connection");
        }
        auth.error(ErrorKind::Unauthenticated, format!("{reason}: {detail}"))
    }

    /// One step of the handshake: `None` once it is complete (serve the request), else the
    /// reply and whether the connection must close after it.
    pub fn step(&self, auth: &Authenticator, req: &PeerRequest) -> Option<(PeerResponse, bool)> {
        // Fast path for every request of an authenticated connection: no lock.
        if self.is_done() {
            return None;
        }
        let mut step = self.step.lock().expect("handshake lock poisoned");
        if matches!(*step, Step::Done) {
            return None;
        }
        let me = &auth.identity.me;
        // Any step that does not set a new state leaves the connection refused.
        let current = std::mem::replace(&mut *step, Step::Failed);
        match (current, req) {
            (Step::Start, PeerRequest::Session(SessionRequest::Hello(hello))) => {
                if let Err(msg) = auth.check_hello(hello, self.remote) {
                    return Some((auth.error(ErrorKind::WrongCluster, msg), true));
                }
                let listener_nonce = nonce();
                let transcript = Transcript {
                    dialer_nonce: &hello.nonce,
                    listener_nonce: &listener_nonce,
                    dialer_id: &hello.me.node_id,
                    listener_id: &me.node_id,
                };
                let proof = auth.identity.key.proof(Role::Listener, &transcript);
                *step = Step::Challenged {
                    dialer_nonce: hello.nonce,
                    listener_nonce,
                    dialer_id: hello.me.node_id.clone(),
                };
                Some((
                    PeerResponse::Session(SessionResponse::Challenge(Challenge {
                        me: me.clone(),
                        nonce: listener_nonce,
                        proof,
                    })),
                    false,
                ))
            }
            (
                Step::Challenged {
                    dialer_nonce,
                    listener_nonce,
                    dialer_id,
                },
                PeerRequest::Session(SessionRequest::HelloProof(proof)),
            ) => {
                let transcript = Transcript {
                    dialer_nonce: &dialer_nonce,
                    listener_nonce: &listener_nonce,
                    dialer_id: &dialer_id,
                    listener_id: &me.node_id,
                };
                if auth.identity.key.verify(Role::Dialer, &transcript, proof) {
                    *step = Step::Done;
                    let _ = self.peer.set(dialer_id);
                    Some((PeerResponse::Session(SessionResponse::HelloAck), false))
                } else {
                    drop(step);
                    let detail = format!(
                        "peer claiming to be {dialer_id:?} did not prove the cluster secret"
                    );
                    Some((self.refuse(auth, "bad proof", detail), true))
                }
            }
            (Step::Failed, _) => Some((
                auth.error(ErrorKind::Unauthenticated, "handshake failed".into()),
                true,
            )),
            (_, other) => {
                drop(step);
                let what = format!(
                    "request 0x{:02x} out of handshake order",
                    other.to_frame(0).opcode
                );
                Some((self.refuse(auth, "request before handshake", what), true))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_per_reason_and_remote_per_interval() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        assert!(log.due_at("cluster name", "10.0.0.1", t0));
        assert!(
            !log.due_at("cluster name", "10.0.0.1", t0),
            "same remote, same reason"
        );
        // A stranger hammering the port does not keep another remote's refusal out of the log.
        assert!(log.due_at("cluster name", "10.0.0.2", t0));
        assert!(
            log.due_at("handshake timeout", "10.0.0.1", t0),
            "another reason"
        );
        assert!(log.due_at("cluster name", "10.0.0.1", t0 + REFUSAL_LOG_INTERVAL));
    }

    #[test]
    fn refusal_log_keeps_a_bounded_number_of_remotes() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..REFUSAL_LOG_REMOTES {
            assert!(log.due_at("cluster name", &format!("remote {i}"), t0));
        }
        // Full: new remotes share one slot per reason.
        assert!(log.due_at("cluster name", "one more", t0));
        assert!(!log.due_at("cluster name", "and another", t0));
        assert!(log.due_at("handshake timeout", "and another", t0));
        assert!(log.last.lock().unwrap().len() <= REFUSAL_LOG_REMOTES + 2);
        // Once the old entries expire, a new remote gets its own slot again.
        let later = t0 + REFUSAL_LOG_INTERVAL;
        assert!(log.due_at("cluster name", "and another", later));
        assert!(!log.due_at("cluster name", "and another", later));
        assert!(log.due_at("cluster name", "yet another", later));
        assert!(log.last.lock().unwrap().len() <= 3);
    }
}
