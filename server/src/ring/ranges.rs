//! Which parts of the ring this node shares with each other replica, which it no longer
//! replicates, and how much of the ring spans cover (sans-IO; the aae and cluster services use it).
//!
//! Over each arc (previous token, token] the preference list is the same, so two nodes both
//! replicate an arc or neither does. A node exchanges with each peer the arcs they share,
//! merged where adjacent, as non-wrapping inclusive position spans.

use std::collections::BTreeMap;

pub use ringkv_protocol::ring::{push_span, Span};
use ringkv_protocol::ring::{NodeId, Ring};

/// Whether ascending, disjoint, merged `spans` (as `push_span` builds them) hold every position
/// of `first..=last`.
pub fn covers(spans: &[Span], first: u64, last: u64) -> bool {
    spans.iter().any(|&(a, b)| a <= first && last <= b)
}

/// The parts of `spans` an exchange may use: inside `range` (a requested repair) and below
/// `untrusted_from` (the first position of a tree still being rebuilt). `None` when nothing
/// restricts them (all of `spans`).
pub fn clip_spans(
    spans: &[Span],
    range: Option<Span>,
    untrusted_from: Option<u64>,
) -> Option<Vec<Span>> {
    // The last trusted position: none at all while the rebuild has not passed position 0.
    let trusted_last = match untrusted_from {
        Some(0) => return Some(Vec::new()),
        Some(from) => Some(from - 1),
        None => None,
    };
    let (lo, hi) = match (range, trusted_last) {
        (None, None) => return None,
        (Some(r), None) => r,
        (None, Some(t)) => (0, t),
        (Some((a, b)), Some(t)) => (a, b.min(t)),
    };
    Some(
        spans
            .iter()
            .filter(|&&(first, last)| first <= hi && last >= lo && lo <= hi)
            .map(|&(first, last)| (first.max(lo), last.min(hi)))
            .collect(),
    )
}

/// For every other node, the spans of positions whose first `n` replicas include both it and
/// `me`, in ascending order, adjacent spans merged.
pub fn shared_spans(ring: &Ring, me: &str, n: usize) -> BTreeMap<NodeId, Vec<Span>> {
    let tokens = ring.tokens();
    let mut out: BTreeMap<NodeId, Vec<Span>> = BTreeMap::new();
    if tokens.is_empty() {
        return out;
    }
    let mut arcs: Vec<(Span, u64)> = Vec::with_capacity(tokens.len() + 1);
    // (0 ..= first token) and (last token .. MAX] both belong to the first token.
    arcs.push(((0, tokens[0]), tokens[0]));
    for w in tokens.windows(2) {
        arcs.push(((w[0] + 1, w[1]), w[1]));
    }
    let last = *tokens.last().expect("not empty");
    if last < u64::MAX {
        arcs.push(((last + 1, u64::MAX), tokens[0]));
    }
    for ((first, end), token) in arcs {
        let prefs = ring.preference_list(token, n);
        if !prefs.iter().any(|p| &**p == me) {
            continue;
        }
        for peer in prefs.iter().filter(|p| &***p != me) {
            push_span(out.entry(peer.clone()).or_default(), (first, end));
        }
    }
    out
}

/// The positions `me` does not replicate (among the first `n` replicas) in `ring`: every
/// position when it is not in the ring. Ascending, merged.
pub fn foreign_spans(ring: &Ring, me: &str, n: usize) -> Vec<Span> {
    let tokens = ring.tokens();
    let Some(&first) = tokens.first() else {
        return vec![(0, u64::MAX)];
    };
    let last = *tokens.last().expect("not empty");
    let mut arcs: Vec<Span> = vec![(0, first)];
    arcs.extend(tokens.windows(2).map(|w| (w[0] + 1, w[1])));
    if last < u64::MAX {
        arcs.push((last + 1, u64::MAX));
    }
    let mut out = Vec::new();
    for (a, b) in arcs {
        if !ring.preference_list(b, n).iter().any(|p| &**p == me) {
            push_span(&mut out, (a, b));
        }
    }
    out
}

/// The share of the ring (0..=1) that disjoint `spans` cover.
pub fn share(spans: &[Span]) -> f64 {
    // A fold from +0.0: an empty f64 `sum` is -0.0, shown as "-0.0%".
    let positions = spans.iter().fold(0.0, |n, (a, b)| n + (b - a) as f64 + 1.0);
    positions / (u64::MAX as f64 + 1.0)
}

/// Spans as an error or a log line names them: how many, their share of the ring, and the
/// first few as inclusive position ranges (`ShownSpans(&spans)`).
pub struct ShownSpans<'a>(pub &'a [Span]);

/// How many spans a `ShownSpans` lists before it says how many more there are.
const SHOWN_SPANS: usize = 3;

