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
//! The tree is trusted when the `'T'` row holds [`TREE_FORMAT`]; otherwise (first start of a node
//! with data written before trees existed, or a new tree format) [`open_tree`] rebuilds it from
//! the data before the writer starts.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tracing::info;

use super::{scan_all, Batch, Cf, ChangeHook, Engine, ScanRange, StorageError};
use crate::merkle::{contribution, leaf_of, Tree};
use crate::version::KeyState;

/// Prefix of leaf rows in `Cf::Aae`.
pub const LEAF_PREFIX: u8 = b'L';
/// The row saying the stored leaves are complete, and in which format.
pub const TREE_ROW: &[u8] = b"T";
/// Bumped when contributions or leaves change meaning: stored leaves of another format are
/// rebuilt.
pub const TREE_FORMAT: u8 = 1;

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
}

impl TreeHook {
    pub fn new(tree: SharedTree) -> TreeHook {
        TreeHook {
            tree,
            pending: HashMap::new(),
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
        _batch: &mut Batch,
    ) {
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
    /// Stored leaves loaded.
    Loaded { leaves: usize },
    /// Rebuilt from the data (untrusted or absent), `keys` keys hashed.
    Rebuilt { keys: u64 },
}

/// Loads the stored tree, or rebuilds it from the data when it cannot be trusted. Runs before
/// the writer starts (nothing else writes meanwhile); blocks on the disk.
pub fn open_tree(
    engine: &dyn Engine,
    node_id: &str,
) -> Result<(SharedTree, TreeOpen), StorageError> {
    let trusted = engine.get(Cf::Aae, TREE_ROW)?.as_deref() == Some(&[TREE_FORMAT][..]);
    let mut tree = Tree::new();
    let outcome = if trusted {
        let mut leaves = 0;
        let range = ScanRange {
            start: vec![LEAF_PREFIX],
            end: Some(vec![LEAF_PREFIX + 1]),
        };
        scan_all(engine, Cf::Aae, range, |row, value| {
            let (Ok(leaf), Ok(v)) = (<[u8; 4]>::try_from(&row[1..]), <[u8; 8]>::try_from(value))
            else {
                return Err(format!("malformed leaf row {row:02x?}"));
            };
            tree.set_leaf(u32::from_be_bytes(leaf), u64::from_be_bytes(v));
            leaves += 1;
            Ok(())
        })?;
        TreeOpen::Loaded { leaves }
    } else {
        let started = Instant::now();
        let mut keys = 0u64;
        let mut last_log = Instant::now();
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
                keys += 1;
                if last_log.elapsed().as_secs() >= 5 {
                    info!(node = %node_id, keys, "rebuilding the anti-entropy tree from the data");
                    last_log = Instant::now();
                }
                Ok(())
            },
        )?;
        // Replace every stored leaf by the rebuilt ones, then mark the tree trusted.
        let mut batch = Batch::default();
        let range = ScanRange {
            start: vec![LEAF_PREFIX],
            end: Some(vec![LEAF_PREFIX + 1]),
        };
        scan_all(engine, Cf::Aae, range, |row, _| {
            batch.delete(Cf::Aae, row.to_vec());
            Ok(())
        })?;
        for (leaf, value) in tree.nonzero_leaves() {
            batch.put(Cf::Aae, leaf_row(leaf), value.to_be_bytes().to_vec());
        }
        batch.put(Cf::Aae, TREE_ROW.to_vec(), vec![TREE_FORMAT]);
        engine.write(batch, true)?;
        info!(node = %node_id, keys, ms = started.elapsed().as_millis() as u64,
              "anti-entropy tree rebuilt from the data");
        TreeOpen::Rebuilt { keys }
    };
    Ok((Arc::new(RwLock::new(tree)), outcome))
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
        let (tree, how) = open_tree(engine.as_ref(), "n1").unwrap();
        assert_eq!(how, TreeOpen::Rebuilt { keys: 0 });
        let store = Store::open_with_hook(
            engine.clone() as Arc<dyn Engine>,
            config(),
            Some(Box::new(TreeHook::new(tree.clone()))),
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
            store.write(update(&format!("k{i}"), None)).await.unwrap();
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
        let live = tree.read().unwrap().clone();
        assert_ne!(live.root(), 0);
        store.close();

        // Loaded from the stored leaves: the same tree.
        let (loaded, how) = open_tree(engine.as_ref(), "n1").unwrap();
        assert!(
            matches!(how, TreeOpen::Loaded { leaves } if leaves > 0),
            "{how:?}"
        );
        assert!(*loaded.read().unwrap() == live);

        // Untrusted (no format row): rebuilt from the data, the same tree again.
        let mut b = Batch::default();
        b.delete(Cf::Aae, TREE_ROW.to_vec());
        engine.write(b, true).unwrap();
        let (rebuilt, how) = open_tree(engine.as_ref(), "n1").unwrap();
        assert_eq!(how, TreeOpen::Rebuilt { keys: 300 });
        assert!(*rebuilt.read().unwrap() == live);
    }

    /// A leaf whose keys all cancel out is deleted, not stored as 0.
    #[test]
    fn a_leaf_back_at_zero_is_deleted() {
        let tree: SharedTree = Arc::default();
        let mut hook = TreeHook::new(tree.clone());
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
