//! The session family (0x20–0x27): the authenticated handshake and liveness pings.

use bytes::{BufMut, BytesMut};

use super::{put_member, read_member, Family, MemberInfo};
use crate::auth::{NONCE_LEN, PROOF_LEN};
use crate::limits::MAX_TEXT_LEN;
use crate::wire::{put_bytes, DecodeError, Reader};

pub mod op {
    pub const HELLO: u8 = 0x20;
    pub const HELLO_PROOF: u8 = 0x21;
    pub const PING: u8 = 0x22;

    pub const CHALLENGE: u8 = 0xA0;
    pub const HELLO_ACK: u8 = 0xA1;
    pub const PONG: u8 = 0xA2;
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
pub enum SessionRequest {
    Hello(Hello),
    /// The dialer's proof of the secret, after it checked the listener's `Challenge`.
    HelloProof([u8; PROOF_LEN]),
    Ping,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionResponse {
    Challenge(Challenge),
    /// The handshake is complete: the connection serves peer requests.
    HelloAck,
    Pong,
}

impl Family for SessionRequest {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            SessionRequest::Hello(h) => {
                put_bytes(b, h.cluster.as_bytes());
                b.put_u8(h.n);
                put_member(b, &h.me);
                b.put_slice(&h.nonce);
                op::HELLO
            }
            SessionRequest::HelloProof(proof) => {
                b.put_slice(proof);
                op::HELLO_PROOF
            }
            SessionRequest::Ping => op::PING,
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::HELLO => SessionRequest::Hello(Hello {
                cluster: r.text("cluster", MAX_TEXT_LEN)?,
                n: r.u8("n")?,
                me: read_member(r)?,
                nonce: r.array("nonce")?,
            }),
            op::HELLO_PROOF => SessionRequest::HelloProof(r.array("proof")?),
            op::PING => SessionRequest::Ping,
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }
}

impl Family for SessionResponse {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            SessionResponse::Challenge(c) => {
                put_member(b, &c.me);
                b.put_slice(&c.nonce);
                b.put_slice(&c.proof);
                op::CHALLENGE
            }
            SessionResponse::HelloAck => op::HELLO_ACK,
            SessionResponse::Pong => op::PONG,
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::CHALLENGE => SessionResponse::Challenge(Challenge {
                me: read_member(r)?,
                nonce: r.array("nonce")?,
                proof: r.array("proof")?,
            }),
            op::HELLO_ACK => SessionResponse::HelloAck,
            op::PONG => SessionResponse::Pong,
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }
}
