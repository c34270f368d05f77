//! The anti-entropy hash tree (sans-IO): one tree per node over the whole ring, TicTac style
//! (kept by `storage::tree` in the write path, compared by the `aae` service).
//!
//! The ring's positions (`key_position`, the top bits of a key's xxh3) are cut into
//! [`LEAVES`] equal leaves (2^20, Riak TicTac's segment count). A leaf's value is the XOR of
//! the contributions of the keys in it, a contribution being a hash of the key and its stored
//! state ([`contribution`]); two upper levels hold the XOR of 64 children each, and the root the
//! XOR of everything. XOR makes the tree independent of write order and lets a write replace its
//! old contribution by its new one in O(levels) ([`Tree::xor_leaf`]), without a rescan.
//!
//! The tree covers every key the node stores, whatever range it belongs to. Two replicas compare
//! the part of their trees inside a ring range they both replicate: the leaves fully inside the
//! range, whole upper nodes where a node is fully inside ([`Tree::range_hash`]), descending only
//! into differing cells ([`Cell`], [`differing_leaves`]). A range's edge leaves may also hold
//! keys of the neighbouring range (owned by other nodes): [`leaf_span`] names them so that an
//! exchange compares their keys one by one instead.

use xxhash_rust::xxh3::Xxh3;

/// Bits of a position that choose its leaf.
pub const LEAF_BITS: u32 = 20;
/// Leaves in a tree.
pub const LEAVES: usize = 1 << LEAF_BITS;
/// Children per upper node (as bits).
pub const FANOUT_BITS: u32 = 6;
/// Levels: 0 = leaves (2^20), 1 (2^14), 2 (2^8); the root is the XOR of level 2.
pub const LEVELS: usize = 3;

/// The leaf of a ring position.
pub fn leaf_of(position: u64) -> u32 {
    (position >> (64 - LEAF_BITS)) as u32
}

/// The first ring position of a leaf.
pub fn leaf_start(leaf: u32) -> u64 {
    (leaf as u64) << (64 - LEAF_BITS)
}

/// The last ring position of a leaf.
pub fn leaf_end(leaf: u32) -> u64 {
    leaf_start(leaf) | ((1u64 << (64 - LEAF_BITS)) - 1)
}

/// A key's contribution to its leaf: a hash of the key and its stored (canonical) encoding;
/// an absent key contributes 0.
pub fn contribution(key: &[u8], encoded_state: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&(key.len() as u32).to_be_bytes());
    h.update(key);
    h.update(encoded_state);
    h.digest()
}

/// The leaves of the positions `first..=last` (not wrapping): `whole` the leaves entirely
/// inside (`None` if none), and the edge leaves that also hold positions outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpan {
    pub whole: Option<(u32, u32)>,
    pub partial: Vec<u32>,
}

pub fn leaf_span(first: u64, last: u64) -> LeafSpan {
    assert!(
        first <= last,
        "a span does not wrap: split it at the top of the ring"
    );
    let (a, b) = (leaf_of(first), leaf_of(last));
    let mut partial = Vec::new();
    let lo = if leaf_start(a) == first {
        a
    } else {
        partial.push(a);
        a + 1
    };
    let hi = if leaf_end(b) == last {
        Some(b)
    } else {
        if b != a || partial.is_empty() {
            partial.push(b);
        }
        b.checked_sub(1)
    };
    let whole = match hi {
        Some(hi) if lo <= hi && a <= hi => Some((lo, hi)),
        _ => None,
    };
    LeafSpan { whole, partial }
}

/// A node of the tree, clipped to a leaf range: the unit two replicas compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    pub level: u8,
    pub index: u32,
    /// Inclusive leaf range this cell covers (its node's leaves, clipped to the compared range).
    pub first: u32,
    pub last: u32,
}

impl Cell {
    /// The cells at the top level covering `first..=last`.
    pub fn top(first: u32, last: u32) -> Vec<Cell> {
        cells_at((LEVELS - 1) as u8, first, last)
    }

    /// This cell's children, clipped to its range (none for a leaf).
    pub fn children(&self) -> Vec<Cell> {
        if self.level == 0 {
            return Vec::new();
        }
        cells_at(self.level - 1, self.first, self.last)
    }
}

fn cells_at(level: u8, first: u32, last: u32) -> Vec<Cell> {
    let shift = FANOUT_BITS * level as u32;
    (first >> shift..=last >> shift)
        .map(|index| Cell {
            level,
            index,
            first: first.max(index << shift),
            last: last.min(((index + 1) << shift) - 1),
        })
        .collect()
}

