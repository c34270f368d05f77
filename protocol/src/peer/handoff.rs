//! The handoff family (0x38–0x3F): hinted handoff between nodes.
//!
//! A coordinator stores a **hint** on a fallback node for a primary that is down (sloppy
//! quorum) and may read it back for a sloppy read; a holder replays its hints to their target
//! once it is back, paced by **credits** the target hands out: one replay budget per target,
//! shared by every holder (no replay storm).

use bytes::{BufMut, Bytes, BytesMut};

use super::Family;
use crate::limits::{MAX_KEY_LEN, MAX_PEER_BODY_LEN, MAX_STATE_ENCODED_LEN};
use crate::wire::{put_bytes, put_count, DecodeError, Reader};

pub mod op {
    pub const STORE_HINT: u8 = 0x38;
    pub const READ_HINT: u8 = 0x39;
    pub const REPLAY_CREDITS: u8 = 0x3A;
    pub const REPLAY: u8 = 0x3B;

    pub const HINT_STORED: u8 = 0xB8;
    pub const HINT_STATE: u8 = 0xB9;
    pub const CREDITS: u8 = 0xBA;
    pub const REPLAYED: u8 = 0xBB;
}

/// Longest node id in a hint: node ids are 1 to 64 characters (the server's config refuses
/// longer ones), and a hint store keys its rows by a one-byte length (255 at most).
pub const MAX_NODE_ID_LEN: usize = 64;

/// Most entries in one replay batch: bounds the target's work per request and the holder's
/// memory (Riak hands off at most 500 objects per batch).
pub const MAX_REPLAY_BATCH_KEYS: usize = 256;

/// Bytes of states a holder puts in one replay batch before starting the next (a single
/// larger state still goes alone): 1 MiB, Riak's handoff batch size.
pub const REPLAY_BATCH_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoffRequest {
    /// Keep `state` (an encoded key state) for `target`, a down primary of `key`, merged into
    /// any hint already held for (target, key); within `timeout_ms`.
    StoreHint {
        target: String,
        key: Bytes,
        state: Bytes,
        timeout_ms: u32,
    },
    /// The receiver's hint for (target, key), for a sloppy read (an empty state if none).
    ReadHint {
        target: String,
        key: Bytes,
        timeout_ms: u32,
    },
    /// A holder asks the receiver (the hints' target) for room to replay into it.
    ReplayCredits { want_keys: u32, want_bytes: u64 },
    /// Hinted states for the receiver's own replicas: merge each (never overwrite).
    Replay { entries: Vec<(Bytes, Bytes)> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoffResponse {
    HintStored,
    /// An encoded key state (empty when no hint is held).
    HintState(Bytes),
    /// What the holder may send now (`keys` = 0: nothing; ask again after `retry_after_ms`).
    Credits {
        keys: u32,
        bytes: u64,
        retry_after_ms: u32,
    },
    /// Per entry of the batch, in order: merged (true) or not (false: keep the hint).
    Replayed(Vec<bool>),
}

impl Family for HandoffRequest {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            HandoffRequest::StoreHint {
                target,
                key,
                state,
                timeout_ms,
            } => {
                put_bytes(b, target.as_bytes());
                put_bytes(b, key);
                put_bytes(b, state);
                b.put_u32(*timeout_ms);
                op::STORE_HINT
            }
            HandoffRequest::ReadHint {
                target,
                key,
                timeout_ms,
            } => {
                put_bytes(b, target.as_bytes());
                put_bytes(b, key);
                b.put_u32(*timeout_ms);
                op::READ_HINT
            }
            HandoffRequest::ReplayCredits {
                want_keys,
                want_bytes,
            } => {
                b.put_u32(*want_keys);
                b.put_u64(*want_bytes);
                op::REPLAY_CREDITS
            }
            HandoffRequest::Replay { entries } => {
                put_count(b, entries.len());
                for (key, state) in entries {
                    put_bytes(b, key);
                    put_bytes(b, state);
                }
                op::REPLAY
            }
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::STORE_HINT => HandoffRequest::StoreHint {
                target: r.text("target", MAX_NODE_ID_LEN)?,
                key: r.bytes("key", MAX_KEY_LEN)?,
                state: r.bytes("state", MAX_STATE_ENCODED_LEN)?,
                timeout_ms: r.u32("timeout_ms")?,
            },
            op::READ_HINT => HandoffRequest::ReadHint {
                target: r.text("target", MAX_NODE_ID_LEN)?,
                key: r.bytes("key", MAX_KEY_LEN)?,
                timeout_ms: r.u32("timeout_ms")?,
            },
            op::REPLAY_CREDITS => HandoffRequest::ReplayCredits {
                want_keys: r.u32("want_keys")?,
                want_bytes: r.u64("want_bytes")?,
            },
            op::REPLAY => {
                let n = r.count("entries", MAX_REPLAY_BATCH_KEYS, 8)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let key = r.bytes("key", MAX_KEY_LEN)?;
                    let state = r.bytes("state", MAX_STATE_ENCODED_LEN)?;
                    entries.push((key, state));
                }
                HandoffRequest::Replay { entries }
            }
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            HandoffRequest::StoreHint {
                target, key, state, ..
            } => target.len() + key.len() + state.len(),
            HandoffRequest::ReadHint { target, key, .. } => target.len() + key.len(),
            HandoffRequest::ReplayCredits { .. } => 0,
            HandoffRequest::Replay { entries } => entries
                .iter()
                .map(|(k, s)| 8 + k.len() + s.len())
                .sum::<usize>()
                .min(MAX_PEER_BODY_LEN),
        }
    }
}

