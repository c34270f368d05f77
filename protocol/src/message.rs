//! Client protocol messages and their body encodings (byte layouts in docs/protocol.md).

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::Frame;
use crate::limits::*;
use crate::wire::{put_bytes, put_count, DecodeError, Reader};

pub mod opcode {
    pub const PING: u8 = 0x01;
    pub const STATUS: u8 = 0x02;
    pub const GET: u8 = 0x03;
    pub const PUT: u8 = 0x04;
    pub const DELETE: u8 = 0x05;
    pub const RING: u8 = 0x06;
    pub const MEMBERS: u8 = 0x07;
    pub const REPAIR: u8 = 0x08;
    pub const CLUSTER: u8 = 0x09;

    pub const PONG: u8 = 0x81;
    pub const STATUS_REPLY: u8 = 0x82;
    pub const GET_REPLY: u8 = 0x83;
    pub const PUT_REPLY: u8 = 0x84;
    pub const DELETE_REPLY: u8 = 0x85;
    pub const RING_REPLY: u8 = 0x86;
    pub const MEMBERS_REPLY: u8 = 0x87;
    pub const REPAIR_REPLY: u8 = 0x88;
    pub const CLUSTER_REPLY: u8 = 0x89;
    pub const ERROR: u8 = 0xFF;
}

/// Read options. Zero means "server default" for every numeric field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Replies to wait for (R); 0 = the cluster default.
    pub r: u8,
    /// Deadline for the whole request in ms; 0 = the server default.
    pub timeout_ms: u32,
    pub flags: u8,
    /// Of the R replies, how many must come from primaries (the key's preference list) rather
    /// than fallbacks standing in for down ones (Riak's `pr`); 0 = none required.
    pub pr: u8,
}

impl ReadOptions {
    /// Read only the contacted node's own replica, without coordination (debugging divergence).
    pub const LOCAL: u8 = 0x01;
}

/// Write options. Zero means "server default" for every numeric field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Acks to wait for (W); 0 = the cluster default.
    pub w: u8,
    pub timeout_ms: u32,
    pub flags: u8,
    /// Of the W acks, how many must come from primaries rather than fallbacks holding a hint
    /// (Riak's `pw`): `pw = W` is a strict quorum; 0 = none required (sloppy quorum).
    pub pw: u8,
}

impl WriteOptions {
    /// Return the key's resulting siblings and context with the reply (Riak's `returnbody`).
    pub const RETURN_BODY: u8 = 0x01;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    Status,
    Get {
        key: Bytes,
        opts: ReadOptions,
    },
    /// `context` empty = a blind write: it supersedes nothing and becomes a sibling.
    Put {
        key: Bytes,
        value: Bytes,
        context: Bytes,
        opts: WriteOptions,
    },
    /// `context` empty = delete every version the coordinating replica holds (like Riak's
    /// delete without a vclock, which reads first).
    Delete {
        key: Bytes,
        context: Bytes,
        opts: WriteOptions,
    },
    /// The contacted node's view of the ring: members, tokens, ownership, liveness.
    Ring,
    /// The contacted node's membership: SWIM state, incarnation, phi, last heard.
    Members,
    /// Start an anti-entropy cycle on the contacted node now (with every peer it shares ranges
    /// with), instead of at its next interval; with a `range` (ring positions, inclusive),
    /// over the part of its ranges inside it only.
    Repair {
        range: Option<(u64, u64)>,
    },
    /// A ring change or layout request (`kvctl cluster …`), JSON: see docs/protocol.md.
    Cluster(Bytes),
}

/// What `Repair` started: the contacted node's count of completed anti-entropy cycles, and
/// the count at which the requested cycle will have completed (`aae.cycles` in `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairReply {
    pub completed: u64,
    pub done_at: u64,
}

/// One member as `Ring` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingMember {
    pub node_id: String,
    pub client_addr: String,
    pub peer_addr: String,
    /// Number of tokens (vnodes) the node owns.
    pub tokens: u32,
    /// Share of the hash space for which the node is the first replica, in parts per million.
    pub primary_ppm: u32,
    /// Whether the reporting node currently considers it reachable.
    pub alive: bool,
    /// The name its tokens are derived from: its own id, or the id of the node it replaced.
    pub tokens_of: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RingReply {
    /// Replication factor and the default R and W.
    pub n: u8,
    pub r: u8,
    pub w: u8,
    /// Fingerprint of the ring's membership (ids, vnodes, statuses): equal on every node that
    /// has converged on the same ring.
    pub epoch: u64,
    pub members: Vec<RingMember>,
}

