//! The cluster layout: which nodes own the ring, changed only by committed plans (sans-IO).
//!
//! A layout is versioned and the same on every node that has it. Its `current` owners build
//! the ring that reads and coordination use. A committed plan sets `next` (the owners after
//! the change): while it is set, every range that changes owners is being transferred, writes
//! go to the replicas of both rings, reads to `current` only. When every node that gains
//! ranges has received them, the claimant switches: `current = next`, and the nodes that
//! left the ring are `retired` (they refuse replica and client traffic). Each step bumps the
//! version; a layout with a greater `(version, digest)` replaces a smaller one everywhere.
//!
//! Staged changes (`kvctl cluster join|leave|remove|replace`) are applied to `current` by
//! [`Layout::target`] (the plan, a dry run) and committed by [`Layout::commit`], which refuses a
//! plan staged against another version (stale) or while a transition runs (one at a time).

use std::collections::{BTreeMap, BTreeSet};

use ringkv_protocol::ring::{push_span, Ring, Span};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::config::MAX_VNODES;

/// One owner of the ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub vnodes: u32,
    /// Its tokens are derived from this name: its own id, or the id of the node it replaced
    /// (a replacement takes over exactly the old node's ranges).
    pub tokens_of: String,
}

/// A node's vnode count must be 1..=`MAX_VNODES` (its tokens make the ring).
fn vnodes_valid(node: &str, vnodes: u32) -> Result<(), String> {
    if (1..=MAX_VNODES).contains(&vnodes) {
        Ok(())
    } else {
        Err(format!(
            "{node}: {vnodes} vnodes is outside 1..={MAX_VNODES}"
        ))
    }
}

impl Owner {
    pub fn new(id: &str, vnodes: u32) -> Owner {
        Owner {
            vnodes,
            tokens_of: id.to_string(),
        }
    }
}

pub type Owners = BTreeMap<String, Owner>;

/// A strict majority of `n` voters: any two such sets of one voter list share a voter.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// 0: no layout yet (a node that has not learned its cluster's).
    pub version: u64,
    pub current: Owners,
    /// While a committed plan's transfers run: the owners after it.
    pub next: Option<Owners>,
    /// Nodes a completed plan took out of the ring (left, removed, replaced).
    pub retired: BTreeSet<String>,
    /// Nodes taken out while down (removed, replaced), from the commit on: tombstone GC stops
    /// waiting for them at the switch, so what they hold may predate purged deletes, and they
    /// never hand it over (`HandOverGuard`), even if their process ran on unreachable
    /// (paused, partitioned) and comes back. Cleared by a join. (Absent from layouts saved
    /// before it: their digests do not change.)
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub forfeited: BTreeSet<String>,
    /// Retired nodes that said (gossip `holds_nothing`) they had handed over everything they
    /// held: recorded by the claimant. Tombstone GC waits for every retired node that is
    /// neither forfeited nor released (`awaiting_release`): until it is empty, a copy it holds
    /// could outlive a purged delete. Cleared by a join. (Absent when empty, like `forfeited`.)
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub released: BTreeSet<String>,
}

/// One staged change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A running node that is not an owner becomes one.
    Join { node: String, vnodes: u32 },
    /// An owner hands its ranges to the others, then leaves the ring.
    Leave { node: String },
    /// A dead owner is taken out; its ranges are re-replicated from the surviving replicas.
    Remove { node: String },
    /// A new node takes over exactly an owner's ranges (its tokens).
    Replace { old: String, new: String },
}

impl Change {
    /// The nodes this change names.
    pub fn nodes(&self) -> Vec<&str> {
        match self {
            Change::Join { node, .. } | Change::Leave { node } | Change::Remove { node } => {
                vec![node]
            }
            Change::Replace { old, new } => vec![old, new],
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Join { node, vnodes } => write!(f, "join {node} ({vnodes} vnodes)"),
            Change::Leave { node } => write!(f, "leave {node}"),
            Change::Remove { node } => write!(f, "remove {node}"),
            Change::Replace { old, new } => write!(f, "replace {old} by {new}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("a plan is already being carried out (layout v{0}): wait for its transfers to finish (kvctl cluster status)")]
    Busy(u64),
    #[error("the plan was staged against layout v{staged} but the cluster is at v{now}: stage the changes again")]
    Stale { staged: u64, now: u64 },
    #[error("nothing is staged")]
    Empty,
    #[error("{0}")]
    Invalid(String),
}

/// What the caller knows about nodes that a change needs checked.
pub trait Liveness {
    /// The node runs and is in contact (gossip alive).
    fn is_alive(&self, node: &str) -> bool;

    /// The node says it holds no data and no hint (gossip `holds_nothing`).
    fn holds_nothing(&self, _node: &str) -> bool {
        false
    }
}

impl<F: Fn(&str) -> bool> Liveness for F {
    fn is_alive(&self, node: &str) -> bool {
        self(node)
    }
}

/// Names one layout: its version and its digest. Ordered as layouts supersede each other
/// (version, then digest): two claimants that committed the same version concurrently made
/// two layouts, and a node that did something for one must not count it done for the other.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LayoutId {
    pub version: u64,
    pub digest: u64,
}

impl std::fmt::Display for LayoutId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{} ({:016x})", self.version, self.digest)
    }
}

impl Layout {
    /// This layout's id (computes the digest).
    pub fn id(&self) -> LayoutId {
        LayoutId {
            version: self.version,
            digest: self.digest(),
        }
    }

