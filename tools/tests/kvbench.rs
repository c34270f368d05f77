//! Smoke run of the load generator against a real node: it completes, with zero errors and a
//! well-formed JSON summary. (Speed is measured by `make bench`, never asserted in tests.)

use std::process::Command;

use ringkv_jepsen::{bin_path, tool_json, NodeProcess};
use serde_json::Value;

#[test]
fn kvbench_smoke_run_has_no_errors_and_a_complete_summary() {
    let node = NodeProcess::start_temp("bench", &["--n", "1"]);
    for mode in [
        &["--connections", "2", "--depth", "4"][..],
        &["--rate", "500"][..],
    ] {
        let s = tool_json(
            "kvbench",
            &[
                &[
                    "--addr",
                    &node.addr,
                    "--records",
                    "100",
                    "--ops",
                    "300",
                    "--json",
                    "--workload",
                    "a",
                ][..],
                mode,
            ]
            .concat(),
        );
        assert_eq!(s["load"]["ops"], 100, "{s}");
        assert_eq!(s["load"]["errors"], 0, "{s}");
        let run = &s["run"];
        assert_eq!(run["ops"], 300, "{s}");
        assert_eq!(run["errors"], 0, "{s}");
        assert_eq!(run["not_found"], 0, "every key was loaded: {s}");
        assert_eq!(
            run["read"]["count"].as_u64().unwrap() + run["update"]["count"].as_u64().unwrap(),
            300
        );
        assert!(run["throughput"].as_f64().unwrap() > 0.0);
        for p in ["p50_us", "p95_us", "p99_us", "p999_us", "max_us"] {
            assert!(run["all"][p].as_u64().unwrap() > 0, "{p}: {s}");
        }
        assert!(run["all"]["p50_us"].as_u64() <= run["all"]["max_us"].as_u64());
        if s["mode"] == "open" {
            // The open loop splits each latency: the generator's own delay before a request
            // began, and the rest; both cover every operation, and neither exceeds the whole.
            assert_eq!(run["late"]["count"], 300, "{s}");
            assert_eq!(run["from_send"]["count"], run["all"]["count"], "{s}");
            assert!(run["from_send"]["max_us"].as_u64() <= run["all"]["max_us"].as_u64());
            assert!(run["late"]["max_us"].as_u64() <= run["all"]["max_us"].as_u64());
            // Of the generator's delay, the part before the dispatcher handed each request
            // over, and its total wait for its own limit of requests in flight.
            assert_eq!(run["dispatch_late"]["count"], 300, "{s}");
            assert!(run["dispatch_late"]["max_us"].as_u64() <= run["late"]["max_us"].as_u64());
            assert!(
                run["permit_wait_s"].as_f64().is_some_and(|w| w >= 0.0),
                "{s}"
            );
        } else {
            for open_only in ["late", "from_send", "dispatch_late", "permit_wait_s"] {
                assert!(run.get(open_only).is_none(), "{open_only}: {s}");
            }
        }
        assert_eq!(s["config"]["workload"]["name"], "A");
        assert!(!s["git_commit"].as_str().unwrap().is_empty());
    }
}

/// Failed operations make the exit code 1 (scripts probe a node with a one-op run), and the
/// summary still says what failed.
#[test]
fn kvbench_exits_1_when_operations_fail() {
    // Default N=3 on a lone node: every write is refused (1 replica of 2 needed).
    let node = NodeProcess::start_temp("bench-err", &[]);
    let out = Command::new(bin_path("kvbench"))
        .args([
            "--addr",
            &node.addr,
            "--records",
            "2",
            "--ops",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).expect("JSON summary on stdout");
    assert_eq!(s["load"]["errors"], 2, "{s}");
    assert!(
        s["load"]["first_errors"][0]
            .as_str()
            .unwrap()
            .contains("Unavailable"),
        "{s}"
    );
}