impl Family for HandoffResponse {
    fn encode(&self, b: &mut BytesMut) -> u8 {
        match self {
            HandoffResponse::HintStored => op::HINT_STORED,
            HandoffResponse::HintState(s) => {
                put_bytes(b, s);
                op::HINT_STATE
            }
            HandoffResponse::Credits {
                keys,
                bytes,
                retry_after_ms,
            } => {
                b.put_u32(*keys);
                b.put_u64(*bytes);
                b.put_u32(*retry_after_ms);
                op::CREDITS
            }
            HandoffResponse::Replayed(merged) => {
                put_count(b, merged.len());
                for m in merged {
                    b.put_u8(*m as u8);
                }
                op::REPLAYED
            }
        }
    }

    fn decode(opcode: u8, r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match opcode {
            op::HINT_STORED => HandoffResponse::HintStored,
            op::HINT_STATE => HandoffResponse::HintState(r.bytes("state", MAX_STATE_ENCODED_LEN)?),
            op::CREDITS => HandoffResponse::Credits {
                keys: r.u32("keys")?,
                bytes: r.u64("bytes")?,
                retry_after_ms: r.u32("retry_after_ms")?,
            },
            op::REPLAYED => HandoffResponse::Replayed(r.bools("merged", MAX_REPLAY_BATCH_KEYS)?),
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    fn payload_len(&self) -> usize {
        match self {
            HandoffResponse::HintState(s) => s.len(),
            HandoffResponse::Replayed(m) => m.len(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerRequest;

    /// Found in review: a 256-byte target was accepted on the wire, and the hint store, which
    /// keys a target's rows by a one-byte length, cut it to 255 bytes: a hint that no target
    /// would ever be replayed (in a debug build, a panic). Node ids are at most 64 characters.
    #[test]
    fn a_hint_target_longer_than_a_node_id_does_not_decode() {
        let store = |target: String| {
            PeerRequest::Handoff(HandoffRequest::StoreHint {
                target,
                key: Bytes::from_static(b"k"),
                state: Bytes::from_static(b"s"),
                timeout_ms: 100,
            })
            .to_frame(1)
        };
        let ok = store("n".repeat(MAX_NODE_ID_LEN));
        assert!(PeerRequest::decode(ok.opcode, ok.body).is_ok());
        for len in [MAX_NODE_ID_LEN + 1, 256] {
            let long = store("n".repeat(len));
            assert!(
                matches!(
                    PeerRequest::decode(long.opcode, long.body),
                    Err(DecodeError::TooLong {
                        field: "target",
                        ..
                    })
                ),
                "{len} bytes"
            );
        }
    }
}
