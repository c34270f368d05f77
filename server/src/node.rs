//! The node: answers client requests by coordinating them across the replicas of the key,
//! and answers peer requests (replica reads, replication, forwarded writes, gossip).
//!
//! Put/delete: the entry node computes the key's preference list (first N distinct nodes
//! clockwise on the ring). If it is not a replica it forwards the write once to the first live
//! replica, which coordinates: it mints the version locally (only replicas mint, see
//! notes/version-vectors.md §4) and ships the whole resulting state to the other live replicas,
//! answering after W acks (its own included). Get: any node coordinates; it asks every live
//! replica for its state, answers after R replies with their merge, and in the background
//! waits for the rest (until the deadline) and sends the final merge to every replica that
//! answered with something else (read repair). Every error starts with the node id.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::{Either, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};
use ringkv_protocol::auth::PeerKey;
use ringkv_protocol::message::{ReadOptions, WriteOptions};
use ringkv_protocol::peer::{Hello, MemberInfo, PeerRequest, PeerResponse};
use ringkv_protocol::{
    CausalContext, ErrorKind, ErrorReply, ReadReply, Request, Response, RingMember, RingReply,
    Sibling, StatusReply, WriteReply,
};
use tokio::time::Instant as TokioInstant;
use tracing::{debug, warn};

use crate::config::Config;
use crate::coordinator::{Decision, QuorumError, ReadQuorum, WriteQuorum};
use crate::membership::{ClusterView, Membership};
use crate::metrics::{inc, Metrics, RequestMetrics};
use crate::net::peer::{PeerError, PeerPool};
use crate::ring::NodeId;
use crate::storage::{key_position, HexKey, Store, WriteError, WriteOp};
use crate::version::{KeyState, VersionVector};

/// One replica's answer to a coordinated write.
enum Ack {
    /// Another replica acknowledged `Replicate` (true) or did not.
    Peer(NodeId, bool),
    /// This node's own commit of the version it minted.
    Own(Result<(), WriteError>),
}

