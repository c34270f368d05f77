//! The coordinator family (0x30–0x37): writes an entry node forwards to a replica of the key.

use bytes::{BufMut, Bytes, BytesMut};

use super::Family;
use crate::limits::{MAX_REQUEST_BODY_LEN, MAX_RESPONSE_BODY_LEN};
use crate::wire::{put_bytes, DecodeError, Reader};

pub mod op {
    pub const FORWARD: u8 = 0x30;

    pub const FORWARD_REPLY: u8 = 0xB0;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorRequest {
    /// Coordinate a client write (a client Put/Delete opcode and body) on the receiver, which
    /// is a replica of the key; it never forwards again.
    Forward { opcode: u8, body: Bytes },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorResponse {
    /// The client response (opcode and body) of a forwarded write.
    ForwardReply { opcode: u8, body: Bytes },
}

impl Family for CoordinatorRequest {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            CoordinatorRequest::Forward { opcode, body } => {
                b.put_u8(*opcode);
                put_bytes(b, body);
                op::FORWARD
            }
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::FORWARD => CoordinatorRequest::Forward {
                opcode: r.u8("forwarded opcode")?,
                body: r.bytes("forwarded body", MAX_REQUEST_BODY_LEN)?,
            },
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            CoordinatorRequest::Forward { body, .. } => body.len(),
        }
    }
}

impl Family for CoordinatorResponse {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            CoordinatorResponse::ForwardReply { opcode, body } => {
                b.put_u8(*opcode);
                put_bytes(b, body);
                op::FORWARD_REPLY
            }
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::FORWARD_REPLY => CoordinatorResponse::ForwardReply {
                opcode: r.u8("forwarded opcode")?,
                body: r.bytes("forwarded body", MAX_RESPONSE_BODY_LEN)?,
            },
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            CoordinatorResponse::ForwardReply { body, .. } => body.len(),
        }
    }
}
