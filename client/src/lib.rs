//! Async client for ringkv.
//!
//! A key holds **siblings**: concurrent versions that no write has resolved yet. Every read
//! returns all of them plus an opaque causal [`Context`]; send that context back with the next
//! write of the key and the write replaces exactly the versions you read. A write without a
//! context supersedes nothing: it becomes one more sibling.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), ringkv_client::Error> {
//! # // Hidden set-up: a real node on an ephemeral port (the doctest runs against it).
//! # let node = ringkv_jepsen::NodeProcess::start_temp("doc", &["--n", "1"]);
//! # let addr = node.addr.clone();
//! use ringkv_client::Client;
//!
//! let client = Client::connect([addr]).await?; // e.g. "127.0.0.1:7379"
//! client.put("greeting", "hello", None).await?; // no context: a blind write
//! client.put("greeting", "hi", None).await?;    // another blind write: a sibling
//! let read = client.get("greeting").await?;
//! assert_eq!(read.siblings.len(), 2);
//! if read.has_conflict() {
//!     // Resolve: write one value with the read's context; it replaces what was read.
//!     let merged: Vec<String> = read.values().iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect();
//!     client.put("greeting", merged.join("+"), Some(&read.context)).await?;
//! }
//! let read = client.get("greeting").await?;
//! assert_eq!(read.value().unwrap(), "hello+hi");
//! client.delete("greeting", Some(&read.context)).await?;
//! assert!(!client.get("greeting").await?.is_found());
//! # Ok(()) }
//! ```
//!
//! Connections are reused and pipelined: many concurrent calls share one TCP connection per
//! node, matched by request id. With [`ClientConfig::ring_aware`] and several addresses, the
//! client reads the ring (`Request::Ring`, refreshed every [`RING_REFRESH`]) and sends each keyed
//! request to a live replica of the key among those addresses, so a write is coordinated where
//! it lands instead of being forwarded one more hop, and a read is answered with one replica
//! read in place. Routing is only a shortcut: any node still accepts any request.
//!
//! Reads fail over to the next address when a node is unreachable; writes are never retried
//! automatically (a retried write mints a second version), so a write whose outcome is unknown
//! returns an error with [`Error::is_definite`] = false. A request that certainly reached no
//! data goes to the next address whatever it is, a write too: one refused at connect (too many
//! connections), answered `NotServing` by a node that serves no reads or writes now (a ring
//! change took it out, or it has just started and does not know the ring yet), or answered
//! `Unavailable` before anything was written (a node on a partition's minority side, which
//! cannot reach enough of the key's replicas: another may; Cassandra's drivers retry an
//! unavailable on the next host too); when every address refuses, the error is the last
//! refusal (definite). An `Unavailable` that is not definite (the write reached fewer than W
//! replicas) is returned as it is. Dialling a node takes at most
//! [`ClientConfig::connect_timeout`] and never more than what is left of the request's
//! deadline; the calls waiting on one dial share its outcome (they do not dial a node that
//! does not answer one after another); a request whose deadline passes before it could be
//! sent is [`Error::Expired`] (definite). A request that times out on a node makes the next
//! request start at the next address (a paused node keeps its connections open). A local read
//! (`GetOptions::local`) asks one node's own replica and never fails over.
//!
//! An overloaded node refuses requests at once with `Overloaded` and a retry-after hint
//! ([`Error::is_overloaded`], [`Error::retry_after`]); nothing was done. Reads (and the admin
//! requests that change nothing: ping, status, ring, members, cluster status and plan) are
//! retried up to [`ClientConfig::overload_retries`] times with exponential backoff (at least
//! the node's hint, with jitter drawn per backoff from a per-client random start), on the next
//! address, within the request's deadline; writes, repairs and ring changes are not, the
//! caller decides.

pub mod conn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_protocol::message::{ReadOptions, WriteOptions};
use ringkv_protocol::ring::{key_position, NodeId, Ring};
use ringkv_protocol::{Request, Response};
use tokio::sync::Mutex;

pub use ringkv_protocol::{
    ErrorKind, MemberStatus, MembersReply, RepairReply, RingMember, RingReply, StatusReply,
};

use conn::{Conn, ConnError};

/// The opaque causal context of a key, returned by reads. Pass it back unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context(Bytes);

impl Context {
    /// The empty context: a write with it supersedes nothing.
    pub fn empty() -> Context {
        Context(Bytes::new())
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Rebuilds a context from bytes a read returned earlier (e.g. from `kvctl --json`).
    pub fn from_bytes(b: impl Into<Bytes>) -> Context {
        Context(b.into())
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    /// `None` = a deletion marker (tombstone).
    pub value: Option<Bytes>,
    /// Wall-clock ms at the node that applied the write.
    pub timestamp_ms: u64,
    /// The write's identity `(actor, counter)`, stable across replicas.
    pub dot: (u64, u64),
}

impl Sibling {
    pub fn is_deleted(&self) -> bool {
        self.value.is_none()
    }
}

/// The result of a read: every sibling and the context to write back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub siblings: Vec<Sibling>,
    pub context: Context,
    /// Siblings the reply could not carry: 0, unless coordinators that could not see each
    /// other (more than `MERGE_FACTOR` sides of a partition) pushed the key past what one reply
    /// holds. The context covers exactly `siblings`: write the resolved value with it, then
    /// read again to resolve the rest.
    pub hidden: u32,
}

impl Read {
    /// True when at least one sibling is a value (not a tombstone).
    pub fn is_found(&self) -> bool {
        self.siblings.iter().any(|s| s.value.is_some())
    }
    /// The live values, oldest dot first.
    pub fn values(&self) -> Vec<&Bytes> {
        self.siblings
            .iter()
            .filter_map(|s| s.value.as_ref())
            .collect()
    }
    /// The value when exactly one live sibling exists.
    pub fn value(&self) -> Option<&Bytes> {
        match self.values().as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
    /// True when more than one sibling exists (a conflict to resolve).
    pub fn has_conflict(&self) -> bool {
        self.siblings.len() > 1 || self.hidden > 0
    }

    /// The reply's context and its small values are copied out of the frame: they arrived as
    /// slices of the connection's read buffer, and an application keeping one (the context
    /// for its next write, a cached value) would otherwise keep the whole buffer chunk of 8
    /// KiB or more alive. A client that kept the contexts of 100 000 keys grew to 150-200 MiB
    /// and spent a sixth of its CPU zeroing fresh pages (docs/benchmarks.md, Overload).
    /// Values larger than `SHARED_VALUE_MIN` stay zero-copy: they fill most of their chunk.
    fn from_reply(r: ringkv_protocol::ReadReply) -> Read {
        Read {
            siblings: r
                .siblings
                .into_iter()
                .map(|s| Sibling {
                    value: s.value.map(|v| {
                        if v.len() < SHARED_VALUE_MIN {
                            Bytes::copy_from_slice(&v)
                        } else {
                            v
                        }
                    }),
                    timestamp_ms: s.timestamp_ms,
                    dot: (s.actor, s.counter),
                })
                .collect(),
            context: Context(Bytes::copy_from_slice(&r.context)),
            hidden: r.hidden,
        }
    }
}

/// Values at least this large are returned as slices of the frame they arrived in; smaller
/// ones are copied (see `Read::from_reply`).
const SHARED_VALUE_MIN: usize = 4096;

/// The result of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The dot the write minted.
    pub dot: (u64, u64),
    /// The key's siblings and context after the write, when requested (`put_returning`).
    pub read: Option<Read>,
    /// Acks counted toward W when the write was answered: from the key's primaries, and from
    /// fallbacks that stored a hint for a down primary (sloppy quorum).
    pub primary_acks: u8,
    pub fallback_acks: u8,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The node answered with an error.
    #[error("node {addr}: {}: {message}", kind.name())]
    Server {
        addr: String,
        kind: ErrorKind,
        definite: bool,
        message: String,
    },
    #[error("cannot connect to any of {addrs:?}: {cause}")]
    Connect { addrs: Vec<String>, cause: String },
    /// The connection broke after the request was sent: the outcome is unknown.
    #[error("connection to {addr} lost: {cause}")]
    ConnectionLost { addr: String, cause: String },
    /// No reply within the client deadline: the outcome is unknown.
    #[error("no reply from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// The request's deadline passed while it waited to be sent (behind others, to a node
    /// that reads slowly): it was never sent, nothing was done.
    #[error("not sent to {addr}: its {timeout:?} deadline passed while it waited to be sent")]
    Expired { addr: String, timeout: Duration },
    #[error("invalid reply from {addr}: {cause}")]
    Protocol { addr: String, cause: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// The server's error kind, if the node answered.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Server { kind, .. } => Some(*kind),
            _ => None,
        }
    }
    /// True when a node refused the request for lack of capacity (nothing was done).
    pub fn is_overloaded(&self) -> bool {
        matches!(self.kind(), Some(ErrorKind::Overloaded { .. }))
    }

