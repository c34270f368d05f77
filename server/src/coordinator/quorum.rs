//! Quorum state machines for reads and writes. Sans-IO: the coordinator feeds them replies, failures
//! and the deadline; they say when the request is decided and how. No sockets, clocks or disks.
//!
//! - A write is decided `Ok` at W acks (the coordinator's own included), `Unavailable` as soon
//!   as too many targets failed for W to be reachable, `Timeout{acks, needed}` at the deadline.
//! - A read is decided `Ok(merged)` at R replies, merging the replicas' states with `sync`;
//!   replies that arrive later keep being merged, and every replica whose state differs from
//!   the final merge is a read-repair target.
//! - Sloppy quorums: each target is a *slot* for one primary of the key. A slot is answered by
//!   the primary itself, or by a fallback holding a hint for it; both count toward W (or R),
//!   only the first toward PW (or PR). A request that needs more primary answers than can
//!   still come fails `Unavailable` at once.

use std::collections::BTreeSet;

use crate::ring::NodeId;
use crate::version::KeyState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuorumError {
    /// Too few targets can still answer: `alive` of `needed`.
    Unavailable { alive: usize, needed: usize },
    /// The deadline passed with `acks` of `needed`.
    Timeout { acks: usize, needed: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<T> {
    Pending,
    Ok(T),
    Failed(QuorumError),
}

/// Counts acks from distinct targets toward `needed`, and primaries' acks toward
/// `needed_primaries`.
#[derive(Debug, Clone)]
pub struct WriteQuorum {
    targets: usize,
    needed: usize,
    acks: BTreeSet<NodeId>,
    failed: BTreeSet<NodeId>,
    decided: bool,
    needed_primaries: usize,
    primary_acks: usize,
    /// Slots that can no longer bring a primary's ack (failed, or answered by a fallback).
    primaries_lost: usize,
}

impl WriteQuorum {
    /// `targets` slots, every one a primary's.
    pub fn new(targets: usize, needed: usize) -> Self {
        WriteQuorum {
            targets,
            needed,
            acks: BTreeSet::new(),
            failed: BTreeSet::new(),
            decided: false,
            needed_primaries: 0,
            primary_acks: 0,
            primaries_lost: 0,
        }
    }

    /// Also requires `needed_primaries` of the acks to come from primaries (PW/PR).
    pub fn with_primaries(mut self, needed_primaries: usize) -> Self {
        self.needed_primaries = needed_primaries;
        self
    }

    pub fn acks(&self) -> usize {
        self.acks.len()
    }

    pub fn primary_acks(&self) -> usize {
        self.primary_acks
    }

    /// Acks from fallbacks standing in for a primary.
    pub fn fallback_acks(&self) -> usize {
        self.acks.len() - self.primary_acks
    }

    pub fn needed(&self) -> usize {
        self.needed
    }

    /// Whether the request was decided (later events only update the counts).
    pub fn is_decided(&self) -> bool {
        self.decided
    }

    /// Acks still needed for success (0 once decided): `needed` and `needed_primaries` minus
    /// what came, the larger of the two (the success test of `decide`, counted down).
    pub fn wanted(&self) -> usize {
        if self.decided {
            return 0;
        }
        let all = self.needed.saturating_sub(self.acks.len());
        let primaries = self.needed_primaries.saturating_sub(self.primary_acks);
        all.max(primaries)
    }

    /// The decision after this event; `Pending` again once decided (each request is answered
    /// once; later events only update the counts).
    fn decide(&mut self) -> Decision<()> {
        if self.decided {
            return Decision::Pending;
        }
        if self.acks.len() >= self.needed && self.primary_acks >= self.needed_primaries {
            self.decided = true;
            return Decision::Ok(());
        }
        // Saturating: a caller may report more distinct failures than it declared targets.
        let reachable = self.targets.saturating_sub(self.failed.len());
        if reachable < self.needed {
            self.decided = true;
            return Decision::Failed(QuorumError::Unavailable {
                alive: reachable,
                needed: self.needed,
            });
        }
        let primaries_left = self.targets.saturating_sub(self.primaries_lost);
        if primaries_left < self.needed_primaries {
            self.decided = true;
            return Decision::Failed(QuorumError::Unavailable {
                alive: primaries_left,
                needed: self.needed_primaries,
            });
        }
        Decision::Pending
    }

    /// A primary acknowledged (its slot is answered).
    pub fn on_ack(&mut self, node: NodeId) -> Decision<()> {
        if !self.failed.contains(&node) && self.acks.insert(node) {
            self.primary_acks += 1;
        }
        self.decide()
    }

    /// A fallback acknowledged for a primary's slot: counts toward W, not PW.
    pub fn on_fallback_ack(&mut self, node: NodeId) -> Decision<()> {
        if !self.failed.contains(&node) && self.acks.insert(node) {
            self.primaries_lost += 1;
        }
        self.decide()
    }

    /// A primary acknowledged (`ok`) or its slot failed.
    pub fn on_outcome(&mut self, node: NodeId, ok: bool) -> Decision<()> {
        if ok {
            self.on_ack(node)
        } else {
            self.on_failure(node)
        }
    }

    /// A slot failed (its primary, and its fallback if one was tried).
    pub fn on_failure(&mut self, node: NodeId) -> Decision<()> {
        if !self.acks.contains(&node) && self.failed.insert(node) {
            self.primaries_lost += 1;
        }
        self.decide()
    }

    /// The deadline passed: decided `Timeout` unless already decided.
    pub fn on_deadline(&mut self) -> Decision<()> {
        if self.decided {
            return Decision::Pending;
        }
        self.decided = true;
        Decision::Failed(QuorumError::Timeout {
            acks: self.acks.len(),
            needed: self.needed,
        })
    }
}

/// Collects replica states toward `needed` replies and merges them.
#[derive(Debug, Clone)]
pub struct ReadQuorum {
    counts: WriteQuorum,
    /// Primaries' replies (the read-repair candidates).
    replies: Vec<(NodeId, KeyState)>,
    /// Fallbacks that answered with their hint: merged and counted, never repaired (they are
    /// not replicas of the key).
    fallbacks: BTreeSet<NodeId>,
    merged: KeyState,
}

impl ReadQuorum {
    pub fn new(targets: usize, needed: usize) -> Self {
        ReadQuorum {
            counts: WriteQuorum::new(targets, needed),
            replies: Vec::new(),
            fallbacks: BTreeSet::new(),
            merged: KeyState::new(),
        }
    }

    /// Also requires `needed_primaries` replies from primaries (PR).
    pub fn with_primaries(mut self, needed_primaries: usize) -> Self {
        self.counts = self.counts.with_primaries(needed_primaries);
        self
    }

    fn answered(&self, node: &NodeId) -> bool {
        self.fallbacks.contains(node) || self.replies.iter().any(|(n, _)| n == node)
    }

    fn decision(&self, d: Decision<()>) -> Decision<KeyState> {
        match d {
            Decision::Ok(()) => Decision::Ok(self.merged.clone()),
            Decision::Failed(e) => Decision::Failed(e),
            Decision::Pending => Decision::Pending,
        }
    }

    pub fn on_reply(&mut self, node: NodeId, state: KeyState) -> Decision<KeyState> {
        if self.answered(&node) {
            return Decision::Pending;
        }
        self.merged = self.merged.sync(&state);
        self.replies.push((node.clone(), state));
        let d = self.counts.on_ack(node);
        self.decision(d)
    }

    /// A fallback's hint for a down primary (empty when it holds none): counts toward R.
    pub fn on_fallback_reply(&mut self, node: NodeId, state: KeyState) -> Decision<KeyState> {
        if self.answered(&node) {
            return Decision::Pending;
        }
        self.merged = self.merged.sync(&state);
        self.fallbacks.insert(node.clone());
        let d = self.counts.on_fallback_ack(node);
        self.decision(d)
    }

    pub fn on_failure(&mut self, node: NodeId) -> Decision<KeyState> {
        match self.counts.on_failure(node) {
            Decision::Failed(e) => Decision::Failed(e),
            _ => Decision::Pending,
        }
    }

    pub fn on_deadline(&mut self) -> Decision<KeyState> {
        match self.counts.on_deadline() {
            Decision::Failed(e) => Decision::Failed(e),
            _ => Decision::Pending,
        }
    }

    pub fn needed(&self) -> usize {
        self.counts.needed()
    }

    /// Replies still needed for a decision (0 once decided): R (and PR) minus what came.
    pub fn wanted(&self) -> usize {
        self.counts.wanted()
    }

    /// The merge of every reply received so far.
    pub fn merged(&self) -> &KeyState {
        &self.merged
    }

    /// Whether some replica answered with something other than the merged state: the same
    /// test as `repair_targets` without building the list (asked on every read).
    pub fn needs_repair(&self) -> bool {
        self.replies.iter().any(|(_, s)| *s != self.merged)
    }

    /// Replicas that answered with something other than the merged state (stale or missing
    /// versions): they should receive the merged state.
    pub fn repair_targets(&self) -> Vec<NodeId> {
        self.replies
            .iter()
            .filter(|(_, s)| *s != self.merged)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Dot, VersionVector};
    use bytes::Bytes;

    fn id(s: &str) -> NodeId {
        s.into()
    }

    fn state(actor: u64, counter: u64, v: &str) -> KeyState {
        KeyState::new().update(
            &VersionVector::new(),
            Dot { actor, counter },
            0,
            Some(Bytes::from(v.to_string())),
        )
    }

    #[test]
    fn write_succeeds_at_w_acks_once() {
        let mut q = WriteQuorum::new(3, 2);
        assert_eq!(q.on_ack(id("a")), Decision::Pending);
        assert_eq!(
            q.on_ack(id("a")),
            Decision::Pending,
            "duplicate acks count once"
        );
        assert_eq!(q.on_ack(id("b")), Decision::Ok(()));
        assert_eq!(q.on_ack(id("c")), Decision::Pending, "decided only once");
        assert_eq!(q.acks(), 3, "late acks are still counted");
    }

    #[test]
    fn write_fails_fast_when_w_becomes_unreachable() {
        let mut q = WriteQuorum::new(3, 3);
        assert_eq!(q.on_ack(id("a")), Decision::Pending);
        assert_eq!(
            q.on_failure(id("b")),
            Decision::Failed(QuorumError::Unavailable {
                alive: 2,
                needed: 3
            })
        );
        let mut q = WriteQuorum::new(3, 2);
        assert_eq!(q.on_failure(id("b")), Decision::Pending);
        assert_eq!(q.on_ack(id("a")), Decision::Pending);
        assert_eq!(q.on_ack(id("c")), Decision::Ok(()));
    }

    #[test]
    fn write_times_out_with_the_ack_count() {
        let mut q = WriteQuorum::new(3, 3);
        q.on_ack(id("a"));
        q.on_ack(id("b"));
        assert_eq!(
            q.on_deadline(),
            Decision::Failed(QuorumError::Timeout { acks: 2, needed: 3 })
        );
        assert_eq!(q.on_ack(id("c")), Decision::Pending);
    }

    #[test]
    fn read_merges_and_finds_repair_targets() {
        let s1 = state(1, 1, "x");
        let s2 = s1.update(
            s1.context(),
            Dot {
                actor: 2,
                counter: 1,
            },
            0,
            Some(Bytes::from_static(b"y")),
        );
        let mut q = ReadQuorum::new(3, 2);
        assert_eq!(q.on_reply(id("a"), s1.clone()), Decision::Pending);
        assert!(!q.needs_repair(), "one reply is the merge");
        assert_eq!(q.on_reply(id("b"), s2.clone()), Decision::Ok(s2.clone()));
        assert!(q.needs_repair(), "a is behind b");
        // A late, empty replica (it missed the writes).
        assert_eq!(q.on_reply(id("c"), KeyState::new()), Decision::Pending);
        assert_eq!(q.merged(), &s2);
        assert_eq!(q.repair_targets(), vec![id("a"), id("c")]);
    }

    #[test]
    fn read_of_concurrent_versions_keeps_both() {
        let mut q = ReadQuorum::new(2, 2);
        q.on_reply(id("a"), state(1, 1, "x"));
        match q.on_reply(id("b"), state(2, 1, "y")) {
            Decision::Ok(m) => assert_eq!(m.siblings().len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(q.repair_targets().len(), 2);
        assert!(q.needs_repair());
        let mut agree = ReadQuorum::new(2, 2);
        agree.on_reply(id("a"), state(1, 1, "x"));
        agree.on_reply(id("b"), state(1, 1, "x"));
        assert!(!agree.needs_repair());
        assert!(agree.repair_targets().is_empty());
    }

    #[test]
    fn fallback_acks_count_toward_w_but_not_toward_pw() {
        // Three slots, W=3, PW=2: two primaries and one fallback make it.
        let mut q = WriteQuorum::new(3, 3).with_primaries(2);
        assert_eq!(q.on_ack(id("a")), Decision::Pending);
        assert_eq!(q.on_fallback_ack(id("d")), Decision::Pending);
        assert_eq!(q.on_ack(id("b")), Decision::Ok(()));
        assert_eq!((q.primary_acks(), q.fallback_acks()), (2, 1));

        // PW=3: a slot answered by a fallback makes it unreachable at once.
        let mut q = WriteQuorum::new(3, 2).with_primaries(3);
        assert_eq!(q.on_ack(id("a")), Decision::Pending);
        assert_eq!(
            q.on_fallback_ack(id("d")),
            Decision::Failed(QuorumError::Unavailable {
                alive: 2,
                needed: 3
            })
        );

        // W is met by fallbacks alone when PW=0 (the sloppy default).
        let mut q = WriteQuorum::new(3, 2);
        assert_eq!(q.on_fallback_ack(id("d")), Decision::Pending);
        assert_eq!(q.on_fallback_ack(id("e")), Decision::Ok(()));
        assert_eq!((q.primary_acks(), q.fallback_acks()), (0, 2));

        // A failed slot loses a primary too; a duplicate event counts once.
        let mut q = WriteQuorum::new(3, 1).with_primaries(2);
        assert_eq!(q.on_failure(id("a")), Decision::Pending);
        assert_eq!(q.on_failure(id("a")), Decision::Pending);
        assert_eq!(
            q.on_fallback_ack(id("e")),
            Decision::Failed(QuorumError::Unavailable {
                alive: 1,
                needed: 2
            })
        );
    }

    #[test]
    fn a_fallback_read_counts_toward_r_but_is_never_repaired() {
        let mut q = ReadQuorum::new(3, 2).with_primaries(1);
        assert_eq!(
            q.on_fallback_reply(id("d"), state(1, 1, "x")),
            Decision::Pending
        );
        assert_eq!(
            q.on_fallback_reply(id("d"), state(1, 1, "x")),
            Decision::Pending
        );
        let d = q.on_reply(id("a"), KeyState::new());
        assert_eq!(
            d,
            Decision::Ok(state(1, 1, "x")),
            "the hint's version is read"
        );
        assert_eq!(
            q.repair_targets(),
            vec![id("a")],
            "the primary is repaired, not the fallback"
        );
        // PR=2 with one slot left for a primary: unavailable as soon as that is known.
        let mut q = ReadQuorum::new(2, 1).with_primaries(2);
        assert!(matches!(
            q.on_fallback_reply(id("d"), KeyState::new()),
            Decision::Failed(QuorumError::Unavailable {
                alive: 1,
                needed: 2
            })
        ));
    }

    #[test]
    fn read_unavailable_and_timeout() {
        let mut q = ReadQuorum::new(3, 3);
        assert_eq!(
            q.on_failure(id("a")),
            Decision::Failed(QuorumError::Unavailable {
                alive: 2,
                needed: 3
            })
        );
        let mut q = ReadQuorum::new(3, 2);
        q.on_reply(id("a"), KeyState::new());
        assert_eq!(
            q.on_deadline(),
            Decision::Failed(QuorumError::Timeout { acks: 1, needed: 2 })
        );
    }
}
