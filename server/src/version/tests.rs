//! Property tests of the DVV model (notes/version-vectors.md §3). States are built from random
//! histories (replicas, coordinators, contexts read from random replica subsets, blind writes,
//! pairwise syncs), never from arbitrary structs, and checked against a reference model: at a
//! replica that knows writes K, the siblings are the writes of K whose dot no other write's
//! context in K covers.

use std::collections::BTreeMap;

use super::*;
use proptest::prelude::*;
use ringkv_protocol::limits::MAX_SIBLINGLESS_ENTRIES;

#[derive(Debug, Clone)]
enum Op {
    /// Write at `replica` with the merged context of the replicas in `ctx_from` (empty = blind).
    Write {
        replica: usize,
        ctx_from: Vec<usize>,
        tombstone: bool,
    },
    Sync {
        from: usize,
        to: usize,
    },
}

fn op_strategy(replicas: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..replicas, proptest::collection::vec(0..replicas, 0..3), proptest::bool::weighted(0.15))
            .prop_map(|(replica, mut ctx_from, tombstone)| {
                // ~20% blind writes come from the empty subset; dedupe the rest.
                ctx_from.sort();
                ctx_from.dedup();
                Op::Write { replica, ctx_from, tombstone }
            }),
        2 => (0..replicas, 0..replicas).prop_map(|(from, to)| Op::Sync { from, to }),
    ]
}

fn history_strategy() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (3usize..=5).prop_flat_map(|n| (Just(n), proptest::collection::vec(op_strategy(n), 1..40)))
}

struct Sim {
    states: Vec<KeyState>,
    /// Per replica: the writes it knows, dot → the context that write carried.
    known: Vec<BTreeMap<Dot, VersionVector>>,
    /// Per actor: the last counter minted (shared by all keys in the real system).
    counters: Vec<u64>,
    written: BTreeMap<Dot, Option<Bytes>>,
    seq: u64,
}

impl Sim {
    fn new(n: usize) -> Self {
        Sim {
            states: vec![KeyState::new(); n],
            known: vec![BTreeMap::new(); n],
            counters: vec![0; n],
            written: BTreeMap::new(),
            seq: 0,
        }
    }

    fn actor(replica: usize) -> Actor {
        // Large, scattered actor ids like the real ones (random per incarnation).
        (replica as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write {
                replica,
                ctx_from,
                tombstone,
            } => {
                let mut ctx = VersionVector::new();
                for &r in ctx_from {
                    ctx.merge(self.states[r].context());
                }
                let actor = Self::actor(*replica);
                let state = &self.states[*replica];
                let counter =
                    (self.counters[*replica] + 1).max(state.min_fresh_counter(&ctx, actor));
                self.counters[*replica] = counter;
                let dot = Dot { actor, counter };
                self.seq += 1;
                let value = (!tombstone).then(|| Bytes::from(format!("v{}", self.seq)));
                let before = state.context().clone();
                let next = state.update(&ctx, dot, self.seq, value.clone());
                assert!(next.context().descends(&before), "VV shrank on update");
                self.states[*replica] = next;
                self.known[*replica].insert(dot, ctx);
                assert!(
                    self.written.insert(dot, value).is_none(),
                    "dot reused: {dot:?}"
                );
            }
            Op::Sync { from, to } => {
                let merged = self.states[*to].sync(&self.states[*from]);
                assert!(merged.context().descends(self.states[*to].context()));
                self.states[*to] = merged;
                let k = self.known[*from].clone();
                self.known[*to].extend(k);
            }
        }
    }

    fn expected_dots(&self, replica: usize) -> Vec<Dot> {
        let k = &self.known[replica];
        k.keys()
            .filter(|&&d| !k.iter().any(|(&other, ctx)| other != d && ctx.covers(d)))
            .copied()
            .collect()
    }

