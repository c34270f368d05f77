//! Dotted version vector sets (DVV), in the explicit-dot form of Riak 2.x.
//!
//! A key's state is a version vector plus its siblings; each sibling carries the dot of the
//! write that created it. A write with a context replaces exactly the siblings whose dots the
//! context covers; everything else survives. Pure and deterministic: no clocks, no I/O. See
//! `shared/notes/version-vectors.md` for the model and `docs/architecture.md` for the invariants:
//!
//! - I1 every sibling's dot is covered by the state's VV;
//! - I2 one dot names at most one value cluster-wide (only the owning actor mints its dots, from
//!   a counter that never repeats);
//! - I3 if `VV[a] = c` the state knows every event of `a` on this key up to `c`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use ringkv_protocol::limits::{
    MAX_CONTEXT_ENTRIES, MAX_SIBLINGLESS_ENTRIES, MAX_STATE_LEN, MAX_STATE_SIBLINGS,
};
use ringkv_protocol::wire::{self, put_varint};
use ringkv_protocol::CausalContext;
use xxhash_rust::xxh3::xxh3_64;

/// An actor id: `node tag (24 bits) ‖ incarnation stamp (40 bits)`.
///
/// The tag is the top 24 bits of `xxh3_64(node id)`, so every incarnation of a node carries
/// the same tag. The stamp is strictly greater for each new incarnation of the node
/// (`max(previous + 1, ms since ACTOR_EPOCH)`), also after the data dir was wiped, because it
/// follows the clock. So within one version vector, an entry whose node has an entry with a
/// larger stamp belongs to a **retired** actor: one that will never mint again.
pub type Actor = u64;

/// Bits of an actor id that hold the incarnation stamp.
pub const ACTOR_STAMP_BITS: u32 = 40;
const STAMP_MASK: u64 = (1 << ACTOR_STAMP_BITS) - 1;
/// Origin of incarnation stamps (2024-01-01T00:00:00Z in ms): 40 bits of ms last until 2058.
pub const ACTOR_EPOCH_MS: u64 = 1_704_067_200_000;

/// The node tag of a node id (the high bits of each of its actor ids).
pub fn node_tag(node_id: &str) -> u64 {
    xxh3_64(node_id.as_bytes()) >> ACTOR_STAMP_BITS
}

/// The actor id of a node's incarnation with `stamp`.
pub fn actor_id(node_id: &str, stamp: u64) -> Actor {
    (node_tag(node_id) << ACTOR_STAMP_BITS) | (stamp & STAMP_MASK)
}

pub fn actor_tag(actor: Actor) -> u64 {
    actor >> ACTOR_STAMP_BITS
}

pub fn actor_stamp(actor: Actor) -> u64 {
    actor & STAMP_MASK
}

/// The identity of one write: `(actor, counter)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// Map actor → highest counter seen. Absent actors are 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector(BTreeMap<Actor, u64>);

impl VersionVector {
    pub fn new() -> Self {
        VersionVector(BTreeMap::new())
    }

    pub fn get(&self, actor: Actor) -> u64 {
        self.0.get(&actor).copied().unwrap_or(0)
    }

    pub fn covers(&self, dot: Dot) -> bool {
        self.get(dot.actor) >= dot.counter
    }

    /// Pointwise max.
    pub fn merge(&mut self, other: &VersionVector) {
        for (&a, &c) in &other.0 {
            let e = self.0.entry(a).or_insert(0);
            *e = (*e).max(c);
        }
    }

    /// Raises `actor` to at least `counter`.
    pub fn bump(&mut self, dot: Dot) {
        let e = self.0.entry(dot.actor).or_insert(0);
        *e = (*e).max(dot.counter);
    }