    /// The first layout of a new cluster: one owner.
    pub fn bootstrap(id: &str, vnodes: u32) -> Layout {
        Layout {
            version: 1,
            current: BTreeMap::from([(id.to_string(), Owner::new(id, vnodes))]),
            next: None,
            retired: BTreeSet::new(),
            forfeited: BTreeSet::new(),
            released: BTreeSet::new(),
        }
    }

    /// A fingerprint of the whole layout (equal layouts, equal digests).
    pub fn digest(&self) -> u64 {
        xxh3_64(&serde_json::to_vec(self).expect("a layout serializes"))
    }

    /// Whether `self` replaces `other`: a greater version, or the same version with a greater
    /// digest (two claimants that committed concurrently: every node picks the same one).
    pub fn supersedes(&self, other: &Layout) -> bool {
        self.id() > other.id()
    }

    pub fn ring(owners: &Owners) -> Ring {
        Ring::with_token_names(
            owners
                .iter()
                .map(|(id, o)| (id.as_str(), o.tokens_of.as_str(), o.vnodes)),
        )
    }

    pub fn current_ring(&self) -> Ring {
        Layout::ring(&self.current)
    }

    pub fn next_ring(&self) -> Option<Ring> {
        self.next.as_ref().map(Layout::ring)
    }

    /// Whether `node` owns ranges now or after the running transition.
    /// Every owner, current then next (a node in both comes twice).
    pub fn owners(&self) -> impl Iterator<Item = &String> {
        self.current
            .keys()
            .chain(self.next.iter().flat_map(|n| n.keys()))
    }

    /// Whether the running transition takes `node` out of the ring and it hands its data over
    /// itself (it leaves): an owner now and not after, and not forfeited (removed or replaced
    /// while down). Gainers wait for such a node while it is down (`transfer`): it may hold
    /// what no other node has (a write acknowledged with W=1, hints for the other replicas),
    /// and once retired it could never hand it over if it restarted.
    pub fn leaving(&self, node: &str) -> bool {
        self.next
            .as_ref()
            .is_some_and(|next| !next.contains_key(node))
            && self.current.contains_key(node)
            && !self.forfeited.contains(node)
    }

    /// Retired nodes that may still hold data that is no longer theirs: neither forfeited
    /// (their copies are refused) nor released (they said they hold nothing).
    pub fn awaiting_release(&self) -> impl Iterator<Item = &String> {
        self.retired
            .iter()
            .filter(|n| !self.forfeited.contains(*n) && !self.released.contains(*n))
    }

    /// The layout after recording that retired `nodes` hold nothing (the claimant's, with no
    /// transition running): same owners, next version.
    pub fn with_released(&self, nodes: &[String]) -> Layout {
        let mut next = self.clone();
        next.version += 1;
        next.released
            .extend(nodes.iter().filter(|n| self.retired.contains(*n)).cloned());
        next
    }

    pub fn is_owner(&self, node: &str) -> bool {
        self.current.contains_key(node) || self.next.as_ref().is_some_and(|n| n.contains_key(node))
    }

    /// The node that decides for the cluster (stages, commits, switches): the smallest id
    /// among the alive owners (current, then next).
    pub fn claimant(&self, live: &impl Liveness) -> Option<String> {
        self.owners().filter(|id| live.is_alive(id)).min().cloned()
    }

    /// Whether a layout read from disk or from a peer can be used: every owner's vnode count
    /// within 1..=`MAX_VNODES` (a ring is built from them: a corrupt or hostile count must not
    /// make every node that adopts the layout allocate without bound).
    pub fn check(&self) -> Result<(), String> {
        for (node, owner) in self.current.iter().chain(self.next.iter().flatten()) {
            vnodes_valid(node, owner.vnodes)
                .map_err(|e| format!("layout v{}: owner {e}", self.version))?;
        }
        Ok(())
    }

