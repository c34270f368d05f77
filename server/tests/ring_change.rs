//! Ring changes through real `ringkv` processes on 127.0.0.1: staged join, leave, remove and
//! replace, plan (a dry run) and commit, the transfers that run before ownership switches,
//! their resumption after a restart, and the refusal of stale and concurrent plans.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_client::ErrorKind;
use ringkv_client::{Client, ClientConfig, GetOptions, PutOptions};
use ringkv_jepsen::peer::{Handshake, PeerCredentials, RawPeer};
use ringkv_jepsen::{bin_path, eventually, metric, metric_total, Cluster};
use ringkv_protocol::peer::aae::MAX_STATES;
use ringkv_protocol::peer::cluster::decision;
use ringkv_protocol::peer::{
    AaeRequest, ClusterRequest, ClusterResponse, HandoffRequest, HandoffResponse, PeerRequest,
    PeerResponse, ReplicaRequest, ReplicaResponse,
};
use ringkv_protocol::ring::{key_position, Ring};
use ringkv_server::config::DEFAULT_CLUSTER_SECRET;
use serde_json::{json, Value};

const LOCAL: GetOptions = GetOptions {
    r: None,
    pr: None,
    timeout: None,
    local: true,
};

/// One admin request through node `i`; `Err(message)` for an `Error` reply.
async fn admin(c: &Cluster, i: usize, req: Value) -> Result<Value, String> {
    let reply = c
        .client(i)
        .cluster(serde_json::to_vec(&req).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&reply).unwrap();
    match v.get("Error") {
        Some(e) => Err(e["message"].as_str().unwrap_or("").to_string()),
        None => Ok(v),
    }
}

/// Stages `changes` and commits them through node `i` (the claimant decides).
async fn stage_and_commit(c: &Cluster, i: usize, changes: &[Value]) {
    for change in changes {
        admin(c, i, json!({ "Stage": change })).await.unwrap();
    }
    admin(c, i, json!({"Commit": {"plan": null}}))
        .await
        .unwrap();
}

async fn layout(c: &Cluster, i: usize) -> Value {
    admin(c, i, json!("Status")).await.unwrap()["Status"]["layout"].clone()
}

/// Whether node `i`'s cluster status lists each of `nodes` with liveness `alive` (a retired
/// node is no ring member, but the status lists it too).
async fn listed(c: &Cluster, i: usize, nodes: &[&str], alive: bool) -> bool {
    let st = admin(c, i, json!("Status")).await.unwrap();
    let members = st["Status"]["members"].as_array().unwrap();
    nodes.iter().all(|id| {
        members
            .iter()
            .any(|m| m["node"] == *id && m["alive"] == alive)
    })
}

/// The current ring as node `i` reports it (owners, with the tokens they took over).
async fn ring_of(c: &Cluster, i: usize) -> Ring {
    let ring = c.client(i).ring().await.unwrap();
    Ring::with_token_names(
        ring.members
            .iter()
            .map(|m| (m.node_id.as_str(), m.tokens_of.as_str(), m.tokens)),
    )
}

fn replicas(ring: &Ring, key: &str) -> Vec<String> {
    replicas_of(ring, key, 3)
}

/// The `n` replicas of `key` on `ring`.
fn replicas_of(ring: &Ring, key: &str, n: usize) -> Vec<String> {
    ring.preference_list(key_position(key.as_bytes()), n)
        .iter()
        .map(|n| n.to_string())
        .collect()
}