    /// `self >= other` pointwise.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(&a, &c)| self.get(a) >= c)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Actor, u64)> + '_ {
        self.0.iter().map(|(&a, &c)| (a, c))
    }

    pub fn to_context(&self) -> CausalContext {
        CausalContext {
            entries: self.iter().collect(),
        }
    }

    fn remove(&mut self, actor: Actor) {
        self.0.remove(&actor);
    }

    fn insert(&mut self, actor: Actor, counter: u64) {
        if counter > 0 {
            self.0.insert(actor, counter);
        }
    }

    /// The entries whose node has an entry with a newer incarnation stamp in this vector.
    fn retired(&self) -> BTreeSet<Actor> {
        let mut newest: HashMap<u64, u64> = HashMap::new();
        for &a in self.0.keys() {
            let e = newest.entry(actor_tag(a)).or_insert(0);
            *e = (*e).max(actor_stamp(a));
        }
        self.0
            .keys()
            .copied()
            .filter(|&a| actor_stamp(a) < newest[&actor_tag(a)])
            .collect()
    }

    pub fn from_context(ctx: &CausalContext) -> Self {
        VersionVector(ctx.entries.iter().copied().collect())
    }
}

/// One version of a key. `value == None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    pub dot: Dot,
    /// Wall-clock ms at the coordinating replica. Informational (and for LWW resolution): it
    /// never decides causality.
    pub timestamp_ms: u64,
    pub value: Option<Bytes>,
}

/// What a client is shown of a state: the siblings one reply carries and the context that
/// covers exactly those (see `KeyState::client_view`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView<'a> {
    pub shown: &'a [Sibling],
    pub context: VersionVector,
    /// Siblings not shown (the state exceeds what one reply carries).
    pub hidden: usize,
}

/// The whole replicated state of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyState {
    vv: VersionVector,
    /// Ascending by dot, dots unique.
    siblings: Vec<Sibling>,
}

impl KeyState {
    pub fn new() -> Self {
        KeyState::default()
    }

    pub fn is_empty(&self) -> bool {
        self.vv.is_empty() && self.siblings.is_empty()
    }

    /// The causal context a reader receives (`join` in dvvset).
    pub fn context(&self) -> &VersionVector {
        &self.vv
    }

    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// True when at least one sibling is a value (not a tombstone).
    pub fn has_live_value(&self) -> bool {
        self.siblings.iter().any(|s| s.value.is_some())
    }

    /// True for a deleted key: a state held, with no value among its siblings (tombstones
    /// only). Tombstone GC purges such states once they are causally stable.
    pub fn is_tombstone(&self) -> bool {
        !self.is_empty() && !self.has_live_value()
    }

    /// The newest sibling's timestamp (wall-clock ms at its coordinator), 0 without siblings.
    pub fn newest_ms(&self) -> u64 {
        self.siblings
            .iter()
            .map(|s| s.timestamp_ms)
            .max()
            .unwrap_or(0)
    }

    /// Total bytes of sibling values (for the object size limit).
    pub fn value_bytes(&self) -> usize {
        self.siblings
            .iter()
            .map(|s| s.value.as_ref().map_or(0, |v| v.len()))
            .sum()
    }

    /// The same state with every value copied into an allocation of its own, so a long-lived
    /// copy (the writer's state cache) does not keep a whole network read buffer alive.
    pub fn detached(mut self) -> KeyState {
        for sibling in &mut self.siblings {
            if let Some(v) = &mut sibling.value {
                *v = Bytes::copy_from_slice(v);
            }
        }
        self
    }

    /// A client write on a replica (`update/3` in dvvset): drop the siblings whose dots `ctx`
    /// covers, raise the VV to include `ctx`, then add `value` under `dot`.
    ///
    /// `dot` must be fresh: its counter greater than anything this state or `ctx` has seen of
    /// that actor. The caller (the storage writer) guarantees it with a counter that never
    /// repeats and detects violations (amnesia) before calling; see `needs_fresh_counter`.
    pub fn update(
        &self,
        ctx: &VersionVector,
        dot: Dot,
        timestamp_ms: u64,
        value: Option<Bytes>,
    ) -> KeyState {
        debug_assert!(
            dot.counter > self.vv.get(dot.actor) && dot.counter > ctx.get(dot.actor),
            "dot {dot:?} is not fresh for this state/context"
        );
        let mut siblings: Vec<Sibling> = self
            .siblings
            .iter()
            .filter(|s| !ctx.covers(s.dot))
            .cloned()
            .collect();
        let mut vv = self.vv.clone();
        vv.merge(ctx);
        vv.bump(dot);
        siblings.push(Sibling {
            dot,
            timestamp_ms,
            value,
        });
        siblings.sort_by_key(|s| s.dot);
        let out = KeyState { vv, siblings };
        debug_assert!(out.check_invariants().is_ok());
        out
    }

