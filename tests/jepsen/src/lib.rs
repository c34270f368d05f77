//! ringkv's Jepsen-style harness: real clusters of `ringkv` processes, nemeses, recorded
//! histories and checkers (see docs/jepsen.md). The process layer is also what every
//! integration test uses to run real server binaries.

pub mod checker;
pub mod cluster;
pub mod disk;
pub mod history;
pub mod nemesis;
pub mod peer;
pub mod process;
pub mod runner;

pub use cluster::Cluster;
pub use process::{bin_path, NodeProcess};

/// A read's live values as sorted strings (test helper shared by the integration tests).
pub fn sorted_values(read: &ringkv_client::Read) -> Vec<String> {
    let mut v: Vec<String> = read
        .values()
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    v.sort();
    v
}

/// The value of metric `name` in the status of the node `client` talks to (test helper shared
/// by the integration tests); panics when the node does not report it.
pub async fn metric(client: &ringkv_client::Client, name: &str) -> u64 {
    let s = client.status().await.expect("status");
    s.metrics
        .iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no metric {name}"))
        .1
}

/// Polls `check` (every 100 ms) until it returns true; panics naming `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
