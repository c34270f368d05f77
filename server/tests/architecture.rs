//! The architecture invariants of docs/architecture.md that a machine can check, over the
//! server's source (test modules excluded):
//!
//! - nothing imports the api layer or the root (`node`), except the root and `lib.rs`;
//! - `net` imports no service (and nothing above transport);
//! - `storage` and `membership` import neither `rpc` nor each other, nor any service;
//! - the pure cores (`version`, `ring`, `coordinator::{quorum, plan}`, `handoff::budget`,
//!   `merkle`) import nothing that does I/O;
//! - services (`coordinator`, `replica`, `handoff`, `aae`, `cluster`) do not import each other;
//! - `background` imports no service, storage, membership or net; `admission` only `metrics`;
//!   `metrics` no other module;
//! - only `storage` touches engine batches, and the writer thread is the only mutator;
//! - every background loop is a worker: no `tokio::spawn` outside `background/` (and the signal
//!   task in `main.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A source file without its test code: `tests.rs` files are skipped, and a file's
/// `#[cfg(test)]` module (by convention at its end) is cut off.
struct Source {
    /// Path under `src/`, with `/` separators.
    rel: String,
    code: String,
}

fn load() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "tests.rs"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            Source {
                rel: p
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/"),
                code,
            }
        })
        .collect()
}

/// The top-level module a file belongs to (`coordinator/plan.rs` → `coordinator`).
fn module(rel: &str) -> &str {
    rel.split('/').next().unwrap().trim_end_matches(".rs")
}

/// The crate modules a file refers to (`crate::x` paths, `use crate::{x, y}` included), with
/// the second path segment for `coordinator` (`coordinator::quorum`).
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let group = rest.starts_with('{');
        let body: &str = if group {
            &rest[1..rest.find('}').unwrap_or(rest.len())]
        } else {
            rest
        };
        let paths: Vec<&str> = if group {
            body.split(',').collect()
        } else {
            vec![body]
        };
        for p in paths {
            let p = p.trim();
            let segs: Vec<&str> = p
                .split("::")
                .map(|s| {
                    s.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap_or("")
                })
                .collect();
            let first = segs.first().copied().unwrap_or("");
            if first.is_empty() || first.chars().next().is_some_and(|c| c.is_uppercase()) {
                continue;
            }
            if first == "coordinator" && segs.len() > 1 && !segs[1].is_empty() {
                out.insert(format!("coordinator::{}", segs[1]));
            }
            out.insert(first.to_string());
        }
    }
    out
}

fn check(
    violations: &mut Vec<String>,
    files: &[Source],
    who: impl Fn(&str) -> bool,
    forbidden: &[&str],
    rule: &str,
) {
    for f in files.iter().filter(|f| who(&f.rel)) {
        let used = imports(&f.code);
        for m in forbidden {
            if used.contains(*m) && module(&f.rel) != *m {
                violations.push(format!("{}: imports `{m}` ({rule})", f.rel));
            }
        }
    }
}

