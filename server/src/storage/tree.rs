//! The anti-entropy tree (`merkle`) in the write path and on disk.
//!
//! The writer calls [`TreeHook`] for every change of a key's state: it XORs the key's old
//! contribution out of its leaf and the new one in; before the group is written, each changed
//! leaf's final value goes into the same RocksDB batch as the data, once per leaf (`Cf::Aae`,
//! row `'L' ‖ leaf u32 BE → value u64 BE`; a leaf that returns to 0 is deleted). The in-memory tree takes the group's leaf values only once the batch
//! committed, so it always equals the stored leaves, which always describe the stored data: a
//! failed batch applies neither, and a crash (even with `sync = none`, where RocksDB recovers a
//! prefix of whole batches) loses data and leaves together.
//!
//! The same hook keeps the **tombstone index** that tombstone GC walks instead of the data:
//! row `'D' ‖ position u64 BE ‖ key → newest sibling timestamp u64 BE` for every key whose
//! state is tombstones only, written and deleted in the same batch as the state, and the count
//! of those rows (`tombstones.live`).
//!
//! The tree is trusted when the `'T'` row holds [`TREE_FORMAT`]. Otherwise (first start of a
//! node with data written before trees existed, a new tree format) it is **rebuilt in the
//! background**, range by range in ring order, by the `tree_scan` worker through
//! `Store::rescan` (the writer recomputes a range's leaves between two groups, so no write
//! interleaves): leaves below the cursor (`TreeReady`, persisted as the `'C'` row with each
//! range) are trusted and kept up to date by the hook; a write above it leaves its leaf alone
//! (the scan will read the data anyway). Anti-entropy uses only the trusted part. A restart
//! resumes from the cursor. The same rescan, over trusted ranges, is the slow **verify scan**
//! that counts and fixes leaves that do not match the data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tracing::{info, warn};

use super::store::{RescanMode, RescanOutcome};
use super::{data_key, scan_all, Batch, Cf, ChangeHook, Engine, ScanRange, StorageError};
use crate::merkle::{contribution, leaf_of, leaf_start, Tree, LEAVES};
use crate::version::KeyState;

/// Prefix of leaf rows in `Cf::Aae`.
pub const LEAF_PREFIX: u8 = b'L';
/// The row saying the stored leaves are complete, and in which format.
pub const TREE_ROW: &[u8] = b"T";
/// While the tree is being rebuilt: `[TREE_FORMAT] ‖ u32 BE`, the leaves below which it is
/// trusted.
pub const CURSOR_ROW: &[u8] = b"C";
/// The value of the cursor row: the tree is trusted below leaf `at`.
fn cursor_value(at: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(5);
    v.push(TREE_FORMAT);
    v.extend_from_slice(&at.to_be_bytes());
    v
}

/// Prefix of tombstone index rows in `Cf::Aae`.
pub const TOMBSTONE_PREFIX: u8 = b'D';
/// Bumped when contributions, leaves or the index change meaning: stored rows of another
/// format are rebuilt. 2: the tombstone index.
pub const TREE_FORMAT: u8 = 2;

/// The tombstone index row of `key` (ordered by ring position, like the data).
pub fn tombstone_row(key: &[u8]) -> Vec<u8> {
    let dkey = data_key(key);
    let mut k = Vec::with_capacity(1 + dkey.len());
    k.push(TOMBSTONE_PREFIX);
    k.extend_from_slice(&dkey);
    k
}

/// The number of tombstone-only keys this node stores, kept by the hook.
pub type TombstoneCount = Arc<AtomicU64>;

/// The leaves below which the tree is trusted (`LEAVES`: all of it).
pub type TreeReady = Arc<AtomicU32>;

/// The first position not yet trusted (`None`: the whole tree is).
pub fn untrusted_from(ready: &TreeReady) -> Option<u64> {
    let leaves = ready.load(Ordering::Acquire);
    ((leaves as usize) < LEAVES).then(|| leaf_start(leaves))
}

