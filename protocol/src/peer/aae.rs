//! The anti-entropy family (0x40–0x47): replicas of a ring range compare their hash trees and
//! repair the keys that differ.
//!
//! An exchange, run by one replica (the initiator) against another over a range both
//! replicate: `CellHashes` level by level, descending only into cells whose hashes differ (a
//! cell is a tree node clipped to a leaf range), the differing leaves asked again to drop writes
//! in flight; then `KeyDigests` over the positions of the leaves that still differ (and of the
//! range's edge leaves, which may hold keys of other ranges), which both sides compare key by
//! key; then `FetchStates` for what the peer has and `PushStates` for what the initiator has,
//! each merged with the version-vector logic (never overwritten).

use bytes::{BufMut, Bytes, BytesMut};

use super::Family;
use crate::limits::{MAX_KEY_LEN, MAX_PEER_BODY_LEN, MAX_STATE_ENCODED_LEN};
use crate::wire::{put_bytes, put_count, DecodeError, Reader};

pub mod op {
    pub const CELL_HASHES: u8 = 0x40;
    pub const KEY_DIGESTS: u8 = 0x41;
    pub const FETCH_STATES: u8 = 0x42;
    pub const PUSH_STATES: u8 = 0x43;
    pub const TOMBSTONE_CHECK: u8 = 0x44;
    pub const PURGE: u8 = 0x45;
    pub const REQUEST_CYCLE: u8 = 0x46;

    pub const HASHES: u8 = 0xC0;
    pub const DIGESTS: u8 = 0xC1;
    pub const STATES: u8 = 0xC2;
    pub const MERGED: u8 = 0xC3;
    pub const TOMBSTONE_STATUS: u8 = 0xC4;
}

/// Flags of one key in a `TombstoneStatus` answer.
pub mod status {
    /// The receiver replicates the key in its current ring.
    pub const REPLICA: u8 = 1;
    /// The receiver's state of the key has a version vector equal to or above the given one.
    pub const COVERED: u8 = 2;
    /// The receiver's stored state is exactly the given one.
    pub const EQUAL: u8 = 4;
    /// The receiver holds a hint for the key (for any target).
    pub const HINTED: u8 = 8;
    /// The receiver stores a state of the key, replica or not (a node that lost the key's
    /// range in a ring change holds its copy until it has handed it over).
    pub const HELD: u8 = 16;
}

/// Most cells in one `CellHashes` request (8 bytes each in the answer: 32 KiB).
pub const MAX_CELLS: usize = 4096;
/// Most keys in one `KeyDigests` answer.
pub const MAX_DIGESTS: usize = 4096;
/// Most keys in one `FetchStates` or `PushStates`.
pub const MAX_STATES: usize = 256;
/// Bytes of states an initiator puts in one `PushStates` (a larger single state goes alone).
pub const STATES_BATCH_BYTES: usize = 1024 * 1024;

/// A tree node clipped to a leaf range: `level` 0 = leaves; `first..=last` leaf indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellRef {
    pub level: u8,
    pub first: u32,
    pub last: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AaeRequest {
    /// The receiver's hash of each cell, in order.
    CellHashes { cells: Vec<CellRef> },
    /// (key, digest) of the receiver's keys with positions in `first..=last`, in position
    /// order, after the key `after` (empty = from `first`), at most `limit` (≤ MAX_DIGESTS).
    KeyDigests {
        first: u64,
        last: u64,
        after: Bytes,
        limit: u32,
    },
    /// The receiver's encoded state of each key (empty = absent).
    FetchStates { keys: Vec<Bytes> },
    /// States for the receiver's replicas: merge each (never overwrite).
    PushStates { entries: Vec<(Bytes, Bytes)> },
    /// Tombstone GC, the stability check: for each (key, encoded tombstone state), what the
    /// receiver holds of it (`status` flags), from its data and its hints.
    TombstoneCheck { entries: Vec<(Bytes, Bytes)> },
    /// Tombstone GC, the purge: delete each key whose stored state is exactly the given one
    /// (compare-and-delete; a state that changed is kept).
    Purge { entries: Vec<(Bytes, Bytes)> },
    /// Start an anti-entropy cycle now (a node holding marks for the receiver's ranges that
    /// it does not replicate itself): answered `Merged([started])`.
    RequestCycle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AaeResponse {
    Hashes(Vec<u64>),
    /// `more`: the range holds more keys after the last entry.
    Digests {
        entries: Vec<(Bytes, u64)>,
        more: bool,
    },
    States(Vec<Bytes>),
    /// Per entry, in order: merged (true), or refused (false: not a replica of that key here).
    /// Also the answer to `Purge`: purged (true) or kept.
    Merged(Vec<bool>),
    /// Per `TombstoneCheck` entry, in order: its `status` flags.
    TombstoneStatus(Vec<u8>),
}

fn put_pairs(b: &mut BytesMut, entries: &[(Bytes, Bytes)]) {
    put_count(b, entries.len());
    for (k, s) in entries {
        put_bytes(b, k);
        put_bytes(b, s);
    }
}

/// (key, state) pairs: at most `MAX_STATES`.
fn read_pairs(r: &mut Reader) -> Result<Vec<(Bytes, Bytes)>, DecodeError> {
    let n = r.count("entries", MAX_STATES, 8)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let k = r.bytes("key", MAX_KEY_LEN)?;
        let s = r.bytes("state", MAX_STATE_ENCODED_LEN)?;
        entries.push((k, s));
    }
    Ok(entries)
}