    /// How long the node asked the client to wait before retrying, when it was overloaded.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.kind() {
            Some(ErrorKind::Overloaded { retry_after_ms }) => {
                Some(Duration::from_millis(retry_after_ms))
            }
            _ => None,
        }
    }

    /// True when the request certainly had no effect (safe to retry a write).
    pub fn is_definite(&self) -> bool {
        match self {
            Error::Server { definite, .. } => *definite,
            Error::Connect { .. } | Error::Expired { .. } | Error::InvalidArgument(_) => true,
            Error::ConnectionLost { .. } | Error::Timeout { .. } | Error::Protocol { .. } => false,
        }
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Deadline of each request; also sent to the node as its server-side deadline.
    pub request_timeout: Duration,
    /// Requests queued per connection before callers wait.
    pub pipeline_depth: usize,
    /// Send keyed requests to a replica of the key (see the crate docs); only has an effect
    /// with two or more addresses. Off by default: on loopback it measured no gain
    /// (docs/benchmarks.md); it saves a network hop where a hop costs real round-trip time.
    pub ring_aware: bool,
    /// Times a read refused `Overloaded` is retried (writes never are), with backoff from
    /// [`ClientConfig::overload_backoff`] doubling per attempt, at least the node's
    /// retry-after hint, within the request's deadline. 0 = report `Overloaded` at once.
    pub overload_retries: u32,
    /// The first backoff after an `Overloaded` read.
    pub overload_backoff: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            pipeline_depth: 1024,
            ring_aware: false,
            overload_retries: 3,
            overload_backoff: Duration::from_millis(10),
        }
    }
}

/// Extra time the client waits beyond the server-side deadline, so that a definite answer
/// (e.g. `Timeout{acks, needed}`) arrives before the client gives up.
const CLIENT_GRACE: Duration = Duration::from_millis(500);

/// Per-request read settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetOptions {
    /// Replies to wait for; None = the cluster default.
    pub r: Option<u8>,
    pub timeout: Option<Duration>,
    /// Read only the contacted node's own replica (debugging).
    pub local: bool,
    /// Of the R replies, how many must come from the key's primaries rather than fallbacks
    /// answering for a down one (Riak's `pr`); None = no requirement.
    pub pr: Option<u8>,
}

/// Per-request write settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    /// Acks to wait for; None = the cluster default.
    pub w: Option<u8>,
    pub timeout: Option<Duration>,
    /// Return the key's siblings and context after the write.
    pub return_body: bool,
    /// Of the W acks, how many must come from the key's primaries rather than fallbacks
    /// holding a hint for a down one (Riak's `pw`; `pw = w` is a strict quorum); None = no
    /// requirement (sloppy quorum).
    pub pw: Option<u8>,
}

struct Node {
    addr: String,
    /// The live connection, read on every request without waiting (a plain lock held for a
    /// clone); `connecting` serialises (re)connecting so only one caller dials.
    conn: std::sync::Mutex<Option<Conn>>,
    connecting: Mutex<()>,
    /// When the last dial failed, and why: the answer of every caller that waited on that
    /// dial (`Client::conn`).
    dial_failed: std::sync::Mutex<Option<(Instant, String)>>,
}

struct Inner {
    nodes: Vec<Node>,
    config: ClientConfig,
    next_id: AtomicU64,
    /// Index of the node that answered last; requests start there.
    preferred: AtomicUsize,
    /// The ring as last read, for ring-aware routing; `None` before the first read.
    routing: RwLock<Option<Routing>>,
    /// A ring read is in flight (at most one at a time).
    refreshing: AtomicBool,
    /// `Overloaded` reads retried.
    overload_retries: AtomicU64,
    /// Where this client's backoff jitter starts: random per client, so that clients refused
    /// together (restarted together in a deploy) do not back off in step.
    jitter_salt: u64,
    /// Backoffs taken so far: each gets its own jitter.
    jitter_seq: AtomicU64,
}

/// How often a ring-aware client re-reads the ring (joins, leaves, liveness).
pub const RING_REFRESH: Duration = Duration::from_secs(5);

/// Where keys live, as last read from the cluster.
struct Routing {
    ring: Ring,
    n: usize,
    /// Ring member -> index of the configured address that reaches it. Only members the
    /// reporting node saw alive and whose client address the client was given.
    targets: HashMap<NodeId, usize>,
    read_at: Instant,
}

impl Routing {
    fn new(reply: &RingReply, nodes: &[Node]) -> Routing {
        let ring = Ring::with_token_names(reply.members.iter().map(|m| {
            let name = if m.tokens_of.is_empty() {
                m.node_id.as_str()
            } else {
                m.tokens_of.as_str()
            };
            (m.node_id.as_str(), name, m.tokens)
        }));
        let targets = reply
            .members
            .iter()
            .filter(|m| m.alive)
            .filter_map(|m| {
                let i = nodes.iter().position(|n| n.addr == m.client_addr)?;
                Some((NodeId::from(m.node_id.as_str()), i))
            })
            .collect();
        Routing {
            ring,
            n: reply.n as usize,
            targets,
            read_at: Instant::now(),
        }
    }

    /// No routing (the ring could not be read): requests go where they would without it.
    fn none() -> Routing {
        Routing {
            ring: Ring::new(std::iter::empty::<(&str, u32)>()),
            n: 0,
            targets: HashMap::new(),
            read_at: Instant::now(),
        }
    }