pub fn leaf_row(leaf: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(5);
    k.push(LEAF_PREFIX);
    k.extend_from_slice(&leaf.to_be_bytes());
    k
}

/// A state's contribution (0 for an absent key).
pub fn state_contribution(key: &[u8], state: &KeyState) -> u64 {
    if state.is_empty() {
        0
    } else {
        contribution(key, &state.encode())
    }
}

/// The node's tree, shared by the writer's hook and the anti-entropy service.
pub type SharedTree = Arc<RwLock<Tree>>;

/// Keeps the tree in step with the data, inside the writer's batches.
pub struct TreeHook {
    tree: SharedTree,
    /// Leaves this group changed, with their new values (applied to `tree` on commit).
    pending: HashMap<u32, u64>,
    tombstones: TombstoneCount,
    /// Tombstone-only keys this group added (negative: removed), applied on commit.
    tombstone_delta: i64,
    ready: TreeReady,
    /// The cursor a rebuild range moves to once its batch committed.
    pending_ready: Option<u32>,
}

impl TreeHook {
    pub fn new(tree: SharedTree, tombstones: TombstoneCount, ready: TreeReady) -> TreeHook {
        TreeHook {
            tree,
            pending: HashMap::new(),
            tombstones,
            tombstone_delta: 0,
            ready,
            pending_ready: None,
        }
    }

    fn leaf_value(&self, leaf: u32) -> u64 {
        match self.pending.get(&leaf) {
            Some(&v) => v,
            None => self.tree.read().expect("tree lock poisoned").leaf(leaf),
        }
    }
}

impl ChangeHook for TreeHook {
    fn on_change(
        &mut self,
        key: &[u8],
        old: &KeyState,
        new: &KeyState,
        new_encoded: &[u8],
        batch: &mut Batch,
    ) {
        let (was, is) = (old.is_tombstone(), new.is_tombstone());
        if is {
            batch.put(
                Cf::Aae,
                tombstone_row(key),
                new.newest_ms().to_be_bytes().to_vec(),
            );
        } else if was {
            batch.delete(Cf::Aae, tombstone_row(key));
        }
        let leaf = leaf_of(crate::storage::key_position(key));
        if leaf >= self.ready.load(Ordering::Acquire) {
            // Not rebuilt yet: the rebuild will read this key's state as stored then.
            return;
        }
        self.tombstone_delta += is as i64 - was as i64;
        let new_c = if new.is_empty() {
            0
        } else {
            contribution(key, new_encoded)
        };
        let delta = state_contribution(key, old) ^ new_c;
        if delta == 0 {
            return;
        }
        let current = self.leaf_value(leaf);
        self.pending.insert(leaf, current ^ delta);
    }

    /// One row per leaf the group changed, with its final value (a hot leaf changed by many
    /// writes of the group is written once).
    fn prepare(&mut self, batch: &mut Batch) {
        for (&leaf, &value) in &self.pending {
            if value == 0 {
                batch.delete(Cf::Aae, leaf_row(leaf));
            } else {
                batch.put(Cf::Aae, leaf_row(leaf), value.to_be_bytes().to_vec());
            }
        }
    }

