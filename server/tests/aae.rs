//! Anti-entropy through real `ringkv` processes on 127.0.0.1: the tree each node keeps in its
//! write path describes its data, so replicas holding the same data show the same root
//! (`aae.tree_root` in `status`), across restarts (the tree is loaded, not rebuilt), and a
//! replica that missed writes shows a different root until it has them again; the
//! `anti_entropy` worker brings such a replica level by itself, without any read and without
//! hints.

use std::time::Duration;

use ringkv_client::{GetOptions, PutOptions};
use ringkv_jepsen::{bin_path, eventually, metric, metric_total, tool_json, Cluster};
use ringkv_protocol::ring::{key_position, Ring};

const LOCAL: GetOptions = GetOptions {
    r: None,
    pr: None,
    timeout: None,
    local: true,
};

async fn root(c: &Cluster, i: usize) -> String {
    let s = c.client(i).status().await.expect("status");
    s.info
        .iter()
        .find(|(k, _)| k == "aae.tree_root")
        .map(|(_, v)| v.clone())
        .expect("status has aae.tree_root")
}

async fn roots(c: &Cluster, which: &[usize]) -> Vec<String> {
    let mut out = Vec::new();
    for &i in which {
        out.push(root(c, i).await);
    }
    out
}

async fn write(c: &Cluster, via: &[usize], prefix: &str, n: usize, w: u8) {
    let opts = PutOptions {
        w: Some(w),
        ..Default::default()
    };
    for i in 0..n {
        let client = c.client(via[i % via.len()]);
        client
            .put_with(
                &format!("{prefix}{i}"),
                format!("v{i}").into_bytes(),
                None,
                opts,
            )
            .await
            .unwrap_or_else(|e| panic!("{prefix}{i}: {e}"));
    }
}

/// Node `down` is stopped while `n` keys `prefix0..` are written through `via` with W=2, then
/// restarted: it missed every one of them.
async fn write_while_down(c: &mut Cluster, down: usize, via: &[usize], prefix: &str, n: usize) {
    c.nodes[down].stop().unwrap();
    c.wait_converged(Duration::from_secs(15)).await.unwrap();
    write(c, via, prefix, n, 2).await;
    c.nodes[down].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
}

/// Whether `client`'s node holds a live value of every key, by local reads (which never
/// repair).
async fn holds_all(client: &ringkv_client::Client, keys: impl IntoIterator<Item = String>) -> bool {
    for k in keys {
        match client.get_with(&k, LOCAL).await {
            Ok(r) if r.is_found() => {}
            _ => return false,
        }
    }
    true
}

/// Three nodes with N=3 each replicate every key: equal data, equal roots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_the_same_data_show_the_same_root_across_restarts() {
    let mut c = Cluster::start(3, &[]).await;
    let empty = roots(&c, &[0, 1, 2]).await;
    write(&c, &[0, 1, 2], "k", 300, 3).await;
    let full = roots(&c, &[0, 1, 2]).await;
    assert!(
        full.iter().all(|r| *r == full[0]) && full[0] != empty[0],
        "after writes every replica acknowledged: {full:?} (empty {empty:?})"
    );

    // A restart loads the stored leaves: the same root.
    c.nodes[2].stop().unwrap();
    c.nodes[2].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    assert_eq!(root(&c, 2).await, full[0], "n3's root after a restart");

    // n3 misses writes while down: its root stays behind, then hinted handoff brings it level.
    c.nodes[2].stop().unwrap();
    c.wait_converged(Duration::from_secs(15)).await.unwrap();
    write(&c, &[0, 1], "more", 100, 2).await;
    let ahead = roots(&c, &[0, 1]).await;
    assert_eq!(
        ahead[0], ahead[1],
        "n1 and n2 hold the same data: {ahead:?}"
    );
    assert_ne!(ahead[0], full[0]);
    c.nodes[2].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "n3's root equals the others'",
        || async { root(&c, 2).await == root(&c, 0).await },
    )
    .await;
    assert_eq!(root(&c, 0).await, ahead[0], "replay changed nothing on n1");
}