    /// The lowest counter `actor` may use for its next dot on this key, given the writer's
    /// context: anything at or below it would reuse or be covered by a known event.
    pub fn min_fresh_counter(&self, ctx: &VersionVector, actor: Actor) -> u64 {
        self.vv.get(actor).max(ctx.get(actor)) + 1
    }

    /// Merge of two replica states (`sync` in dvvset). Commutative, associative, idempotent.
    /// A sibling survives iff the other side holds the same dot or has not seen it.
    pub fn sync(&self, other: &KeyState) -> KeyState {
        let mut vv = self.vv.clone();
        vv.merge(&other.vv);
        let mut siblings = Vec::with_capacity(self.siblings.len() + other.siblings.len());
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.siblings, &other.siblings);
        while i < a.len() || j < b.len() {
            let take_a = j >= b.len() || (i < a.len() && a[i].dot <= b[j].dot);
            if take_a && j < b.len() && i < a.len() && a[i].dot == b[j].dot {
                // Same dot on both sides: the same write (I2).
                siblings.push(a[i].clone());
                i += 1;
                j += 1;
            } else if take_a {
                if !other.vv.covers(a[i].dot) {
                    siblings.push(a[i].clone());
                }
                i += 1;
            } else {
                if !self.vv.covers(b[j].dot) {
                    siblings.push(b[j].clone());
                }
                j += 1;
            }
        }
        KeyState { vv, siblings }
    }

    /// Prunes version-vector entries of retired actors (older incarnations of a node whose
    /// newer incarnation is in the same vector) that hold no sibling, oldest first, once more
    /// than `MAX_SIBLINGLESS_ENTRIES` entries hold no sibling. Returns how many were dropped.
    ///
    /// Why this never drops a concurrent write: an entry only widens what the state *covers*.
    /// Removing one makes the state cover less, so a merge keeps at least the siblings it kept
    /// before, and a write with a context built from it drops at most what it dropped before;
    /// entries of actors that hold a sibling are never removed (invariant I1). Its only
    /// possible effect is that a stale copy of a write the removed entry had superseded, still
    /// held by a replica that missed the superseding write, reappears as a sibling when merged
    /// (visible, resolved by the next write with context). A retired actor never mints again,
    /// so no dot of it can be minted "under" a missing entry, and the local node's own live
    /// actor is never retired. The rule depends only on the state, so replicas prune alike.
    pub fn prune_retired(&mut self) -> usize {
        self.prune_retired_above(MAX_SIBLINGLESS_ENTRIES)
    }

    /// `prune_retired` with another threshold (tests exercise pruning on small vectors).
    pub(crate) fn prune_retired_above(&mut self, max_siblingless: usize) -> usize {
        if self.vv.len() <= max_siblingless {
            // The common case (a few entries): nothing to count, nothing to allocate.
            return 0;
        }
        let with_siblings: BTreeSet<Actor> = self.siblings.iter().map(|s| s.dot.actor).collect();
        let siblingless = self
            .vv
            .iter()
            .filter(|(a, _)| !with_siblings.contains(a))
            .count();
        if siblingless <= max_siblingless {
            return 0;
        }
        let mut retired: Vec<Actor> = self
            .vv
            .retired()
            .into_iter()
            .filter(|a| !with_siblings.contains(a))
            .collect();
        retired.sort_by_key(|&a| (actor_stamp(a), a));
        let drop = (siblingless - max_siblingless).min(retired.len());
        for &a in &retired[..drop] {
            self.vv.remove(a);
        }
        debug_assert!(self.check_invariants().is_ok());
        drop
    }

    /// What one read reply shows of this state: the longest prefix of the siblings (in dot
    /// order) within `MAX_STATE_SIBLINGS` and `MAX_STATE_LEN`, and a context of at most
    /// `MAX_CONTEXT_ENTRIES` entries that covers exactly the shown siblings (plus writes they
    /// superseded). A write with that context replaces what was shown and keeps the rest.
    ///
    /// - an actor with a shown sibling and a hidden one gets its largest shown counter (in dot
    ///   order, its shown counters are all below its hidden ones);
    /// - an actor with only hidden siblings is left out (it covers none of them);
    /// - an actor with shown siblings only gets its full entry;
    /// - actors without siblings fill the remaining room, live ones and newer stamps first;
    ///   leaving one out only makes the context cover fewer superseded writes, which changes
    ///   nothing on the replica that applies the write (its own vector still covers them).
    pub fn client_view(&self) -> ClientView<'_> {
        let mut bytes = 0usize;
        let mut n = 0usize;
        for s in &self.siblings {
            let len = s.value.as_ref().map_or(0, |v| v.len());
            if n == MAX_STATE_SIBLINGS || bytes + len > MAX_STATE_LEN {
                break;
            }
            bytes += len;
            n += 1;
        }
        let (shown, hidden) = self.siblings.split_at(n);
        let hidden_actors: BTreeSet<Actor> = hidden.iter().map(|s| s.dot.actor).collect();
        let mut shown_max: BTreeMap<Actor, u64> = BTreeMap::new();
        for s in shown {
            let e = shown_max.entry(s.dot.actor).or_insert(0);
            *e = (*e).max(s.dot.counter);
        }
        let mut context = VersionVector::new();
        for (&a, &max) in &shown_max {
            let c = if hidden_actors.contains(&a) {
                max
            } else {
                self.vv.get(a)
            };
            context.insert(a, c);
        }
        let retired = self.vv.retired();
        let mut rest: Vec<(Actor, u64)> = self
            .vv
            .iter()
            .filter(|(a, _)| !shown_max.contains_key(a) && !hidden_actors.contains(a))
            .collect();
        rest.sort_by_key(|&(a, _)| (retired.contains(&a), std::cmp::Reverse(actor_stamp(a)), a));
        let room = MAX_CONTEXT_ENTRIES.saturating_sub(context.len());
        for (a, c) in rest.into_iter().take(room) {
            context.insert(a, c);
        }
        debug_assert!(context.len() <= MAX_CONTEXT_ENTRIES);
        ClientView {
            shown,
            context,
            hidden: hidden.len(),
        }
    }

    /// `self.vv < other.vv` strictly: self is obsolete.
    pub fn less(&self, other: &KeyState) -> bool {
        other.vv.descends(&self.vv) && self.vv != other.vv
    }

    pub fn check_invariants(&self) -> Result<(), String> {
        for s in &self.siblings {
            if s.dot.counter == 0 {
                return Err(format!("sibling dot {:?} has counter 0", s.dot));
            }
            if !self.vv.covers(s.dot) {
                return Err(format!("sibling dot {:?} not covered by the VV", s.dot));
            }
        }
        if !self.siblings.windows(2).all(|w| w[0].dot < w[1].dot) {
            return Err("siblings not strictly ordered by dot".into());
        }
        Ok(())
    }

    /// Canonical bytes (actors sorted, siblings by dot), so equal states encode equal.
    ///
    /// ```text
    /// u8 format (1) | varint n | n × (actor u64 BE, counter varint)
    /// varint m | m × (actor u64 BE, counter varint, timestamp varint, kind u8 [, varint len, bytes])
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        // Upper bounds: an entry is an 8-byte actor and varints of at most 10 bytes.
        let mut out = Vec::with_capacity(
            16 + self.vv.len() * 18 + self.siblings.len() * 40 + self.value_bytes(),
        );
        out.push(STATE_FORMAT);
        put_varint(&mut out, self.vv.len() as u64);
        for (a, c) in self.vv.iter() {
            out.extend_from_slice(&a.to_be_bytes());
            put_varint(&mut out, c);
        }
        put_varint(&mut out, self.siblings.len() as u64);
        for s in &self.siblings {
            out.extend_from_slice(&s.dot.actor.to_be_bytes());
            put_varint(&mut out, s.dot.counter);
            put_varint(&mut out, s.timestamp_ms);
            match &s.value {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    put_varint(&mut out, v.len() as u64);
                    out.extend_from_slice(v);
                }
            }
        }
        out
    }

    /// Decodes stored bytes, checking the invariants: a corrupt record is an error, never a
    /// panic and never a silently wrong state.
    pub fn decode(buf: &[u8]) -> Result<KeyState, StateDecodeError> {
        let mut pos = 0usize;
        let format = *buf.first().ok_or(StateDecodeError::Truncated)?;
        if format != STATE_FORMAT {
            return Err(StateDecodeError::Format(format));
        }
        pos += 1;
        let n = get_varint(buf, &mut pos)?;
        if n > (buf.len() - pos) as u64 {
            return Err(StateDecodeError::Truncated);
        }
        let mut vv = BTreeMap::new();
        let mut last: Option<Actor> = None;
        for _ in 0..n {
            let a = get_u64(buf, &mut pos)?;
            let c = get_varint(buf, &mut pos)?;
            if last.is_some_and(|l| l >= a) || c == 0 {
                return Err(StateDecodeError::Invalid("version vector not canonical"));
            }
            last = Some(a);
            vv.insert(a, c);
        }
        let m = get_varint(buf, &mut pos)?;
        if m > (buf.len() - pos) as u64 {
            return Err(StateDecodeError::Truncated);
        }
        let mut siblings = Vec::with_capacity(m as usize);
        for _ in 0..m {
            let actor = get_u64(buf, &mut pos)?;
            let counter = get_varint(buf, &mut pos)?;
            if counter == 0 {
                // No write mints counter 0, and every vector covers it: such a sibling
                // would vanish in the next merge, so it is refused as corrupt or forged.
                return Err(StateDecodeError::Invalid("sibling with counter 0"));
            }
            let timestamp_ms = get_varint(buf, &mut pos)?;
            let kind = *buf.get(pos).ok_or(StateDecodeError::Truncated)?;
            pos += 1;
            let value = match kind {
                0 => None,
                1 => {
                    let len = get_varint(buf, &mut pos)?;
                    if len > (buf.len() - pos) as u64 {
                        return Err(StateDecodeError::Truncated);
                    }
                    let v = Bytes::copy_from_slice(&buf[pos..pos + len as usize]);
                    pos += len as usize;
                    Some(v)
                }
                _ => return Err(StateDecodeError::Invalid("sibling kind")),
            };
            siblings.push(Sibling {
                dot: Dot { actor, counter },
                timestamp_ms,
                value,
            });
        }
        if pos != buf.len() {
            return Err(StateDecodeError::Invalid("trailing bytes"));
        }
        let state = KeyState {
            vv: VersionVector(vv),
            siblings,
        };
        state
            .check_invariants()
            .map_err(|_| StateDecodeError::Invalid("sibling not covered or out of order"))?;
        Ok(state)
    }
}

const STATE_FORMAT: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateDecodeError {
    #[error("encoded key state is truncated")]
    Truncated,
    #[error("encoded key state has unknown format {0}")]
    Format(u8),
    #[error("encoded key state is invalid: {0}")]
    Invalid(&'static str),
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, StateDecodeError> {
    wire::get_varint(buf, pos).ok_or(StateDecodeError::Truncated)
}

fn get_u64(buf: &[u8], pos: &mut usize) -> Result<u64, StateDecodeError> {
    let b = buf.get(*pos..*pos + 8).ok_or(StateDecodeError::Truncated)?;
    *pos += 8;
    Ok(u64::from_be_bytes(b.try_into().expect("8-byte slice")))
}

#[cfg(test)]
mod tests;