    /// A reachable replica of `key`, rotating over them with `seq` to spread the load.
    fn replica(&self, key: &[u8], seq: u64) -> Option<usize> {
        if self.targets.is_empty() {
            return None;
        }
        let replicas: Vec<usize> = self
            .ring
            .preference_list(key_position(key), self.n)
            .iter()
            .filter_map(|id| self.targets.get(id).copied())
            .collect();
        (!replicas.is_empty()).then(|| replicas[seq as usize % replicas.len()])
    }
}

/// A handle to a ringkv cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects with default settings to the first reachable address.
    pub async fn connect<I, S>(addrs: I) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Client::connect_with(addrs, ClientConfig::default()).await
    }

    pub async fn connect_with<I, S>(addrs: I, config: ClientConfig) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let client = Client::new(addrs, config)?;
        client.ping().await?;
        Ok(client)
    }

    /// Creates a client without contacting any node (connections open on first use).
    pub fn new<I, S>(addrs: I, config: ClientConfig) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let nodes: Vec<Node> = addrs
            .into_iter()
            .map(|a| Node {
                addr: a.into(),
                conn: std::sync::Mutex::new(None),
                connecting: Mutex::new(()),
                dial_failed: std::sync::Mutex::new(None),
            })
            .collect();
        if nodes.is_empty() {
            return Err(Error::InvalidArgument("no node addresses given".into()));
        }
        Ok(Client {
            inner: Arc::new(Inner {
                nodes,
                config,
                next_id: AtomicU64::new(1),
                preferred: AtomicUsize::new(0),
                routing: RwLock::new(None),
                refreshing: AtomicBool::new(false),
                overload_retries: AtomicU64::new(0),
                jitter_salt: {
                    use std::hash::BuildHasher;
                    // The standard library seeds each RandomState from the OS's randomness.
                    std::collections::hash_map::RandomState::new().hash_one(std::process::id())
                },
                jitter_seq: AtomicU64::new(0),
            }),
        })
    }

    pub fn addrs(&self) -> Vec<String> {
        self.inner.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// Reads a key with default options.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Read, Error> {
        self.get_with(key, GetOptions::default()).await
    }

    pub async fn get_with(&self, key: impl AsRef<[u8]>, opts: GetOptions) -> Result<Read, Error> {
        let timeout = opts.timeout.unwrap_or(self.inner.config.request_timeout);
        let req = Request::Get {
            key: Bytes::copy_from_slice(key.as_ref()),
            opts: ReadOptions {
                r: opts.r.unwrap_or(0),
                timeout_ms: millis(timeout),
                flags: if opts.local { ReadOptions::LOCAL } else { 0 },
                pr: opts.pr.unwrap_or(0),
            },
        };
        // Local reads target one node's replica: no failover to another node.
        let route = if opts.local {
            None
        } else {
            self.route(key.as_ref())
        };
        let (addr, resp) = self.call(req, timeout, route).await?;
        match resp {
            Response::Get(r) => Ok(Read::from_reply(r)),
            other => Err(unexpected(&addr, other)),
        }
    }

    /// Writes `value`. With `Some(context)` it replaces the versions that context saw; with
    /// `None` it is a blind write that becomes a new sibling next to any existing ones.
    pub async fn put(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        context: Option<&Context>,
    ) -> Result<Written, Error> {
        self.put_with(key, value, context, PutOptions::default())
            .await
    }

    /// Like `put`, returning the key's resulting siblings and their context. Use that context
    /// for the next write: it covers exactly the siblings returned, never more.
    pub async fn put_returning(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        context: Option<&Context>,
    ) -> Result<Read, Error> {
        let opts = PutOptions {
            return_body: true,
            ..PutOptions::default()
        };
        let w = self.put_with(key, value, context, opts).await?;
        Ok(w.read
            .expect("put_with refuses a reply without the body it asked for"))
    }

    pub async fn put_with(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        context: Option<&Context>,
        opts: PutOptions,
    ) -> Result<Written, Error> {
        let timeout = opts.timeout.unwrap_or(self.inner.config.request_timeout);
        let route = self.route(key.as_ref());
        let req = Request::Put {
            key: Bytes::copy_from_slice(key.as_ref()),
            value: value.into(),
            context: context.map(|c| c.0.clone()).unwrap_or_default(),
            opts: write_opts(&opts, timeout),
        };
        let (addr, resp) = self.call(req, timeout, route).await?;
        match resp {
            // The write was applied; only its reply is wrong (a node of another version).
            Response::Put(w) if opts.return_body && w.body.is_none() => Err(Error::Protocol {
                addr,
                cause: "the put asked for the key's resulting siblings and the reply has none"
                    .into(),
            }),
            Response::Put(w) => Ok(written(w)),
            other => Err(unexpected(&addr, other)),
        }
    }

    /// Deletes the versions `context` saw (a tombstone replaces them). With `None` the node
    /// first reads the key with the cluster's R and deletes every version that read returns.
    pub async fn delete(
        &self,
        key: impl AsRef<[u8]>,
        context: Option<&Context>,
    ) -> Result<Written, Error> {
        self.delete_with(key, context, PutOptions::default()).await
    }

    pub async fn delete_with(
        &self,
        key: impl AsRef<[u8]>,
        context: Option<&Context>,
        opts: PutOptions,
    ) -> Result<Written, Error> {
        let timeout = opts.timeout.unwrap_or(self.inner.config.request_timeout);
        let route = self.route(key.as_ref());
        let req = Request::Delete {
            key: Bytes::copy_from_slice(key.as_ref()),
            context: context.map(|c| c.0.clone()).unwrap_or_default(),
            opts: write_opts(&opts, timeout),
        };
        let (addr, resp) = self.call(req, timeout, route).await?;
        match resp {
            Response::Delete(w) => Ok(written(w)),
            other => Err(unexpected(&addr, other)),
        }
    }

    /// Round-trip time to a node.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        let timeout = self.inner.config.request_timeout;
        let (addr, resp) = self.call(Request::Ping, timeout, None).await?;
        match resp {
            Response::Pong => Ok(start.elapsed()),
            other => Err(unexpected(&addr, other)),
        }
    }

    /// The status (identity, metrics, workers) of the node that answers.
    pub async fn status(&self) -> Result<StatusReply, Error> {
        let timeout = self.inner.config.request_timeout;
        let (addr, resp) = self.call(Request::Status, timeout, None).await?;
        match resp {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(&addr, other)),
        }
    }

    /// The contacted node's view of the ring: members, tokens, ownership shares, liveness.
    pub async fn ring(&self) -> Result<RingReply, Error> {
        let timeout = self.inner.config.request_timeout;
        let (addr, resp) = self.call(Request::Ring, timeout, None).await?;
        match resp {
            Response::Ring(r) => Ok(r),
            other => Err(unexpected(&addr, other)),
        }
    }

    /// Reads the ring now and routes keyed requests by it. A ring-aware client also does this
    /// by itself, in the background, when its ring is older than [`RING_REFRESH`].
    pub async fn refresh_ring(&self) -> Result<(), Error> {
        let reply = self.ring().await?;
        let routing = Routing::new(&reply, &self.inner.nodes);
        *self.inner.routing.write().expect("routing lock poisoned") = Some(routing);
        Ok(())
    }

    /// The contacted node's membership view: SWIM state, incarnation, phi and last-heard time
    /// of every member.
    pub async fn members(&self) -> Result<MembersReply, Error> {
        let timeout = self.inner.config.request_timeout;
        let (addr, resp) = self.call(Request::Members, timeout, None).await?;
        match resp {
            Response::Members(m) => Ok(m),
            other => Err(unexpected(&addr, other)),
        }
    }

    /// Starts an anti-entropy cycle on the contacted node now; the reply says at which count
    /// of its completed cycles (`aae.cycles` in `status`) the requested one is done.
    pub async fn repair(&self) -> Result<RepairReply, Error> {
        self.repair_range(None).await
    }

    /// `repair` over the ring positions `first..=last` only (`None`: all of them).
    pub async fn repair_range(&self, range: Option<(u64, u64)>) -> Result<RepairReply, Error> {
        let timeout = self.inner.config.request_timeout;
        let (addr, resp) = self.call(Request::Repair { range }, timeout, None).await?;
        match resp {
            Response::Repair(r) => Ok(r),
            other => Err(unexpected(&addr, other)),
        }
    }

    /// A `kvctl cluster` request (JSON, see docs/protocol.md); the contacted node forwards it
    /// to the claimant. The reply is JSON too.
    pub async fn cluster(&self, json: Vec<u8>) -> Result<Bytes, Error> {
        let timeout = self.inner.config.request_timeout;
        let (addr, resp) = self
            .call(Request::Cluster(Bytes::from(json)), timeout, None)
            .await?;
        match resp {
            Response::Cluster(r) => Ok(r),
            other => Err(unexpected(&addr, other)),
        }
    }

    /// The address index to send a request for `key` to: a live replica of the key when the
    /// client is ring-aware and knows the ring, else `None` (the preferred address). Starts a
    /// ring read in the background when the ring is unknown or older than `RING_REFRESH`.
    fn route(&self, key: &[u8]) -> Option<usize> {
        if !self.inner.config.ring_aware || self.inner.nodes.len() < 2 {
            return None;
        }
        let (pick, stale) = {
            let routing = self.inner.routing.read().expect("routing lock poisoned");
            match routing.as_ref() {
                None => (None, true),
                Some(r) => {
                    let seq = self.inner.next_id.load(Ordering::Relaxed);
                    (r.replica(key, seq), r.read_at.elapsed() > RING_REFRESH)
                }
            }
        };
        if stale && !self.inner.refreshing.swap(true, Ordering::AcqRel) {
            let client = self.clone();
            tokio::spawn(async move {
                if let Err(e) = client.refresh_ring().await {
                    // Routing stays off until the next refresh is due.
                    tracing::debug!(error = %e, "ring read for routing failed");
                    *client.inner.routing.write().expect("routing lock poisoned") =
                        Some(Routing::none());
                }
                client.inner.refreshing.store(false, Ordering::Release);
            });
        }
        pick
    }

    /// The live connection to node `i`, dialled if there is none, within what is left until
    /// `send_by` (the request's deadline) and at most the connect timeout.
    async fn conn(&self, i: usize, send_by: Instant) -> Result<Conn, String> {
        let node = &self.inner.nodes[i];
        let live = || {
            node.conn
                .lock()
                .expect("connection slot lock poisoned")
                .as_ref()
                .filter(|c| c.is_alive())
                .cloned()
        };
        if let Some(c) = live() {
            return Ok(c);
        }
        let asked = Instant::now();
        let _dialing = node.connecting.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(c) = live() {
            return Ok(c);
        }
        // Or failed: that is this caller's answer too (found in review: callers waiting on
        // a node that does not answer dialled it one after another, each for the whole
        // connect timeout, and the last reached the next address long past its deadline).
        if let Some((at, cause)) = node
            .dial_failed
            .lock()
            .expect("dial failure lock poisoned")
            .as_ref()
        {
            if *at >= asked {
                return Err(cause.clone());
            }
        }
        let full = self.inner.config.connect_timeout;
        let allowed = full.min(send_by.saturating_duration_since(Instant::now()));
        if allowed.is_zero() {
            return Err("the request's deadline passed before it could connect".into());
        }
        let started = Instant::now();
        match Conn::connect(&node.addr, allowed, self.inner.config.pipeline_depth).await {
            Ok(c) => {
                *node.conn.lock().expect("connection slot lock poisoned") = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                // A dial cut short by this request's own deadline says nothing of the node
                // to callers with more time.
                if allowed == full || started.elapsed() < allowed {
                    *node.dial_failed.lock().expect("dial failure lock poisoned") =
                        Some((Instant::now(), e.clone()));
                }
                Err(e)
            }
        }
    }

    /// [`Client::call_once`], and for reads refused `Overloaded` a few more times with backoff
    /// (on the next address, within the deadline). Only requests that change nothing are sent
    /// again after a connection broke with them sent (a write, a repair or a cluster change may
    /// have been done: the caller is told the outcome is unknown).
    async fn call(
        &self,
        req: Request,
        timeout: Duration,
        route: Option<usize>,
    ) -> Result<(String, Response), Error> {
        let idempotent = match &req {
            Request::Get { .. }
            | Request::Ping
            | Request::Status
            | Request::Ring
            | Request::Members => true,
            // `kvctl cluster status` and `plan` read; the other cluster requests change.
            Request::Cluster(json) => matches!(json.as_ref(), b"\"Status\"" | b"\"Plan\""),
            _ => false,
        };
        let local =
            matches!(&req, Request::Get { opts, .. } if opts.flags & ReadOptions::LOCAL != 0);
        // A local read asks one node's own copy: another node's is another answer.
        let retry_after_send = idempotent && !local;
        let deadline = Instant::now() + timeout;
        let mut route = route;
        let mut attempt = 0u32;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            // A retry gets what is left of the request's deadline, on the node too: `call_once`
            // stamps it when the request is sent.
            let result = self
                .call_once(req.clone(), left, retry_after_send, !local, route)
                .await;
            let hint = match &result {
                Err(e) if idempotent && attempt < self.inner.config.overload_retries => {
                    match e.retry_after() {
                        Some(hint) => hint,
                        None => return result,
                    }
                }
                _ => return result,
            };
            let backoff = overload_backoff(
                self.inner.config.overload_backoff,
                attempt,
                hint,
                self.jitter_seed(),
            );
            if Instant::now() + backoff >= deadline {
                return result;
            }
            attempt += 1;
            self.inner.overload_retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            // Another node may have room (a local read stays on its node).
            if !local {
                let n = self.inner.nodes.len();
                let from = route.unwrap_or_else(|| self.inner.preferred.load(Ordering::Relaxed));
                route = Some((from + 1) % n);
            }
        }
    }

    /// A fresh seed for one backoff's jitter: reads refused together (by one node, at one
    /// moment) each get their own, and so do clients started together.
    fn jitter_seed(&self) -> u64 {
        self.inner.jitter_salt ^ self.inner.jitter_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Reads refused `Overloaded` that this client retried (all calls together).
    pub fn overload_retries(&self) -> u64 {
        self.inner.overload_retries.load(Ordering::Relaxed)
    }

    /// Sends `req` to `route` (else the preferred node), failing over to the others when a
    /// node cannot be reached (unless `failover` is false: a local read asks one node's own
    /// replica, and another node's would be another answer). `retry_after_send` also fails
    /// over when the request was sent but the connection broke (only for requests that
    /// change nothing).
    async fn call_once(
        &self,
        req: Request,
        timeout: Duration,
        retry_after_send: bool,
        failover: bool,
        route: Option<usize>,
    ) -> Result<(String, Response), Error> {
        let n = self.inner.nodes.len();
        let start = route.unwrap_or_else(|| self.inner.preferred.load(Ordering::Relaxed)) % n;
        let now = Instant::now();
        // The request's own deadline: a request still queued in the connection then is not
        // sent, and one sent carries only what is left of it (the node counts that from its
        // own read). The wait for the reply gets the grace on top.
        let send_by = now + timeout;
        let deadline = now + timeout + CLIENT_GRACE;
        let mut last_err = String::new();
        let mut refusal: Option<(String, ringkv_protocol::ErrorReply)> = None;
        let steps = if failover { n } else { 1 };
        for step in 0..steps {
            let i = (start + step) % n;
            let addr = self.inner.nodes[i].addr.clone();
            // Nothing was sent that could have done anything (a failed dial, a refusal, a
            // connection lost under a read): past its deadline, it is not sent at all.
            if Instant::now() >= send_by {
                return Err(Error::Expired { addr, timeout });
            }
            let conn = match self.conn(i, send_by).await {
                Ok(c) => c,
                Err(e) => {
                    last_err = format!("{addr}: {e}");
                    continue;
                }
            };
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let left = deadline.saturating_duration_since(Instant::now());
            let mut to_send = req.clone();
            let encode = move || {
                let left = send_by.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                if let Some(ms) = to_send.timeout_ms_mut() {
                    if *ms != 0 {
                        *ms = (*ms).min(millis(left));
                    }
                }
                Some(to_send.to_frame(id))
            };
            let result = tokio::time::timeout(left, async {
                let frame = conn.call_at_send(encode).await?;
                Response::decode(frame.opcode, frame.body)
                    .map_err(|e| ConnError::Protocol(e.to_string()))
            })
            .await;
            match result {
                Err(_) => {
                    // The next request starts at the next address: a node that stopped
                    // answering (paused, its host gone) keeps its connection open, and
                    // would otherwise be asked first until that broke (found in review).
                    let _ = self.inner.preferred.compare_exchange(
                        i,
                        (i + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    return Err(Error::Timeout {
                        addr,
                        timeout: timeout + CLIENT_GRACE,
                    });
                }
                // This node serves no reads or writes now (taken out of the ring, or it does
                // not know the ring yet), or cannot reach enough of the key's replicas (a
                // partition's minority side), and did nothing: the next node gets the request
                // (a write too), as after a refused connection.
                Ok(Ok(Response::Error(e)))
                    if e.definite
                        && matches!(
                            e.kind,
                            ErrorKind::NotServing | ErrorKind::Unavailable { .. }
                        ) =>
                {
                    last_err = format!("{addr}: {}", e.message);
                    refusal = Some((addr, e));
                }
                Ok(Ok(Response::Error(e))) => {
                    self.inner.preferred.store(i, Ordering::Relaxed);
                    return Err(Error::Server {
                        addr,
                        kind: e.kind,
                        definite: e.definite,
                        message: e.message,
                    });
                }
                Ok(Ok(resp)) => {
                    self.inner.preferred.store(i, Ordering::Relaxed);
                    return Ok((addr, resp));
                }
                Ok(Err(ConnError::Protocol(cause))) => return Err(Error::Protocol { addr, cause }),
                // Refused at accept (too many connections): nothing was read, so the request
                // (a write too) goes to the next node, as when a connect fails; if every node
                // refuses, the answer is the last refusal (definite; an `Overloaded` one with
                // its retry-after).
                Ok(Err(ConnError::Refused(e))) => {
                    last_err = format!("{addr}: {}", e.message);
                    refusal = Some((addr, e));
                }
                // Its deadline passed while it waited in the connection's queue: never sent.
                Ok(Err(ConnError::Expired)) => return Err(Error::Expired { addr, timeout }),
                Ok(Err(ConnError::Lost(cause))) => {
                    if !retry_after_send {
                        return Err(Error::ConnectionLost { addr, cause });
                    }
                    last_err = format!("{addr}: {cause}");
                }
            }
        }
        if let Some((addr, e)) = refusal {
            return Err(Error::Server {
                addr,
                kind: e.kind,
                definite: true,
                message: e.message,
            });
        }
        Err(Error::Connect {
            addrs: self.addrs(),
            cause: last_err,
        })
    }
}

/// The wait before retry `attempt` (0-based) of an `Overloaded` read: `base` doubled per
/// attempt, at least the node's `hint`, plus up to half again of jitter (from `seed`), so
/// refused clients do not come back in step.
fn overload_backoff(base: Duration, attempt: u32, hint: Duration, seed: u64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).max(hint);
    let jitter = xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()) % 1000;
    exp + exp.mul_f64(jitter as f64 / 2000.0)
}

