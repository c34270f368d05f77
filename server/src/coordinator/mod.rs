//! The coordinator service: client get/put/delete coordination across the key's replicas,
//! forwarding, read repair. Its sans-IO parts are `quorum` (the trackers) and `plan` (the
//! targets of a key); peers are reached through `rpc::Transport` and the fan-out helper.
//!
//! Put/delete: the entry node plans the key (first N distinct nodes clockwise). If it is not a
//! primary it forwards the write once to the first live primary, which coordinates: it mints
//! the version locally (only replicas mint, see notes/version-vectors.md §4) and ships the
//! whole resulting state to the other live primaries, answering after W acks (its own
//! included). Get: any node coordinates; it asks every live primary for its state, answers
//! after R replies with their merge, and the late-reply worker waits for the rest (until the
//! deadline) and sends the final merge to every replica that answered with something else
//! (read repair). Every error starts with the node id.

pub mod plan;
pub mod quorum;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{Either, FutureExt};
use ringkv_protocol::message::{ReadOptions, WriteOptions};
use ringkv_protocol::peer::{
    CoordinatorRequest, CoordinatorResponse, HandoffRequest, HandoffResponse, PeerRequest,
    PeerResponse, ReplicaRequest, ReplicaResponse,
};
use ringkv_protocol::{
    CausalContext, ErrorKind, ReadReply, Request, Response, Sibling, WriteReply,
};
use tokio::time::Instant as TokioInstant;
use tracing::{debug, warn};

use crate::clock::{now_ms, time_left_ms};
use crate::config::{Config, ReadFanout, Timeouts};
use crate::membership::{ClusterView, EpochGuard, Membership, WriteEpochs};
use crate::ring::NodeId;
use crate::rpc::{FanOut, LateReplies, LateWait, PeerError, PeerPool, Tracker, Transport};
use crate::storage::{open_gate, HexKey, Late, ReadGate, Store, WriteError, WriteOp};
use crate::version::{KeyState, VersionVector};
use plan::{plan, plan_with_fallbacks};
use quorum::{Decision, QuorumError, ReadQuorum, WriteQuorum};

/// Why the coordinator's own replica read gave nothing: its deadline passed first (a read that
/// had to wait for the disk is then dropped unexecuted, `storage.reads_expired`).
const LOCAL_READ_LATE: &str = "local read: the deadline passed before it ran or answered";
/// Deadline of one read-repair write (it runs after the client was answered).
pub const READ_REPAIR_TIMEOUT: Duration = Duration::from_secs(2);

crate::metrics::metric_set! {
    /// Coordination counters (registered without a prefix: the names carry their group).
    pub struct CoordinatorMetrics {
        forwarded: Counter = "coordinator.forwarded_writes", "writes forwarded to a primary of their key";
        forwarded_after_local_failure: Counter = "coordinator.forwarded_after_local_failure", "writes handed to another primary because this one could not write";
        deletes_read_first: Counter = "coordinator.deletes_read_first", "deletes without context that read a quorum first";
        coordinated_writes: Counter = "coordinator.writes", "writes coordinated here";
        coordinated_reads: Counter = "coordinator.reads", "reads coordinated here";
        replicate_sent: Counter = "coordinator.replicate_sent", "states shipped to replicas";
        replicate_failed: Counter = "coordinator.replicate_failed", "states a replica did not acknowledge";
        late_acks: Counter = "coordinator.late_acks", "replica acks that arrived after the answer";
        hinted_writes: Counter = "coordinator.hinted_writes", "hints sent to fallbacks for a primary that was down or did not answer";
        hinted_failed: Counter = "coordinator.hinted_failed", "hints a fallback did not acknowledge";
        fallback_acks: Counter = "coordinator.fallback_acks", "write acks counted from fallbacks (sloppy quorum)";
        pending_writes: Counter = "coordinator.pending_writes", "writes also sent to a key's next replica while a ring change runs (not counted toward W)";
        local_hints: Counter = "coordinator.local_hints", "hints kept on the coordinator for a primary no fallback covered";
        fallback_reads: Counter = "coordinator.fallback_reads", "hint reads from fallbacks for sloppy reads";
        read_spares: Counter = "coordinator.read_spares", "spare replica reads started (a replica failed, or no R replies within --read-speculate-ms)";
        read_repairs: Counter = "read_repair.sent", "read repairs sent";
        read_repair_failed: Counter = "read_repair.failed", "read repairs that failed";
        peer_forward: Counter = "peer.forward", "writes other nodes forwarded here";
        forwards_expired: Counter = "coordinator.forwards_expired", "forwarded writes dropped unexecuted: their deadline passed before they were dispatched";
        /// Forwarded writes refused because this node does not replicate the key in its view.
        forwards_not_replica: Counter = "coordinator.forwards_not_replica", "forwarded writes refused unexecuted: this node does not replicate the key in its ring view (the sender's view differed)";
        deletes_expired: Counter = "coordinator.deletes_expired", "deletes without context dropped unexecuted: their deadline ran out during the quorum read of what to delete";
    }
}

/// What the coordinator needs of the node's configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub node_id: String,
    pub n: u8,
    pub r: u8,
    pub w: u8,
    pub timeouts: Timeouts,
    /// Sloppy quorums: fallbacks and hints for primaries that miss a write.
    pub hinted_handoff: bool,
    /// Repair the replicas a read found behind (default true).
    pub read_repair: bool,
    /// Ask every live replica on a read (Riak) instead of R of them with spares (Cassandra).
    pub read_all: bool,
    /// With R-replica reads: start a spare replica's read after this long without R replies.
    pub read_speculate: Duration,
}

