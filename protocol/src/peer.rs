//! Inter-node RPC messages (the peer protocol). Same frame format and version as the client
//! protocol, served on the separate peer listener. Every peer connection starts with the
//! authenticated handshake of `auth.rs`: `Hello` → `Challenge` → `HelloProof` → `HelloAck`.
//! Until it completes a node serves nothing else and accepts only small frames; a wrong cluster
//! name or N is answered `WrongCluster`, a failed proof `Unauthenticated`, and the connection
//! is closed.

use bytes::{BufMut, Bytes, BytesMut};

use crate::auth::{NONCE_LEN, PROOF_LEN};
use crate::frame::Frame;
use crate::limits::{
    MAX_KEY_LEN, MAX_REQUEST_BODY_LEN, MAX_RESPONSE_BODY_LEN, MAX_STATE_ENCODED_LEN, MAX_TEXT_LEN,
};
use crate::message::{decode_error, encode_error, opcode::ERROR, ErrorReply, BODY_SLACK};
use crate::wire::{put_bytes, DecodeError, Reader};

pub mod peer_opcode {
    pub const HELLO: u8 = 0x20;
    pub const HELLO_PROOF: u8 = 0x21;
    pub const READ_LOCAL: u8 = 0x22;
    pub const REPLICATE: u8 = 0x23;
    pub const FORWARD: u8 = 0x24;
    pub const PING: u8 = 0x25;

    pub const HELLO_ACK: u8 = 0xA0;
    pub const CHALLENGE: u8 = 0xA1;
    pub const STATE: u8 = 0xA2;
    pub const ACK: u8 = 0xA3;
    pub const FORWARD_REPLY: u8 = 0xA4;
    pub const PONG: u8 = 0xA5;
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

/// The dialer's opening of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub cluster: String,
    /// The replication factor the sender runs with: members must agree.
    pub n: u8,
    pub me: MemberInfo,
    /// Fresh random bytes of the dialer (the listener's proof must cover them).
    pub nonce: [u8; NONCE_LEN],
}

