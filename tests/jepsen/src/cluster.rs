//! A local cluster of real `ringkv` processes on free 127.0.0.1 ports (`process::fixed_port`).

use std::time::{Duration, Instant};

use ringkv_client::{Client, ClientConfig};

use crate::process::NodeProcess;

pub struct Cluster {
    pub nodes: Vec<NodeProcess>,
}

impl Cluster {
    /// Starts `size` nodes `n1..` (temp data dirs), the first as the gossip seed of the others,
    /// with `extra` flags for every node, and waits until every node sees every member alive.
    pub async fn start(size: usize, extra: &[&str]) -> Cluster {
        Cluster::start_with_env(size, extra, |_| Vec::new()).await
    }

    /// `start`, each node with the environment `env` gives for its data dir (e.g. the
    /// power-loss shim's, `powerloss::env`).
    pub async fn start_with_env(
        size: usize,
        extra: &[&str],
        env: impl Fn(&std::path::Path) -> Vec<(String, String)>,
    ) -> Cluster {
        let mut nodes: Vec<NodeProcess> = Vec::with_capacity(size);
        for i in 1..=size {
            let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            if let Some(first) = nodes.first() {
                args.push("--seeds".into());
                args.push(first.gossip_addr.clone());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut node = NodeProcess::new_temp(&format!("n{i}"), &args);
            for (k, v) in env(&node.data_dir) {
                node.set_env(&k, &v);
            }
            node.start().unwrap_or_else(|e| panic!("{e}"));
            nodes.push(node);
        }
        let cluster = Cluster { nodes };
        cluster
            .wait_converged(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        cluster
            .wait_synced(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        cluster
    }

    /// Waits until no running node is still syncing a new data dir (`aae.unsynced` is 0: it
    /// answers replica reads). New nodes of a new cluster sync with each other in a few
    /// seconds (empty trees, and the ring must be stable for 2 s).
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), String> {
        let running: Vec<(String, String)> = self
            .nodes
            .iter()
            .filter(|n| n.child_running())
            .map(|n| (n.id.clone(), n.addr.clone()))
            .collect();
        wait_nodes_synced(&running, timeout).await
    }

    /// Client addresses of all nodes.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// Starts one more node `id` that joins through the gossip address of node `seed`.
    pub fn add_node(&mut self, id: &str, seed: usize, extra: &[&str]) -> &mut NodeProcess {
        self.add_node_with_env(id, seed, extra, |_| Vec::new())
    }

    /// `add_node`, with the environment `env` gives for the new node's data dir (e.g. the
    /// power-loss shim's, `powerloss::env`).
    pub fn add_node_with_env(
        &mut self,
        id: &str,
        seed: usize,
        extra: &[&str],
        env: impl Fn(&std::path::Path) -> Vec<(String, String)>,
    ) -> &mut NodeProcess {
        let mut args: Vec<&str> = extra.to_vec();
        let seed_addr = self.nodes[seed].gossip_addr.clone();
        args.extend(["--seeds", seed_addr.as_str()]);
        let mut node = NodeProcess::new_temp(id, &args);
        for (k, v) in env(&node.data_dir) {
            node.set_env(&k, &v);
        }
        node.start().unwrap_or_else(|e| panic!("{e}"));
        self.nodes.push(node);
        self.nodes.last_mut().expect("just pushed")
    }

    /// A client talking to node `i` only (no failover), for tests that pick the coordinator.
    pub fn client(&self, i: usize) -> Client {
        Client::new([self.nodes[i].addr.clone()], ClientConfig::default()).expect("one address")
    }

    /// Waits until node `i` coordinates requests (it knows the ring): a read of a probe key
    /// with R=1 is not refused as "joining".
    pub async fn wait_ready(&self, i: usize, timeout: Duration) -> Result<(), String> {
        let client = self.client(i);
        let start = Instant::now();
        let opts = ringkv_client::GetOptions {
            r: Some(1),
            ..Default::default()
        };
        loop {
            match client.get_with("ready-probe", opts).await {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() > timeout => {
                    return Err(format!("n{} not ready after {timeout:?}: {e}", i + 1))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until every running node lists every running node as an alive member, and
    /// coordinates requests (it has heard from the cluster since it started).
    pub async fn wait_converged(&self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        self.wait_members(|n| n.child_running(), |n| n.child_running(), timeout)
            .await?;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child_running() {
                let left = timeout.saturating_sub(start.elapsed());
                self.wait_ready(i, left.max(Duration::from_secs(1))).await?;
            }
        }
        Ok(())
    }

    /// Waits until every node for which `observer` holds sees exactly the nodes for which
    /// `expect_alive` holds as alive (and the rest as down).
    pub async fn wait_members(
        &self,
        observer: impl Fn(&NodeProcess) -> bool,
        expect_alive: impl Fn(&NodeProcess) -> bool,
        timeout: Duration,
    ) -> Result<(), String> {
        let start = Instant::now();
        let want: Vec<(String, bool)> = self
            .nodes
            .iter()
            .map(|n| (n.id.clone(), expect_alive(n)))
            .collect();
        loop {
            let mut last = String::new();
            let mut ok = true;
            for n in self.nodes.iter().filter(|n| observer(n)) {
                let client =
                    Client::new([n.addr.clone()], ClientConfig::default()).expect("one address");
                match client.ring().await {
                    Ok(ring) => {
                        let mut seen: Vec<(String, bool)> = ring
                            .members
                            .iter()
                            .map(|m| (m.node_id.clone(), m.alive))
                            .collect();
                        seen.sort();
                        let mut w = want.clone();
                        w.sort();
                        if seen != w {
                            ok = false;
                            last = format!("{} sees {seen:?}, want {w:?}", n.id);
                        }
                    }
                    Err(e) => {
                        ok = false;
                        last = format!("{}: {e}", n.id);
                    }
                }
            }
            if ok {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "cluster did not converge within {timeout:?}: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until none of `nodes` (id, client address) is still syncing a new data dir
/// (`aae.unsynced` is 0).
pub async fn wait_nodes_synced(
    nodes: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    wait_metric_zero(nodes, "aae.unsynced", "syncing its new data dir", timeout).await
}

/// Waits until metric `name` is 0 on every one of `nodes` (id, client address), taken in
/// turn; a node that does not answer counts as not there yet. The error names the first node
/// still `doing` it when `timeout` passes.
pub async fn wait_metric_zero(
    nodes: &[(String, String)],
    name: &str,
    doing: &str,
    timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    for (id, addr) in nodes {
        let client = Client::new([addr.clone()], ClientConfig::default()).expect("one address");
        loop {
            let left = match client.status().await {
                Ok(s) => crate::status_metric(&s, name).unwrap_or(0),
                Err(_) => 1,
            };
            if left == 0 {
                break;
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "node {id} still {doing} after {timeout:?} ({name} = {left})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