/// Leaf values and their XOR aggregates.
#[derive(Clone, PartialEq, Eq)]
pub struct Tree {
    /// `levels[0]` the leaves, `levels[l]` the XOR of 64 nodes of level `l - 1`.
    levels: [Vec<u64>; LEVELS],
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tree(root {:016x})", self.root())
    }
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    pub fn new() -> Tree {
        Tree {
            levels: std::array::from_fn(|l| vec![0; LEAVES >> (FANOUT_BITS as usize * l)]),
        }
    }

    pub fn leaf(&self, leaf: u32) -> u64 {
        self.levels[0][leaf as usize]
    }

    /// XORs `delta` into a leaf and its ancestors (a key's old contribution XOR its new one).
    pub fn xor_leaf(&mut self, leaf: u32, delta: u64) {
        for (l, level) in self.levels.iter_mut().enumerate() {
            level[(leaf >> (FANOUT_BITS * l as u32)) as usize] ^= delta;
        }
    }

    /// Sets a leaf (loading stored leaves).
    pub fn set_leaf(&mut self, leaf: u32, value: u64) {
        let delta = self.leaf(leaf) ^ value;
        self.xor_leaf(leaf, delta);
    }

    pub fn root(&self) -> u64 {
        self.levels[LEVELS - 1].iter().fold(0, |a, &x| a ^ x)
    }

    /// The XOR of the leaves `first..=last`, from whole upper nodes where they fit.
    pub fn range_hash(&self, first: u32, last: u32) -> u64 {
        self.cell_hash(&Cell {
            level: LEVELS as u8,
            index: 0,
            first,
            last,
        })
    }

    /// A cell's hash: its node's if the cell is the whole node, else the XOR of its children's.
    pub fn cell_hash(&self, cell: &Cell) -> u64 {
        let shift = FANOUT_BITS * cell.level as u32;
        let whole = cell.first == cell.index << shift
            && cell.last == ((cell.index as u64 + 1) << shift) as u32 - 1;
        if (cell.level as usize) < LEVELS && whole {
            return self.levels[cell.level as usize][cell.index as usize];
        }
        if cell.level == 0 {
            return self.leaf(cell.first);
        }
        cells_at(cell.level - 1, cell.first, cell.last)
            .iter()
            .fold(0, |a, c| a ^ self.cell_hash(c))
    }

    /// Leaves with a non-zero value (storage of a tree: only these are kept).
    pub fn nonzero_leaves(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.levels[0]
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0)
            .map(|(i, &v)| (i as u32, v))
    }
}

/// What a descent between two trees over `first..=last` found, and what it compared.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Descent {
    pub leaves: Vec<u32>,
    /// Cell hashes compared (each one 8 bytes on the wire from each side).
    pub compared: usize,
    /// Round trips: one per level reached.
    pub rounds: usize,
}