impl Family for AaeRequest {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            AaeRequest::CellHashes { cells } => {
                put_count(b, cells.len());
                for c in cells {
                    b.put_u8(c.level);
                    b.put_u32(c.first);
                    b.put_u32(c.last);
                }
                op::CELL_HASHES
            }
            AaeRequest::KeyDigests {
                first,
                last,
                after,
                limit,
            } => {
                b.put_u64(*first);
                b.put_u64(*last);
                put_bytes(b, after);
                b.put_u32(*limit);
                op::KEY_DIGESTS
            }
            AaeRequest::FetchStates { keys } => {
                put_count(b, keys.len());
                for k in keys {
                    put_bytes(b, k);
                }
                op::FETCH_STATES
            }
            AaeRequest::PushStates { entries } => {
                put_pairs(b, entries);
                op::PUSH_STATES
            }
            AaeRequest::TombstoneCheck { entries } => {
                put_pairs(b, entries);
                op::TOMBSTONE_CHECK
            }
            AaeRequest::Purge { entries } => {
                put_pairs(b, entries);
                op::PURGE
            }
            AaeRequest::RequestCycle => op::REQUEST_CYCLE,
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::CELL_HASHES => {
                let n = r.count("cells", MAX_CELLS, 9)?;
                let mut cells = Vec::with_capacity(n);
                for _ in 0..n {
                    let c = CellRef {
                        level: r.u8("level")?,
                        first: r.u32("first")?,
                        last: r.u32("last")?,
                    };
                    if c.first > c.last {
                        return Err(DecodeError::Invalid {
                            field: "cells",
                            detail: format!("first leaf {} after last {}", c.first, c.last),
                        });
                    }
                    cells.push(c);
                }
                AaeRequest::CellHashes { cells }
            }
            op::KEY_DIGESTS => AaeRequest::KeyDigests {
                first: r.u64("first")?,
                last: r.u64("last")?,
                after: r.bytes("after", MAX_KEY_LEN)?,
                limit: r.u32("limit")?,
            },
            op::FETCH_STATES => {
                let n = r.count("keys", MAX_STATES, 4)?;
                let mut keys = Vec::with_capacity(n);
                for _ in 0..n {
                    keys.push(r.bytes("key", MAX_KEY_LEN)?);
                }
                AaeRequest::FetchStates { keys }
            }
            op::PUSH_STATES => AaeRequest::PushStates {
                entries: read_pairs(r)?,
            },
            op::TOMBSTONE_CHECK => AaeRequest::TombstoneCheck {
                entries: read_pairs(r)?,
            },
            op::PURGE => AaeRequest::Purge {
                entries: read_pairs(r)?,
            },
            op::REQUEST_CYCLE => AaeRequest::RequestCycle,
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            AaeRequest::CellHashes { cells } => 9 * cells.len(),
            AaeRequest::KeyDigests { after, .. } => after.len(),
            AaeRequest::RequestCycle => 0,
            AaeRequest::FetchStates { keys } => keys.iter().map(|k| 4 + k.len()).sum(),
            AaeRequest::PushStates { entries }
            | AaeRequest::TombstoneCheck { entries }
            | AaeRequest::Purge { entries } => entries
                .iter()
                .map(|(k, s)| 8 + k.len() + s.len())
                .sum::<usize>()
                .min(MAX_PEER_BODY_LEN),
        }
    }
}

impl Family for AaeResponse {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            AaeResponse::Hashes(h) => {
                put_count(b, h.len());
                for x in h {
                    b.put_u64(*x);
                }
                op::HASHES
            }
            AaeResponse::Digests { entries, more } => {
                put_count(b, entries.len());
                for (k, d) in entries {
                    put_bytes(b, k);
                    b.put_u64(*d);
                }
                b.put_u8(*more as u8);
                op::DIGESTS
            }
            AaeResponse::States(states) => {
                put_count(b, states.len());
                for s in states {
                    put_bytes(b, s);
                }
                op::STATES
            }
            AaeResponse::Merged(m) => {
                put_count(b, m.len());
                for x in m {
                    b.put_u8(*x as u8);
                }
                op::MERGED
            }
            AaeResponse::TombstoneStatus(flags) => {
                put_count(b, flags.len());
                b.put_slice(flags);
                op::TOMBSTONE_STATUS
            }
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::HASHES => {
                let n = r.count("hashes", MAX_CELLS, 8)?;
                let mut h = Vec::with_capacity(n);
                for _ in 0..n {
                    h.push(r.u64("hash")?);
                }
                AaeResponse::Hashes(h)
            }
            op::DIGESTS => {
                let n = r.count("digests", MAX_DIGESTS, 12)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = r.bytes("key", MAX_KEY_LEN)?;
                    entries.push((k, r.u64("digest")?));
                }
                let more = r.bool("more")?;
                AaeResponse::Digests { entries, more }
            }
            op::STATES => {
                let n = r.count("states", MAX_STATES, 4)?;
                let mut states = Vec::with_capacity(n);
                for _ in 0..n {
                    states.push(r.bytes("state", MAX_STATE_ENCODED_LEN)?);
                }
                AaeResponse::States(states)
            }
            op::MERGED => AaeResponse::Merged(r.bools("merged", MAX_STATES)?),
            op::TOMBSTONE_STATUS => {
                let n = r.count("flags", MAX_STATES, 1)?;
                let mut flags = Vec::with_capacity(n);
                for _ in 0..n {
                    flags.push(r.u8("flags")?);
                }
                AaeResponse::TombstoneStatus(flags)
            }
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            AaeResponse::Hashes(h) => 8 * h.len(),
            AaeResponse::Digests { entries, .. } => entries.iter().map(|(k, _)| 12 + k.len()).sum(),
            AaeResponse::States(s) => s
                .iter()
                .map(|s| 4 + s.len())
                .sum::<usize>()
                .min(MAX_PEER_BODY_LEN),
            AaeResponse::Merged(m) => m.len(),
            AaeResponse::TombstoneStatus(f) => f.len(),
        }
    }
}
