//! The cluster family (0x48–0x4F): the layout and the staged ring changes.
//!
//! A node that sees a newer layout in a member's gossip metadata fetches it with
//! `GetLayout`. `kvctl cluster …` requests reach the claimant (the node that decides for the
//! cluster) as `Admin`, forwarded by whichever node the client contacted. Layouts and admin
//! messages are JSON (operator-facing, rare, and versioned by their own fields); `Stats` gives
//! the plan its key and byte estimates.

use bytes::{BufMut, Bytes, BytesMut};

use super::Family;
use crate::wire::{put_bytes, DecodeError, Reader};

pub mod op {
    pub const GET_LAYOUT: u8 = 0x48;
    pub const ADMIN: u8 = 0x49;
    pub const STATS: u8 = 0x4A;

    pub const LAYOUT: u8 = 0xC8;
    pub const ADMIN_REPLY: u8 = 0xC9;
    pub const STATS_REPLY: u8 = 0xCA;
}

/// Largest JSON body of the family (a layout of hundreds of nodes, a status of every transfer).
pub const MAX_CLUSTER_JSON: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterRequest {
    GetLayout,
    /// A `kvctl cluster` request (JSON), for the claimant.
    Admin(Bytes),
    /// The receiver's estimated key count and bytes of live data.
    Stats,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterResponse {
    /// The receiver's layout (JSON).
    Layout(Bytes),
    AdminReply(Bytes),
    Stats {
        keys: u64,
        bytes: u64,
    },
}

impl Family for ClusterRequest {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            ClusterRequest::GetLayout => op::GET_LAYOUT,
            ClusterRequest::Admin(json) => {
                put_bytes(b, json);
                op::ADMIN
            }
            ClusterRequest::Stats => op::STATS,
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::GET_LAYOUT => ClusterRequest::GetLayout,
            op::ADMIN => ClusterRequest::Admin(r.bytes("admin", MAX_CLUSTER_JSON)?),
            op::STATS => ClusterRequest::Stats,
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            ClusterRequest::Admin(json) => json.len(),
            _ => 0,
        }
    }
}

impl Family for ClusterResponse {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            ClusterResponse::Layout(json) => {
                put_bytes(b, json);
                op::LAYOUT
            }
            ClusterResponse::AdminReply(json) => {
                put_bytes(b, json);
                op::ADMIN_REPLY
            }
            ClusterResponse::Stats { keys, bytes } => {
                b.put_u64(*keys);
                b.put_u64(*bytes);
                op::STATS_REPLY
            }
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::LAYOUT => ClusterResponse::Layout(r.bytes("layout", MAX_CLUSTER_JSON)?),
            op::ADMIN_REPLY => ClusterResponse::AdminReply(r.bytes("reply", MAX_CLUSTER_JSON)?),
            op::STATS_REPLY => ClusterResponse::Stats {
                keys: r.u64("keys")?,
                bytes: r.u64("bytes")?,
            },
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            ClusterResponse::Layout(json) | ClusterResponse::AdminReply(json) => json.len(),
            ClusterResponse::Stats { .. } => 16,
        }
    }
}
