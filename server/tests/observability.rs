//! Observability and overload, through real processes: the admin HTTP endpoints, the
//! Prometheus exposition (checked by promtool) and its series moving with their events,
//! admission control shedding a flood at once while status, health and a light client keep
//! answering (kvctl too, exiting 3 when refused), `/ready` refusing while the ring is unknown,
//! quorum outcomes counted, a request whose deadline passed while it waited never being
//! applied, and a broken connection giving its slot back while its requests still run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ringkv_client::{Client, ClientConfig, GetOptions, PutOptions};
use ringkv_jepsen::nemesis::Flood;
use ringkv_jepsen::{eventually, http_get, prom_sample, promtool_check, Cluster, NodeProcess};

const ADMIN: [&str; 2] = ["--admin-listen", "127.0.0.1:0"];

fn scrape(node: &NodeProcess) -> String {
    let (status, body) = http_get(&node.admin_addr, "/metrics").expect("scrape /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn sample(node: &NodeProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    prom_sample(&scrape(node), name, labels)
        .unwrap_or_else(|| panic!("node {}: no series {name} {labels:?}", node.id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_hint_and_request_series_move_with_their_events() {
    let mut cluster = Cluster::start(3, &ADMIN).await;
    let n1 = &cluster.nodes[0];
    let text = scrape(n1);
    promtool_check(&text).unwrap_or_else(|e| panic!("{e}"));
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    assert!(
        series < 1000,
        "{series} series: the budget is fewer than 1 000 per node"
    );
    // A sample of what the dashboard and the alerts read (docs/grafana-dashboard.json is
    // checked in full by the dashboard test).
    for (name, labels) in [
        (
            "ringkv_requests_total",
            vec![("op", "put"), ("result", "ok")],
        ),
        (
            "ringkv_request_duration_seconds_bucket",
            vec![("op", "get")],
        ),
        ("ringkv_admission_in_flight", vec![("budget", "client")]),
        (
            "ringkv_admission_shed_total",
            vec![("budget", "peer"), ("reason", "bytes")],
        ),
        ("ringkv_gossip_phi", vec![("peer", "n2")]),
        ("ringkv_cluster_members_by_state", vec![("state", "alive")]),
        (
            "ringkv_workers_state",
            vec![("worker", "hint_replay"), ("state", "idle")],
        ),
        (
            "ringkv_rocksdb_pending_compaction_bytes",
            vec![("cf", "data")],
        ),
        ("ringkv_rocksdb_live_sst_bytes", vec![("cf", "hints")]),
        (
            "ringkv_rocksdb_write_stalls_total",
            vec![("cf", "data"), ("kind", "stop")],
        ),
        ("ringkv_hints_replay_pace_ratio", vec![]),
        ("ringkv_process_stalls_total", vec![]),
        ("ringkv_storage_actor_info", vec![]),
        ("ringkv_storage_writer_queue", vec![]),
    ] {
        assert!(
            prom_sample(&text, name, &labels).is_some(),
            "no series {name} {labels:?} in:\n{text}"
        );
    }
    assert_eq!(
        prom_sample(
            &text,
            "ringkv_cluster_members_by_state",
            &[("state", "alive")]
        ),
        Some(3.0)
    );
    // Joins of a new cluster are committed by gossip: n1 may have heard of the last one a
    // moment after every member was alive (this assertion failed once, run at once).
    eventually(
        Duration::from_secs(10),
        "n1 counts three normal members",
        || async {
            prom_sample(
                &scrape(n1),
                "ringkv_cluster_members_by_ring_status",
                &[("status", "normal")],
            ) == Some(3.0)
        },
    )
    .await;
    // One actor per node, its id a label (as a value Prometheus would round 64 bits).
    assert_eq!(
        prom_sample(&text, "ringkv_storage_actor_info", &[]),
        Some(1.0)
    );
    dashboard_and_alerts_name_exported_metrics(&text);
    naming_follows_prometheus_conventions(&text);
    let (status, body) = http_get(&n1.admin_addr, "/ready").unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(&n1.admin_addr, "/health").unwrap();
    assert_eq!(status, 200);
    assert_eq!(http_get(&n1.admin_addr, "/nope").unwrap().0, 404);

    // A put and a get move their series on the node that answered them.
    let put_ok = |n: &NodeProcess| {
        sample(
            n,
            "ringkv_requests_total",
            &[("op", "put"), ("result", "ok")],
        )
    };
    let before = put_ok(n1);
    let reads = sample(n1, "ringkv_read_siblings_count", &[]);
    let c1 = cluster.client(0);
    c1.put("k", "v", None).await.unwrap();
    c1.get("k").await.unwrap();
    assert_eq!(put_ok(n1), before + 1.0);
    assert_eq!(sample(n1, "ringkv_read_siblings_count", &[]), reads + 1.0);

    // n3 down: n1 coordinates writes for it and keeps hints (no fallback among 3 nodes).
    cluster.nodes[2].kill9();
    let n1 = &cluster.nodes[0];
    eventually(Duration::from_secs(30), "n1 sees n3 down", || async {
        prom_sample(
            &scrape(n1),
            "ringkv_cluster_members_by_state",
            &[("state", "down")],
        )
        .unwrap_or(0.0)
            + prom_sample(
                &scrape(n1),
                "ringkv_cluster_members_by_state",
                &[("state", "suspect")],
            )
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    // Quorum outcomes move their series. W=3 with n3 down: refused before anything is
    // written (unavailable) once n1 counts n3 down.
    let result = |r: &str| sample(n1, "ringkv_requests_total", &[("op", "put"), ("result", r)]);
    let unavailable = result("unavailable");
    let w3 = PutOptions {
        w: Some(3),
        timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    };
    eventually(Duration::from_secs(30), "a W=3 write refused unavailable", || async {
        matches!(
            c1.put_with("q3", Bytes::from_static(b"v"), None, w3).await,
            Err(e) if e.kind() == Some(ringkv_protocol::ErrorKind::Unavailable { alive: 2, needed: 3 })
        )
    })
    .await;
    assert!(result("unavailable") > unavailable);
    // W=2 with n2 stopped (not yet suspected) and n3 down: no quorum by the deadline.
    let timeouts = result("timeout");
    cluster.nodes[1].send_signal(libc::SIGSTOP);
    let w2 = PutOptions {
        w: Some(2),
        timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let late = c1.put_with("q2", Bytes::from_static(b"v"), None, w2).await;
    cluster.nodes[1].send_signal(libc::SIGCONT);
    assert!(
        matches!(&late, Err(e) if matches!(e.kind(), Some(ringkv_protocol::ErrorKind::Timeout { .. }))),
        "{late:?}"
    );
    // At least this one (a W=3 attempt above may be counted late by a stalled node).
    assert!(result("timeout") > timeouts);
    let stored = sample(n1, "ringkv_hints_stored_total", &[]);
    for i in 0..5 {
        c1.put(format!("h{i}"), "v", None).await.unwrap();
    }
    eventually(Duration::from_secs(10), "n1 holds hints for n3", || async {
        let text = scrape(n1);
        prom_sample(&text, "ringkv_hints_stored_total", &[]).unwrap_or(0.0) >= stored + 5.0
            && prom_sample(
                &text,
                "ringkv_hints_pending_bytes_by_target",
                &[("target", "n3")],
            )
            .unwrap_or(0.0)
                > 0.0
    })
    .await;
    // n3 back: the hints are replayed and the pending bytes fall to nothing.
    let replayed = sample(n1, "ringkv_hints_replayed_total", &[]);
    cluster.nodes[2].start().unwrap();
    let n1 = &cluster.nodes[0];
    eventually(
        Duration::from_secs(60),
        "n1 replays its hints to n3",
        || async {
            let text = scrape(n1);
            prom_sample(&text, "ringkv_hints_replayed_total", &[]).unwrap_or(0.0) >= replayed + 5.0
                && prom_sample(
                    &text,
                    "ringkv_hints_pending_bytes_by_target",
                    &[("target", "n3")],
                )
                .unwrap_or(0.0)
                    == 0.0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_repair_moves_its_series() {
    // No hints and no anti-entropy: only a read can repair the replica that missed a write.
    let mut args = ADMIN.to_vec();
    args.extend(["--hinted-handoff", "false", "--anti-entropy", "false"]);
    let mut cluster = Cluster::start(3, &args).await;
    cluster.nodes[2].kill9();
    let c1 = cluster.client(0);
    let w2 = PutOptions {
        w: Some(2),
        ..Default::default()
    };
    eventually(
        Duration::from_secs(30),
        "a W=2 write with n3 down",
        || async {
            c1.put_with("rr", Bytes::from_static(b"v"), None, w2)
                .await
                .is_ok()
        },
    )
    .await;
    cluster.nodes[2].start().unwrap();
    cluster
        .wait_converged(Duration::from_secs(30))
        .await
        .unwrap();
    let n1 = &cluster.nodes[0];
    let repairs = sample(n1, "ringkv_read_repair_sent_total", &[]);
    let r3 = GetOptions {
        r: Some(3),
        ..Default::default()
    };
    // n1 counts n3 available again once its phi falls: until then R=3 is refused.
    let read = Arc::new(Mutex::new(None));
    eventually(Duration::from_secs(30), "a read with R=3", || async {
        match c1.get_with("rr", r3).await {
            Ok(r) => {
                *read.lock().unwrap() = Some(r);
                true
            }
            Err(_) => false,
        }
    })
    .await;
    let read = read.lock().unwrap().take().expect("read above");
    assert_eq!(read.value().map(|v| v.as_ref()), Some(&b"v"[..]));
    eventually(
        Duration::from_secs(10),
        "n1 sends a read repair to n3",
        || async {
            prom_sample(&scrape(n1), "ringkv_read_repair_sent_total", &[]).unwrap_or(0.0) > repairs
        },
    )
    .await;
    // The repair itself, not only its count: n3's own copy now holds the write (hints and
    // anti-entropy are off: only the repair can have brought it).
    let c3 = cluster.client(2);
    let local = GetOptions {
        local: true,
        ..Default::default()
    };
    eventually(
        Duration::from_secs(10),
        "n3's own copy holds the repaired write",
        || async {
            c3.get_with("rr", local)
                .await
                .is_ok_and(|r| r.value().map(|v| v.as_ref()) == Some(&b"v"[..]))
        },
    )
    .await;
}

/// The series names a node exports (from its `# TYPE` lines; a histogram as its `_bucket`,
/// `_sum` and `_count` series only: its bare name selects nothing in Prometheus).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                } else {
                    names.insert(name.to_string());
                }
            }
        }
    }
    names
}

/// Per series name, the (label, value) pairs its samples carry.
fn exported_labels(text: &str) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut out: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        // An unlabelled sample (`name value`) counts too: a selector naming a label on it
        // selects nothing (found in review: such series went unchecked).
        let Some((name, rest)) = line.split_once('{') else {
            let name = line.split_whitespace().next().unwrap_or_default();
            out.entry(name.to_string()).or_default();
            continue;
        };
        let labels = rest.rsplit_once('}').map_or("", |(l, _)| l);
        out.entry(name.to_string())
            .or_default()
            .extend(label_pairs(labels).into_iter().map(|(k, _, v)| (k, v)));
    }
    out
}

/// One label matcher of a selector: (label, operator, value).
type Matcher = (String, String, String);

/// The matchers of a selector's braces (`a="x",b=~"y"`).
fn label_pairs(inside: &str) -> Vec<Matcher> {
    let mut out = Vec::new();
    let mut rest = inside;
    while let Some(eq) = rest.find(['=', '!']) {
        let label = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let op_len = rest[eq..]
            .chars()
            .take_while(|c| matches!(c, '=' | '!' | '~'))
            .count();
        let op = rest[eq..eq + op_len].to_string();
        let after = &rest[eq + op_len..];
        let Some(open) = after.find('"') else { break };
        let mut value = String::new();
        let mut chars = after[open + 1..].char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = open + 1 + i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((label, op, value));
        rest = &after[end..];
    }
    out
}

/// Every `ringkv_*` series in `expr`, with the matchers of its braces if it has any.
fn metric_names(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("ringkv_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let matchers = match rest.strip_prefix('{') {
            Some(inner) => {
                let close = inner.find('}').unwrap_or(inner.len());
                label_pairs(&inner[..close])
            }
            None => Vec::new(),
        };
        out.push((name, matchers));
    }
    out
}

/// What `promtool check metrics` does not check: counts are counters (`_total`) and nothing
/// else ends in `_total`; units are base units (seconds, bytes, ratios 0..1), never
/// milliseconds, percent, parts per million or KiB.
fn naming_follows_prometheus_conventions(text: &str) {
    const NOT_BASE_UNITS: [&str; 10] = [
        "_ms", "_us", "_micros", "_millis", "_percent", "_ppm", "_kib", "_mib", "_minutes",
        "_hours",
    ];
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        if kind != "counter" {
            assert!(
                !name.ends_with("_total"),
                "{name} is a {kind} named like a counter"
            );
        }
        for unit in NOT_BASE_UNITS {
            assert!(
                !name.ends_with(unit) && !name.contains(&format!("{unit}_")),
                "{name}: not a base unit ({unit}); use seconds, bytes or a ratio"
            );
        }
    }
}

/// The Grafana dashboard's and the alert rules' queries name only metrics a node exports.
fn dashboard_and_alerts_name_exported_metrics(text: &str) {
    let names = exported(text);
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(docs.join("grafana-dashboard.json")).expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    let panels = dashboard["panels"].as_array().map_or(0, Vec::len);
    assert!(panels >= 10, "the dashboard has {panels} panels");
    let alerts = std::fs::read_to_string(docs.join("alerts.yml")).expect("the alert rules");
    exprs.extend(
        alerts
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(str::to_string),
    );
    let labels = exported_labels(text);
    let mut checked = 0;
    for e in &exprs {
        for (name, matchers) in metric_names(e) {
            assert!(
                names.contains(&name),
                "{name} (in {e:?}) is not exported by the node"
            );
            checked += 1;
            // Labels: `instance` is Prometheus's own; a family without samples in this scrape
            // (no hint target yet) has no labels to compare with.
            let Some(have) = labels.get(&name) else {
                continue;
            };
            for (label, op, value) in matchers.iter().filter(|(l, _, _)| l != "instance") {
                assert!(
                    have.iter().any(|(l, _)| l == label),
                    "{name} has no label {label:?} (in {e:?}); it has {have:?}"
                );
                if op == "=" {
                    assert!(
                        have.contains(&(label.clone(), value.clone())),
                        "{name} never has {label}={value:?} (in {e:?}); it has {have:?}"
                    );
                }
            }
        }
    }
    assert!(checked > 30, "only {checked} metric references found");
    // The alert rules, and every dashboard query as a recording rule: promtool parses the
    // PromQL of both.
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let panel_exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(panel_exprs.len() >= panels, "every panel has a query");
    for (i, e) in panel_exprs.iter().enumerate() {
        let e = e.replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::Value::String(e)
        ));
    }
    let dash_rules = dir.path().join("dashboard-rules.yml");
    std::fs::write(&dash_rules, rules).expect("write the dashboard's rules");
    for file in [docs.join("alerts.yml"), dash_rules] {
        let out = std::process::Command::new("promtool")
            .args(["check", "rules"])
            .arg(&file)
            .output()
            .expect("promtool runs (make deps installs it)");
        assert!(
            out.status.success(),
            "promtool check rules {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Waits until every thread of the node is stopped (SIGSTOP takes effect asynchronously; a
/// request sent before it did could be read before the stop).
fn wait_stopped(node: &NodeProcess) {
    let pid = node.pid().expect("the node runs");
    let start = std::time::Instant::now();
    loop {
        let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.filter_map(Result::ok).all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                        stat.rsplit_once(')')
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                            == Some("T")
                    })
                })
            })
            .unwrap_or(false);
        if all_stopped {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "node did not stop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The memory a node flooded beyond its budget may use (docs/operations.md, "Admission
/// control"): the block cache and memtables it has anyway, plus bounded in-flight work.
const FLOOD_RSS_BOUND: u64 = 512 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_budget_is_shed_at_once_while_status_health_and_a_light_client_answer() {
    // A byte budget of 2 MiB (the least: the largest request must fit): the flood's 64 KiB
    // puts fill it (32 in flight: 2 MiB), a 1 MiB value does not fit while more than 16 of
    // them are in flight.
    let node = NodeProcess::start_temp(
        "n1",
        &[
            "--n",
            "1",
            "--max-requests",
            "32",
            "--max-request-mb",
            "2",
            ADMIN[0],
            ADMIN[1],
        ],
    );
    let big = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(big.path(), vec![b'b'; 1000 * 1024]).unwrap();
    let no_retry = ClientConfig {
        overload_retries: 0,
        ..ClientConfig::default()
    };
    let light = Client::new([node.addr.clone()], no_retry.clone()).unwrap();
    light.put("light", "x", None).await.unwrap();
    // Four deep connections, 64 puts in flight each: 256 against a budget of 32.
    let ok_keys = Arc::new(Mutex::new(Vec::new()));
    let shed_keys = Arc::new(Mutex::new(Vec::new()));
    // How long each refused put took to come back, ms.
    let shed_ms = Arc::new(Mutex::new(Vec::new()));
    let other_errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for c in 0..4 {
        let client = Client::new([node.addr.clone()], no_retry.clone()).unwrap();
        for w in 0..64 {
            let (client, ok_keys, shed_keys, shed_ms, other_errors, stop) = (
                client.clone(),
                ok_keys.clone(),
                shed_keys.clone(),
                shed_ms.clone(),
                other_errors.clone(),
                stop.clone(),
            );
            flood.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("flood/{c}/{w}/{i}");
                    i += 1;
                    let sent = std::time::Instant::now();
                    match client.put(&key, vec![7u8; 64 << 10], None).await {
                        Ok(_) => ok_keys.lock().unwrap().push(key),
                        Err(e) if e.is_overloaded() => {
                            assert!(e.is_definite(), "a shed request did nothing: {e}");
                            assert!(e.retry_after().is_some_and(|d| d > Duration::ZERO), "{e}");
                            shed_keys.lock().unwrap().push(key);
                            shed_ms
                                .lock()
                                .unwrap()
                                .push(sent.elapsed().as_millis() as u64);
                        }
                        Err(_) => {
                            other_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
    }
    // While the flood runs: the light client, status and health all answer.
    let mut light_ok = 0;
    let mut peak_rss = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let read = light.get("light").await;
        assert!(read.is_ok(), "the light client was refused: {read:?}");
        light_ok += 1;
        let status = light.status().await.expect("status answers under overload");
        assert_eq!(status.node_id, "n1");
        let (code, _) = http_get(&node.admin_addr, "/health").unwrap();
        assert_eq!(code, 200);
        peak_rss = peak_rss.max(node.rss_bytes().expect("the node's RSS is readable"));
    }
    // The operator's tool answers too, and says "overloaded" (exit 3, nothing done) when the
    // node refuses a write: a 1 MiB value over the byte budget while the flood is in flight.
    let kvctl = |args: &[&str]| {
        std::process::Command::new(ringkv_jepsen::bin_path("kvctl"))
            .arg("--addr")
            .arg(&node.addr)
            .args(args)
            .output()
            .expect("run kvctl")
    };
    let status = kvctl(&["status"]);
    assert!(
        status.status.success(),
        "kvctl status under overload: {status:?}"
    );
    let path = big.path().to_str().unwrap();
    let refused = (0..50)
        .map(|_| kvctl(&["put", "big", "--blind", "--file", path]))
        .find(|o| o.status.code() == Some(3))
        .expect("a 1 MiB put over the byte budget is refused overloaded (exit 3)");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("overloaded") && stderr.contains("nothing was done"),
        "{stderr}"
    );
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        t.await.unwrap();
    }
    assert_eq!(light_ok, 40);
    let ok_keys = ok_keys.lock().unwrap().clone();
    let shed_keys = shed_keys.lock().unwrap().clone();
    assert!(!ok_keys.is_empty(), "the node served nothing");
    assert!(!shed_keys.is_empty(), "nothing was shed");
    // Refused at once, not queued until a deadline (5 s): the median refusal came back in
    // well under a second, even on a loaded test machine.
    let mut shed_ms = shed_ms.lock().unwrap().clone();
    shed_ms.sort_unstable();
    let median = shed_ms[shed_ms.len() / 2];
    assert!(median < 1000, "median refusal took {median} ms");
    assert_eq!(other_errors.load(Ordering::Relaxed), 0);
    assert!(
        peak_rss < FLOOD_RSS_BOUND,
        "resident memory {peak_rss} under the flood, bound {FLOOD_RSS_BOUND}"
    );
    // Shed counted, by reason, and as the puts' result.
    let text = scrape(&node);
    let shed: f64 = ["requests", "bytes", "fair_share"]
        .iter()
        .map(|r| {
            prom_sample(
                &text,
                "ringkv_admission_shed_total",
                &[("budget", "client"), ("reason", r)],
            )
            .unwrap()
        })
        .sum();
    // The flood's refusals and kvctl's one.
    assert_eq!(shed as usize, shed_keys.len() + 1);
    assert_eq!(
        prom_sample(
            &text,
            "ringkv_requests_total",
            &[("op", "put"), ("result", "overloaded")]
        ),
        Some(shed_keys.len() as f64 + 1.0)
    );
    // Nothing shed was applied; everything acknowledged is there.
    let sample_of = |keys: &[String]| -> BTreeSet<String> {
        keys.iter()
            .step_by((keys.len() / 50).max(1))
            .cloned()
            .collect()
    };
    let reader = Client::new([node.addr.clone()], ClientConfig::default()).unwrap();
    for k in sample_of(&shed_keys) {
        assert!(
            !reader.get(&k).await.unwrap().is_found(),
            "shed put {k} was applied"
        );
    }
    for k in sample_of(&ok_keys) {
        assert!(
            reader.get(&k).await.unwrap().is_found(),
            "acknowledged put {k} is missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_flooded_by_clients_still_takes_the_replica_writes_other_coordinators_need() {
    let mut args = ADMIN.to_vec();
    args.extend(["--max-requests", "16"]);
    let cluster = Cluster::start(3, &args).await;
    // The Jepsen overload nemesis's flood: 4 connections × 64 blind writes in flight.
    let flood = Flood::start(vec![cluster.nodes[0].addr.clone()]);
    // n2 coordinates writes that need every replica, n1 included (W=3).
    let c2 = cluster.client(1);
    let w3 = PutOptions {
        w: Some(3),
        ..Default::default()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..20 {
        c2.put_with(format!("w3/{i}"), Bytes::from_static(b"v"), None, w3)
            .await
            .unwrap_or_else(|e| panic!("a W=3 write through n2 failed while n1 was flooded: {e}"));
    }
    let (_, flood_shed) = flood.stop();
    assert!(flood_shed > 0, "the flood was never refused");
    let n1 = &cluster.nodes[0];
    let shed_client: f64 = ["requests", "bytes", "fair_share"]
        .iter()
        .map(|r| {
            sample(
                n1,
                "ringkv_admission_shed_total",
                &[("budget", "client"), ("reason", r)],
            )
        })
        .sum();
    assert!(shed_client > 0.0, "n1 shed none of the flood");
    let shed_peer: f64 = ["requests", "bytes", "fair_share"]
        .iter()
        .map(|r| {
            sample(
                n1,
                "ringkv_admission_shed_total",
                &[("budget", "peer"), ("reason", r)],
            )
        })
        .sum();
    assert_eq!(shed_peer, 0.0, "n1 refused replica traffic");
}

/// The peer budget refuses too: replicas that get more replica writes at once than their
/// peer budget (16, the least allowed) refuse the rest `Overloaded` at once, counted, and the
/// coordinator still acknowledges only what W replicas hold: every acknowledged write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_over_their_peer_budget_refuse_at_once_and_lose_no_acknowledged_write() {
    let mut args = ADMIN.to_vec();
    args.extend(["--peer-max-requests", "16"]);
    let cluster = Cluster::start(3, &args).await;
    let c1 = cluster.client(0);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..96 {
        let (c1, acked) = (c1.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..10 {
                let key = format!("peer-budget/{w}/{i}");
                if c1.put(&key, "v", None).await.is_ok() {
                    acked.lock().unwrap().push(key);
                }
            }
        }));
    }
    for t in writers {
        t.await.unwrap();
    }
    // Refused by count, or by the share of the peer connections busy together.
    let shed: f64 = cluster.nodes[1..]
        .iter()
        .map(|n| sample(n, "ringkv_admission_shed_total", &[("budget", "peer")]))
        .sum();
    assert!(
        shed > 0.0,
        "96 writers at once never filled a peer budget of 16"
    );
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty(), "nothing was acknowledged");
    let r2 = GetOptions {
        r: Some(2),
        ..Default::default()
    };
    for key in &acked {
        let read = c1.get_with(key, r2).await.unwrap();
        assert!(read.is_found(), "acknowledged {key} does not read back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_deadline_passed_while_the_node_was_stopped_is_never_applied() {
    let node = NodeProcess::start_temp("n1", &["--n", "1", ADMIN[0], ADMIN[1]]);
    let short = ClientConfig {
        request_timeout: Duration::from_millis(300),
        overload_retries: 0,
        ..ClientConfig::default()
    };
    let client = Client::new([node.addr.clone()], short).unwrap();
    client.put("before", "v", None).await.unwrap();
    node.send_signal(libc::SIGSTOP);
    wait_stopped(&node);
    // Sent while the node is stopped: the bytes wait in its socket past the deadline.
    let late = client.put("late", "v", None).await;
    assert!(
        matches!(late, Err(ringkv_client::Error::Timeout { .. })),
        "{late:?}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    node.send_signal(libc::SIGCONT);
    let reader = Client::new([node.addr.clone()], ClientConfig::default()).unwrap();
    eventually(
        Duration::from_secs(10),
        "the node answers again",
        || async { reader.get("before").await.is_ok() },
    )
    .await;
    // The late frame is handled (and dropped) by its own connection's task once the node runs
    // again: awaited through the counts, then the write must not be visible.
    let expired = |text: &str| {
        (
            prom_sample(
                text,
                "ringkv_requests_total",
                &[("op", "put"), ("result", "expired")],
            ),
            prom_sample(
                text,
                "ringkv_admission_expired_total",
                &[("budget", "client")],
            ),
        )
    };
    eventually(
        Duration::from_secs(10),
        "the late write is counted expired",
        || async { expired(&scrape(&node)) == (Some(1.0), Some(1.0)) },
    )
    .await;
    let read = reader.get("late").await.unwrap();
    assert!(
        !read.is_found(),
        "a write whose client gave up before the node ran it was applied: {read:?}"
    );
    let text = scrape(&node);
    assert_eq!(expired(&text), (Some(1.0), Some(1.0)), "{text}");
    assert!(prom_sample(&text, "ringkv_process_stalls_total", &[]).unwrap_or(0.0) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_retries_reads_refused_overloaded_and_never_writes() {
    // A budget of 4 under a flood: light clients compete for the last slots and are shed.
    let node = NodeProcess::start_temp("n1", &["--n", "1", "--max-requests", "4"]);
    let setup = Client::new([node.addr.clone()], ClientConfig::default()).unwrap();
    setup.put("r", "v", None).await.unwrap();
    let flood = Flood::start(vec![node.addr.clone()]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Readers and writers with the default configuration (3 retries for reads).
    let mut tasks = Vec::new();
    for t in 0..24 {
        let client = Client::new([node.addr.clone()], ClientConfig::default()).unwrap();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut shed) = (0u64, 0u64);
            for i in 0..10 {
                let r = if t % 2 == 0 {
                    client.get("r").await.map(|_| ())
                } else {
                    client
                        .put(format!("w/{t}/{i}"), "v", None)
                        .await
                        .map(|_| ())
                };
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        assert!(e.is_overloaded(), "only Overloaded is expected: {e}");
                        shed += 1;
                    }
                }
            }
            (t % 2 == 0, ok, shed, client.overload_retries())
        }));
    }
    let (mut read_retries, mut write_retries, mut writes_shed, mut reads_ok) = (0, 0, 0, 0);
    for t in tasks {
        let (reader, ok, shed, retries) = t.await.unwrap();
        if reader {
            read_retries += retries;
            reads_ok += ok;
        } else {
            write_retries += retries;
            writes_shed += shed;
        }
    }
    flood.stop();
    assert!(read_retries > 0, "no read was retried");
    assert!(reads_ok > 0, "no read succeeded");
    assert!(
        writes_shed > 0,
        "no write met Overloaded (the test needs some)"
    );
    assert_eq!(write_retries, 0, "a write was retried");
}

