//! Cluster behaviour through real `ringkv` processes on 127.0.0.1 with temp data dirs.

use std::time::Duration;

use ringkv_client::{Client, ErrorKind, GetOptions, PutOptions};
use ringkv_jepsen::{eventually, metric, Cluster};

use ringkv_jepsen::sorted_values as strings;

fn w(n: u8) -> PutOptions {
    PutOptions {
        w: Some(n),
        ..Default::default()
    }
}

fn r(n: u8) -> GetOptions {
    GetOptions {
        r: Some(n),
        ..Default::default()
    }
}

const LOCAL: GetOptions = GetOptions {
    r: None,
    pr: None,
    timeout: None,
    local: true,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_one_node_read_through_another() {
    let c = Cluster::start(3, &[]).await;
    let (a, cc) = (c.client(0), c.client(2));
    a.put_with("k", "v1", None, w(2)).await.unwrap();
    let read = cc.get_with("k", r(2)).await.unwrap();
    assert_eq!(strings(&read), vec!["v1"]);
    // Siblings travel too: a blind write through C makes two versions, seen through A.
    cc.put_with("k", "v2", None, w(2)).await.unwrap();
    let read = a.get_with("k", r(2)).await.unwrap();
    assert_eq!(strings(&read), vec!["v1", "v2"]);
    // Every node reports the same ring.
    let rings: Vec<_> = futures_rings(&c).await;
    assert!(rings.windows(2).all(|w| w[0] == w[1]), "{rings:?}");
    assert_eq!(rings[0].len(), 3);
    let status = a.status().await.unwrap();
    assert!(status
        .metrics
        .iter()
        .any(|(k, v)| k == "coordinator.writes" && *v >= 1));
}

async fn futures_rings(c: &Cluster) -> Vec<Vec<(String, u32, u32)>> {
    let mut out = Vec::new();
    for i in 0..c.nodes.len() {
        let ring = c.client(i).ring().await.unwrap();
        out.push(
            ring.members
                .iter()
                .map(|m| (m.node_id.clone(), m.tokens, m.primary_ppm))
                .collect(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_down_quorums_of_two_keep_working_and_w3_fails_clearly() {
    let mut c = Cluster::start(3, &[]).await;
    let (a, cc) = (c.client(0), c.client(2));
    a.put_with("before", "x", None, w(3)).await.unwrap();
    c.nodes[1].kill9();
    // Right away (before failure detection) and after it, W=2 / R=2 succeed.
    for i in 0..20 {
        let key = format!("k{i}");
        a.put_with(&key, format!("v{i}"), None, w(2)).await.unwrap();
        assert_eq!(
            strings(&cc.get_with(&key, r(2)).await.unwrap()),
            vec![format!("v{i}")]
        );
    }
    let err = a.put_with("k-w3", "v", None, w(3)).await.unwrap_err();
    match err.kind() {
        Some(ErrorKind::Unavailable {
            alive: 2,
            needed: 3,
        })
        | Some(ErrorKind::Timeout { needed: 3, .. }) => {}
        other => panic!("expected Unavailable/Timeout, got {other:?}: {err}"),
    }
    assert!(err.to_string().contains("node n1"), "{err}");
    // Once n2 is known down, the refusal is decided before writing anything.
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let err = a.put_with("k-w3b", "v", None, w(3)).await.unwrap_err();
    assert_eq!(
        err.kind(),
        Some(ErrorKind::Unavailable {
            alive: 2,
            needed: 3
        }),
        "{err}"
    );
    assert!(
        err.is_definite(),
        "refused before any replica was written: {err}"
    );
    assert!(!a.get_with("k-w3b", r(2)).await.unwrap().is_found());
    let err = a.get_with("before", r(3)).await.unwrap_err();
    assert_eq!(
        err.kind(),
        Some(ErrorKind::Unavailable {
            alive: 2,
            needed: 3
        }),
        "{err}"
    );
    // R/W above N are invalid, whatever the cluster state.
    let err = a.put_with("k", "v", None, w(4)).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::InvalidRequest), "{err}");
    assert!(
        err.to_string()
            .contains("W=4 exceeds the replication factor N=3"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_repair_fills_a_replica_that_missed_a_write() {
    // Without hinted handoff and anti-entropy (a restarted node's first exchange comes 10 s
    // after its start), so that only the read can be what repairs B.
    let flags = ["--hinted-handoff", "false", "--anti-entropy", "false"];
    let mut c = Cluster::start(3, &flags).await;
    c.nodes[1].stop().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let a = c.client(0);
    a.put_with("k", "written-while-b-was-down", None, w(2))
        .await
        .unwrap();
    c.nodes[1].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let b = c.client(1);
    assert!(
        !b.get_with("k", LOCAL).await.unwrap().is_found(),
        "B's own replica must not have k before the repair"
    );
    let read = a.get_with("k", r(3)).await.unwrap();
    assert_eq!(strings(&read), vec!["written-while-b-was-down"]);
    eventually(Duration::from_secs(15), "read repair reaches B", || async {
        b.get_with("k", LOCAL).await.unwrap().is_found()
    })
    .await;
    assert_eq!(
        b.get_with("k", LOCAL).await.unwrap().siblings,
        read.siblings,
        "B holds exactly the merged version"
    );
    assert!(metric(&a, "read_repair.sent").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_via_two_coordinators_become_siblings_then_collapse_everywhere() {
    let c = Cluster::start(3, &[]).await;
    let (a, b, cc) = (c.client(0), c.client(1), c.client(2));
    let (ra, rb) = tokio::join!(
        a.put_with("cart", "apple", None, w(2)),
        b.put_with("cart", "pear", None, w(2))
    );
    let (da, db) = (ra.unwrap().dot, rb.unwrap().dot);
    assert_ne!(da.0, db.0, "two coordinators, two actors");
    let read = cc.get_with("cart", r(3)).await.unwrap();
    assert_eq!(strings(&read), vec!["apple", "pear"]);
    cc.put_with("cart", "apple+pear", Some(&read.context), w(2))
        .await
        .unwrap();
    for i in 0..3 {
        let client = c.client(i);
        eventually(
            Duration::from_secs(15),
            "every replica collapses to one sibling",
            || {
                let client = client.clone();
                async move {
                    let local = client.get_with("cart", LOCAL).await.unwrap();
                    local.siblings.len() == 1 && strings(&local) == vec!["apple+pear"]
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_replica_entry_nodes_forward_writes_and_any_node_reads() {
    // 4 nodes, N=2: for most keys some entry node is not a replica and must forward.
    let c = Cluster::start(4, &["--n", "2"]).await;
    let clients: Vec<Client> = (0..4).map(|i| c.client(i)).collect();
    for k in 0..40 {
        let key = format!("key{k}");
        clients[k % 4]
            .put_with(&key, format!("v{k}"), None, w(2))
            .await
            .unwrap();
        let read = clients[(k + 1) % 4].get_with(&key, r(2)).await.unwrap();
        assert_eq!(strings(&read), vec![format!("v{k}")], "{key}");
        let holders = futures_holders(&clients, &key).await;
        assert_eq!(holders, 2, "{key} is stored on exactly N=2 nodes");
    }
    let mut forwarded = 0;
    for cl in &clients {
        forwarded += metric(cl, "coordinator.forwarded_writes").await;
    }
    assert!(
        forwarded > 0,
        "some writes entered at a non-replica and were forwarded"
    );
}

async fn futures_holders(clients: &[Client], key: &str) -> usize {
    let mut n = 0;
    for cl in clients {
        if cl.get_with(key, LOCAL).await.unwrap().is_found() {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_several_addresses_fails_over_when_a_node_dies() {
    let mut c = Cluster::start(3, &[]).await;
    let client = Client::connect(c.addrs()).await.unwrap();
    client.put("k", "v", None).await.unwrap();
    c.nodes[0].kill9();
    // Reads retry on the next node even after a broken connection.
    assert_eq!(strings(&client.get("k").await.unwrap()), vec!["v"]);
    // Writes fail over when the request could not be sent (connection refused).
    let read = client.get("k").await.unwrap();
    client.put("k", "v2", Some(&read.context)).await.unwrap();
    assert_eq!(strings(&client.get("k").await.unwrap()), vec!["v2"]);
    // A client whose first address was never reachable works too.
    let c2 = Client::connect(["127.0.0.1:1".to_string(), c.nodes[1].addr.clone()])
        .await
        .unwrap();
    assert_eq!(strings(&c2.get("k").await.unwrap()), vec!["v2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_aware_client_sends_every_write_to_a_replica() {
    // 4 nodes, N=2: half the nodes are not replicas of a given key.
    let c = Cluster::start(4, &["--n", "2"]).await;
    let nodes: Vec<Client> = (0..4).map(|i| c.client(i)).collect();
    let forwarded = || async {
        let mut sum = 0;
        for cl in &nodes {
            sum += metric(cl, "coordinator.forwarded_writes").await;
        }
        sum
    };
    // Control: without routing, writes enter wherever the client is connected.
    let plain = ringkv_client::ClientConfig {
        ring_aware: false,
        ..Default::default()
    };
    let plain = Client::connect_with(c.addrs(), plain).await.unwrap();
    let before = forwarded().await;
    for k in 0..40 {
        plain.put(format!("plain{k}"), "v", None).await.unwrap();
    }
    assert!(
        forwarded().await > before,
        "without routing some writes reach a non-replica"
    );

    let aware = ringkv_client::ClientConfig {
        ring_aware: true,
        ..Default::default()
    };
    let aware = Client::connect_with(c.addrs(), aware).await.unwrap();
    aware.refresh_ring().await.unwrap();
    let before = forwarded().await;
    for k in 0..100 {
        let key = format!("aware{k}");
        aware.put(&key, format!("v{k}"), None).await.unwrap();
        let read = aware.get(&key).await.unwrap();
        assert_eq!(strings(&read), vec![format!("v{k}")], "{key}");
    }
    assert_eq!(
        forwarded().await,
        before,
        "a ring-aware client's writes are coordinated where they land"
    );
}

/// Regression (defect 1 of the hardening issue): a coordinator whose disk is full used to ship
/// its minted version to the replicas, fail its own commit, keep its actor, and mint its next
/// write to the key with a higher counter that covered (erased) the first on the replicas:
/// an acknowledged write lost. Now a replica that cannot write does not mint: the write goes
/// to another replica, and every acknowledged value survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_with_a_full_disk_loses_no_acknowledged_write() {
    use ringkv_jepsen::disk::SmallDisk;
    use ringkv_jepsen::NodeProcess;
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("db"), 24).unwrap() else {
        eprintln!("skipped: mounting a small tmpfs as a full disk needs root");
        return;
    };
    let mut n1 = NodeProcess::new("n1", dir.path(), "127.0.0.1:0", &[]);
    n1.start().unwrap();
    let seed = n1.gossip_addr.clone();
    let mut nodes = vec![n1];
    for i in 2..=3 {
        let mut n = NodeProcess::new_temp(&format!("n{i}"), &["--seeds", &seed]);
        n.start().unwrap();
        nodes.push(n);
    }
    let c = Cluster { nodes };
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    c.wait_synced(Duration::from_secs(30)).await.unwrap();
    let coordinator = c.client(0);
    coordinator.put("warm-up", "x", None).await.unwrap();
    disk.fill().unwrap();
    // Blind writes of one key through n1 until its storage has failed at least twice: each is
    // acknowledged by the other replicas.
    let value = |i: usize| format!("{i}:{}", "v".repeat(64 * 1024));
    let mut acked = Vec::new();
    for i in 0..40 {
        coordinator
            .put_with("k", value(i), None, w(2))
            .await
            .unwrap_or_else(|e| panic!("write {i} through the full-disk node: {e}"));
        acked.push(value(i));
        if acked.len() >= 2 && metric(&coordinator, "storage.write_errors").await >= 2 {
            break;
        }
    }
    assert!(
        metric(&coordinator, "storage.write_errors").await >= 2,
        "the disk never filled"
    );
    assert!(metric(&coordinator, "coordinator.forwarded_after_local_failure").await >= 1);
    // Every acknowledged value is there, through every node (n1 answers from its partial
    // copy, merged with the others).
    for i in 0..3 {
        let read = c.client(i).get_with("k", r(3)).await.unwrap();
        let values = strings(&read);
        for v in &acked {
            assert!(
                values.contains(v),
                "through n{}: an acknowledged write is lost",
                i + 1
            );
        }
    }
}

/// Regression (defect 5): coordinators that could not see each other each filled a key to the
/// sibling cap; after the heal the merged state held more siblings than a client would decode,
/// so nobody could read it or obtain a context to resolve it. Now reads carry every sibling a
/// replica may hold, and one write with the read's context resolves them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_driven_to_the_cap_from_two_partitioned_sides_is_read_and_resolved_in_one_write() {
    use ringkv_protocol::limits::MAX_SIBLINGS;
    let mut c = Cluster::start(3, &[]).await;
    // Side A: n1 alone (n2 and n3 stopped), W=1.
    c.nodes[1].stop().unwrap();
    c.nodes[2].stop().unwrap();
    let a = c.client(0);
    for i in 0..MAX_SIBLINGS {
        a.put_with("k", format!("a{i}"), None, w(1)).await.unwrap();
    }
    let err = a
        .put_with("k", "one too many", None, w(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), Some(ErrorKind::TooManySiblings { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("with that read's context"),
        "{err}"
    );
    // Side B: n2 and n3 without n1.
    c.nodes[0].stop().unwrap();
    c.nodes[1].start().unwrap();
    c.nodes[2].start().unwrap();
    c.wait_ready(1, Duration::from_secs(30)).await.unwrap();
    let b = c.client(1);
    for i in 0..MAX_SIBLINGS {
        b.put_with("k", format!("b{i}"), None, w(1)).await.unwrap();
    }
    // Heal.
    c.nodes[0].start().unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    c.wait_ready(0, Duration::from_secs(30)).await.unwrap();
    let read = c.client(2).get_with("k", r(3)).await.unwrap();
    assert_eq!(
        read.siblings.len(),
        2 * MAX_SIBLINGS,
        "every sibling of both sides"
    );
    assert_eq!(read.hidden, 0);
    // One write with that context resolves them all, on every replica.
    c.client(2)
        .put_with("k", "resolved", Some(&read.context), w(3))
        .await
        .unwrap();
    for i in 0..3 {
        let local = c.client(i).get_with("k", LOCAL).await.unwrap();
        assert_eq!(strings(&local), vec!["resolved"], "n{}", i + 1);
        assert_eq!(local.siblings.len(), 1);
    }
}
