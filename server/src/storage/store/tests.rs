//! Store logic on the in-memory engine: minting, merging, limits, identity across restarts,
//! amnesia, and failed batches (a full disk).

use super::*;
use crate::storage::memory::MemoryEngine;

fn open(engine: &Arc<MemoryEngine>, sync: SyncMode) -> Store {
    Store::open(
        engine.clone() as Arc<dyn Engine>,
        StoreConfig {
            node_id: "n1".into(),
            sync,
        },
    )
    .expect("open store")
}

fn put(key: &str, value: &str, ctx: Option<VersionVector>) -> WriteOp {
    WriteOp::Update {
        key: Bytes::from(key.to_string()),
        ctx: Some(ctx.unwrap_or_default()),
        value: Some(Bytes::from(value.to_string())),
        timestamp_ms: 1,
    }
}

/// Writes keys `k0..kn` concurrently, each in its own task; returns once all are acknowledged.
async fn write_concurrently(store: &Arc<Store>, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move { s.write(put(&format!("k{i}"), "v", None)).await })
        })
        .collect();
    for t in tasks {
        t.await
            .expect("write task does not panic")
            .expect("acknowledged");
    }
}

/// Writes fresh keys one at a time, from counter `last` on, until the store has minted
/// `counter`; returns the last counter minted.
async fn mint_until(store: &Store, mut last: u64, counter: u64) -> u64 {
    while last < counter {
        last = store
            .write(put(&format!("fill{last}"), "x", None))
            .await
            .expect("acknowledged")
            .dot
            .expect("an update mints a dot")
            .counter;
    }
    last
}

/// A process crash: the store is never closed, so its writer never drains or marks the
/// shutdown clean (the leaked writer thread idles on its queue for the rest of the test
/// process).
fn crash<S>(store: S) {
    std::mem::forget(store);
}

fn values(s: &KeyState) -> Vec<String> {
    s.siblings()
        .iter()
        .map(|x| match &x.value {
            Some(v) => String::from_utf8(v.to_vec()).unwrap(),
            None => "<deleted>".into(),
        })
        .collect()
}

#[tokio::test]
async fn blind_writes_become_siblings_and_context_collapses_them() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::Group);
    store.write(put("k", "a", None)).await.unwrap();
    store.write(put("k", "b", None)).await.unwrap();
    let read = store.get(b"k").unwrap();
    assert_eq!(values(&read), vec!["a", "b"]);
    let out = store
        .write(put("k", "c", Some(read.context().clone())))
        .await
        .unwrap();
    assert_eq!(values(&out.state), vec!["c"]);
    assert_eq!(values(&store.get(b"k").unwrap()), vec!["c"]);
    // Delete without context removes what this replica holds, leaving one tombstone.
    let del = store
        .write(WriteOp::Update {
            key: Bytes::from_static(b"k"),
            ctx: None,
            value: None,
            timestamp_ms: 2,
        })
        .await
        .unwrap();
    assert_eq!(values(&del.state), vec!["<deleted>"]);
    assert!(!store.get(b"k").unwrap().has_live_value());
    store.close();
}

#[tokio::test]
async fn counters_never_repeat_across_clean_restarts() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::Group);
    let first = store.write(put("a", "1", None)).await.unwrap().dot.unwrap();
    store.close();
    let store = open(&engine, SyncMode::Group);
    let second = store.write(put("b", "1", None)).await.unwrap().dot.unwrap();
    assert_eq!(first.actor, second.actor, "clean restart keeps the actor");
    assert!(
        second.counter > first.counter + COUNTER_LEASE - 1,
        "restart skips the rest of the lease"
    );
    store.close();
}

#[tokio::test]
async fn lease_is_extended_in_the_same_batch() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::Group);
    let mut last = 0;
    for i in 0..(COUNTER_LEASE + 5) {
        last = store
            .write(put(&format!("k{i}"), "v", None))
            .await
            .unwrap()
            .dot
            .unwrap()
            .counter;
    }
    drop(store); // no clean close: simulate a crash (sync=group keeps the incarnation)
    let store = open(&engine, SyncMode::Group);
    let next = store
        .write(put("z", "v", None))
        .await
        .unwrap()
        .dot
        .unwrap()
        .counter;
    assert!(next > last, "counter {next} after crash must exceed {last}");
    store.close();
}