/// `/ready` says no while the node does not know the ring (its seed never answers), and why,
/// while `/health` says the process is up: a load balancer keeps it out, an orchestrator does
/// not restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_know_the_ring_is_healthy_but_not_ready() {
    // A seed address nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let seed = dead.local_addr().unwrap().to_string();
    drop(dead);
    let node = NodeProcess::start_temp(
        "lonely",
        &["--n", "3", "--seeds", &seed, ADMIN[0], ADMIN[1]],
    );
    let (code, body) = http_get(&node.admin_addr, "/health").unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(&node.admin_addr, "/ready").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("lonely") && body.contains("the ring is not known yet"),
        "{body}"
    );
    // The members families count from the membership snapshot refreshed with the view (every
    // `swim::VIEW_REFRESH`): all zero until the first refresh, which a loaded machine may run
    // after the first scrape.
    eventually(
        Duration::from_secs(10),
        "the node sees itself joining",
        || async {
            prom_sample(
                &scrape(&node),
                "ringkv_cluster_members_by_ring_status",
                &[("status", "joining")],
            ) == Some(1.0)
        },
    )
    .await;
}

/// A client of `node` that does not retry, with "big" (a value of just under 1 MiB: far more
/// than the sockets' buffers hold) and "light" written.
async fn with_big_and_light(node: &NodeProcess) -> Client {
    let no_retry = ClientConfig {
        overload_retries: 0,
        ..ClientConfig::default()
    };
    let client = Client::new([node.addr.clone()], no_retry).unwrap();
    let big = Bytes::from(vec![b'b'; ringkv_protocol::limits::MAX_VALUE_LEN - 4096]);
    client.put("big", big, None).await.unwrap();
    client.put("light", "x", None).await.unwrap();
    client
}