    /// The owners after `changes` (a dry run): every change checked against this layout.
    pub fn target(&self, changes: &[Change], live: &impl Liveness) -> Result<Owners, PlanError> {
        if self.next.is_some() {
            return Err(PlanError::Busy(self.version));
        }
        if changes.is_empty() {
            return Err(PlanError::Empty);
        }
        let invalid = |msg: String| Err(PlanError::Invalid(msg));
        let mut owners = self.current.clone();
        let mut named = BTreeSet::new();
        for change in changes {
            for node in change.nodes() {
                if !named.insert(node.to_string()) {
                    return invalid(format!("{node} is named by more than one staged change"));
                }
            }
            match change {
                Change::Join { node, vnodes } => {
                    if owners.contains_key(node) {
                        return invalid(format!("join {node}: it already owns ranges"));
                    }
                    if !live.is_alive(node) {
                        return invalid(format!(
                            "join {node}: it is not running and in contact with the cluster"
                        ));
                    }
                    // Its own word now, not the `released` record: data could have reached
                    // it since, or it could have started again on an old data dir.
                    if self.retired.contains(node) && !live.holds_nothing(node) {
                        return invalid(format!(
                            "join {node}: it was taken out of the ring and has not said it holds \
                             nothing; what it kept may predate deletes purged since: stop it, \
                             wipe its data dir, start it and join it again"
                        ));
                    }
                    if let Err(e) = vnodes_valid(node, *vnodes) {
                        return invalid(format!("join {e}"));
                    }
                    owners.insert(node.clone(), Owner::new(node, *vnodes));
                }
                Change::Leave { node } => {
                    if owners.remove(node).is_none() {
                        return invalid(format!("leave {node}: it owns no ranges"));
                    }
                    if !live.is_alive(node) {
                        return invalid(format!(
                            "leave {node}: it is down and cannot hand its data off; use remove"
                        ));
                    }
                }
                Change::Remove { node } => {
                    // A retired node that never said it holds nothing (it left, then went away
                    // before handing everything over) holds tombstone GC back: removing it
                    // forfeits its data and owns nothing less.
                    let unreleased = self.awaiting_release().any(|n| n == node);
                    let owned = owners.remove(node).is_some();
                    if !owned && !unreleased {
                        return invalid(format!("remove {node}: it owns no ranges"));
                    }
                    if !owned && live.is_alive(node) {
                        return invalid(format!(
                            "remove {node}: it left the ring and is running: it hands its data \
                             over itself (kvctl cluster status); remove it only if it is down \
                             for good"
                        ));
                    }
                    if live.is_alive(node) {
                        return invalid(format!(
                            "remove {node}: it is running; use leave (it hands its data off first)"
                        ));
                    }
                }
                Change::Replace { old, new } => {
                    let Some(owner) = owners.remove(old) else {
                        return invalid(format!("replace {old}: it owns no ranges"));
                    };
                    if owners.contains_key(new) || self.current.contains_key(new) {
                        return invalid(format!(
                            "replace {old} by {new}: {new} already owns ranges"
                        ));
                    }
                    if !live.is_alive(new) {
                        return invalid(format!(
                            "replace {old} by {new}: {new} is not running and in contact with the cluster"
                        ));
                    }
                    // As `remove`: the old node is forfeited (it hands nothing over, hints
                    // included), which is right only for a node that is gone.
                    if live.is_alive(old) {
                        return invalid(format!(
                            "replace {old} by {new}: {old} is running; use leave {old} and join \
                             {new} (it hands its data off first), or replace it once it is down \
                             for good"
                        ));
                    }
                    // As `join`: a node taken out of the ring may hold copies older than
                    // deletes purged since.
                    if self.retired.contains(new) && !live.holds_nothing(new) {
                        return invalid(format!(
                            "replace {old} by {new}: {new} was taken out of the ring and has not \
                             said it holds nothing; what it kept may predate deletes purged \
                             since: stop it, wipe its data dir, start it and replace again"
                        ));
                    }
                    owners.insert(new.clone(), owner);
                }
            }
        }
        if owners.is_empty() {
            return invalid("the plan leaves no owner".into());
        }
        Ok(owners)
    }

    /// Commits `changes` staged against version `staged`: the next layout (a transition).
    pub fn commit(
        &self,
        staged: u64,
        changes: &[Change],
        live: &impl Liveness,
    ) -> Result<Layout, PlanError> {
        if self.next.is_some() {
            return Err(PlanError::Busy(self.version));
        }
        if staged != self.version {
            return Err(PlanError::Stale {
                staged,
                now: self.version,
            });
        }
        let next = self.target(changes, live)?;
        let mut retired = self.retired.clone();
        let mut forfeited = self.forfeited.clone();
        let mut released = self.released.clone();
        for change in changes {
            // A node that joins owns again; one taken out while down forfeits its data.
            let (owns_again, forfeits) = match change {
                Change::Join { node, .. } => (Some(node), None),
                Change::Replace { old, new } => (Some(new), Some(old)),
                Change::Remove { node } => (None, Some(node)),
                Change::Leave { .. } => (None, None),
            };
            if let Some(node) = owns_again {
                retired.remove(node);
                forfeited.remove(node);
                released.remove(node);
            }
            if let Some(node) = forfeits {
                forfeited.insert(node.clone());
            }
        }
        Ok(Layout {
            version: self.version + 1,
            current: self.current.clone(),
            next: Some(next),
            retired,
            forfeited,
            released,
        })
    }

    /// The nodes whose grants decide the running transition (`cluster::vote`): the current
    /// owners but those the plan forfeits (removed or replaced, so down at the commit); the
    /// next owners if that leaves none (every owner replaced; the new ones were up at the
    /// commit). Every node that sees this layout computes the same set, and a leaver or a
    /// node that stays counts: any fixed set is as safe, and the largest keeps a change
    /// decidable with a minority of it down. Empty without a transition.
    pub fn voters(&self) -> Vec<String> {
        let Some(next) = &self.next else {
            return Vec::new();
        };
        let voters: Vec<String> = self
            .current
            .keys()
            .filter(|n| !self.forfeited.contains(*n))
            .cloned()
            .collect();
        if voters.is_empty() {
            next.keys().cloned().collect()
        } else {
            voters
        }
    }