    /// Rebuild: sets the leaves of a range starting at the cursor from the data, indexes its
    /// tombstones and moves the cursor past it. Verify: recomputes trusted leaves and fixes
    /// (and counts) those that differ. Ranges are whole leaves.
    fn rescan(
        &mut self,
        first: u64,
        last: u64,
        rows: &[(Vec<u8>, Vec<u8>)],
        mode: RescanMode,
        batch: &mut Batch,
    ) -> RescanOutcome {
        let (first_leaf, last_leaf) = (leaf_of(first), leaf_of(last));
        let ready = self.ready.load(Ordering::Acquire);
        let mut values: HashMap<u32, u64> = HashMap::new();
        let mut tombstones = 0i64;
        for (key, stored) in rows {
            let leaf = leaf_of(crate::storage::key_position(key));
            *values.entry(leaf).or_default() ^= contribution(key, stored);
            if mode == RescanMode::Rebuild {
                if let Ok(state) = KeyState::decode(stored) {
                    if state.is_tombstone() {
                        batch.put(
                            Cf::Aae,
                            tombstone_row(key),
                            state.newest_ms().to_be_bytes().to_vec(),
                        );
                        tombstones += 1;
                    }
                }
            }
        }
        let mut outcome = RescanOutcome::default();
        match mode {
            RescanMode::Rebuild => {
                if first_leaf != ready {
                    // Out of order (a stale request): the cursor decides.
                    return outcome;
                }
                for leaf in first_leaf..=last_leaf {
                    let v = values.get(&leaf).copied().unwrap_or(0);
                    outcome.mismatches += (v != 0) as u64;
                    self.pending.insert(leaf, v);
                }
                self.tombstone_delta += tombstones;
                let next = last_leaf + 1;
                if next as usize >= LEAVES {
                    batch.delete(Cf::Aae, CURSOR_ROW.to_vec());
                    batch.put(Cf::Aae, TREE_ROW.to_vec(), vec![TREE_FORMAT]);
                } else {
                    batch.put(Cf::Aae, CURSOR_ROW.to_vec(), cursor_value(next));
                }
                self.pending_ready = Some(next);
            }
            RescanMode::Verify => {
                // Only trusted leaves (below the cursor) are verified.
                for leaf in (first_leaf..=last_leaf).take_while(|l| *l < ready) {
                    let v = values.get(&leaf).copied().unwrap_or(0);
                    if self.leaf_value(leaf) != v {
                        outcome.mismatches += 1;
                        self.pending.insert(leaf, v);
                    }
                }
            }
        }
        self.prepare(batch);
        outcome
    }

    fn on_commit(&mut self, committed: bool) {
        let delta = std::mem::take(&mut self.tombstone_delta);
        if committed && delta != 0 {
            // Two's complement: adding a negative delta as u64 subtracts.
            self.tombstones.fetch_add(delta as u64, Ordering::Relaxed);
        }
        if let Some(ready) = self.pending_ready.take() {
            if committed {
                self.ready.store(ready, Ordering::Release);
            }
        }
        if self.pending.is_empty() {
            return;
        }
        if committed {
            let mut tree = self.tree.write().expect("tree lock poisoned");
            for (leaf, value) in self.pending.drain() {
                tree.set_leaf(leaf, value);
            }
        } else {
            self.pending.clear();
        }
    }
}

/// What opening the tree did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeOpen {
    /// Stored leaves loaded (and the tombstone index counted).
    Loaded { leaves: usize, tombstones: u64 },
    /// A rebuild was under way: the leaves below `cursor` loaded, the rest to rebuild.
    Resumed { cursor: u32, leaves: usize },
    /// Not trusted (absent, or another format): rebuilt in the background from the data.
    Rebuilding,
}

fn prefix_all() -> ScanRange {
    ScanRange {
        start: Vec::new(),
        end: None,
    }
}

fn prefix_range(prefix: u8) -> ScanRange {
    ScanRange {
        start: vec![prefix],
        end: Some(vec![prefix + 1]),
    }
}

/// The rows of `prefix` ordered before `prefix ‖ bound` (all of them without a bound).
fn prefix_below(prefix: u8, bound: Option<&[u8]>) -> ScanRange {
    match bound {
        None => prefix_range(prefix),
        Some(b) => ScanRange {
            start: vec![prefix],
            end: Some([&[prefix][..], b].concat()),
        },
    }
}