/// Deadline of one read-repair write (it runs after the client was answered).
pub const READ_REPAIR_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Node {
    pub config: Config,
    pub store: Arc<Store>,
    pub requests: RequestMetrics,
    pub client_net: Arc<Metrics>,
    pub peer_net: Arc<Metrics>,
    pub peers: Arc<PeerPool>,
    pub membership: Membership,
    pub me: MemberInfo,
    pub gossip_addr: String,
    /// Derived from the cluster secret: what peers prove knowledge of (never logged).
    pub peer_key: PeerKey,
    started: Instant,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Converts a state into what a client sees: its siblings and a context token that covers
/// exactly them (`KeyState::client_view`: every sibling, unless the state exceeds what one
/// reply carries).
pub fn read_reply(key: &[u8], state: &KeyState) -> ReadReply {
    let view = state.client_view();
    ReadReply {
        siblings: view
            .shown
            .iter()
            .map(|s| Sibling {
                actor: s.dot.actor,
                counter: s.dot.counter,
                timestamp_ms: s.timestamp_ms,
                value: s.value.clone(),
            })
            .collect(),
        context: Bytes::from(view.context.to_context().encode(key)),
        hidden: view.hidden as u32,
    }
}

/// What is left of a deadline, as a wire timeout (at least 1 ms).
fn remaining_ms(deadline: Instant) -> u32 {
    deadline
        .saturating_duration_since(Instant::now())
        .as_millis()
        .clamp(1, u32::MAX as u128) as u32
}

/// A client write, unpacked.
struct WriteReq {
    key: Bytes,
    /// The versions this write replaces.
    ctx: VersionVector,
    value: Option<Bytes>,
    opts: WriteOptions,
    is_delete: bool,
}

impl Node {
    pub fn new(
        config: Config,
        store: Arc<Store>,
        peers: Arc<PeerPool>,
        membership: Membership,
        me: MemberInfo,
        gossip_addr: String,
    ) -> Node {
        Node {
            peer_key: PeerKey::new(&config.cluster_secret, &config.cluster_name),
            config,
            store,
            requests: RequestMetrics::default(),
            client_net: Arc::new(Metrics::default()),
            peer_net: Arc::new(Metrics::default()),
            peers,
            membership,
            me,
            gossip_addr,
            started: Instant::now(),
        }
    }

    fn err(&self, kind: ErrorKind, definite: bool, msg: impl std::fmt::Display) -> Response {
        inc(&self.requests.errors);
        match kind {
            ErrorKind::Timeout { .. } => inc(&self.requests.timeouts),
            ErrorKind::Unavailable { .. } => inc(&self.requests.unavailable),
            _ => {}
        }
        Response::error(
            kind,
            definite,
            format!("node {}: {msg}", self.config.node_id),
        )
    }

    fn quorum_error(&self, key: &[u8], e: QuorumError, what: &str, definite: bool) -> Response {
        let key = HexKey(key.to_vec());
        match e {
            QuorumError::Unavailable { alive, needed } => self.err(
                ErrorKind::Unavailable {
                    alive: alive as u64,
                    needed: needed as u64,
                },
                definite,
                format!("key {key}: {what}: {alive} replicas reachable, {needed} needed"),
            ),
            QuorumError::Timeout { acks, needed } => self.err(
                ErrorKind::Timeout {
                    acks: acks as u64,
                    needed: needed as u64,
                },
                definite,
                format!("key {key}: {what}: {acks} of {needed} replies before the deadline"),
            ),
        }
    }

    fn deadline(&self, timeout_ms: u32) -> Duration {
        let ms = if timeout_ms == 0 {
            self.config.request_timeout_ms
        } else {
            timeout_ms.min(crate::config::MAX_TIMEOUT_MS)
        };
        Duration::from_millis(ms as u64)
    }

    /// Resolves a per-request R or W (0 = the default) and checks 1..=N.
    fn quorum(&self, what: &str, asked: u8, default: u8, key: &[u8]) -> Result<usize, Response> {
        let q = if asked == 0 { default } else { asked };
        if q > self.config.n {
            return Err(self.err(
                ErrorKind::InvalidRequest,
                true,
                format!(
                    "key {}: {what}={q} exceeds the replication factor N={}",
                    HexKey(key.to_vec()),
                    self.config.n
                ),
            ));
        }
        Ok(q as usize)
    }

    fn view(&self) -> Arc<ClusterView> {
        self.membership.view()
    }

    /// The key's replicas and which of them are reachable.
    fn replicas(&self, view: &ClusterView, key: &[u8]) -> (Vec<NodeId>, Vec<NodeId>) {
        let pref = view
            .ring
            .preference_list(key_position(key), self.config.n as usize);
        let alive = pref
            .iter()
            .filter(|id| view.is_alive(id))
            .cloned()
            .collect();
        (pref, alive)
    }

    /// Answers one client request. Never panics on client input.
    pub async fn handle(self: &Arc<Self>, req: Request) -> Response {
        if let Err((kind, msg)) = req.validate() {
            return self.err(kind, true, msg);
        }
        match req {
            Request::Ping => {
                inc(&self.requests.ping);
                Response::Pong
            }
            Request::Status => {
                inc(&self.requests.status);
                Response::Status(self.status())
            }
            Request::Ring => {
                inc(&self.requests.ring);
                Response::Ring(self.ring_reply())
            }
            Request::Members => {
                inc(&self.requests.members);
                match self.membership.members().await {
                    Some(m) => Response::Members(m),
                    None => self.err(
                        ErrorKind::Internal,
                        true,
                        "the membership task is not running",
                    ),
                }
            }
            Request::Get { key, opts } => {
                inc(&self.requests.get);
                if opts.flags & ReadOptions::LOCAL == 0 {
                    if let Some(resp) = self.not_ready() {
                        return resp;
                    }
                }
                self.get(key, opts).await
            }
            req @ (Request::Put { .. } | Request::Delete { .. }) => {
                if matches!(req, Request::Put { .. }) {
                    inc(&self.requests.put);
                } else {
                    inc(&self.requests.delete);
                }
                if let Some(resp) = self.not_ready() {
                    return resp;
                }
                self.write(req, false).await
            }
        }
    }

    /// `Unavailable` while this node does not know the ring (it would route to wrong replicas).
    fn not_ready(&self) -> Option<Response> {
        (!self.view().ready).then(|| {
            self.err(
                ErrorKind::Unavailable {
                    alive: 0,
                    needed: 1,
                },
                true,
                "joining the cluster: the ring is not known yet; retry shortly or use another node",
            )
        })
    }

    fn context_error(&self, key: &[u8], token: &[u8]) -> Response {
        let cause = CausalContext::decode(token, key)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        self.err(
            ErrorKind::InvalidRequest,
            true,
            format!(
                "key {}: invalid causal context: {cause} (send back the token a read of this key returned)",
                HexKey(key.to_vec())
            ),
        )
    }

    fn unpack_write(&self, req: Request) -> Result<WriteReq, Response> {
        let (key, context, value, opts, is_delete) = match req {
            Request::Put {
                key,
                value,
                context,
                opts,
            } => (key, context, Some(value), opts, false),
            Request::Delete { key, context, opts } => (key, context, None, opts, true),
            _ => unreachable!("unpack_write is only called with writes"),
        };
        let ctx = match CausalContext::decode(&context, &key) {
            Ok(c) => VersionVector::from_context(&c),
            Err(_) => return Err(self.context_error(&key, &context)),
        };
        Ok(WriteReq {
            key,
            ctx,
            value,
            opts,
            is_delete,
        })
    }

    /// Coordinates a put or delete. `forwarded` = an entry node already forwarded it here.
    async fn write(self: &Arc<Self>, mut req: Request, forwarded: bool) -> Response {
        // A delete without a context deletes what a quorum read returns, like Riak's delete
        // without a vclock: the coordinator's own copy may lack versions the client was told
        // about, and a tombstone that does not cover them would leave them readable.
        if let Request::Delete { key, context, opts } = &mut req {
            if context.is_empty() {
                let deadline = Instant::now() + self.deadline(opts.timeout_ms);
                match self.context_of_quorum_read(key, deadline).await {
                    Ok(token) => *context = token,
                    Err(resp) => return resp,
                }
                // The write gets what is left of the request's deadline.
                opts.timeout_ms = remaining_ms(deadline);
            }
        }
        let original = req.clone();
        let w = match self.unpack_write(req) {
            Ok(w) => w,
            Err(resp) => return resp,
        };
        let needed = match self.quorum("W", w.opts.w, self.config.w, &w.key) {
            Ok(q) => q,
            Err(resp) => return resp,
        };
        let deadline = Instant::now() + self.deadline(w.opts.timeout_ms);
        let view = self.view();
        let (pref, alive) = self.replicas(&view, &w.key);
        if alive.len() < needed {
            return self.quorum_error(
                &w.key,
                QuorumError::Unavailable {
                    alive: alive.len(),
                    needed,
                },
                "write refused before any replica was written",
                true,
            );
        }
        if !forwarded && !pref.contains(&view.me) {
            return self
                .forward(original, &w.key, needed, &alive, &view, deadline)
                .await;
        }
        inc(&self.requests.coordinated_writes);
        let key = w.key.clone();
        match self
            .coordinate_write(w, needed, alive.clone(), &view, deadline)
            .await
        {
            Ok(resp) => resp,
            // This replica cannot write (full disk, unreadable copy): nothing was applied or
            // shipped, and it must not mint. Another replica coordinates instead (once).
            Err(local) if !forwarded => {
                let others: Vec<NodeId> = alive.into_iter().filter(|n| *n != view.me).collect();
                if others.is_empty() {
                    return self.write_error(local);
                }
                inc(&self.requests.forwarded_after_local_failure);
                warn!(node = %self.config.node_id, key = %HexKey(key.to_vec()), error = %local,
                      "this replica cannot write; forwarding the write to another replica");
                self.forward(original, &key, needed, &others, &view, deadline)
                    .await
            }
            Err(local) => self.write_error(local),
        }
    }

    /// The context token of a quorum read of `key` (R = the node's default), for a delete sent
    /// without one. A failed read fails the delete before anything is written.
    async fn context_of_quorum_read(
        self: &Arc<Self>,
        key: &Bytes,
        deadline: Instant,
    ) -> Result<Bytes, Response> {
        let needed = self.config.r as usize;
        let state = self
            .quorum_read(
                key.clone(),
                needed,
                deadline,
                "delete without context: reading the versions to delete",
            )
            .await?;
        inc(&self.requests.deletes_read_first);
        Ok(read_reply(key, &state).context)
    }

    /// Sends a write to the first reachable replica, which coordinates it.
    async fn forward(
        &self,
        mut req: Request,
        key: &[u8],
        needed: usize,
        alive: &[NodeId],
        view: &ClusterView,
        deadline: Instant,
    ) -> Response {
        for target in alive {
            let Some(addr) = view.peer_addr(target) else {
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // The replica gets what is left of the client's deadline.
            if let Request::Put { opts, .. } | Request::Delete { opts, .. } = &mut req {
                opts.timeout_ms = left.as_millis().max(1) as u32;
            }
            let frame = req.to_frame(0);
            let fwd = PeerRequest::Forward {
                opcode: frame.opcode,
                body: frame.body,
            };
            inc(&self.requests.forwarded);
            match self
                .peers
                .call(addr, &fwd, left + Duration::from_millis(200))
                .await
            {
                Ok(PeerResponse::ForwardReply { opcode, body }) => {
                    return Response::decode(opcode, body).unwrap_or_else(|e| {
                        self.err(
                            ErrorKind::Internal,
                            false,
                            format!("undecodable reply to a write forwarded to {target}: {e}"),
                        )
                    })
                }
                Ok(other) => {
                    return self.err(
                        ErrorKind::Internal,
                        false,
                        format!("unexpected reply {other:?} to a write forwarded to {target}"),
                    )
                }
                Err(PeerError::Remote(e)) => return Response::Error(e),
                Err(e) if e.not_sent() => {
                    continue;
                }
                Err(e) => {
                    return self.err(
                        ErrorKind::Timeout {
                            acks: 0,
                            needed: needed as u64,
                        },
                        false,
                        format!(
                            "key {}: write forwarded to replica {target}, outcome unknown: {e}",
                            HexKey(key.to_vec())
                        ),
                    );
                }
            }
        }
        self.quorum_error(
            key,
            QuorumError::Unavailable { alive: 0, needed },
            "no replica accepted the forwarded write",
            true,
        )
    }

    /// Mints the version here and replicates the resulting state to the other live replicas.
    /// `Err` = this replica's own write failed before anything was applied or shipped (a full
    /// disk, an unreadable copy, shutting down): the caller may let another replica coordinate.
    async fn coordinate_write(
        self: &Arc<Self>,
        w: WriteReq,
        needed: usize,
        alive: Vec<NodeId>,
        view: &ClusterView,
        deadline: Instant,
    ) -> Result<Response, WriteError> {
        let op = WriteOp::Update {
            key: w.key.clone(),
            ctx: w.ctx,
            value: w.value,
            timestamp_ms: now_ms(),
        };
        // The state is shipped to the other replicas as soon as it is in this node's copy,
        // while this node's own fsync runs; the commit counts as this node's ack. With no other
        // replica to ship to, the write simply commits.
        let has_peers = alive.iter().any(|n| *n != view.me);
        let store = self.store.clone();
        let write = async move {
            if has_peers {
                let (outcome, commit) = store.write_early(op).await?;
                Ok((outcome, Either::Left(commit)))
            } else {
                let outcome = store.write(op).await?;
                Ok((outcome, Either::Right(futures::future::ready(Ok(())))))
            }
        };
        let local = tokio::time::timeout_at(TokioInstant::from_std(deadline), write);
        let (outcome, committed) = match local.await {
            Err(_) => {
                return Ok(self.quorum_error(
                    &w.key,
                    QuorumError::Timeout { acks: 0, needed },
                    "local write not committed",
                    false,
                ))
            }
            Ok(Err(e @ WriteError::ShuttingDown)) => return Err(e),
            Ok(Err(e @ WriteError::Storage { .. })) if e.is_definite() => return Err(e),
            Ok(Err(e)) => return Ok(self.write_error(e)),
            Ok(Ok(o)) => o,
        };
        let dot = outcome.dot.expect("updates always mint a dot");
        // A forwarded write whose sender's ring view differs from ours may land on a node that
        // is not (or no longer) a live replica of the key: then its own commit is no ack.
        let own_counts = alive.contains(&view.me);
        let mut quorum = WriteQuorum::new(alive.len().max(1), needed);
        let mut decision = Decision::Pending;
        let state = Bytes::from(outcome.state.encode());
        let mut acks: FuturesUnordered<_> = alive
            .into_iter()
            .filter(|n| *n != view.me)
            .map(|target| {
                Either::Left(
                    self.replicate(target, view, w.key.clone(), state.clone(), deadline)
                        .map(|(node, ok)| Ack::Peer(node, ok)),
                )
            })
            .collect();
        let peer_targets = acks.len();
        let me = view.me.clone();
        let node = self.clone();
        let key = w.key.clone();
        acks.push(Either::Right(async move {
            let result = committed.await;
            if let Err(e) = &result {
                warn!(node = %node.config.node_id, key = %HexKey(key.to_vec()), error = %e,
                      "coordinator's own commit failed after the state was shipped");
            }
            Ack::Own(result)
        }));
        let mut own_error = None;
        let sleep = tokio::time::sleep_until(TokioInstant::from_std(deadline));
        tokio::pin!(sleep);
        loop {
            match decision {
                Decision::Ok(()) => break,
                // The cause is this node's storage: say so, not just "too few acks".
                // Definite only when no other replica was sent the state.
                Decision::Failed(_) if own_error.is_some() => {
                    let cause = own_error.take().expect("checked by the guard");
                    let only_replica = peer_targets == 0;
                    return Ok(self.own_commit_failed(
                        &w.key,
                        cause,
                        quorum.acks(),
                        needed,
                        only_replica,
                    ));
                }
                Decision::Failed(e) => {
                    return Ok(self.quorum_error(
                        &w.key,
                        e,
                        "write applied on fewer replicas than W",
                        false,
                    ))
                }
                Decision::Pending => {}
            }
            decision = tokio::select! {
                ack = acks.next() => match ack {
                    Some(Ack::Peer(node, true)) => quorum.on_ack(node),
                    Some(Ack::Peer(node, false)) => quorum.on_failure(node),
                    Some(Ack::Own(_)) if !own_counts => Decision::Pending,
                    Some(Ack::Own(Ok(()))) => quorum.on_ack(me.clone()),
                    Some(Ack::Own(Err(e))) => {
                        own_error = Some(e);
                        quorum.on_failure(me.clone())
                    }
                    None => quorum.on_deadline(),
                },
                _ = &mut sleep => quorum.on_deadline(),
            };
        }
        if !acks.is_empty() {
            // Replicas beyond W still get the write; their acks arrive after the answer.
            let node = self.clone();
            tokio::spawn(async move {
                while let Some(ack) = acks.next().await {
                    if matches!(ack, Ack::Peer(_, true)) {
                        inc(&node.requests.late_acks);
                    }
                }
            });
        }
        let body = (w.opts.flags & WriteOptions::RETURN_BODY != 0)
            .then(|| read_reply(&w.key, &outcome.state));
        let reply = WriteReply {
            actor: dot.actor,
            counter: dot.counter,
            body,
        };
        Ok(if w.is_delete {
            Response::Delete(reply)
        } else {
            Response::Put(reply)
        })
    }

    /// Ships a key's state to one replica; resolves to whether it acknowledged. A `'static`
    /// future (bounded by `deadline`), so unfinished ones can move to a task.
    fn replicate(
        self: &Arc<Self>,
        target: NodeId,
        view: &ClusterView,
        key: Bytes,
        state: Bytes,
        deadline: Instant,
    ) -> impl Future<Output = (NodeId, bool)> + Send + 'static {
        let node = self.clone();
        let addr = view.peer_addr(&target).map(str::to_string);
        async move {
            let req = PeerRequest::Replicate {
                key,
                state,
                timeout_ms: remaining_ms(deadline),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            inc(&node.requests.replicate_sent);
            let result = match addr {
                None => Err(PeerError::Unreachable(format!("no address for {target}"))),
                Some(addr) => node.peers.call(&addr, &req, left).await,
            };
            if let Err(e) = &result {
                inc(&node.requests.replicate_failed);
                debug!(node = %node.config.node_id, replica = %target, error = %e, "replicate failed");
            }
            (target, matches!(result, Ok(PeerResponse::Ack)))
        }
    }

    fn write_error(&self, e: WriteError) -> Response {
        let definite = e.is_definite();
        let kind = match &e {
            WriteError::TooManySiblings { count, limit, .. } => ErrorKind::TooManySiblings {
                count: *count as u64,
                limit: *limit as u64,
            },
            WriteError::TooLarge { size, limit, .. } => ErrorKind::TooLarge {
                size: *size as u64,
                limit: *limit as u64,
            },
            WriteError::MergeTooLarge {
                count, max_count, ..
            } => ErrorKind::TooManySiblings {
                count: *count as u64,
                limit: *max_count as u64,
            },
            WriteError::Overloaded { .. } => ErrorKind::Overloaded,
            WriteError::ShuttingDown => ErrorKind::Unavailable {
                alive: 0,
                needed: 1,
            },
            WriteError::Storage { .. } => ErrorKind::Internal,
        };
        self.err(kind, definite, e)
    }

    /// A coordinated write whose own commit failed and that W was not reached without it:
    /// answered with the storage cause (`Internal`), not as a bare quorum shortfall.
    fn own_commit_failed(
        &self,
        key: &[u8],
        cause: WriteError,
        acks: usize,
        needed: usize,
        only_replica: bool,
    ) -> Response {
        let definite = only_replica && cause.is_definite();
        let outcome = if definite {
            "nothing was written"
        } else {
            "other replicas may hold the version"
        };
        self.err(
            ErrorKind::Internal,
            definite,
            format!(
                "key {}: this replica's commit failed ({cause}); {acks} of {needed} replicas \
                 acknowledged, {outcome}",
                HexKey(key.to_vec())
            ),
        )
    }

    async fn local_state(&self, key: Bytes) -> Result<KeyState, String> {
        self.store.read(key).await.map_err(|e| e.to_string())
    }

    async fn get(self: &Arc<Self>, key: Bytes, opts: ReadOptions) -> Response {
        let deadline = Instant::now() + self.deadline(opts.timeout_ms);
        if opts.flags & ReadOptions::LOCAL != 0 {
            let read = tokio::time::timeout_at(
                TokioInstant::from_std(deadline),
                self.local_state(key.clone()),
            );
            return match read.await {
                Err(_) => self.quorum_error(
                    &key,
                    QuorumError::Timeout { acks: 0, needed: 1 },
                    "local read",
                    true,
                ),
                Ok(Err(e)) => self.err(
                    ErrorKind::Internal,
                    true,
                    format!("key {}: {e}", HexKey(key.to_vec())),
                ),
                Ok(Ok(state)) => Response::Get(read_reply(&key, &state)),
            };
        }
        let needed = match self.quorum("R", opts.r, self.config.r, &key) {
            Ok(q) => q,
            Err(resp) => return resp,
        };
        match self
            .quorum_read(key.clone(), needed, deadline, "read")
            .await
        {
            Ok(merged) => Response::Get(read_reply(&key, &merged)),
            Err(resp) => resp,
        }
    }

    /// Reads `key` from its live replicas and returns the merge of the first `needed` replies;
    /// the rest is gathered in the background for read repair. Errors are definite (a read
    /// changes nothing); `what` names the operation in them.
    async fn quorum_read(
        self: &Arc<Self>,
        key: Bytes,
        needed: usize,
        deadline: Instant,
        what: &str,
    ) -> Result<KeyState, Response> {
        let view = self.view();
        let (_, alive) = self.replicas(&view, &key);
        if alive.len() < needed {
            return Err(self.quorum_error(
                &key,
                QuorumError::Unavailable {
                    alive: alive.len(),
                    needed,
                },
                what,
                true,
            ));
        }
        inc(&self.requests.coordinated_reads);
        // Every live replica is asked (the coordinator's own state is read inline when it is
        // in memory); the caller is answered at R replies, and the rest is gathered in the
        // background for read repair.
        let mut replies: FuturesUnordered<_> = alive
            .iter()
            .map(|target| self.replica_state(target.clone(), &view, key.clone(), deadline))
            .collect();
        let mut q = ReadQuorum::new(alive.len(), needed);
        let sleep = tokio::time::sleep_until(TokioInstant::from_std(deadline));
        tokio::pin!(sleep);
        let answer = loop {
            let decision = tokio::select! {
                reply = replies.next() => match reply {
                    Some(reply) => self.on_replica_state(&mut q, reply),
                    None => Decision::Failed(QuorumError::Unavailable { alive: 0, needed }),
                },
                _ = &mut sleep => q.on_deadline(),
            };
            match decision {
                Decision::Ok(merged) => break Ok(merged),
                Decision::Failed(e) => break Err(self.quorum_error(&key, e, what, true)),
                Decision::Pending => {}
            }
        };
        if !replies.is_empty() || q.needs_repair() {
            let node = self.clone();
            tokio::spawn(async move {
                let sleep = tokio::time::sleep_until(TokioInstant::from_std(deadline));
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        reply = replies.next() => match reply {
                            Some(reply) => { node.on_replica_state(&mut q, reply); }
                            None => break,
                        },
                        _ = &mut sleep => break,
                    }
                }
                node.read_repair(&key, &q, &view).await;
            });
        }
        answer
    }

    /// One replica's state of `key` for a read: this node's own from the store, another's
    /// over the peer protocol. A `'static` future, so unfinished ones can move to a task.
    fn replica_state(
        self: &Arc<Self>,
        target: NodeId,
        view: &ClusterView,
        key: Bytes,
        deadline: Instant,
    ) -> impl Future<Output = (NodeId, Result<KeyState, String>)> + Send + 'static {
        let node = self.clone();
        let addr = view.peer_addr(&target).map(str::to_string);
        let is_me = target == view.me;
        async move {
            let result = if is_me {
                node.local_state(key).await
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                match addr {
                    None => Err(format!("no address for {target}")),
                    Some(addr) => {
                        let req = PeerRequest::ReadLocal {
                            key: key.clone(),
                            timeout_ms: remaining_ms(deadline),
                        };
                        match node.peers.call(&addr, &req, left).await {
                            Ok(PeerResponse::State(b)) => KeyState::decode(&b).map_err(|e| {
                                format!(
                                    "key {}: state from {addr} does not decode: {e}",
                                    HexKey(key.to_vec())
                                )
                            }),
                            Ok(other) => Err(format!("unexpected reply {other:?}")),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                }
            };
            (target, result)
        }
    }

    fn on_replica_state(
        &self,
        q: &mut ReadQuorum,
        (replica, result): (NodeId, Result<KeyState, String>),
    ) -> Decision<KeyState> {
        match result {
            Ok(state) => q.on_reply(replica, state),
            Err(cause) => {
                debug!(node = %self.config.node_id, %replica, %cause, "replica read failed");
                q.on_failure(replica)
            }
        }
    }

    async fn read_repair(&self, key: &Bytes, q: &ReadQuorum, view: &ClusterView) {
        let targets = q.repair_targets();
        if targets.is_empty() {
            return;
        }
        let merged = q.merged().clone();
        let state = Bytes::from(merged.encode());
        for target in targets {
            inc(&self.requests.read_repairs);
            let result = if target == view.me {
                self.store
                    .write(WriteOp::Merge {
                        key: key.clone(),
                        state: merged.clone(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                let req = PeerRequest::Replicate {
                    key: key.clone(),
                    state: state.clone(),
                    timeout_ms: READ_REPAIR_TIMEOUT.as_millis() as u32,
                };
                match view.peer_addr(&target) {
                    None => Err("no address".to_string()),
                    Some(addr) => match self.peers.call(addr, &req, READ_REPAIR_TIMEOUT).await {
                        Ok(_) => Ok(()),
                        Err(e) => Err(e.to_string()),
                    },
                }
            };
            if let Err(cause) = result {
                inc(&self.requests.read_repair_failed);
                warn!(node = %self.config.node_id, replica = %target, key = %HexKey(key.to_vec()), %cause, "read repair failed");
            }
        }
    }

    /// Checks the public part of a peer's `Hello`: same cluster name and replication factor.
    /// (The secret is checked by the challenge–response that follows, in `net::peer`.)
    pub fn check_hello(&self, hello: &Hello, remote: SocketAddr) -> Result<(), String> {
        let problem = if hello.cluster != self.config.cluster_name {
            Some(format!(
                "cluster name {:?} differs from ours {:?}",
                hello.cluster, self.config.cluster_name
            ))
        } else if hello.n != self.config.n {
            Some(format!(
                "replication factor N={} differs from ours N={}",
                hello.n, self.config.n
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            inc(&self.requests.peers_refused);
            warn!(node = %self.config.node_id, peer = %hello.me.node_id, %remote,
                  "refused peer {}: {p}", hello.me.node_id);
            return Err(format!("refused peer {}: {p}", hello.me.node_id));
        }
        Ok(())
    }

    /// Answers one peer request (after the handshake).
    pub async fn handle_peer(self: &Arc<Self>, req: PeerRequest) -> PeerResponse {
        let error = |kind: ErrorKind, msg: String| {
            PeerResponse::Error(ErrorReply {
                kind,
                definite: true,
                message: format!("node {}: {msg}", self.config.node_id),
            })
        };
        match req {
            PeerRequest::Hello(_) | PeerRequest::HelloProof(_) => error(
                ErrorKind::InvalidRequest,
                "the handshake is already complete on this connection".into(),
            ),
            PeerRequest::Ping => PeerResponse::Pong,
            PeerRequest::ReadLocal { key, timeout_ms } => {
                inc(&self.requests.peer_read_local);
                let limit = Duration::from_millis(timeout_ms as u64);
                // The stored bytes are the wire encoding of the state: sent as they are, and
                // the coordinator decodes (and names this replica if they do not decode).
                match tokio::time::timeout(limit, self.store.read_stored(&key)).await {
                    Ok(Ok(Some(stored))) => PeerResponse::State(Bytes::from(stored)),
                    Ok(Ok(None)) => PeerResponse::State(Bytes::from(KeyState::new().encode())),
                    Ok(Err(e)) => error(
                        ErrorKind::Internal,
                        format!("key {}: {e}", HexKey(key.to_vec())),
                    ),
                    Err(_) => error(
                        ErrorKind::Timeout { acks: 0, needed: 1 },
                        format!(
                            "key {}: replica read exceeded the {timeout_ms} ms left of the deadline",
                            HexKey(key.to_vec())
                        ),
                    ),
                }
            }
            PeerRequest::Replicate {
                key,
                state,
                timeout_ms,
            } => {
                inc(&self.requests.peer_replicate);
                let state = match KeyState::decode(&state) {
                    Ok(s) => s,
                    Err(e) => {
                        return error(
                            ErrorKind::Malformed,
                            format!("key {}: replicated state: {e}", HexKey(key.to_vec())),
                        )
                    }
                };
                let limit = Duration::from_millis(timeout_ms as u64);
                let hkey = HexKey(key.to_vec());
                // On timeout the merge may still commit later: merges are idempotent.
                match tokio::time::timeout(limit, self.store.write(WriteOp::Merge { key, state })).await {
                    Ok(Ok(_)) => PeerResponse::Ack,
                    Ok(Err(e)) => match self.write_error(e) {
                        Response::Error(e) => PeerResponse::Error(e),
                        _ => unreachable!("write_error builds an error"),
                    },
                    Err(_) => error(
                        ErrorKind::Timeout { acks: 0, needed: 1 },
                        format!("key {hkey}: replica write exceeded the {timeout_ms} ms left of the deadline"),
                    ),
                }
            }
            PeerRequest::Forward { opcode, body } => {
                inc(&self.requests.peer_forward);
                // A node that does not know the ring yet would coordinate with the wrong
                // replicas, whoever sent the write.
                let resp = match self.not_ready() {
                    Some(resp) => resp,
                    None => self.forwarded_write(opcode, body).await,
                };
                let frame = resp.to_frame(0);
                PeerResponse::ForwardReply {
                    opcode: frame.opcode,
                    body: frame.body,
                }
            }
        }
    }

    /// Coordinates a write another node forwarded here (never forwarded again).
    async fn forwarded_write(self: &Arc<Self>, opcode: u8, body: Bytes) -> Response {
        match Request::decode(opcode, body) {
            Ok(req @ (Request::Put { .. } | Request::Delete { .. })) => match req.validate() {
                Ok(()) => self.write(req, true).await,
                Err((kind, msg)) => self.err(kind, true, msg),
            },
            Ok(other) => self.err(
                ErrorKind::InvalidRequest,
                true,
                format!(
                    "only writes can be forwarded, got opcode 0x{:02x}",
                    other.opcode()
                ),
            ),
            Err(e) => self.err(
                ErrorKind::Malformed,
                true,
                format!("forwarded request: {e}"),
            ),
        }
    }

    pub fn ring_reply(&self) -> RingReply {
        let view = self.view();
        let members = view
            .ring
            .ownership()
            .into_iter()
            .map(|o| {
                let info = view.members.get(&o.node);
                RingMember {
                    node_id: o.node.to_string(),
                    client_addr: info.map(|i| i.client_addr.clone()).unwrap_or_default(),
                    peer_addr: info.map(|i| i.peer_addr.clone()).unwrap_or_default(),
                    tokens: o.tokens,
                    primary_ppm: (o.primary_share * 1_000_000.0).round() as u32,
                    alive: view.is_alive(&o.node),
                }
            })
            .collect();
        RingReply {
            n: self.config.n,
            r: self.config.r,
            w: self.config.w,
            epoch: view.epoch,
            members,
        }
    }

    pub fn status(&self) -> StatusReply {
        let st = self.store.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut metrics = self.requests.snapshot("");
        metrics.extend(self.client_net.snapshot("net."));
        metrics.extend(self.peer_net.snapshot("peer_net."));
        metrics.extend([
            ("storage.updates".to_string(), load(&st.updates)),
            ("storage.merges".to_string(), load(&st.merges)),
            ("storage.merges_noop".to_string(), load(&st.merges_noop)),
            ("storage.write_batches".to_string(), load(&st.batches)),
            (
                "storage.synced_batches".to_string(),
                load(&st.synced_batches),
            ),
            ("storage.largest_group".to_string(), load(&st.largest_group)),
            ("storage.write_errors".to_string(), load(&st.write_errors)),
            ("storage.overloaded".to_string(), load(&st.overloaded)),
            (
                "storage.rejected_siblings".to_string(),
                load(&st.rejected_siblings),
            ),
            ("storage.rejected_size".to_string(), load(&st.rejected_size)),
            (
                "storage.sibling_warnings".to_string(),
                load(&st.sibling_warnings),
            ),
            (
                "storage.amnesia_detected".to_string(),
                load(&st.amnesia_detected),
            ),
            (
                "storage.actor_renewals".to_string(),
                load(&st.actor_renewals),
            ),
            ("storage.sync_errors".to_string(), load(&st.sync_errors)),
            (
                "storage.merges_refused".to_string(),
                load(&st.merges_refused),
            ),
            (
                "storage.vv_entries_pruned".to_string(),
                load(&st.vv_entries_pruned),
            ),
            (
                "storage.writer_queue_bytes".to_string(),
                self.store.queued_bytes() as u64,
            ),
            (
                "peer.auth_failures_outgoing".to_string(),
                load(&self.peers.auth_failures),
            ),
            (
                "storage.writer_queue".to_string(),
                self.store.queue_depth() as u64,
            ),
            ("storage.next_counter".to_string(), load(&st.next_counter)),
            ("storage.reads_cached".to_string(), load(&st.reads_cached)),
            (
                "storage.reads_blocking".to_string(),
                load(&st.reads_blocking),
            ),
            (
                "storage.state_cache_hits".to_string(),
                load(&st.state_cache_hits),
            ),
            (
                "storage.state_cache_misses".to_string(),
                load(&st.state_cache_misses),
            ),
            (
                "storage.state_cache_entries".to_string(),
                load(&st.state_cache_entries),
            ),
            ("storage.incarnation".to_string(), load(&st.incarnation)),
        ]);
        let engine = self.store.engine();
        for (name, prop) in [
            ("rocksdb.estimate_keys", "rocksdb.estimate-num-keys"),
            ("rocksdb.live_sst_bytes", "rocksdb.live-sst-files-size"),
            ("rocksdb.memtable_bytes", "rocksdb.cur-size-all-mem-tables"),
            ("rocksdb.background_errors", "rocksdb.background-errors"),
        ] {
            if let Some(v) = engine.property(crate::storage::Cf::Data, prop) {
                metrics.push((name.to_string(), v));
            }
        }
        metrics.extend(self.membership.stats.snapshot());
        let view = self.view();
        metrics.push(("cluster.members".to_string(), view.members.len() as u64));
        metrics.push((
            "cluster.members_alive".to_string(),
            (view.alive.len() + 1) as u64,
        ));
        let writer_state = if self.store.is_running() {
            "running"
        } else {
            "stopped"
        };
        StatusReply {
            node_id: self.config.node_id.clone(),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            metrics,
            info: vec![
                ("cluster_name".into(), self.config.cluster_name.clone()),
                ("listen".into(), self.me.client_addr.clone()),
                ("peer_listen".into(), self.me.peer_addr.clone()),
                (
                    "data_dir".into(),
                    self.config.data_dir.display().to_string(),
                ),
                ("sync_mode".into(), self.config.sync.to_string()),
                ("replication_factor".into(), self.config.n.to_string()),
                ("default_r".into(), self.config.r.to_string()),
                ("default_w".into(), self.config.w.to_string()),
                ("vnodes".into(), self.config.vnodes.to_string()),
                ("actor".into(), format!("{:016x}", load(&st.actor))),
                (
                    "worker.writer".into(),
                    format!(
                        "{writer_state}; queue {} of {} jobs, {} of {} bytes; {} batches",
                        self.store.queue_depth(),
                        crate::storage::store::QUEUE_CAPACITY,
                        self.store.queued_bytes(),
                        crate::storage::store::MAX_QUEUE_BYTES,
                        load(&st.batches)
                    ),
                ),
                ("gossip_listen".into(), self.gossip_addr.clone()),
                (
                    "phi_threshold".into(),
                    self.config.phi_threshold.to_string(),
                ),
                ("ring_epoch".into(), format!("{:016x}", view.epoch)),
                (
                    "worker.membership".into(),
                    format!(
                        "running (SWIM/foca + phi); {} members, {} available; view version {}",
                        view.members.len(),
                        view.alive.len() + 1,
                        view.version
                    ),
                ),
            ],
        }
    }
}