impl CoordinatorConfig {
    pub fn from_config(c: &Config) -> Self {
        CoordinatorConfig {
            node_id: c.node_id.clone(),
            n: c.n,
            r: c.r,
            w: c.w,
            timeouts: c.timeouts,
            hinted_handoff: c.hints.enabled,
            read_repair: c.read_repair,
            read_all: c.read_fanout == ReadFanout::All,
            read_speculate: Duration::from_millis(c.read_speculate_ms.into()),
        }
    }
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

/// What is left of a deadline, as a wire timeout (at least 1 ms; work that must not start
/// with nothing left uses `clock::time_left_ms`).
pub fn remaining_ms(deadline: Instant) -> u32 {
    time_left_ms(deadline, Instant::now()).unwrap_or(1)
}

/// A write's replicas, planned from `view`, with the write in flight under that view's layout
/// (`epoch`, held until its last replica call ends: a ring change's pulls wait for it).
struct Planned<'a> {
    view: &'a ClusterView,
    plan: &'a plan::Plan,
    epoch: EpochGuard,
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

/// One slot's answer to a coordinated write.
enum Ack {
    /// The slot of `primary`: acknowledged by the primary itself (`Replicate`, `node` is the
    /// primary), or by a fallback `node` that stored a hint for it (`by_fallback`), or by
    /// neither (`ok` false; `node` is then the primary).
    Slot {
        primary: NodeId,
        node: NodeId,
        by_fallback: bool,
        ok: bool,
    },
    /// This node's own commit of the version it minted.
    Own(Result<(), WriteError>),
    /// A replica of the next ring that is not a primary now (a ring change runs): counts
    /// toward the next ring's W only.
    Pending { node: NodeId, ok: bool },
}

/// While a ring change runs, a write also needs W acks among the key's replicas in the next
/// ring (Garage's rule for layout transitions): the switch waits for the transfers, not for
/// writes a gaining replica missed after its transfer passed the key, so without this an
/// acknowledged write could be held by fewer than W of the replicas reads use after the switch.
struct NextQuorum {
    quorum: WriteQuorum,
    /// The key's preference list in the next ring.
    replicas: Vec<NodeId>,
}

/// Counts a coordinated write's acks; remembers why this node's own commit failed.
struct WriteTracker {
    quorum: WriteQuorum,
    /// Set while a ring change runs (see [`NextQuorum`]).
    next: Option<NextQuorum>,
    /// Which of the two quorums reached W (the next one: true when no ring change runs).
    current_ok: bool,
    next_ok: bool,
    /// Whether the write failed for want of acks among the next ring's replicas.
    failed_in_next: bool,
    decided: bool,
    me: NodeId,
    /// Whether this node's own commit counts (it is a live primary of the key).
    own_counts: bool,
    own_error: Option<WriteError>,
    late_acks: u64,
}

impl WriteTracker {
    fn new(quorum: WriteQuorum, next: Option<NextQuorum>, me: NodeId, own_counts: bool) -> Self {
        WriteTracker {
            quorum,
            next_ok: next.is_none(),
            next,
            current_ok: false,
            failed_in_next: false,
            decided: false,
            me,
            own_counts,
            own_error: None,
            late_acks: 0,
        }
    }

    /// Whether `node` is one of the key's replicas in the next ring (a ring change runs).
    fn in_next(&self, node: &NodeId) -> bool {
        matches!(&self.next, Some(next) if next.replicas.contains(node))
    }

    /// `event` applied to the next ring's quorum if `replica` is one of its replicas.
    fn next_event(
        &mut self,
        replica: &NodeId,
        event: impl FnOnce(&mut WriteQuorum) -> Decision<()>,
    ) -> Decision<()> {
        match &mut self.next {
            Some(next) if next.replicas.contains(replica) => event(&mut next.quorum),
            _ => Decision::Pending,
        }
    }

    /// The write's decision from the two quorums' (each decides once).
    fn combine(&mut self, current: Decision<()>, next: Decision<()>) -> Decision<()> {
        if self.decided {
            return Decision::Pending;
        }
        match current {
            Decision::Failed(e) => {
                self.decided = true;
                return Decision::Failed(e);
            }
            Decision::Ok(()) => self.current_ok = true,
            Decision::Pending => {}
        }
        match next {
            Decision::Failed(e) => {
                self.decided = true;
                self.failed_in_next = true;
                return Decision::Failed(e);
            }
            Decision::Ok(()) => self.next_ok = true,
            Decision::Pending => {}
        }
        if self.current_ok && self.next_ok {
            self.decided = true;
            return Decision::Ok(());
        }
        Decision::Pending
    }
}

impl Tracker<Ack> for WriteTracker {
    type Output = ();

    fn on_reply(&mut self, ack: Ack) -> Decision<()> {
        if self.decided && matches!(ack, Ack::Slot { ok: true, .. }) {
            self.late_acks += 1;
        }
        let (current, next) = match ack {
            Ack::Slot {
                primary,
                node,
                by_fallback: false,
                ok: true,
            } => (
                self.quorum.on_ack(node.clone()),
                self.next_event(&primary, |q| q.on_ack(node)),
            ),
            Ack::Slot {
                primary,
                node,
                by_fallback: true,
                ok: true,
            } => (
                self.quorum.on_fallback_ack(node.clone()),
                self.next_event(&primary, |q| q.on_fallback_ack(node)),
            ),
            Ack::Slot {
                primary, ok: false, ..
            } => (
                self.quorum.on_failure(primary.clone()),
                self.next_event(&primary, |q| q.on_failure(primary.clone())),
            ),
            Ack::Pending { node, ok } => (
                Decision::Pending,
                self.next_event(&node.clone(), |q| q.on_outcome(node, ok)),
            ),
            Ack::Own(result) => {
                let me = self.me.clone();
                let ok = result.is_ok();
                if let Err(e) = result {
                    if self.own_counts || self.in_next(&me) {
                        self.own_error = Some(e);
                    }
                }
                let current = if self.own_counts {
                    self.quorum.on_outcome(me.clone(), ok)
                } else {
                    Decision::Pending
                };
                (
                    current,
                    self.next_event(&me.clone(), |q| q.on_outcome(me, ok)),
                )
            }
        };
        self.combine(current, next)
    }

    fn on_deadline(&mut self) -> QuorumError {
        let quorum = match &mut self.next {
            Some(next) if self.current_ok => {
                self.failed_in_next = true;
                &mut next.quorum
            }
            _ => &mut self.quorum,
        };
        match quorum.on_deadline() {
            Decision::Failed(e) => e,
            _ => QuorumError::Timeout {
                acks: quorum.acks(),
                needed: quorum.needed(),
            },
        }
    }
}

/// Merges the replicas' states of a read; what is late still goes in, for read repair.
struct ReadTracker {
    quorum: ReadQuorum,
    /// This node, for logs (shared: no allocation per read).
    node_id: Arc<str>,
    /// The key read, for logs (a reference count, not a copy).
    key: Bytes,
}

/// A read's reply: who answered, whether as a fallback (its hint), and the state.
type ReadReplyOf = (NodeId, bool, Result<KeyState, String>);

impl Tracker<ReadReplyOf> for ReadTracker {
    type Output = KeyState;