/// The node's count of gets with `result`.
fn gets(node: &NodeProcess, result: &str) -> f64 {
    sample(
        node,
        "ringkv_requests_total",
        &[("op", "get"), ("result", result)],
    )
}

/// A raw connection to `node` that will read none of its replies: its unread half (kept open)
/// and a frame writer. Its receive buffer is small, so the replies wait in the node, not in
/// this side's kernel.
async fn unread_connection(
    node: &NodeProcess,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio_util::codec::FramedWrite<tokio::net::tcp::OwnedWriteHalf, ringkv_protocol::FrameCodec>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr.parse().unwrap()).await.unwrap();
    let (unread, wr) = stream.into_split();
    let frames = tokio_util::codec::FramedWrite::new(
        wr,
        ringkv_protocol::FrameCodec::new(ringkv_protocol::limits::MAX_REQUEST_BODY_LEN),
    );
    (unread, frames)
}

/// Sends a get of "big" per request id in `ids` (after whatever was fed before).
async fn send_big_gets(
    frames: &mut tokio_util::codec::FramedWrite<
        tokio::net::tcp::OwnedWriteHalf,
        ringkv_protocol::FrameCodec,
    >,
    ids: impl Iterator<Item = u64>,
) {
    use futures::SinkExt;
    for id in ids {
        let get = ringkv_protocol::Request::Get {
            key: Bytes::from_static(b"big"),
            opts: ringkv_protocol::ReadOptions::default(),
        };
        frames.feed(get.to_frame(id)).await.unwrap();
    }
    frames.flush().await.unwrap();
}