fn millis(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

fn write_opts(opts: &PutOptions, timeout: Duration) -> WriteOptions {
    WriteOptions {
        w: opts.w.unwrap_or(0),
        timeout_ms: millis(timeout),
        flags: if opts.return_body {
            WriteOptions::RETURN_BODY
        } else {
            0
        },
        pw: opts.pw.unwrap_or(0),
    }
}

fn written(w: ringkv_protocol::WriteReply) -> Written {
    Written {
        dot: (w.actor, w.counter),
        read: w.body.map(Read::from_reply),
        primary_acks: w.primary_acks,
        fallback_acks: w.fallback_acks,
    }
}

fn unexpected(addr: &str, resp: Response) -> Error {
    Error::Protocol {
        addr: addr.to_string(),
        cause: format!("unexpected response {:?}", resp.opcode()),
    }
}

#[cfg(test)]
mod routing_tests {
    use super::*;
    use std::collections::BTreeSet;

    fn node(addr: &str) -> Node {
        Node {
            addr: addr.into(),
            conn: std::sync::Mutex::new(None),
            connecting: Mutex::new(()),
            dial_failed: std::sync::Mutex::new(None),
        }
    }

    fn member(id: &str, addr: &str, alive: bool) -> RingMember {
        RingMember {
            node_id: id.into(),
            client_addr: addr.into(),
            peer_addr: String::new(),
            tokens: 64,
            primary_ppm: 0,
            alive,
            tokens_of: id.into(),
        }
    }

    /// True when `inner` points into `outer`'s memory (a slice of it).
    fn within(inner: &Bytes, outer: &Bytes) -> bool {
        let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
        i >= o && i < o + outer.len()
    }

    #[test]
    fn a_kept_read_does_not_pin_the_frame_it_arrived_in() {
        // A reply decoded from one frame: its fields are slices of the frame's buffer.
        let frame = Bytes::from(vec![7u8; 3 * SHARED_VALUE_MIN]);
        let reply = ringkv_protocol::ReadReply {
            siblings: vec![
                ringkv_protocol::Sibling {
                    actor: 1,
                    counter: 1,
                    timestamp_ms: 0,
                    value: Some(frame.slice(0..100)),
                },
                ringkv_protocol::Sibling {
                    actor: 2,
                    counter: 1,
                    timestamp_ms: 0,
                    value: Some(frame.slice(100..100 + SHARED_VALUE_MIN)),
                },
            ],
            context: frame.slice(2 * SHARED_VALUE_MIN..2 * SHARED_VALUE_MIN + 40),
            hidden: 0,
        };
        let read = Read::from_reply(reply);
        assert!(!within(&read.context.0, &frame), "the context is a copy");
        assert_eq!(read.context.0, frame.slice(0..40), "same bytes");
        let small = read.siblings[0].value.as_ref().expect("a value");
        assert!(!within(small, &frame), "a small value is a copy");
        assert_eq!(small.len(), 100);
        let large = read.siblings[1].value.as_ref().expect("a value");
        assert!(within(large, &frame), "a large value stays zero-copy");
        assert_eq!(large.len(), SHARED_VALUE_MIN);
    }

    /// A fake node on an ephemeral port of 127.0.0.1: `serve` handles its first connection.
    /// Its address, and what `serve` returned.
    async fn fake_node<T, F, Fut>(serve: F) -> (String, tokio::task::JoinHandle<T>)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            serve(socket).await
        });
        (addr, task)
    }

    /// A fake node on `socket`: answers every request with a put reply without a body, until
    /// the client closes; the keys of the puts it was sent.
    async fn answer_every_put(socket: tokio::net::TcpStream) -> Vec<String> {
        use futures::{SinkExt, StreamExt};
        use ringkv_protocol::{FrameCodec, Inbound, WriteReply};
        let mut framed = tokio_util::codec::Framed::new(socket, FrameCodec::new(4 << 20));
        let mut keys = Vec::new();
        while let Some(Ok(Inbound::Frame(frame))) = framed.next().await {
            if let Ok(Request::Put { key, .. }) = Request::decode(frame.opcode, frame.body) {
                keys.push(String::from_utf8_lossy(&key).into_owned());
            }
            let reply = Response::Put(WriteReply {
                actor: 1,
                counter: 1,
                body: None,
                primary_acks: 1,
                fallback_acks: 0,
            });
            if framed.send(reply.to_frame(frame.request_id)).await.is_err() {
                break;
            }
        }
        keys
    }

    /// A fake node that serves nothing: answers every request `NotServing` (definite), until
    /// the client closes; how many it was sent.
    async fn refuse_everything(socket: tokio::net::TcpStream) -> usize {
        let reply = Response::error(
            ErrorKind::NotServing,
            true,
            "node n9: this node was taken out of the ring",
        );
        answer_every_request_with(socket, reply).await
    }

    /// A fake node that answers every request with `reply`, until the client closes; how
    /// many it was sent.
    async fn answer_every_request_with(socket: tokio::net::TcpStream, reply: Response) -> usize {
        use futures::{SinkExt, StreamExt};
        use ringkv_protocol::{FrameCodec, Inbound};
        let mut framed = tokio_util::codec::Framed::new(socket, FrameCodec::new(4 << 20));
        let mut asked = 0;
        while let Some(Ok(Inbound::Frame(frame))) = framed.next().await {
            asked += 1;
            if framed.send(reply.to_frame(frame.request_id)).await.is_err() {
                break;
            }
        }
        asked
    }

    /// Three puts through a node that `refuse`s them and a node that serves: each is served by
    /// the second, and the first is asked once (then no longer first).
    async fn puts_pass_to_the_next_address<F, Fut>(refuse: F)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = usize> + Send + 'static,
    {
        let (refusing_addr, refusing) = fake_node(refuse).await;
        let (serving_addr, serving) = fake_node(answer_every_put).await;
        let client = Client::new([refusing_addr, serving_addr], ClientConfig::default()).unwrap();
        for key in ["k1", "k2", "k3"] {
            client
                .put(key, "v", None)
                .await
                .expect("served by the next address");
        }
        drop(client);
        assert_eq!(
            refusing.await.unwrap(),
            1,
            "asked once, then no longer first"
        );
        assert_eq!(serving.await.unwrap(), vec!["k1", "k2", "k3"]);
    }

    /// A node cut off from the key's replicas (a partition's minority side) refuses a request
    /// `Unavailable` before anything was written (definite): another node may reach them, so
    /// the request, a write too, goes to the next address, as Cassandra's drivers retry an
    /// unavailable on the next host; that node is not asked first again. An `Unavailable`
    /// that is not definite (written on fewer than W replicas) is the answer: sent again, the
    /// write would be done twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_cut_off_from_the_replicas_passes_requests_to_the_next_address() {
        let unavailable = |definite| {
            move |socket| {
                let reply = Response::error(
                    ErrorKind::Unavailable {
                        alive: 1,
                        needed: 2,
                    },
                    definite,
                    "node n1: key 6b31: 1 replicas reachable, 2 needed",
                );
                answer_every_request_with(socket, reply)
            }
        };
        puts_pass_to_the_next_address(unavailable(true)).await;

        let (partial_addr, partial) = fake_node(unavailable(false)).await;
        let (other_addr, other) = fake_node(answer_every_put).await;
        let client = Client::new([partial_addr, other_addr], ClientConfig::default()).unwrap();
        let err = client.put("k4", "v", None).await.unwrap_err();
        assert!(
            matches!(err.kind(), Some(ErrorKind::Unavailable { .. })),
            "{err}"
        );
        assert!(!err.is_definite(), "{err}");
        drop(client);
        assert_eq!(partial.await.unwrap(), 1);
        // Never dialled (its accept still waits), or dialled and sent nothing.
        if let Ok(keys) = tokio::time::timeout(Duration::from_millis(300), other).await {
            assert!(keys.unwrap().is_empty(), "not sent twice");
        }
    }

    /// A node that serves nothing now (`NotServing`: taken out of the ring, or not knowing it
    /// yet) passes a request to the next address, a write too (it did nothing), and is not
    /// asked first again; when every address says so, the error is that refusal, definite.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_serves_nothing_passes_requests_to_the_next_address() {
        puts_pass_to_the_next_address(refuse_everything).await;
        // Alone, it answers with its refusal.
        let (alone_addr, alone) = fake_node(refuse_everything).await;
        let client = Client::new([alone_addr], ClientConfig::default()).unwrap();
        let err = client.put("k4", "v", None).await.unwrap_err();
        assert_eq!(
            err.kind(),
            Some(ringkv_protocol::ErrorKind::NotServing),
            "{err}"
        );
        assert!(err.is_definite(), "{err}");
        assert!(err.to_string().contains("taken out of the ring"), "{err}");
        drop(client);
        assert_eq!(alone.await.unwrap(), 1);
    }

    /// A listener whose accept queue is full (nothing accepts): a connect to it hangs, as to
    /// a host that drops packets. The returned streams hold the queue full.
    async fn black_hole() -> (tokio::net::TcpListener, String, Vec<std::net::TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                held.push(s);
            }
        }
        (listener, addr.to_string(), held)
    }

    /// Found in review: callers waiting to dial a node that does not answer dialled it one
    /// after another, each for the whole connect timeout, whatever was left of its deadline:
    /// the twentieth of twenty writes started together reached the next address after
    /// 20 × 300 ms, past its 3 s deadline. Callers waiting on a dial now share its outcome,
    /// and all of them go to the next address at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_waiting_on_a_dial_that_fails_go_to_the_next_address_together() {
        let (_hole, hole_addr, _held) = black_hole().await;
        let (serving_addr, node) = fake_node(answer_every_put).await;
        let config = ClientConfig {
            connect_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_secs(3),
            ..ClientConfig::default()
        };
        let client = Client::new([hole_addr, serving_addr], config).unwrap();
        let puts: Vec<_> = (0..20)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.put(format!("k{i}"), "v", None).await })
            })
            .collect();
        for (i, put) in puts.into_iter().enumerate() {
            put.await
                .unwrap()
                .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
        }
        drop(client);
        assert_eq!(node.await.unwrap().len(), 20);
    }

    /// Found in review: a dial took the whole connect timeout whatever was left of the
    /// request's deadline (10 s for a 300 ms request), and a request whose deadline passed
    /// before it could be sent was reported `Timeout` (outcome unknown). The dial now gets at
    /// most what is left, and the error says the request was never sent (definite).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dial_gets_no_more_than_what_is_left_of_the_deadline() {
        let (_hole, hole_addr, _held) = black_hole().await;
        let config = ClientConfig {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_millis(300),
            ..ClientConfig::default()
        };
        let client = Client::new([hole_addr], config).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), client.put("k", "v", None))
            .await
            .expect("the request's 300 ms deadline bounds the dial, not the 10 s connect timeout");
        let e = answer.expect_err("nothing answers");
        assert!(e.is_definite(), "it was never sent: {e}");
    }

    /// A fake node that reads every request and answers none (a paused process, a host
    /// that stopped): how many it read, until the client closes.
    async fn answer_nothing(socket: tokio::net::TcpStream) -> usize {
        use futures::StreamExt;
        use ringkv_protocol::{FrameCodec, Inbound};
        let mut framed = tokio_util::codec::Framed::new(socket, FrameCodec::new(4 << 20));
        let mut read = 0;
        while let Some(Ok(Inbound::Frame(_))) = framed.next().await {
            read += 1;
        }
        read
    }

    /// Found in review: a request that timed out on the preferred node left it preferred,
    /// so every later request of the client went to a node that had stopped answering (a
    /// paused process keeps its connections) until that connection broke, for minutes,
    /// while the other addresses served. Now the next request starts at the next address.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_timed_out_is_not_asked_first_again() {
        let (silent_addr, silent) = fake_node(answer_nothing).await;
        let (serving_addr, serving) = fake_node(answer_every_put).await;
        let config = ClientConfig {
            request_timeout: Duration::from_millis(200),
            ..ClientConfig::default()
        };
        let client = Client::new([silent_addr, serving_addr], config).unwrap();
        let e = client.put("k1", "v", None).await.expect_err("no answer");
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        for key in ["k2", "k3"] {
            client
                .put(key, "v", None)
                .await
                .unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        drop(client);
        assert_eq!(silent.await.unwrap(), 1, "asked once");
        assert_eq!(serving.await.unwrap(), vec!["k2", "k3"]);
    }

    /// Found in review: a local read (one node's own replica, for debugging and checks)
    /// went to the next address when its node could not be reached, and the caller, who
    /// cannot tell which node answered, got another node's replica as if it were the one
    /// asked for. It now fails instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_read_never_reads_another_nodes_replica() {
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone_addr = gone.local_addr().unwrap().to_string();
        drop(gone);
        let (serving_addr, serving) = fake_node(answer_nothing).await;
        let client = Client::new([gone_addr, serving_addr], ClientConfig::default()).unwrap();
        let local = GetOptions {
            local: true,
            ..GetOptions::default()
        };
        let e = client
            .get_with("k", local)
            .await
            .expect_err("its node is down");
        assert!(matches!(e, Error::Connect { .. }), "{e}");
        drop(client);
        serving.abort();
        assert!(
            serving.await.is_err(),
            "the other node was never connected to, nor asked"
        );
    }

    /// A write whose deadline passes while it waits in the connection's queue (behind
    /// megabytes, to a node that reads slowly) is never sent, and the client says so
    /// (definite). Before, it was sent when its turn came with its whole `timeout_ms`, which
    /// the node counts from its own read: it could apply the write after the client had
    /// reported it timed out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_whose_deadline_passes_in_the_queue_is_never_sent() {
        // A node that reads nothing for 600 ms (a small receive buffer: what waits, waits in
        // the client), then answers every put; it records the keys it was sent.
        let (listener, addr) = ringkv_jepsen::small_buffer_listener();
        let node = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            answer_every_put(socket).await
        });
        let client = Client::new([addr], ClientConfig::default()).unwrap();
        let big = Bytes::from(vec![b'b'; ringkv_protocol::limits::MAX_VALUE_LEN - 4096]);
        let slow = PutOptions {
            timeout: Some(Duration::from_secs(10)),
            ..PutOptions::default()
        };
        let mut bigs = Vec::new();
        for i in 0..8 {
            let (client, big) = (client.clone(), big.clone());
            bigs.push(tokio::spawn(async move {
                client.put_with(format!("big{i}"), big, None, slow).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let short = PutOptions {
            timeout: Some(Duration::from_millis(200)),
            ..PutOptions::default()
        };
        let late = client.put_with("late", "x", None, short).await;
        let e = late.expect_err("its deadline passed before it could be sent");
        assert!(e.is_definite(), "it was never sent: {e}");
        for b in bigs {
            b.await.unwrap().unwrap();
        }
        drop(client);
        let keys = node.await.unwrap();
        assert_eq!(keys.len(), 8, "{keys:?}");
        assert!(!keys.contains(&"late".to_string()), "{keys:?}");
    }

    /// Found in review: `put_returning` panicked the application (`expect`) when a node's put
    /// reply came without the body it asked for (a node of another version, a bug). It is a
    /// protocol error naming the node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_put_reply_without_the_body_asked_for_is_an_error_not_a_panic() {
        let (addr, _node) = fake_node(answer_every_put).await;
        let client = Client::new([addr.clone()], ClientConfig::default()).unwrap();
        let answer = tokio::spawn(async move { client.put_returning("k", "v", None).await });
        match answer.await.expect("put_returning does not panic") {
            Err(Error::Protocol { addr: a, cause }) => {
                assert_eq!(a, addr);
                assert!(cause.contains("siblings"), "{cause}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Found in review: a `kvctl cluster` request (and a repair) whose connection broke after
    /// it was sent went to the next node, as a read does: a commit the claimant had done was
    /// sent again (and reported failed: nothing staged any more), and with one address the
    /// loss was reported as `Connect`, "certainly not done". Such requests are not resent: the
    /// caller learns the outcome is unknown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_change_or_repair_is_not_resent_after_its_connection_broke() {
        use futures::StreamExt;
        use ringkv_protocol::{FrameCodec, Inbound};
        // The first node reads each request and closes the connection without an answer.
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let first_addr = first.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((socket, _)) = first.accept().await {
                let mut framed = tokio_util::codec::Framed::new(socket, FrameCodec::new(4 << 20));
                let _ = framed.next().await;
            }
        });
        // The second counts the requests it is sent.
        let second = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let second_addr = second.local_addr().unwrap().to_string();
        let seen = Arc::new(AtomicU64::new(0));
        let counted = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = second.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut framed =
                        tokio_util::codec::Framed::new(socket, FrameCodec::new(4 << 20));
                    while let Some(Ok(Inbound::Frame(_))) = framed.next().await {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let config = ClientConfig {
            request_timeout: Duration::from_millis(500),
            ..ClientConfig::default()
        };
        let client = Client::new([first_addr, second_addr], config).unwrap();
        let commit = client
            .cluster(br#"{"Commit":{"plan":null}}"#.to_vec())
            .await;
        match commit {
            Err(e @ Error::ConnectionLost { .. }) => assert!(!e.is_definite(), "{e}"),
            other => panic!("a lost cluster request is not resent: {other:?}"),
        }
        let repair = client.repair().await;
        assert!(
            matches!(repair, Err(Error::ConnectionLost { .. })),
            "{repair:?}"
        );
        assert_eq!(
            seen.load(Ordering::Relaxed),
            0,
            "nothing went to the second node"
        );
        // A read is resent (it changes nothing): the second node gets it (and never answers).
        let _ = client.status().await;
        assert_eq!(seen.load(Ordering::Relaxed), 1);
        // So is a cluster request that only reads (`kvctl cluster status`).
        let _ = client.cluster(br#""Status""#.to_vec()).await;
        assert_eq!(seen.load(Ordering::Relaxed), 2);
    }

    /// Nodes that refuse every request `Overloaded`: a write (put, delete) is sent once, to
    /// one node, and the caller learns it was not done; a read is sent again after the hint,
    /// on the next node, `overload_retries` times. Counted by the nodes, so a resend from
    /// anywhere in the client (not only the retry loop) would show.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_refused_overloaded_reaches_the_nodes_once_and_a_read_is_retried() {
        use futures::{SinkExt, StreamExt};
        use ringkv_protocol::{ErrorKind, FrameCodec, Inbound};
        let seen = Arc::new(AtomicU64::new(0));
        let mut addrs = Vec::new();
        for _ in 0..2 {
            let node = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(node.local_addr().unwrap().to_string());
            let counted = seen.clone();
            tokio::spawn(async move {
                while let Ok((socket, _)) = node.accept().await {
                    let counted = counted.clone();
                    tokio::spawn(async move {
                        let mut framed =
                            tokio_util::codec::Framed::new(socket, FrameCodec::new(4 << 20));
                        while let Some(Ok(Inbound::Frame(f))) = framed.next().await {
                            counted.fetch_add(1, Ordering::Relaxed);
                            let refusal = Response::error(
                                ErrorKind::Overloaded { retry_after_ms: 1 },
                                true,
                                String::from("overloaded (test)"),
                            );
                            if framed.send(refusal.to_frame(f.request_id)).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
        let config = ClientConfig {
            overload_retries: 3,
            overload_backoff: Duration::from_millis(1),
            ..ClientConfig::default()
        };
        let client = Client::new(addrs, config).unwrap();
        let put = client.put("k", "v", None).await;
        assert!(
            put.as_ref()
                .is_err_and(|e| e.is_overloaded() && e.is_definite()),
            "{put:?}"
        );
        assert_eq!(seen.load(Ordering::Relaxed), 1, "the put was sent again");
        let delete = client.delete("k", None).await;
        assert!(
            delete.as_ref().is_err_and(|e| e.is_overloaded()),
            "{delete:?}"
        );
        assert_eq!(seen.load(Ordering::Relaxed), 2, "the delete was sent again");
        let get = client.get("k").await;
        assert!(get.as_ref().is_err_and(|e| e.is_overloaded()), "{get:?}");
        assert_eq!(seen.load(Ordering::Relaxed), 2 + 4, "a read: 1 + 3 retries");
        assert_eq!(client.overload_retries(), 3);
    }

    #[test]
    fn overload_backoff_doubles_respects_the_hint_and_jitters() {
        let base = Duration::from_millis(10);
        let b0 = overload_backoff(base, 0, Duration::ZERO, 1);
        assert!(b0 >= base && b0 <= base.mul_f64(1.5), "{b0:?}");
        let b2 = overload_backoff(base, 2, Duration::ZERO, 1);
        assert!(b2 >= base * 4 && b2 <= (base * 4).mul_f64(1.5), "{b2:?}");
        // The node's hint wins when longer.
        let hinted = overload_backoff(base, 0, Duration::from_millis(200), 1);
        assert!(hinted >= Duration::from_millis(200), "{hinted:?}");
        // Different seeds spread the retries.
        let spread: std::collections::BTreeSet<Duration> = (0..20)
            .map(|s| overload_backoff(base, 1, Duration::ZERO, s))
            .collect();
        assert!(spread.len() > 10, "{spread:?}");
    }

    /// Found in review: the jitter's seed was the client's request counter at the time of the
    /// backoff, so reads refused together (all sent before any refusal came back) read the
    /// same counter and came back in step, and every freshly started client (counter 1) backed
    /// off by exactly the same amount.
    #[test]
    fn reads_refused_together_and_clients_started_together_back_off_differently() {
        let base = Duration::from_millis(10);
        let backoffs = |c: &Client| -> Vec<Duration> {
            (0..16)
                .map(|_| overload_backoff(base, 0, Duration::ZERO, c.jitter_seed()))
                .collect()
        };
        let one = Client::new(["127.0.0.1:1"], ClientConfig::default()).unwrap();
        let other = Client::new(["127.0.0.1:1"], ClientConfig::default()).unwrap();
        let (a, b) = (backoffs(&one), backoffs(&other));
        let distinct = |v: &[Duration]| v.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(distinct(&a) > 8, "{a:?}");
        assert_ne!(a, b);
    }

    #[test]
    fn routes_only_to_live_known_replicas_of_the_key_and_rotates_over_them() {
        // n4 is down, n3's address was not given to the client.
        let reply = RingReply {
            n: 2,
            r: 1,
            w: 1,
            epoch: 1,
            members: vec![
                member("n1", "a:1", true),
                member("n2", "a:2", true),
                member("n3", "a:3", true),
                member("n4", "a:4", false),
            ],
        };
        let nodes = [node("a:1"), node("a:2"), node("a:4")];
        let routing = Routing::new(&reply, &nodes);
        let (mut routed, mut rotated) = (0, 0);
        for k in 0..200 {
            let key = format!("key{k}");
            let pref = routing
                .ring
                .preference_list(key_position(key.as_bytes()), 2);
            let usable: Vec<usize> = pref
                .iter()
                .filter_map(|id| match &**id {
                    "n1" => Some(0),
                    "n2" => Some(1),
                    _ => None,
                })
                .collect();
            let picks: BTreeSet<Option<usize>> = (0..4)
                .map(|seq| routing.replica(key.as_bytes(), seq))
                .collect();
            if usable.is_empty() {
                assert_eq!(picks, BTreeSet::from([None]), "{key}: no usable replica");
                continue;
            }
            routed += 1;
            let expected: BTreeSet<Option<usize>> = usable.iter().map(|i| Some(*i)).collect();
            assert_eq!(picks, expected, "{key}: every usable replica, nothing else");
            rotated += usize::from(usable.len() == 2);
        }
        assert!(
            routed > 100 && rotated > 20,
            "routed {routed}, rotated {rotated}"
        );
        assert_eq!(Routing::none().replica(b"k", 0), None);
    }
}