/// The SWIM states `MemberStatus::swim_state` codes, by code.
pub const SWIM_STATE_NAMES: [&str; 3] = ["alive", "suspect", "down"];

/// The ring statuses `MemberStatus::ring_status` codes, by code.
pub const RING_STATUS_NAMES: [&str; 4] = ["joining", "normal", "leaving", "removed"];

/// One member as `Members` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub node_id: String,
    pub client_addr: String,
    pub peer_addr: String,
    pub gossip_addr: String,
    /// SWIM state: 0 alive, 1 suspect, 2 down.
    pub swim_state: u8,
    /// foca's incarnation (bumped to refute suspicion).
    pub incarnation: u32,
    /// Process generation (start time in ms; +1 on each automatic rejoin).
    pub generation: u64,
    /// Phi × 1000, `u32::MAX` when no heartbeat was ever received.
    pub phi_milli: u32,
    /// Milliseconds since the last authenticated packet, `u64::MAX` = never.
    pub last_heard_ms: u64,
    /// Ring status: 0 joining, 1 normal, 2 leaving, 3 removed, 255 unknown.
    pub ring_status: u8,
    pub vnodes: u32,
    /// Whether the routing layer currently uses the member (SWIM not down and phi below the
    /// threshold).
    pub available: bool,
    pub is_self: bool,
}

impl MemberStatus {
    /// The SWIM state's name (codes past the last read as down).
    pub fn swim_state_name(&self) -> &'static str {
        SWIM_STATE_NAMES[usize::from(self.swim_state).min(SWIM_STATE_NAMES.len() - 1)]
    }

    /// The ring status's name, "unknown" for a code it does not know (255).
    pub fn ring_status_name(&self) -> &'static str {
        RING_STATUS_NAMES
            .get(usize::from(self.ring_status))
            .copied()
            .unwrap_or("unknown")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MembersReply {
    /// The phi threshold in use, × 1000.
    pub phi_threshold_milli: u32,
    pub members: Vec<MemberStatus>,
}

/// One version of a key as seen by a client. `value == None` is a tombstone (a delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    /// The dot `(actor, counter)` of the write that created this version.
    pub actor: u64,
    pub counter: u64,
    /// Wall-clock ms at the coordinating replica when the write was applied.
    pub timestamp_ms: u64,
    pub value: Option<Bytes>,
}

/// A key's siblings and the causal context to send back with the next write.
/// No live (non-tombstone) sibling means "not found"; the context is returned regardless.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadReply {
    pub siblings: Vec<Sibling>,
    pub context: Bytes,
    /// Siblings the reply could not carry (the merged state exceeds `MAX_STATE_SIBLINGS` or
    /// `MAX_STATE_LEN`; only after a partition between more than `MERGE_FACTOR` coordinators).
    /// The context then covers exactly the siblings shown: a write with it resolves those and
    /// keeps the rest, and the next read shows them.
    pub hidden: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReply {
    /// The dot this write minted: `(actor, counter)`.
    pub actor: u64,
    pub counter: u64,
    /// Present when the request set `RETURN_BODY`.
    pub body: Option<ReadReply>,
    /// Acks counted toward W when the write was answered: from the key's primaries (the
    /// coordinator's own commit included) and from fallbacks that stored a hint for a down
    /// primary (sloppy quorum).
    pub primary_acks: u8,
    pub fallback_acks: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusReply {
    pub node_id: String,
    pub server_version: String,
    pub uptime_ms: u64,
    /// Counters and gauges, e.g. `requests.get`, `storage.write_batches`.
    pub metrics: Vec<(String, u64)>,
    /// Descriptive facts, e.g. `sync_mode`, `data_dir`, `worker.writer`.
    pub info: Vec<(String, String)>,
}

/// Error kinds with their typed fields. Wire form: `code u16, a u64, b u64` (see
/// docs/protocol.md); unknown codes decode to `Unknown` so old clients survive new errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A key, value, context or frame exceeded a limit: `size` bytes against `limit`.
    TooLarge {
        size: u64,
        limit: u64,
    },
    /// The request could not be decoded.
    Malformed,
    /// The frame's protocol version is not spoken here.
    UnsupportedVersion {
        got: u64,
        supported: u64,
    },
    /// The node refused the request for lack of capacity; nothing was applied. Retry no
    /// sooner than `retry_after_ms` (0 = no hint), on this or another node.
    Overloaded {
        retry_after_ms: u64,
    },
    /// An internal failure (e.g. storage I/O); the message names the cause.
    Internal,
    /// The deadline passed with `acks` of `needed` replies.
    Timeout {
        acks: u64,
        needed: u64,
    },
    /// Too few replicas reachable: `alive` of `needed`.
    Unavailable {
        alive: u64,
        needed: u64,
    },
    /// A well-formed request with invalid arguments (e.g. R > N, empty key).
    InvalidRequest,
    /// The write would grow the key beyond `limit` siblings.
    TooManySiblings {
        count: u64,
        limit: u64,
    },
    /// A peer presented another cluster name (or replication factor).
    WrongCluster,
    /// A peer did not prove knowledge of the cluster secret (or spoke before proving it).
    Unauthenticated,
    /// This node serves no reads or writes now (a completed plan took it out of the ring, or
    /// it does not know the ring yet); nothing was done. Another node can serve the request:
    /// the client library sends it to the next address (a write too).
    NotServing,
    Unknown {
        code: u16,
    },
}

