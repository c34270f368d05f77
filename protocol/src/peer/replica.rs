//! The replica family (0x28–0x2F): what a coordinator asks of a replica.

use bytes::{BufMut, Bytes, BytesMut};

use super::Family;
use crate::limits::{MAX_KEY_LEN, MAX_STATE_ENCODED_LEN};
use crate::wire::{put_bytes, DecodeError, Reader};

pub mod op {
    pub const READ_LOCAL: u8 = 0x28;
    pub const REPLICATE: u8 = 0x29;

    pub const STATE: u8 = 0xA8;
    pub const ACK: u8 = 0xA9;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaRequest {
    /// Read the receiver's own replica of `key`, within `timeout_ms` (what is left of the
    /// client's deadline).
    ReadLocal { key: Bytes, timeout_ms: u32 },
    /// Merge `state` (an encoded key state) into the receiver's replica of `key`, within
    /// `timeout_ms`.
    Replicate {
        key: Bytes,
        state: Bytes,
        timeout_ms: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaResponse {
    /// An encoded key state (empty state for an absent key).
    State(Bytes),
    /// The receiver merged the replicated state.
    Ack,
}

impl Family for ReplicaRequest {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            ReplicaRequest::ReadLocal { key, timeout_ms } => {
                put_bytes(b, key);
                b.put_u32(*timeout_ms);
                op::READ_LOCAL
            }
            ReplicaRequest::Replicate {
                key,
                state,
                timeout_ms,
            } => {
                put_bytes(b, key);
                put_bytes(b, state);
                b.put_u32(*timeout_ms);
                op::REPLICATE
            }
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::READ_LOCAL => ReplicaRequest::ReadLocal {
                key: r.bytes("key", MAX_KEY_LEN)?,
                timeout_ms: r.u32("timeout_ms")?,
            },
            op::REPLICATE => ReplicaRequest::Replicate {
                key: r.bytes("key", MAX_KEY_LEN)?,
                state: r.bytes("state", MAX_STATE_ENCODED_LEN)?,
                timeout_ms: r.u32("timeout_ms")?,
            },
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            ReplicaRequest::ReadLocal { key, .. } => key.len(),
            ReplicaRequest::Replicate { key, state, .. } => key.len() + state.len(),
        }
    }
}

impl Family for ReplicaResponse {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            ReplicaResponse::State(s) => {
                put_bytes(b, s);
                op::STATE
            }
            ReplicaResponse::Ack => op::ACK,
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::STATE => ReplicaResponse::State(r.bytes("state", MAX_STATE_ENCODED_LEN)?),
            op::ACK => ReplicaResponse::Ack,
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            ReplicaResponse::State(s) => s.len(),
            ReplicaResponse::Ack => 0,
        }
    }
}