impl std::fmt::Display for ShownSpans<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let spans = self.0;
        let pct = share(spans) * 100.0;
        write!(f, "{} span(s), {pct:.2}% of the ring:", spans.len())?;
        for (a, b) in spans.iter().take(SHOWN_SPANS) {
            write!(f, " {a:016x}..={b:016x}")?;
        }
        if spans.len() > SHOWN_SPANS {
            write!(f, " and {} more", spans.len() - SHOWN_SPANS)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_spans_name_their_positions_and_share() {
        assert_eq!(
            ShownSpans(&[(0, u64::MAX / 2)]).to_string(),
            "1 span(s), 50.00% of the ring: 0000000000000000..=7fffffffffffffff"
        );
        let many = [
            (0, 0),
            (16, 31),
            (256, 511),
            (4096, 4096),
            (1 << 40, 1 << 41),
        ];
        let shown = ShownSpans(&many).to_string();
        assert_eq!(shown, "5 span(s), 0.00% of the ring: 0000000000000000..=0000000000000000 0000000000000010..=000000000000001f 0000000000000100..=00000000000001ff and 2 more");
        assert_eq!(ShownSpans(&[]).to_string(), "0 span(s), 0.00% of the ring:");
    }

    #[test]
    fn exchanges_use_only_the_requested_and_trusted_positions() {
        let spans = vec![(0, 99), (200, 299)];
        assert_eq!(clip_spans(&spans, None, None), None, "nothing restricts");
        assert_eq!(
            clip_spans(&spans, Some((50, 249)), None),
            Some(vec![(50, 99), (200, 249)])
        );
        assert_eq!(
            clip_spans(&spans, None, Some(250)),
            Some(vec![(0, 99), (200, 249)])
        );
        assert_eq!(
            clip_spans(&spans, Some((50, 299)), Some(220)),
            Some(vec![(50, 99), (200, 219)])
        );
        // A rebuild that has trusted nothing yet: no position takes part.
        assert_eq!(clip_spans(&spans, None, Some(0)), Some(vec![]));
        assert_eq!(clip_spans(&spans, Some((0, 99)), Some(0)), Some(vec![]));
        assert_eq!(clip_spans(&spans, Some((100, 199)), None), Some(vec![]));
    }

    /// A key is in a node's foreign spans exactly when the node is not among its replicas.
    #[test]
    fn foreign_spans_hold_exactly_the_keys_a_node_does_not_replicate() {
        let r = ring(5, 16);
        for me in ["n1", "n3", "stranger"] {
            let spans = foreign_spans(&r, me, 3);
            for i in 0..2000u32 {
                let key = format!("k{i}");
                let pos = key_position(key.as_bytes());
                let replica = r.preference_list(pos, 3).iter().any(|p| &**p == me);
                let foreign = spans.iter().any(|&(a, b)| a <= pos && pos <= b);
                assert_eq!(replica, !foreign, "{me} {key}");
            }
        }
        assert_eq!(foreign_spans(&r, "stranger", 3), vec![(0, u64::MAX)]);
    }

    #[test]
    fn covers_needs_one_span_holding_the_whole_range() {
        let mut spans = Vec::new();
        push_span(&mut spans, (0, 9));
        push_span(&mut spans, (10, 19)); // touching: merged
        push_span(&mut spans, (30, 39));
        assert!(covers(&spans, 5, 15));
        assert!(covers(&spans, 30, 39));
        assert!(!covers(&spans, 15, 25), "a gap at 20..=29");
        assert!(!covers(&spans, 35, 45));
    }
    use ringkv_protocol::ring::key_position;

    fn ring(nodes: usize, vnodes: u32) -> Ring {
        Ring::new((1..=nodes).map(|i| (format!("n{i}"), vnodes)))
    }

    /// A key's position is in the spans shared by me and peer exactly when both are among its
    /// first n replicas.
    #[test]
    fn spans_hold_exactly_the_keys_both_replicate() {
        for (nodes, n) in [(3, 3), (5, 3), (4, 2), (6, 3)] {
            let r = ring(nodes, 16);
            for me in 1..=nodes {
                let me = format!("n{me}");
                let spans = shared_spans(&r, &me, n);
                for i in 0..2000u32 {
                    let key = format!("k{i}");
                    let pos = key_position(key.as_bytes());
                    let prefs = r.preference_list(pos, n);
                    let mine = prefs.iter().any(|p| **p == *me);
                    for peer in r.nodes().iter().filter(|p| ***p != *me) {
                        let both = mine && prefs.contains(peer);
                        let inside = spans
                            .get(peer)
                            .is_some_and(|s| s.iter().any(|&(a, b)| a <= pos && pos <= b));
                        assert_eq!(both, inside, "{nodes} nodes, n={n}, {me}/{peer}, {key}");
                    }
                }
                // Spans are ordered, disjoint, not adjacent (merged).
                for s in spans.values() {
                    for w in s.windows(2) {
                        assert!(w[0].1 < w[1].0 && w[0].1 + 1 < w[1].0, "{s:?}");
                    }
                }
            }
        }
    }

    /// With N = number of nodes, every node shares the whole ring with every other.
    #[test]
    fn full_replication_shares_the_whole_ring() {
        let r = ring(3, 8);
        let spans = shared_spans(&r, "n1", 3);
        assert_eq!(spans.len(), 2);
        for s in spans.values() {
            assert_eq!(s, &vec![(0, u64::MAX)]);
        }
    }
}
