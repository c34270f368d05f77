//! The causal context token: the opaque bytes a read returns and a write sends back.
//!
//! ```text
//! u8      token version (1)
//! u32     key fingerprint: low 32 bits of xxh3-64(key), so a token sent with another key is refused
//! varint  entry count (<= MAX_CONTEXT_ENTRIES)
//! entries (actor u64 big-endian, counter varint), actors strictly ascending
//! u32     checksum: low 32 bits of xxh3-64 of everything before it
//! ```
//!
//! Clients never look inside; they pass the bytes back unchanged. An empty token means "no
//! context" (a blind write).

use xxhash_rust::xxh3::xxh3_64;

use crate::limits::MAX_CONTEXT_ENTRIES;
use crate::wire::put_varint;

pub const TOKEN_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CausalContext {
    /// `(actor, counter)` pairs, strictly ascending by actor; counters are > 0.
    pub entries: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("context token is truncated")]
    Truncated,
    #[error("context token version {0} is not supported (expected {TOKEN_VERSION})")]
    Version(u8),
    #[error("context token belongs to another key")]
    WrongKey,
    #[error("context token checksum mismatch (token was altered)")]
    Checksum,
    #[error("context token has {0} entries, limit {MAX_CONTEXT_ENTRIES}")]
    TooManyEntries(u64),
    #[error("context token is not canonical (actors not ascending or zero counter)")]
    NotCanonical,
    #[error("context token has trailing bytes")]
    Trailing,
}

fn fingerprint(key: &[u8]) -> u32 {
    xxh3_64(key) as u32
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, ContextError> {
    crate::wire::get_varint(buf, pos).ok_or(if *pos >= buf.len() {
        ContextError::Truncated
    } else {
        ContextError::NotCanonical
    })
}

impl CausalContext {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Encodes the token for `key`.
    pub fn encode(&self, key: &[u8]) -> Vec<u8> {
        debug_assert!(self.entries.windows(2).all(|w| w[0].0 < w[1].0));
        let mut out = Vec::with_capacity(10 + self.entries.len() * 12);
        out.push(TOKEN_VERSION);
        out.extend_from_slice(&fingerprint(key).to_be_bytes());
        put_varint(&mut out, self.entries.len() as u64);
        for &(actor, counter) in &self.entries {
            out.extend_from_slice(&actor.to_be_bytes());
            put_varint(&mut out, counter);
        }
        let sum = xxh3_64(&out) as u32;
        out.extend_from_slice(&sum.to_be_bytes());
        out
    }

    /// Decodes a token sent with `key`. An empty token is the empty context.
    pub fn decode(token: &[u8], key: &[u8]) -> Result<CausalContext, ContextError> {
        if token.is_empty() {
            return Ok(CausalContext::default());
        }
        if token.len() < 1 + 4 + 1 + 4 {
            return Err(ContextError::Truncated);
        }
        if token[0] != TOKEN_VERSION {
            return Err(ContextError::Version(token[0]));
        }
        let (payload, sum) = token.split_at(token.len() - 4);
        if (xxh3_64(payload) as u32).to_be_bytes() != sum {
            return Err(ContextError::Checksum);
        }
        let fp = u32::from_be_bytes(payload[1..5].try_into().expect("length checked above"));
        if fp != fingerprint(key) {
            return Err(ContextError::WrongKey);
        }
        let mut pos = 5;
        let n = get_varint(payload, &mut pos)?;
        if n > MAX_CONTEXT_ENTRIES as u64 {
            return Err(ContextError::TooManyEntries(n));
        }
        let mut entries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let actor_bytes = payload.get(pos..pos + 8).ok_or(ContextError::Truncated)?;
            let actor = u64::from_be_bytes(actor_bytes.try_into().expect("8-byte slice"));
            pos += 8;
            let counter = get_varint(payload, &mut pos)?;
            if counter == 0 || entries.last().is_some_and(|&(a, _)| a >= actor) {
                return Err(ContextError::NotCanonical);
            }
            entries.push((actor, counter));
        }
        if pos != payload.len() {
            return Err(ContextError::Trailing);
        }
        Ok(CausalContext { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_key_binding() {
        let ctx = CausalContext {
            entries: vec![(1, 5), (7, 300), (u64::MAX, u64::MAX)],
        };
        let tok = ctx.encode(b"k1");
        assert_eq!(CausalContext::decode(&tok, b"k1").unwrap(), ctx);
        assert_eq!(
            CausalContext::decode(&tok, b"k2"),
            Err(ContextError::WrongKey)
        );
        let mut bad = tok.clone();
        bad[7] ^= 1;
        assert_eq!(
            CausalContext::decode(&bad, b"k1"),
            Err(ContextError::Checksum)
        );
        assert_eq!(
            CausalContext::decode(&[], b"k1").unwrap(),
            CausalContext::default()
        );
    }

    proptest! {
        #[test]
        fn arbitrary_tokens_never_panic(tok in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = CausalContext::decode(&tok, b"key");
        }

        #[test]
        fn round_trips(mut entries in proptest::collection::btree_map(any::<u64>(), 1u64.., 0..20)) {
            let ctx = CausalContext { entries: std::mem::take(&mut entries).into_iter().collect() };
            let tok = ctx.encode(b"some key");
            prop_assert_eq!(CausalContext::decode(&tok, b"some key").unwrap(), ctx);
        }
    }
}