/// The leaves in `first..=last` where `a` and `b` differ, found by descending only into
/// differing cells, level by level (what an exchange does over the network, one round trip
/// per level).
pub fn differing_leaves(a: &Tree, b: &Tree, first: u32, last: u32) -> Descent {
    let mut out = Descent::default();
    let mut frontier = Cell::top(first, last);
    while !frontier.is_empty() {
        out.rounds += 1;
        out.compared += frontier.len();
        let differ: Vec<Cell> = frontier
            .into_iter()
            .filter(|c| a.cell_hash(c) != b.cell_hash(c))
            .collect();
        frontier = Vec::new();
        for c in differ {
            if c.level == 0 {
                out.leaves.push(c.first);
            } else {
                frontier.extend(c.children());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A tree of `keys` (position, contribution), inserted in the given order.
    fn tree_of(keys: &[(u64, u64)]) -> Tree {
        let mut t = Tree::new();
        for &(pos, c) in keys {
            t.xor_leaf(leaf_of(pos), c);
        }
        t
    }

    /// The leaf values computed directly, for comparison.
    fn leaves_of(keys: &[(u64, u64)]) -> BTreeMap<u32, u64> {
        let mut m = BTreeMap::new();
        for &(pos, c) in keys {
            *m.entry(leaf_of(pos)).or_insert(0) ^= c;
        }
        m.retain(|_, v| *v != 0);
        m
    }

    fn keys() -> impl Strategy<Value = Vec<(u64, u64)>> {
        // Positions clustered in a few leaves too, so leaves hold several keys.
        prop::collection::vec(
            (
                prop_oneof![any::<u64>(), (0u64..4).prop_map(|x| x << 44)],
                1u64..,
            ),
            0..200,
        )
    }

    proptest! {
        #[test]
        fn equal_contents_give_equal_roots_whatever_the_write_order(
            keys in keys(),
            seed in any::<u64>(),
        ) {
            let a = tree_of(&keys);
            let mut shuffled = keys.clone();
            // A deterministic shuffle from the seed.
            let n = shuffled.len();
            for i in (1..n).rev() {
                let j = (seed.wrapping_mul(i as u64 + 1).rotate_left(17) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            let b = tree_of(&shuffled);
            prop_assert_eq!(a.root(), b.root());
            prop_assert!(a == b);
            prop_assert_eq!(a.nonzero_leaves().collect::<BTreeMap<_, _>>(), leaves_of(&keys));
        }

        #[test]
        fn an_update_equals_a_rebuild(keys in keys(), which in any::<prop::sample::Index>(), new in 1u64..) {
            prop_assume!(!keys.is_empty());
            let i = which.index(keys.len());
            let mut t = tree_of(&keys);
            // Replace key i's contribution by `new`, as the write path does.
            t.xor_leaf(leaf_of(keys[i].0), keys[i].1 ^ new);
            let mut changed = keys.clone();
            changed[i].1 = new;
            prop_assert!(t == tree_of(&changed));
            // Removing every key's contribution leaves the empty tree (XOR cancellation).
            for &(pos, c) in &changed {
                t.xor_leaf(leaf_of(pos), c);
            }
            prop_assert!(t == Tree::new());
            prop_assert_eq!(t.root(), 0);
        }

        #[test]
        fn one_differing_key_changes_the_root_and_is_found_by_descent(
            keys in keys(),
            extra in (any::<u64>(), 1u64..),
        ) {
            let a = tree_of(&keys);
            let mut more = keys.clone();
            more.push(extra);
            let b = tree_of(&more);
            prop_assert_ne!(a.root(), b.root());
            let d = differing_leaves(&a, &b, 0, LEAVES as u32 - 1);
            prop_assert_eq!(d.leaves, vec![leaf_of(extra.0)]);
            prop_assert_eq!(d.rounds, LEVELS);
            // Proportional to the difference: the top level plus 64 cells per level below.
            prop_assert!(d.compared <= 256 + 64 * LEVELS, "{}", d.compared);
        }

        #[test]
        fn range_hashes_are_the_xor_of_their_leaves(keys in keys(), x in any::<u32>(), y in any::<u32>()) {
            let t = tree_of(&keys);
            let (first, last) = {
                let (x, y) = (x % LEAVES as u32, y % LEAVES as u32);
                (x.min(y), x.max(y))
            };
            let direct = leaves_of(&keys)
                .range(first..=last)
                .fold(0, |a, (_, v)| a ^ v);
            prop_assert_eq!(t.range_hash(first, last), direct);
        }

        #[test]
        fn a_descent_over_a_range_finds_exactly_the_differing_leaves_inside_it(
            keys in keys(),
            others in keys(),
            x in any::<u32>(),
            y in any::<u32>(),
        ) {
            let a = tree_of(&keys);
            let mut all = keys.clone();
            all.extend(others.iter().copied());
            let b = tree_of(&all);
            let (first, last) = {
                let (x, y) = (x % LEAVES as u32, y % LEAVES as u32);
                (x.min(y), x.max(y))
            };
            let la = leaves_of(&keys);
            let lb = leaves_of(&all);
            let touched: std::collections::BTreeSet<u32> =
                la.keys().chain(lb.keys()).copied().filter(|l| (first..=last).contains(l)).collect();
            let expected: Vec<u32> =
                touched.into_iter().filter(|l| la.get(l) != lb.get(l)).collect();
            let d = differing_leaves(&a, &b, first, last);
            prop_assert_eq!(d.leaves, expected);
        }
    }

    #[test]
    fn leaf_spans_name_the_partial_edges() {
        let w = 1u64 << (64 - LEAF_BITS);
        // Exactly leaves 2..=4.
        assert_eq!(
            leaf_span(2 * w, 5 * w - 1),
            LeafSpan {
                whole: Some((2, 4)),
                partial: vec![]
            }
        );
        // From inside leaf 2 to inside leaf 5: 3..=4 whole, 2 and 5 partial.
        assert_eq!(
            leaf_span(2 * w + 7, 5 * w + 3),
            LeafSpan {
                whole: Some((3, 4)),
                partial: vec![2, 5]
            }
        );
        // Inside one leaf.
        assert_eq!(
            leaf_span(2 * w + 1, 2 * w + 9),
            LeafSpan {
                whole: None,
                partial: vec![2]
            }
        );
        // The whole ring.
        assert_eq!(
            leaf_span(0, u64::MAX),
            LeafSpan {
                whole: Some((0, LEAVES as u32 - 1)),
                partial: vec![]
            }
        );
        // Two adjacent partial leaves, nothing whole.
        assert_eq!(
            leaf_span(2 * w + 1, 3 * w + 1),
            LeafSpan {
                whole: None,
                partial: vec![2, 3]
            }
        );
    }

    #[test]
    fn contributions_depend_on_key_and_state() {
        let c = contribution(b"k", b"state");
        assert_ne!(c, contribution(b"k", b"other"));
        assert_ne!(c, contribution(b"j", b"state"));
        // The key length is part of the hash: ("ab", "c") is not ("a", "bc").
        assert_ne!(contribution(b"ab", b"c"), contribution(b"a", b"bc"));
    }
}
