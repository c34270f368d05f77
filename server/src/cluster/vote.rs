//! Grants: how a claimant decides a running ring change so that no other claimant decides it
//! the other way.
//!
//! There is no consensus behind the claimant: each node takes the smallest owner it sees
//! alive, so the two sides of a partition (or of a bridge: one node seeing both) may each have
//! one. A running change can end two ways, switched or aborted, and the two must never both
//! happen: a side that switched acknowledges writes on the new nodes, and an abort forfeits
//! them (found in review: the abort's layout won when the sides met, and those writes were
//! lost). So a claimant first gathers **grants** from a strict majority of the change's
//! voters (`Layout::voters`) for the decision it is about to make, and a voter grants at most
//! one decision per change (named by its layout id), saved durably before it answers. Any two
//! majorities of one set share a voter, and that voter refused one of the two: of a switch and
//! an abort, at most one gathers its majority. The same decision may be granted to any number
//! of claimants (a retry, or a new claimant after the first one died): they all make the same
//! layout. This is one round of single-decree Paxos with the proposals fixed in advance, so
//! no ballot numbers are needed: a voter's first grant for a change is final.
//!
//! `kvctl cluster abort --force` does without grants (owners gone for good, not behind a
//! partition: the operator's word), like Riak's force-remove.

use std::path::PathBuf;
use std::sync::Mutex;

use ringkv_protocol::peer::cluster::decision;
use serde::{Deserialize, Serialize};

use crate::membership::layout::LayoutId;

/// The grants a node gave, beside its database.
pub const VOTES_FILE: &str = "votes.json";

/// Grants kept: the newest changes'. An older change is superseded everywhere it matters (a
/// claimant that gathered grants for it would make a layout older than the cluster's, which
/// no node adopts).
pub const KEPT_GRANTS: usize = 16;

/// What a claimant asks its voters to grant on a running change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Switch,
    Abort,
}

impl Decision {
    pub fn code(self) -> u8 {
        match self {
            Decision::Switch => decision::SWITCH,
            Decision::Abort => decision::ABORT,
        }
    }

    pub fn from_code(code: u8) -> Option<Decision> {
        match code {
            decision::SWITCH => Some(Decision::Switch),
            decision::ABORT => Some(Decision::Abort),
            _ => None,
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Switch => "switch",
            Decision::Abort => "abort",
        })
    }
}

/// The grants a node gave (sans-IO; `Votes` saves them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ballots {
    /// Sorted by layout id; at most `KEPT_GRANTS`.
    grants: Vec<(LayoutId, Decision)>,
}

impl Ballots {
    /// Grants `decision` on the change `id` unless the other one was granted on it:
    /// `Ok(true)` if newly granted (to be saved before the answer), `Ok(false)` if it was
    /// already, `Err(held)` if refused.
    pub fn grant(&mut self, id: LayoutId, decision: Decision) -> Result<bool, Decision> {
        match self.grants.binary_search_by_key(&id, |(g, _)| *g) {
            Ok(i) if self.grants[i].1 == decision => Ok(false),
            Ok(i) => Err(self.grants[i].1),
            Err(i) => {
                self.grants.insert(i, (id, decision));
                if self.grants.len() > KEPT_GRANTS {
                    self.grants.remove(0);
                }
                Ok(true)
            }
        }
    }

    /// Takes back a grant that could not be saved (it was never given).
    fn forget(&mut self, id: LayoutId) {
        self.grants.retain(|(g, _)| *g != id);
    }

    /// The decision granted on `id`, if any.
    pub fn held(&self, id: LayoutId) -> Option<Decision> {
        self.grants
            .binary_search_by_key(&id, |(g, _)| *g)
            .ok()
            .map(|i| self.grants[i].1)
    }
}

/// This node's grants, saved in `<data_dir>/votes.json` (`durable::write_file`) before any
/// answer that gives one.
pub struct Votes {
    file: Option<PathBuf>,
    ballots: Mutex<Ballots>,
}

/// Why a voter did not grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It granted the other decision on this change.
    Held(Decision),
    /// The grant could not be saved (so it was not given).
    Unsaved(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Held(d) => write!(f, "granted {d} on this change before"),
            Refusal::Unsaved(e) => write!(f, "could not save the grant: {e}"),
        }
    }
}

