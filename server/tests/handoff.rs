//! Hinted handoff and sloppy quorums through real `ringkv` processes on 127.0.0.1: hints taken
//! for a down node, kept across a holder's restart, merged per key, replayed without any read at
//! the pace the target grants, and dropped (counted, marked for anti-entropy) past the window
//! or the caps.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ringkv_client::{Client, ClientConfig, ErrorKind, GetOptions, PutOptions};
use ringkv_jepsen::{eventually, metric, metric_total, tool_json, Cluster};
use ringkv_protocol::ring::{key_position, Ring};

const LOCAL: GetOptions = GetOptions {
    r: None,
    pr: None,
    timeout: None,
    local: true,
};

fn w(n: u8) -> PutOptions {
    PutOptions {
        w: Some(n),
        ..Default::default()
    }
}

/// The cluster's ring (every member, as the first node sees it).
async fn ring_of(c: &Cluster) -> Ring {
    let ring = c.client(0).ring().await.unwrap();
    Ring::new(ring.members.iter().map(|m| (m.node_id.as_str(), m.tokens)))
}

fn preference(ring: &Ring, key: &str) -> Vec<String> {
    ring.preference_list(key_position(key.as_bytes()), 3)
        .iter()
        .map(|n| n.to_string())
        .collect()
}

