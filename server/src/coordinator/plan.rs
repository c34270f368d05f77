//! The target plan of one key's request: a pure function of the cluster view and the key.
//!
//! The key's preference list is the first N distinct nodes clockwise from its position; each
//! is a primary, available or not (SWIM/phi). The nodes after them in ring order are the
//! fallbacks a sloppy quorum uses (hinted handoff): only available ones, nearest first. Today's
//! reads and writes use the available primaries only.

use crate::membership::ClusterView;
use crate::ring::{key_position, NodeId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The key's preference list (N distinct nodes, fewer if the ring has fewer nodes).
    pub preference: Vec<NodeId>,
    /// Primaries available for routing, in preference order.
    pub primaries_alive: Vec<NodeId>,
    /// Primaries not available for routing, in preference order.
    pub primaries_down: Vec<NodeId>,
    /// Available nodes beyond the preference list, in ring order from the key.
    pub fallbacks: Vec<NodeId>,
    /// While a ring change runs: the key's replicas in the next ring that are not primaries
    /// now (they are receiving its range). Writes go to them too.
    pub pending: Vec<NodeId>,
    /// While a ring change runs: the key's preference list in the next ring (empty otherwise).
    /// A write then needs W acks among these too, so it holds after the switch.
    pub next: Vec<NodeId>,
}

impl Plan {
    /// Whether this node is a primary of the key (may coordinate a write).
    pub fn is_primary(&self, node: &str) -> bool {
        self.preference.iter().any(|p| **p == *node)
    }
}

/// The plan for `key` with replication factor `n` in `view`, with one fallback per unavailable
/// primary (what a sloppy quorum needs).
pub fn plan(view: &ClusterView, key: &[u8], n: usize) -> Plan {
    plan_with_fallbacks(view, key, n, None)
}

/// Like [`plan`], with `want` fallbacks (`None` = one per unavailable primary). Finding
/// fallbacks walks the ring past the preference list, so it is skipped when none is wanted:
/// the common case (every primary up) costs one preference-list walk.
pub fn plan_with_fallbacks(view: &ClusterView, key: &[u8], n: usize, want: Option<usize>) -> Plan {
    let position = key_position(key);
    let preference = view.ring.preference_list(position, n);
    let (primaries_alive, primaries_down): (Vec<NodeId>, Vec<NodeId>) =
        preference.iter().cloned().partition(|id| view.is_alive(id));
    let want = want.unwrap_or(primaries_down.len());
    let fallbacks = if want == 0 {
        Vec::new()
    } else {
        // Every ring node in ring order from the key; the first ones are the primaries.
        let all = view.ring.preference_list(position, view.ring.nodes().len());
        debug_assert!(
            all.starts_with(&preference),
            "the walk starts with the primaries"
        );
        all.into_iter()
            .skip(preference.len())
            .filter(|id| view.is_alive(id))
            .take(want)
            .collect()
    };
    let next = match &view.next {
        Some(ring) => ring.preference_list(position, n),
        None => Vec::new(),
    };
    let pending = next
        .iter()
        .filter(|p| !preference.contains(p))
        .cloned()
        .collect();
    Plan {
        preference,
        primaries_alive,
        primaries_down,
        fallbacks,
        pending,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::view;
    use std::collections::BTreeSet;

    const NODES: [&str; 5] = ["a", "b", "c", "d", "e"];

    #[test]
    fn all_up_every_primary_is_alive_and_no_fallback_is_needed() {
        let v = view(&NODES, "a", &["b", "c", "d", "e"]);
        for k in 0..200u32 {
            let key = k.to_be_bytes();
            let p = plan(&v, &key, 3);
            assert_eq!(
                p.preference,
                v.ring.preference_list(key_position(&key), 3),
                "the preference list is the ring's"
            );
            assert_eq!(p.primaries_alive, p.preference);
            assert!(p.primaries_down.is_empty());
            assert!(p.fallbacks.is_empty());
            // Asked for, the fallbacks are the other two nodes, each once.
            let p = plan_with_fallbacks(&v, &key, 3, Some(5));
            assert_eq!(p.fallbacks.len(), 2);
            let all: BTreeSet<_> = p.preference.iter().chain(&p.fallbacks).collect();
            assert_eq!(all.len(), 5, "every node once");
        }
    }

    #[test]
    fn a_down_primary_is_named_and_fallbacks_skip_down_nodes_in_ring_order() {
        // Only "c" and "e" are down (this node, "a", is always alive to itself).
        let v = view(&NODES, "a", &["b", "d"]);
        for k in 0..200u32 {
            let key = k.to_be_bytes();
            let p = plan(&v, &key, 3);
            let ring_order = v.ring.preference_list(key_position(&key), 5);
            for id in &p.preference {
                let down = **id == *"c" || **id == *"e";
                assert_eq!(p.primaries_down.contains(id), down, "{id}");
                assert_eq!(p.primaries_alive.contains(id), !down, "{id}");
            }
            let expected: Vec<NodeId> = ring_order[3..]
                .iter()
                .filter(|id| ***id != *"c" && ***id != *"e")
                .take(p.primaries_down.len())
                .cloned()
                .collect();
            assert_eq!(
                p.fallbacks, expected,
                "one alive node beyond the list per down primary, nearest first"
            );
        }
    }

    #[test]
    fn a_ring_smaller_than_n_has_every_node_as_primary_and_no_fallback() {
        let v = view(&["a", "b"], "b", &[]);
        let p = plan(&v, b"k", 3);
        assert_eq!(p.preference.len(), 2);
        assert_eq!(p.primaries_alive, vec![NodeId::from("b")]);
        assert_eq!(p.primaries_down, vec![NodeId::from("a")]);
        assert!(p.fallbacks.is_empty());
        assert!(p.is_primary("a") && p.is_primary("b") && !p.is_primary("c"));
    }
}
