//! Anti-entropy trees through real `ringkv` processes on 127.0.0.1: the tree each node keeps in
//! its write path describes its data, so replicas holding the same data show the same root
//! (`aae.tree_root` in `status`), across restarts (the tree is loaded, not rebuilt), and a
//! replica that missed writes shows a different root until it has them again.

use std::time::Duration;

use ringkv_client::PutOptions;
use ringkv_jepsen::{eventually, Cluster};

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
