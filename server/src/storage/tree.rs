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
//! The tree is trusted when the `'T'` row holds [`TREE_FORMAT`]; otherwise (first start of a node
//! with data written before trees existed, or a new tree format) [`open_tree`] rebuilds it from
//! the data before the writer starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tracing::info;

use super::{data_key, scan_all, Batch, Cf, ChangeHook, Engine, ScanRange, StorageError};
use crate::merkle::{contribution, leaf_of, Tree};
use crate::version::KeyState;

/// Prefix of leaf rows in `Cf::Aae`.
pub const LEAF_PREFIX: u8 = b'L';
/// The row saying the stored leaves are complete, and in which format.
pub const TREE_ROW: &[u8] = b"T";
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
}

impl TreeHook {
    pub fn new(tree: SharedTree, tombstones: TombstoneCount) -> TreeHook {
        TreeHook {
            tree,
            pending: HashMap::new(),
            tombstones,
            tombstone_delta: 0,
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
        let leaf = leaf_of(crate::storage::key_position(key));
        let current = match self.pending.get(&leaf) {
            Some(&v) => v,
            None => self.tree.read().expect("tree lock poisoned").leaf(leaf),
        };
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

    fn on_commit(&mut self, committed: bool) {
        let delta = std::mem::take(&mut self.tombstone_delta);
        if committed && delta != 0 {
            // Two's complement: adding a negative delta as u64 subtracts.
            self.tombstones.fetch_add(delta as u64, Ordering::Relaxed);
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
    /// Rebuilt from the data (untrusted or absent), `keys` keys hashed.
    Rebuilt { keys: u64, tombstones: u64 },
}

fn prefix_range(prefix: u8) -> ScanRange {
    ScanRange {
        start: vec![prefix],
        end: Some(vec![prefix + 1]),
    }
}

/// Loads the stored tree, or rebuilds it from the data when it cannot be trusted. Runs before
/// the writer starts (nothing else writes meanwhile); blocks on the disk.
pub fn open_tree(
    engine: &dyn Engine,
    node_id: &str,
) -> Result<(SharedTree, TombstoneCount, TreeOpen), StorageError> {
    let trusted = engine.get(Cf::Aae, TREE_ROW)?.as_deref() == Some(&[TREE_FORMAT][..]);
    let mut tree = Tree::new();
    let mut tombstones = 0u64;
    let outcome = if trusted {
        let mut leaves = 0;
        scan_all(engine, Cf::Aae, prefix_range(LEAF_PREFIX), |row, value| {
            let (Ok(leaf), Ok(v)) = (<[u8; 4]>::try_from(&row[1..]), <[u8; 8]>::try_from(value))
            else {
                return Err(format!("malformed leaf row {row:02x?}"));
            };
            tree.set_leaf(u32::from_be_bytes(leaf), u64::from_be_bytes(v));
            leaves += 1;
            Ok(())
        })?;
        scan_all(engine, Cf::Aae, prefix_range(TOMBSTONE_PREFIX), |_, _| {
            tombstones += 1;
            Ok(())
        })?;
        TreeOpen::Loaded { leaves, tombstones }
    } else {
        let started = Instant::now();
        let mut keys = 0u64;
        let mut last_log = Instant::now();
        let mut index = Batch::default();
        scan_all(
            engine,
            Cf::Data,
            ScanRange {
                start: Vec::new(),
                end: None,
            },
            |dkey, value| {
                let (position, key) = dkey.split_at(8.min(dkey.len()));
                let state = KeyState::decode(value).map_err(|e| e.to_string())?;
                let position =
                    u64::from_be_bytes(position.try_into().map_err(|_| "short data key")?);
                tree.xor_leaf(leaf_of(position), state_contribution(key, &state));
                if state.is_tombstone() {
                    let mut row = Vec::with_capacity(1 + dkey.len());
                    row.push(TOMBSTONE_PREFIX);
                    row.extend_from_slice(dkey);
                    index.put(Cf::Aae, row, state.newest_ms().to_be_bytes().to_vec());
                    tombstones += 1;
                }
                keys += 1;
                if last_log.elapsed().as_secs() >= 5 {
                    info!(node = %node_id, keys, "rebuilding the anti-entropy tree from the data");
                    last_log = Instant::now();
                }
                Ok(())
            },
        )?;
        // Replace every stored leaf and index row by the rebuilt ones, then mark the tree
        // trusted.
        let mut batch = Batch::default();
        for prefix in [LEAF_PREFIX, TOMBSTONE_PREFIX] {
            scan_all(engine, Cf::Aae, prefix_range(prefix), |row, _| {
                batch.delete(Cf::Aae, row.to_vec());
                Ok(())
            })?;
        }
        batch.ops.extend(index.ops);
        for (leaf, value) in tree.nonzero_leaves() {
            batch.put(Cf::Aae, leaf_row(leaf), value.to_be_bytes().to_vec());
        }
        batch.put(Cf::Aae, TREE_ROW.to_vec(), vec![TREE_FORMAT]);
        engine.write(batch, true)?;
        info!(node = %node_id, keys, tombstones, ms = started.elapsed().as_millis() as u64,
              "anti-entropy tree rebuilt from the data");
        TreeOpen::Rebuilt { keys, tombstones }
    };
    Ok((
        Arc::new(RwLock::new(tree)),
        Arc::new(AtomicU64::new(tombstones)),
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

    /// The tree the write path maintains equals the one rebuilt from the data, through
    /// updates, siblings, tombstones, merges and a reopen.
    #[tokio::test]
    async fn the_write_path_tree_equals_a_rebuild_from_the_data() {
        let engine = Arc::new(MemoryEngine::new());
        let (tree, count, how) = open_tree(engine.as_ref(), "n1").unwrap();
        assert_eq!(
            how,
            TreeOpen::Rebuilt {
                keys: 0,
                tombstones: 0
            }
        );
        let store = Store::open_with_hook(
            engine.clone() as Arc<dyn Engine>,
            config(),
            Some(Box::new(TreeHook::new(tree.clone(), count.clone()))),
        )
        .unwrap();
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
            let key = format!("k{i}");
            let ctx = store.get(key.as_bytes()).unwrap().context().clone();
            store
                .write(WriteOp::Update {
                    key: Bytes::from(key),
                    ctx,
                    value: None,
                    timestamp_ms: 2,
                    hint_for: Vec::new(),
                })
                .await
                .unwrap();
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
        store.close();

        // Loaded from the stored leaves: the same tree, the same tombstones.
        let (loaded, count, how) = open_tree(engine.as_ref(), "n1").unwrap();
        assert!(
            matches!(how, TreeOpen::Loaded { leaves, tombstones } if leaves > 0 && tombstones == deleted),
            "{how:?}"
        );
        assert_eq!(count.load(Ordering::Relaxed), deleted);
        assert!(*loaded.read().unwrap() == live);
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

        // Untrusted (no format row): rebuilt from the data, the same tree again.
        let mut b = Batch::default();
        b.delete(Cf::Aae, TREE_ROW.to_vec());
        engine.write(b, true).unwrap();
        let (rebuilt, _, how) = open_tree(engine.as_ref(), "n1").unwrap();
        assert_eq!(
            how,
            TreeOpen::Rebuilt {
                keys: 300,
                tombstones: deleted
            }
        );
        assert!(*rebuilt.read().unwrap() == live);
        assert_eq!(index_rows(), written);
    }

    /// A leaf whose keys all cancel out is deleted, not stored as 0.
    #[test]
    fn a_leaf_back_at_zero_is_deleted() {
        let tree: SharedTree = Arc::default();
        let mut hook = TreeHook::new(tree.clone(), TombstoneCount::default());
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