/// The listener's answer to `Hello`: who it is, its fresh nonce, and its proof of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub me: MemberInfo,
    pub nonce: [u8; NONCE_LEN],
    pub proof: [u8; PROOF_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRequest {
    Hello(Hello),
    /// The dialer's proof of the secret, after it checked the listener's `Challenge`.
    HelloProof([u8; PROOF_LEN]),
    /// Read the receiver's own replica of `key`, within `timeout_ms` (what is left of the
    /// client's deadline).
    ReadLocal {
        key: Bytes,
        timeout_ms: u32,
    },
    /// Merge `state` (an encoded key state) into the receiver's replica of `key`, within
    /// `timeout_ms`.
    Replicate {
        key: Bytes,
        state: Bytes,
        timeout_ms: u32,
    },
    /// Coordinate a client write (a client Put/Delete opcode and body) on the receiver, which
    /// is a replica of the key; it never forwards again.
    Forward {
        opcode: u8,
        body: Bytes,
    },
    Ping,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerResponse {
    Challenge(Challenge),
    /// The handshake is complete: the connection serves peer requests.
    HelloAck,
    /// An encoded key state (empty state for an absent key).
    State(Bytes),
    Ack,
    /// The client response (opcode and body) of a forwarded write.
    ForwardReply {
        opcode: u8,
        body: Bytes,
    },
    Pong,
    Error(ErrorReply),
}

fn put_member(dst: &mut BytesMut, m: &MemberInfo) {
    put_bytes(dst, m.node_id.as_bytes());
    put_bytes(dst, m.client_addr.as_bytes());
    put_bytes(dst, m.peer_addr.as_bytes());
    dst.put_u32(m.vnodes);
    dst.put_u64(m.generation);
}

fn read_member(r: &mut Reader) -> Result<MemberInfo, DecodeError> {
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

impl PeerRequest {
    pub fn to_frame(&self, request_id: u64) -> Frame {
        let payload = match self {
            PeerRequest::ReadLocal { key, .. } => key.len(),
            PeerRequest::Replicate { key, state, .. } => key.len() + state.len(),
            PeerRequest::Forward { body, .. } => body.len(),
            PeerRequest::Hello(_) | PeerRequest::HelloProof(_) | PeerRequest::Ping => 256,
        };
        let mut b = BytesMut::with_capacity(BODY_SLACK + payload);
        let op = match self {
            PeerRequest::Hello(h) => {
                put_bytes(&mut b, h.cluster.as_bytes());
                b.put_u8(h.n);
                put_member(&mut b, &h.me);
                b.put_slice(&h.nonce);
                peer_opcode::HELLO
            }
            PeerRequest::HelloProof(proof) => {
                b.put_slice(proof);
                peer_opcode::HELLO_PROOF
            }
            PeerRequest::ReadLocal { key, timeout_ms } => {
                put_bytes(&mut b, key);
                b.put_u32(*timeout_ms);
                peer_opcode::READ_LOCAL
            }
            PeerRequest::Replicate {
                key,
                state,
                timeout_ms,
            } => {
                put_bytes(&mut b, key);
                put_bytes(&mut b, state);
                b.put_u32(*timeout_ms);
                peer_opcode::REPLICATE
            }
            PeerRequest::Forward { opcode, body } => {
                b.put_u8(*opcode);
                put_bytes(&mut b, body);
                peer_opcode::FORWARD
            }
            PeerRequest::Ping => peer_opcode::PING,
        };
        frame(op, request_id, b)
    }

    pub fn decode(opcode: u8, body: Bytes) -> Result<PeerRequest, DecodeError> {
        let mut r = Reader::new(body);
        let req = match opcode {
            peer_opcode::HELLO => PeerRequest::Hello(Hello {
                cluster: r.text("cluster", MAX_TEXT_LEN)?,
                n: r.u8("n")?,
                me: read_member(&mut r)?,
                nonce: r.array("nonce")?,
            }),
            peer_opcode::HELLO_PROOF => PeerRequest::HelloProof(r.array("proof")?),
            peer_opcode::READ_LOCAL => PeerRequest::ReadLocal {
                key: r.bytes("key", MAX_KEY_LEN)?,
                timeout_ms: r.u32("timeout_ms")?,
            },
            peer_opcode::REPLICATE => PeerRequest::Replicate {
                key: r.bytes("key", MAX_KEY_LEN)?,
                state: r.bytes("state", MAX_STATE_ENCODED_LEN)?,
                timeout_ms: r.u32("timeout_ms")?,
            },
            peer_opcode::FORWARD => PeerRequest::Forward {
                opcode: r.u8("forwarded opcode")?,
                body: r.bytes("forwarded body", MAX_REQUEST_BODY_LEN)?,
            },
            peer_opcode::PING => PeerRequest::Ping,
            other => return Err(DecodeError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok(req)
    }
}

impl PeerResponse {
    pub fn to_frame(&self, request_id: u64) -> Frame {
        let payload = match self {
            PeerResponse::State(s) => s.len(),
            PeerResponse::ForwardReply { body, .. } => body.len(),
            PeerResponse::Error(e) => e.message.len(),
            PeerResponse::Challenge(_)
            | PeerResponse::HelloAck
            | PeerResponse::Ack
            | PeerResponse::Pong => 256,
        };
        let mut b = BytesMut::with_capacity(BODY_SLACK + payload);
        let op = match self {
            PeerResponse::Challenge(c) => {
                put_member(&mut b, &c.me);
                b.put_slice(&c.nonce);
                b.put_slice(&c.proof);
                peer_opcode::CHALLENGE
            }
            PeerResponse::HelloAck => peer_opcode::HELLO_ACK,
            PeerResponse::State(s) => {
                put_bytes(&mut b, s);
                peer_opcode::STATE
            }
            PeerResponse::Ack => peer_opcode::ACK,
            PeerResponse::ForwardReply { opcode, body } => {
                b.put_u8(*opcode);
                put_bytes(&mut b, body);
                peer_opcode::FORWARD_REPLY
            }
            PeerResponse::Pong => peer_opcode::PONG,
            PeerResponse::Error(e) => {
                encode_error(&mut b, e);
                ERROR
            }
        };
        frame(op, request_id, b)
    }

    pub fn decode(opcode: u8, body: Bytes) -> Result<PeerResponse, DecodeError> {
        let mut r = Reader::new(body);
        let resp = match opcode {
            peer_opcode::CHALLENGE => PeerResponse::Challenge(Challenge {
                me: read_member(&mut r)?,
                nonce: r.array("nonce")?,
                proof: r.array("proof")?,
            }),
            peer_opcode::HELLO_ACK => PeerResponse::HelloAck,
            peer_opcode::STATE => PeerResponse::State(r.bytes("state", MAX_STATE_ENCODED_LEN)?),
            peer_opcode::ACK => PeerResponse::Ack,
            peer_opcode::FORWARD_REPLY => PeerResponse::ForwardReply {
                opcode: r.u8("forwarded opcode")?,
                body: r.bytes("forwarded body", MAX_RESPONSE_BODY_LEN)?,
            },
            peer_opcode::PONG => PeerResponse::Pong,
            ERROR => PeerResponse::Error(decode_error(&mut r)?),
            other => return Err(DecodeError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ErrorKind;

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
    fn round_trips() {
        let reqs = vec![
            PeerRequest::Hello(Hello {
                cluster: "c".into(),
                n: 3,
                me: member("a"),
                nonce: [7; NONCE_LEN],
            }),
            PeerRequest::HelloProof([9; PROOF_LEN]),
            PeerRequest::ReadLocal {
                key: Bytes::from_static(b"k"),
                timeout_ms: 7,
            },
            PeerRequest::Replicate {
                key: Bytes::from_static(b"k"),
                state: Bytes::from_static(b"\x01\x00\x00"),
                timeout_ms: 9,
            },
            PeerRequest::Forward {
                opcode: 4,
                body: Bytes::from_static(b"xyz"),
            },
            PeerRequest::Ping,
        ];
        for r in reqs {
            let f = r.to_frame(9);
            assert_eq!(PeerRequest::decode(f.opcode, f.body).unwrap(), r);
        }
        let resps = vec![
            PeerResponse::Challenge(Challenge {
                me: member("b"),
                nonce: [1; NONCE_LEN],
                proof: [2; PROOF_LEN],
            }),
            PeerResponse::HelloAck,
            PeerResponse::State(Bytes::from_static(b"s")),
            PeerResponse::Ack,
            PeerResponse::ForwardReply {
                opcode: 0x84,
                body: Bytes::from_static(b"r"),
            },
            PeerResponse::Pong,
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