    /// Whether a claimant that sees `live` can hope to decide the running transition, switch
    /// it or abort it: a strict majority of its `voters` alive in its view (their grants,
    /// `cluster::vote`, are what decides; this is the claimant's cheap check before asking,
    /// and what `kvctl cluster status` shows). Without a transition, always `Ok`; the error
    /// names who is reachable and who is not.
    pub fn decision_quorum(&self, live: &impl Liveness) -> Result<(), String> {
        if self.next.is_none() {
            return Ok(());
        }
        let voters = self.voters();
        let (up, down): (Vec<&String>, Vec<&String>) =
            voters.iter().partition(|n| live.is_alive(n));
        let need = majority(voters.len());
        if up.len() >= need {
            return Ok(());
        }
        let list = |v: &[&String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            }
        };
        Err(format!(
            "layout v{}: {} of the {} nodes that vote on the change are reachable from the \
             claimant (up: {}; down: {}); switching or aborting it needs the grants of {need}, \
             so that the two sides of a partition cannot decide it two ways",
            self.version,
            up.len(),
            voters.len(),
            list(&up),
            list(&down),
        ))
    }

    /// The layout after aborting the running transition (`kvctl cluster abort`): `current`
    /// keeps the ring and `next` is dropped. Every write acknowledged during the transition
    /// has W acks among its current replicas, so nothing acknowledged is lost. The nodes that
    /// were to become owners (joined, or replacing another) hold what they received so far and
    /// are retired: one that is up hands it over and says it holds nothing, as a node that
    /// left (tombstone GC waits for it); one that is down is also forfeited, as a removed
    /// node: its copies are refused, and tombstone GC does not wait for it. Owners of the
    /// current ring are never forfeited (a node the aborted plan removed or replaced owns its
    /// ranges again; tombstone GC waits for it while it is down, as before the commit); other
    /// retired nodes keep what the plan recorded. Also returns the retired nodes and which of
    /// them were forfeited.
    ///
    /// Its version is the transition's **plus two**, so that it supersedes a switch of the same
    /// transition (plus one) decided elsewhere at the same time: a gainer restarted on its saved
    /// transition layout, or the other side of a partition. Found in review: at the same
    /// version the digests decided, and a switch could undo the abort, making a forfeited node
    /// an owner again with copies older than deletes purged since the abort.
    pub fn aborted(
        &self,
        live: &impl Liveness,
    ) -> Result<(Layout, Vec<String>, Vec<String>), PlanError> {
        let Some(next) = &self.next else {
            return Err(PlanError::Invalid(format!(
                "no ring change is running (layout v{}): nothing to abort",
                self.version
            )));
        };
        let mut out = self.clone();
        out.version += 2;
        out.next = None;
        out.forfeited.retain(|n| !self.current.contains_key(n));
        let (mut retired, mut forfeited) = (Vec::new(), Vec::new());
        for node in next.keys().filter(|n| !self.current.contains_key(*n)) {
            out.retired.insert(node.clone());
            out.released.remove(node);
            retired.push(node.clone());
            if !live.is_alive(node) {
                out.forfeited.insert(node.clone());
                forfeited.push(node.clone());
            }
        }
        Ok((out, retired, forfeited))
    }

    /// The layout after the running transition's switch: `next` owns the ring, the nodes it
    /// dropped are retired. None when no transition runs.
    pub fn switched(&self) -> Option<Layout> {
        let next = self.next.clone()?;
        let mut retired = self.retired.clone();
        retired.extend(
            self.current
                .keys()
                .filter(|id| !next.contains_key(*id))
                .cloned(),
        );
        Some(Layout {
            version: self.version + 1,
            current: next,
            next: None,
            retired,
            forfeited: self.forfeited.clone(),
            released: self.released.clone(),
        })
    }
}

/// A run of positions whose replicas change: from the current ring's to the next ring's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub span: Span,
    pub from: Vec<String>,
    pub to: Vec<String>,
}

impl Move {
    /// Nodes that replicate the span after the move and not before.
    pub fn gainers(&self) -> impl Iterator<Item = &String> {
        self.to.iter().filter(|n| !self.from.contains(n))
    }

    /// Nodes that replicate the span before the move and not after.
    pub fn losers(&self) -> impl Iterator<Item = &String> {
        self.from.iter().filter(|n| !self.to.contains(n))
    }
}

/// Every span whose first `n` replicas differ between `from` and `to`, ascending, adjacent
/// spans with the same replicas merged.
pub fn moves(from: &Ring, to: &Ring, n: usize) -> Vec<Move> {
    let mut tokens = from.tokens();
    tokens.extend(to.tokens());
    tokens.sort_unstable();
    tokens.dedup();
    let mut out: Vec<Move> = Vec::new();
    let Some(&first_token) = tokens.first() else {
        return out;
    };
    let last_token = *tokens.last().expect("not empty");
    // Arcs between consecutive tokens of both rings have the same replicas in each ring.
    let mut arcs: Vec<Span> = Vec::with_capacity(tokens.len() + 1);
    arcs.push((0, first_token));
    arcs.extend(tokens.windows(2).map(|w| (w[0] + 1, w[1])));
    if last_token < u64::MAX {
        arcs.push((last_token + 1, u64::MAX));
    }
    let names = |ring: &Ring, pos: u64| -> Vec<String> {
        let mut v: Vec<String> = ring
            .preference_list(pos, n)
            .iter()
            .map(|id| id.to_string())
            .collect();
        v.sort();
        v
    };
    for (first, last) in arcs {
        let (a, b) = (names(from, last), names(to, last));
        if a == b {
            continue;
        }
        match out.last_mut() {
            Some(m) if m.from == a && m.to == b && m.span.1.checked_add(1) == Some(first) => {
                m.span.1 = last
            }
            _ => out.push(Move {
                span: (first, last),
                from: a,
                to: b,
            }),
        }
    }
    out
}

/// What one node gains from each source (a current replica of the span) and loses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMoves {
    /// Per current replica: the spans this node gains that it replicates (ascending, merged).
    pub gains_from: BTreeMap<String, Vec<Span>>,
    /// Every span this node gains.
    pub gains: Vec<Span>,
    /// Every span this node stops replicating.
    pub loses: Vec<Span>,
}