fn count_rows(engine: &dyn Engine, range: ScanRange) -> Result<u64, StorageError> {
    let mut n = 0;
    scan_all(engine, Cf::Aae, range, |_, _| {
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

/// A stored leaf row's leaf index and value, if it is well formed and names a leaf of the tree.
fn parse_leaf_row(row: &[u8], value: &[u8]) -> Option<(u32, u64)> {
    let leaf = u32::from_be_bytes(row.get(1..)?.try_into().ok()?);
    let value = u64::from_be_bytes(value.try_into().ok()?);
    ((leaf as usize) < LEAVES).then_some((leaf, value))
}

/// Loads the stored tree, or prepares its rebuild in the background when it cannot be trusted
/// (the tree is then trusted below the returned cursor only). Runs before the writer starts;
/// reads the stored leaves (at most 2^20 rows) and the tombstone index.
pub fn open_tree(
    engine: &dyn Engine,
    node_id: &str,
) -> Result<(SharedTree, TombstoneCount, TreeReady, TreeOpen), StorageError> {
    let trusted = engine.get(Cf::Aae, TREE_ROW)?.as_deref() == Some(&[TREE_FORMAT][..]);
    // A rebuild's cursor is below `LEAVES` (its last step deletes it and marks the tree
    // trusted): any other value is not a rebuild's, and the rebuild starts over.
    let cursor_row = engine.get(Cf::Aae, CURSOR_ROW)?;
    let cursor = match &cursor_row {
        Some(c) if !trusted && c.len() == 5 && c[0] == TREE_FORMAT => {
            Some(u32::from_be_bytes(c[1..].try_into().expect("4-byte slice")))
                .filter(|&at| (at as usize) < LEAVES)
        }
        _ => None,
    };
    let mut tree = Tree::new();
    // The stored leaves below leaf `below` (all of them at `LEAVES`).
    let load = |below: u32, tree: &mut Tree| -> Result<usize, StorageError> {
        let mut leaves = 0;
        let bound = below.to_be_bytes();
        let range = prefix_below(
            LEAF_PREFIX,
            ((below as usize) < LEAVES).then_some(&bound[..]),
        );
        scan_all(engine, Cf::Aae, range, |row, value| {
            let Some((leaf, v)) = parse_leaf_row(row, value) else {
                return Err(format!("malformed leaf row {row:02x?}"));
            };
            tree.set_leaf(leaf, v);
            leaves += 1;
            Ok(())
        })?;
        Ok(leaves)
    };
    // The stored leaves the tree trusts (all, or below a rebuild's cursor), loaded; a malformed
    // row among them (bit rot, a bug) makes the whole tree untrusted and rebuilt (below), not
    // a node that cannot start: it is derived from the data.
    let mut stored = None;
    if let Some(below) = if trusted { Some(LEAVES as u32) } else { cursor } {
        match load(below, &mut tree) {
            Ok(leaves) => stored = Some((below, leaves)),
            Err(StorageError::Corrupt { key, cause, .. }) => {
                warn!(node = %node_id, row = %key, %cause, "the anti-entropy tree has a malformed row: rebuilding it from the data");
                tree = Tree::new();
            }
            Err(e) => return Err(e),
        }
    }
    let (ready, tombstones, outcome) = if let Some((_, leaves)) = stored.filter(|_| trusted) {
        let tombstones = count_rows(engine, prefix_range(TOMBSTONE_PREFIX))?;
        (
            LEAVES as u32,
            tombstones,
            TreeOpen::Loaded { leaves, tombstones },
        )
    } else if !trusted
        && cursor_row.is_none()
        && engine.scan(Cf::Data, &prefix_all(), 1)?.entries.is_empty()
        && engine
            .scan(Cf::Aae, &prefix_range(LEAF_PREFIX), 1)?
            .entries
            .is_empty()
        && engine
            .scan(Cf::Aae, &prefix_range(TOMBSTONE_PREFIX), 1)?
            .entries
            .is_empty()
    {
        // A new data dir (no data, no tree rows, no rebuild begun): nothing to rebuild.
        engine.write(
            {
                let mut b = Batch::default();
                b.put(Cf::Aae, TREE_ROW.to_vec(), vec![TREE_FORMAT]);
                b
            },
            true,
        )?;
        (
            LEAVES as u32,
            0,
            TreeOpen::Loaded {
                leaves: 0,
                tombstones: 0,
            },
        )
    } else if let Some((cursor, leaves)) = stored {
        // Index rows above the cursor are recounted by the rebuild as it reaches them.
        let bound = leaf_start(cursor).to_be_bytes();
        let tombstones = count_rows(engine, prefix_below(TOMBSTONE_PREFIX, Some(&bound)))?;
        info!(node = %node_id, cursor, "resuming the anti-entropy tree rebuild");
        (cursor, tombstones, TreeOpen::Resumed { cursor, leaves })
    } else {
        // Start over: no leaf is trusted, the tombstone index is rebuilt with the leaves, and
        // malformed leaf rows are dropped (the rebuild writes every leaf it finds).
        let mut batch = Batch::default();
        scan_all(engine, Cf::Aae, prefix_range(TOMBSTONE_PREFIX), |row, _| {
            batch.delete(Cf::Aae, row.to_vec());
            Ok(())
        })?;
        scan_all(engine, Cf::Aae, prefix_range(LEAF_PREFIX), |row, value| {
            if parse_leaf_row(row, value).is_none() {
                batch.delete(Cf::Aae, row.to_vec());
            }
            Ok(())
        })?;
        batch.delete(Cf::Aae, TREE_ROW.to_vec());
        batch.put(Cf::Aae, CURSOR_ROW.to_vec(), cursor_value(0));
        engine.write(batch, true)?;
        info!(node = %node_id, "the anti-entropy tree is not trusted: rebuilding it from the data in the background");
        (0, 0, TreeOpen::Rebuilding)
    };
    Ok((
        Arc::new(RwLock::new(tree)),
        Arc::new(AtomicU64::new(tombstones)),
        Arc::new(AtomicU32::new(ready)),
        outcome,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryEngine;
    use crate::storage::store::SyncMode;
    use crate::storage::{Store, StoreConfig, WriteOp};
    use crate::version::VersionVector;
    use bytes::Bytes;

    fn config() -> StoreConfig {
        StoreConfig {
            node_id: "n1".into(),
            sync: SyncMode::Group,
            boot_id: Some("boot-1".into()),
            new_incarnation: false,
            hint_limits: Default::default(),
        }
    }

    fn update(key: &str, value: Option<&str>) -> WriteOp {
        WriteOp::Update {
            key: Bytes::from(key.to_string()),
            ctx: VersionVector::new(),
            value: value.map(|v| Bytes::from(v.to_string())),
            timestamp_ms: 1,
            hint_for: Vec::new(),
        }
    }

    /// The tree of the stored data, computed directly (what every path must equal).
    fn tree_of_data(engine: &dyn Engine) -> Tree {
        let mut tree = Tree::new();
        scan_all(engine, Cf::Data, prefix_all(), |dkey, value| {
            let key = &dkey[8..];
            tree.xor_leaf(
                leaf_of(crate::storage::key_position(key)),
                contribution(key, value),
            );
            Ok(())
        })
        .unwrap();
        tree
    }

    fn open_store(
        engine: &Arc<MemoryEngine>,
    ) -> (Store, SharedTree, TombstoneCount, TreeReady, TreeOpen) {
        let (tree, count, ready, how) = open_tree(engine.as_ref(), "n1").unwrap();
        let hook = TreeHook::new(tree.clone(), count.clone(), ready.clone());
        let store = Store::open_with_hook(
            engine.clone() as Arc<dyn Engine>,
            config(),
            Some(Box::new(hook)),
        )
        .unwrap();
        (store, tree, count, ready, how)
    }

    /// Rescans leaves `from..to` in `chunks` ranges.
    async fn rescan_leaves(
        store: &Store,
        from: u32,
        to: u32,
        chunks: u32,
        mode: RescanMode,
    ) -> RescanOutcome {
        let step = (to - from).div_ceil(chunks);
        let mut total = RescanOutcome::default();
        let mut leaf = from;
        while leaf < to {
            let end = (leaf + step).min(to);
            let o = store
                .rescan(leaf_start(leaf), crate::merkle::leaf_end(end - 1), mode)
                .await
                .unwrap();
            total.keys += o.keys;
            total.bytes += o.bytes;
            total.mismatches += o.mismatches;
            leaf = end;
        }
        total
    }

    async fn delete_with_context(store: &Store, key: &str) {
        let ctx = store.get(key.as_bytes()).unwrap().context().clone();
        store
            .write(WriteOp::Update {
                key: Bytes::from(key.to_string()),
                ctx,
                value: None,
                timestamp_ms: 2,
                hint_for: Vec::new(),
            })
            .await
            .unwrap();
    }

    /// The tree the write path maintains equals the tree of the data, through updates,
    /// siblings, tombstones, merges and a reopen; an untrusted tree rebuilt in the background,
    /// range by range while writes go on (and resumed after a restart), equals it too; and the
    /// verify scan finds and fixes a leaf that went bad on disk.
    #[tokio::test]
    async fn the_write_path_tree_equals_the_data_through_rebuild_and_verify() {
        let engine = Arc::new(MemoryEngine::new());
        let (store, tree, count, ready, how) = open_store(&engine);
        assert_eq!(
            how,
            TreeOpen::Loaded {
                leaves: 0,
                tombstones: 0
            },
            "a new data dir is trusted at once"
        );
        assert_eq!(ready.load(Ordering::Relaxed) as usize, LEAVES);
        // Many keys at once (groups with several keys per leaf), then overwrites and deletes.
        let writes = (0..300).map(|i| store.write(update(&format!("k{i}"), Some("v1"))));
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        for i in (0..300).step_by(3) {
            store
                .write(update(&format!("k{i}"), Some("v2")))
                .await
                .unwrap();
        }
        for i in (0..300).step_by(7) {
            // A delete with the read's context: tombstones only (a blind one keeps the value).
            delete_with_context(&store, &format!("k{i}")).await;
        }
        // A replica's state merged in: a sibling from another actor.
        let other = KeyState::new().update(
            &VersionVector::new(),
            crate::version::Dot {
                actor: 0xABCD,
                counter: 1,
            },
            2,
            Some(Bytes::from_static(b"theirs")),
        );
        store
            .write(WriteOp::Merge {
                key: Bytes::from_static(b"k1"),
                state: other,
            })
            .await
            .unwrap();
        // k0 is deleted then written again: no longer a tombstone.
        store.write(update("k0", Some("back"))).await.unwrap();
        let deleted = (0..300).step_by(7).count() as u64 - 1;
        assert_eq!(count.load(Ordering::Relaxed), deleted);
        let live = tree.read().unwrap().clone();
        assert_ne!(live.root(), 0);
        assert!(live == tree_of_data(engine.as_ref()));
        store.close();

        // Loaded from the stored leaves: the same tree, the same tombstones.
        let (store, loaded, count, _, how) = open_store(&engine);
        assert!(
            matches!(how, TreeOpen::Loaded { leaves, tombstones } if leaves > 0 && tombstones == deleted),
            "{how:?}"
        );
        assert_eq!(count.load(Ordering::Relaxed), deleted);
        assert!(*loaded.read().unwrap() == live);
        store.close();
        let index_rows = || {
            let mut rows = Vec::new();
            scan_all(
                engine.as_ref(),
                Cf::Aae,
                prefix_range(TOMBSTONE_PREFIX),
                |r, _| {
                    rows.push(r.to_vec());
                    Ok(())
                },
            )
            .unwrap();
            rows
        };
        let written = index_rows();
        assert_eq!(written.len() as u64, deleted);
        assert!(written.contains(&tombstone_row(b"k7")));
        assert!(!written.contains(&tombstone_row(b"k0")));

        // Untrusted (no format row): rebuilt range by range in the background.
        let mut b = Batch::default();
        b.delete(Cf::Aae, TREE_ROW.to_vec());
        engine.write(b, true).unwrap();
        let (store, tree, count, ready, how) = open_store(&engine);
        assert_eq!(how, TreeOpen::Rebuilding);
        assert_eq!(ready.load(Ordering::Relaxed), 0);
        assert_eq!(tree.read().unwrap().root(), 0, "nothing trusted yet");
        let half = (LEAVES / 2) as u32;
        let first = rescan_leaves(&store, 0, half, 3, RescanMode::Rebuild).await;
        assert_eq!(ready.load(Ordering::Relaxed), half);
        // Writes while rebuilding, below and above the cursor, and a tombstone above it.
        for i in 300..340 {
            store
                .write(update(&format!("k{i}"), Some("new")))
                .await
                .unwrap();
        }
        delete_with_context(&store, "k3").await;
        // A restart mid-rebuild resumes from the cursor.
        store.close();
        let (store, tree, count2, ready, how) = open_store(&engine);
        assert!(
            matches!(how, TreeOpen::Resumed { cursor, .. } if cursor == half),
            "{how:?}"
        );
        let _ = count;
        let second = rescan_leaves(&store, half, LEAVES as u32, 2, RescanMode::Rebuild).await;
        assert!(first.keys > 0 && second.keys > 0);
        assert_eq!(ready.load(Ordering::Relaxed) as usize, LEAVES);
        assert!(*tree.read().unwrap() == tree_of_data(engine.as_ref()));
        assert_eq!(
            count2.load(Ordering::Relaxed),
            deleted + 1,
            "k3 deleted too"
        );
        assert_eq!(index_rows().len() as u64, deleted + 1);
        store.close();
        let (store, _, _, _, how) = open_store(&engine);
        assert!(
            matches!(how, TreeOpen::Loaded { .. }),
            "trusted again: {how:?}"
        );
        store.close();

        // Bit rot: a stored leaf goes bad. The verify scan finds it, fixes it, counts it.
        let (leaf, value) = tree_of_data(engine.as_ref())
            .nonzero_leaves()
            .next()
            .unwrap();
        let mut b = Batch::default();
        b.put(Cf::Aae, leaf_row(leaf), (value ^ 1).to_be_bytes().to_vec());
        engine.write(b, true).unwrap();
        let (store, tree, _, _, _) = open_store(&engine);
        assert!(*tree.read().unwrap() != tree_of_data(engine.as_ref()));
        let verify = rescan_leaves(&store, 0, LEAVES as u32, 4, RescanMode::Verify).await;
        assert_eq!(verify.mismatches, 1);
        assert!(*tree.read().unwrap() == tree_of_data(engine.as_ref()));
        let again = rescan_leaves(&store, 0, LEAVES as u32, 4, RescanMode::Verify).await;
        assert_eq!(again.mismatches, 0, "fixed on disk too");
        // What the steps read, keys and values: what the tree scan sizes its next step by.
        let mut data_bytes = 0u64;
        let all = ScanRange {
            start: Vec::new(),
            end: None,
        };
        scan_all(engine.as_ref(), Cf::Data, all, |k, v| {
            data_bytes += (k.len() - 8 + v.len()) as u64;
            Ok(())
        })
        .unwrap();
        assert!(data_bytes > 0);
        assert_eq!(again.bytes, data_bytes);
        store.close();
    }

    /// Found in review: a stored leaf row beyond the tree (index ≥ `LEAVES`) panicked the node
    /// while it opened (index out of bounds), at every start; a rebuild cursor beyond it made a
    /// tree never rebuilt look trusted. The tree is derived data: either makes it untrusted,
    /// rebuilt from the data, and the bad row is dropped.
    #[tokio::test]
    async fn a_leaf_row_or_cursor_beyond_the_tree_makes_it_rebuilt_not_a_crash() {
        let engine = Arc::new(MemoryEngine::new());
        let (store, _, _, _, _) = open_store(&engine);
        for i in 0..50 {
            store
                .write(update(&format!("k{i}"), Some("v")))
                .await
                .unwrap();
        }
        store.close();
        let mut b = Batch::default();
        b.put(
            Cf::Aae,
            leaf_row(LEAVES as u32),
            7u64.to_be_bytes().to_vec(),
        );
        engine.write(b, true).unwrap();
        let (store, tree, _, ready, how) = open_store(&engine);
        assert_eq!(how, TreeOpen::Rebuilding);
        assert_eq!(ready.load(Ordering::Relaxed), 0);
        rescan_leaves(&store, 0, LEAVES as u32, 2, RescanMode::Rebuild).await;
        assert!(*tree.read().unwrap() == tree_of_data(engine.as_ref()));
        store.close();
        let (store, _, _, _, how) = open_store(&engine);
        assert!(
            matches!(how, TreeOpen::Loaded { .. }),
            "the bad row is gone, the rebuilt tree trusted: {how:?}"
        );
        store.close();
        // A rebuild cursor past the last leaf.
        let mut b = Batch::default();
        b.delete(Cf::Aae, TREE_ROW.to_vec());
        b.put(Cf::Aae, CURSOR_ROW.to_vec(), cursor_value(u32::MAX));
        engine.write(b, true).unwrap();
        let (store, _, _, ready, how) = open_store(&engine);
        assert_eq!(
            how,
            TreeOpen::Rebuilding,
            "not trusted up to a cursor past the end"
        );
        assert_eq!(ready.load(Ordering::Relaxed), 0);
        store.close();
        // A cursor of exactly `LEAVES` is not a rebuild's either (its last step removes it).
        let mut b = Batch::default();
        b.put(Cf::Aae, CURSOR_ROW.to_vec(), cursor_value(LEAVES as u32));
        engine.write(b, true).unwrap();
        let (store, _, _, _, how) = open_store(&engine);
        assert_eq!(how, TreeOpen::Rebuilding);
        store.close();
        // With no data, a bad cursor and a stale leaf row are not a new data dir: the row goes
        // with the rebuild instead of being trusted.
        let empty = Arc::new(MemoryEngine::new());
        let mut b = Batch::default();
        b.put(Cf::Aae, leaf_row(3), 9u64.to_be_bytes().to_vec());
        b.put(Cf::Aae, CURSOR_ROW.to_vec(), cursor_value(u32::MAX));
        empty.write(b, true).unwrap();
        let (store, tree, _, _, how) = open_store(&empty);
        assert_eq!(how, TreeOpen::Rebuilding, "{how:?}");
        assert_eq!(tree.read().unwrap().root(), 0);
        store.close();
    }

    /// A leaf whose keys all cancel out is deleted, not stored as 0.
    #[test]
    fn a_leaf_back_at_zero_is_deleted() {
        let tree: SharedTree = Arc::default();
        let mut hook = TreeHook::new(
            tree.clone(),
            TombstoneCount::default(),
            Arc::new(AtomicU32::new(LEAVES as u32)),
        );
        let state = KeyState::new().update(
            &VersionVector::new(),
            crate::version::Dot {
                actor: 1,
                counter: 1,
            },
            1,
            Some(Bytes::from_static(b"v")),
        );
        let mut batch = Batch::default();
        let bytes = state.encode();
        hook.on_change(b"k", &KeyState::new(), &state, &bytes, &mut batch);
        hook.on_change(b"k", &state, &KeyState::new(), &[], &mut batch);
        hook.prepare(&mut batch);
        // Two changes to one leaf in a group: one row, the leaf's final value (0: deleted).
        assert_eq!(batch.ops.len(), 1);
        assert!(matches!(
            batch.ops.last(),
            Some(crate::storage::BatchOp::Delete(Cf::Aae, _))
        ));
        hook.on_commit(true);
        assert_eq!(tree.read().unwrap().root(), 0);
        // A failed batch leaves the tree as it was.
        hook.on_change(
            b"k",
            &KeyState::new(),
            &state,
            &bytes,
            &mut Batch::default(),
        );
        hook.on_commit(false);
        assert_eq!(tree.read().unwrap().root(), 0);
    }
}