impl Votes {
    /// The grants saved in `file` (none if it does not exist); without a file (tests), kept in
    /// memory only. A file that cannot be read or parsed is an error: starting without the
    /// grants it holds could grant the other decision on a change.
    pub fn open(file: Option<PathBuf>) -> Result<Votes, String> {
        let ballots = match &file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "{}: not a file of ring-change grants ({e}); it is written whole or not \
                         at all, so this is damage: restore it, or delete it only if no ring \
                         change is running",
                        path.display()
                    )
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ballots::default(),
                Err(e) => return Err(format!("{}: {e}", path.display())),
            },
            None => Ballots::default(),
        };
        Ok(Votes {
            file,
            ballots: Mutex::new(ballots),
        })
    }

    /// Grants `decision` on the change `id` (see `Ballots::grant`), saved before it returns.
    /// The file is a few hundred bytes written once per change and decision, so it is written
    /// in place, under the lock.
    pub fn grant(&self, id: LayoutId, decision: Decision) -> Result<(), Refusal> {
        let mut ballots = self.ballots.lock().expect("ballots lock poisoned");
        match ballots.grant(id, decision) {
            Ok(false) => Ok(()),
            Err(held) => Err(Refusal::Held(held)),
            Ok(true) => {
                let Some(path) = &self.file else {
                    return Ok(());
                };
                let bytes = serde_json::to_vec(&*ballots).expect("grants serialize");
                crate::durable::write_file(path, &bytes).map_err(|e| {
                    ballots.forget(id);
                    Refusal::Unsaved(format!("{}: {e}", path.display()))
                })
            }
        }
    }

    pub fn held(&self, id: LayoutId) -> Option<Decision> {
        self.ballots.lock().expect("ballots lock poisoned").held(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(version: u64, digest: u64) -> LayoutId {
        LayoutId { version, digest }
    }

    /// A voter grants one decision per change, any number of times, never the other; a
    /// change of the same version with another digest is another change.
    #[test]
    fn a_voter_grants_one_decision_per_change() {
        let mut b = Ballots::default();
        assert_eq!(b.grant(id(5, 1), Decision::Switch), Ok(true));
        assert_eq!(b.grant(id(5, 1), Decision::Switch), Ok(false));
        assert_eq!(b.grant(id(5, 1), Decision::Abort), Err(Decision::Switch));
        assert_eq!(b.grant(id(5, 2), Decision::Abort), Ok(true));
        assert_eq!(b.held(id(5, 1)), Some(Decision::Switch));
        assert_eq!(b.held(id(5, 2)), Some(Decision::Abort));
        assert_eq!(b.held(id(6, 1)), None);
        for v in 0..KEPT_GRANTS as u64 {
            b.grant(id(10 + v, 0), Decision::Abort).unwrap();
        }
        assert_eq!(b.grants.len(), KEPT_GRANTS);
        assert_eq!(b.held(id(5, 1)), None, "the oldest are dropped");
        assert_eq!(b.held(id(10, 0)), Some(Decision::Abort));
    }

    /// Of two claimants asking the same voters for opposite decisions, at most one gathers a
    /// majority, whatever order the requests arrive in.
    #[test]
    fn opposite_decisions_never_both_gather_a_majority() {
        let change = id(7, 42);
        for order in 0..(1u32 << 5) {
            let mut voters = vec![Ballots::default(); 5];
            let (mut switch, mut abort) = (0, 0);
            for (i, v) in voters.iter_mut().enumerate() {
                let (first, second) = if order & (1 << i) == 0 {
                    (Decision::Switch, Decision::Abort)
                } else {
                    (Decision::Abort, Decision::Switch)
                };
                for d in [first, second] {
                    if v.grant(change, d).is_ok() {
                        match d {
                            Decision::Switch => switch += 1,
                            Decision::Abort => abort += 1,
                        }
                    }
                }
            }
            assert_eq!(switch + abort, 5, "each voter grants exactly one");
            assert!(!(switch >= 3 && abort >= 3), "order {order:05b}");
        }
    }

    /// Grants survive a restart; a damaged file stops the node instead of forgetting them.
    #[test]
    fn grants_are_saved_and_a_damaged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VOTES_FILE);
        let votes = Votes::open(Some(path.clone())).unwrap();
        votes.grant(id(3, 9), Decision::Abort).unwrap();
        drop(votes);
        let again = Votes::open(Some(path.clone())).unwrap();
        assert_eq!(again.held(id(3, 9)), Some(Decision::Abort));
        assert_eq!(
            again.grant(id(3, 9), Decision::Switch),
            Err(Refusal::Held(Decision::Abort))
        );
        std::fs::write(&path, b"{\"grants\": [").unwrap();
        let err = Votes::open(Some(path))
            .err()
            .expect("a damaged file is refused");
        assert!(err.contains("votes.json") && err.contains("not a file of ring-change grants"));
    }

    /// A grant that cannot be saved is not given: asked again once the disk works, the voter
    /// may still grant either decision.
    #[test]
    fn a_grant_that_cannot_be_saved_is_not_given() {
        let dir = tempfile::tempdir().unwrap();
        let votes = Votes::open(Some(dir.path().join("missing").join(VOTES_FILE))).unwrap();
        match votes.grant(id(4, 1), Decision::Switch) {
            Err(Refusal::Unsaved(e)) => assert!(e.contains("votes.json"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(votes.held(id(4, 1)), None);
    }
}