/// Per node, what `moves` gives and takes.
pub fn per_node(moves: &[Move]) -> BTreeMap<String, NodeMoves> {
    let mut out: BTreeMap<String, NodeMoves> = BTreeMap::new();
    for m in moves {
        for g in m.gainers() {
            let e = out.entry(g.clone()).or_default();
            push_span(&mut e.gains, m.span);
            for src in &m.from {
                push_span(e.gains_from.entry(src.clone()).or_default(), m.span);
            }
        }
        for l in m.losers() {
            push_span(&mut out.entry(l.clone()).or_default().loses, m.span);
        }
    }
    out
}

/// Whether every position a node gains is covered by the spans of the sources `done` says
/// it finished: the union of their spans (a merged gained span may come from different
/// sources in parts).
pub fn gains_covered(m: &NodeMoves, done: &dyn Fn(&str) -> bool) -> bool {
    let mut union: Vec<Span> = m
        .gains_from
        .iter()
        .filter(|(src, _)| done(src))
        .flat_map(|(_, spans)| spans.iter().copied())
        .collect();
    union.sort_unstable();
    let mut merged: Vec<Span> = Vec::with_capacity(union.len());
    for (a, b) in union {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    m.gains
        .iter()
        .all(|&(first, last)| merged.iter().any(|&(a, b)| a <= first && last <= b))
}

pub use crate::ring::ranges::share;

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_protocol::ring::key_position;

    fn all_alive(_: &str) -> bool {
        true
    }

    /// Every node up; those named say they hold nothing.
    struct Nodes<'a>(&'a [&'a str]);

    impl<'a> Nodes<'a> {
        fn empty(names: &'a [&'a str]) -> Nodes<'a> {
            Nodes(names)
        }
    }

    impl Liveness for Nodes<'_> {
        fn is_alive(&self, _: &str) -> bool {
            true
        }
        fn holds_nothing(&self, node: &str) -> bool {
            self.0.contains(&node)
        }
    }

    fn layout(ids: &[&str]) -> Layout {
        Layout {
            version: 3,
            current: ids
                .iter()
                .map(|id| (id.to_string(), Owner::new(id, 64)))
                .collect(),
            next: None,
            retired: BTreeSet::new(),
            forfeited: BTreeSet::new(),
            released: BTreeSet::new(),
        }
    }

    fn replicas(ring: &Ring, key: &str) -> Vec<String> {
        let mut v: Vec<String> = ring
            .preference_list(key_position(key.as_bytes()), 3)
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.sort();
        v
    }

    /// Every key's replicas in both rings agree with the move (or the absence of one) that
    /// covers its position.
    #[test]
    fn moves_cover_exactly_the_keys_whose_replicas_change() {
        let from = layout(&["a", "b", "c"]).current_ring();
        let to = layout(&["a", "b", "c", "d", "e", "f"]).current_ring();
        let ms = moves(&from, &to, 3);
        assert!(!ms.is_empty());
        assert!(
            ms.windows(2).all(|w| w[0].span.1 < w[1].span.0),
            "ascending, disjoint"
        );
        let mut moved = 0;
        for i in 0..5000 {
            let key = format!("k{i}");
            let pos = key_position(key.as_bytes());
            let (a, b) = (replicas(&from, &key), replicas(&to, &key));
            match ms.iter().find(|m| m.span.0 <= pos && pos <= m.span.1) {
                Some(m) => {
                    assert_eq!((&m.from, &m.to), (&a, &b), "{key}");
                    moved += 1;
                }
                None => assert_eq!(a, b, "{key} moves but no move covers it"),
            }
        }
        // 3 -> 6 nodes with N=3: most keys get at least one new replica.
        assert!(moved > 4000, "{moved}");
        let pn = per_node(&ms);
        for new in ["d", "e", "f"] {
            let share = share(&pn[new].gains);
            assert!((0.35..0.65).contains(&share), "{new} gains {share}");
            assert!(pn[new].loses.is_empty());
        }
        for old in ["a", "b", "c"] {
            assert!(pn[old].gains.is_empty(), "{old} gains nothing");
            assert!(!pn[old].loses.is_empty());
        }
    }

    /// Regression: a gained span merged from two moves with different sources was covered by
    /// neither source alone, and the transfer waited forever for a source that was done.
    #[test]
    fn gains_are_covered_by_the_union_of_the_finished_sources() {
        let ms = vec![
            Move {
                span: (0, 9),
                from: vec!["a".into(), "x".into()],
                to: vec!["g".into(), "x".into()],
            },
            Move {
                span: (10, 19),
                from: vec!["b".into(), "y".into()],
                to: vec!["g".into(), "y".into()],
            },
        ];
        let pn = per_node(&ms);
        let g = &pn["g"];
        assert_eq!(g.gains, vec![(0, 19)]);
        assert!(gains_covered(g, &|s: &str| s == "a" || s == "b"));
        assert!(gains_covered(g, &|s: &str| s == "x" || s == "y"));
        assert!(
            !gains_covered(g, &|s: &str| s == "a" || s == "x"),
            "10..=19 missing"
        );
        assert!(!gains_covered(g, &|_: &str| false));
    }

    #[test]
    fn a_replacement_takes_exactly_the_old_nodes_ranges() {
        let l = layout(&["a", "b", "c", "d"]);
        let dead = |n: &str| n != "b";
        let next = l
            .commit(
                3,
                &[Change::Replace {
                    old: "b".into(),
                    new: "x".into(),
                }],
                &dead,
            )
            .unwrap();
        let ms = moves(&l.current_ring(), &next.next_ring().unwrap(), 3);
        for m in &ms {
            assert_eq!(m.gainers().collect::<Vec<_>>(), vec!["x"]);
            assert_eq!(m.losers().collect::<Vec<_>>(), vec!["b"]);
        }
        let pn = per_node(&ms);
        let old_share: f64 = share(&pn["b"].loses);
        assert!((old_share - share(&pn["x"].gains)).abs() < 1e-12);
        assert!(!pn["x"].gains_from.contains_key("x"));
    }

    #[test]
    fn commits_are_checked_one_at_a_time_and_against_their_version() {
        let l = layout(&["a", "b", "c"]);
        let join = [Change::Join {
            node: "d".into(),
            vnodes: 64,
        }];
        assert_eq!(
            l.commit(2, &join, &all_alive),
            Err(PlanError::Stale { staged: 2, now: 3 })
        );
        let t = l.commit(3, &join, &all_alive).unwrap();
        assert_eq!(t.version, 4);
        assert_eq!(t.current, l.current, "ownership does not switch at commit");
        assert!(t.is_owner("d"));
        assert_eq!(t.commit(4, &join, &all_alive), Err(PlanError::Busy(4)));
        let s = t.switched().unwrap();
        assert_eq!((s.version, s.next.is_none()), (5, true));
        assert!(s.current.contains_key("d"));
        assert!(s.supersedes(&t) && t.supersedes(&l));
    }

    /// Found in review: a join of 4 294 967 295 vnodes was staged and committed, and every
    /// node that adopted the layout (and saved it, so again at every restart) tried to build
    /// a ring of 64 GiB of tokens and aborted.
    #[test]
    fn a_vnode_count_beyond_the_limit_is_refused_at_staging_and_in_a_layout() {
        let l = layout(&["a", "b", "c"]);
        for vnodes in [0, MAX_VNODES + 1, u32::MAX] {
            let join = [Change::Join {
                node: "d".into(),
                vnodes,
            }];
            match l.target(&join, &all_alive) {
                Err(PlanError::Invalid(m)) => assert!(m.contains("vnodes"), "{m}"),
                other => panic!("{vnodes} vnodes: {other:?}"),
            }
        }
        assert!(l.check().is_ok());
        let mut bad = layout(&["a", "b", "c"]);
        bad.current.insert("d".into(), Owner::new("d", u32::MAX));
        let e = bad.check().unwrap_err();
        assert!(e.contains("d") && e.contains("4294967295"), "{e}");
        let mut bad_next = layout(&["a", "b", "c"]);
        let mut next = bad_next.current.clone();
        next.insert("e".into(), Owner::new("e", 0));
        bad_next.next = Some(next);
        assert!(bad_next.check().unwrap_err().contains("e"));
    }

    #[test]
    fn invalid_changes_are_refused_with_the_reason() {
        let l = layout(&["a", "b", "c"]);
        let only_abc = |n: &str| ["a", "b", "c"].contains(&n);
        let err = |changes: &[Change], live: &dyn Fn(&str) -> bool| match l.target(changes, &live) {
            Err(PlanError::Invalid(m)) => m,
            other => panic!("{other:?}"),
        };
        let join_d = Change::Join {
            node: "d".into(),
            vnodes: 8,
        };
        assert!(err(std::slice::from_ref(&join_d), &only_abc).contains("not running"));
        assert!(err(&[Change::Remove { node: "b".into() }], &only_abc).contains("use leave"));
        assert!(err(&[Change::Leave { node: "z".into() }], &all_alive).contains("owns no ranges"));
        let b_dead = |n: &str| n != "b";
        assert!(err(&[Change::Leave { node: "b".into() }], &b_dead).contains("use remove"));
        assert!(err(&[join_d.clone(), join_d], &all_alive).contains("more than one"));
        assert_eq!(l.target(&[], &all_alive), Err(PlanError::Empty));
        let leave_all: Vec<Change> = ["a", "b", "c"]
            .iter()
            .map(|n| Change::Leave {
                node: n.to_string(),
            })
            .collect();
        assert!(err(&leave_all, &all_alive).contains("no owner"));
    }

    #[test]
    fn leaving_and_removed_nodes_are_retired_at_the_switch_and_a_rejoin_clears_it() {
        let l = layout(&["a", "b", "c", "d"]);
        let d_dead = |n: &str| n != "d";
        let t = l
            .commit(
                3,
                &[
                    Change::Leave { node: "a".into() },
                    Change::Remove { node: "d".into() },
                ],
                &d_dead,
            )
            .unwrap();
        let s = t.switched().unwrap();
        assert_eq!(
            s.retired,
            BTreeSet::from(["a".to_string(), "d".to_string()])
        );
        assert_eq!(s.claimant(&d_dead), Some("b".into()));
        let back = s
            .commit(
                5,
                &[Change::Join {
                    node: "a".into(),
                    vnodes: 64,
                }],
                &Nodes::empty(&["a", "d"]),
            )
            .unwrap();
        assert!(!back.retired.contains("a") && back.retired.contains("d"));
        // d was taken out while down: its data is forfeited (never handed over), from the
        // commit on; a's was handed off in contact.
        assert_eq!(t.forfeited, BTreeSet::from(["d".to_string()]));
        assert_eq!(s.forfeited, BTreeSet::from(["d".to_string()]));
        let d_back = s
            .commit(
                5,
                &[Change::Join {
                    node: "d".into(),
                    vnodes: 64,
                }],
                &Nodes::empty(&["d"]),
            )
            .unwrap();
        assert!(
            d_back.forfeited.is_empty(),
            "a (wiped) node joining again owns again"
        );
        let replaced = l
            .commit(
                3,
                &[Change::Replace {
                    old: "d".into(),
                    new: "e".into(),
                }],
                &d_dead,
            )
            .unwrap();
        assert_eq!(replaced.forfeited, BTreeSet::from(["d".to_string()]));
    }

    /// Found in review: `replace` made neither `remove`'s nor `join`'s checks. A running old
    /// node was forfeited (it then withholds everything, its hints too, though it could hand
    /// them over), and a node removed while down, back on its old data dir, was taken as the
    /// replacement: no longer forfeited, it pushed copies older than deletes purged since.
    #[test]
    fn replace_needs_the_old_node_down_and_a_retired_new_one_empty() {
        let l = layout(&["a", "b", "c", "d"]);
        let replace = |old: &str, new: &str| {
            [Change::Replace {
                old: old.into(),
                new: new.into(),
            }]
        };
        let e = l.commit(3, &replace("d", "x"), &all_alive).unwrap_err();
        assert!(e.to_string().contains("is running"), "{e}");
        let removed = l
            .commit(3, &[Change::Remove { node: "d".into() }], &|n: &str| {
                n != "d"
            })
            .unwrap()
            .switched()
            .unwrap();
        assert!(removed.forfeited.contains("d"));
        // c dies; d is back with its old data.
        let c_dead = |n: &str| n != "c";
        let e = removed.commit(5, &replace("c", "d"), &c_dead).unwrap_err();
        assert!(e.to_string().contains("holds nothing"), "{e}");
        // Wiped, d says it holds nothing: it may replace c.
        struct WipedD;
        impl Liveness for WipedD {
            fn is_alive(&self, n: &str) -> bool {
                n != "c"
            }
            fn holds_nothing(&self, n: &str) -> bool {
                n == "d"
            }
        }
        let next = removed.commit(5, &replace("c", "d"), &WipedD).unwrap();
        assert!(!next.forfeited.contains("d"));
        assert!(next.forfeited.contains("c"));
    }

    /// A node that left and went away before it had handed everything over may hold copies
    /// older than deletes purged since: it joins again only while it says it holds nothing,
    /// and while it is gone `remove` forfeits it (its copies are
    /// refused from then on) so that tombstone GC stops waiting for it.
    #[test]
    fn a_retired_node_joins_again_only_once_it_holds_nothing_and_remove_forfeits_it() {
        let l = layout(&["a", "b", "c", "d"]);
        let left = l
            .commit(3, &[Change::Leave { node: "d".into() }], &all_alive)
            .unwrap()
            .switched()
            .unwrap();
        assert_eq!(left.awaiting_release().collect::<Vec<_>>(), vec!["d"]);
        let join_d = [Change::Join {
            node: "d".into(),
            vnodes: 64,
        }];
        let refused = left.commit(5, &join_d, &all_alive).unwrap_err();
        assert!(refused.to_string().contains("holds nothing"), "{refused}");
        assert!(left.commit(5, &join_d, &Nodes::empty(&["d"])).is_ok());
        // The claimant records it: no longer awaited, and it may join again.
        let released = left.with_released(&["d".to_string(), "a".to_string()]);
        assert_eq!(released.version, left.version + 1);
        assert_eq!(released.current, left.current);
        assert_eq!(
            released.released,
            BTreeSet::from(["d".to_string()]),
            "only retired nodes are recorded"
        );
        assert_eq!(released.awaiting_release().count(), 0);
        assert!(
            released.commit(6, &join_d, &all_alive).is_err(),
            "recorded, but not saying so now (restarted on an old data dir?)"
        );
        let back = released.commit(6, &join_d, &Nodes::empty(&["d"])).unwrap();
        assert!(back.released.is_empty() && !back.retired.contains("d"));
        // Gone for good instead: remove forfeits it, owners unchanged.
        let d_dead = |n: &str| n != "d";
        let gone = left
            .commit(5, &[Change::Remove { node: "d".into() }], &d_dead)
            .unwrap();
        assert_eq!(gone.next.as_ref(), Some(&left.current));
        assert_eq!(gone.forfeited, BTreeSet::from(["d".to_string()]));
        assert_eq!(gone.switched().unwrap().awaiting_release().count(), 0);
        // Not while it runs (it hands its data over itself), nor for a node never retired.
        assert!(left
            .commit(5, &[Change::Remove { node: "d".into() }], &all_alive)
            .unwrap_err()
            .to_string()
            .contains("hands its data over itself"));
        assert!(left
            .commit(5, &[Change::Remove { node: "x".into() }], &d_dead)
            .unwrap_err()
            .to_string()
            .contains("owns no ranges"));
    }

    /// An abort keeps the current ring: the nodes that were to become owners are retired
    /// (forfeited if down), the owners the plan removed or replaced own again, unforfeited.
    #[test]
    fn an_abort_keeps_the_current_ring_and_retires_the_nodes_that_were_to_join() {
        let l = layout(&["a", "b", "c", "d"]);
        let (d_dead, e_dead) = (|n: &str| n != "d", |n: &str| n != "d" && n != "e");
        assert!(l
            .aborted(&all_alive)
            .unwrap_err()
            .to_string()
            .contains("no ring change is running"));
        // d (down) is replaced by e, f joins, a leaves.
        let t = l
            .commit(
                3,
                &[
                    Change::Replace {
                        old: "d".into(),
                        new: "e".into(),
                    },
                    Change::Join {
                        node: "f".into(),
                        vnodes: 8,
                    },
                    Change::Leave { node: "a".into() },
                ],
                &d_dead,
            )
            .unwrap();
        assert!(t.forfeited.contains("d"));
        // e died during the transfers; f is up.
        let (back, retired, forfeited) = t.aborted(&e_dead).unwrap();
        assert_eq!(back.version, t.version + 2);
        assert!(back.supersedes(&t));
        let switched = t.switched().unwrap();
        assert!(
            back.version > switched.version && back.supersedes(&switched),
            "an abort wins over a switch of the same transition decided elsewhere, whatever \
             their digests"
        );
        assert_eq!(back.current, l.current, "the ring before the commit");
        assert_eq!(back.next, None);
        assert_eq!(retired, vec!["e".to_string(), "f".to_string()]);
        assert_eq!(forfeited, vec!["e".to_string()]);
        assert_eq!(
            back.retired,
            BTreeSet::from(["e".to_string(), "f".to_string()])
        );
        assert_eq!(back.forfeited, BTreeSet::from(["e".to_string()]));
        assert_eq!(
            back.awaiting_release().collect::<Vec<_>>(),
            vec!["f"],
            "tombstone GC waits for f until it said it holds nothing"
        );
        assert!(back.aborted(&all_alive).is_err(), "nothing runs any more");
        // A new plan can be committed at once; f joins again only once it holds nothing.
        let join_f = [Change::Join {
            node: "f".into(),
            vnodes: 8,
        }];
        assert!(back.commit(back.version, &join_f, &all_alive).is_err());
        assert!(back
            .commit(back.version, &join_f, &Nodes::empty(&["f"]))
            .is_ok());
        let remove_d = [Change::Remove { node: "d".into() }];
        assert!(back.commit(back.version, &remove_d, &d_dead).is_ok());
        // A retired node the plan forfeited (removed while gone) stays forfeited.
        let left = l
            .commit(3, &[Change::Leave { node: "d".into() }], &all_alive)
            .unwrap()
            .switched()
            .unwrap();
        let gone = left
            .commit(5, &[Change::Remove { node: "d".into() }], &d_dead)
            .unwrap();
        let (undone, retired, _) = gone.aborted(&d_dead).unwrap();
        assert!(retired.is_empty());
        assert!(undone.forfeited.contains("d") && undone.retired.contains("d"));
    }

    /// The voters of a change: the current owners but those it forfeits (removed or
    /// replaced while down), else the next owners; a claimant hopes to decide only while it
    /// sees a strict majority of them.
    #[test]
    fn a_change_is_decided_only_with_a_majority_of_its_voters() {
        let l = layout(&["a", "b", "c"]);
        assert!(l.voters().is_empty());
        assert!(
            l.decision_quorum(&|_: &str| false).is_ok(),
            "no change runs"
        );
        let join_d = [Change::Join {
            node: "d".into(),
            vnodes: 8,
        }];
        let t = l.commit(3, &join_d, &all_alive).unwrap();
        assert_eq!(t.voters(), vec!["a", "b", "c"]);
        assert_eq!(majority(t.voters().len()), 2);
        // The side with the new node and one old owner, and the side with the other two.
        let (small, large) = (
            |n: &str| n == "c" || n == "d",
            |n: &str| n == "a" || n == "b",
        );
        let refused = t.decision_quorum(&small).unwrap_err();
        assert!(
            refused.contains("1 of the 3") && refused.contains("up: c; down: a, b"),
            "{refused}"
        );
        assert!(t.decision_quorum(&|n: &str| n == "d").is_err(), "d alone");
        assert!(t.decision_quorum(&large).is_ok());
        // A leaver votes (it was up at the commit): a leave of three needs two of the three.
        let leave_c = l
            .commit(3, &[Change::Leave { node: "c".into() }], &all_alive)
            .unwrap();
        assert_eq!(leave_c.voters(), vec!["a", "b", "c"]);
        assert!(leave_c.decision_quorum(&|n: &str| n != "b").is_ok());
        // A removed node does not: it may be the very one that is gone.
        let remove_bc = [
            Change::Remove { node: "b".into() },
            Change::Remove { node: "c".into() },
        ];
        let a_only = |n: &str| n == "a";
        let r = l.commit(3, &remove_bc, &a_only).unwrap();
        assert_eq!(r.voters(), vec!["a"]);
        assert!(r.decision_quorum(&a_only).is_ok(), "a is all that stays");
        // Four voters: two of them are not a majority.
        let four = layout(&["a", "b", "c", "e"]);
        let t4 = four.commit(3, &join_d, &all_alive).unwrap();
        assert_eq!(majority(t4.voters().len()), 3);
        assert!(t4.decision_quorum(&large).is_err());
        assert!(t4.decision_quorum(&|n: &str| n != "e").is_ok());
        // Every owner replaced (both down at the commit): the new owners vote.
        let two = layout(&["a", "b"]);
        let swap = [
            Change::Replace {
                old: "a".into(),
                new: "x".into(),
            },
            Change::Replace {
                old: "b".into(),
                new: "y".into(),
            },
        ];
        let s = two
            .commit(3, &swap, &|n: &str| n != "a" && n != "b")
            .unwrap();
        assert_eq!(s.voters(), vec!["x", "y"]);
        assert!(s.decision_quorum(&|n: &str| n == "x" || n == "y").is_ok());
        assert!(s.decision_quorum(&|n: &str| n == "x").is_err());
    }
}