    fn check(&self) {
        for (i, s) in self.states.iter().enumerate() {
            s.check_invariants().unwrap();
            let dots: Vec<Dot> = s.siblings().iter().map(|x| x.dot).collect();
            assert_eq!(
                dots,
                self.expected_dots(i),
                "replica {i} differs from the model"
            );
            for sib in s.siblings() {
                assert_eq!(
                    &sib.value, &self.written[&sib.dot],
                    "dot names another value"
                );
            }
        }
    }
}

fn build(n: usize, ops: &[Op]) -> Sim {
    let mut sim = Sim::new(n);
    for op in ops {
        sim.apply(op);
        sim.check();
    }
    sim
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// §3.6: nothing concurrent is lost and nothing superseded is kept, after any interleaving;
    /// §3.7/§3.8: VVs only grow and dots are never reused (asserted inside `apply`).
    #[test]
    fn replicas_match_the_reference_model((n, ops) in history_strategy()) {
        let mut sim = build(n, &ops);
        // Full anti-entropy: everyone converges to the model over all writes.
        for _ in 0..2 {
            for from in 0..n {
                for to in 0..n {
                    sim.apply(&Op::Sync { from, to });
                }
            }
        }
        sim.check();
        for s in &sim.states[1..] {
            prop_assert_eq!(s.encode(), sim.states[0].encode());
        }
    }

    /// §3.1 and §3.2: sync is commutative, associative, idempotent; join of sync is the max.
    #[test]
    fn sync_is_a_join_semilattice((n, ops) in history_strategy(), a in 0usize..3, b in 0usize..3, c in 0usize..3) {
        let sim = build(n, &ops);
        let (s, t, u) = (&sim.states[a], &sim.states[b], &sim.states[c]);
        prop_assert_eq!(s.sync(t).encode(), t.sync(s).encode());
        prop_assert_eq!(s.sync(t).sync(u).encode(), s.sync(&t.sync(u)).encode());
        prop_assert_eq!(s.sync(s).encode(), s.encode());
        let mut join = s.context().clone();
        join.merge(t.context());
        let synced = s.sync(t);
        prop_assert_eq!(synced.context(), &join);
        if s.less(t) {
            prop_assert_eq!(s.sync(t).encode(), t.encode());
        }
    }

    /// §3.3–3.5: an update drops exactly the siblings its context covers.
    #[test]
    fn update_drops_exactly_what_the_context_covers((n, ops) in history_strategy(), r in 0usize..3, full in any::<bool>(), blind in any::<bool>()) {
        let sim = build(n, &ops);
        let s = &sim.states[r];
        let ctx = if blind { VersionVector::new() } else if full { s.context().clone() } else {
            sim.states[(r + 1) % n].context().clone()
        };
        let actor = Sim::actor(r);
        let dot = Dot { actor, counter: s.min_fresh_counter(&ctx, actor).max(sim.counters[r] + 1) };
        let next = s.update(&ctx, dot, 0, Some(Bytes::from_static(b"new")));
        let kept: Vec<Dot> = next.siblings().iter().map(|x| x.dot).filter(|&d| d != dot).collect();
        let expect: Vec<Dot> = s.siblings().iter().map(|x| x.dot).filter(|&d| !ctx.covers(d)).collect();
        prop_assert_eq!(&kept, &expect);
        if full && !blind {
            prop_assert_eq!(next.siblings().len(), 1);
        }
        if blind {
            prop_assert_eq!(next.siblings().len(), s.siblings().len() + 1);
        }
    }

    /// §3.12: the codec round-trips canonically and arbitrary bytes never panic it.
    #[test]
    fn codec_round_trips((n, ops) in history_strategy()) {
        let sim = build(n, &ops);
        for s in &sim.states {
            let bytes = s.encode();
            let back = KeyState::decode(&bytes).unwrap();
            prop_assert_eq!(&back, s);
            prop_assert_eq!(back.encode(), bytes);
        }
    }

    #[test]
    fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = KeyState::decode(&data);
    }
}

