//! Checkers: pure functions from a history (and replica snapshots) to verdicts
//! (shared/notes/jepsen.md §2). Every value written is unique, so lost writes, phantoms and
//! duplicates are set arithmetic.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

use crate::history::{Op, OpType};

/// Process name of the harness's final quiescent reads.
pub const FINAL: &str = "final";
/// Process name of the nemesis.
pub const NEMESIS: &str = "nemesis";
/// Prefix of tombstone ids (`tomb:<actor hex>:<counter>`): a delete has no value, so its
/// tombstone is named by the dot the delete minted.
pub const TOMB: &str = "tomb:";

/// An invocation and its completion.
#[derive(Debug, Clone)]
pub struct Completed<'a> {
    pub invoke: &'a Op,
    pub done: &'a Op,
}

/// Pairs each client invoke with the next completion of the same process. Invokes without a
/// completion (the harness died) are treated as `info`.
pub fn pair(history: &[Op]) -> (Vec<Completed<'_>>, Vec<&Op>) {
    let mut open: HashMap<&str, &Op> = HashMap::new();
    let mut out = Vec::new();
    for op in history {
        if op.p == NEMESIS {
            continue;
        }
        match op.kind {
            OpType::Invoke => {
                open.insert(op.p.as_str(), op);
            }
            _ => {
                if let Some(inv) = open.remove(op.p.as_str()) {
                    out.push(Completed {
                        invoke: inv,
                        done: op,
                    });
                }
            }
        }
    }
    let dangling = open.into_values().collect();
    (out, dangling)
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RegisterReport {
    pub keys: usize,
    pub ok_writes: usize,
    pub info_writes: usize,
    pub fail_writes: usize,
    pub ok_reads: usize,
    /// Acknowledged writes missing from the final state and superseded by no ok/info write.
    pub lost: Vec<String>,
    /// Missing, but covered only by writes whose outcome is unknown.
    pub excused_by_info: usize,
    /// Writes with an unknown outcome that turned out to be applied.
    pub recovered: usize,
    /// Acknowledged deletes whose tombstone is absent from the final state because tombstone
    /// GC purged it (runs with GC only; what the delete superseded must still stay away,
    /// `resurrected`).
    pub purged_tombstones: usize,
    /// Values read (or in the final state) that no write of that key produced.
    pub phantoms: Vec<String>,
    /// Values read although their write failed definitely.
    pub from_failed: Vec<String>,
    /// Values read before their write was invoked.
    pub from_future: Vec<String>,
    /// Values in the final state although an applied write superseded them.
    pub resurrected: Vec<String>,
    /// Reads (or final reads) that returned the same value twice (one write stored twice).
    pub duplicates: Vec<String>,
    /// Why the run proves nothing: no acknowledged write, or no final read.
    pub inactive: Vec<String>,
    pub valid: bool,
}

impl RegisterReport {
    /// Every kind of anomaly the checker looks for, with what it found: the history is valid
    /// iff all are empty.
    pub fn anomalies(&self) -> [(&'static str, &[String]); 7] {
        [
            ("lost", &self.lost),
            ("phantoms", &self.phantoms),
            ("from-failed", &self.from_failed),
            ("from-future", &self.from_future),
            ("resurrected", &self.resurrected),
            ("duplicates", &self.duplicates),
            ("inactive", &self.inactive),
        ]
    }
}

struct Write {
    key: String,
    value: Option<String>,
    invoke_t: u64,
    /// Completion time (`u64::MAX` when it never completed).
    done_t: u64,
    outcome: OpType,
    /// Values this write certainly supersedes if it was applied.
    covers: BTreeSet<String>,
    /// Values it may also supersede (a delete without context covers what its internal
    /// quorum read saw, which may include writes concurrent with it).
    may_cover: BTreeSet<String>,
    /// A delete sent without a context.
    context_free: bool,
    /// Acknowledged with acks from fallbacks (sloppy quorum).
    sloppy: bool,
}

/// §2a and §2c: no lost acknowledged writes, no phantoms, no resurrections. The final state of
/// each key is the `ok` get of process `final` (an R=N read after healing and convergence).
pub fn check_register(history: &[Op]) -> RegisterReport {
    check_register_with(history, false)
}

/// `check_register` for a run with tombstone GC (`purges`): an acknowledged delete's tombstone
/// may be missing from the final state (purged once stable); a value it superseded coming
/// back is still a resurrection.
pub fn check_register_with(history: &[Op], purges: bool) -> RegisterReport {
    let (done, dangling) = pair(history);
    let by_index: HashMap<u64, &Op> = history.iter().map(|o| (o.i, o)).collect();
    let mut writes: Vec<Write> = Vec::new();
    let mut reads: Vec<(&Op, &Op)> = Vec::new();
    let mut finals: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut duplicates = Vec::new();
    for c in &done {
        let key = c.invoke.key.clone().unwrap_or_default();
        match c.invoke.f.as_str() {
            "put" | "delete" => {
                let covers = c
                    .invoke
                    .ctx_src
                    .and_then(|i| by_index.get(&i))
                    .map(|g| g.value_list().into_iter().collect())
                    .unwrap_or_default();
                let value = if c.invoke.f == "put" {
                    c.invoke.value_str().map(str::to_string)
                } else {
                    c.done.value_str().map(str::to_string)
                };
                writes.push(Write {
                    key,
                    value,
                    invoke_t: c.invoke.t,
                    done_t: c.done.t,
                    outcome: c.done.kind,
                    covers,
                    may_cover: BTreeSet::new(),
                    context_free: c.invoke.f == "delete" && c.invoke.ctx_src.is_none(),
                    sloppy: c.done.fallback_acks.unwrap_or(0) > 0,
                });
            }
            "get" if c.done.kind == OpType::Ok => {
                // Every value names one write: a read holding one twice holds a write twice.
                let list = c.done.value_list();
                if list.iter().collect::<BTreeSet<_>>().len() != list.len() {
                    duplicates.push(format!("{key}: {list:?}"));
                }
                if c.invoke.p == FINAL {
                    finals.entry(key).or_default().extend(c.done.value_list());
                } else {
                    reads.push((c.invoke, c.done));
                }
            }
            _ => {}
        }
    }
    for inv in dangling {
        if inv.f == "put" {
            writes.push(Write {
                key: inv.key.clone().unwrap_or_default(),
                value: inv.value_str().map(str::to_string),
                invoke_t: inv.t,
                done_t: u64::MAX,
                outcome: OpType::Info,
                covers: BTreeSet::new(),
                may_cover: BTreeSet::new(),
                context_free: false,
                sloppy: false,
            });
        }
    }
    // A delete without context supersedes what a quorum read of primaries returns: every write
    // (put or delete) of the key acknowledged by W primaries before the delete began (R + W > N:
    // the read sees it), and perhaps writes concurrent with it. A write acknowledged partly by
    // fallbacks (sloppy quorum) may sit on fallbacks and one primary only until its hints are
    // replayed: the delete's read may miss it (docs/operations.md, "Quorums and failures").
    let written: Vec<(String, String, u64, u64, OpType, bool)> = writes
        .iter()
        .filter_map(|w| {
            let v = w.value.as_ref()?;
            Some((
                w.key.clone(),
                v.clone(),
                w.invoke_t,
                w.done_t,
                w.outcome,
                w.sloppy,
            ))
        })
        .collect();
    // A delete whose outcome is unknown (it timed out) may take effect at any later time: a
    // node paused with it in its socket buffer runs it when it resumes, and its quorum read
    // then sees writes made after the client gave up.
    for d in writes.iter_mut().filter(|w| w.context_free) {
        let latest = if d.outcome == OpType::Ok {
            d.done_t
        } else {
            u64::MAX
        };
        for (key, v, invoke_t, done_t, outcome, sloppy) in &written {
            if *key != d.key || d.value.as_ref() == Some(v) {
                continue;
            }
            if *outcome == OpType::Ok && *done_t < d.invoke_t && !sloppy {
                d.covers.insert(v.clone());
            } else if *invoke_t < latest {
                d.may_cover.insert(v.clone());
            }
        }
    }

    let mut r = RegisterReport {
        keys: finals.len(),
        ok_reads: reads.len(),
        duplicates,
        ..Default::default()
    };
    for w in &writes {
        match w.outcome {
            OpType::Ok => r.ok_writes += 1,
            OpType::Fail => r.fail_writes += 1,
            _ => r.info_writes += 1,
        }
    }
    // value -> (key, write) for lookups.
    let mut by_value: HashMap<&str, &Write> = HashMap::new();
    for w in &writes {
        if let Some(v) = &w.value {
            by_value.insert(v.as_str(), w);
        }
    }
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    // Per key, tombstones read or final that no known delete minted: the trace of a delete
    // whose outcome is unknown (its id was never returned).
    let mut unknown_tombs: BTreeSet<&str> = BTreeSet::new();
    for (inv, done) in &reads {
        if let Some(list) = done.value.as_ref().and_then(|v| v.as_array()) {
            for v in list.iter().filter_map(|v| v.as_str()) {
                seen.insert(v);
                if v.starts_with(TOMB) && !by_value.contains_key(v) {
                    unknown_tombs.insert(inv.key.as_deref().unwrap_or_default());
                }
            }
        }
    }
    for (key, vals) in &finals {
        if vals
            .iter()
            .any(|v| v.starts_with(TOMB) && !by_value.contains_key(v.as_str()))
        {
            unknown_tombs.insert(key.as_str());
        }
    }
    let empty = BTreeSet::new();
    for w in &writes {
        let Some(v) = &w.value else { continue };
        let fin = finals.get(&w.key).unwrap_or(&empty);
        let coverers: Vec<&Write> = writes
            .iter()
            .filter(|c| c.key == w.key && c.covers.contains(v))
            .collect();
        let may_coverers: Vec<&Write> = writes
            .iter()
            .filter(|c| c.key == w.key && (c.covers.contains(v) || c.may_cover.contains(v)))
            .collect();
        let applied = |c: &Write| {
            c.outcome == OpType::Ok
                || c.value.as_deref().is_some_and(|cv| {
                    seen.contains(cv) || finals.get(&c.key).is_some_and(|f| f.contains(cv))
                })
        };
        // A write of unknown outcome excuses a loss only if it may have been applied without
        // a trace of its own being expected: its value was seen or is final, or a later write
        // (not failed) superseded it; a delete of unknown outcome, if a tombstone no known
        // delete minted shows up on its key. One that left no trace cannot be what removed `v`.
        let may_have_applied = |c: &Write| match c.value.as_deref() {
            Some(cv) => {
                applied(c)
                    || writes.iter().any(|o| {
                        o.key == c.key
                            && o.outcome != OpType::Fail
                            && (o.covers.contains(cv) || o.may_cover.contains(cv))
                    })
            }
            None => unknown_tombs.contains(c.key.as_str()),
        };
        match w.outcome {
            OpType::Ok if !fin.contains(v) => {
                if may_coverers.iter().any(|c| c.outcome == OpType::Ok) {
                } else if purges && v.starts_with(TOMB) {
                    r.purged_tombstones += 1;
                } else if may_coverers
                    .iter()
                    .any(|c| c.outcome == OpType::Info && may_have_applied(c))
                {
                    r.excused_by_info += 1;
                } else {
                    r.lost.push(format!("{}: {v}", w.key));
                }
            }
            OpType::Info if fin.contains(v) || seen.contains(v.as_str()) => r.recovered += 1,
            _ => {}
        }
        if fin.contains(v) && coverers.iter().any(|c| applied(c)) {
            r.resurrected.push(format!("{}: {v}", w.key));
        }
    }
    // Every value read (and every final value) must come from a write of that key.
    let check_value = |key: &str, v: &str, read_done_t: u64, r: &mut RegisterReport| {
        if v.starts_with(TOMB) {
            // Tombstones of deletes with unknown outcome carry no id we could know.
            return;
        }
        match by_value.get(v) {
            None => r.phantoms.push(format!("{key}: {v}")),
            Some(w) if w.key != key => r
                .phantoms
                .push(format!("{key}: {v} (written under {})", w.key)),
            Some(w) if w.outcome == OpType::Fail => r.from_failed.push(format!("{key}: {v}")),
            Some(w) if w.invoke_t > read_done_t => r.from_future.push(format!("{key}: {v}")),
            Some(_) => {}
        }
    };
    for (inv, done) in &reads {
        let key = inv.key.clone().unwrap_or_default();
        for v in done.value_list() {
            check_value(&key, &v, done.t, &mut r);
        }
    }
    for (key, vals) in &finals {
        for v in vals {
            check_value(key, v, u64::MAX, &mut r);
        }
    }
    if r.ok_writes == 0 {
        r.inactive.push("no acknowledged write".into());
    }
    if finals.is_empty() {
        r.inactive.push("no final read".into());
    }
    r.valid = r.anomalies().iter().all(|(_, found)| found.is_empty());
    r
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SetReport {
    pub ok_adds: usize,
    pub info_adds: usize,
    pub fail_adds: usize,
    pub final_size: usize,
    /// Acknowledged adds missing from the final set.
    pub lost: Vec<String>,
    /// Adds with unknown outcome present in the final set.
    pub recovered: usize,
    /// Elements in the final set that were never added.
    pub unexpected: Vec<String>,
    /// Elements that failed definitely but appear.
    pub from_failed: Vec<String>,
    /// Reads that returned an element twice.
    pub duplicates: Vec<String>,
    /// Why the run proves nothing: no acknowledged add, or no final read.
    pub inactive: Vec<String>,
    pub valid: bool,
}

impl SetReport {
    /// Every kind of anomaly the checker looks for, with what it found: the history is valid
    /// iff all are empty.
    pub fn anomalies(&self) -> [(&'static str, &[String]); 5] {
        [
            ("lost", &self.lost),
            ("unexpected", &self.unexpected),
            ("from-failed", &self.from_failed),
            ("duplicates", &self.duplicates),
            ("inactive", &self.inactive),
        ]
    }
}

/// Splits a set sibling value (`e1,e2,...`) into elements.
pub fn set_elements(sibling: &str) -> Vec<String> {
    sibling
        .split(',')
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

/// The set workload: every acknowledged add is in the final set (the union of the final read's
/// siblings); nothing appears that was never added; no read holds an element twice.
pub fn check_set(history: &[Op]) -> SetReport {
    let (done, dangling) = pair(history);
    let mut r = SetReport::default();
    // Per (key, element): an element added to one set and found only in another is lost
    // there and unexpected here.
    let mut adds: BTreeMap<(String, String), OpType> = BTreeMap::new();
    let mut finals: BTreeSet<(String, String)> = BTreeSet::new();
    let mut final_reads = 0;
    for c in &done {
        let key = c.invoke.key.clone().unwrap_or_default();
        match c.invoke.f.as_str() {
            "add" => {
                if let Some(e) = c.invoke.value_str() {
                    adds.insert((key, e.to_string()), c.done.kind);
                }
            }
            "read" if c.done.kind == OpType::Ok => {
                let mut elems = Vec::new();
                for sib in c.done.value_list() {
                    elems.extend(set_elements(&sib));
                }
                // Within one sibling an element must appear once; across siblings it may
                // repeat (two concurrent adds both carried it).
                for sib in c.done.value_list() {
                    let es = set_elements(&sib);
                    let uniq: BTreeSet<&String> = es.iter().collect();
                    if uniq.len() != es.len() {
                        r.duplicates.push(format!(
                            "{}: {sib}",
                            c.invoke.key.clone().unwrap_or_default()
                        ));
                    }
                }
                if c.invoke.p == FINAL {
                    final_reads += 1;
                    finals.extend(elems.into_iter().map(|e| (key.clone(), e)));
                }
            }
            _ => {}
        }
    }
    for inv in dangling {
        if inv.f == "add" {
            if let Some(e) = inv.value_str() {
                let key = inv.key.clone().unwrap_or_default();
                adds.insert((key, e.to_string()), OpType::Info);
            }
        }
    }
    let shown = |(k, e): &(String, String)| format!("{k}: {e}");
    for (e, outcome) in &adds {
        match outcome {
            OpType::Ok => {
                r.ok_adds += 1;
                if !finals.contains(e) {
                    r.lost.push(shown(e));
                }
            }
            OpType::Fail => {
                r.fail_adds += 1;
                if finals.contains(e) {
                    r.from_failed.push(shown(e));
                }
            }
            _ => {
                r.info_adds += 1;
                if finals.contains(e) {
                    r.recovered += 1;
                }
            }
        }
    }
    r.unexpected = finals
        .iter()
        .filter(|e| !adds.contains_key(*e))
        .map(shown)
        .collect();
    r.final_size = finals.len();
    if r.ok_adds == 0 {
        r.inactive.push("no acknowledged add".into());
    }
    if final_reads == 0 {
        r.inactive.push("no final read".into());
    }
    r.valid = r.anomalies().iter().all(|(_, found)| found.is_empty());
    r
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ConvergenceReport {
    pub keys: usize,
    pub converged_keys: usize,
    /// Keys whose replicas differ, with each holder's state.
    pub divergent: Vec<String>,
    /// Keys held by a number of nodes other than N.
    pub wrong_holder_count: Vec<String>,
    pub converged: bool,
}

/// §2d: for every key, exactly `n` nodes hold it (when the cluster has at least `n` nodes) and
/// they hold identical sibling sets, or no node holds it. `snapshots[key]` lists
/// `(node, siblings)` where siblings are canonical strings (dot and value) and empty means "not
/// held". A key no node holds is agreement on absence: a key the history only read, or only
/// wrote with writes that failed (a delete leaves a tombstone, which is held). Whether an
/// acknowledged write went missing is the workload checker's question, from the final reads.
pub fn check_convergence(
    snapshots: &BTreeMap<String, Vec<(String, Vec<String>)>>,
    n: usize,
) -> ConvergenceReport {
    let mut r = ConvergenceReport {
        keys: snapshots.len(),
        ..Default::default()
    };
    for (key, replicas) in snapshots {
        let holders: Vec<&(String, Vec<String>)> =
            replicas.iter().filter(|(_, s)| !s.is_empty()).collect();
        let want = n.min(replicas.len());
        let mut ok = true;
        if !holders.is_empty() && holders.len() != want {
            ok = false;
            r.wrong_holder_count
                .push(format!("{key}: held by {} nodes, N={want}", holders.len()));
        }
        let mut states: Vec<Vec<String>> = holders
            .iter()
            .map(|(_, s)| {
                let mut s = s.clone();
                s.sort();
                s
            })
            .collect();
        states.dedup();
        if states.len() > 1 {
            ok = false;
            let detail: Vec<String> = holders
                .iter()
                .map(|(node, s)| format!("{node}={}", s.join("|")))
                .collect();
            r.divergent.push(format!("{key}: {}", detail.join(" ")));
        }
        if ok {
            r.converged_keys += 1;
        }
    }
    r.converged = r.converged_keys == r.keys;
    r
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct WindowStats {
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// §2d, the other half: the final R=N read of each key against what its replicas hold once
/// they converged (the last `replica_get` snapshot, taken after the final reads and their read
/// repair, with no writes since). The workload checkers judge the final reads; a read that
/// missed a sibling its replicas hold would hide a phantom or a resurrection, and a value read
/// that no replica holds afterwards was lost after it was read. Keys whose replicas disagree
/// or could not be read are left to the convergence report. With tombstone GC (`purges`)
/// tombstones are left out on both sides: they may be purged between the read and the
/// snapshot.
pub fn final_reads_against_replicas(history: &[Op], purges: bool) -> FinalAgreement {
    let mut finals: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut replicas: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for op in history.iter().filter(|o| o.p == FINAL) {
        let key = op.key.clone().unwrap_or_default();
        match (op.kind, op.f.as_str()) {
            (OpType::Ok, "get" | "read") => {
                finals.insert(key, op.value_list());
            }
            (OpType::Info, "replica_get") => {
                let node = op.node.clone().unwrap_or_default();
                replicas
                    .entry(key)
                    .or_default()
                    .insert(node, op.value_list());
            }
            _ => {}
        }
    }
    let keep = |v: &String| !(purges && v.starts_with(TOMB));
    let mut out = FinalAgreement::default();
    for (key, read) in finals {
        let Some(nodes) = replicas.get(&key) else {
            out.not_compared += 1;
            continue;
        };
        if nodes
            .values()
            .flatten()
            .any(|s| s.starts_with("unreadable"))
        {
            out.not_compared += 1;
            continue;
        }
        let mut states: Vec<Vec<String>> = nodes
            .values()
            .filter(|s| !s.is_empty())
            .map(|s| {
                let mut v: Vec<String> = s.iter().map(|e| snapshot_value(e)).filter(keep).collect();
                v.sort();
                v
            })
            .collect();
        states.dedup();
        if states.len() > 1 {
            out.not_compared += 1;
            continue;
        }
        let held = states.pop().unwrap_or_default();
        let mut read: Vec<String> = read.into_iter().filter(keep).collect();
        read.sort();
        out.compared += 1;
        if read != held {
            out.differ.push(format!(
                "{key}: the final read returned {read:?}, the converged replicas hold {held:?}"
            ));
        }
    }
    out
}

/// `final_reads_against_replicas`' verdict.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FinalAgreement {
    /// Keys whose final read was compared with their converged replicas.
    pub compared: usize,
    /// Keys read at the end whose replicas disagreed or could not be read (the convergence
    /// report names them).
    pub not_compared: usize,
    /// One line per key whose final read and converged replicas differ.
    pub differ: Vec<String>,
}

/// A replica snapshot's sibling (`<actor hex>:<counter>=<value>`, `⊥` for a tombstone) in the
/// form the final reads record (the value, or `tomb:<actor hex>:<counter>`).
fn snapshot_value(entry: &str) -> String {
    match entry.split_once('=') {
        Some((dot, "⊥")) => format!("{TOMB}{dot}"),
        Some((_, value)) => value.to_string(),
        None => entry.to_string(),
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AvailabilityReport {
    /// Outcome counts by the faults active when the op completed ("healthy" = none).
    pub windows: BTreeMap<String, WindowStats>,
    /// Latency of ok ops by function.
    pub latency: BTreeMap<String, Latency>,
    /// Nemesis faults started but never healed (the run must always heal).
    pub unhealed: Vec<String>,
    /// Faults healed whose effect was not observed (`value.observed` of their `stop` is not
    /// true), with the evidence seen: a fault that did nothing proves nothing.
    pub unobserved: Vec<String>,
    /// Faults healed with their effect observed.
    pub observed: usize,
}

/// Availability per fault window and latency percentiles, straight from the history. Nemesis
/// ops are `info` ops of process `nemesis` with `value.phase` = "start" or "stop" and
/// `value.fault` naming the fault instance.
pub fn availability(history: &[Op]) -> AvailabilityReport {
    let mut active: BTreeMap<String, String> = BTreeMap::new(); // fault id -> kind
    let mut r = AvailabilityReport::default();
    let mut starts: HashMap<&str, u64> = HashMap::new();
    let mut hists: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    for op in history {
        if op.p == NEMESIS {
            let phase = op
                .value
                .as_ref()
                .and_then(|v| v.get("phase"))
                .and_then(|p| p.as_str());
            let fault = op
                .value
                .as_ref()
                .and_then(|v| v.get("fault"))
                .and_then(|p| p.as_str())
                .unwrap_or(op.f.as_str())
                .to_string();
            match phase {
                Some("start") => {
                    active.insert(fault, op.f.clone());
                }
                Some("stop") => {
                    let value = op.value.as_ref();
                    if value.and_then(|v| v.get("observed")) == Some(&json!(true)) {
                        r.observed += 1;
                    } else {
                        let evidence = value
                            .and_then(|v| v.get("evidence"))
                            .map_or("none recorded".to_string(), |e| e.to_string());
                        r.unobserved.push(format!("{fault}: {evidence}"));
                    }
                    active.remove(&fault);
                }
                _ => {}
            }
            continue;
        }
        if op.p == FINAL {
            continue;
        }
        match op.kind {
            OpType::Invoke => {
                starts.insert(op.p.as_str(), op.t);
            }
            kind => {
                let mut kinds: Vec<&str> = active.values().map(String::as_str).collect();
                kinds.sort();
                kinds.dedup();
                let label = if kinds.is_empty() {
                    "healthy".to_string()
                } else {
                    kinds.join("+")
                };
                let w = r.windows.entry(label).or_default();
                match kind {
                    OpType::Ok => w.ok += 1,
                    OpType::Fail => w.fail += 1,
                    _ => w.info += 1,
                }
                if kind == OpType::Ok {
                    if let Some(t0) = starts.get(op.p.as_str()) {
                        let us = op.t.saturating_sub(*t0) / 1000;
                        hists
                            .entry(op.f.clone())
                            .or_insert_with(|| {
                                Histogram::new_with_bounds(1, 3_600_000_000, 3)
                                    .expect("valid histogram bounds")
                            })
                            .saturating_record(us.max(1));
                    }
                }
            }
        }
    }
    r.unhealed = active.keys().cloned().collect();
    for (f, h) in hists {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        r.latency.insert(
            f,
            Latency {
                count: h.len(),
                p50_ms: ms(0.5),
                p95_ms: ms(0.95),
                p99_ms: ms(0.99),
                max_ms: h.max() as f64 / 1000.0,
            },
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds histories by hand: ops get increasing `i` and `t`.
    struct H(Vec<Op>);

    impl H {
        fn new() -> H {
            H(Vec::new())
        }
        fn push(&mut self, mut op: Op) -> u64 {
            op.i = self.0.len() as u64;
            op.t = op.i * 1000;
            self.0.push(op);
            self.0.len() as u64 - 1
        }
        fn put(&mut self, p: &str, key: &str, v: &str, ctx_src: Option<u64>, outcome: OpType) {
            let mut inv = Op::new(p, OpType::Invoke, "put").key(key).value(json!(v));
            inv.ctx_src = ctx_src;
            self.push(inv);
            self.push(Op::new(p, outcome, "put").key(key).value(json!(v)));
        }
        fn get(&mut self, p: &str, key: &str, vals: &[&str]) -> u64 {
            self.push(Op::new(p, OpType::Invoke, "get").key(key));
            self.push(Op::new(p, OpType::Ok, "get").key(key).value(json!(vals)))
        }
    }

    fn valid_history() -> H {
        let mut h = H::new();
        h.put("1", "k", "a", None, OpType::Ok);
        h.put("2", "k", "b", None, OpType::Ok);
        let g = h.get("1", "k", &["a", "b"]);
        h.put("1", "k", "c", Some(g), OpType::Ok);
        h.put("2", "k", "d", None, OpType::Fail);
        h.get("2", "k", &["c"]);
        h.get(FINAL, "k", &["c"]);
        h
    }

    #[test]
    fn a_valid_register_history_passes() {
        let r = check_register(&valid_history().0);
        assert!(r.valid, "{r:?}");
        assert_eq!((r.ok_writes, r.fail_writes, r.keys), (3, 1, 1));
    }

    #[test]
    fn a_lost_write_is_caught() {
        let mut h = H::new();
        h.put("1", "k", "a", None, OpType::Ok);
        h.put("2", "k", "b", None, OpType::Ok);
        h.get(FINAL, "k", &["b"]);
        let r = check_register(&h.0);
        assert_eq!(r.lost, vec!["k: a".to_string()]);
        assert!(!r.valid);
    }

    #[test]
    fn a_write_covered_only_by_an_unknown_write_is_excused_and_by_a_failed_one_is_lost() {
        let mut h = H::new();
        h.put("1", "k", "a", None, OpType::Ok);
        let g = h.get("2", "k", &["a"]);
        h.put("2", "k", "b", Some(g), OpType::Info);
        h.get(FINAL, "k", &["b"]);
        let r = check_register(&h.0);
        assert!(r.valid, "{r:?}");
        assert_eq!((r.excused_by_info, r.recovered), (1, 1));

        let mut h = H::new();
        h.put("1", "k", "a", None, OpType::Ok);
        let g = h.get("2", "k", &["a"]);
        h.put("2", "k", "b", Some(g), OpType::Fail);
        h.get(FINAL, "k", &[]);
        let r = check_register(&h.0);
        assert_eq!(
            r.lost,
            vec!["k: a".to_string()],
            "a fail coverer never excuses"
        );
    }

    #[test]
    fn phantoms_failed_and_future_values_are_caught() {
        let mut h = H::new();
        h.get("3", "k", &["ghost"]);
        h.put("1", "k", "x", None, OpType::Fail);
        h.get("3", "k", &["x"]);
        h.put("1", "other", "y", None, OpType::Ok);
        h.get("3", "k", &["y"]);
        let early = h.get("4", "k", &["z"]);
        let _ = early;
        h.put("1", "k", "z", None, OpType::Ok);
        h.get(FINAL, "k", &["z"]);
        h.get(FINAL, "other", &["y"]);
        let r = check_register(&h.0);
        assert_eq!(
            r.phantoms,
            vec![
                "k: ghost".to_string(),
                "k: y (written under other)".to_string()
            ]
        );
        assert_eq!(r.from_failed, vec!["k: x".to_string()]);
        assert_eq!(r.from_future, vec!["k: z".to_string()]);
        assert!(!r.valid);
    }

    /// With tombstone GC a delete's tombstone may be gone from the final state (purged), but
    /// what the delete superseded coming back is still a resurrection; without GC a missing
    /// tombstone is a lost write.
    #[test]
    fn a_purged_tombstone_is_no_loss_but_what_it_deleted_must_stay_away() {
        let tomb = "tomb:00000000000000aa:2";
        let history = |fin: &[&str]| {
            let mut h = H::new();
            h.put("1", "k", "a", None, OpType::Ok);
            let g = h.get("2", "k", &["a"]);
            let mut inv = Op::new("2", OpType::Invoke, "delete").key("k");
            inv.ctx_src = Some(g);
            h.push(inv);
            h.push(
                Op::new("2", OpType::Ok, "delete")
                    .key("k")
                    .value(json!(tomb)),
            );
            h.get(FINAL, "k", fin);
            h
        };
        let purged = history(&[]);
        assert_eq!(check_register(&purged.0).lost, vec![format!("k: {tomb}")]);
        let r = check_register_with(&purged.0, true);
        assert!(r.valid, "{r:?}");
        assert_eq!(r.purged_tombstones, 1);
        let back = history(&["a"]);
        let r = check_register_with(&back.0, true);
        assert_eq!(r.resurrected, vec!["k: a".to_string()]);
        assert!(!r.valid);
    }

    #[test]
    fn a_resurrected_value_is_caught() {
        let mut h = H::new();
        h.put("1", "k", "a", None, OpType::Ok);
        let g = h.get("2", "k", &["a"]);
        h.put("2", "k", "b", Some(g), OpType::Ok);
        h.get(FINAL, "k", &["a", "b"]);
        let r = check_register(&h.0);
        assert_eq!(r.resurrected, vec!["k: a".to_string()]);
        assert!(!r.valid);
    }

    /// A put acknowledged partly by fallbacks (sloppy quorum) may be missed by a later delete
    /// without context (its read asks primaries, and the put may sit on one primary and a
    /// fallback until the hint is replayed): surviving it is no resurrection. The same put
    /// acknowledged by primaries only must be gone.
    #[test]
    fn a_delete_without_context_may_miss_a_put_acknowledged_by_fallbacks() {
        let tomb = "tomb:00000000000000aa:1";
        for (fallback_acks, resurrected) in [(1u8, false), (0u8, true)] {
            let mut h = H::new();
            h.push(
                Op::new("1", OpType::Invoke, "put")
                    .key("k")
                    .value(json!("a")),
            );
            let mut done = Op::new("1", OpType::Ok, "put").key("k").value(json!("a"));
            done.fallback_acks = Some(fallback_acks);
            h.push(done);
            h.push(Op::new("2", OpType::Invoke, "delete").key("k"));
            h.push(
                Op::new("2", OpType::Ok, "delete")
                    .key("k")
                    .value(json!(tomb)),
            );
            h.get(FINAL, "k", &["a", tomb]);
            let r = check_register(&h.0);
            assert_eq!(
                !r.resurrected.is_empty(),
                resurrected,
                "{fallback_acks}: {r:?}"
            );
            assert!(r.lost.is_empty());
        }
    }

    /// A delete without context supersedes what its internal quorum read returns: every put
    /// acknowledged before it began (so such a value in the final state is a resurrection,
    /// e.g. a delete that covered only the coordinator's own copy), and maybe concurrent puts
    /// (whose absence is then no loss); a put acknowledged after it completed must survive.
    /// Regression (full profile, 2026-12-04, register pause+clock seed 24): a delete without
    /// context sent to a paused node timed out (info); the node ran it when it resumed, 6 s
    /// later, and it deleted two puts acknowledged after the client gave up. An unknown
    /// outcome may take effect at any later time: those puts are excused, not lost.
    #[test]
    fn a_timed_out_delete_without_context_may_cover_writes_made_after_it_gave_up() {
        let mut h = H::new();
        h.push(Op::new("2", OpType::Invoke, "delete").key("k"));
        h.push(Op::new("2", OpType::Info, "delete").key("k"));
        h.put("1", "k", "late", None, OpType::Ok);
        h.get(FINAL, "k", &["tomb:00000000000000aa:9"]);
        let r = check_register(&h.0);
        assert!(r.lost.is_empty(), "{r:?}");
        assert_eq!(r.excused_by_info, 1);
        // The same delete acknowledged before the put cannot cover it: lost.
        let mut h = H::new();
        h.push(Op::new("2", OpType::Invoke, "delete").key("k"));
        h.push(
            Op::new("2", OpType::Ok, "delete")
                .key("k")
                .value(json!("tomb:00000000000000aa:9")),
        );
        h.put("1", "k", "late", None, OpType::Ok);
        h.get(FINAL, "k", &["tomb:00000000000000aa:9"]);
        let r = check_register(&h.0);
        assert_eq!(r.lost, vec!["k: late".to_string()]);
    }

    #[test]
    fn deletes_without_context_cover_what_was_acknowledged_before_them() {
        let delete = |h: &mut H, p: &str, invoke_then: &dyn Fn(&mut H)| {
            h.push(Op::new(p, OpType::Invoke, "delete").key("k"));
            invoke_then(h);
            h.push(
                Op::new(p, OpType::Ok, "delete")
                    .key("k")
                    .value(json!("tomb:00000000000000aa:1")),
            );
        };
        // "a" was acknowledged before the delete: it must be gone.
        let mut h = H::new();
        let tomb = "tomb:00000000000000aa:1";
        h.put("1", "k", "a", None, OpType::Ok);
        delete(&mut h, "2", &|_| {});
        h.get(FINAL, "k", &["a", tomb]);
        let r = check_register(&h.0);
        assert_eq!(r.resurrected, vec!["k: a".to_string()]);
        assert!(!r.valid);
        // "b" ran concurrently with the delete: gone or present, both are fine.
        for fin in [&[tomb][..], &["b", tomb][..]] {
            let mut h = H::new();
            delete(&mut h, "2", &|h: &mut H| {
                h.put("1", "k", "b", None, OpType::Ok)
            });
            h.get(FINAL, "k", fin);
            let r = check_register(&h.0);
            assert!(r.valid, "final {fin:?}: {r:?}");
        }
        // "c" was acknowledged after the delete completed: it must survive.
        let mut h = H::new();
        delete(&mut h, "2", &|_| {});
        h.put("1", "k", "c", None, OpType::Ok);
        h.get(FINAL, "k", &[tomb]);
        let r = check_register(&h.0);
        assert_eq!(r.lost, vec!["k: c".to_string()]);
    }

    /// Found in review (2026-12-05): gaps that let a violation pass as valid.
    #[test]
    fn an_unknown_write_that_left_no_trace_excuses_nothing() {
        // b's outcome is unknown, but had it been applied b would be in the final state (or
        // superseded by a later write): it cannot be what removed the acknowledged a.
        let mut h = H::new();
        h.put("1", "k", "a", None, OpType::Ok);
        let g = h.get("2", "k", &["a"]);
        h.put("2", "k", "b", Some(g), OpType::Info);
        h.get(FINAL, "k", &[]);
        let r = check_register(&h.0);
        assert_eq!(r.lost, vec!["k: a".to_string()], "{r:?}");
        // The same with b seen by a read: excused (b was applied, then lost its own way or
        // was superseded).
        let mut h = H::new();
        h.put("1", "k", "a", None, OpType::Ok);
        let g = h.get("2", "k", &["a"]);
        h.put("2", "k", "b", Some(g), OpType::Info);
        let g2 = h.get("3", "k", &["b"]);
        h.put("3", "k", "c", Some(g2), OpType::Ok);
        h.get(FINAL, "k", &["c"]);
        let r = check_register(&h.0);
        assert!(r.valid, "{r:?}");
    }

    #[test]
    fn a_read_holding_a_value_twice_and_an_empty_run_are_not_valid() {
        let mut h = H::new();
        h.put("1", "k", "a", None, OpType::Ok);
        h.get("2", "k", &["a", "a"]);
        h.get(FINAL, "k", &["a"]);
        let r = check_register(&h.0);
        assert_eq!(r.duplicates.len(), 1, "{r:?}");
        assert!(!r.valid);
        let r = check_register(&[]);
        assert!(!r.valid && !r.inactive.is_empty(), "{r:?}");
        let r = check_set(&[]);
        assert!(!r.valid && !r.inactive.is_empty(), "{r:?}");
    }

    #[test]
    fn a_set_element_found_only_under_another_key_is_lost_there() {
        let mut h = H::new();
        h.push(
            Op::new("1", OpType::Invoke, "add")
                .key("s0")
                .value(json!("1")),
        );
        h.push(Op::new("1", OpType::Ok, "add").key("s0").value(json!("1")));
        for (key, vals) in [("s0", json!([])), ("s1", json!(["1"]))] {
            h.push(Op::new(FINAL, OpType::Invoke, "read").key(key));
            h.push(Op::new(FINAL, OpType::Ok, "read").key(key).value(vals));
        }
        let r = check_set(&h.0);
        assert_eq!(r.lost, vec!["s0: 1".to_string()], "{r:?}");
        assert_eq!(r.unexpected, vec!["s1: 1".to_string()], "{r:?}");
    }

    #[test]
    fn set_lost_add_unexpected_and_duplicates_are_caught() {
        let mut h = H::new();
        let add = |h: &mut H, p: &str, e: &str, outcome| {
            h.push(Op::new(p, OpType::Invoke, "add").key("s").value(json!(e)));
            h.push(Op::new(p, outcome, "add").key("s").value(json!(e)));
        };
        add(&mut h, "1", "1", OpType::Ok);
        add(&mut h, "2", "2", OpType::Ok);
        add(&mut h, "3", "3", OpType::Info);
        h.push(Op::new(FINAL, OpType::Invoke, "read").key("s"));
        h.push(
            Op::new(FINAL, OpType::Ok, "read")
                .key("s")
                .value(json!(["1,3", "1"])),
        );
        let r = check_set(&h.0);
        assert_eq!(r.lost, vec!["s: 2".to_string()]);
        assert_eq!(r.recovered, 1);
        assert!(!r.valid);

        let mut h2 = H::new();
        add(&mut h2, "1", "1", OpType::Ok);
        h2.push(Op::new(FINAL, OpType::Invoke, "read").key("s"));
        h2.push(
            Op::new(FINAL, OpType::Ok, "read")
                .key("s")
                .value(json!(["1,1,9"])),
        );
        let r = check_set(&h2.0);
        assert_eq!(r.duplicates.len(), 1);
        assert_eq!(r.unexpected, vec!["s: 9".to_string()]);
        assert!(!r.valid);

        let mut ok = H::new();
        add(&mut ok, "1", "1", OpType::Ok);
        add(&mut ok, "2", "2", OpType::Ok);
        ok.push(Op::new(FINAL, OpType::Invoke, "read").key("s"));
        ok.push(
            Op::new(FINAL, OpType::Ok, "read")
                .key("s")
                .value(json!(["1,2"])),
        );
        assert!(check_set(&ok.0).valid);
    }

    #[test]
    fn a_divergent_replica_is_caught() {
        let mut snaps = BTreeMap::new();
        snaps.insert(
            "k".to_string(),
            vec![
                ("n1".to_string(), vec!["a1=x".to_string()]),
                ("n2".to_string(), vec!["a1=x".to_string()]),
                (
                    "n3".to_string(),
                    vec!["a1=x".to_string(), "b1=y".to_string()],
                ),
                ("n4".to_string(), vec![]),
            ],
        );
        let r = check_convergence(&snaps, 3);
        assert!(!r.converged);
        assert_eq!(r.divergent.len(), 1);
        snaps.get_mut("k").unwrap()[2].1 = vec!["a1=x".to_string()];
        let r = check_convergence(&snaps, 3);
        assert!(r.converged, "{r:?}");
        snaps.get_mut("k").unwrap()[3].1 = vec!["a1=x".to_string()];
        let r = check_convergence(&snaps, 3);
        assert_eq!(r.wrong_holder_count.len(), 1, "a fourth holder with N=3");
    }

    #[test]
    fn a_key_no_replica_holds_is_converged_but_one_held_by_fewer_than_n_is_not() {
        // The CI failure of 2026-11-30: a key whose only operation was a read at the end of
        // the run is stored nowhere, and was reported as "held by 0 nodes".
        let nodes = |held: usize| -> Vec<(String, Vec<String>)> {
            (1..=5)
                .map(|i| {
                    let s = if i <= held {
                        vec!["a1=x".to_string()]
                    } else {
                        vec![]
                    };
                    (format!("n{i}"), s)
                })
                .collect()
        };
        let mut snaps = BTreeMap::new();
        snaps.insert("never-written".to_string(), nodes(0));
        snaps.insert("replicated".to_string(), nodes(3));
        let r = check_convergence(&snaps, 3);
        assert!(r.converged, "{r:?}");
        assert_eq!(r.converged_keys, 2);
        snaps.insert("under-replicated".to_string(), nodes(1));
        let r = check_convergence(&snaps, 3);
        assert!(!r.converged);
        assert_eq!(r.converged_keys, 2);
        assert_eq!(
            r.wrong_holder_count,
            vec!["under-replicated: held by 1 nodes, N=3".to_string()]
        );
    }

    /// The final read of `key` (process `final`) and each node's snapshot of it after.
    fn final_and_replicas(h: &mut H, key: &str, read: &[&str], held: &[(&str, &[&str])]) {
        h.push(Op::new(FINAL, OpType::Invoke, "get").key(key));
        h.push(
            Op::new(FINAL, OpType::Ok, "get")
                .key(key)
                .value(json!(read)),
        );
        for (node, siblings) in held {
            let mut op = Op::new(FINAL, OpType::Info, "replica_get")
                .key(key)
                .value(json!(siblings));
            op.node = Some(node.to_string());
            h.push(op);
        }
    }

    #[test]
    fn a_final_read_that_differs_from_its_converged_replicas_is_caught() {
        let mut h = H::new();
        let two = ["00000000000000aa:1=v1", "00000000000000bb:4=v2"];
        let tomb = ["00000000000000aa:7=⊥"];
        // Agrees: the read has both siblings the replicas hold, in another order.
        final_and_replicas(
            &mut h,
            "k1",
            &["v2", "v1"],
            &[("n1", &two), ("n2", &two), ("n3", &[])],
        );
        // The read missed a sibling every replica holds (a phantom it would hide).
        final_and_replicas(&mut h, "k2", &["v1"], &[("n1", &two), ("n2", &two)]);
        // The read returned a tombstone no replica holds any more.
        final_and_replicas(
            &mut h,
            "k3",
            &["tomb:00000000000000aa:7"],
            &[("n1", &[]), ("n2", &[])],
        );
        // The same tombstone, still held: agrees.
        final_and_replicas(
            &mut h,
            "k4",
            &["tomb:00000000000000aa:7"],
            &[("n1", &tomb), ("n2", &tomb)],
        );
        // Replicas that disagree are the convergence check's, not compared here.
        final_and_replicas(
            &mut h,
            "k5",
            &["v1"],
            &[("n1", &two), ("n2", &["00000000000000aa:1=v1"])],
        );
        let r = final_reads_against_replicas(&h.0, false);
        assert_eq!((r.compared, r.not_compared), (4, 1), "{r:?}");
        assert_eq!(r.differ.len(), 2, "{r:?}");
        assert!(r.differ[0].starts_with("k2: "), "{r:?}");
        assert!(r.differ[1].starts_with("k3: "), "{r:?}");
        // With tombstone GC a purged tombstone is no difference; a missed value still is.
        let r = final_reads_against_replicas(&h.0, true);
        assert_eq!(r.differ.len(), 1, "{r:?}");
        assert!(r.differ[0].starts_with("k2: "), "{r:?}");
    }

    #[test]
    fn a_fault_healed_without_an_observed_effect_is_reported() {
        let mut h = valid_history();
        for (fault, stop) in [
            (
                "partition-1",
                json!({"observed": true, "evidence": {"dropped_packets": 40}}),
            ),
            (
                "clock-2",
                json!({"observed": false, "evidence": {"clock": {"n2": {"set_s": 30, "seen_s": 0.1}}}}),
            ),
            // A stop that records nothing (an old runner, or one that skipped observing).
            ("kill-3", json!({})),
        ] {
            let kind = fault.split('-').next().unwrap();
            h.push(
                Op::new(NEMESIS, OpType::Info, kind)
                    .value(json!({"phase": "start", "fault": fault})),
            );
            let mut v = stop;
            v["phase"] = json!("stop");
            v["fault"] = json!(fault);
            h.push(Op::new(NEMESIS, OpType::Info, kind).value(v));
        }
        let a = availability(&h.0);
        assert_eq!(a.observed, 1);
        assert_eq!(a.unobserved.len(), 2, "{:?}", a.unobserved);
        assert!(
            a.unobserved[0].starts_with("clock-2: ") && a.unobserved[0].contains("\"seen_s\":0.1"),
            "{:?}",
            a.unobserved
        );
        assert_eq!(a.unobserved[1], "kill-3: none recorded");
        assert!(a.unhealed.is_empty());
    }

    #[test]
    fn availability_splits_outcomes_by_fault_window_and_reports_unhealed() {
        let mut h = valid_history();
        h.push(
            Op::new(NEMESIS, OpType::Info, "kill")
                .value(json!({"phase": "start", "fault": "kill-1"})),
        );
        h.put("1", "k", "e", None, OpType::Info);
        h.push(
            Op::new(NEMESIS, OpType::Info, "kill")
                .value(json!({"phase": "stop", "fault": "kill-1"})),
        );
        h.push(
            Op::new(NEMESIS, OpType::Info, "pause")
                .value(json!({"phase": "start", "fault": "pause-2"})),
        );
        let a = availability(&h.0);
        assert_eq!(
            a.windows["kill"],
            WindowStats {
                ok: 0,
                fail: 0,
                info: 1
            }
        );
        assert_eq!(a.windows["healthy"].ok, 5);
        assert_eq!(a.unhealed, vec!["pause-2".to_string()]);
        assert!(a.latency["put"].count >= 2);
    }
}