/// Clients that pipeline requests and then read none of the replies cannot make the node hold
/// more replies than its client budget: a request keeps its place in the budget until its
/// reply has been written to the socket, not merely made. Before, the place was given back as
/// soon as the reply was made, so each such connection could leave up to `--max-in-flight`
/// replies in the node's memory and the next connection got a fresh budget: 32 stalled
/// connections held 130 replies of 1 MiB against a budget of 16. Their writes are still
/// applied, a light client is still served, and closing them gives the budget back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_hold_no_more_replies_than_the_budget() {
    use futures::SinkExt;
    use ringkv_protocol::{Request, WriteOptions};
    const BUDGET: usize = 16;
    const STALLED: usize = 64;
    let budget = BUDGET.to_string();
    let node = NodeProcess::start_temp(
        "n1",
        &["--n", "1", "--max-requests", &budget, ADMIN[0], ADMIN[1]],
    );
    let client = with_big_and_light(&node).await;
    let gets_answered = || gets(&node, "ok");
    let answered_before = gets_answered();
    let rss_before = node.rss_bytes().expect("the node's RSS is readable");
    let mut stalled = Vec::new();
    for c in 0..STALLED {
        let (unread, mut frames) = unread_connection(&node).await;
        // One write first (applied whatever happens to its reply), then 64 gets.
        let put = Request::Put {
            key: Bytes::from(format!("unread-{c}")),
            value: Bytes::from_static(b"v"),
            context: Bytes::new(),
            opts: WriteOptions::default(),
        };
        frames.feed(put.to_frame(1)).await.unwrap();
        send_big_gets(&mut frames, 2..66).await;
        stalled.push((unread, frames));
        // Let the node run what it admitted before the next connection comes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let grown = node
            .rss_bytes()
            .expect("the node's RSS is readable")
            .saturating_sub(rss_before);
        assert!(
            grown < 160 << 20,
            "after {} stalled connections the node holds {} MiB more (a budget of {BUDGET} requests: replies outside it?)",
            c + 1,
            grown >> 20
        );
    }
    // Every get the node answered still waits in its memory (none was read): at most the
    // budget of them.
    let answered = gets_answered() - answered_before;
    assert!(
        answered >= 1.0 && answered <= BUDGET as f64,
        "{answered} gets of 1 MiB were answered to clients that read nothing (budget {BUDGET})"
    );
    // A light client still gets in (the last quarter of the budget is kept for connections
    // with nothing in flight), and the stalled connections' writes were applied.
    let read = client.get("light").await.expect("a light client is served");
    assert!(read.is_found(), "{read:?}");
    for c in 0..STALLED {
        let key = format!("unread-{c}");
        eventually(
            Duration::from_secs(10),
            &format!("{key} applied"),
            || async { client.get(&key).await.is_ok_and(|r| r.is_found()) },
        )
        .await;
    }
    // Closing them gives the budget back.
    drop(stalled);
    let in_flight = || sample(&node, "ringkv_admission_in_flight", &[("budget", "client")]);
    eventually(
        Duration::from_secs(10),
        "the stalled connections' places in the budget are given back",
        || async { in_flight() == 0.0 },
    )
    .await;
}