impl ErrorKind {
    pub fn code(&self) -> u16 {
        match self {
            ErrorKind::TooLarge { .. } => 1,
            ErrorKind::Malformed => 2,
            ErrorKind::UnsupportedVersion { .. } => 3,
            ErrorKind::Overloaded { .. } => 4,
            ErrorKind::Internal => 5,
            ErrorKind::Timeout { .. } => 6,
            ErrorKind::Unavailable { .. } => 7,
            ErrorKind::InvalidRequest => 8,
            ErrorKind::TooManySiblings { .. } => 9,
            ErrorKind::WrongCluster => 10,
            ErrorKind::Unauthenticated => 11,
            ErrorKind::NotServing => 12,
            ErrorKind::Unknown { code } => *code,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ErrorKind::TooLarge { .. } => "TooLarge",
            ErrorKind::Malformed => "Malformed",
            ErrorKind::UnsupportedVersion { .. } => "UnsupportedVersion",
            ErrorKind::Overloaded { .. } => "Overloaded",
            ErrorKind::Internal => "Internal",
            ErrorKind::Timeout { .. } => "Timeout",
            ErrorKind::Unavailable { .. } => "Unavailable",
            ErrorKind::InvalidRequest => "InvalidRequest",
            ErrorKind::TooManySiblings { .. } => "TooManySiblings",
            ErrorKind::WrongCluster => "WrongCluster",
            ErrorKind::Unauthenticated => "Unauthenticated",
            ErrorKind::NotServing => "NotServing",
            ErrorKind::Unknown { .. } => "Unknown",
        }
    }

    fn fields(&self) -> (u64, u64) {
        match *self {
            ErrorKind::TooLarge { size, limit } => (size, limit),
            ErrorKind::UnsupportedVersion { got, supported } => (got, supported),
            ErrorKind::Timeout { acks, needed } => (acks, needed),
            ErrorKind::Unavailable { alive, needed } => (alive, needed),
            ErrorKind::TooManySiblings { count, limit } => (count, limit),
            ErrorKind::Overloaded { retry_after_ms } => (retry_after_ms, 0),
            _ => (0, 0),
        }
    }