#[tokio::test]
async fn unclean_shutdown_without_fsync_starts_a_new_incarnation() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::None);
    let before = store.write(put("a", "1", None)).await.unwrap().dot.unwrap();
    let inc = store.stats().incarnation.load(Ordering::Relaxed);
    crash(store);
    let store = open(&engine, SyncMode::None);
    let after = store.write(put("a", "2", None)).await.unwrap().dot.unwrap();
    assert_ne!(before.actor, after.actor);
    assert_eq!(store.stats().incarnation.load(Ordering::Relaxed), inc + 1);
    // The old version is still there: the blind write became a sibling.
    let mut vals = values(&store.get(b"a").unwrap());
    vals.sort();
    assert_eq!(vals, vec!["1", "2"]);
    store.close();
}

#[tokio::test]
async fn merge_showing_our_actor_ahead_triggers_a_new_incarnation() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::Group);
    let dot = store.write(put("k", "v", None)).await.unwrap().dot.unwrap();
    // A peer's state claims a dot of ours far beyond our counter: we lost data.
    let foreign = KeyState::new().update(
        &VersionVector::new(),
        Dot {
            actor: dot.actor,
            counter: dot.counter + 5 * COUNTER_LEASE,
        },
        9,
        Some(Bytes::from_static(b"future")),
    );
    store
        .write(WriteOp::Merge {
            key: Bytes::from_static(b"k"),
            state: foreign,
        })
        .await
        .unwrap();
    assert_eq!(store.stats().amnesia_detected.load(Ordering::Relaxed), 1);
    let next = store.write(put("k", "w", None)).await.unwrap().dot.unwrap();
    assert_ne!(
        next.actor, dot.actor,
        "must not mint with the amnesiac actor"
    );
    store.close();
}

#[tokio::test]
async fn merge_is_idempotent_and_counted_as_noop() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::Group);
    let out = store.write(put("k", "v", None)).await.unwrap();
    let again = store
        .write(WriteOp::Merge {
            key: Bytes::from_static(b"k"),
            state: out.state.clone(),
        })
        .await
        .unwrap();
    assert_eq!(again.state, out.state);
    assert_eq!(store.stats().merges_noop.load(Ordering::Relaxed), 1);
    store.close();
}

#[tokio::test]
async fn sibling_cap_refuses_growth_but_not_resolution() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::None);
    for i in 0..MAX_SIBLINGS {
        store.write(put("hot", &i.to_string(), None)).await.unwrap();
    }
    let err = store
        .write(put("hot", "one too many", None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WriteError::TooManySiblings { count, limit, .. } if count == MAX_SIBLINGS + 1 && limit == MAX_SIBLINGS),
        "{err}"
    );
    let read = store.get(b"hot").unwrap();
    assert_eq!(
        read.siblings().len(),
        MAX_SIBLINGS,
        "the refused write changed nothing"
    );
    let resolved = store
        .write(put("hot", "resolved", Some(read.context().clone())))
        .await
        .unwrap();
    assert_eq!(values(&resolved.state), vec!["resolved"]);
    store.close();
}