    fn on_reply(&mut self, (replica, fallback, result): ReadReplyOf) -> Decision<KeyState> {
        match result {
            Ok(state) if fallback => self.quorum.on_fallback_reply(replica, state),
            Ok(state) => self.quorum.on_reply(replica, state),
            Err(cause) => {
                debug!(node = %self.node_id, %replica, key = %HexKey(self.key.to_vec()), %cause,
                    "replica read failed");
                self.quorum.on_failure(replica)
            }
        }
    }

    fn on_deadline(&mut self) -> QuorumError {
        match self.quorum.on_deadline() {
            Decision::Failed(e) => e,
            _ => QuorumError::Timeout {
                acks: 0,
                needed: self.quorum.needed(),
            },
        }
    }

    fn wanted(&self) -> usize {
        self.quorum.wanted()
    }
}

/// Generic over how peers are reached: the peer pool in the node (the default), scripted
/// peers in the unit tests.
pub struct Coordinator<T: Transport = PeerPool> {
    config: CoordinatorConfig,
    /// `config.node_id`, shared with what moves to the late-reply worker.
    node_id: Arc<str>,
    store: Arc<Store>,
    transport: Arc<T>,
    membership: Membership,
    late: LateReplies,
    pub metrics: CoordinatorMetrics,
    /// Whether this node's own copy of a key counts as a replica read.
    gate: ReadGate,
    /// The writes in flight here by layout version (a ring change waits for older ones).
    epochs: Arc<WriteEpochs>,
}

impl<T: Transport> Coordinator<T> {
    pub fn new(
        config: CoordinatorConfig,
        store: Arc<Store>,
        transport: Arc<T>,
        membership: Membership,
        late: LateReplies,
    ) -> Coordinator<T> {
        Coordinator {
            node_id: Arc::from(config.node_id.as_str()),
            config,
            store,
            transport,
            membership,
            late,
            metrics: CoordinatorMetrics::default(),
            gate: open_gate(),
            epochs: Arc::default(),
        }
    }

    /// Count the writes coordinated here in `epochs` (by the layout version they start under).
    pub fn with_write_epochs(mut self, epochs: Arc<WriteEpochs>) -> Self {
        self.epochs = epochs;
        self
    }

    /// Reads of this node's own copy pass `gate` or fail as that replica's answer (the
    /// quorum then needs the other replicas).
    pub fn with_read_gate(mut self, gate: ReadGate) -> Self {
        self.gate = gate;
        self
    }