    fn from_wire(code: u16, a: u64, b: u64) -> Self {
        match code {
            1 => ErrorKind::TooLarge { size: a, limit: b },
            2 => ErrorKind::Malformed,
            3 => ErrorKind::UnsupportedVersion {
                got: a,
                supported: b,
            },
            4 => ErrorKind::Overloaded { retry_after_ms: a },
            5 => ErrorKind::Internal,
            6 => ErrorKind::Timeout { acks: a, needed: b },
            7 => ErrorKind::Unavailable {
                alive: a,
                needed: b,
            },
            8 => ErrorKind::InvalidRequest,
            9 => ErrorKind::TooManySiblings { count: a, limit: b },
            10 => ErrorKind::WrongCluster,
            11 => ErrorKind::Unauthenticated,
            12 => ErrorKind::NotServing,
            code => ErrorKind::Unknown { code },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    /// True when the server knows the request had no effect (so a write may be retried without
    /// creating a duplicate sibling). False = the outcome is unknown.
    pub definite: bool,
    /// Human-readable cause naming the node and key.
    pub message: String,
}

impl ErrorReply {
    /// An error reply whose message is cut to `MAX_TEXT_LEN` (at a char boundary), so that it
    /// always encodes and decodes.
    pub fn new(kind: ErrorKind, definite: bool, message: impl Into<String>) -> ErrorReply {
        let mut message = message.into();
        if message.len() > MAX_TEXT_LEN {
            let mut cut = MAX_TEXT_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        ErrorReply {
            kind,
            definite,
            message,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Pong,
    Status(StatusReply),
    Get(ReadReply),
    Put(WriteReply),
    Delete(WriteReply),
    Ring(RingReply),
    Members(MembersReply),
    Repair(RepairReply),
    /// The reply to `Cluster` (JSON).
    Cluster(Bytes),
    Error(ErrorReply),
}

impl Request {
    /// The time a data request gives the node (`timeout_ms`; 0 = the node's default); `None`
    /// for admin requests, which carry none.
    pub fn timeout_ms_mut(&mut self) -> Option<&mut u32> {
        match self {
            Request::Get { opts, .. } => Some(&mut opts.timeout_ms),
            Request::Put { opts, .. } | Request::Delete { opts, .. } => Some(&mut opts.timeout_ms),
            _ => None,
        }
    }

    pub fn opcode(&self) -> u8 {
        match self {
            Request::Ping => opcode::PING,
            Request::Status => opcode::STATUS,
            Request::Get { .. } => opcode::GET,
            Request::Put { .. } => opcode::PUT,
            Request::Delete { .. } => opcode::DELETE,
            Request::Ring => opcode::RING,
            Request::Members => opcode::MEMBERS,
            Request::Repair { .. } => opcode::REPAIR,
            Request::Cluster(_) => opcode::CLUSTER,
        }
    }

    pub fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            Request::Ping
            | Request::Status
            | Request::Ring
            | Request::Members
            | Request::Repair { range: None } => {}
            Request::Repair {
                range: Some((first, last)),
            } => {
                dst.put_u64(*first);
                dst.put_u64(*last);
            }
            Request::Get { key, opts } => {
                put_bytes(dst, key);
                dst.put_u8(opts.r);
                dst.put_u32(opts.timeout_ms);
                dst.put_u8(opts.flags);
                dst.put_u8(opts.pr);
            }
            Request::Put {
                key,
                value,
                context,
                opts,
            } => {
                put_bytes(dst, key);
                put_bytes(dst, value);
                put_bytes(dst, context);
                put_write_opts(dst, opts);
            }
            Request::Delete { key, context, opts } => {
                put_bytes(dst, key);
                put_bytes(dst, context);
                put_write_opts(dst, opts);
            }
            Request::Cluster(json) => put_bytes(dst, json),
        }
    }

    pub fn to_frame(&self, request_id: u64) -> Frame {
        let payload = match self {
            Request::Get { key, .. } => key.len(),
            Request::Put {
                key,
                value,
                context,
                ..
            } => key.len() + value.len() + context.len(),
            Request::Delete { key, context, .. } => key.len() + context.len(),
            _ => 0,
        };
        build_frame(self.opcode(), request_id, BODY_SLACK + payload, |b| {
            self.encode_body(b)
        })
    }

    /// Decodes a request body. Byte strings are bounded only by the frame here; semantic
    /// limits (key/value size) are checked by `validate` so they can be answered `TooLarge`.
    pub fn decode(opcode: u8, body: Bytes) -> Result<Request, DecodeError> {
        let mut r = Reader::new(body);
        let req = match opcode {
            opcode::PING => Request::Ping,
            opcode::STATUS => Request::Status,
            opcode::RING => Request::Ring,
            opcode::MEMBERS => Request::Members,
            opcode::REPAIR => {
                let range = if r.is_done() {
                    None
                } else {
                    Some((r.u64("first")?, r.u64("last")?))
                };
                Request::Repair { range }
            }
            opcode::CLUSTER => Request::Cluster(r.bytes("cluster", MAX_REQUEST_BODY_LEN)?),
            opcode::GET => {
                let key = r.bytes("key", MAX_REQUEST_BODY_LEN)?;
                let opts = ReadOptions {
                    r: r.u8("r")?,
                    timeout_ms: r.u32("timeout_ms")?,
                    flags: r.u8("flags")?,
                    pr: r.trailing_u8("pr", 0)?,
                };
                Request::Get { key, opts }
            }
            opcode::PUT => Request::Put {
                key: r.bytes("key", MAX_REQUEST_BODY_LEN)?,
                value: r.bytes("value", MAX_REQUEST_BODY_LEN)?,
                context: r.bytes("context", MAX_REQUEST_BODY_LEN)?,
                opts: read_write_opts(&mut r)?,
            },
            opcode::DELETE => Request::Delete {
                key: r.bytes("key", MAX_REQUEST_BODY_LEN)?,
                context: r.bytes("context", MAX_REQUEST_BODY_LEN)?,
                opts: read_write_opts(&mut r)?,
            },
            other => return Err(DecodeError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok(req)
    }

    /// Checks the semantic limits of a decoded request. The error names the offending field.
    pub fn validate(&self) -> Result<(), (ErrorKind, String)> {
        let (key, value, context) = match self {
            Request::Ping
            | Request::Status
            | Request::Ring
            | Request::Members
            | Request::Repair { range: None }
            | Request::Cluster(_) => return Ok(()),
            Request::Repair {
                range: Some((first, last)),
            } => {
                return if first <= last {
                    Ok(())
                } else {
                    Err((
                        ErrorKind::InvalidRequest,
                        format!("repair range {first:016x}..={last:016x}: first after last"),
                    ))
                }
            }
            Request::Get { key, .. } => (key, None, None),
            Request::Put {
                key,
                value,
                context,
                ..
            } => (key, Some(value), Some(context)),
            Request::Delete { key, context, .. } => (key, None, Some(context)),
        };
        if key.is_empty() {
            return Err((ErrorKind::InvalidRequest, "key is empty".into()));
        }
        let too_large = |what: &str, size: usize, limit: usize| {
            (
                ErrorKind::TooLarge {
                    size: size as u64,
                    limit: limit as u64,
                },
                format!("{what} is {size} bytes, limit {limit}"),
            )
        };
        if key.len() > MAX_KEY_LEN {
            return Err(too_large("key", key.len(), MAX_KEY_LEN));
        }
        if let Some(v) = value {
            if v.len() > MAX_VALUE_LEN {
                return Err(too_large("value", v.len(), MAX_VALUE_LEN));
            }
        }
        if let Some(c) = context {
            if c.len() > MAX_CONTEXT_LEN {
                return Err(too_large("context", c.len(), MAX_CONTEXT_LEN));
            }
        }
        Ok(())
    }
}

/// Error body: `code u16, definite u8, a u64, b u64, message text` (shared with the peer protocol).
pub(crate) fn encode_error(dst: &mut BytesMut, e: &ErrorReply) {
    let (a, b) = e.kind.fields();
    dst.put_u16(e.kind.code());
    dst.put_u8(e.definite as u8);
    dst.put_u64(a);
    dst.put_u64(b);
    put_bytes(dst, e.message.as_bytes());
}

pub(crate) fn decode_error(r: &mut Reader) -> Result<ErrorReply, DecodeError> {
    let code = r.u16("error code")?;
    let definite = r.u8("definite")? != 0;
    let a = r.u64("error field a")?;
    let b = r.u64("error field b")?;
    let message = r.text("error message", MAX_TEXT_LEN)?;
    Ok(ErrorReply {
        kind: ErrorKind::from_wire(code, a, b),
        definite,
        message,
    })
}

/// Room for a body's fixed fields and length prefixes; variable parts are added to it.
pub(crate) const BODY_SLACK: usize = 64;

/// Bytes of a read reply's encoding (siblings and context), to size buffers once.
fn read_reply_len(rr: &ReadReply) -> usize {
    let values: usize = rr
        .siblings
        .iter()
        .map(|s| 40 + s.value.as_ref().map_or(0, |v| v.len()))
        .sum();
    values + rr.context.len()
}

fn build_frame(
    opcode: u8,
    request_id: u64,
    capacity: usize,
    encode: impl FnOnce(&mut BytesMut),
) -> Frame {
    let mut body = BytesMut::with_capacity(capacity);
    encode(&mut body);
    Frame {
        opcode,
        request_id,
        body: body.freeze(),
    }
}

fn put_write_opts(dst: &mut BytesMut, opts: &WriteOptions) {
    dst.put_u8(opts.w);
    dst.put_u32(opts.timeout_ms);
    dst.put_u8(opts.flags);
    dst.put_u8(opts.pw);
}

/// The options end every write request, so `pw` (added later) is an optional trailing byte.
fn read_write_opts(r: &mut Reader) -> Result<WriteOptions, DecodeError> {
    Ok(WriteOptions {
        w: r.u8("w")?,
        timeout_ms: r.u32("timeout_ms")?,
        flags: r.u8("flags")?,
        pw: r.trailing_u8("pw", 0)?,
    })
}

/// Minimum encoded size of a sibling (used to bound forged counts).
const MIN_SIBLING_LEN: usize = 8 + 8 + 8 + 1;

fn put_read_reply(dst: &mut BytesMut, rr: &ReadReply) {
    put_count(dst, rr.siblings.len());
    for s in &rr.siblings {
        dst.put_u64(s.actor);
        dst.put_u64(s.counter);
        dst.put_u64(s.timestamp_ms);
        match &s.value {
            None => dst.put_u8(0),
            Some(v) => {
                dst.put_u8(1);
                put_bytes(dst, v);
            }
        }
    }
    put_bytes(dst, &rr.context);
    dst.put_u32(rr.hidden);
}

fn read_read_reply(r: &mut Reader) -> Result<ReadReply, DecodeError> {
    let n = r.count("siblings", MAX_STATE_SIBLINGS, MIN_SIBLING_LEN)?;
    let mut siblings = Vec::with_capacity(n);
    for _ in 0..n {
        let actor = r.u64("actor")?;
        let counter = r.u64("counter")?;
        let timestamp_ms = r.u64("timestamp_ms")?;
        let value = match r.u8("sibling kind")? {
            0 => None,
            1 => Some(r.bytes("value", MAX_VALUE_LEN)?),
            k => {
                return Err(DecodeError::Invalid {
                    field: "sibling kind",
                    detail: format!("{k} (expected 0 = tombstone, 1 = value)"),
                })
            }
        };
        siblings.push(Sibling {
            actor,
            counter,
            timestamp_ms,
            value,
        });
    }
    let context = r.bytes("context", MAX_CONTEXT_LEN)?;
    let hidden = r.u32("hidden siblings")?;
    Ok(ReadReply {
        siblings,
        context,
        hidden,
    })
}

fn put_write_reply(dst: &mut BytesMut, wr: &WriteReply) {
    dst.put_u64(wr.actor);
    dst.put_u64(wr.counter);
    match &wr.body {
        None => dst.put_u8(0),
        Some(body) => {
            dst.put_u8(1);
            put_read_reply(dst, body);
        }
    }
    dst.put_u8(wr.primary_acks);
    dst.put_u8(wr.fallback_acks);
}

fn read_write_reply(r: &mut Reader) -> Result<WriteReply, DecodeError> {
    let actor = r.u64("actor")?;
    let counter = r.u64("counter")?;
    let body = match r.u8("has_body")? {
        0 => None,
        1 => Some(read_read_reply(r)?),
        k => {
            return Err(DecodeError::Invalid {
                field: "has_body",
                detail: k.to_string(),
            })
        }
    };
    // Optional trailing fields: a server from before sloppy quorums sends neither.
    let primary_acks = r.trailing_u8("primary_acks", 0)?;
    let fallback_acks = r.trailing_u8("fallback_acks", 0)?;
    Ok(WriteReply {
        actor,
        counter,
        body,
        primary_acks,
        fallback_acks,
    })
}

impl Response {
    pub fn opcode(&self) -> u8 {
        match self {
            Response::Pong => opcode::PONG,
            Response::Status(_) => opcode::STATUS_REPLY,
            Response::Get(_) => opcode::GET_REPLY,
            Response::Put(_) => opcode::PUT_REPLY,
            Response::Delete(_) => opcode::DELETE_REPLY,
            Response::Ring(_) => opcode::RING_REPLY,
            Response::Members(_) => opcode::MEMBERS_REPLY,
            Response::Repair(_) => opcode::REPAIR_REPLY,
            Response::Cluster(_) => opcode::CLUSTER_REPLY,
            Response::Error(_) => opcode::ERROR,
        }
    }

    pub fn error(kind: ErrorKind, definite: bool, message: impl Into<String>) -> Response {
        Response::Error(ErrorReply::new(kind, definite, message))
    }

    pub fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            Response::Pong => {}
            Response::Status(s) => {
                put_bytes(dst, s.node_id.as_bytes());
                put_bytes(dst, s.server_version.as_bytes());
                dst.put_u64(s.uptime_ms);
                put_count(dst, s.metrics.len());
                for (name, v) in &s.metrics {
                    put_bytes(dst, name.as_bytes());
                    dst.put_u64(*v);
                }
                put_count(dst, s.info.len());
                for (name, v) in &s.info {
                    put_bytes(dst, name.as_bytes());
                    put_bytes(dst, v.as_bytes());
                }
            }
            Response::Get(rr) => put_read_reply(dst, rr),
            Response::Put(wr) | Response::Delete(wr) => put_write_reply(dst, wr),
            Response::Ring(ring) => {
                dst.put_u8(ring.n);
                dst.put_u8(ring.r);
                dst.put_u8(ring.w);
                dst.put_u64(ring.epoch);
                put_count(dst, ring.members.len());
                for m in &ring.members {
                    put_bytes(dst, m.node_id.as_bytes());
                    put_bytes(dst, m.client_addr.as_bytes());
                    put_bytes(dst, m.peer_addr.as_bytes());
                    dst.put_u32(m.tokens);
                    dst.put_u32(m.primary_ppm);
                    dst.put_u8(m.alive as u8);
                    put_bytes(dst, m.tokens_of.as_bytes());
                }
            }
            Response::Repair(r) => {
                dst.put_u64(r.completed);
                dst.put_u64(r.done_at);
            }
            Response::Cluster(json) => put_bytes(dst, json),
            Response::Members(m) => {
                dst.put_u32(m.phi_threshold_milli);
                put_count(dst, m.members.len());
                for x in &m.members {
                    put_bytes(dst, x.node_id.as_bytes());
                    put_bytes(dst, x.client_addr.as_bytes());
                    put_bytes(dst, x.peer_addr.as_bytes());
                    put_bytes(dst, x.gossip_addr.as_bytes());
                    dst.put_u8(x.swim_state);
                    dst.put_u32(x.incarnation);
                    dst.put_u64(x.generation);
                    dst.put_u32(x.phi_milli);
                    dst.put_u64(x.last_heard_ms);
                    dst.put_u8(x.ring_status);
                    dst.put_u32(x.vnodes);
                    dst.put_u8(x.available as u8);
                    dst.put_u8(x.is_self as u8);
                }
            }
            Response::Error(e) => encode_error(dst, e),
        }
    }

    pub fn to_frame(&self, request_id: u64) -> Frame {
        let payload = match self {
            Response::Get(rr) => read_reply_len(rr),
            Response::Put(wr) | Response::Delete(wr) => wr.body.as_ref().map_or(0, read_reply_len),
            Response::Error(e) => e.message.len(),
            _ => 1024,
        };
        build_frame(self.opcode(), request_id, BODY_SLACK + payload, |b| {
            self.encode_body(b)
        })
    }

    pub fn decode(opcode: u8, body: Bytes) -> Result<Response, DecodeError> {
        let mut r = Reader::new(body);
        let resp = match opcode {
            opcode::PONG => Response::Pong,
            opcode::STATUS_REPLY => {
                let node_id = r.text("node_id", MAX_TEXT_LEN)?;
                let server_version = r.text("server_version", MAX_TEXT_LEN)?;
                let uptime_ms = r.u64("uptime_ms")?;
                let n = r.count("metrics", MAX_STATUS_ENTRIES, 12)?;
                let mut metrics = Vec::with_capacity(n);
                for _ in 0..n {
                    metrics.push((r.text("metric name", MAX_TEXT_LEN)?, r.u64("metric")?));
                }
                let n = r.count("info", MAX_STATUS_ENTRIES, 8)?;
                let mut info = Vec::with_capacity(n);
                for _ in 0..n {
                    info.push((
                        r.text("info name", MAX_TEXT_LEN)?,
                        r.text("info value", MAX_TEXT_LEN)?,
                    ));
                }
                Response::Status(StatusReply {
                    node_id,
                    server_version,
                    uptime_ms,
                    metrics,
                    info,
                })
            }
            opcode::GET_REPLY => Response::Get(read_read_reply(&mut r)?),
            opcode::PUT_REPLY => Response::Put(read_write_reply(&mut r)?),
            opcode::DELETE_REPLY => Response::Delete(read_write_reply(&mut r)?),
            opcode::RING_REPLY => {
                let (n, rr, w) = (r.u8("n")?, r.u8("r")?, r.u8("w")?);
                let epoch = r.u64("epoch")?;
                let count = r.count("members", crate::peer::MAX_MEMBERS, 12 + 9)?;
                let mut members = Vec::with_capacity(count);
                for _ in 0..count {
                    members.push(RingMember {
                        node_id: r.text("node_id", 256)?,
                        client_addr: r.text("client_addr", 256)?,
                        peer_addr: r.text("peer_addr", 256)?,
                        tokens: match r.u32("tokens")? {
                            t if t <= crate::limits::MAX_VNODES => t,
                            t => {
                                return Err(DecodeError::Invalid {
                                    field: "tokens",
                                    detail: format!(
                                        "{t} tokens, more than {}",
                                        crate::limits::MAX_VNODES
                                    ),
                                })
                            }
                        },
                        primary_ppm: r.u32("primary_ppm")?,
                        alive: r.u8("alive")? != 0,
                        tokens_of: r.text("tokens_of", 256)?,
                    });
                }
                Response::Ring(RingReply {
                    n,
                    r: rr,
                    w,
                    epoch,
                    members,
                })
            }
            opcode::CLUSTER_REPLY => Response::Cluster(r.bytes("cluster", MAX_RESPONSE_BODY_LEN)?),
            opcode::REPAIR_REPLY => Response::Repair(RepairReply {
                completed: r.u64("completed")?,
                done_at: r.u64("done_at")?,
            }),
            opcode::MEMBERS_REPLY => {
                let phi_threshold_milli = r.u32("phi_threshold")?;
                let count = r.count("members", crate::peer::MAX_MEMBERS, 16 + 40)?;
                let mut members = Vec::with_capacity(count);
                for _ in 0..count {
                    members.push(MemberStatus {
                        node_id: r.text("node_id", 256)?,
                        client_addr: r.text("client_addr", 256)?,
                        peer_addr: r.text("peer_addr", 256)?,
                        gossip_addr: r.text("gossip_addr", 256)?,
                        swim_state: r.u8("swim_state")?,
                        incarnation: r.u32("incarnation")?,
                        generation: r.u64("generation")?,
                        phi_milli: r.u32("phi")?,
                        last_heard_ms: r.u64("last_heard_ms")?,
                        ring_status: r.u8("ring_status")?,
                        vnodes: r.u32("vnodes")?,
                        available: r.u8("available")? != 0,
                        is_self: r.u8("is_self")? != 0,
                    });
                }
                Response::Members(MembersReply {
                    phi_threshold_milli,
                    members,
                })
            }
            opcode::ERROR => Response::Error(decode_error(&mut r)?),
            other => return Err(DecodeError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: a ring reply's token count went straight into the ring a ring-aware
    /// client builds (16 bytes a token): 4 294 967 295 made the application abort.
    #[test]
    fn a_ring_reply_with_more_tokens_than_a_node_may_own_does_not_decode() {
        let reply = |tokens| {
            Response::Ring(RingReply {
                n: 3,
                r: 2,
                w: 2,
                epoch: 1,
                members: vec![RingMember {
                    node_id: "n1".into(),
                    client_addr: "127.0.0.1:1".into(),
                    peer_addr: "127.0.0.1:2".into(),
                    tokens,
                    primary_ppm: 1_000_000,
                    alive: true,
                    tokens_of: "n1".into(),
                }],
            })
            .to_frame(7)
        };
        let ok = reply(crate::limits::MAX_VNODES);
        assert!(Response::decode(ok.opcode, ok.body).is_ok());
        for tokens in [crate::limits::MAX_VNODES + 1, u32::MAX] {
            let bad = reply(tokens);
            match Response::decode(bad.opcode, bad.body) {
                Err(DecodeError::Invalid {
                    field: "tokens", ..
                }) => {}
                other => panic!("{tokens} tokens: {other:?}"),
            }
        }
    }

    #[test]
    fn member_codes_have_names_and_unknown_codes_do_not_panic() {
        let m = |swim_state, ring_status| MemberStatus {
            node_id: "n1".into(),
            client_addr: String::new(),
            peer_addr: String::new(),
            gossip_addr: String::new(),
            swim_state,
            incarnation: 0,
            generation: 0,
            phi_milli: 0,
            last_heard_ms: 0,
            ring_status,
            vnodes: 0,
            available: true,
            is_self: false,
        };
        let names: Vec<_> = (0..4).map(|c| m(c, c).swim_state_name()).collect();
        assert_eq!(names, ["alive", "suspect", "down", "down"]);
        let names: Vec<_> = [0, 1, 2, 3, 4, 255]
            .map(|c| m(0, c).ring_status_name())
            .to_vec();
        assert_eq!(
            names,
            ["joining", "normal", "leaving", "removed", "unknown", "unknown"]
        );
    }
}