#[tokio::test]
async fn failed_batch_applies_nothing_and_store_recovers() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::Group);
    store.write(put("k", "before", None)).await.unwrap();
    engine.set_fail_writes(true);
    let err = store.write(put("k", "during", None)).await.unwrap_err();
    assert!(
        matches!(
            &err,
            WriteError::Storage {
                source: StorageError::NoSpace { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("\"k\""),
        "error names the key: {err}"
    );
    engine.set_fail_writes(false);
    assert_eq!(values(&store.get(b"k").unwrap()), vec!["before"]);
    store.write(put("k", "after", None)).await.unwrap();
    assert_eq!(values(&store.get(b"k").unwrap()), vec!["before", "after"]);
    store.close();
}

#[tokio::test]
async fn data_dir_of_another_node_is_refused() {
    let engine = Arc::new(MemoryEngine::new());
    open(&engine, SyncMode::Group).close();
    let err = Store::open(
        engine.clone() as Arc<dyn Engine>,
        StoreConfig {
            node_id: "n2".into(),
            sync: SyncMode::Group,
        },
    )
    .err()
    .expect("must refuse");
    assert!(err.to_string().contains("belongs to node \"n1\""), "{err}");
}

#[tokio::test]
async fn group_mode_fsyncs_every_batch_and_none_mode_never() {
    for (mode, expect_synced) in [
        (SyncMode::Group, true),
        (SyncMode::None, false),
        (SyncMode::Always, true),
    ] {
        let engine = Arc::new(MemoryEngine::new());
        let store = Arc::new(open(&engine, mode));
        write_concurrently(&store, 200).await;
        let batches = store.stats().batches.load(Ordering::Relaxed);
        let synced = store.stats().synced_batches.load(Ordering::Relaxed);
        assert!((1..=200).contains(&batches));
        assert_eq!(
            synced == batches,
            expect_synced,
            "{mode}: {synced} of {batches} synced"
        );
        if mode == SyncMode::Always {
            assert_eq!(batches, 200, "always mode never groups");
        }
        store.close();
    }
}

#[tokio::test]
async fn reads_are_answered_inline_from_memory_or_on_the_blocking_pool() {
    let engine = Arc::new(MemoryEngine::new());
    let store = Arc::new(open(&engine, SyncMode::Group));
    store.write(put("k", "a", None)).await.unwrap();
    let cached = store.read(Bytes::from_static(b"k")).await.unwrap();
    assert_eq!(values(&cached), vec!["a"]);
    assert_eq!(store.stats().reads_cached.load(Ordering::Relaxed), 1);
    assert_eq!(store.stats().reads_blocking.load(Ordering::Relaxed), 0);
    // A miss in memory falls back to a full read, with the same answer.
    engine.set_cache_misses(true);
    let from_disk = store.read(Bytes::from_static(b"k")).await.unwrap();
    assert_eq!(from_disk, cached);
    let absent = store.read(Bytes::from_static(b"nope")).await.unwrap();
    assert!(absent.siblings().is_empty());
    assert_eq!(store.stats().reads_cached.load(Ordering::Relaxed), 1);
    assert_eq!(store.stats().reads_blocking.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn state_cache_serves_hot_keys_and_forgets_keys_of_failed_batches() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::Group);
    let hits = |s: &Store| s.stats().state_cache_hits.load(Ordering::Relaxed);
    let misses = |s: &Store| s.stats().state_cache_misses.load(Ordering::Relaxed);
    let first = store.write(put("k", "v1", None)).await.unwrap();
    assert_eq!((hits(&store), misses(&store)), (0, 1));
    let second = store
        .write(put("k", "v2", Some(first.state.context().clone())))
        .await
        .unwrap();
    assert_eq!((hits(&store), misses(&store)), (1, 1), "second write hits");
    assert_eq!(values(&second.state), vec!["v2"]);
    assert_eq!(
        store.get(b"k").unwrap(),
        second.state,
        "cache and engine agree"
    );

    engine.set_fail_writes(true);
    store.write(put("k", "lost", None)).await.unwrap_err();
    engine.set_fail_writes(false);
    assert_eq!((hits(&store), misses(&store)), (2, 1));
    // The failed group took the entry out: the next write reads the engine again and sees
    // the committed "v2", not the never-written "lost".
    let third = store.write(put("k", "v3", None)).await.unwrap();
    assert_eq!((hits(&store), misses(&store)), (2, 2));
    assert_eq!(values(&third.state), vec!["v2", "v3"]);
    assert_eq!(store.get(b"k").unwrap(), third.state);

    // A merge that changes nothing keeps the key cached.
    store
        .write(WriteOp::Merge {
            key: Bytes::from_static(b"k"),
            state: third.state.clone(),
        })
        .await
        .unwrap();
    store.write(put("k", "v4", None)).await.unwrap();
    assert_eq!((hits(&store), misses(&store)), (4, 2));
    store.close();
}

#[tokio::test]
async fn early_outcomes_leave_before_the_commit_only_under_a_durable_lease() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::Group);
    // Under the lease persisted at open, the outcome is released before the commit: it
    // arrives even though the commit then fails.
    engine.set_fail_writes(true);
    let (outcome, commit) = store
        .write_early(put("a", "1", None))
        .await
        .expect("outcome released before the commit");
    assert_eq!(values(&outcome.state), vec!["1"]);
    let early = outcome.dot.expect("an update mints a dot");
    let err = commit.await.expect_err("the commit failed");
    assert!(
        matches!(
            &err,
            WriteError::Storage {
                source: StorageError::NoSpace { .. },
                ..
            }
        ),
        "{err}"
    );
    engine.set_fail_writes(false);
    assert!(store.get(b"a").unwrap().is_empty(), "nothing was applied");
    let (ok, commit) = store.write_early(put("a", "2", None)).await.unwrap();
    commit.await.expect("committed");
    assert_eq!(store.get(b"a").unwrap(), ok.state);

    // Use up the lease; the next dot needs a new lease, so its outcome is held back until the
    // commit that persists the lease, and a failed commit answers an error instead.
    let last = mint_until(
        &store,
        ok.dot.unwrap().counter,
        early.counter - 1 + COUNTER_LEASE,
    )
    .await;
    engine.set_fail_writes(true);
    let err = store
        .write_early(put("c", "1", None))
        .await
        .err()
        .expect("held back, so the failure is reported instead of an outcome");
    assert!(matches!(&err, WriteError::Storage { .. }), "{err}");
    engine.set_fail_writes(false);
    crash(store);
    let store = open(&engine, SyncMode::Group);
    let next = store.write(put("d", "1", None)).await.unwrap().dot.unwrap();
    assert_eq!(next.actor, early.actor, "sync=group keeps the incarnation");
    assert!(
        next.counter > last && next.counter > early.counter,
        "counter {next:?} reuses a dot that left the writer (last {last}, early {early:?})"
    );
    store.close();
}

