//! Inter-node RPC messages (the peer protocol). Same frame format and version as the client
//! protocol, served on the separate peer listener.
//!
//! Messages are grouped by the service that serves them, one enum per **family** and one
//! opcode block per family, so a new service adds its own family instead of arms in one big
//! match. A response's opcode is its request's opcode + 0x80 (as in the client protocol);
//! errors use the shared `ERROR` opcode.
//!
//! | family | requests | responses | served by |
//! |---|---|---|---|
//! | session | 0x20–0x27 | 0xA0–0xA7 | the handshake (`rpc`), ping |
//! | replica | 0x28–0x2F | 0xA8–0xAF | the replica service |
//! | coordinator | 0x30–0x37 | 0xB0–0xB7 | the coordinator (forwarded writes) |
//! | handoff | 0x38–0x3F | 0xB8–0xBF | hinted handoff: hints, sloppy reads, paced replay |
//! | aae | 0x40–0x47 | 0xC0–0xC7 | anti-entropy, tombstone GC, transfers |
//! | cluster | 0x48–0x4F | 0xC8–0xCF | the layout, staged ring changes |
//!
//! Every peer connection starts with the authenticated handshake of `auth.rs`: `Hello` →
//! `Challenge` → `HelloProof` → `HelloAck`. Until it completes a node serves nothing else and
//! accepts only small frames; a wrong cluster name or N is answered `WrongCluster`, a failed
//! proof `Unauthenticated`, and the connection is closed.

pub mod aae;
pub mod cluster;
pub mod coordinator;
pub mod handoff;
pub mod replica;
pub mod session;

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::Frame;
use crate::message::{
    decode_error, encode_error, opcode::ERROR, ErrorKind, ErrorReply, BODY_SLACK,
};
use crate::wire::{put_bytes, DecodeError, Reader};

pub use aae::{AaeRequest, AaeResponse, CellRef};
pub use cluster::{ClusterRequest, ClusterResponse};
pub use coordinator::{CoordinatorRequest, CoordinatorResponse};
pub use handoff::{HandoffRequest, HandoffResponse};
pub use replica::{ReplicaRequest, ReplicaResponse};
pub use session::{Challenge, Hello, SessionRequest, SessionResponse};

/// A response's opcode is its request's + this.
pub const RESPONSE_BIT: u8 = 0x80;

/// The request opcode blocks of the families (responses: + `RESPONSE_BIT`).
pub mod family {
    use std::ops::RangeInclusive;
    pub const SESSION: RangeInclusive<u8> = 0x20..=0x27;
    pub const REPLICA: RangeInclusive<u8> = 0x28..=0x2F;
    pub const COORDINATOR: RangeInclusive<u8> = 0x30..=0x37;
    pub const HANDOFF: RangeInclusive<u8> = 0x38..=0x3F;
    pub const AAE: RangeInclusive<u8> = 0x40..=0x47;
    pub const CLUSTER: RangeInclusive<u8> = 0x48..=0x4F;
}

/// Every peer opcode, for tests and raw clients.
pub mod peer_opcode {
    pub use super::aae::op::*;
    pub use super::cluster::op::*;
    pub use super::coordinator::op::*;
    pub use super::handoff::op::*;
    pub use super::replica::op::*;
    pub use super::session::op::*;
}

/// Most members a reply may list (a sanity bound, far above any real cluster here).
pub const MAX_MEMBERS: usize = 1024;

/// What a node says about itself (and gossips about others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub node_id: String,
    pub client_addr: String,
    pub peer_addr: String,
    pub vnodes: u32,
    /// Start time of the node's process (ms since the epoch): the newest generation of a node
    /// id wins when addresses change across restarts.
    pub generation: u64,
}