/// A client that reads its replies a trickle at a time (8 KiB/s) is closed like one that reads
/// none, within two write-stall periods, and its places in the budget come back. The node
/// itself never sees the trickle: the kernel wakes a writer only once a good part of the
/// socket's send buffer is free (a third or more), so a reader that frees less than that in a
/// whole period leaves the node's own buffer untouched, and the write-stall watch closes it.
/// (docs/operations.md said such a client could hold its places for as long as it trickled;
/// checked with a minimum read rate added to the watch, which this test could not tell apart
/// from the watch alone: not kept.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trickles_its_replies_is_closed_and_gives_its_places_back() {
    use tokio::io::AsyncReadExt;
    let node = NodeProcess::start_temp("n1", &["--n", "1", ADMIN[0], ADMIN[1]]);
    let client = with_big_and_light(&node).await;
    let stalls = || sample(&node, "ringkv_net_write_stalls_total", &[]);
    let in_flight = || sample(&node, "ringkv_admission_in_flight", &[("budget", "client")]);
    let stalls_before = stalls();
    let (mut trickle, mut frames) = unread_connection(&node).await;
    send_big_gets(&mut frames, 1..=16).await;
    // 4 KiB every half second (8 KiB/s), until the node closes the connection as stalled.
    let start = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut read = 0usize;
    while stalls() == stalls_before {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "a client reading 8 KiB/s is still served after {:?} ({read} bytes read, {} \
             requests in flight)",
            start.elapsed(),
            in_flight()
        );
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), trickle.read(&mut buf)).await
        {
            read += n;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(read > 0, "the trickling client read something");
    eventually(
        Duration::from_secs(10),
        "the trickling connection's places in the budget are given back",
        || async { in_flight() == 0.0 },
    )
    .await;
    // The node goes on serving.
    let light = client.get("light").await.expect("a light client is served");
    assert!(light.is_found(), "{light:?}");
}