#[tokio::test]
async fn a_batch_persisting_a_counter_lease_is_fsynced_even_in_none_mode() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open(&engine, SyncMode::None);
    let synced = |s: &Store| s.stats().synced_batches.load(Ordering::Relaxed);
    // The lease persisted at open covers the first COUNTER_LEASE dots: no fsync for them.
    mint_until(&store, 0, COUNTER_LEASE).await;
    assert_eq!(synced(&store), 0, "sync=none fsyncs no ordinary batch");
    // The next dot needs a new lease, persisted with its batch, and that batch is fsynced.
    let next = store.write(put("next", "v", None)).await.unwrap();
    assert_eq!(next.dot.unwrap().counter, COUNTER_LEASE + 1);
    assert_eq!(synced(&store), 1, "the lease batch was fsynced");
    store.write(put("after", "v", None)).await.unwrap();
    assert_eq!(
        synced(&store),
        1,
        "later batches under the new lease are not"
    );
    store.close();
}

#[test]
fn only_a_failed_wal_write_or_fsync_leaves_the_outcome_unknown() {
    let key = HexKey(b"k".to_vec());
    let storage = |source| WriteError::Storage {
        key: key.clone(),
        source,
    };
    let io = |op| StorageError::Io {
        op,
        cause: "EIO".into(),
    };
    assert!(!storage(io("write")).is_definite());
    assert!(!storage(io("sync_wal")).is_definite());
    assert!(!writer_exited(b"k").is_definite());
    assert!(
        storage(io("get")).is_definite(),
        "a failed read wrote nothing"
    );
    assert!(storage(StorageError::NoSpace {
        op: "write",
        cause: "ENOSPC".into()
    })
    .is_definite());
    assert!(!storage(StorageError::NoSpace {
        op: "sync_wal",
        cause: "ENOSPC".into()
    })
    .is_definite());
    assert!(
        !storage(StorageError::NoSpace {
            op: "write",
            cause: "No space left on device: While fdatasync".into()
        })
        .is_definite(),
        "ENOSPC from the fsync after the append"
    );
    assert!(WriteError::Overloaded { capacity: 1 }.is_definite());
}

/// 200 concurrent acknowledged writes, then a simulated power loss (everything not fsynced is
/// gone) and a restart: which acknowledged writes are still there.
async fn acked_writes_after_power_loss(mode: SyncMode) -> (usize, usize) {
    let engine = Arc::new(MemoryEngine::new());
    let store = Arc::new(open(&engine, mode));
    write_concurrently(&store, 200).await;
    engine.lose_unsynced();
    crash(store);
    let store = open(&engine, mode);
    let kept = (0..200)
        .filter(|i| !store.get(format!("k{i}").as_bytes()).unwrap().is_empty())
        .count();
    store.close();
    (kept, 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_and_always_modes_answer_only_after_an_fsync_covers_the_write() {
    for mode in [SyncMode::Group, SyncMode::Always] {
        let (kept, acked) = acked_writes_after_power_loss(mode).await;
        assert_eq!(
            kept, acked,
            "{mode}: acknowledged writes lost in a power loss"
        );
    }
    // Control: the simulated power loss does take back unsynced writes.
    let (kept, acked) = acked_writes_after_power_loss(SyncMode::None).await;
    assert!(
        kept < acked,
        "none mode: {kept} of {acked} survived, expected losses"
    );
}