/// One message family: its requests and responses encode into their own opcode block.
pub trait Family: Sized {
    /// Appends the body; returns the opcode.
    fn encode(&self, dst: &mut BytesMut) -> u8;
    /// Decodes the body of `opcode` (in this family's block).
    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError>;
    /// Bytes of payload to reserve (keys, values, states), before the fixed fields.
    fn payload_len(&self) -> usize {
        0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRequest {
    Session(SessionRequest),
    Replica(ReplicaRequest),
    Coordinator(CoordinatorRequest),
    Handoff(HandoffRequest),
    Aae(AaeRequest),
    Cluster(ClusterRequest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerResponse {
    Session(SessionResponse),
    Replica(ReplicaResponse),
    Coordinator(CoordinatorResponse),
    Handoff(HandoffResponse),
    Aae(AaeResponse),
    Cluster(ClusterResponse),
    Error(ErrorReply),
}

pub(crate) fn put_member(dst: &mut BytesMut, m: &MemberInfo) {
    put_bytes(dst, m.node_id.as_bytes());
    put_bytes(dst, m.client_addr.as_bytes());
    put_bytes(dst, m.peer_addr.as_bytes());
    dst.put_u32(m.vnodes);
    dst.put_u64(m.generation);
}

pub(crate) fn read_member(r: &mut Reader) -> Result<MemberInfo, DecodeError> {
    Ok(MemberInfo {
        node_id: r.text("node_id", 256)?,
        client_addr: r.text("client_addr", 256)?,
        peer_addr: r.text("peer_addr", 256)?,
        vnodes: r.u32("vnodes")?,
        generation: r.u64("generation")?,
    })
}

fn frame(opcode: u8, request_id: u64, body: BytesMut) -> Frame {
    Frame {
        opcode,
        request_id,
        body: body.freeze(),
    }
}

fn encode_family<F: Family>(msg: &F, request_id: u64) -> Frame {
    let mut b = BytesMut::with_capacity(BODY_SLACK + 256 + msg.payload_len());
    let op = msg.encode(&mut b);
    frame(op, request_id, b)
}

impl PeerRequest {
    /// The time its sender gave the request (what was left of a client's deadline), for the
    /// requests that carry one; the receiver counts it from the request's arrival. A forwarded
    /// write carries it inside the client request it wraps.
    pub fn timeout_ms_mut(&mut self) -> Option<&mut u32> {
        match self {
            PeerRequest::Replica(
                ReplicaRequest::ReadLocal { timeout_ms, .. }
                | ReplicaRequest::Replicate { timeout_ms, .. },
            )
            | PeerRequest::Handoff(
                HandoffRequest::StoreHint { timeout_ms, .. }
                | HandoffRequest::ReadHint { timeout_ms, .. },
            ) => Some(timeout_ms),
            _ => None,
        }
    }

    /// The time the request carries, a forwarded write's included (inside the client request
    /// it wraps); `None` when it carries none (or the wrapped request does not decode).
    pub fn time_given_ms(&mut self) -> Option<u32> {
        if let Some(ms) = self.timeout_ms_mut() {
            return Some(*ms);
        }
        match self {
            PeerRequest::Coordinator(CoordinatorRequest::Forward { opcode, body }) => {
                match crate::Request::decode(*opcode, body.clone()).ok()? {
                    crate::Request::Put { opts, .. } | crate::Request::Delete { opts, .. } => {
                        Some(opts.timeout_ms)
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Sets the time the request carries to `ms` (a forwarded write: re-encodes the client
    /// request it wraps); nothing for a request that carries none.
    pub fn set_time_given_ms(&mut self, ms: u32) {
        if let Some(t) = self.timeout_ms_mut() {
            *t = ms;
            return;
        }
        if let PeerRequest::Coordinator(CoordinatorRequest::Forward { opcode, body }) = self {
            let Ok(mut req) = crate::Request::decode(*opcode, body.clone()) else {
                return;
            };
            if let crate::Request::Put { opts, .. } | crate::Request::Delete { opts, .. } = &mut req
            {
                opts.timeout_ms = ms;
                let frame = req.to_frame(0);
                (*opcode, *body) = (frame.opcode, frame.body);
            }
        }
    }

    pub fn to_frame(&self, request_id: u64) -> Frame {
        match self {
            PeerRequest::Session(m) => encode_family(m, request_id),
            PeerRequest::Replica(m) => encode_family(m, request_id),
            PeerRequest::Coordinator(m) => encode_family(m, request_id),
            PeerRequest::Handoff(m) => encode_family(m, request_id),
            PeerRequest::Aae(m) => encode_family(m, request_id),
            PeerRequest::Cluster(m) => encode_family(m, request_id),
        }
    }

    pub fn decode(opcode: u8, body: Bytes) -> Result<PeerRequest, DecodeError> {
        let mut r = Reader::new(body);
        let req = if family::SESSION.contains(&opcode) {
            PeerRequest::Session(SessionRequest::decode(opcode, &mut r)?)
        } else if family::REPLICA.contains(&opcode) {
            PeerRequest::Replica(ReplicaRequest::decode(opcode, &mut r)?)
        } else if family::COORDINATOR.contains(&opcode) {
            PeerRequest::Coordinator(CoordinatorRequest::decode(opcode, &mut r)?)
        } else if family::HANDOFF.contains(&opcode) {
            PeerRequest::Handoff(HandoffRequest::decode(opcode, &mut r)?)
        } else if family::AAE.contains(&opcode) {
            PeerRequest::Aae(AaeRequest::decode(opcode, &mut r)?)
        } else if family::CLUSTER.contains(&opcode) {
            PeerRequest::Cluster(ClusterRequest::decode(opcode, &mut r)?)
        } else {
            return Err(DecodeError::UnknownOpcode(opcode));
        };
        r.finish()?;
        Ok(req)
    }
}

impl PeerResponse {
    /// An error reply (message cut to the wire limit, as for client errors).
    pub fn error(kind: ErrorKind, definite: bool, message: impl Into<String>) -> PeerResponse {
        PeerResponse::Error(ErrorReply::new(kind, definite, message))
    }

    pub fn to_frame(&self, request_id: u64) -> Frame {
        match self {
            PeerResponse::Session(m) => encode_family(m, request_id),
            PeerResponse::Replica(m) => encode_family(m, request_id),
            PeerResponse::Coordinator(m) => encode_family(m, request_id),
            PeerResponse::Handoff(m) => encode_family(m, request_id),
            PeerResponse::Aae(m) => encode_family(m, request_id),
            PeerResponse::Cluster(m) => encode_family(m, request_id),
            PeerResponse::Error(e) => {
                let mut b = BytesMut::with_capacity(BODY_SLACK + e.message.len());
                encode_error(&mut b, e);
                frame(ERROR, request_id, b)
            }
        }
    }

    pub fn decode(opcode: u8, body: Bytes) -> Result<PeerResponse, DecodeError> {
        let mut r = Reader::new(body);
        let request = opcode & !RESPONSE_BIT;
        let resp = if opcode == ERROR {
            PeerResponse::Error(decode_error(&mut r)?)
        } else if opcode & RESPONSE_BIT == 0 {
            return Err(DecodeError::UnknownOpcode(opcode));
        } else if family::SESSION.contains(&request) {
            PeerResponse::Session(SessionResponse::decode(opcode, &mut r)?)
        } else if family::REPLICA.contains(&request) {
            PeerResponse::Replica(ReplicaResponse::decode(opcode, &mut r)?)
        } else if family::COORDINATOR.contains(&request) {
            PeerResponse::Coordinator(CoordinatorResponse::decode(opcode, &mut r)?)
        } else if family::HANDOFF.contains(&request) {
            PeerResponse::Handoff(HandoffResponse::decode(opcode, &mut r)?)
        } else if family::AAE.contains(&request) {
            PeerResponse::Aae(AaeResponse::decode(opcode, &mut r)?)
        } else if family::CLUSTER.contains(&request) {
            PeerResponse::Cluster(ClusterResponse::decode(opcode, &mut r)?)
        } else {
            return Err(DecodeError::UnknownOpcode(opcode));
        };
        r.finish()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{NONCE_LEN, PROOF_LEN};

    fn member(id: &str) -> MemberInfo {
        MemberInfo {
            node_id: id.into(),
            client_addr: "127.0.0.1:7379".into(),
            peer_addr: "127.0.0.1:7380".into(),
            vnodes: 256,
            generation: 42,
        }
    }

    #[test]
    fn the_time_a_request_carries_is_set_in_a_forwarded_write_too() {
        use crate::message::WriteOptions;
        let put = crate::Request::Put {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            context: Bytes::new(),
            opts: WriteOptions {
                w: 2,
                timeout_ms: 900,
                flags: 0,
                pw: 0,
            },
        };
        let frame = put.to_frame(0);
        let mut fwd = PeerRequest::Coordinator(CoordinatorRequest::Forward {
            opcode: frame.opcode,
            body: frame.body,
        });
        assert_eq!(fwd.time_given_ms(), Some(900));
        fwd.set_time_given_ms(123);
        assert_eq!(fwd.time_given_ms(), Some(123));
        let PeerRequest::Coordinator(CoordinatorRequest::Forward { opcode, body }) = fwd else {
            unreachable!()
        };
        match crate::Request::decode(opcode, body).unwrap() {
            crate::Request::Put {
                key, value, opts, ..
            } => {
                assert_eq!(
                    (&key[..], &value[..], opts.w, opts.timeout_ms),
                    (&b"k"[..], &b"v"[..], 2, 123)
                );
            }
            other => panic!("{other:?}"),
        }
        let mut read = PeerRequest::Replica(ReplicaRequest::ReadLocal {
            key: Bytes::from_static(b"k"),
            timeout_ms: 7,
        });
        read.set_time_given_ms(3);
        assert_eq!(read.time_given_ms(), Some(3));
        let mut ping = PeerRequest::Session(SessionRequest::Ping);
        ping.set_time_given_ms(3);
        assert_eq!(ping.time_given_ms(), None);
    }

    #[test]
    fn round_trips() {
        let reqs = vec![
            PeerRequest::Session(SessionRequest::Hello(Hello {
                cluster: "c".into(),
                n: 3,
                me: member("a"),
                nonce: [7; NONCE_LEN],
            })),
            PeerRequest::Session(SessionRequest::HelloProof([9; PROOF_LEN])),
            PeerRequest::Replica(ReplicaRequest::ReadLocal {
                key: Bytes::from_static(b"k"),
                timeout_ms: 7,
            }),
            PeerRequest::Replica(ReplicaRequest::Replicate {
                key: Bytes::from_static(b"k"),
                state: Bytes::from_static(b"\x01\x00\x00"),
                timeout_ms: 9,
            }),
            PeerRequest::Coordinator(CoordinatorRequest::Forward {
                opcode: 4,
                body: Bytes::from_static(b"xyz"),
            }),
            PeerRequest::Session(SessionRequest::Ping),
            PeerRequest::Handoff(HandoffRequest::StoreHint {
                target: "b".into(),
                key: Bytes::from_static(b"k"),
                state: Bytes::from_static(b"s"),
                timeout_ms: 5,
            }),
            PeerRequest::Handoff(HandoffRequest::ReadHint {
                target: "c".into(),
                key: Bytes::from_static(b"k"),
                timeout_ms: 6,
            }),
            PeerRequest::Handoff(HandoffRequest::ReplayCredits {
                want_keys: 256,
                want_bytes: 1 << 20,
            }),
            PeerRequest::Handoff(HandoffRequest::Replay {
                entries: vec![
                    (Bytes::from_static(b"k1"), Bytes::from_static(b"s1")),
                    (Bytes::from_static(b"k2"), Bytes::new()),
                ],
            }),
            PeerRequest::Aae(AaeRequest::CellHashes {
                cells: vec![
                    CellRef {
                        level: 2,
                        first: 0,
                        last: 4095,
                    },
                    CellRef {
                        level: 0,
                        first: 7,
                        last: 7,
                    },
                ],
            }),
            PeerRequest::Aae(AaeRequest::KeyDigests {
                first: 1,
                last: u64::MAX,
                after: Bytes::from_static(b"k"),
                limit: 100,
            }),
            PeerRequest::Aae(AaeRequest::FetchStates {
                keys: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            }),
            PeerRequest::Aae(AaeRequest::PushStates {
                entries: vec![(Bytes::from_static(b"a"), Bytes::from_static(b"s"))],
            }),
            PeerRequest::Aae(AaeRequest::TombstoneCheck {
                entries: vec![(Bytes::from_static(b"a"), Bytes::from_static(b"t"))],
            }),
            PeerRequest::Aae(AaeRequest::Purge {
                entries: vec![(Bytes::from_static(b"b"), Bytes::from_static(b"t"))],
            }),
            PeerRequest::Aae(AaeRequest::RequestCycle),
            PeerRequest::Cluster(ClusterRequest::GetLayout),
            PeerRequest::Cluster(ClusterRequest::Admin(Bytes::from_static(
                b"{\"Plan\":null}",
            ))),
            PeerRequest::Cluster(ClusterRequest::Stats),
            PeerRequest::Cluster(ClusterRequest::Vote {
                version: 7,
                digest: u64::MAX - 3,
                decision: cluster::decision::ABORT,
            }),
        ];
        for r in reqs {
            let f = r.to_frame(9);
            assert_eq!(PeerRequest::decode(f.opcode, f.body).unwrap(), r);
        }
        let resps = vec![
            PeerResponse::Session(SessionResponse::Challenge(Challenge {
                me: member("b"),
                nonce: [1; NONCE_LEN],
                proof: [2; PROOF_LEN],
            })),
            PeerResponse::Session(SessionResponse::HelloAck),
            PeerResponse::Replica(ReplicaResponse::State(Bytes::from_static(b"s"))),
            PeerResponse::Replica(ReplicaResponse::Ack),
            PeerResponse::Coordinator(CoordinatorResponse::ForwardReply {
                opcode: 0x84,
                body: Bytes::from_static(b"r"),
            }),
            PeerResponse::Session(SessionResponse::Pong),
            PeerResponse::Handoff(HandoffResponse::HintStored),
            PeerResponse::Handoff(HandoffResponse::HintState(Bytes::from_static(b"s"))),
            PeerResponse::Handoff(HandoffResponse::Credits {
                keys: 10,
                bytes: 1000,
                retry_after_ms: 50,
            }),
            PeerResponse::Handoff(HandoffResponse::Replayed(vec![true, false, true])),
            PeerResponse::Aae(AaeResponse::Hashes(vec![0, u64::MAX, 7])),
            PeerResponse::Aae(AaeResponse::Digests {
                entries: vec![(Bytes::from_static(b"k"), 42)],
                more: true,
            }),
            PeerResponse::Aae(AaeResponse::States(vec![
                Bytes::new(),
                Bytes::from_static(b"s"),
            ])),
            PeerResponse::Aae(AaeResponse::Merged(vec![true, false])),
            PeerResponse::Aae(AaeResponse::TombstoneStatus(vec![0, 15, 3])),
            PeerResponse::Cluster(ClusterResponse::Layout(Bytes::from_static(b"{}"))),
            PeerResponse::Cluster(ClusterResponse::AdminReply(Bytes::from_static(b"{}"))),
            PeerResponse::Cluster(ClusterResponse::Stats {
                keys: 7,
                bytes: 900,
            }),
            PeerResponse::Cluster(ClusterResponse::Vote {
                granted: false,
                held: cluster::decision::SWITCH,
            }),
            PeerResponse::Error(ErrorReply {
                kind: ErrorKind::WrongCluster,
                definite: true,
                message: "no".into(),
            }),
        ];
        for r in resps {
            let f = r.to_frame(9);
            assert_eq!(PeerResponse::decode(f.opcode, f.body).unwrap(), r);
        }
    }

    /// Every request opcode lies in its family's block, and its response is at + 0x80.
    #[test]
    fn opcodes_follow_the_family_blocks() {
        use peer_opcode::*;
        for (req, resp, block) in [
            (HELLO, CHALLENGE, family::SESSION),
            (HELLO_PROOF, HELLO_ACK, family::SESSION),
            (PING, PONG, family::SESSION),
            (READ_LOCAL, STATE, family::REPLICA),
            (REPLICATE, ACK, family::REPLICA),
            (FORWARD, FORWARD_REPLY, family::COORDINATOR),
            (STORE_HINT, HINT_STORED, family::HANDOFF),
            (READ_HINT, HINT_STATE, family::HANDOFF),
            (REPLAY_CREDITS, CREDITS, family::HANDOFF),
            (REPLAY, REPLAYED, family::HANDOFF),
        ] {
            assert!(block.contains(&req), "0x{req:02x} outside {block:?}");
            assert_eq!(resp, req + RESPONSE_BIT, "0x{req:02x}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        for op in 0..=255u8 {
            for len in 0..40 {
                let body = Bytes::from(
                    (0..len)
                        .map(|i| (i * 37 + op as usize) as u8)
                        .collect::<Vec<_>>(),
                );
                let _ = PeerRequest::decode(op, body.clone());
                let _ = PeerResponse::decode(op, body);
            }
        }
    }
}