/// Replies waiting for clients that do not read count against the byte budget, not only the
/// count: a get is a few bytes in and up to a whole state out. Found in an audit: the byte
/// budget counted request bodies only, so 16 connections pipelining gets of a 1 MiB value and
/// reading nothing had 52 answered (up to 52 MiB waiting) against a byte budget of 8 MiB,
/// refused only by the count. Now a connection with something in flight is refused once the replies waiting
/// fill the budget (past 3/4 of it, as for request bytes); a connection with nothing in flight still gets one request in (a
/// light client is served), and closing them gives every byte back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_waiting_for_clients_that_do_not_read_count_against_the_byte_budget() {
    const BUDGET_MB: usize = 8;
    const STALLED: usize = 16;
    const GETS: u64 = 8;
    let mb = BUDGET_MB.to_string();
    let node = NodeProcess::start_temp(
        "n1",
        &[
            "--n",
            "1",
            "--max-requests",
            "64",
            "--max-request-mb",
            &mb,
            ADMIN[0],
            ADMIN[1],
        ],
    );
    let client = with_big_and_light(&node).await;
    let gets_answered = || gets(&node, "ok");
    let gets_refused = || gets(&node, "overloaded");
    let answered_before = gets_answered();
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let (unread, mut frames) = unread_connection(&node).await;
        send_big_gets(&mut frames, 1..=GETS).await;
        stalled.push((unread, frames));
        // Let the node run what it will of them before the next connection comes: until the
        // gets it answered or refused stop changing (a slow machine takes longer).
        let mut seen = f64::NAN;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = gets_answered() + gets_refused();
            if now == seen {
                break;
            }
            seen = now;
        }
    }
    // One connection's gets may all pass before any of their replies is made (a budget of
    // 8 MiB is 8 of them); after that each connection gets in only its first, as a connection
    // with nothing in flight.
    let answered = gets_answered() - answered_before;
    let bound = (BUDGET_MB as u64 + GETS + STALLED as u64) as f64;
    assert!(
        answered >= 1.0 && answered <= bound,
        "{answered} gets of 1 MiB were answered to clients that read nothing (byte budget \
         {BUDGET_MB} MiB: at most {bound})"
    );
    let bytes = || {
        sample(
            &node,
            "ringkv_admission_in_flight_bytes",
            &[("budget", "client")],
        )
    };
    // The replies the sockets' buffers did not take are counted: at least half the budget
    // (the requests themselves are a few dozen bytes each).
    assert!(
        bytes() >= (BUDGET_MB << 19) as f64,
        "the replies waiting are not counted: {} bytes in flight",
        bytes()
    );
    // A light client still gets in.
    let read = client.get("light").await.expect("a light client is served");
    assert!(read.is_found(), "{read:?}");
    // Closing them gives every byte back.
    drop(stalled);
    eventually(
        Duration::from_secs(10),
        "the stalled connections' bytes are given back",
        || async { bytes() == 0.0 },
    )
    .await;
}