    fn err(&self, kind: ErrorKind, definite: bool, msg: impl std::fmt::Display) -> Response {
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
        Duration::from_millis(self.config.timeouts.resolve(timeout_ms).into())
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

    /// Resolves a per-request PR or PW (0 = none required) and checks it is at most N.
    fn primaries_quorum(&self, what: &str, asked: u8, key: &[u8]) -> Result<usize, Response> {
        if asked > self.config.n {
            return Err(self.err(
                ErrorKind::InvalidRequest,
                true,
                format!(
                    "key {}: {what}={asked} exceeds the replication factor N={}",
                    HexKey(key.to_vec()),
                    self.config.n
                ),
            ));
        }
        Ok(asked as usize)
    }

    fn view(&self) -> Arc<ClusterView> {
        self.membership.view()
    }

    /// `NotServing` (definite: nothing was done) while this node was taken out of the ring or
    /// does not know the ring yet (it would route to wrong replicas): the client library sends
    /// the request to its next address, a forwarding coordinator to the next replica.
    pub fn not_ready(&self) -> Option<Response> {
        let view = self.view();
        if view.retired() {
            return Some(self.err(
                ErrorKind::NotServing,
                true,
                format!(
                    "this node was taken out of the ring by a completed plan (layout v{}): it serves no reads or writes; use another node",
                    view.layout.version
                ),
            ));
        }
        (!view.ready).then(|| {
            self.err(
                ErrorKind::NotServing,
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
            other => {
                return Err(self.err(
                    ErrorKind::InvalidRequest,
                    true,
                    format!("opcode 0x{:02x} is not a write", other.opcode()),
                ))
            }
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

    /// A client put or delete, validated by the api layer.
    pub async fn write(self: &Arc<Self>, req: Request) -> Response {
        if let Some(resp) = self.not_ready() {
            return resp;
        }
        self.coordinate(req, false).await
    }

    /// A client get, validated by the api layer.
    pub async fn get(self: &Arc<Self>, key: Bytes, opts: ReadOptions) -> Response {
        let deadline = Instant::now() + self.deadline(opts.timeout_ms);
        if opts.flags & ReadOptions::LOCAL != 0 {
            return match self.store.read_by(key.clone(), deadline).await {
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
        if let Some(resp) = self.not_ready() {
            return resp;
        }
        let needed = match self.quorum("R", opts.r, self.config.r, &key) {
            Ok(q) => q,
            Err(resp) => return resp,
        };
        let needed_primaries = match self.primaries_quorum("PR", opts.pr, &key) {
            Ok(q) => q,
            Err(resp) => return resp,
        };
        match self
            .quorum_read(
                key.clone(),
                needed.max(needed_primaries),
                needed_primaries,
                deadline,
                "read",
            )
            .await
        {
            Ok(merged) => Response::Get(read_reply(&key, &merged)),
            Err(resp) => resp,
        }
    }

    /// A write another node forwarded here (the coordinator family); never forwarded again.
    /// `arrived`: when the request was read; the write's deadline counts from then.
    pub async fn serve_peer(
        self: &Arc<Self>,
        req: CoordinatorRequest,
        arrived: Instant,
    ) -> PeerResponse {
        let CoordinatorRequest::Forward { opcode, body } = req;
        self.metrics.peer_forward.inc();
        // A node that does not know the ring yet would coordinate with the wrong replicas,
        // whoever sent the write.
        let resp = match self.not_ready() {
            Some(resp) => resp,
            None => self.forwarded_write(opcode, body, arrived).await,
        };
        let frame = resp.to_frame(0);
        PeerResponse::Coordinator(CoordinatorResponse::ForwardReply {
            opcode: frame.opcode,
            body: frame.body,
        })
    }

    async fn forwarded_write(
        self: &Arc<Self>,
        opcode: u8,
        body: Bytes,
        arrived: Instant,
    ) -> Response {
        match Request::decode(opcode, body) {
            Ok(mut req @ (Request::Put { .. } | Request::Delete { .. })) => match req.validate() {
                Ok(()) => {
                    // The sender gave what was left of the client's deadline; it counts from
                    // this node's reading of the request. Passed already: dropped unexecuted.
                    if let Request::Put { opts, .. } | Request::Delete { opts, .. } = &mut req {
                        let waited = arrived.elapsed();
                        let given = self.deadline(opts.timeout_ms);
                        let left = given.saturating_sub(waited);
                        if left.is_zero() {
                            self.metrics.forwards_expired.inc();
                            return self.err(
                                ErrorKind::Timeout { acks: 0, needed: 0 },
                                true,
                                format!(
                                    "forwarded write dropped unexecuted: its {} ms deadline \
                                     passed before it was dispatched (waited {} ms)",
                                    given.as_millis(),
                                    waited.as_millis()
                                ),
                            );
                        }
                        opts.timeout_ms = left.as_millis().clamp(1, u32::MAX as u128) as u32;
                    }
                    self.coordinate(req, true).await
                }
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

    /// Coordinates a put or delete. `forwarded` = an entry node already forwarded it here.
    async fn coordinate(self: &Arc<Self>, mut req: Request, forwarded: bool) -> Response {
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
                // The write gets what is left of the request's deadline; none left: it is
                // dropped before anything is written (definite).
                match time_left_ms(deadline, Instant::now()) {
                    Some(left) => opts.timeout_ms = left,
                    None => {
                        self.metrics.deletes_expired.inc();
                        return self.err(
                            ErrorKind::Timeout { acks: 0, needed: 0 },
                            true,
                            format!(
                                "delete of key {} dropped unexecuted: its deadline ran out while \
                                 reading the versions to delete",
                                HexKey(key.to_vec())
                            ),
                        );
                    }
                }
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
        let needed_primaries = match self.primaries_quorum("PW", w.opts.pw, &w.key) {
            Ok(q) => q,
            Err(resp) => return resp,
        };
        let needed = needed.max(needed_primaries);
        let deadline = Instant::now() + self.deadline(w.opts.timeout_ms);
        // In flight under the view's layout from before the plan is made until its last
        // replica call ends (late replies included); a ring change's pulls wait for it.
        let (epoch, view) = self.epochs.enter_with(|| self.view(), |v| v.layout_id());
        // One fallback per down primary, and a spare per live one in case it fails to answer.
        let n = self.config.n as usize;
        let spares = if self.config.hinted_handoff { n } else { 0 };
        let plan = plan_with_fallbacks(&view, &w.key, n, Some(spares));
        let alive = plan.primaries_alive.clone();
        let refuse = |alive: usize, needed: usize, why: &str| {
            self.quorum_error(
                &w.key,
                QuorumError::Unavailable { alive, needed },
                &format!("write refused before any replica was written: {why}"),
                true,
            )
        };
        // Only a replica of the key mints its versions (docs/architecture.md, "Who mints"): a
        // node that handed its copy over no longer holds the versions it minted, and a dot
        // minted above them would make replicas drop them. A sender whose view differs (a
        // ring change it has not seen) is told to retry; nothing was done.
        if forwarded && !plan.preference.contains(&view.me) {
            self.metrics.forwards_not_replica.inc();
            return refuse(
                0,
                needed,
                &format!(
                    "this node does not replicate the key in its ring view (layout {}); the \
                     forwarding node's view differs: retry",
                    view.layout_id()
                ),
            );
        }
        if alive.is_empty() {
            // Only a primary mints versions of a key (docs/architecture.md, "Who mints").
            return refuse(
                0,
                needed.max(1),
                "no primary of the key is up to coordinate it",
            );
        }
        if alive.len() < needed_primaries {
            return refuse(
                alive.len(),
                needed_primaries,
                &format!("PW={needed_primaries} needs that many primaries up"),
            );
        }
        let covered = alive.len() + plan.primaries_down.len().min(plan.fallbacks.len());
        if covered < needed {
            return refuse(
                covered,
                needed,
                "too few primaries and fallbacks (sloppy quorum) are up",
            );
        }
        if !plan.next.is_empty() {
            // A ring change runs: W of the key's next replicas must be up too. A current primary
            // that is down counts through its fallback (as above; a pending replica has none),
            // and each node once: a fallback that is itself a next replica acks once.
            let mut covering: std::collections::BTreeSet<&NodeId> =
                plan.next.iter().filter(|p| view.is_alive(p)).collect();
            for (down, fallback) in plan.primaries_down.iter().zip(&plan.fallbacks) {
                if plan.next.contains(down) {
                    covering.insert(fallback);
                }
            }
            let next_covered = covering.len();
            if next_covered < needed {
                return refuse(
                    next_covered,
                    needed,
                    "a ring change runs and too few of the key's replicas in the next ring are up",
                );
            }
        }
        if !forwarded && !plan.preference.contains(&view.me) {
            // The replica it goes to coordinates it under its own view.
            drop(epoch);
            return self
                .forward(original, &w.key, needed, &alive, &view, deadline)
                .await;
        }
        self.metrics.coordinated_writes.inc();
        let key = w.key.clone();
        let planned = Planned {
            view: &view,
            plan: &plan,
            epoch,
        };
        match self
            .coordinate_write(w, planned, needed, needed_primaries, deadline)
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
                self.metrics.forwarded_after_local_failure.inc();
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
        // Primaries only: a fallback's hint (or its absence) would let the read miss versions
        // that W primaries acknowledged, and the delete would not cover them.
        let needed = self.config.r as usize;
        let state = self
            .quorum_read(
                key.clone(),
                needed,
                needed,
                deadline,
                "delete without context: reading the versions to delete",
            )
            .await?;
        self.metrics.deletes_read_first.inc();
        // The whole version vector, not a reply's context: the read's merged state can hold
        // more siblings than a reply shows, and the tombstone must cover them all.
        Ok(Bytes::from(state.context().to_context().encode(key)))
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
        // A definite refusal of a replica that did nothing, answered if no other takes it.
        let mut refused = None;
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
            let fwd = PeerRequest::Coordinator(CoordinatorRequest::Forward {
                opcode: frame.opcode,
                body: frame.body,
            });
            self.metrics.forwarded.inc();
            let call = self.transport.clone().call(
                addr.to_string(),
                fwd,
                left + Duration::from_millis(200),
            );
            match call.await {
                Ok(PeerResponse::Coordinator(CoordinatorResponse::ForwardReply {
                    opcode,
                    body,
                })) => match Response::decode(opcode, body) {
                    // Refused before anything was done (it does not replicate the key in its
                    // view, no primary is up there, or it serves nothing now): another replica
                    // may take it.
                    Ok(Response::Error(e))
                        if e.definite
                            && matches!(
                                e.kind,
                                ErrorKind::Unavailable { alive: 0, .. } | ErrorKind::NotServing
                            ) =>
                    {
                        // `NotServing` speaks of the replica, not of this node, which serves:
                        // answered as the replica missing.
                        refused = Some(if e.kind == ErrorKind::NotServing {
                            self.err(
                                ErrorKind::Unavailable {
                                    alive: 0,
                                    needed: needed as u64,
                                },
                                true,
                                format!(
                                    "key {}: write forwarded to replica {target}, refused: {}",
                                    HexKey(key.to_vec()),
                                    e.message
                                ),
                            )
                        } else {
                            Response::Error(e)
                        });
                        continue;
                    }
                    Ok(resp) => return resp,
                    Err(e) => {
                        return self.err(
                            ErrorKind::Internal,
                            false,
                            format!("undecodable reply to a write forwarded to {target}: {e}"),
                        )
                    }
                },
                Ok(other) => {
                    return self.err(
                        ErrorKind::Internal,
                        false,
                        format!("unexpected reply {other:?} to a write forwarded to {target}"),
                    )
                }
                Err(PeerError::Remote(e)) => return Response::Error(e),
                // Never sent, and no time is left to try another replica: nothing was done.
                Err(PeerError::Expired(_)) => {
                    return self.err(
                        ErrorKind::Timeout {
                            acks: 0,
                            needed: needed as u64,
                        },
                        true,
                        format!(
                            "key {}: dropped unexecuted: the deadline ran out before the write \
                             could be forwarded to replica {target}",
                            HexKey(key.to_vec())
                        ),
                    );
                }
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
        if let Some(resp) = refused {
            return resp;
        }
        self.quorum_error(
            key,
            QuorumError::Unavailable { alive: 0, needed },
            "no replica accepted the forwarded write",
            true,
        )
    }

    /// Mints the version here and replicates the resulting state to the key's other primaries:
    /// each primary is a slot, answered by the primary or by a fallback holding a hint for it
    /// (sloppy quorum). A down primary with no fallback gets a hint on this node, in the same
    /// batch as the write.
    /// `Err` = this replica's own write failed before anything was applied or shipped (a full
    /// disk, an unreadable copy, shutting down): the caller may let another replica coordinate.
    async fn coordinate_write(
        self: &Arc<Self>,
        w: WriteReq,
        planned: Planned<'_>,
        needed: usize,
        needed_primaries: usize,
        deadline: Instant,
    ) -> Result<Response, WriteError> {
        let Planned { view, plan, epoch } = planned;
        // Fallbacks in ring order: first one per down primary, then spares for live ones.
        let mut fallbacks = plan.fallbacks.iter().cloned();
        let mut slots: Vec<(NodeId, Option<NodeId>)> = Vec::new();
        let mut hint_for = Vec::new();
        for p in &plan.primaries_down {
            match fallbacks.next() {
                Some(f) => slots.push((p.clone(), Some(f))),
                None if self.config.hinted_handoff => hint_for.push(p.to_string()),
                None => {}
            }
        }
        for p in plan.primaries_alive.iter().filter(|p| **p != view.me) {
            slots.push((p.clone(), fallbacks.next()));
        }
        self.metrics.local_hints.inc_by(hint_for.len() as u64);
        let op = WriteOp::Update {
            key: w.key.clone(),
            ctx: w.ctx,
            value: w.value,
            timestamp_ms: now_ms(),
            hint_for,
        };
        // The state is shipped to the other replicas as soon as it is in this node's copy,
        // while this node's own fsync runs; the commit counts as this node's ack. With no other
        // replica to ship to, the write simply commits.
        let has_peers = !slots.is_empty();
        let store = self.store.clone();
        let write = async move {
            if has_peers {
                let (outcome, commit) = store.write_early(op, deadline).await?;
                Ok((outcome, Either::Left(commit)))
            } else {
                let (outcome, commit) = store.write_early(op, deadline).await?;
                commit.await?;
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
            Ok(Err(e @ WriteError::ShuttingDown(_))) => return Err(e),
            Ok(Err(e @ WriteError::Storage { .. })) if e.is_definite() => return Err(e),
            Ok(Err(e)) => return Ok(self.write_error(e)),
            Ok(Ok(o)) => o,
        };
        let dot = outcome.dot.expect("updates always mint a dot");
        // Only a primary of the key coordinates (a forwarded write to another node is refused
        // above); its own commit is an ack while it is a live primary in its view.
        let own_counts = plan.primaries_alive.contains(&view.me);
        // While a ring change runs, W is also needed among the key's next replicas: those that
        // have a slot here (a current primary's), this node, and the pending ones.
        let next = (!plan.next.is_empty()).then(|| {
            let reporting = plan
                .next
                .iter()
                .filter(|p| {
                    **p == view.me
                        || plan.pending.contains(p)
                        || slots.iter().any(|(primary, _)| primary == *p)
                })
                .count();
            NextQuorum {
                quorum: WriteQuorum::new(reporting, needed),
                replicas: plan.next.clone(),
            }
        });
        let mut tracker = WriteTracker::new(
            WriteQuorum::new(slots.len() + own_counts as usize, needed)
                .with_primaries(needed_primaries),
            next,
            view.me.clone(),
            own_counts,
        );
        let state = Bytes::from(outcome.state.encode());
        let mut fan = FanOut::new(deadline);
        let peer_targets = slots.len();
        for (primary, fallback) in slots {
            fan.push(Either::Left(Either::Left(self.write_slot(
                primary,
                fallback,
                view,
                w.key.clone(),
                state.clone(),
                deadline,
            ))));
        }
        // A ring change runs: the key's next replicas get the write too (counted toward the
        // next ring's W), or a hint for them if they miss it.
        for p in plan.pending.iter().filter(|p| **p != view.me) {
            fan.push(Either::Left(Either::Right(self.pending_slot(
                p.clone(),
                view,
                w.key.clone(),
                state.clone(),
                deadline,
            ))));
        }
        let node_id = self.node_id.clone();
        let key = w.key.clone();
        fan.push(Either::Right(async move {
            let result = committed.await;
            if let Err(e) = &result {
                warn!(node = %node_id, key = %HexKey(key.to_vec()), error = %e,
                      "coordinator's own commit failed after the state was shipped");
            }
            Ack::Own(result)
        }));
        let decided = fan.decide(&mut tracker).await;
        let (primary_acks, fallback_acks) = (
            tracker.quorum.primary_acks(),
            tracker.quorum.fallback_acks(),
        );
        self.metrics.fallback_acks.inc_by(fallback_acks as u64);
        let answer = match decided {
            Ok(()) => None,
            // The cause is this node's storage: say so, not just "too few acks". Definite only
            // when no other replica was sent the state.
            Err(_) if tracker.own_error.is_some() => {
                let cause = tracker.own_error.take().expect("checked by the guard");
                Some(self.own_commit_failed(
                    &w.key,
                    cause,
                    tracker.quorum.acks(),
                    needed,
                    peer_targets == 0,
                ))
            }
            Err(e) if tracker.failed_in_next => Some(self.quorum_error(
                &w.key,
                e,
                "a ring change runs: write applied on fewer of the key's replicas in the next \
                 ring than W",
                false,
            )),
            Err(e) => {
                Some(self.quorum_error(&w.key, e, "write applied on fewer replicas than W", false))
            }
        };
        if !fan.is_empty() {
            // Replicas beyond W still get the write; their acks arrive after the answer.
            let coordinator = self.clone();
            // Every call is bounded: peer calls by the time left, the own commit by the writer.
            fan.finish_late(&self.late, LateWait::AllReplies, tracker, move |t| {
                coordinator.metrics.late_acks.inc_by(t.late_acks);
                drop(epoch);
                std::future::ready(())
            });
        }
        if let Some(resp) = answer {
            return Ok(resp);
        }
        let body = (w.opts.flags & WriteOptions::RETURN_BODY != 0)
            .then(|| read_reply(&w.key, &outcome.state));
        let reply = WriteReply {
            actor: dot.actor,
            counter: dot.counter,
            body,
            primary_acks: primary_acks.min(u8::MAX as usize) as u8,
            fallback_acks: fallback_acks.min(u8::MAX as usize) as u8,
        };
        Ok(if w.is_delete {
            Response::Delete(reply)
        } else {
            Response::Put(reply)
        })
    }

    /// One primary's slot of a write: `Replicate` to the primary (unless it is down); if it
    /// fails, or has not answered by half the time left, the slot's fallback stores a hint for
    /// it, and the first acknowledgment answers the slot. If neither acknowledges, this node
    /// keeps the hint itself (it does not count toward W) so the primary still gets the write.
    /// A `'static` future bounded by `deadline`, so unfinished ones can move on.
    fn write_slot(
        self: &Arc<Self>,
        primary: NodeId,
        fallback: Option<NodeId>,
        view: &ClusterView,
        key: Bytes,
        state: Bytes,
        deadline: Instant,
    ) -> impl Future<Output = Ack> + Send + 'static {
        let coordinator = self.clone();
        let primary_addr = view.live_peer_addr(&primary);
        let fallback = fallback.map(|f| {
            let addr = view.peer_addr(&f).map(str::to_string);
            (f, addr)
        });
        async move {
            let c = &coordinator;
            let to_primary = async {
                match &primary_addr {
                    Some(addr) => c.replicate(&primary, addr, &key, &state, deadline).await,
                    None => false,
                }
            }
            .fuse();
            let to_fallback = |(f, addr): (NodeId, Option<String>)| {
                let (primary, key, state) = (&primary, &key, &state);
                async move {
                    let ok = c.store_hint(&f, addr, primary, key, state, deadline).await;
                    (f, ok)
                }
                .fuse()
            };
            tokio::pin!(to_primary);
            let primary_ok = match fallback {
                None => to_primary.await,
                Some(fallback) => {
                    let now = Instant::now();
                    let hint_after = now + deadline.saturating_duration_since(now) / 2;
                    let slow = tokio::time::sleep_until(TokioInstant::from_std(hint_after));
                    let early = tokio::select! {
                        ok = &mut to_primary => Some(ok),
                        _ = slow => None,
                    };
                    if early == Some(true) {
                        true
                    } else {
                        // The primary failed or is slow: the fallback stores a hint, and the
                        // first acknowledgment answers the slot.
                        let to_fallback = to_fallback(fallback);
                        tokio::pin!(to_fallback);
                        let mut primary_done = early.is_some();
                        let mut fallback_done = false;
                        loop {
                            tokio::select! {
                                ok = &mut to_primary, if !primary_done => {
                                    if ok {
                                        break true;
                                    }
                                    primary_done = true;
                                }
                                (f, ok) = &mut to_fallback, if !fallback_done => {
                                    if ok {
                                        return Ack::Slot {
                                            primary: primary.clone(),
                                            node: f,
                                            by_fallback: true,
                                            ok: true,
                                        };
                                    }
                                    fallback_done = true;
                                }
                            }
                            if primary_done && fallback_done {
                                break false;
                            }
                        }
                    }
                }
            };
            if !primary_ok && c.config.hinted_handoff {
                c.keep_local_hint(&primary, &key, &state).await;
            }
            Ack::Slot {
                node: primary.clone(),
                primary: primary.clone(),
                by_fallback: false,
                ok: primary_ok,
            }
        }
    }

    /// Ships the write to a replica of the next ring (a ring change runs); if it does not
    /// acknowledge, this node keeps a hint for it. Counts toward the next ring's W only.
    fn pending_slot(
        self: &Arc<Self>,
        node: NodeId,
        view: &ClusterView,
        key: Bytes,
        state: Bytes,
        deadline: Instant,
    ) -> impl Future<Output = Ack> + Send + 'static {
        let coordinator = self.clone();
        let addr = view.live_peer_addr(&node);
        async move {
            let c = &coordinator;
            let ok = match &addr {
                Some(addr) => c.replicate(&node, addr, &key, &state, deadline).await,
                None => false,
            };
            c.metrics.pending_writes.inc();
            if !ok && c.config.hinted_handoff {
                c.keep_local_hint(&node, &key, &state).await;
            }
            Ack::Pending { node, ok }
        }
    }

    /// Ships a key's state to one replica; true if it acknowledged.
    async fn replicate(
        &self,
        target: &NodeId,
        addr: &str,
        key: &Bytes,
        state: &Bytes,
        deadline: Instant,
    ) -> bool {
        let req = PeerRequest::Replica(ReplicaRequest::Replicate {
            key: key.clone(),
            state: state.clone(),
            timeout_ms: remaining_ms(deadline),
        });
        let left = deadline.saturating_duration_since(Instant::now());
        self.metrics.replicate_sent.inc();
        let result = self
            .transport
            .clone()
            .call(addr.to_string(), req, left)
            .await;
        // "States a replica did not acknowledge": an error answer (a full disk, a merge past
        // the state bounds, a retired node) as well as no answer.
        let failure = match &result {
            Ok(PeerResponse::Replica(ReplicaResponse::Ack)) => None,
            Ok(PeerResponse::Error(e)) => Some(format!("{}: {}", e.kind.name(), e.message)),
            Ok(_) => Some("an answer that is not Replicate's".into()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(cause) = &failure {
            self.metrics.replicate_failed.inc();
            debug!(node = %self.config.node_id, replica = %target, key = %HexKey(key.to_vec()),
                   %cause, "replicate failed");
        }
        failure.is_none()
    }

    /// Asks `fallback` to keep a hint of the state for `primary`; true if it did.
    async fn store_hint(
        &self,
        fallback: &NodeId,
        addr: Option<String>,
        primary: &NodeId,
        key: &Bytes,
        state: &Bytes,
        deadline: Instant,
    ) -> bool {
        self.metrics.hinted_writes.inc();
        let ok = if *fallback == self.membership.view().me {
            // This node is the fallback (a forwarded write on a node beyond the list). Not
            // the last copy: if it fails, the slot keeps the same hint again
            // (`keep_local_hint`), which counts a drop once (found in review: twice).
            self.keep_hint(primary, key, state, false).await.is_ok()
        } else {
            let req = PeerRequest::Handoff(HandoffRequest::StoreHint {
                target: primary.to_string(),
                key: key.clone(),
                state: state.clone(),
                timeout_ms: remaining_ms(deadline),
            });
            let left = deadline.saturating_duration_since(Instant::now());
            let result = match addr {
                None => Err(PeerError::Unreachable(format!("no address for {fallback}"))),
                Some(addr) => self.transport.clone().call(addr, req, left).await,
            };
            match &result {
                Err(e) => {
                    debug!(node = %self.config.node_id, %fallback, %primary, key = %HexKey(key.to_vec()),
                           error = %e, "hint not stored")
                }
                Ok(PeerResponse::Error(e)) => {
                    debug!(node = %self.config.node_id, %fallback, %primary, key = %HexKey(key.to_vec()),
                           kind = e.kind.name(), cause = %e.message, "hint not stored")
                }
                Ok(_) => {}
            }
            matches!(
                result,
                Ok(PeerResponse::Handoff(HandoffResponse::HintStored))
            )
        };
        if !ok {
            self.metrics.hinted_failed.inc();
        }
        ok
    }

    /// Keeps a hint of `state` for `primary` here; `last_copy` as in `WriteOp::Hint`.
    async fn keep_hint(
        &self,
        primary: &NodeId,
        key: &Bytes,
        state: &Bytes,
        last_copy: bool,
    ) -> Result<(), String> {
        let state = KeyState::decode(state).map_err(|e| e.to_string())?;
        // Within the peer-write limit like any state from a request (`config::Timeouts`).
        self.store
            .write_within(
                WriteOp::Hint {
                    target: primary.to_string(),
                    key: key.clone(),
                    state,
                    last_copy,
                },
                u32::MAX,
                || format!("key {}: hint for {primary}", HexKey(key.to_vec())),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A primary that neither answered nor was covered by a fallback: this node keeps the hint
    /// (like Cassandra's coordinator hints), so the write reaches it without a read.
    async fn keep_local_hint(&self, primary: &NodeId, key: &Bytes, state: &Bytes) {
        self.metrics.local_hints.inc();
        if let Err(cause) = self.keep_hint(primary, key, state, true).await {
            warn!(node = %self.config.node_id, %primary, key = %HexKey(key.to_vec()), %cause,
                  "could not keep a hint for a primary that missed a write");
        }
    }

    fn write_error(&self, e: WriteError) -> Response {
        self.err(e.kind(), e.is_definite(), e)
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

    /// Reads `key` from its live replicas and returns the merge of the first `needed` replies;
    /// the rest is gathered by the late-reply worker for read repair. When too few primaries
    /// are up for `needed`, the fallbacks of the down ones answer with their hints (a sloppy
    /// read), unless `needed_primaries` (PR) forbids it. Errors are definite (a read changes
    /// nothing); `what` names the operation in them.
    async fn quorum_read(
        self: &Arc<Self>,
        key: Bytes,
        needed: usize,
        needed_primaries: usize,
        deadline: Instant,
        what: &str,
    ) -> Result<KeyState, Response> {
        let view = self.view();
        let plan = plan(&view, &key, self.config.n as usize);
        let mut alive = plan.primaries_alive;
        if alive.len() < needed_primaries {
            return Err(self.quorum_error(
                &key,
                QuorumError::Unavailable {
                    alive: alive.len(),
                    needed: needed_primaries,
                },
                &format!("{what}: PR={needed_primaries} needs that many primaries up"),
                true,
            ));
        }
        let fallbacks: Vec<(NodeId, NodeId)> = if alive.len() < needed && self.config.hinted_handoff
        {
            plan.primaries_down
                .into_iter()
                .zip(plan.fallbacks)
                .collect()
        } else {
            Vec::new()
        };
        let targets = alive.len() + fallbacks.len();
        if targets < needed {
            return Err(self.quorum_error(
                &key,
                QuorumError::Unavailable {
                    alive: targets,
                    needed,
                },
                what,
                true,
            ));
        }
        self.metrics.coordinated_reads.inc();
        self.metrics.fallback_reads.inc_by(fallbacks.len() as u64);
        // R of the live primaries are asked, this node first (its own state is read inline
        // when in memory), the others in preference order; the rest are spares, started when
        // one of those fails or after `read_speculate` without R replies (Cassandra's
        // speculative retry). `read_all` asks every live replica at once (Riak). Either way the
        // caller is answered at R replies and the replies that came are read-repaired.
        let mut fan = FanOut::new(deadline);
        if let Some(i) = alive.iter().position(|t| *t == view.me) {
            alive[..=i].rotate_right(1);
        }
        let started = if self.config.read_all || !fallbacks.is_empty() {
            alive.len()
        } else {
            needed.max(needed_primaries).min(alive.len())
        };
        for (i, target) in alive.iter().enumerate() {
            let call = self.replica_state(target.clone(), None, &view, key.clone(), deadline);
            if i < started {
                fan.push(call);
            } else {
                fan.push_spare(call);
            }
        }
        if started < alive.len() {
            fan.speculate_after(self.config.read_speculate);
        }
        for (primary, fallback) in fallbacks {
            fan.push(self.replica_state(fallback, Some(primary), &view, key.clone(), deadline));
        }
        let mut tracker = ReadTracker {
            quorum: ReadQuorum::new(targets, needed).with_primaries(needed_primaries),
            node_id: self.node_id.clone(),
            key: key.clone(),
        };
        let answer = fan
            .decide(&mut tracker)
            .await
            .map_err(|e| self.quorum_error(&key, e, what, true));
        self.metrics.read_spares.inc_by(fan.spares_started() as u64);
        if !fan.is_empty() || tracker.quorum.needs_repair() {
            let coordinator = self.clone();
            fan.finish_late(
                &self.late,
                LateWait::UntilDeadline,
                tracker,
                move |t| async move { coordinator.read_repair(&key, &t.quorum, &view).await },
            );
        }
        answer
    }

    /// One replica's state of `key` for a read: this node's own from the store, another's
    /// over the peer protocol; with `hint_for`, the target is a fallback and answers with its
    /// hint for that primary. A `'static` future, so unfinished ones can move on.
    fn replica_state(
        self: &Arc<Self>,
        target: NodeId,
        hint_for: Option<NodeId>,
        view: &ClusterView,
        key: Bytes,
        deadline: Instant,
    ) -> impl Future<Output = ReadReplyOf> + Send + 'static {
        let coordinator = self.clone();
        let addr = view.peer_addr(&target).map(str::to_string);
        let is_me = target == view.me;
        async move {
            let fallback = hint_for.is_some();
            let result = match (is_me, hint_for) {
                (true, None) if !(coordinator.gate)(&key) => Err(format!(
                    "node {}: key {}: not synced yet (this node's data dir is new and anti-entropy \
                     has not synced the key's range from every other replica)",
                    coordinator.node_id,
                    HexKey(key.to_vec())
                )),
                (true, None) => match coordinator.store.read_by(key, deadline).await {
                    Ok(read) => read.map_err(|e| e.to_string()),
                    Err(Late) => Err(LOCAL_READ_LATE.to_string()),
                },
                (true, Some(primary)) => {
                    match coordinator
                        .store
                        .read_hints_by(&primary, &key, deadline)
                        .await
                    {
                        Ok(read) => read.map_err(|e| e.to_string()),
                        Err(Late) => Err(LOCAL_READ_LATE.to_string()),
                    }
                }
                (false, hint_for) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match addr {
                        None => Err(format!("no address for {target}")),
                        Some(addr) => {
                            let req = match hint_for {
                                None => PeerRequest::Replica(ReplicaRequest::ReadLocal {
                                    key: key.clone(),
                                    timeout_ms: remaining_ms(deadline),
                                }),
                                Some(primary) => PeerRequest::Handoff(HandoffRequest::ReadHint {
                                    target: primary.to_string(),
                                    key: key.clone(),
                                    timeout_ms: remaining_ms(deadline),
                                }),
                            };
                            let call = coordinator.transport.clone().call(addr.clone(), req, left);
                            match call.await {
                                Ok(PeerResponse::Replica(ReplicaResponse::State(b)))
                                | Ok(PeerResponse::Handoff(HandoffResponse::HintState(b))) => {
                                    KeyState::decode(&b).map_err(|e| {
                                        format!(
                                            "key {}: state from {addr} does not decode: {e}",
                                            HexKey(key.to_vec())
                                        )
                                    })
                                }
                                Ok(other) => Err(format!("unexpected reply {other:?}")),
                                Err(e) => Err(e.to_string()),
                            }
                        }
                    }
                }
            };
            (target, fallback, result)
        }
    }

    async fn read_repair(&self, key: &Bytes, q: &ReadQuorum, view: &ClusterView) {
        if !self.config.read_repair {
            return;
        }
        let targets = q.repair_targets();
        if targets.is_empty() {
            return;
        }
        let merged = q.merged().clone();
        let state = Bytes::from(merged.encode());
        // Every repair goes out now, together, bounded by one time from now (the read's end,
        // at most its deadline): tombstone GC counts on a state read before a delete landing
        // within half the settle time after the read's deadline (config `Timeouts`). One
        // after another, a silent target delayed the next one's by its whole timeout.
        let limit = READ_REPAIR_TIMEOUT.min(self.store.peer_write_limit());
        let limit_ms = limit.as_millis().max(1) as u32;
        let repairs = targets.into_iter().map(|target| {
            let (merged, state) = (merged.clone(), state.clone());
            async move {
                self.metrics.read_repairs.inc();
                let result = if target == view.me {
                    self.store
                        .write_within(
                            WriteOp::Merge {
                                key: key.clone(),
                                state: merged,
                            },
                            limit_ms,
                            || format!("key {}: read repair", HexKey(key.to_vec())),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    let req = PeerRequest::Replica(ReplicaRequest::Replicate {
                        key: key.clone(),
                        state,
                        timeout_ms: limit_ms,
                    });
                    match view.peer_addr(&target) {
                        None => Err("no address".to_string()),
                        Some(addr) => self
                            .transport
                            .clone()
                            .call(addr.to_string(), req, limit)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                    }
                };
                if let Err(cause) = result {
                    self.metrics.read_repair_failed.inc();
                    warn!(node = %self.config.node_id, replica = %target, key = %HexKey(key.to_vec()), %cause, "read repair failed");
                }
            }
        });
        futures::future::join_all(repairs).await;
    }
}

#[cfg(test)]
mod tests;