/// Five nodes, N=3 (each node shares only parts of the ring with each other): a node that was
/// down while 2 000 keys were written with hinted handoff off gets every key of its ranges
/// back from the anti-entropy worker alone: no read, no hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_repairs_a_replica_that_missed_writes_without_reads_or_hints() {
    let flags = ["--hinted-handoff", "false", "--aae-interval-secs", "2"];
    let mut c = Cluster::start(5, &flags).await;
    let ring = {
        let r = c.client(0).ring().await.unwrap();
        Ring::new(r.members.iter().map(|m| (m.node_id.as_str(), m.tokens)))
    };
    c.nodes[4].stop().unwrap();
    c.wait_converged(Duration::from_secs(15)).await.unwrap();
    let others = [0, 1, 2, 3];
    write(&c, &others, "key-", 2000, 2).await;
    let mine: Vec<String> = (0..2000)
        .map(|i| format!("key-{i}"))
        .filter(|k| {
            ring.preference_list(key_position(k.as_bytes()), 3)
                .iter()
                .any(|p| &**p == "n5")
        })
        .collect();
    assert!(mine.len() > 600, "n5 replicates {} of the keys", mine.len());

    c.nodes[4].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let n5 = c.client(4);
    eventually(
        Duration::from_secs(60),
        "n5 holds every key of its ranges",
        || holds_all(&n5, mine.clone()),
    )
    .await;
    // Nothing else could have done it: no hints, and no read touched these keys but n5's
    // local ones (which do not repair).
    assert_eq!(metric(&n5, "hints.replay_received_keys").await, 0);
    assert_eq!(metric(&n5, "read_repair.sent").await, 0);
    // Repairs are counted when their whole exchange ends, after the states landed: awaited
    // (under load n5 held every key while its senders had counted 472 of 1 240).
    eventually(
        Duration::from_secs(30),
        "every repair counted, received by n5 or sent by the others",
        || async {
            let received = metric(&n5, "aae.keys_repaired_received").await;
            received + metric_total(&c, &others, "aae.keys_repaired_sent").await
                >= mine.len() as u64
        },
    )
    .await;
    // n5 stores nothing outside its ranges.
    for i in 0..2000 {
        let k = format!("key-{i}");
        if !mine.contains(&k) {
            let r = n5.get_with(&k, LOCAL).await.unwrap();
            assert!(r.siblings.is_empty(), "{k} is not n5's but it holds it");
        }
    }
}

/// `kvctl repair --wait` runs a cycle on every node at once (the interval is an hour) and
/// returns when each finished: the replica that missed 5 000 writes then holds every one, and
/// every replica shows the same root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvctl_repair_runs_a_cycle_now_and_waits_for_it() {
    let flags = ["--hinted-handoff", "false", "--aae-interval-secs", "3600"];
    let mut c = Cluster::start(3, &flags).await;
    write_while_down(&mut c, 2, &[0, 1], "r", 5000).await;

    let addr = c.nodes[0].addr.clone();
    let kvctl =
        |args: &[&str]| tool_json("kvctl", &[&["--addr", &addr, "--json"][..], args].concat());
    let v = kvctl(&["repair", "--wait"]);
    assert_eq!(v["started"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["done"].as_array().unwrap().len(), 3, "{v}");
    let n3 = c.client(2);
    for i in 0..5000 {
        let r = n3.get_with(&format!("r{i}"), LOCAL).await.unwrap();
        assert!(
            !r.siblings.is_empty(),
            "r{i} missing on n3 after kvctl repair --wait"
        );
    }
    assert_eq!(roots(&c, &[0, 1, 2]).await, vec![root(&c, 0).await; 3]);

    // One node only; an unknown node is a clear error.
    let v = kvctl(&["repair", "--node", "n2"]);
    assert_eq!(v["started"][0]["node"], "n2", "{v}");
    let out = std::process::Command::new(bin_path("kvctl"))
        .args(["--addr", &addr, "repair", "--node", "n9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no member named \"n9\""), "{err}");
}