/// Writes `keys` (key, value) through nodes `via`, 16 at a time, W=2.
async fn write_all(c: &Cluster, via: &[usize], keys: Vec<(String, Vec<u8>)>) {
    let clients: Vec<Client> = via.iter().map(|&i| c.client(i)).collect();
    let mut pending = futures::stream::FuturesUnordered::new();
    for (i, (k, v)) in keys.into_iter().enumerate() {
        let client = clients[i % clients.len()].clone();
        pending.push(async move {
            client
                .put_with(&k, v, None, w(2))
                .await
                .unwrap_or_else(|e| panic!("{k}: {e}"))
        });
        if pending.len() >= 16 {
            futures::StreamExt::next(&mut pending).await;
        }
    }
    while futures::StreamExt::next(&mut pending).await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_gets_its_writes_back_without_any_read() {
    let mut c = Cluster::start(5, &[]).await;
    let ring = ring_of(&c).await;
    c.nodes[4].stop().unwrap();
    c.wait_converged(Duration::from_secs(15)).await.unwrap();
    let others = [0, 1, 2, 3];

    // Strict vs sloppy, on a key that has n5 as a primary and is coordinated by n1.
    let key = (0..1000)
        .map(|i| format!("pw-{i}"))
        .find(|k| {
            let p = preference(&ring, k);
            p.contains(&"n5".to_string()) && p.contains(&"n1".to_string())
        })
        .unwrap();
    let strict = PutOptions {
        w: Some(2),
        pw: Some(3),
        ..Default::default()
    };
    let err = c
        .client(0)
        .put_with(&key, "v", None, strict)
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        Some(ErrorKind::Unavailable {
            alive: 2,
            needed: 3
        }),
        "{err}"
    );
    assert!(
        err.is_definite() && err.to_string().contains("PW=3"),
        "{err}"
    );
    let written = c.client(0).put_with(&key, "v", None, w(3)).await.unwrap();
    assert_eq!(
        (written.primary_acks, written.fallback_acks),
        (2, 1),
        "W=3 with one primary down: one ack from a fallback"
    );

    let keys: Vec<(String, Vec<u8>)> = (0..2000)
        .map(|i| (format!("key-{i}"), format!("value-{i}").into_bytes()))
        .collect();
    write_all(&c, &others, keys.clone()).await;
    let for_n5 = keys
        .iter()
        .filter(|(k, _)| preference(&ring, k).contains(&"n5".to_string()))
        .count();
    // A write is answered at W=2 acks; its hint for n5 may still be on its way (a slot beyond
    // W finishes after the answer), so the count is awaited, then read once more.
    eventually(
        Duration::from_secs(10),
        "every write n5 missed is hinted",
        || async { metric_total(&c, &others, "hints.pending_keys").await as usize >= for_n5 },
    )
    .await;

    // kvctl shows the backlog, waiting for n5: `pending` until each holder's replay worker
    // has taken its next turn (it polls), then `waiting` (n5 is down).
    let kvctl_hints = || {
        let v = tool_json("kvctl", &["--addr", &c.nodes[0].addr, "--json", "hints"]);
        let targets: Vec<serde_json::Value> = v["holders"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|h| h["targets"].as_array().unwrap().iter())
            .filter(|t| t["target"] == "n5")
            .cloned()
            .collect();
        for t in &targets {
            assert!(
                t["state"] == "waiting" || t["state"] == "pending",
                "n5 is down: {t}"
            );
        }
        targets
    };
    // A hint beyond W may still land (a slow fallback's, kept by the coordinator): the
    // listing is compared with the metric read right after it, until both agree.
    eventually(
        Duration::from_secs(10),
        "every holder's replay worker marks n5 waiting, and kvctl lists every pending hint",
        || async {
            let targets = kvctl_hints();
            let listed: u64 = targets.iter().map(|t| t["keys"].as_u64().unwrap()).sum();
            targets.iter().all(|t| t["state"] == "waiting")
                && listed == metric_total(&c, &others, "hints.pending_keys").await
        },
    )
    .await;

    // A holder restarts before n5 returns: its hints survive.
    let held = metric(&c.client(1), "hints.pending_keys").await;
    assert!(held > 0, "n2 holds hints");
    c.nodes[1].stop().unwrap();
    c.nodes[1].start().unwrap();
    c.wait_ready(1, Duration::from_secs(15)).await.unwrap();
    assert_eq!(metric(&c.client(1), "hints.pending_keys").await, held);

    c.nodes[4].start().unwrap();
    c.wait_converged(Duration::from_secs(15)).await.unwrap();
    // A batch's hints leave the book as their deletes commit; `hints.replayed` counts them
    // once the whole batch is deleted: both are awaited.
    eventually(Duration::from_secs(60), "every hint replayed", || async {
        metric_total(&c, &others, "hints.pending_keys").await == 0
            && metric_total(&c, &others, "hints.replayed").await >= for_n5 as u64
    })
    .await;
    // Without any read: n5's own replica holds every key it is a primary of, and every node
    // holds only the keys it replicates (fallbacks kept hints, never copies).
    let clients: Vec<Client> = (0..5).map(|i| c.client(i)).collect();
    for (k, v) in &keys {
        let p = preference(&ring, k);
        for (i, client) in clients.iter().enumerate() {
            let read = client.get_with(k, LOCAL).await.unwrap();
            let node = format!("n{}", i + 1);
            assert_eq!(
                read.is_found(),
                p.contains(&node),
                "{k} on {node} (replicas {p:?})"
            );
            if read.is_found() {
                let values: BTreeSet<&[u8]> = read
                    .siblings
                    .iter()
                    .filter_map(|s| s.value.as_deref())
                    .collect();
                assert_eq!(values, BTreeSet::from([v.as_slice()]), "{k} on {node}");
            }
        }
    }
    assert_eq!(metric(&clients[4], "read_repair.sent").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_merge_per_key_and_replay_is_paced_by_the_target() {
    const BUDGET: f64 = 100.0;
    // Anti-entropy every 2 s: exchanges with n5 fall inside its replay, and must wait for it.
    let mut c = Cluster::start(
        5,
        &[
            "--hint-replay-keys-per-sec",
            "100",
            "--aae-interval-secs",
            "2",
        ],
    )
    .await;
    let ring = ring_of(&c).await;
    c.nodes[4].stop().unwrap();
    c.wait_converged(Duration::from_secs(15)).await.unwrap();
    let others = [0, 1, 2, 3];
    // 10 000 writes to 100 keys (each key rewritten blind: siblings, merged per hint).
    let hot: Vec<String> = (0..100).map(|i| format!("hot-{i}")).collect();
    let writes: Vec<(String, Vec<u8>)> = (0..10_000)
        .map(|i| (hot[i % 100].clone(), vec![b'x'; 8]))
        .collect();
    let hot_for_n5 = hot
        .iter()
        .filter(|k| preference(&ring, k).contains(&"n5".to_string()))
        .count() as u64;
    // Blind writes to one key pile up siblings: resolve as we go by writing with contexts.
    let clients: Vec<Client> = others.iter().map(|&i| c.client(i)).collect();
    let mut tasks = Vec::new();
    for (t, chunk) in writes.chunks(10_000 / 20).enumerate() {
        let client = clients[t % clients.len()].clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for (k, v) in chunk {
                let ctx = client.get(&k).await.unwrap().context;
                client.put_with(&k, v, Some(&ctx), w(2)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let pending = metric_total(&c, &others, "hints.pending_keys").await;
    assert!(
        pending <= hot_for_n5 && pending > 0,
        "10 000 writes to 100 keys leave at most one hint per key for n5: {pending} (keys {hot_for_n5})"
    );

    // A backlog spread over several holders.
    let more: Vec<(String, Vec<u8>)> = (0..600)
        .map(|i| (format!("cold-{i}"), vec![b'y'; 16]))
        .collect();
    write_all(&c, &others, more).await;
    let mut holders = 0;
    for &i in &others {
        holders += (metric(&c.client(i), "hints.pending_keys").await > 0) as usize;
    }
    assert!(holders >= 3, "{holders} holders");
    let backlog = metric_total(&c, &others, "hints.pending_keys").await;

    c.nodes[4].start().unwrap();
    let target = c.client(4);
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let start = Instant::now();
    loop {
        if let Ok(s) = target.status().await {
            if let Some((_, v)) = s
                .metrics
                .iter()
                .find(|(k, _)| k == "hints.replay_received_keys")
            {
                samples.push((Instant::now(), *v));
            }
        }
        if metric_total(&c, &others, "hints.pending_keys").await == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "replay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The last batch may have been received after the last sample of the loop.
    let v1 = metric(&target, "hints.replay_received_keys").await;
    let t1 = Instant::now();
    eprintln!(
        "pacing: backlog {backlog} over {holders} holders, samples {:?}",
        samples
            .iter()
            .map(|(t, v)| (t.duration_since(start).as_millis(), *v))
            .collect::<Vec<_>>()
    );
    let (t0, v0) = *samples.iter().find(|(_, v)| *v > 0).unwrap_or(&samples[0]);
    let received = v1.saturating_sub(v0) as f64;
    let secs = t1.duration_since(t0).as_secs_f64();
    // The budget plus one burst (half a second of it), with 20% tolerance for sampling.
    let allowed = BUDGET * secs * 1.2 + BUDGET * 0.5 + 10.0;
    assert!(
        received <= allowed,
        "{received} keys replayed into n5 in {secs:.1} s; budget {BUDGET}/s allows {allowed:.0}"
    );
    assert!(
        v1 >= backlog,
        "every hint was delivered to n5: {v1} received, {backlog} pending before"
    );
    assert!(
        metric(&target, "hints.credits_refused").await > 0,
        "holders were paced"
    );
    let all: Vec<usize> = (0..5).collect();
    assert!(
        metric_total(&c, &all, "aae.exchanges_deferred").await > 0,
        "anti-entropy exchanges with n5 waited for its replay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_past_the_cap_or_the_window_are_dropped_counted_and_marked() {
    let mut c = Cluster::start(
        5,
        &["--hint-window-secs", "3", "--hints-max-mb-per-target", "1"],
    )
    .await;
    c.nodes[4].stop().unwrap();
    c.wait_converged(Duration::from_secs(15)).await.unwrap();
    let others = [0, 1, 2, 3];
    // About 7 MB of writes n5 misses, over three or four holders: each passes its 1 MiB cap.
    let keys: Vec<(String, Vec<u8>)> = (0..1500)
        .map(|i| (format!("big-{i}"), vec![b'z'; 8 << 10]))
        .collect();
    write_all(&c, &others, keys).await;
    let capped = metric_total(&c, &others, "hints.dropped_cap").await;
    assert!(capped > 0, "the cap dropped hints");
    assert!(metric_total(&c, &others, "hints.aae_marks").await >= capped);
    for &i in &others {
        let bytes = metric(&c.client(i), "hints.pending_bytes").await;
        assert!(bytes <= 1 << 20, "n{} holds {bytes} bytes for n5", i + 1);
    }
    // Past the window, everything left is given up, counted and marked.
    eventually(Duration::from_secs(20), "hints expire", || async {
        metric_total(&c, &others, "hints.pending_keys").await == 0
    })
    .await;
    let expired = metric_total(&c, &others, "hints.dropped_expired").await;
    assert!(expired > 0);
    assert!(metric_total(&c, &others, "hints.aae_marks").await >= capped + expired);
    let s = c.client(0).status().await.unwrap();
    assert!(
        s.info.iter().any(|(k, _)| k == "worker.hint_replay"),
        "{:?}",
        s.info
    );
    let _ = ClientConfig::default();
}
