//! The cluster family (0x48–0x4F): the layout and the staged ring changes.
//!
//! A node that sees a newer layout in a member's gossip metadata fetches it with
//! `GetLayout`. `kvctl cluster …` requests reach the claimant (the node that decides for the
//! cluster) as `Admin`, forwarded by whichever node the client contacted. Layouts and admin
//! messages are JSON (operator-facing, rare, and versioned by their own fields); `Stats` gives
//! the plan its key and byte estimates. `Vote` asks a voter of a running ring change to grant
//! the claimant one decision on it (switch or abort): a voter grants at most one of the two
//! per change, durably, so two claimants cannot both gather a majority for opposite ones.

use bytes::{BufMut, Bytes, BytesMut};

use super::Family;
use crate::wire::{put_bytes, DecodeError, Reader};

pub mod op {
    pub const GET_LAYOUT: u8 = 0x48;
    pub const ADMIN: u8 = 0x49;
    pub const STATS: u8 = 0x4A;
    pub const VOTE: u8 = 0x4B;

    pub const LAYOUT: u8 = 0xC8;
    pub const ADMIN_REPLY: u8 = 0xC9;
    pub const STATS_REPLY: u8 = 0xCA;
    pub const VOTE_REPLY: u8 = 0xCB;
}

/// The decisions a voter can grant on a running ring change (`Vote`).
pub mod decision {
    /// Ownership switches to the next ring.
    pub const SWITCH: u8 = 1;
    /// The next ring is dropped (kvctl cluster abort).
    pub const ABORT: u8 = 2;
    /// In a refused `Vote` reply: the voter's layout is newer than the change (it was decided,
    /// perhaps switched).
    pub const SUPERSEDED: u8 = 3;
    /// In a refused `Vote` reply: the voter granted the switch of another change of the same
    /// version.
    pub const OTHER_SWITCHED: u8 = 4;
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
    /// Grant `decision` (`decision::SWITCH` or `ABORT`) on the running transition whose
    /// layout is `version` with `digest`.
    Vote {
        version: u64,
        digest: u64,
        decision: u8,
    },
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
    /// `granted`, or the decision the voter granted on that transition before (`held`);
    /// `held` is 0 when nothing was refused.
    Vote {
        granted: bool,
        held: u8,
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
            ClusterRequest::Vote {
                version,
                digest,
                decision,
            } => {
                b.put_u64(*version);
                b.put_u64(*digest);
                b.put_u8(*decision);
                op::VOTE
            }
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::GET_LAYOUT => ClusterRequest::GetLayout,
            op::ADMIN => ClusterRequest::Admin(r.bytes("admin", MAX_CLUSTER_JSON)?),
            op::STATS => ClusterRequest::Stats,
            op::VOTE => ClusterRequest::Vote {
                version: r.u64("version")?,
                digest: r.u64("digest")?,
                decision: r.u8("decision")?,
            },
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
            ClusterResponse::Vote { granted, held } => {
                b.put_u8(u8::from(*granted));
                b.put_u8(*held);
                op::VOTE_REPLY
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
            op::VOTE_REPLY => ClusterResponse::Vote {
                granted: r.u8("granted")? != 0,
                held: r.u8("held")?,
            },
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            ClusterResponse::Layout(json) | ClusterResponse::AdminReply(json) => json.len(),
            ClusterResponse::Stats { .. } => 16,
            ClusterResponse::Vote { .. } => 2,
        }
    }
}