/// §1 / §3.9: two clients alternating writes, each with the context of its own previous write,
/// keep at most 2 siblings forever (server-id VVs would grow one sibling per write).
#[test]
fn alternating_writers_do_not_explode() {
    let actor = 1;
    let mut s = KeyState::new();
    let mut ctx_x = VersionVector::new();
    let mut ctx_y = VersionVector::new();
    for i in 1..=101u64 {
        let ctx = if i % 2 == 1 { &ctx_x } else { &ctx_y };
        let dot = Dot { actor, counter: i };
        s = s.update(ctx, dot, i, Some(Bytes::from(i.to_string())));
        assert!(
            s.siblings().len() <= 2,
            "step {i}: {} siblings",
            s.siblings().len()
        );
        // Each client keeps the context returned by its own write (put_returning).
        if i % 2 == 1 {
            ctx_x = s.context().clone();
        } else {
            ctx_y = s.context().clone();
        }
    }
}

/// The worked examples E2 and E4 of the note.
#[test]
fn worked_examples() {
    let a = 10;
    let b = 20;
    let v = |s: &str| Some(Bytes::from(s.to_string()));
    let d = |actor, counter| Dot { actor, counter };
    let s1 = KeyState::new().update(&VersionVector::new(), d(a, 1), 1, v("v1"));
    let read = s1.context().clone();
    // E2: X writes v2 at A, Y writes v3 at B (B had synced v1), both from {A:1}.
    let at_a = s1.update(&read, d(a, 2), 2, v("v2"));
    let at_b = s1.update(&read, d(b, 1), 3, v("v3"));
    let merged = at_a.sync(&at_b);
    assert_eq!(merged, at_b.sync(&at_a));
    let vals: Vec<_> = merged.siblings().iter().map(|s| s.value.clone()).collect();
    assert_eq!(vals, vec![v("v2"), v("v3")]);
    // E2.4: resolving with the merged context collapses to one.
    let resolved = merged.update(merged.context(), d(a, 3), 4, v("v4"));
    assert_eq!(resolved.siblings().len(), 1);
    // E4: a delete and a concurrent put both survive as siblings; a read shows both.
    let del = resolved.update(resolved.context(), d(a, 4), 5, None);
    let put = resolved.update(resolved.context(), d(b, 2), 6, v("v5"));
    let both = del.sync(&put);
    assert_eq!(both.siblings().len(), 2);
    assert!(both.has_live_value());
    assert!(both.siblings().iter().any(|s| s.value.is_none()));
}

/// A history where nodes get new incarnations (actors of the same node tag with larger
/// stamps) and every update and merge prunes retired entries at a threshold of 1, so pruning
/// happens all the time.
#[derive(Debug, Clone)]
enum RotatingOp {
    Op(Op),
    Renew { replica: usize },
}

fn rotating_history() -> impl Strategy<Value = (usize, Vec<RotatingOp>)> {
    (3usize..=4).prop_flat_map(|n| {
        let op = prop_oneof![
            5 => op_strategy(n).prop_map(RotatingOp::Op),
            1 => (0..n).prop_map(|replica| RotatingOp::Renew { replica }),
        ];
        (Just(n), proptest::collection::vec(op, 1..60))
    })
}

struct PruneSim {
    states: Vec<KeyState>,
    known: Vec<BTreeMap<Dot, VersionVector>>,
    actors: Vec<Actor>,
    counters: BTreeMap<Actor, u64>,
    written: BTreeMap<Dot, Option<Bytes>>,
    seq: u64,
}

const PRUNE_ABOVE: usize = 1;

impl PruneSim {
    fn new(n: usize) -> Self {
        PruneSim {
            states: vec![KeyState::new(); n],
            known: vec![BTreeMap::new(); n],
            actors: (0..n)
                .map(|r| ((r as u64 + 1) << ACTOR_STAMP_BITS) | 1)
                .collect(),
            counters: BTreeMap::new(),
            written: BTreeMap::new(),
            seq: 0,
        }
    }