#[test]
fn modules_import_only_what_the_architecture_allows() {
    let files = load();
    assert!(files.len() > 20, "found the sources: {}", files.len());
    let mut v = Vec::new();
    let services = [
        "coordinator",
        "replica",
        "handoff",
        "aae",
        "cluster",
        "api",
        "node",
        "rpc",
        "background",
    ];
    check(
        &mut v,
        &files,
        |rel| !matches!(rel, "lib.rs" | "main.rs" | "node.rs"),
        &["api", "node"],
        "nothing imports the api layer or the root",
    );
    check(
        &mut v,
        &files,
        |rel| module(rel) == "net",
        &[&services[..], &["storage", "membership"]].concat(),
        "net is transport only",
    );
    check(
        &mut v,
        &files,
        |rel| module(rel) == "storage",
        &[&services[..], &["membership", "net"]].concat(),
        "storage imports neither rpc, membership nor a service",
    );
    check(
        &mut v,
        &files,
        |rel| module(rel) == "membership",
        &[
            "coordinator",
            "replica",
            "handoff",
            "aae",
            "cluster",
            "api",
            "node",
            "rpc",
            "storage",
            "net",
        ],
        "membership imports neither rpc, storage nor a service",
    );
    let io = [
        "storage",
        "net",
        "rpc",
        "api",
        "node",
        "replica",
        "handoff",
        "aae",
        "cluster",
        "background",
        "clock",
        "config",
    ];
    check(
        &mut v,
        &files,
        |rel| {
            matches!(module(rel), "version" | "ring" | "merkle")
                || matches!(
                    rel,
                    "coordinator/quorum.rs" | "coordinator/plan.rs" | "handoff/budget.rs"
                )
        },
        &io,
        "pure cores do no I/O",
    );
    check(
        &mut v,
        &files,
        |rel| module(rel) == "background",
        &[&services[..], &["storage", "membership", "net"]].concat(),
        "the worker runner knows no service",
    );
    check(
        &mut v,
        &files,
        |rel| module(rel) == "rpc",
        &[
            "replica", "handoff", "aae", "cluster", "api", "node", "storage",
        ],
        "rpc knows no service",
    );
    // Admission is a node-wide budget the api and net layers consult: it knows nothing else.
    check(
        &mut v,
        &files,
        |rel| module(rel) == "admission",
        &[&services[..], &io[..], &["membership"]].concat(),
        "admission imports only metrics",
    );
    // The one registry: every module uses it, it uses none of them.
    check(
        &mut v,
        &files,
        |rel| module(rel) == "metrics",
        &[
            &services[..],
            &io[..],
            &["membership", "admission", "version", "ring", "merkle"],
        ]
        .concat(),
        "metrics imports no other module",
    );
    // Services do not reach into each other (they talk over the peer protocol or handles).
    let all = ["coordinator", "replica", "handoff", "aae", "cluster"];
    for service in all {
        let others: Vec<&str> = all.iter().copied().filter(|s| *s != service).collect();
        check(
            &mut v,
            &files,
            |rel| module(rel) == service,
            &others,
            "a service does not import another service",
        );
    }
    // rpc may use the sans-IO trackers, nothing else of the coordinator.
    for f in files.iter().filter(|f| module(&f.rel) == "rpc") {
        for m in imports(&f.code) {
            if m.starts_with("coordinator::") && m != "coordinator::quorum" {
                v.push(format!(
                    "{}: imports `{m}` (rpc uses only coordinator::quorum)",
                    f.rel
                ));
            }
        }
    }
    // Only storage builds engine batches or calls the engine's write path.
    for f in files.iter().filter(|f| module(&f.rel) != "storage") {
        for needle in ["Batch::default", ".sync_wal(", "BatchOp::"] {
            if f.code.contains(needle) {
                v.push(format!(
                    "{}: uses `{needle}` (the writer thread is the only mutator)",
                    f.rel
                ));
            }
        }
    }
    // Every background loop runs on the worker runner.
    for f in files
        .iter()
        .filter(|f| module(&f.rel) != "background" && f.rel != "main.rs")
    {
        if f.code.contains("tokio::spawn(") {
            v.push(format!(
                "{}: bare tokio::spawn (use a background::Worker)",
                f.rel
            ));
        }
    }
    assert!(v.is_empty(), "architecture violations:\n{}", v.join("\n"));
}

/// The checker itself: it sees what it must see.
#[test]
fn the_import_scanner_reads_grouped_and_nested_paths() {
    let code = "use crate::rpc::{FanOut, Tracker};\nuse crate::{storage::Store, net};\nlet x = crate::coordinator::quorum::Decision::Pending;\nuse crate::metrics::Counter;";
    let got = imports(code);
    let want: BTreeSet<String> = [
        "rpc",
        "storage",
        "net",
        "coordinator",
        "coordinator::quorum",
        "metrics",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, want);
    let mut v = Vec::new();
    let files = vec![Source {
        rel: "net/mod.rs".into(),
        code: "use crate::coordinator::Coordinator;".into(),
    }];
    check(
        &mut v,
        &files,
        |rel| module(rel) == "net",
        &["coordinator"],
        "net is transport only",
    );
    assert_eq!(v.len(), 1, "a violation is reported");
}