/// Waits until node `via` reports a layout with no transition whose owners are `owners`, and
/// every node of `running` has that layout version.
async fn wait_owners(
    c: &Cluster,
    via: usize,
    running: &[usize],
    owners: &[&str],
    timeout: Duration,
) {
    let start = Instant::now();
    let mut want: Vec<String> = owners.iter().map(|s| s.to_string()).collect();
    want.sort();
    loop {
        let l = layout(c, via).await;
        let mut have: Vec<String> = l["current"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        have.sort();
        let version = l["version"].as_u64().unwrap();
        let mut same = l["next"].is_null() && have == want;
        for &i in running {
            // A node that has not heard the cluster's layout yet answers an error (a commit
            // made the moment it was seen can come first): not settled yet.
            let theirs = admin(c, i, json!("Status")).await;
            same &=
                theirs.is_ok_and(|st| st["Status"]["layout"]["version"].as_u64() == Some(version));
        }
        if same {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "layout did not settle on {want:?} within {timeout:?}: {l}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the claimant (through node `via`) sees `ids` up, with the current layout (they
/// own nothing yet: new nodes that did not ask to be joined automatically).
async fn wait_known(c: &Cluster, via: usize, ids: &[&str]) {
    let start = Instant::now();
    loop {
        let st = admin(c, via, json!("Status")).await.unwrap();
        let version = st["Status"]["layout"]["version"].as_u64();
        let ok = ids.iter().all(|id| {
            st["Status"]["members"].as_array().unwrap().iter().any(|m| {
                m["node"] == *id
                    && m["alive"] == true
                    && m["layout_version"].as_u64() == version
                    && m["role"] == "joining"
            })
        });
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{ids:?} not seen as joining members: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `count` keys `prefix-i` (value = key) through node 0 (W=2).
async fn write_keys(c: &Cluster, prefix: &str, count: usize) -> Vec<String> {
    let client = c.client(0);
    let keys: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    let mut pending = futures::stream::FuturesUnordered::new();
    for k in &keys {
        let client = client.clone();
        let k = k.clone();
        pending.push(async move {
            client
                .put_with(&k, k.clone().into_bytes(), None, PutOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{k}: {e}"))
        });
        if pending.len() >= 32 {
            futures::StreamExt::next(&mut pending).await;
        }
    }
    while futures::StreamExt::next(&mut pending).await.is_some() {}
    keys
}

/// Which of `keys` node `i` holds (local reads of its own replica).
async fn held(client: &Client, keys: &[String]) -> Vec<bool> {
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let r = client.get_with(k, LOCAL).await.unwrap();
        out.push(r.is_found());
    }
    out
}

/// Waits until every key is held by exactly its N preference-list nodes among `nodes`
/// (index, id) and by no other node (old owners have handed their copies over).
async fn wait_held_exactly(
    c: &Cluster,
    nodes: &[(usize, &str)],
    keys: &[String],
    timeout: Duration,
) {
    wait_held_by_n(c, nodes, keys, 3, timeout).await
}

/// `wait_held_exactly` in a cluster of `n` replicas per key.
async fn wait_held_by_n(
    c: &Cluster,
    nodes: &[(usize, &str)],
    keys: &[String],
    n: usize,
    timeout: Duration,
) {
    let ring = ring_of(c, nodes[0].0).await;
    let start = Instant::now();
    loop {
        let mut wrong = Vec::new();
        for &(i, id) in nodes {
            let h = held(&c.client(i), keys).await;
            for (k, holds) in keys.iter().zip(h) {
                let should = replicas_of(&ring, k, n).iter().any(|r| r == id);
                if holds != should {
                    wrong.push(format!(
                        "{id} {} {k}",
                        if holds { "holds" } else { "lacks" }
                    ));
                }
            }
        }
        if wrong.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{} misplaced copies after {timeout:?}, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every key reads back its value with the default R through every node of `via`.
async fn all_readable(c: &Cluster, via: &[usize], keys: &[String]) {
    for &i in via {
        let client = c.client(i);
        for k in keys {
            let r = client
                .get(k)
                .await
                .unwrap_or_else(|e| panic!("{k} via node {i}: {e}"));
            assert_eq!(
                ringkv_jepsen::sorted_values(&r),
                vec![k.clone()],
                "{k} via node {i}"
            );
        }
    }
}

fn kvctl(c: &Cluster, i: usize, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(bin_path("kvctl"))
        .args(["--addr", &c.nodes[i].addr, "--timeout-ms", "20000"])
        .args(args)
        .output()
        .expect("kvctl runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Owners n1, n2, n3 and n5.
const N1235: [&str; 4] = ["n1", "n2", "n3", "n5"];

/// Stages `change` (`kvctl cluster` arguments) with kvctl through node `via`, commits it with
/// `--wait`, and waits (up to a minute) until node 0 and `running` have the settled layout
/// whose owners are `owners`.
async fn kvctl_change(
    c: &Cluster,
    via: usize,
    change: &[&str],
    running: &[usize],
    owners: &[&str],
) {
    let mut args = vec!["cluster"];
    args.extend(change);
    let (ok, out) = kvctl(c, via, &args);
    assert!(ok, "{out}");
    let (ok, out) = kvctl(c, via, &["cluster", "commit", "--wait"]);
    assert!(ok, "{out}");
    wait_owners(c, 0, running, owners, Duration::from_secs(60)).await;
}

/// Grow 3 -> 6 with kvctl: plan (a dry run that moves nothing), commit; after the transfers
/// every key is readable through every node and held by exactly its N new replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_three_to_six_moves_every_key_to_its_new_replicas() {
    let mut c = Cluster::start(3, &[]).await;
    let keys = write_keys(&c, "grow", 3000).await;
    for id in ["n4", "n5", "n6"] {
        c.add_node(id, 0, &["--auto-join", "false"]);
    }
    wait_known(&c, 0, &["n4", "n5", "n6"]).await;
    // The new nodes are members that own nothing (not in the ring) until a plan is committed.
    let l = layout(&c, 3).await;
    assert_eq!(l["current"].as_object().unwrap().len(), 3, "{l}");
    for id in ["n4", "n5", "n6"] {
        let (ok, out) = kvctl(&c, 1, &["cluster", "join", id]);
        assert!(ok, "join {id}: {out}");
    }
    let (ok, plan) = kvctl(&c, 2, &["cluster", "plan"]);
    assert!(ok, "{plan}");
    assert!(
        plan.contains("ring after:") && plan.contains("n6"),
        "{plan}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metric(&c.client(3), "transfer.keys_received").await,
        0,
        "plan moves nothing"
    );
    let (ok, out) = kvctl(&c, 0, &["cluster", "commit", "--wait"]);
    assert!(ok, "{out}");
    let all: Vec<usize> = (0..6).collect();
    wait_owners(
        &c,
        0,
        &all,
        &["n1", "n2", "n3", "n4", "n5", "n6"],
        Duration::from_secs(60),
    )
    .await;
    let nodes: Vec<(usize, &str)> = vec![
        (0, "n1"),
        (1, "n2"),
        (2, "n3"),
        (3, "n4"),
        (4, "n5"),
        (5, "n6"),
    ];
    wait_held_exactly(&c, &nodes, &keys, Duration::from_secs(90)).await;
    all_readable(&c, &all, &keys).await;
    let received: u64 = {
        let mut t = 0;
        for i in 3..6 {
            t += metric(&c.client(i), "transfer.keys_received").await;
        }
        t
    };
    assert!(
        received > 3000,
        "the new nodes received their ranges: {received}"
    );
    // Bytes received count the states that came in (key and state), not the exchange's
    // digests and requests: no more than every node served to fetchers, and at least a value
    // (its key, as written) per key received.
    let bytes_in = metric_total(&c, &[3, 4, 5], "transfer.bytes_received").await;
    let bytes_out = metric_total(&c, &[3, 4, 5], "transfer.bytes_sent").await;
    let served = metric_total(&c, &all, "aae.state_bytes_served").await;
    assert!(
        bytes_in >= received * "grow-0".len() as u64 && bytes_in <= served,
        "transfer bytes received {bytes_in} for {received} keys; states served {served} bytes"
    );
    assert_eq!(bytes_out, 0, "new nodes have nothing to push back");
    let (ok, status) = kvctl(&c, 4, &["cluster", "status"]);
    assert!(
        ok && status.contains("no transition") || status.contains("layout v"),
        "{status}"
    );
}

/// Shrink 6 -> 3 with leave: the leaving nodes hand everything over, end with no data, leave
/// the ring and refuse requests; every key stays readable and on exactly N of the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrink_six_to_three_with_leave_drains_the_leaving_nodes() {
    // A 10 s settle time: a retired node says it holds nothing that long after its switch.
    let c = Cluster::start(6, &["--tombstone-settle-secs", "10"]).await;
    let all: Vec<usize> = (0..6).collect();
    wait_owners(
        &c,
        0,
        &all,
        &["n1", "n2", "n3", "n4", "n5", "n6"],
        Duration::from_secs(60),
    )
    .await;
    let keys = write_keys(&c, "shrink", 3000).await;
    let leaves: Vec<Value> = ["n4", "n5", "n6"]
        .iter()
        .map(|id| json!({"Leave": {"node": id}}))
        .collect();
    stage_and_commit(&c, 5, &leaves).await;
    wait_owners(
        &c,
        0,
        &[0, 1, 2],
        &["n1", "n2", "n3"],
        Duration::from_secs(60),
    )
    .await;
    let nodes: Vec<(usize, &str)> = vec![
        (0, "n1"),
        (1, "n2"),
        (2, "n3"),
        (3, "n4"),
        (4, "n5"),
        (5, "n6"),
    ];
    // The leaving nodes end empty: held_exactly requires that they hold no key.
    wait_held_exactly(&c, &nodes, &keys, Duration::from_secs(90)).await;
    all_readable(&c, &[0, 1, 2], &keys).await;
    let ring = c.client(0).ring().await.unwrap();
    assert_eq!(ring.members.len(), 3, "{:?}", ring.members);
    // Empty, they said so, and the claimant recorded it (tombstone GC stops waiting for them).
    eventually(
        Duration::from_secs(60),
        "n4, n5, n6 recorded as holding nothing",
        || async { layout(&c, 0).await["released"] == json!(["n4", "n5", "n6"]) },
    )
    .await;
    let refused = c.client(4).get("shrink-1").await;
    assert!(
        matches!(&refused, Err(e) if e.kind() == Some(ErrorKind::NotServing)
            && e.is_definite()
            && e.to_string().contains("taken out of the ring")),
        "a retired node says so: {refused:?}"
    );
    // An application whose first address is a node taken out of the ring is served by the
    // next one, a write too (the retired node did nothing), and then asks that one first.
    let n5 = c.client(4);
    let not_serving = |op: &str| format!("requests{{op={op},result=not_serving}}");
    let (gets_before, puts_before) = (
        metric(&n5, &not_serving("get")).await,
        metric(&n5, &not_serving("put")).await,
    );
    let app = || {
        Client::new(
            [c.nodes[4].addr.clone(), c.nodes[1].addr.clone()],
            ClientConfig::default(),
        )
        .unwrap()
    };
    let writer = app();
    let written = writer.put("after-shrink", "v", None).await;
    assert!(written.is_ok(), "a write through n2: {written:?}");
    let stored = c.client(0).get("after-shrink").await.unwrap();
    assert_eq!(
        stored.values(),
        vec![&Bytes::from_static(b"v")],
        "{stored:?}"
    );
    let reader = app();
    for _ in 0..3 {
        let read = reader.get("shrink-1").await.unwrap();
        assert!(read.is_found(), "shrink-1 read through n2: {read:?}");
    }
    assert_eq!(
        (
            metric(&n5, &not_serving("get")).await - gets_before,
            metric(&n5, &not_serving("put")).await - puts_before
        ),
        (1, 1),
        "n5 refuses each application's first request, and is not asked again"
    );
}

/// Four nodes started with `extra`, once all four own ranges in the settled layout.
async fn four_owners(extra: &[&str]) -> Cluster {
    let c = Cluster::start(4, extra).await;
    wait_four_owners(&c).await;
    c
}

/// Waits (up to a minute) until n1..n4 own ranges in the settled layout, as each sees it.
async fn wait_four_owners(c: &Cluster) {
    let all: Vec<usize> = (0..4).collect();
    wait_owners(
        c,
        0,
        &all,
        &["n1", "n2", "n3", "n4"],
        Duration::from_secs(60),
    )
    .await;
}

/// Kills n4 (kill -9) and waits until the others see it down.
async fn kill_n4(c: &mut Cluster) {
    c.nodes[3].kill9();
    c.wait_members(
        |n| n.child_running(),
        |n| n.child_running(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
}

/// Removes the dead n4, then waits until n1..n3 own the ring and hold exactly their `keys`.
async fn remove_n4(c: &Cluster, keys: &[String]) {
    stage_and_commit(c, 1, &[json!({"Remove": {"node": "n4"}})]).await;
    wait_owners(
        c,
        0,
        &[0, 1, 2],
        &["n1", "n2", "n3"],
        Duration::from_secs(60),
    )
    .await;
    let nodes: Vec<(usize, &str)> = vec![(0, "n1"), (1, "n2"), (2, "n3")];
    wait_held_exactly(c, &nodes, keys, Duration::from_secs(60)).await;
}

/// Waits (up to a minute) until nodes `which` hold no hint; `when` names the moment in the
/// failure message.
async fn wait_no_hints(c: &Cluster, which: &[usize], when: &str) {
    let start = Instant::now();
    loop {
        let pending = metric_total(c, which, "hints.pending_keys").await;
        if pending == 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{pending} hints still pending {when}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node that never joined the ring and went away leaves `kvctl members` 30 s after it was
/// last heard (it makes nothing unavailable, and no command clears it from the saved ring: it
/// used to stay listed as a "joining" member down for good), and is listed again when it
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_joined_and_went_away_leaves_kvctl_members() {
    let mut c = Cluster::start(3, &[]).await;
    c.add_node("n4", 0, &["--auto-join", "false"]);
    wait_known(&c, 0, &["n4"]).await;
    let listed = |c: &Cluster| {
        let (ok, out) = kvctl(c, 0, &["--json", "members"]);
        assert!(ok, "{out}");
        let v: Value = serde_json::from_str(&out).expect("kvctl members --json");
        v["members"]
            .as_array()
            .expect("members")
            .iter()
            .find(|m| m["node_id"] == "n4")
            .map(|m| m["swim_state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(listed(&c).as_deref(), Some("alive"));
    let killed = Instant::now();
    c.nodes[3].kill9();
    eventually(Duration::from_secs(30), "n4 listed down", || async {
        listed(&c).as_deref() == Some("down")
    })
    .await;
    eventually(Duration::from_secs(60), "n4 no longer listed", || async {
        listed(&c).is_none()
    })
    .await;
    // Last heard at most one heartbeat interval (500 ms) before the kill.
    assert!(
        killed.elapsed() >= Duration::from_secs(29),
        "left the list {:?} after it was killed",
        killed.elapsed()
    );
    assert_eq!(metric(&c.client(0), "cluster.members").await, 3);
    c.nodes[3].start().unwrap();
    eventually(Duration::from_secs(30), "n4 listed again", || async {
        listed(&c).as_deref() == Some("alive")
    })
    .await;
}

/// `remove` of a killed node: its ranges are re-replicated from the survivors to N live nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_of_a_killed_node_re_replicates_its_ranges() {
    let mut c = four_owners(&[]).await;
    let keys = write_keys(&c, "remove", 2000).await;
    kill_n4(&mut c).await;
    // A live node cannot be removed (it must leave); the dead one can.
    let e = admin(&c, 1, json!({"Stage": {"Remove": {"node": "n2"}}}))
        .await
        .unwrap_err();
    assert!(e.contains("use leave"), "{e}");
    remove_n4(&c, &keys).await;
    all_readable(&c, &[0, 1, 2], &keys).await;
    // Found in review: the removed node stayed "down" in the metrics for good, and with it the
    // "member down" alert the remove is meant to clear.
    for i in 0..3 {
        let client = c.client(i);
        eventually(
            Duration::from_secs(10),
            "the removed node is no longer counted as a member down",
            || async {
                metric(&client, "cluster.members_by_state{state=down}").await == 0
                    && metric(&client, "cluster.members").await == 3
            },
        )
        .await;
        assert_eq!(
            metric(&client, "cluster.members_by_ring_status{status=removed}").await,
            1
        );
    }
}

/// A transfer cut by a kill -9 of the receiving node resumes from its checkpoint after the
/// restart: measured on the sources (`aae.states_served`), the states sent for the whole
/// transfer exceed the keys the new node holds by at most one fetch batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_transfer_resumes_and_resends_at_most_one_batch() {
    // A slow transfer (1 000 keys/s) so that the kill lands in the middle of it.
    let slow = ["--transfer-keys-per-sec", "1000"];
    let mut c = Cluster::start(3, &slow).await;
    let keys = write_keys(&c, "resume", 12_000).await;
    let mut served_before = 0;
    for i in 0..3 {
        served_before += metric(&c.client(i), "aae.states_served").await;
    }
    c.add_node(
        "n4",
        0,
        &["--auto-join", "false", "--transfer-keys-per-sec", "1000"],
    );
    wait_known(&c, 0, &["n4"]).await;
    stage_and_commit(&c, 0, &[json!({"Join": {"node": "n4", "vnodes": 256}})]).await;
    // Kill it once part of its ranges is checkpointed.
    let checkpoint = c.nodes[3].data_dir.join("transfer.json");
    let start = Instant::now();
    loop {
        let progress: u64 = std::fs::read(&checkpoint)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|v| {
                v["progress"]
                    .as_object()
                    .map_or(0, |o| o.values().filter_map(Value::as_u64).sum())
            })
            .unwrap_or(0);
        if progress > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before_kill = metric(&c.client(3), "transfer.keys_received").await;
    c.nodes[3].kill9();
    c.nodes[3].start().unwrap();
    let all: Vec<usize> = (0..4).collect();
    wait_owners(
        &c,
        0,
        &all,
        &["n1", "n2", "n3", "n4"],
        Duration::from_secs(120),
    )
    .await;
    let after_restart = metric(&c.client(3), "transfer.keys_received").await;
    let mut served = 0;
    for i in 0..3 {
        served += metric(&c.client(i), "aae.states_served").await;
    }
    let served = served - served_before;
    let ring = ring_of(&c, 0).await;
    let owned = keys
        .iter()
        .filter(|k| replicas(&ring, k).iter().any(|r| r == "n4"))
        .count() as u64;
    let holds = held(&c.client(3), &keys)
        .await
        .iter()
        .filter(|h| **h)
        .count() as u64;
    eprintln!(
        "resume: n4 owns {owned} keys, holds {holds}; received {before_kill} before the kill (as last reported) and {after_restart} after; sources sent {served} states"
    );
    assert!(
        after_restart > 0 && after_restart < owned,
        "the restart resumed, not restarted: {after_restart} of {owned}"
    );
    assert_eq!(holds, owned, "n4 holds every key it owns");
    assert!(
        served <= owned + MAX_STATES as u64,
        "sources sent {served} states for {owned} keys: more than one batch ({MAX_STATES}) again"
    );
}

/// `plan` moves nothing; a plan staged against an older layout is refused at commit, and
/// a commit while another plan's transfers run is refused too (one plan at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_move_nothing_and_stale_or_concurrent_commits_are_refused() {
    let mut c = Cluster::start(3, &[]).await;
    let keys = write_keys(&c, "stale", 500).await;
    c.add_node("n4", 0, &["--auto-join", "false"]);
    wait_known(&c, 0, &["n4"]).await;
    let v0 = layout(&c, 0).await["version"].as_u64().unwrap();
    admin(
        &c,
        0,
        json!({"Stage": {"Join": {"node": "n4", "vnodes": 256}}}),
    )
    .await
    .unwrap();
    let plan = admin(&c, 1, json!("Plan")).await.unwrap();
    let n4 = plan["Plan"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["node"] == "n4")
        .cloned()
        .unwrap();
    assert!(n4["share_gained"].as_f64().unwrap() > 0.3, "{n4}");
    assert!(n4["keys_gained"].as_u64().unwrap() > 100, "{n4}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        layout(&c, 0).await["version"].as_u64().unwrap(),
        v0,
        "plan commits nothing"
    );
    assert!(
        held(&c.client(3), &keys).await.iter().all(|h| !h),
        "plan moved no key"
    );
    // Meanwhile a node that asks to be joined automatically is: the layout moves on.
    c.add_node("n5", 0, &[]);
    let start = Instant::now();
    loop {
        let l = layout(&c, 0).await;
        if !l["next"].is_null() {
            // A transition runs: a commit now is refused, one plan at a time.
            let e = admin(&c, 2, json!({"Commit": {"plan": null}}))
                .await
                .unwrap_err();
            assert!(e.contains("already being carried out"), "{e}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "n5 was not joined: {l}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_owners(
        &c,
        0,
        &[0, 1, 2, 4],
        &["n1", "n2", "n3", "n5"],
        Duration::from_secs(60),
    )
    .await;
    let e = admin(&c, 0, json!({"Commit": {"plan": null}}))
        .await
        .unwrap_err();
    assert!(
        e.contains("staged against layout"),
        "a stale plan is refused: {e}"
    );
    // It was dropped: a fresh plan must be staged.
    let e = admin(&c, 0, json!("Plan")).await.unwrap_err();
    assert!(e.contains("nothing is staged"), "{e}");
    all_readable(&c, &[0, 1, 2, 4], &keys).await;
}

/// `replace` of a dead node by a new one: the new node takes over exactly the old one's
/// tokens (no other node's ranges move) and receives its data from the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_hands_a_dead_nodes_ranges_to_a_new_node() {
    let mut c = four_owners(&[]).await;
    let keys = write_keys(&c, "replace", 2000).await;
    let before = ring_of(&c, 0).await;
    // Seen down first: a replace of a running node is refused (it would be forfeited).
    kill_n4(&mut c).await;
    c.add_node("n5", 0, &["--auto-join", "false"]);
    wait_known(&c, 0, &["n5"]).await;
    kvctl_change(&c, 1, &["replace", "n4", "n5"], &[0, 1, 2, 4], &N1235).await;
    let after = ring_of(&c, 0).await;
    let ring = c.client(0).ring().await.unwrap();
    let n5 = ring.members.iter().find(|m| m.node_id == "n5").unwrap();
    assert_eq!(n5.tokens_of, "n4", "n5 took over n4's tokens");
    for k in &keys {
        let (a, b) = (replicas(&before, k), replicas(&after, k));
        let mapped: Vec<String> = a
            .iter()
            .map(|n| {
                if n == "n4" {
                    "n5".to_string()
                } else {
                    n.clone()
                }
            })
            .collect();
        assert_eq!(mapped, b, "{k}: only n4's place changed hands");
    }
    let nodes: Vec<(usize, &str)> = vec![(0, "n1"), (1, "n2"), (2, "n3"), (4, "n5")];
    wait_held_exactly(&c, &nodes, &keys, Duration::from_secs(60)).await;
    all_readable(&c, &[0, 1, 2, 4], &keys).await;
}

/// Under `sync = none` a gainer's received data sits in its unsynced WAL. Found in review:
/// the old owner deleted its copy once the gainer had merged it, so a power loss of the
/// gainer soon after a ring change lost data that had been durable for as long as the old
/// owner held it, which is more than `none` promises (the last writes). A node under `none`
/// now fsyncs its WAL before it answers a push another node deletes data on (and before it
/// checkpoints a transfer), so every key survives the gainer's power loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_of_a_gainer_under_sync_none_loses_nothing_the_old_owner_released() {
    use ringkv_jepsen::powerloss;
    let mut c = Cluster::start(1, &["--n", "1"]).await;
    let keys = write_keys(&c, "moved", 600).await;
    c.add_node_with_env(
        "n2",
        0,
        &["--n", "1", "--sync", "none", "--auto-join", "false"],
        |dir| powerloss::env(dir, None),
    );
    wait_known(&c, 0, &["n2"]).await;
    let (ok, out) = kvctl(&c, 0, &["cluster", "join", "n2"]);
    assert!(ok, "join n2: {out}");
    let (ok, out) = kvctl(&c, 0, &["cluster", "commit", "--wait"]);
    assert!(ok, "{out}");
    wait_owners(&c, 0, &[0, 1], &["n1", "n2"], Duration::from_secs(60)).await;
    // n1 handed n2's keys over and deleted its own copies.
    let nodes: Vec<(usize, &str)> = vec![(0, "n1"), (1, "n2")];
    wait_held_by_n(&c, &nodes, &keys, 1, Duration::from_secs(90)).await;
    let ring = ring_of(&c, 0).await;
    let moved = keys
        .iter()
        .filter(|k| replicas_of(&ring, k, 1) == ["n2"])
        .count();
    assert!(moved > 100, "n2 took a share of the keys: {moved}");
    let n2 = &mut c.nodes[1];
    powerloss::power_loss(n2).unwrap();
    n2.set_env("RINGKV_BOOT_ID", "after-power-loss");
    n2.start().unwrap();
    c.wait_converged(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("after n2's power loss: {e}"));
    let lost: Vec<&String> = {
        let h = held(&c.client(1), &keys).await;
        keys.iter()
            .zip(h)
            .filter(|(k, holds)| replicas_of(&ring, k, 1) == ["n2"] && !holds)
            .map(|(k, _)| k)
            .collect()
    };
    assert!(
        lost.is_empty(),
        "{} of the {moved} keys n1 released to n2 were lost in n2's power loss, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    all_readable(&c, &[0, 1], &keys).await;
}

/// The first node of a new cluster started on an empty data dir, so it votes only once it
/// knows the cluster (it cannot tell a new cluster from a wipe). A commit made the moment a
/// second node is seen alive was refused "retry in a moment" until the layout worker's next
/// look at the view, up to 250 ms later (found as a flake of the power-loss test above): the
/// commit now looks at the view itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_made_as_soon_as_the_second_node_is_seen_is_taken() {
    let mut c = Cluster::start(1, &["--n", "1"]).await;
    c.add_node("n2", 0, &["--n", "1", "--auto-join", "false"]);
    let start = Instant::now();
    while !listed(&c, 0, &["n2"], true).await {
        assert!(start.elapsed() < Duration::from_secs(30), "n2 not seen");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    admin(
        &c,
        0,
        json!({"Stage": {"Join": {"node": "n2", "vnodes": 256}}}),
    )
    .await
    .unwrap();
    let committed = admin(&c, 0, json!({"Commit": {"plan": null}})).await;
    assert!(committed.is_ok(), "commit refused: {committed:?}");
    wait_owners(&c, 0, &[0, 1], &["n1", "n2"], Duration::from_secs(60)).await;
}

/// Four owners with tombstone GC (4 s settle, passes every 2 s) and 300 keys `prefix-i`,
/// once no node holds a hint: held for a node that never answers again, a hint keeps its
/// key's tombstone until the hint window ends, and these tests need every tombstone purged.
/// Tombstone GC with a 4 s settle time and anti-entropy every 2 s: purges within seconds.
const FAST_GC: [&str; 4] = ["--tombstone-settle-secs", "4", "--aae-interval-secs", "2"];

async fn gc_owners_with_keys(prefix: &str) -> (Cluster, Vec<String>) {
    let c = four_owners(&FAST_GC).await;
    let keys = write_keys(&c, prefix, 300).await;
    wait_no_hints(&c, &[0, 1, 2, 3], "before n4 goes").await;
    (c, keys)
}

/// Waits (polling every 50 ms, up to a minute) until the layout as node 0 has it lists n4
/// retired: the switch of its leave is done.
async fn wait_retired(c: &Cluster) {
    let start = Instant::now();
    while !layout_names(c, "retired", "n4").await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "n4 not retired: {}",
            layout(c, 0).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the layout (as node 0 has it) lists `node` in `field` ("retired", "released").
async fn layout_names(c: &Cluster, field: &str, node: &str) -> bool {
    layout(c, 0).await[field]
        .as_array()
        .is_some_and(|r| r.contains(&json!(node)))
}

/// Waits (up to 90 s) until n1..n3 hold no tombstone; the GC counters of each in the panic.
async fn wait_purged(c: &Cluster) {
    let start = Instant::now();
    loop {
        let live = metric_total(c, &[0, 1, 2], "tombstones.live").await;
        if live == 0 {
            return;
        }
        if start.elapsed() > Duration::from_secs(90) {
            let mut why = Vec::new();
            for i in 0..3 {
                let n = c.client(i);
                let mut m = Vec::new();
                for name in [
                    "tombstones.live",
                    "tombstones.gc_passes",
                    "tombstones.gc_passes_blocked",
                    "tombstones.checked",
                    "tombstones.purge_checks_failed",
                    "tombstones.check_errors",
                    "tombstones.candidates",
                ] {
                    m.push(format!("{name}={}", metric(&n, name).await));
                }
                why.push(format!("n{}: {}", i + 1, m.join(" ")));
            }
            panic!("{live} tombstones still live: {}", why.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Not one of `keys` is found.
async fn none_found(client: &Client, keys: &[String]) {
    for k in keys {
        assert!(!client.get(k).await.unwrap().is_found(), "{k} came back");
    }
}

/// n4, forfeited and back on its old data (started again or resumed): no deleted key comes
/// back, and it says it withholds its data and hands none over.
async fn n4_withholds_and_nothing_comes_back(c: &Cluster, client: &Client, keys: &[String]) {
    stays_deleted(client, keys).await;
    none_found(client, keys).await;
    let n4 = c.client(3);
    eventually(
        Duration::from_secs(30),
        "n4 says it withholds its data",
        || async { metric(&n4, "release.withheld").await == 1 },
    )
    .await;
    assert_eq!(
        metric(&n4, "release.keys_handed").await,
        0,
        "its copies are never handed over"
    );
}

async fn delete_all(client: &Client, keys: &[String]) {
    for k in keys {
        client
            .delete(k, None)
            .await
            .unwrap_or_else(|e| panic!("{k}: {e}"));
    }
}

/// Reads every tenth of the deleted `keys` for 20 s (while a node taken out comes back): none
/// is found.
async fn stays_deleted(client: &Client, keys: &[String]) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        for k in keys.iter().step_by(10) {
            let r = client.get(k).await.unwrap_or_else(|e| panic!("{k}: {e}"));
            assert!(!r.is_found(), "{k} deleted, then back: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A node removed while it was down and then started again with its old data must not hand
/// that data back: the values deleted since, whose tombstones were purged, would return.
/// (Found in review: its release worker pushed every key it held to the owners, which merged
/// them into keys that no longer existed.) It keeps the data, says so, and asks for a wipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_started_again_does_not_bring_back_purged_deletes() {
    removed_node_back_after_purges(false).await;
}

/// The same with n4's process paused instead of killed (a partition, a stopped VM): it never
/// restarts, and this process had seen itself own ranges, yet once it is back it learns it
/// was removed and keeps its old copies (found in review: only a restart was caught).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_that_was_only_paused_does_not_bring_back_purged_deletes() {
    removed_node_back_after_purges(true).await;
}

/// n4 taken out of reach (killed, or `paused`), removed; every key it held deleted and
/// purged on n1..n3; then n4 back (started again on its data dir, or resumed): no deleted key
/// comes back and n4 says it withholds its data.
async fn removed_node_back_after_purges(paused: bool) {
    let (mut c, keys) = gc_owners_with_keys("purged").await;
    if paused {
        c.nodes[3].send_signal(libc::SIGSTOP);
        c.wait_members(|n| n.id != "n4", |n| n.id != "n4", Duration::from_secs(30))
            .await
            .unwrap();
    } else {
        kill_n4(&mut c).await;
    }
    remove_n4(&c, &keys).await;
    let client = c.client(0);
    delete_all(&client, &keys).await;
    wait_purged(&c).await;
    // n4 comes back with its data dir: it learns it was removed, and keeps its old copies.
    if paused {
        c.nodes[3].send_signal(libc::SIGCONT);
    } else {
        c.nodes[3].start().unwrap();
    }
    n4_withholds_and_nothing_comes_back(&c, &client, &keys).await;
    // It cannot join again with what it kept.
    let join = json!({"Stage": {"Join": {"node": "n4", "vnodes": 256}}});
    let refused = match admin(&c, 0, join).await {
        Ok(_) => admin(&c, 0, json!({"Commit": {"plan": null}})).await,
        staging_refused => staging_refused,
    };
    assert!(
        matches!(&refused, Err(e) if e.contains("has not said it holds nothing")),
        "{refused:?}"
    );
}

/// A node that left and went out of reach after the switch, before its hand-over pass, must
/// not bring back values deleted meanwhile (found in review: tombstone GC waited only for
/// owners, and the node, resumed, pushed its pre-delete copies into keys whose tombstones were
/// purged). GC now waits for it; back, it hands its copies over (the tombstones win), says it
/// holds nothing, the claimant records it in the layout, and the purges go ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_left_and_was_paused_before_handing_over_does_not_bring_back_deletes() {
    left_node_paused_after_switch(false).await;
}

/// The same node gone for good instead (killed while paused): the operator removes it, which
/// forfeits what it holds; the purges resume, and started again on its old data it withholds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_that_left_and_went_away_lets_the_purges_resume() {
    left_node_paused_after_switch(true).await;
}

/// Found in review: gainers skipped a leaving node that was down and reported themselves
/// synced from the other sources, so the switch retired it while it was down. A leaving node
/// may hold what no other node has (a write acknowledged with W=1, hints for the others), and
/// restarted after the switch it withholds its data, as any node that comes back retired:
/// those writes were lost. The switch now waits for it, and goes on once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_waits_for_its_node_while_it_is_down() {
    let c = four_owners(&[]).await;
    let keys = write_keys(&c, "leaving", 300).await;
    stage_and_commit(&c, 0, &[json!({"Leave": {"node": "n4"}})]).await;
    // Paused at once: the gainers begin pulling only once every node has the layout and a
    // settle time passed.
    c.nodes[3].send_signal(libc::SIGSTOP);
    eventually(Duration::from_secs(30), "n4 seen down", || {
        listed(&c, 0, &["n4"], false)
    })
    .await;
    // The other sources have long been pulled from; the change waits for n4.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let l = layout(&c, 0).await;
        assert!(
            !l["next"].is_null() && !layout_names(&c, "retired", "n4").await,
            "switched without the leaving n4, which was down: {l}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.nodes[3].send_signal(libc::SIGCONT);
    wait_owners(
        &c,
        0,
        &[0, 1, 2],
        &["n1", "n2", "n3"],
        Duration::from_secs(60),
    )
    .await;
    all_readable(&c, &[0, 1, 2], &keys).await;
}

/// n4 leaves and is paused as soon as the switch retires it; its keys are deleted, and GC
/// waits for it. Then it is resumed, or (`gone`) killed and removed.
async fn left_node_paused_after_switch(gone: bool) {
    let (mut c, keys) = gc_owners_with_keys("left").await;
    stage_and_commit(&c, 0, &[json!({"Leave": {"node": "n4"}})]).await;
    // Paused as soon as the switch retires it: its hand-over pass starts only once every live
    // member has had the layout for 5 s.
    wait_retired(&c).await;
    let n4 = c.client(3);
    let handed_before = metric(&n4, "release.keys_handed").await;
    c.nodes[3].send_signal(libc::SIGSTOP);
    // (A retired node is no ring member: the claimant's status lists it, with its liveness.)
    eventually(Duration::from_secs(30), "n4 seen down", || {
        listed(&c, 0, &["n4"], false)
    })
    .await;
    let client = c.client(0);
    delete_all(&client, &keys).await;
    // Tombstone GC waits for n4, and says why.
    let blocked = metric_total(&c, &[0, 1, 2], "tombstones.gc_passes_blocked").await;
    eventually(
        Duration::from_secs(60),
        "tombstone GC passes blocked by the retired n4",
        || async {
            metric_total(&c, &[0, 1, 2], "tombstones.gc_passes_blocked").await >= blocked + 6
        },
    )
    .await;
    assert!(metric_total(&c, &[0, 1, 2], "tombstones.live").await > 0);
    let (ok, text) = kvctl(&c, 0, &["cluster", "status"]);
    assert!(
        ok && text.contains("n4 (handing over: tombstone GC waits for it)"),
        "{text}"
    );
    if gone {
        c.nodes[3].kill9();
        let (ok, text) = kvctl(&c, 1, &["cluster", "remove", "n4"]);
        assert!(ok, "{text}");
        admin(&c, 1, json!({"Commit": {"plan": null}}))
            .await
            .unwrap();
        wait_purged(&c).await;
        let (ok, text) = kvctl(&c, 0, &["cluster", "status"]);
        assert!(
            ok && text.contains("n4 (removed: its data is refused)"),
            "{text}"
        );
        // Started again on its old data: it keeps it, and nothing deleted comes back.
        c.nodes[3].start().unwrap();
        n4_withholds_and_nothing_comes_back(&c, &client, &keys).await;
        return;
    }
    c.nodes[3].send_signal(libc::SIGCONT);
    stays_deleted(&client, &keys).await;
    // n4 handed its copies over (so it held them when it was paused), ended empty, and was
    // recorded; then every tombstone is purged.
    eventually(
        Duration::from_secs(60),
        "n4 recorded as holding nothing",
        || layout_names(&c, "released", "n4"),
    )
    .await;
    let handed = metric(&n4, "release.keys_handed").await - handed_before;
    assert!(handed > 0, "n4 held no copy when it was paused");
    wait_purged(&c).await;
    none_found(&client, &keys).await;
    let (ok, text) = kvctl(&c, 0, &["cluster", "status"]);
    assert!(ok && text.contains("n4 (holds nothing)"), "{text}");
}

/// Hints held for a node removed while it was down go to their keys' owners once the switch
/// is done, instead of waiting out the hint window (3 h) for a node that never returns: held,
/// they kept their keys' tombstones from being purged, and a sloppy write's only copy could be
/// among them when they expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_for_a_removed_node_go_to_the_keys_owners() {
    let mut c = four_owners(&[]).await;
    kill_n4(&mut c).await;
    // Written while n4 is down: its slots are hinted (a fallback's hint, or the coordinator's).
    let keys = write_keys(&c, "hinted", 500).await;
    // Counted once the writes' late replies are in: a hint a fallback stores after the
    // write's answer, or one the coordinator keeps when its fallback was slow, comes later.
    let mut held = metric_total(&c, &[0, 1, 2], "hints.pending_keys").await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = metric_total(&c, &[0, 1, 2], "hints.pending_keys").await;
        if now == held {
            break;
        }
        held = now;
    }
    assert!(held > 0, "no hint held for the down n4");
    remove_n4(&c, &keys).await;
    wait_no_hints(&c, &[0, 1, 2], "a minute after n4 was removed").await;
    let redirected = metric_total(&c, &[0, 1, 2], "hints.redirected").await;
    assert!(
        redirected > 0 && redirected <= held,
        "{redirected} of {held} hints redirected"
    );
    all_readable(&c, &[0, 1, 2], &keys).await;
}

const SECRET: &str = "ring-change-secret";

/// An authenticated raw peer connection to node `i`, presenting itself as `id`.
async fn peer_as(c: &Cluster, i: usize, id: &str) -> RawPeer {
    peer_at(&c.nodes[i].peer_addr, id).await
}

/// An authenticated raw peer connection to the peer port `addr`, presenting itself as `id`.
async fn peer_at(addr: &str, id: &str) -> RawPeer {
    peer_with(addr, id, SECRET).await
}
/// A peer connection to `addr` as `id`, proving `secret`.
async fn peer_with(addr: &str, id: &str, secret: &str) -> RawPeer {
    let creds = PeerCredentials {
        cluster: "ringkv".into(),
        n: 3,
        node_id: id.into(),
        secret: secret.into(),
    };
    match RawPeer::connect(addr)
        .await
        .unwrap()
        .handshake(&creds, false)
        .await
        .unwrap()
    {
        Handshake::Accepted(peer) => peer,
        _ => panic!("the cluster's secret must be accepted"),
    }
}

/// `resp` is an `Unavailable` refusal whose message contains `why`.
fn refused_because(resp: &PeerResponse, why: &str) {
    match resp {
        PeerResponse::Error(e) => assert!(
            matches!(e.kind, ErrorKind::Unavailable { .. }) && e.message.contains(why),
            "{e:?}"
        ),
        other => panic!("expected a refusal ({why}), got {other:?}"),
    }
}

/// Offers `key`'s `state` to `peer`'s node as a hint for another node and for itself
/// (`targets`), and as a hint replay into it: each refused, naming `why`.
async fn hints_and_replay_refused(
    peer: &mut RawPeer,
    targets: [&str; 2],
    key: &Bytes,
    state: &Bytes,
    why: &str,
) {
    for target in targets {
        let hint = PeerRequest::Handoff(HandoffRequest::StoreHint {
            target: target.into(),
            key: key.clone(),
            state: state.clone(),
            timeout_ms: 2000,
        });
        refused_because(&peer.call(&hint).await.unwrap(), why);
    }
    let replay = PeerRequest::Handoff(HandoffRequest::Replay {
        entries: vec![(key.clone(), state.clone())],
    });
    refused_because(&peer.call(&replay).await.unwrap(), why);
}

/// A node that left takes no data once it is retired, not even from a coordinator or hint
/// holder with an older view (found in review: its hint service still stored hints, which
/// kept it from ever holding nothing, or merged them as its own data when they were for it);
/// it says it holds nothing only the settle time after its retirement, when nothing sent to
/// it before can still land (found in review: it said so as soon as it was empty); and once
/// the claimant records it, the others refuse data requests from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_node_takes_no_data_and_is_released_only_after_the_settle_time() {
    let settle = Duration::from_secs(60);
    let secs = settle.as_secs().to_string();
    let c = four_owners(&["--tombstone-settle-secs", &secs, "--cluster-secret", SECRET]).await;
    let keys = write_keys(&c, "quiet", 300).await;
    let n4 = c.client(3);
    let n4_held = held(&n4, &keys).await.iter().filter(|h| **h).count() as u64;
    assert!(n4_held > 0, "n4 holds none of the keys");
    // A key's state as n1 has it, to offer n4 as a hint or a replay.
    let mut n1 = peer_as(&c, 0, "stranger").await;
    let on_n1 = held(&c.client(0), &keys).await;
    let k = keys
        .iter()
        .zip(on_n1)
        .find_map(|(k, h)| h.then_some(k))
        .expect("n1 holds one of the keys");
    let key = Bytes::from(k.clone());
    let read = PeerRequest::Replica(ReplicaRequest::ReadLocal {
        key: key.clone(),
        timeout_ms: 2000,
    });
    let state = match n1.call(&read).await.unwrap() {
        PeerResponse::Replica(ReplicaResponse::State(s)) => s,
        other => panic!("n1's replica read of {k}: {other:?}"),
    };

    stage_and_commit(&c, 0, &[json!({"Leave": {"node": "n4"}})]).await;
    wait_retired(&c).await;
    eventually(Duration::from_secs(30), "n4 knows it is retired", || async {
        matches!(n4.get("quiet-0").await, Err(e) if e.to_string().contains("taken out of the ring"))
    })
    .await;
    let retired_at = Instant::now();
    // Hints for another node or for itself, and a replay into it: refused, nothing kept.
    let mut to_n4 = peer_as(&c, 3, "stranger").await;
    hints_and_replay_refused(
        &mut to_n4,
        ["n1", "n4"],
        &key,
        &state,
        "taken out of the ring",
    )
    .await;
    let credits = PeerRequest::Handoff(HandoffRequest::ReplayCredits {
        want_keys: 1,
        want_bytes: 1 << 20,
    });
    refused_because(
        &to_n4.call(&credits).await.unwrap(),
        "taken out of the ring",
    );
    assert_eq!(metric(&n4, "hints.pending_keys").await, 0, "n4 kept a hint");
    // Reading what it holds is still served (it holds no hint).
    let read_hint = PeerRequest::Handoff(HandoffRequest::ReadHint {
        target: "n1".into(),
        key: key.clone(),
        timeout_ms: 2000,
    });
    assert!(matches!(
        to_n4.call(&read_hint).await.unwrap(),
        PeerResponse::Handoff(HandoffResponse::HintState(_))
    ));

    // It hands over every key it held, and is then empty, but says so only once the settle
    // time has passed since its retirement.
    // (At least: a replica write still in flight when they were counted may have added one.)
    eventually(
        Duration::from_secs(30),
        "n4 handed its keys over",
        || async { metric(&n4, "release.keys_handed").await >= n4_held },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        retired_at.elapsed() < settle - Duration::from_secs(5),
        "the hand-over took too long for this test to tell: {:?}",
        retired_at.elapsed()
    );
    assert!(
        !layout_names(&c, "released", "n4").await,
        "n4 recorded as holding nothing {:?} after its retirement, before the {settle:?} settle time",
        retired_at.elapsed()
    );
    eventually(
        Duration::from_secs(90),
        "n4 recorded as holding nothing",
        || layout_names(&c, "released", "n4"),
    )
    .await;
    assert!(retired_at.elapsed() >= settle - Duration::from_secs(1));

    // Recorded: the others take nothing from it any more, though they serve others.
    let mut as_n4 = peer_as(&c, 0, "n4").await;
    refused_because(
        &as_n4.call(&read).await.unwrap(),
        "left the ring and said it held nothing",
    );
    let replicate = PeerRequest::Replica(ReplicaRequest::Replicate {
        key: key.clone(),
        state: state.clone(),
        timeout_ms: 2000,
    });
    refused_because(
        &as_n4.call(&replicate).await.unwrap(),
        "left the ring and said it held nothing",
    );
    assert!(matches!(
        n1.call(&read).await.unwrap(),
        PeerResponse::Replica(ReplicaResponse::State(_))
    ));
}

/// A node that left and was stopped before it handed everything over, then wiped and started
/// again (what an operator does before it joins again), says it holds nothing at once: this
/// process never took data, so nothing sent to it can still land. Found by the full Jepsen
/// profile: it waited the settle time again from its start (10 minutes by default), and every
/// join of the node in that while was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_left_then_was_wiped_joins_again_without_waiting_the_settle_time() {
    let settle = Duration::from_secs(60);
    let secs = settle.as_secs().to_string();
    let mut c = four_owners(&["--tombstone-settle-secs", &secs]).await;
    let keys = write_keys(&c, "wiped", 300).await;
    stage_and_commit(&c, 0, &[json!({"Leave": {"node": "n4"}})]).await;
    wait_retired(&c).await;
    // n4 has the layout that retired it too (saved as adopted), as when an operator stops a
    // node after `kvctl cluster status` shows it retired. Found in CI: killed 70 ms after the
    // switch, before it had it, n4 restarted on its saved older layout, in which it still
    // owned ranges, and for the quarter second it took to learn the new one it served (an
    // anti-entropy exchange merged 8 keys); a process that served waits the settle time, by
    // design (docs/operations.md).
    let switched = layout(&c, 0).await["version"]
        .as_u64()
        .expect("a layout version");
    let n4 = c.client(3);
    eventually(
        Duration::from_secs(30),
        "n4 has the layout that retired it",
        || async { metric(&n4, "cluster.layout_version").await >= switched },
    )
    .await;
    // Stopped before its hand-over pass (5 s after the switch) and before the settle time: it
    // never said it holds nothing.
    c.nodes[3].kill9();
    ringkv_jepsen::nemesis::wipe_db(&c.nodes[3]).unwrap();
    c.nodes[3].start().unwrap();
    let restarted = Instant::now();
    let join = json!({"Stage": {"Join": {"node": "n4", "vnodes": 256}}});
    loop {
        match admin(&c, 0, join.clone()).await {
            Ok(_) => break,
            Err(e) if e.contains("not running") || e.contains("has not said it holds nothing") => {
                assert!(
                    restarted.elapsed() < settle / 2,
                    "n4, wiped, still refused {:?} after its start: {e}\nn4's log:\n{}\nn1's log:\n{}",
                    restarted.elapsed(),
                    c.nodes[3].log_tail(80),
                    c.nodes[0].log_tail(40),
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("join n4: {e}"),
        }
    }
    admin(&c, 0, json!({"Commit": {"plan": null}}))
        .await
        .unwrap();
    wait_four_owners(&c).await;
    all_readable(&c, &[0, 3], &keys).await;
}

/// A node that does not know the ring yet (just started and not in contact with the cluster:
/// here its only seed never answers) takes no data: no replica write, no hint, no replay. So
/// every view under which a node takes data is one the gossip driver counts in
/// `ClusterView::served`, and a retired node's process that never served has nothing of its
/// own still landing (found in review: a restarted node took replica writes before it knew
/// the ring, under a stale saved layout, and once the switch retired it could say at once that
/// it held nothing while they were still queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_know_the_ring_takes_no_data() {
    use ringkv_server::version::{Dot, KeyState, VersionVector};
    let node = ringkv_jepsen::NodeProcess::start_temp(
        "n9",
        &["--seeds", "127.0.0.1:9", "--cluster-secret", SECRET],
    );
    let mut peer = peer_at(&node.peer_addr, "stranger").await;
    let key = Bytes::from_static(b"not-ready");
    let state = Bytes::from(
        KeyState::new()
            .update(
                &VersionVector::new(),
                Dot {
                    actor: 9,
                    counter: 1,
                },
                1,
                Some(Bytes::from_static(b"v")),
            )
            .encode(),
    );
    let why = "does not know the ring yet";
    let replicate = PeerRequest::Replica(ReplicaRequest::Replicate {
        key: key.clone(),
        state: state.clone(),
        timeout_ms: 2000,
    });
    refused_because(&peer.call(&replicate).await.unwrap(), why);
    hints_and_replay_refused(&mut peer, ["n1", "n9"], &key, &state, why).await;
    // An anti-entropy push (an exchange, a transfer, a hand-over) is refused as a whole, so
    // its sender retries instead of taking per-key refusals for "not a replica".
    let push = PeerRequest::Aae(AaeRequest::PushStates {
        entries: vec![(key.clone(), state.clone())],
    });
    refused_because(&peer.call(&push).await.unwrap(), why);
    // Nothing was kept, and reads are still answered (an empty state).
    let client = Client::new([node.addr.clone()], Default::default()).unwrap();
    assert_eq!(metric(&client, "hints.pending_keys").await, 0);
    let read = PeerRequest::Replica(ReplicaRequest::ReadLocal {
        key: key.clone(),
        timeout_ms: 2000,
    });
    match peer.call(&read).await.unwrap() {
        PeerResponse::Replica(ReplicaResponse::State(s)) => {
            assert!(
                KeyState::decode(&s).unwrap().is_empty(),
                "the write was kept"
            )
        }
        other => panic!("replica read: {other:?}"),
    }
}

/// Starts n1..n3 with tombstone GC, writes `count` keys, starts n4 (owning nothing, pulling
/// at 200 keys/s so that its transfers take seconds), commits its join and waits until it
/// has received part of its ranges.
async fn join_n4_in_progress(prefix: &str, count: usize) -> (Cluster, Vec<String>) {
    let mut c = Cluster::start(3, &FAST_GC).await;
    let keys = write_keys(&c, prefix, count).await;
    let mut slow = vec!["--auto-join", "false", "--transfer-keys-per-sec", "200"];
    slow.extend(FAST_GC);
    c.add_node("n4", 0, &slow);
    wait_known(&c, 0, &["n4"]).await;
    stage_and_commit(&c, 0, &[json!({"Join": {"node": "n4", "vnodes": 256}})]).await;
    let n4 = c.client(3);
    eventually(
        Duration::from_secs(30),
        "n4 receives part of its ranges",
        || async { metric(&n4, "transfer.keys_received").await > 0 },
    )
    .await;
    (c, keys)
}

/// A join whose new node died during its transfers holds the switch back, and with it every
/// other change and tombstone GC. `kvctl cluster abort` gives the ring back as it was before
/// the commit: every write, those during the change included, is on the current replicas;
/// the dead node is retired and forfeited, so GC goes on without it, what was hinted for it
/// goes to the keys' owners, and started again on its old data it hands nothing over; the
/// next change commits and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_join_whose_new_node_died_keeps_the_ring_and_every_write() {
    let (mut c, keys) = join_n4_in_progress("abort", 2000).await;
    // n4 owns nothing yet (it is not in the ring the nodes report): the claimant's status
    // says when it is seen down.
    c.nodes[3].kill9();
    eventually(Duration::from_secs(30), "the claimant sees n4 down", || {
        listed(&c, 0, &["n4"], false)
    })
    .await;
    let during = write_keys(&c, "during", 300).await;
    let (ok, out) = kvctl(&c, 1, &["cluster", "leave", "n3"]);
    assert!(!ok && out.contains("already being carried out"), "{out}");
    let (ok, out) = kvctl(&c, 1, &["cluster", "abort"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("aborted") && out.contains("n4: retired, was down"),
        "{out}"
    );
    wait_owners(
        &c,
        0,
        &[0, 1, 2],
        &["n1", "n2", "n3"],
        Duration::from_secs(30),
    )
    .await;
    assert!(layout_names(&c, "retired", "n4").await);
    assert!(layout_names(&c, "forfeited", "n4").await);
    assert_eq!(metric_total(&c, &[0, 1, 2], "cluster.aborts").await, 1);
    let (ok, out) = kvctl(&c, 2, &["cluster", "abort"]);
    assert!(!ok && out.contains("no ring change is running"), "{out}");
    // Every write is on all three current replicas; the hints for n4 went to their owners.
    let mut all = keys.clone();
    all.extend(during);
    let owners: Vec<(usize, &str)> = vec![(0, "n1"), (1, "n2"), (2, "n3")];
    wait_held_exactly(&c, &owners, &all, Duration::from_secs(30)).await;
    wait_no_hints(&c, &[0, 1, 2], "after the abort").await;
    // Tombstone GC no longer waits: deletes are purged with n4 still down.
    let (deleted, kept) = all.split_at(300);
    let client = c.client(0);
    delete_all(&client, deleted).await;
    wait_purged(&c).await;
    // n4 back on the data it received: it withholds it, nothing deleted comes back.
    c.nodes[3].start().unwrap();
    n4_withholds_and_nothing_comes_back(&c, &client, deleted).await;
    // The next change commits and completes.
    let mut flags = vec!["--auto-join", "false"];
    flags.extend(FAST_GC);
    c.add_node("n5", 0, &flags);
    wait_known(&c, 0, &["n5"]).await;
    kvctl_change(&c, 0, &["join", "n5"], &[0, 1, 2, 4], &N1235).await;
    let owners: Vec<(usize, &str)> = vec![(0, "n1"), (1, "n2"), (2, "n3"), (4, "n5")];
    wait_held_exactly(&c, &owners, kept, Duration::from_secs(60)).await;
    all_readable(&c, &[0, 4], kept).await;
}

/// An abort while the new node runs: it is retired (not forfeited), refuses requests, hands
/// over what it received and ends empty; the claimant records it, and it can join again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_join_of_a_running_node_hands_over_and_it_can_join_again() {
    let (c, keys) = join_n4_in_progress("aborted-live", 1500).await;
    // An operator watching the change is told it was aborted (an error: it never completed).
    let watching = std::process::Command::new(bin_path("kvctl"))
        .args(["--addr", &c.nodes[0].addr, "cluster", "status", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kvctl runs");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, out) = kvctl(&c, 2, &["cluster", "abort"]);
    assert!(ok, "{out}");
    assert!(out.contains("n4: retired, hands over"), "{out}");
    let watched = tokio::task::spawn_blocking(|| watching.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let said = String::from_utf8_lossy(&watched.stderr);
    assert!(
        !watched.status.success() && said.contains("the ring change was aborted"),
        "{:?}: {said} / {}",
        watched.status,
        String::from_utf8_lossy(&watched.stdout)
    );
    wait_owners(
        &c,
        0,
        &[0, 1, 2, 3],
        &["n1", "n2", "n3"],
        Duration::from_secs(30),
    )
    .await;
    assert!(layout_names(&c, "retired", "n4").await);
    assert!(!layout_names(&c, "forfeited", "n4").await);
    let n4 = c.client(3);
    eventually(Duration::from_secs(30), "n4 refuses requests", || async {
        matches!(n4.get(&keys[0]).await, Err(e) if e.to_string().contains("taken out of the ring"))
    })
    .await;
    // It ends empty (after the settle time, 4 s here) and the claimant records it.
    eventually(
        Duration::from_secs(60),
        "n4 said it holds nothing and was recorded",
        || async { layout_names(&c, "released", "n4").await },
    )
    .await;
    let owners: Vec<(usize, &str)> = vec![(0, "n1"), (1, "n2"), (2, "n3")];
    wait_held_exactly(&c, &owners, &keys, Duration::from_secs(30)).await;
    stage_and_commit(&c, 0, &[json!({"Join": {"node": "n4", "vnodes": 256}})]).await;
    wait_four_owners(&c).await;
    let owners: Vec<(usize, &str)> = vec![(0, "n1"), (1, "n2"), (2, "n3"), (3, "n4")];
    wait_held_exactly(&c, &owners, &keys, Duration::from_secs(90)).await;
    all_readable(&c, &[3], &keys).await;
}

/// Waits until the claimant (through node `via`) sees every node of `ids` down.
async fn wait_seen_down(c: &Cluster, via: usize, ids: &[&str]) {
    eventually(
        Duration::from_secs(30),
        "the claimant sees the killed nodes down",
        || listed(c, via, ids, false),
    )
    .await;
}

/// Waits (up to a minute) until n4 has received every range of the running join and the
/// claimant's status says why it does not switch (`undecidable` contains each of `why`), then
/// checks that the change still runs 3 s later.
async fn n4_synced_and_not_switched(c: &Cluster, why: &[&str]) {
    let start = Instant::now();
    let version = loop {
        let st = admin(c, 0, json!("Status")).await.unwrap();
        let version = &st["Status"]["layout"]["version"];
        let synced = st["Status"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["node"] == "n4" && m["synced"] == *version);
        let said = st["Status"]["undecidable"].as_str().unwrap_or_default();
        if synced && why.iter().all(|w| said.contains(w)) {
            break version.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "n4 not synced with the switch held back ({why:?}): {st}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let l = layout(c, 0).await;
    assert!(
        !l["next"].is_null() && l["version"] == version,
        "switched anyway: {l}"
    );
}

/// Found in review: a claimant decided a ring change whatever it could reach, so the two
/// sides of a partition could decide one change two ways (one switching it and taking writes
/// on the new node, the other aborting it and forfeiting that node). Now a switch or an abort
/// needs a majority of the owners that stay through the change: with two of three down, the
/// new node completes its transfers but nothing switches, the abort is refused, and once one
/// of them is back the change completes with every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_change_is_switched_or_aborted_only_with_a_majority_of_the_owners_that_stay() {
    let (mut c, keys) = join_n4_in_progress("minority", 1500).await;
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    wait_seen_down(&c, 0, &["n2", "n3"]).await;
    // n4 receives the rest from n1 alone; the claimant says why it does not switch.
    n4_synced_and_not_switched(&c, &["1 of the 3", "down: n2, n3"]).await;
    let (ok, out) = kvctl(&c, 0, &["cluster", "status"]);
    assert!(
        ok && out.contains("can neither switch nor be aborted without --force"),
        "{out}"
    );
    let (ok, out) = kvctl(&c, 0, &["cluster", "abort"]);
    assert!(
        !ok && out.contains("down: n2, n3") && out.contains("--force"),
        "{out}"
    );
    // One of them back: two of three, the change completes.
    c.nodes[1].start().unwrap();
    wait_owners(
        &c,
        0,
        &[0, 1, 3],
        &["n1", "n2", "n3", "n4"],
        Duration::from_secs(60),
    )
    .await;
    c.nodes[2].start().unwrap();
    all_readable(&c, &[3], &keys).await;
}

/// An operator whose old owners are gone for good can still abort: `--force` does without
/// the majority, and the ring is back as before the change, with every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_abort_needs_no_majority() {
    let (mut c, keys) = join_n4_in_progress("forced", 1500).await;
    for i in 1..4 {
        c.nodes[i].kill9();
    }
    wait_seen_down(&c, 0, &["n2", "n3", "n4"]).await;
    let (ok, out) = kvctl(&c, 0, &["cluster", "abort"]);
    assert!(!ok && out.contains("--force"), "{out}");
    let (ok, out) = kvctl(&c, 0, &["cluster", "abort", "--force"]);
    assert!(ok && out.contains("n4: retired, was down"), "{out}");
    wait_owners(&c, 0, &[0], &["n1", "n2", "n3"], Duration::from_secs(30)).await;
    c.nodes[1].start().unwrap();
    c.nodes[2].start().unwrap();
    all_readable(&c, &[0], &keys).await;
}

/// Grants decide a ring change, not the claimant's view of who is up: voters that granted an
/// abort to another claimant (one across a partition, say, that stopped before adopting it)
/// refuse the switch, also after a restart, so the change never switches even though every
/// node is up and the new node has received its ranges; the claimant finds the abort granted
/// by a majority and carries it out, with every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_voters_granted_an_abort_elsewhere_is_aborted_not_switched() {
    let (mut c, keys) = join_n4_in_progress("granted", 1500).await;
    // The running change, named as the nodes name it: its version and the digest of its JSON.
    let stranger = |i: usize| peer_with(&c.nodes[i].peer_addr, "stranger", DEFAULT_CLUSTER_SECRET);
    let mut peer = stranger(1).await;
    let json = match peer
        .call(&PeerRequest::Cluster(ClusterRequest::GetLayout))
        .await
        .unwrap()
    {
        PeerResponse::Cluster(ClusterResponse::Layout(json)) => json,
        other => panic!("{other:?}"),
    };
    let l: Value = serde_json::from_slice(&json).unwrap();
    assert!(!l["next"].is_null(), "the join still runs: {l}");
    let vote = |d: u8| {
        PeerRequest::Cluster(ClusterRequest::Vote {
            version: l["version"].as_u64().unwrap(),
            digest: xxhash_rust::xxh3::xxh3_64(&json),
            decision: d,
        })
    };
    // Another claimant gathers the abort from n2 and n3, a majority of n1..n3.
    for i in [1, 2] {
        let mut p = stranger(i).await;
        assert_eq!(
            p.call(&vote(decision::ABORT)).await.unwrap(),
            PeerResponse::Cluster(ClusterResponse::Vote {
                granted: true,
                held: 0
            })
        );
    }
    // n2's grant outlives its process (asked once its peer port takes requests again).
    c.nodes[1].kill9();
    c.nodes[1].start().unwrap();
    let start = Instant::now();
    let answer = loop {
        let creds = PeerCredentials {
            cluster: "ringkv".into(),
            n: 3,
            node_id: "stranger".into(),
            secret: DEFAULT_CLUSTER_SECRET.into(),
        };
        if let Ok(raw) = RawPeer::connect(&c.nodes[1].peer_addr).await {
            if let Ok(Handshake::Accepted(mut p)) = raw.handshake(&creds, false).await {
                if let Ok(answer) = p.call(&vote(decision::SWITCH)).await {
                    break answer;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "n2 did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        answer,
        PeerResponse::Cluster(ClusterResponse::Vote {
            granted: false,
            held: decision::ABORT
        })
    );
    // n4 completes its transfers; the claimant asks for the switch, n2 and n3 refuse it
    // (they hold the abort, a majority): the abort is the decision, and the claimant carries
    // it out. The ring is as before the change, every write kept; n4 (up) hands over.
    wait_owners(
        &c,
        0,
        &[0, 1, 2, 3],
        &["n1", "n2", "n3"],
        Duration::from_secs(60),
    )
    .await;
    let now = layout(&c, 0).await;
    assert!(
        now["version"].as_u64() == l["version"].as_u64().map(|v| v + 2),
        "aborted, not switched: {now}"
    );
    assert!(layout_names(&c, "retired", "n4").await);
    assert!(!layout_names(&c, "forfeited", "n4").await);
    assert!(metric_total(&c, &[1, 2], "cluster.grants_refused").await >= 2);
    assert_eq!(metric_total(&c, &[0], "cluster.aborts").await, 1);
    let (ok, out) = kvctl(&c, 0, &["cluster", "abort"]);
    assert!(!ok && out.contains("no ring change is running"), "{out}");
    // Asked again about the decided change, a voter says what it granted on it, though its
    // layout is newer (so a forced abort elsewhere sees a granted switch); one that granted
    // nothing says the change is superseded.
    let stranger = |i: usize| peer_with(&c.nodes[i].peer_addr, "stranger", DEFAULT_CLUSTER_SECRET);
    let answer = |held| {
        PeerResponse::Cluster(ClusterResponse::Vote {
            granted: false,
            held,
        })
    };
    let asked_to_abort = |i: usize| async move {
        stranger(i)
            .await
            .call(&vote(decision::ABORT))
            .await
            .unwrap()
    };
    assert_eq!(
        asked_to_abort(0).await,
        answer(decision::SWITCH),
        "n1 granted itself the switch it then could not gather"
    );
    // (n4's own layout, not the claimant's that status shows, must have the abort first.)
    let aborted = l["version"].as_u64().unwrap() + 2;
    eventually(
        Duration::from_secs(30),
        "n4 has the abort's layout",
        || async {
            match stranger(3)
                .await
                .call(&PeerRequest::Cluster(ClusterRequest::GetLayout))
                .await
            {
                Ok(PeerResponse::Cluster(ClusterResponse::Layout(json))) => {
                    serde_json::from_slice::<Value>(&json).unwrap()["version"].as_u64()
                        == Some(aborted)
                }
                _ => false,
            }
        },
    )
    .await;
    assert_eq!(asked_to_abort(3).await, answer(decision::SUPERSEDED));
    all_readable(&c, &[0], &keys).await;
}