    fn apply(&mut self, op: &RotatingOp) {
        match op {
            RotatingOp::Renew { replica } => self.actors[*replica] += 1,
            RotatingOp::Op(Op::Write {
                replica,
                ctx_from,
                tombstone,
            }) => {
                // The context a client gets from reading those replicas.
                let mut read = KeyState::new();
                for &r in ctx_from {
                    read = read.sync(&self.states[r]);
                }
                let ctx = read.client_view().context;
                let actor = self.actors[*replica];
                let state = &self.states[*replica];
                assert!(
                    ctx.get(actor) <= state.context().get(actor),
                    "our live actor's entry was pruned from our own copy"
                );
                let counter = self.counters.entry(actor).or_insert(0);
                *counter += 1;
                let dot = Dot {
                    actor,
                    counter: *counter,
                };
                self.seq += 1;
                let value = (!tombstone).then(|| Bytes::from(format!("v{}", self.seq)));
                let mut next = state.update(&ctx, dot, self.seq, value.clone());
                next.prune_retired_above(PRUNE_ABOVE);
                self.states[*replica] = next;
                self.known[*replica].insert(dot, ctx);
                assert!(self.written.insert(dot, value).is_none(), "dot reused");
            }
            RotatingOp::Op(Op::Sync { from, to }) => {
                let mut merged = self.states[*to].sync(&self.states[*from]);
                merged.prune_retired_above(PRUNE_ABOVE);
                self.states[*to] = merged;
                let k = self.known[*from].clone();
                self.known[*to].extend(k);
            }
        }
    }