/// The serving side of a repair paces by its own load: while every CPU is busy (two threads of
/// this test spin), the nodes answering n3's fetches hold their answers back
/// (`aae.serve_rests`), and the repair still completes without a failed exchange (a
/// held-back answer past its caller's timeout would fail it): every key n3 missed is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_node_holds_back_its_answers_to_a_repair_which_still_completes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let flags = ["--hinted-handoff", "false", "--aae-interval-secs", "3600"];
    let mut c = Cluster::start(3, &flags).await;
    write_while_down(&mut c, 2, &[0, 1], "busy", 1000).await;
    let before = metric_total(&c, &[0, 1], "aae.serve_rests").await;

    let spin = std::sync::Arc::new(AtomicBool::new(true));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let spin = spin.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while spin.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    let addr = c.nodes[2].addr.clone();
    let v = tool_json(
        "kvctl",
        &["--addr", &addr, "--json", "repair", "--node", "n3"],
    );
    assert_eq!(v["started"][0]["node"], "n3", "{v}");
    // n3's exchange fetches from n1 and n2: while the CPUs are busy they hold answers back.
    eventually(
        Duration::from_secs(60),
        "n1 or n2 held back an answer to n3's repair",
        || async { metric_total(&c, &[0, 1], "aae.serve_rests").await > before },
    )
    .await;
    spin.store(false, Ordering::Relaxed);
    for t in spinners {
        t.join().unwrap();
    }
    let n3 = c.client(2);
    let keys: Vec<String> = (0..1000).map(|i| format!("busy{i}")).collect();
    eventually(
        Duration::from_secs(90),
        "n3 holds every key it missed",
        || holds_all(&n3, keys.clone()),
    )
    .await;
    assert_eq!(metric(&n3, "aae.exchange_errors").await, 0);
}