/// A node at its connection limit refuses a new connection before reading anything from it:
/// a write sent on it is definitely not done, and the client says so (`Overloaded`, definite,
/// with the node's retry-after), instead of "connection lost, outcome unknown"; a read retries
/// after the hint and gets in once a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_at_the_limit_is_a_definite_overloaded() {
    let node = NodeProcess::start_temp(
        "n1",
        &["--n", "1", "--max-connections", "2", ADMIN[0], ADMIN[1]],
    );
    let active = || sample(&node, "ringkv_net_connections_active", &[]);
    let no_retry = ClientConfig {
        overload_retries: 0,
        ..ClientConfig::default()
    };
    let setup = Client::new([node.addr.clone()], no_retry.clone()).unwrap();
    setup.put("k", "v", None).await.unwrap();
    drop(setup);
    eventually(
        Duration::from_secs(10),
        "the setup connection closed",
        || async { active() == 0.0 },
    )
    .await;
    let mut held = vec![];
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(&node.addr).await.unwrap());
    }
    eventually(
        Duration::from_secs(10),
        "both held connections accepted",
        || async { active() == 2.0 },
    )
    .await;
    let client = Client::new([node.addr.clone()], no_retry.clone()).unwrap();
    let e = client
        .put("refused", "x", None)
        .await
        .expect_err("a write on a refused connection fails");
    assert!(e.is_overloaded(), "{e}");
    assert!(e.is_definite(), "nothing was read from the connection: {e}");
    assert!(e.retry_after().is_some_and(|d| d > Duration::ZERO), "{e}");
    // With another node to try, nothing waits for the hint: a request refused a connection
    // goes to the next node at once (found in review: it returned the refusal, or waited out
    // the 1 s hint past a 500 ms deadline). The other node here is a cluster of its own,
    // which the client cannot tell apart.
    let other = NodeProcess::start_temp("m1", &["--n", "1"]);
    let both = Client::new(
        [node.addr.clone(), other.addr.clone()],
        ClientConfig {
            request_timeout: Duration::from_millis(500),
            ..no_retry.clone()
        },
    )
    .unwrap();
    both.put("elsewhere", "y", None)
        .await
        .expect("refused by n1, written on m1 at once");
    let read = both.get("elsewhere").await.expect("served by m1");
    assert!(read.is_found(), "{read:?}");
    assert_eq!(active(), 2.0, "n1 took no other connection");
    // A read retries after the hint and gets in once a connection closes.
    let reader = Client::new([node.addr.clone()], ClientConfig::default()).unwrap();
    let read = tokio::spawn(async move { reader.get("k").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.pop();
    let read = read
        .await
        .unwrap()
        .expect("the read is served once a slot frees");
    assert!(read.is_found(), "{read:?}");
}

/// A connection that breaks (its client reset it) while requests on it still run gives its
/// socket and connection slot back at once; the requests finish within their deadlines and
/// keep their places in the budget until then (found in review: the slot was held until the
/// last of them answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_frees_its_slot_while_its_requests_still_run() {
    use futures::SinkExt;
    use ringkv_protocol::{FrameCodec, Request, WriteOptions};
    // The phi detector at its most patient: n3 is routed around only once SWIM finds it down,
    // which leaves the assertions below seconds to run while the long writes wait.
    let cluster = Cluster::start(3, &[&ADMIN[..], &["--phi-threshold", "50"]].concat()).await;
    let n1 = &cluster.nodes[0];
    let active = || sample(n1, "ringkv_net_connections_active", &[]);
    let in_flight = || sample(n1, "ringkv_admission_in_flight", &[("budget", "client")]);
    eventually(
        Duration::from_secs(10),
        "no client connection open on n1",
        || async { active() == 0.0 },
    )
    .await;
    // n3 stopped, not yet suspected: a W=3 write waits for it (until the node is found down,
    // ~5 s, and the write answers Unavailable; 20 s otherwise).
    cluster.nodes[2].send_signal(libc::SIGSTOP);
    let stream = tokio::net::TcpStream::connect(&n1.addr).await.unwrap();
    // Closed with a reset: the node's next write on it fails.
    stream.set_zero_linger().unwrap();
    let mut frames = tokio_util::codec::FramedWrite::new(
        stream,
        FrameCodec::new(ringkv_protocol::limits::MAX_REQUEST_BODY_LEN),
    );
    // Three writes that wait 20 s, and one that gives up after 1 s: its reply is the node's
    // first write after the reset.
    for (id, timeout_ms) in [(1, 20_000), (2, 20_000), (3, 20_000), (4, 1_000)] {
        let put = Request::Put {
            key: Bytes::from(format!("w3-{id}")),
            value: Bytes::from_static(b"v"),
            context: Bytes::new(),
            opts: WriteOptions {
                w: 3,
                timeout_ms,
                ..WriteOptions::default()
            },
        };
        frames.feed(put.to_frame(id)).await.unwrap();
    }
    frames.flush().await.unwrap();
    eventually(
        Duration::from_secs(5),
        "n1 runs the four writes",
        || async { in_flight() == 4.0 },
    )
    .await;
    drop(frames);
    eventually(
        Duration::from_secs(8),
        "the broken connection's slot is given back",
        || async { active() == 0.0 },
    )
    .await;
    assert_eq!(
        in_flight(),
        3.0,
        "the long writes still run when the slot is free, and hold their places"
    );
    cluster.nodes[2].send_signal(libc::SIGCONT);
    eventually(
        Duration::from_secs(30),
        "the long writes finish and give their places back",
        || async { in_flight() == 0.0 },
    )
    .await;
}