    /// Nothing concurrent is lost: every write no known context covers is still a sibling.
    /// (Pruning may keep superseded ones: a stale copy can reappear, never vanish.)
    fn check(&self) {
        for (i, s) in self.states.iter().enumerate() {
            s.check_invariants().unwrap();
            let k = &self.known[i];
            let held: Vec<Dot> = s.siblings().iter().map(|x| x.dot).collect();
            for &d in k.keys() {
                let superseded = k.iter().any(|(&o, ctx)| o != d && ctx.covers(d));
                assert!(
                    superseded || held.contains(&d),
                    "replica {i} lost the concurrent write {d:?}"
                );
            }
            for sib in s.siblings() {
                assert!(k.contains_key(&sib.dot), "a sibling nobody wrote here");
                assert_eq!(&sib.value, &self.written[&sib.dot]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Pruning retired entries never drops a concurrent write, and replicas still converge.
    #[test]
    fn pruning_retired_entries_loses_no_write_and_replicas_converge((n, ops) in rotating_history()) {
        let mut sim = PruneSim::new(n);
        for op in &ops {
            sim.apply(op);
            sim.check();
        }
        let mut rounds = 0;
        loop {
            let before: Vec<Vec<u8>> = sim.states.iter().map(|s| s.encode()).collect();
            for from in 0..n {
                for to in 0..n {
                    sim.apply(&RotatingOp::Op(Op::Sync { from, to }));
                }
            }
            sim.check();
            let after: Vec<Vec<u8>> = sim.states.iter().map(|s| s.encode()).collect();
            if after == before {
                break;
            }
            rounds += 1;
            prop_assert!(rounds < 10, "replicas never settle");
        }
        for s in &sim.states[1..] {
            prop_assert_eq!(s.encode(), sim.states[0].encode());
        }
    }
}

#[test]
fn pruning_drops_only_retired_entries_without_siblings_oldest_first() {
    let node = |tag: u64, stamp: u64| (tag << ACTOR_STAMP_BITS) | stamp;
    let mut counter = 0;
    let mut write = |s: &KeyState, actor, ctx: &VersionVector| {
        counter += 1;
        s.update(ctx, Dot { actor, counter }, counter, Some(Bytes::from("v")))
    };
    // Node 2 writes once; then 40 incarnations of node 1 each overwrite the key; then an old
    // incarnation of node 3 writes blind and its next incarnation overwrites everything.
    let mut s = write(&KeyState::new(), node(2, 5), &VersionVector::new());
    for stamp in 1..=40 {
        let ctx = s.context().clone();
        s = write(&s, node(1, stamp), &ctx);
    }
    s = write(&s, node(3, 1), &VersionVector::new());
    let ctx = s.context().clone();
    s = write(&s, node(3, 2), &ctx);
    let before = s.clone();
    // Sibling-less: node 1 stamps 1..=40 (1..=39 retired), node 2 (live), node 3 stamp 1
    // (retired): 42 > 32, so the 10 oldest retired ones go.
    let dropped = s.prune_retired();
    assert_eq!(dropped, 42 - MAX_SIBLINGLESS_ENTRIES);
    for stamp in 1..=9 {
        assert_eq!(s.context().get(node(1, stamp)), 0, "stamp {stamp} pruned");
    }
    assert_eq!(s.context().get(node(3, 1)), 0, "stamp 1 of node 3 pruned");
    assert!(
        s.context().get(node(1, 10)) > 0,
        "younger retired entries stay"
    );
    assert!(
        s.context().get(node(1, 40)) > 0,
        "the newest incarnation is live"
    );
    assert!(
        s.context().get(node(2, 5)) > 0,
        "a live actor is never pruned"
    );
    assert!(
        s.context().get(node(3, 2)) > 0,
        "an actor with a sibling is kept"
    );
    assert_eq!(s.siblings(), before.siblings());
    assert_eq!(s.clone().prune_retired(), 0, "idempotent");
}

/// A state beyond what one reply carries is shown in pages: a write with the page's context
/// replaces exactly the shown siblings, keeps the hidden ones, and the next read shows them.
#[test]
fn a_state_beyond_one_reply_is_resolved_page_by_page() {
    use ringkv_protocol::limits::MAX_STATE_SIBLINGS;
    let mut s = KeyState::new();
    let total = MAX_STATE_SIBLINGS + 57;
    for i in 0..total {
        // Several actors, interleaved, so the cut falls inside one actor's run.
        let actor = (i % 7) as u64 + 1;
        let dot = Dot {
            actor,
            counter: (i / 7) as u64 + 1,
        };
        s = s.update(
            &VersionVector::new(),
            dot,
            0,
            Some(Bytes::from(format!("v{i}"))),
        );
    }
    assert_eq!(s.siblings().len(), total);
    let view = s.client_view();
    assert_eq!((view.shown.len(), view.hidden), (MAX_STATE_SIBLINGS, 57));
    let shown: Vec<Dot> = view.shown.iter().map(|x| x.dot).collect();
    for sib in s.siblings() {
        assert_eq!(
            view.context.covers(sib.dot),
            shown.contains(&sib.dot),
            "the context covers exactly the shown siblings ({:?})",
            sib.dot
        );
    }
    let resolved = s.update(
        &view.context,
        Dot {
            actor: 99,
            counter: 1,
        },
        0,
        Some(Bytes::from_static(b"resolved")),
    );
    assert_eq!(resolved.siblings().len(), 57 + 1);
    let next = resolved.client_view();
    assert_eq!(next.hidden, 0);
    let last = resolved.update(
        &next.context,
        Dot {
            actor: 99,
            counter: 2,
        },
        0,
        Some(Bytes::from_static(b"all")),
    );
    assert_eq!(last.siblings().len(), 1);
    // A state within the bounds is shown whole with its full vector as the context.
    let small = last.client_view();
    assert_eq!((small.shown.len(), small.hidden), (1, 0));
    assert_eq!(&small.context, last.context());
}

#[test]
fn a_sibling_with_counter_zero_is_refused_by_the_decoder() {
    // format 1, VV {actor 7: 1}, one sibling (actor 7, counter 0, ts 0, value "x").
    let mut bytes = vec![1u8, 1];
    bytes.extend_from_slice(&7u64.to_be_bytes());
    bytes.push(1);
    bytes.push(1);
    bytes.extend_from_slice(&7u64.to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 1, 1, b'x']);
    assert_eq!(
        KeyState::decode(&bytes),
        Err(StateDecodeError::Invalid("sibling with counter 0"))
    );
    // The same with counter 1 decodes.
    bytes[20] = 1;
    assert!(KeyState::decode(&bytes).is_ok());
}