/// Tombstone GC: 1 000 keys deleted while n3 is down (no hints, no read repair, so only
/// anti-entropy can tell n3). While n3 is down nothing is purged (it still holds the values);
/// once it is back, anti-entropy gives it the tombstones, every replica purges them, and at no
/// point does any replica or read return a deleted value. A key written again afterwards shows
/// only its new value (the old one does not come back as a sibling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_purged_once_stable_and_deleted_values_never_return() {
    let flags = [
        "--hinted-handoff",
        "false",
        "--read-repair",
        "false",
        "--aae-interval-secs",
        "2",
        "--tombstone-settle-secs",
        "2",
    ];
    let mut c = Cluster::start(3, &flags).await;
    write(&c, &[0, 1, 2], "d", 1000, 3).await;
    // The root of an empty tree (XOR of nothing).
    let empty_root = format!("{:016x}", 0);
    c.nodes[2].stop().unwrap();
    c.wait_converged(Duration::from_secs(15)).await.unwrap();
    let w2 = PutOptions {
        w: Some(2),
        ..Default::default()
    };
    for i in 0..1000 {
        let client = c.client(i % 2);
        let key = format!("d{i}");
        let read = client.get(&key).await.unwrap();
        client
            .delete_with(&key, Some(&read.context), w2)
            .await
            .unwrap_or_else(|e| panic!("delete {key}: {e}"));
    }
    let n1 = c.client(0);
    assert_eq!(metric(&n1, "tombstones.live").await, 1000);
    // Several GC intervals with n3 down: blocked, nothing purged.
    eventually(
        Duration::from_secs(30),
        "a GC pass blocked by n3",
        || async { metric(&n1, "tombstones.gc_passes_blocked").await >= 2 },
    )
    .await;
    assert_eq!(metric(&n1, "storage.tombstones_purged").await, 0);
    assert_eq!(metric(&n1, "tombstones.live").await, 1000);

    c.nodes[2].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let n3 = c.client(2);
    // Until purged, n3 answers for each key with its old value or the tombstone; never is a
    // deleted value returned by a quorum read.
    for i in (0..1000).step_by(50) {
        let r = n1.get(format!("d{i}")).await.unwrap();
        assert!(!r.is_found(), "d{i} read back after its delete: {r:?}");
    }
    eventually(
        Duration::from_secs(90),
        "every replica purged every tombstone",
        || async {
            for i in 0..3 {
                if metric(&c.client(i), "tombstones.live").await != 0 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for i in 0..3 {
        let client = c.client(i);
        assert!(
            metric(&client, "storage.tombstones_purged").await >= 1000,
            "n{} purged every tombstone it held",
            i + 1
        );
        for k in 0..1000 {
            let r = client.get_with(format!("d{k}"), LOCAL).await.unwrap();
            assert!(
                r.siblings.is_empty(),
                "n{}: d{k} still holds {r:?} after the purge",
                i + 1
            );
        }
    }
    assert_eq!(roots(&c, &[0, 1, 2]).await, vec![empty_root; 3]);
    assert_eq!(metric(&n3, "storage.amnesia_detected").await, 0);
    // Written again with no context (the purged key has none): only the new value.
    n3.put_with("d7", b"again".to_vec(), None, w2)
        .await
        .unwrap();
    let r = n1.get("d7").await.unwrap();
    assert_eq!(
        r.values(),
        vec![&bytes::Bytes::from_static(b"again")],
        "{r:?}"
    );
}

/// A node whose disk was lost comes back under the same id with an empty data dir: it does not
/// count toward R for a key until anti-entropy has synced the key's range from every other
/// replica, so R=2 reads never answer not-found for a key written before, even when the only
/// other copy besides the lost one is on a single node. Once synced, its ranges are complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_does_not_count_toward_r_until_synced() {
    let flags = [
        "--hinted-handoff",
        "false",
        "--read-repair",
        "false",
        "--aae-interval-secs",
        "3600",
        "--aae-keys-per-sec",
        "50",
    ];
    let mut c = Cluster::start(3, &flags).await;
    // n2 misses the writes: they live on n1 and n3 only.
    write_while_down(&mut c, 1, &[0, 2], "w", 300).await;
    // n3 loses its disk and returns under the same id: n1 alone holds the keys now.
    c.nodes[2].stop().unwrap();
    let dir = c.nodes[2].data_dir.clone();
    std::fs::remove_dir_all(dir.join("db")).unwrap();
    let _ = std::fs::remove_file(dir.join("ring.jsonl"));
    c.nodes[2].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let (n1, n2, n3) = (c.client(0), c.client(1), c.client(2));
    let r2 = GetOptions {
        r: Some(2),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut rounds_while_unsynced = 0;
    loop {
        let unsynced = metric(&n3, "aae.unsynced").await;
        for i in 0..300 {
            let key = format!("w{i}");
            for (name, coordinator) in [("n2", &n2), ("n3", &n3)] {
                let r = coordinator
                    .get_with(&key, r2)
                    .await
                    .unwrap_or_else(|e| panic!("{key} via {name}: {e}"));
                assert!(
                    r.is_found(),
                    "{key} read as not found via {name} with R=2 (n3 unsynced: {unsynced})"
                );
            }
        }
        if unsynced == 0 {
            break;
        }
        rounds_while_unsynced += 1;
        // Anti-entropy yields to busy CPUs (down to 2% of its pace at 90% busy): these reads
        // and the tests running beside this one slow the sync (300 keys at 50 keys/s: 6 s at
        // the whole budget, 5 minutes at the floor), so the wait is long and the reads pause
        // between rounds (a round under load once outran 2 minutes of sync).
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "n3 still unsynced after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        rounds_while_unsynced > 0,
        "no read happened while n3 was syncing"
    );
    assert!(metric(&n3, "aae.unsynced_reads_refused").await > 0);
    // Synced: n3 holds every key again, and agrees with n1.
    for i in 0..300 {
        let r = n3.get_with(format!("w{i}"), LOCAL).await.unwrap();
        assert!(r.is_found(), "w{i} missing on n3 after its sync");
    }
    assert_eq!(root(&c, 2).await, root(&c, 0).await);
    assert_eq!(metric(&n1, "aae.unsynced").await, 0);
}

/// A node back from a long absence is synced at once, not at the next cycle (an hour away
/// here): the peers see it return and exchange with it. Its writes were hinted, but the hints
/// expired (a 1 s window), so the holders marked its partitions for anti-entropy; the
/// exchange that syncs those partitions clears the marks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_from_a_long_absence_is_synced_at_once_and_its_marks_cleared() {
    let flags = [
        "--hint-window-secs",
        "1",
        "--read-repair",
        "false",
        "--aae-interval-secs",
        "3600",
        "--aae-return-after-secs",
        "3",
    ];
    let mut c = Cluster::start(3, &flags).await;
    c.nodes[2].stop().unwrap();
    c.wait_converged(Duration::from_secs(15)).await.unwrap();
    write(&c, &[0, 1], "gone", 200, 2).await;
    let (n1, n2) = (c.client(0), c.client(1));
    eventually(
        Duration::from_secs(30),
        "the expired hints marked n3's partitions",
        || async {
            metric(&n1, "hints.aae_marks").await + metric(&n2, "hints.aae_marks").await > 0
                && metric(&n1, "hints.pending_keys").await + metric(&n2, "hints.pending_keys").await
                    == 0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.nodes[2].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let n3 = c.client(2);
    eventually(Duration::from_secs(30), "n3 holds every key", || {
        holds_all(&n3, (0..200).map(|i| format!("gone{i}")))
    })
    .await;
    let returns = metric(&n1, "aae.return_syncs").await + metric(&n2, "aae.return_syncs").await;
    assert!(returns >= 1, "the peers synced n3 on its return");
    assert_eq!(
        metric(&n3, "hints.replay_received_keys").await,
        0,
        "no hint did it"
    );
    eventually(Duration::from_secs(30), "the marks are cleared", || async {
        metric(&n1, "aae.marks_cleared").await + metric(&n2, "aae.marks_cleared").await > 0
    })
    .await;
}

/// A node whose stored tree cannot be trusted (here: its trusted-format row deleted while it
/// was stopped) starts at once and rebuilds the tree from its data in the background: the
/// `tree_scan` worker reports progress, the rebuilt root equals the one it had, and the node
/// takes part in exchanges again (a write it missed meanwhile reaches it by anti-entropy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_tree_is_rebuilt_in_the_background() {
    use ringkv_server::storage::rocks::{RocksConfig, RocksEngine};
    use ringkv_server::storage::{Batch, Cf, Engine};
    let flags = ["--hinted-handoff", "false", "--aae-interval-secs", "2"];
    let mut c = Cluster::start(3, &flags).await;
    write(&c, &[0, 1, 2], "t", 2000, 3).await;
    let before = root(&c, 2).await;
    c.nodes[2].stop().unwrap();
    {
        let engine = RocksEngine::open(
            &c.nodes[2].data_dir.join("db"),
            &RocksConfig {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 8 << 20,
            },
        )
        .unwrap();
        let mut b = Batch::default();
        b.delete(Cf::Aae, b"T".to_vec());
        engine.write(b, true).unwrap();
    }
    // Written while n3 is down: only anti-entropy can bring it (no hints).
    write(&c, &[0, 1], "late", 20, 2).await;
    c.nodes[2].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let n3 = c.client(2);
    // The tree is marked ready at the writer's commit, the last chunk's keys counted once
    // the rebuild worker sees that commit: both awaited.
    eventually(Duration::from_secs(60), "n3's tree rebuilt", || async {
        metric(&n3, "aae.tree_ready_leaves").await == 1 << 20
            && metric(&n3, "aae.rebuild_keys").await >= 2000
    })
    .await;
    eventually(Duration::from_secs(60), "n3 has the late writes", || {
        holds_all(&n3, (0..20).map(|i| format!("late{i}")))
    })
    .await;
    assert_eq!(root(&c, 2).await, root(&c, 0).await);
    assert_ne!(root(&c, 2).await, before, "the late writes are in it");
}

/// `kvctl repair --range` repairs the keys whose positions are in the range, and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvctl_repair_range_repairs_only_that_range() {
    let flags = [
        "--hinted-handoff",
        "false",
        "--read-repair",
        "false",
        "--aae-interval-secs",
        "3600",
    ];
    let mut c = Cluster::start(3, &flags).await;
    write_while_down(&mut c, 2, &[0, 1], "q", 400).await;
    tool_json(
        "kvctl",
        &[
            "--addr",
            &c.nodes[0].addr,
            "--json",
            "repair",
            "--wait",
            "--range",
            "0000000000000000:7fffffffffffffff",
        ],
    );
    let n3 = c.client(2);
    let (mut inside, mut outside) = (0, 0);
    for i in 0..400 {
        let key = format!("q{i}");
        let found = n3.get_with(&key, LOCAL).await.unwrap().is_found();
        if key_position(key.as_bytes()) <= 0x7fff_ffff_ffff_ffff {
            assert!(found, "{key} is in the range but n3 lacks it");
            inside += 1;
        } else {
            assert!(!found, "{key} is outside the range but was repaired");
            outside += 1;
        }
    }
    assert!(
        inside > 100 && outside > 100,
        "{inside} inside, {outside} outside"
    );
    // A range whose ends are reversed is refused before anything is sent.
    let out = std::process::Command::new(bin_path("kvctl"))
        .args(["--addr", &c.nodes[0].addr, "repair", "--range", "ff:01"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FIRST is after LAST"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