/// Found in review: while a connection's unsent replies are over the pause mark the node reads
/// nothing more from it, so a request sent then waits in the socket; it was dated when the
/// node finally read it and given its whole time again: a write the client had already seen
/// time out was applied. Frames read right after such a pause are dated to its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_waited_while_its_connection_was_paused_is_never_applied() {
    use futures::{SinkExt, StreamExt};
    use ringkv_protocol::{FrameCodec, Inbound, ReadOptions, Request, Response, WriteOptions};
    let node = NodeProcess::start_temp("n1", &["--n", "1"]);
    let client = Client::connect([node.addr.clone()]).await.unwrap();
    let big = Bytes::from(vec![b'b'; ringkv_protocol::limits::MAX_VALUE_LEN - 4096]);
    client.put("big", big, None).await.unwrap();
    // A small receive buffer: the replies wait in the node, which stops reading this
    // connection once more than 1 MiB of them is unsent.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr.parse().unwrap()).await.unwrap();
    let (rd, wr) = stream.into_split();
    let codec = || FrameCodec::new(ringkv_protocol::limits::MAX_RESPONSE_BODY_LEN);
    let mut frames = tokio_util::codec::FramedWrite::new(wr, codec());
    for id in 1..=12 {
        let get = Request::Get {
            key: Bytes::from_static(b"big"),
            opts: ReadOptions::default(),
        };
        frames.send(get.to_frame(id)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let put = Request::Put {
        key: Bytes::from_static(b"late"),
        value: Bytes::from_static(b"v"),
        context: Bytes::new(),
        opts: WriteOptions {
            timeout_ms: 200,
            ..WriteOptions::default()
        },
    };
    frames.send(put.to_frame(100)).await.unwrap();
    // Well past the write's 200 ms, start reading: the node reads the put once its replies
    // drain.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut replies = tokio_util::codec::FramedRead::new(rd, codec());
    let answer = loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), replies.next())
            .await
            .expect("every reply comes")
            .expect("the connection stays open")
            .expect("a frame");
        let Inbound::Frame(frame) = frame else {
            panic!("{frame:?}")
        };
        if frame.request_id == 100 {
            break Response::decode(frame.opcode, frame.body).unwrap();
        }
    };
    match &answer {
        Response::Error(e) => {
            assert!(
                matches!(e.kind, ringkv_client::ErrorKind::Timeout { .. }),
                "{e:?}"
            );
            assert!(e.definite, "{e:?}");
        }
        other => panic!(
            "a write that waited past its deadline was run: {other:?}\n{}",
            node.log_tail(60)
        ),
    }
    let read = client.get("late").await.unwrap();
    assert!(!read.is_found(), "{read:?}");
}
