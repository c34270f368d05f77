//! One test run: start a cluster of real nodes, drive concurrent clients, inject faults, heal,
//! let the cluster settle, snapshot every replica, read everything back, check, report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use ringkv_client::{Client, ClientConfig, Context, GetOptions, PutOptions, Read};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Mutex;

use crate::checker::{self, FINAL, NEMESIS, TOMB};
use crate::cluster::Cluster;
use crate::history::{Op, OpType, Recorder};
use crate::nemesis::{self, Kind};
use crate::observe;
use crate::process::NodeProcess;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Read / read-modify-write / blind write / delete on rotating keys, with contexts.
    Register,
    /// Adds to a set stored as siblings, by read-merge-write.
    Set,
}

impl Workload {
    pub fn parse(s: &str) -> Result<Workload, String> {
        match s {
            "register" => Ok(Workload::Register),
            "set" => Ok(Workload::Set),
            other => Err(format!(
                "unknown workload {other:?}: expected register or set"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub workload: Workload,
    pub nemeses: Vec<&'static str>,
    #[serde(skip)]
    pub kinds: Vec<Kind>,
    pub time_limit_s: u64,
    pub nodes: usize,
    pub concurrency: usize,
    pub seed: u64,
    #[serde(skip)]
    pub out: PathBuf,
    /// Mean fault and heal durations (each randomised between 0 and 2×).
    pub interval_s: u64,
    /// Quiet period after healing, before the replica snapshot.
    pub quiet_s: u64,
    /// Ops per second per client process (approximate).
    pub rate: f64,
    /// Nodes on their own addresses in the harness's network namespace.
    pub netns: bool,
    pub n: u8,
    /// The nodes' `--sync` mode.
    pub sync: String,
    /// The nodes' `--read-fanout` (quorum: R replicas and spares; all: every live replica).
    pub read_fanout: String,
    /// No read repair and no hinted handoff on the nodes, anti-entropy every 2 s: the replicas
    /// must converge before the final reads, by anti-entropy alone.
    pub anti_entropy_only: bool,
    /// Tombstone GC during the run (`--tombstone-settle-secs` on the nodes, passes every 2 s).
    pub tombstone_settle_s: Option<u64>,
    /// Two nemesis lanes, so up to two faults are active at once (on different nodes, at
    /// most one on the network; never a lost disk or a ring change).
    pub overlap: bool,
}

/// Client request deadline; the server gets it as its deadline, and the client waits a little
/// longer, so definite answers arrive before the client gives up.
pub const CLIENT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the final phase waits for every node to see every other one alive.
pub const HEAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Node flags of an anti-entropy-only run.
pub const AAE_ONLY_FLAGS: [&str; 6] = [
    "--read-repair",
    "false",
    "--hinted-handoff",
    "false",
    "--aae-interval-secs",
    "2",
];
/// How long the final phase waits for a node restarted on a wiped disk to be synced.
pub const FINAL_SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long convergence is polled after the final reads.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize)]
pub struct Results {
    pub config: RunConfig,
    pub valid: bool,
    /// Why the run is invalid, one line per failed check; empty = valid.
    pub invalid_reasons: Vec<String>,
    pub ops: usize,
    pub register: Option<checker::RegisterReport>,
    pub set: Option<checker::SetReport>,
    /// Replicas right after the quiet period, before any read (read repair would hide gaps).
    pub convergence_before_reads: checker::ConvergenceReport,
    /// Replicas after the final R=N reads (read repair) settled.
    pub convergence: checker::ConvergenceReport,
    pub converged_after_heal_ms: Option<u64>,
    /// The final reads against what the converged replicas hold.
    pub final_agreement: checker::FinalAgreement,
    pub availability: checker::AvailabilityReport,
    pub nemesis_errors: Vec<String>,
    /// Tombstones purged by all nodes during the run, and still held at its end.
    pub tombstones_purged: u64,
    pub tombstones_live: u64,
    /// Answers to peers' exchanges, transfers and hand-overs the nodes held back by their own
    /// load (`aae.serve_rests`, since each node's last start).
    pub aae_serve_rests: u64,
}

fn ctx_token(c: &Context) -> String {
    URL_SAFE_NO_PAD.encode(c.as_bytes())
}

/// Sibling values as recorded: live values as strings, tombstones as `tomb:<actor>:<counter>`.
fn sibling_values(read: &Read) -> Vec<String> {
    read.siblings
        .iter()
        .map(|s| match &s.value {
            Some(v) => String::from_utf8_lossy(v).into_owned(),
            None => format!("{TOMB}{:016x}:{}", s.dot.0, s.dot.1),
        })
        .collect()
}

fn classify(e: &ringkv_client::Error, is_write: bool) -> OpType {
    if !is_write || e.is_definite() {
        OpType::Fail
    } else {
        OpType::Info
    }
}

struct Shared {
    rec: Recorder,
    clients: Vec<Client>,
    node_names: Vec<String>,
    /// Per node: until when the client processes send it nothing, since it answered
    /// `NotServing` (a ring change took it out, or it does not know the ring yet).
    not_serving: std::sync::Mutex<Vec<Option<Instant>>>,
    stop: AtomicBool,
    ops_done: AtomicU64,
    keys: Mutex<BTreeSet<String>>,
}

/// A client process: runs ops until stopped; retires (p += concurrency) after an `info`.
async fn client_loop(shared: Arc<Shared>, cfg: Arc<RunConfig>, worker: usize) {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ (0x9E37_79B9 * (worker as u64 + 1)));
    let mut p = worker;
    let mut seq = 0u64;
    let gap_ms = (1000.0 / cfg.rate.max(0.1)) as u64;
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..=2 * gap_ms))).await;
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        seq += 1;
        let node = shared.pick_node(&mut rng);
        let outcome = match cfg.workload {
            Workload::Register => register_op(&shared, &mut rng, p, seq, node).await,
            Workload::Set => set_op(&shared, &mut rng, p, seq, node).await,
        };
        shared.ops_done.fetch_add(1, Ordering::Relaxed);
        if outcome == OpType::Info {
            p += cfg.concurrency;
        }
    }
}

/// How long the client processes leave a node alone after it answered `NotServing`; then
/// one operation asks it again.
const NOT_SERVING_BACKOFF: Duration = Duration::from_secs(5);

impl Shared {
    /// A random node for the next operation, among those that did not answer `NotServing`
    /// in the last `NOT_SERVING_BACKOFF` (any node when none is left): applications send
    /// elsewhere what such a node refuses (the client library fails over), and operations sent
    /// to it would only record its refusal.
    fn pick_node(&self, rng: &mut StdRng) -> usize {
        let now = Instant::now();
        let avoided = self.not_serving.lock().expect("not-serving lock");
        let serving: Vec<usize> = (0..self.clients.len())
            .filter(|&i| avoided[i].is_none_or(|until| until <= now))
            .collect();
        if serving.is_empty() {
            rng.random_range(0..self.clients.len())
        } else {
            serving[rng.random_range(0..serving.len())]
        }
    }

    /// Notes an operation's error from `node`: a `NotServing` node is left alone a while.
    fn note_error(&self, node: usize, e: &ringkv_client::Error) {
        if e.kind() == Some(ringkv_client::ErrorKind::NotServing) {
            self.not_serving.lock().expect("not-serving lock")[node] =
                Some(Instant::now() + NOT_SERVING_BACKOFF);
        }
    }
}

fn write_opts() -> PutOptions {
    PutOptions {
        timeout: Some(CLIENT_TIMEOUT),
        ..Default::default()
    }
}

fn read_opts() -> GetOptions {
    GetOptions {
        timeout: Some(CLIENT_TIMEOUT),
        ..Default::default()
    }
}

/// A recorded get; returns the completion op index and the read on success.
async fn recorded_get(
    shared: &Shared,
    p: usize,
    key: &str,
    node: usize,
    f: &str,
) -> Option<(u64, Read)> {
    let mut inv = Op::new(p.to_string(), OpType::Invoke, f).key(key);
    inv.node = Some(shared.node_names[node].clone());
    shared.rec.record(inv);
    match shared.clients[node].get_with(key, read_opts()).await {
        Ok(read) => {
            let done = shared.rec.record(
                Op::new(p.to_string(), OpType::Ok, f)
                    .key(key)
                    .value(json!(sibling_values(&read))),
            );
            Some((done.i, read))
        }
        Err(e) => {
            shared.note_error(node, &e);
            let mut done = Op::new(p.to_string(), OpType::Fail, f).key(key);
            done.err = Some(e.to_string());
            shared.rec.record(done);
            None
        }
    }
}

async fn register_op(shared: &Shared, rng: &mut StdRng, p: usize, seq: u64, node: usize) -> OpType {
    // Five keys active at a time; the window moves every 150 ops, so keys get fresh histories.
    let base = shared.ops_done.load(Ordering::Relaxed) / 150;
    let key = format!("r{}", base + rng.random_range(0..5u64));
    shared.keys.lock().await.insert(key.clone());
    let dice = rng.random_range(0..100);
    if dice < 40 {
        return match recorded_get(shared, p, &key, node, "get").await {
            Some(_) => OpType::Ok,
            None => OpType::Fail,
        };
    }
    // Writes: read-modify-write (40%), delete with the read's context (5%), delete without a
    // context (5%: the node deletes what a quorum read returns), blind put (10%).
    let (ctx, ctx_src) = if dice < 85 {
        match recorded_get(shared, p, &key, node, "get").await {
            Some((i, read)) => (Some(read.context), Some(i)),
            None => return OpType::Fail,
        }
    } else {
        (None, None)
    };
    let is_delete = (80..90).contains(&dice);
    let f = if is_delete { "delete" } else { "put" };
    let value = format!("{key}:{p}:{seq}");
    let mut inv = Op::new(p.to_string(), OpType::Invoke, f).key(&key);
    if !is_delete {
        inv.value = Some(json!(value));
    }
    inv.ctx = ctx.as_ref().map(ctx_token);
    inv.ctx_src = ctx_src;
    inv.node = Some(shared.node_names[node].clone());
    shared.rec.record(inv);
    let client = &shared.clients[node];
    let result = if is_delete {
        client.delete_with(&key, ctx.as_ref(), write_opts()).await
    } else {
        client
            .put_with(&key, value.clone(), ctx.as_ref(), write_opts())
            .await
    };
    match result {
        Ok(w) => {
            let v = if is_delete {
                json!(format!("{TOMB}{:016x}:{}", w.dot.0, w.dot.1))
            } else {
                json!(value)
            };
            let mut done = Op::new(p.to_string(), OpType::Ok, f).key(&key).value(v);
            done.fallback_acks = Some(w.fallback_acks);
            shared.rec.record(done);
            OpType::Ok
        }
        Err(e) => {
            shared.note_error(node, &e);
            let kind = classify(&e, true);
            let mut done = Op::new(p.to_string(), kind, f).key(&key);
            if !is_delete {
                done.value = Some(json!(value));
            }
            done.err = Some(e.to_string());
            done.definite = Some(e.is_definite());
            shared.rec.record(done);
            kind
        }
    }
}

async fn set_op(shared: &Shared, rng: &mut StdRng, p: usize, seq: u64, node: usize) -> OpType {
    let key = format!("s{}", rng.random_range(0..2u64));
    shared.keys.lock().await.insert(key.clone());
    if rng.random_range(0..100) < 20 {
        return match recorded_get(shared, p, &key, node, "read").await {
            Some(_) => OpType::Ok,
            None => OpType::Fail,
        };
    }
    let element = format!("{p}-{seq}");
    let mut inv = Op::new(p.to_string(), OpType::Invoke, "add")
        .key(&key)
        .value(json!(element));
    inv.node = Some(shared.node_names[node].clone());
    shared.rec.record(inv);
    let client = &shared.clients[node];
    // Read-merge-write: the union of every sibling's elements plus the new one, written with
    // the read's context (it resolves the siblings it saw).
    let result = async {
        let read = client.get_with(&key, read_opts()).await?;
        let mut elems: BTreeSet<String> = BTreeSet::new();
        for s in sibling_values(&read)
            .iter()
            .filter(|v| !v.starts_with(TOMB))
        {
            elems.extend(checker::set_elements(s));
        }
        elems.insert(element.clone());
        let joined: Vec<String> = elems.into_iter().collect();
        client
            .put_with(&key, joined.join(","), Some(&read.context), write_opts())
            .await
    }
    .await;
    match result {
        Ok(_) => {
            shared.rec.record(
                Op::new(p.to_string(), OpType::Ok, "add")
                    .key(&key)
                    .value(json!(element)),
            );
            OpType::Ok
        }
        Err(e) => {
            // The read may have failed (definite: nothing written) or the put (per its class).
            shared.note_error(node, &e);
            let kind = classify(&e, true);
            let mut done = Op::new(p.to_string(), kind, "add")
                .key(&key)
                .value(json!(element));
            done.err = Some(e.to_string());
            done.definite = Some(e.is_definite());
            shared.rec.record(done);
            kind
        }
    }
}

/// What the active faults hold: nodes, and the network (at most one fault on links at a
/// time). With `--overlap` two nemesis lanes share it, so their faults never act on the same
/// node (one lane's heal would undo the other's fault: a restart of a node still meant to be
/// down, a flush of the other's rules).
#[derive(Debug, Default)]
pub struct Busy {
    nodes: BTreeSet<usize>,
    network: bool,
}

impl Busy {
    /// The nodes a fault of `kind` may take (`None`: it cannot start now).
    fn free_for(&self, kind: Kind, n: usize) -> Option<Vec<usize>> {
        let free: Vec<usize> = (0..n).filter(|i| !self.nodes.contains(i)).collect();
        if !kind.on_nodes() {
            // A network fault may cut any link, and must cut one between free nodes.
            return (!self.network).then_some(free);
        }
        (!free.is_empty()).then_some(free)
    }

    fn take(&mut self, kind: Kind, held: &[usize]) {
        self.network |= !kind.on_nodes();
        self.nodes.extend(held);
    }

    fn release(&mut self, kind: Kind, held: &[usize]) {
        if !kind.on_nodes() {
            self.network = false;
        }
        for i in held {
            self.nodes.remove(i);
        }
    }
}

/// Fault then heal, each lasting a random 0–2× `interval`, until `deadline`, each fault one
/// of `kinds` (`Kind::lanes`). `lane` 0 is the only one, or with `--overlap` one of two whose
/// faults overlap in time (`busy` keeps them off each other's nodes; `count` numbers the
/// faults of both).
#[allow(clippy::too_many_arguments)]
async fn nemesis_loop(
    shared: Arc<Shared>,
    cfg: Arc<RunConfig>,
    nodes: Arc<Mutex<Vec<NodeProcess>>>,
    ips: Vec<String>,
    deadline: Instant,
    errors: Arc<Mutex<Vec<String>>>,
    (lane, kinds): (u64, Vec<Kind>),
    busy: Arc<Mutex<Busy>>,
    counter: Arc<AtomicU64>,
) {
    if kinds.is_empty() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0xDEAD_BEEF ^ lane);
    let interval = Duration::from_secs(cfg.interval_s.max(1));
    let clock_dir = cfg.out.join("nodes");
    // Leaves so far: every other one (the first included) is paused after its switch. Joins
    // so far: every other one (the first included) is aborted, its new node killed.
    let (mut leaves, mut joins) = (0, 0);
    let mut cycle: Vec<Kind> = Vec::new();
    loop {
        let wait = interval.mul_f64(rng.random_range(0.0..2.0));
        if Instant::now() + wait >= deadline {
            break;
        }
        tokio::time::sleep(wait).await;
        // Every kind once, in a random order, before any repeats: a short run still sees each
        // of its faults.
        if cycle.is_empty() {
            cycle = kinds.clone();
            for i in (1..cycle.len()).rev() {
                cycle.swap(i, rng.random_range(0..=i));
            }
        }
        let kind = cycle.pop().expect("refilled above");
        if kind == Kind::Wipe {
            // One lost disk at a time: the previous one must be repaired first.
            if let Err(e) = wait_all_synced(&nodes, Duration::from_secs(60)).await {
                errors.lock().await.push(format!("wipe not started: {e}"));
                continue;
            }
        }
        let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let fault = format!("{}-{count}", kind.name());
        let started = if kind == Kind::Membership {
            match membership_start(&nodes, &busy, &mut rng, &mut leaves, &mut joins).await {
                Ok(Ok(started)) => Ok(started),
                // The cluster refused (correctly: a node just killed, a claimant that changed)
                // or no change is possible: recorded, not an error.
                Ok(Err(reason)) => {
                    shared.rec.record(
                        Op::new(NEMESIS, OpType::Info, kind.name())
                            .value(json!({"phase": "skipped", "fault": fault, "reason": reason})),
                    );
                    continue;
                }
                Err(e) => Err(e),
            }
        } else {
            let mut held = busy.lock().await;
            let mut ns = nodes.lock().await;
            let Some(free) = held.free_for(kind, ns.len()) else {
                // The other lane's faults hold every node, or the network: skipped.
                shared
                    .rec
                    .record(Op::new(NEMESIS, OpType::Info, kind.name()).value(
                    json!({"phase": "skipped", "fault": fault, "reason": "held by another fault"}),
                ));
                continue;
            };
            let started = nemesis::start(kind, &mut ns, &ips, &clock_dir, &mut rng, &free);
            if let Ok((active, _)) = &started {
                held.take(kind, &active.nodes());
            }
            started
        };
        let (active, paused_leaver, change) = match started {
            Ok((active, mut value)) => {
                let paused = value["paused_after_switch"] == json!(true);
                value["phase"] = json!("start");
                value["fault"] = json!(fault);
                shared
                    .rec
                    .record(Op::new(NEMESIS, OpType::Info, kind.name()).value(value.clone()));
                (active, paused, value)
            }
            Err(e) => {
                errors.lock().await.push(format!("{fault}: {e}"));
                continue;
            }
        };
        let baseline = observe::baseline(&active, &nodes.lock().await).await;
        let hold = interval.mul_f64(rng.random_range(0.2..2.0));
        let until = (Instant::now() + hold).min(deadline);
        let mut phase = false;
        while Instant::now() < until {
            let step = until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            tokio::time::sleep(step).await;
            if matches!(active, nemesis::Active::Strobing(_)) {
                let ns = nodes.lock().await;
                if let Err(e) = nemesis::strobe_tick(&active, &ns, &clock_dir, phase) {
                    errors.lock().await.push(format!("{fault}: {e}"));
                }
                phase = !phase;
            }
        }
        if let nemesis::Active::Retired(idx) = &active {
            if paused_leaver {
                tokio::time::sleep(PAUSED_LEAVER_HOLD).await;
                for &i in idx {
                    nodes.lock().await[i].send_signal(libc::SIGCONT);
                }
                shared.rec.record(
                    Op::new(NEMESIS, OpType::Info, kind.name())
                        .value(json!({"phase": "resumed-after-switch", "fault": fault})),
                );
                // Its hand-over pass starts 5 s after every member has the layout.
                tokio::time::sleep(Duration::from_secs(8)).await;
            }
            // The node taken out is a source of its change's transfers: wait for them first.
            if let Err(e) = wait_no_transition(&nodes, Duration::from_secs(90)).await {
                errors.lock().await.push(format!("healing {fault}: {e}"));
            }
            // An operator who forgot the wipe: the node taken out starts again on its old data
            // (a removed one's dates from before it was killed; tombstones purged since must
            // not come back through it), and runs a while before `heal` wipes it.
            if !idx.is_empty() {
                let restarted: Result<Vec<String>, String> = {
                    let mut ns = nodes.lock().await;
                    idx.iter()
                        .map(|&i| {
                            ns[i].kill9();
                            ns[i].start().map(|()| ns[i].id.clone())
                        })
                        .collect()
                };
                match restarted {
                    Ok(ids) => {
                        shared
                            .rec
                            .record(Op::new(NEMESIS, OpType::Info, kind.name()).value(
                                json!({"phase": "restarted-unwiped", "fault": fault, "nodes": ids}),
                            ));
                        tokio::time::sleep(STALE_RESTART_HOLD).await;
                    }
                    Err(e) => errors
                        .lock()
                        .await
                        .push(format!("{fault}: restart with old data: {e}")),
                }
            }
        }
        // What the fault did, seen before it is undone (checker::unobserved_faults).
        let effect = if let nemesis::Active::Retired(_) = &active {
            observe_change(&nodes, &change).await
        } else {
            observe::observe(&active, &nodes.lock().await, &baseline).await
        };
        let held = active.nodes();
        let healed = {
            let mut ns = nodes.lock().await;
            nemesis::heal(active, &mut ns, &clock_dir)
        };
        busy.lock().await.release(kind, &held);
        if let Err(e) = healed {
            errors.lock().await.push(format!("healing {fault}: {e}"));
        }
        shared
            .rec
            .record(Op::new(NEMESIS, OpType::Info, kind.name()).value(json!({
                "phase": "stop",
                "fault": fault,
                "observed": effect.observed,
                "evidence": effect.evidence,
            })));
        if Instant::now() >= deadline {
            break;
        }
    }
}

/// The effect of a ring change, seen in the layout the cluster reports: a joined node is an
/// owner, a node taken out (left or removed) no longer is, and after an abort no change runs
/// and the node that was to join is retired, not an owner.
async fn observe_change(
    nodes: &Mutex<Vec<NodeProcess>>,
    change: &serde_json::Value,
) -> observe::Effect {
    let action = change["action"].as_str().unwrap_or_default().to_string();
    let id = change["nodes"][0].as_str().unwrap_or_default().to_string();
    observe::until_observed(observe::CHANGE_WAIT, || async {
        let addrs = running_addrs(nodes).await;
        match cluster_admin(&addrs, json!("Status")).await {
            Ok(st) => {
                let layout = &st["Status"]["layout"];
                let owner = layout["current"]
                    .as_object()
                    .is_some_and(|o| o.contains_key(&id));
                let retired = layout["retired"]
                    .as_array()
                    .is_some_and(|r| r.contains(&json!(id)));
                // It owned ranges when the change began: not owning any is the change done.
                observe::Effect {
                    observed: match action.as_str() {
                        "join" => owner,
                        "abort" => !owner && retired && layout["next"].is_null(),
                        _ => !owner,
                    },
                    evidence: json!({
                        "action": action,
                        "node": id,
                        "layout": layout["version"],
                        "owner": owner,
                        "retired": retired,
                    }),
                }
            }
            Err(e) => observe::Effect {
                observed: false,
                evidence: json!({"action": action, "node": id, "error": e}),
            },
        }
    })
    .await
}

/// An admin request (`kvctl cluster`'s JSON) through any running node; the reply, or the
/// error message (an `Error` reply included).
async fn cluster_admin(
    addrs: &[String],
    req: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let client = Client::new(
        addrs.to_vec(),
        ClientConfig {
            request_timeout: Duration::from_secs(10),
            ..ClientConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let reply = client
        .cluster(serde_json::to_vec(&req).expect("a request serializes"))
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&reply).map_err(|e| e.to_string())?;
    match v.get("Error") {
        Some(e) => Err(e["message"].as_str().unwrap_or("").to_string()),
        None => Ok(v),
    }
}

/// Waits until no running node holds a hint (`hints.pending_keys` is 0 on each).
async fn wait_hints_drained(
    nodes: &Mutex<Vec<NodeProcess>>,
    timeout: Duration,
) -> Result<(), String> {
    let running: Vec<(String, String)> = nodes
        .lock()
        .await
        .iter()
        .filter(|n| n.child_running())
        .map(|n| (n.id.clone(), n.addr.clone()))
        .collect();
    crate::cluster::wait_metric_zero(&running, "hints.pending_keys", "holding hints", timeout).await
}

/// Waits until no node is still syncing a new data dir (`cluster::wait_nodes_synced`).
async fn wait_all_synced(nodes: &Mutex<Vec<NodeProcess>>, timeout: Duration) -> Result<(), String> {
    crate::cluster::wait_nodes_synced(&ids_and_addrs(nodes).await, timeout).await
}

/// Every node's (id, client address).
async fn ids_and_addrs(nodes: &Mutex<Vec<NodeProcess>>) -> Vec<(String, String)> {
    nodes
        .lock()
        .await
        .iter()
        .map(|n| (n.id.clone(), n.addr.clone()))
        .collect()
}

async fn running_addrs(nodes: &Mutex<Vec<NodeProcess>>) -> Vec<String> {
    nodes
        .lock()
        .await
        .iter()
        .filter(|n| n.child_running())
        .map(|n| n.addr.clone())
        .collect()
}

/// Waits until the layout has no transition (a plan's transfers are done).
async fn wait_no_transition(
    nodes: &Mutex<Vec<NodeProcess>>,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let start = Instant::now();
    loop {
        let addrs = running_addrs(nodes).await;
        match cluster_admin(&addrs, json!("Status")).await {
            Ok(st) if st["Status"]["layout"]["next"].is_null() => return Ok(st),
            Ok(_) | Err(_) if start.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Ok(st) => {
                return Err(format!(
                    "a ring change still running after {timeout:?}: {}",
                    st["Status"]["layout"]
                ))
            }
            Err(e) => return Err(format!("cluster status: {e}")),
        }
    }
}

/// How long a node taken out of the ring runs on its old data before the heal wipes it.
const STALE_RESTART_HOLD: Duration = Duration::from_secs(4);

/// The membership nemesis: once no ring change runs, join a node that owns nothing (taken out
/// earlier, wiped and restarted; every other join, the first included, is aborted: the new
/// node is killed at once, during its transfers, and `kvctl cluster abort` gives the ring
/// back as it was, the node retired and forfeited), or, with more than N owners, take a
/// random owner out: leave
/// (it hands its data off; every other leaver, the first included, is paused as soon as the
/// switch retires it, and resumed after `PAUSED_LEAVER_HOLD`), or kill -9 and remove (its ranges re-replicated from
/// the others). Staged and committed through the claimant, like `kvctl cluster`.
/// `Ok(Err(reason))`: skipped (the cluster refused the change, or none is possible);
/// `Err`: the harness could not do its part (a ring change stuck, no node reachable).
async fn membership_start(
    nodes: &Mutex<Vec<NodeProcess>>,
    busy: &Mutex<Busy>,
    rng: &mut StdRng,
    leaves: &mut usize,
    joins: &mut usize,
) -> Result<Result<(nemesis::Active, serde_json::Value), String>, String> {
    let st = wait_no_transition(nodes, Duration::from_secs(60)).await?;
    let layout = &st["Status"]["layout"];
    let owners: Vec<String> = layout["current"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let ids: Vec<(usize, String, bool)> = nodes
        .lock()
        .await
        .iter()
        .enumerate()
        .map(|(i, n)| (i, n.id.clone(), n.child_running()))
        .collect();
    let addrs = running_addrs(nodes).await;
    let stage_commit = |change: serde_json::Value| {
        let addrs = addrs.clone();
        async move {
            cluster_admin(&addrs, json!({"Stage": change})).await?;
            cluster_admin(&addrs, json!({"Commit": {"plan": null}})).await
        }
    };
    // A running node that owns nothing joins first.
    if let Some((joiner, id, _)) = ids.iter().find(|(_, id, up)| *up && !owners.contains(id)) {
        let committed = match stage_commit(json!({"Join": {"node": id, "vnodes": 256}})).await {
            Ok(c) => c,
            Err(refused) => {
                let _ = cluster_admin(&addrs, json!("Clear")).await;
                return Ok(Err(format!("join {id}: {refused}")));
            }
        };
        let abort = joins.is_multiple_of(2);
        *joins += 1;
        if !abort {
            let v = json!({"action": "join", "nodes": [id], "layout": committed["Committed"]["version"]});
            return Ok(Ok((nemesis::Active::Retired(Vec::new()), v)));
        }
        // The new node dies during its transfers; the operator aborts the change. Held from
        // its kill (the other lane's faults leave it alone) until the fault's end, or until
        // it is started again below.
        busy.lock().await.take(Kind::Membership, &[*joiner]);
        nodes.lock().await[*joiner].kill9();
        if let Err(e) = wait_seen_down(nodes, &addrs, *joiner, id).await {
            busy.lock().await.release(Kind::Membership, &[*joiner]);
            return Err(e);
        }
        let reply = cluster_admin(&addrs, json!("Abort")).await;
        // Answered, the abort took effect (whatever the node asked next sees: across a
        // partition of the other lane it may still have the transition). Refused (the voters
        // did not grant it, or the change had switched), it did not. Without an answer, the
        // layout says, once the node asked has it (up to `CHANGE_WAIT`): aborted, the node is
        // retired and forfeited, and must be wiped like any node taken out; else (ownership
        // switched first, or the change still runs) it is started again: an owner like any,
        // or the gainer that completes the change.
        let answered = reply.as_ref().is_ok_and(|r| r["Aborted"].is_object());
        let refused = matches!(&reply, Err(e) if e.contains("abort --force")
            || e.contains("no ring change is running")
            || e.contains("nothing to abort"));
        let start = Instant::now();
        let layout = loop {
            let layout = match cluster_admin(&addrs, json!("Status")).await {
                Ok(st) => st["Status"]["layout"].clone(),
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    busy.lock().await.release(Kind::Membership, &[*joiner]);
                    nodes.lock().await[*joiner].start()?;
                    return Err(format!("abort after join {id}: {reply:?}; status: {e}"));
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let seen = layout["next"].is_null()
                && layout["retired"]
                    .as_array()
                    .is_some_and(|r| r.contains(&json!(id)));
            if answered || refused || seen || start.elapsed() > observe::CHANGE_WAIT {
                break layout;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let aborted = answered
            || !refused
                && layout["next"].is_null()
                && layout["retired"]
                    .as_array()
                    .is_some_and(|r| r.contains(&json!(id)));
        if !aborted {
            busy.lock().await.release(Kind::Membership, &[*joiner]);
            nodes.lock().await[*joiner].start()?;
            return Ok(Err(format!("abort after join {id}: {reply:?}")));
        }
        return Ok(Ok((
            nemesis::Active::Retired(vec![*joiner]),
            json!({"action": "abort", "nodes": [id],
                   "layout": if answered { &reply.as_ref().expect("answered")["Aborted"]["version"] } else { &layout["version"] },
                   "committed": committed["Committed"]["version"],
                   "reply": reply.unwrap_or_else(|e| json!(e))}),
        )));
    }
    let candidates: Vec<&(usize, String, bool)> = ids
        .iter()
        .filter(|(_, id, up)| *up && owners.contains(id))
        .collect();
    if owners.len() <= 3 || candidates.is_empty() {
        return Ok(Err(format!(
            "no ring change possible ({} owners)",
            owners.len()
        )));
    }
    let (victim, id, _) = candidates[rng.random_range(0..candidates.len())].clone();
    // Held (the other lane's faults leave it alone) until the fault's end: it may be killed,
    // paused, or taken out and wiped.
    busy.lock().await.take(Kind::Membership, &[victim]);
    let (action, change) = if rng.random_range(0..2) == 0 {
        ("leave", json!({"Leave": {"node": id}}))
    } else {
        nodes.lock().await[victim].kill9();
        // The claimant must see it down before it can be removed.
        if let Err(e) = wait_seen_down(nodes, &addrs, victim, &id).await {
            busy.lock().await.release(Kind::Membership, &[victim]);
            return Err(e);
        }
        ("remove", json!({"Remove": {"node": id}}))
    };
    let committed = match stage_commit(change).await {
        Ok(c) => c,
        Err(refused) => {
            let _ = cluster_admin(&addrs, json!("Clear")).await;
            let mut ns = nodes.lock().await;
            if !ns[victim].child_running() {
                ns[victim].start()?;
            }
            busy.lock().await.release(Kind::Membership, &[victim]);
            return Ok(Err(format!("{action} {id}: {refused}")));
        }
    };
    let mut v =
        json!({"action": action, "nodes": [id], "layout": committed["Committed"]["version"]});
    // Every other leave (the first included): the leaver is paused as soon as the switch
    // retires it, before its hand-over pass (which waits 5 s), and resumed only after a hold
    // long enough for the tombstones of keys deleted meanwhile to be purged, were GC not
    // waiting for it; resumed, it hands over copies that predate those deletes.
    let pause = action == "leave" && leaves.is_multiple_of(2);
    if action == "leave" {
        *leaves += 1;
    }
    if pause {
        let victim_addr = nodes.lock().await[victim].addr.clone();
        let others: Vec<String> = addrs.into_iter().filter(|a| *a != victim_addr).collect();
        let start = Instant::now();
        loop {
            let retired = cluster_admin(&others, json!("Status"))
                .await
                .map(|st| {
                    st["Status"]["layout"]["retired"]
                        .as_array()
                        .is_some_and(|r| r.contains(&json!(id)))
                })
                .unwrap_or(false);
            if retired {
                nodes.lock().await[victim].send_signal(libc::SIGSTOP);
                v["paused_after_switch"] = json!(true);
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                v["paused_after_switch"] = json!(false);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(Ok((nemesis::Active::Retired(vec![victim]), v)))
}

/// Waits until the claimant sees node `victim` (`id`, just killed) down; started again and an
/// error if it does not within 30 s.
async fn wait_seen_down(
    nodes: &Mutex<Vec<NodeProcess>>,
    addrs: &[String],
    victim: usize,
    id: &str,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        // While the claimant itself is the one killed, requests fail until the others see it
        // down and another takes over: retried.
        let down = match cluster_admin(addrs, json!("Status")).await {
            Ok(st) => st,
            Err(_) => serde_json::Value::Null,
        }["Status"]["members"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["node"] == id && m["alive"] == false);
        if down {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            nodes.lock().await[victim].start()?;
            return Err(format!("{id} still seen alive 30 s after kill -9"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How long a leaver paused right after the switch stays paused: several tombstone GC passes
/// two settle times (4 s) apart.
const PAUSED_LEAVER_HOLD: Duration = Duration::from_secs(15);

/// Undo everything: flush rules, resume paused nodes, restart dead ones, reset clocks.
async fn heal_all(cfg: &RunConfig, nodes: &Mutex<Vec<NodeProcess>>, errors: &Mutex<Vec<String>>) {
    let mut ns = nodes.lock().await;
    if cfg.netns {
        if let Err(e) = nemesis::flush_netfilter() {
            errors.lock().await.push(format!("final heal: {e}"));
        }
    }
    for node in ns.iter_mut() {
        node.send_signal(libc::SIGCONT);
        if cfg.kinds.contains(&Kind::Disk) {
            if let Err(e) = crate::disk::free(&nemesis::db_dir(node)) {
                errors.lock().await.push(format!("final heal: {e}"));
            }
        }
        if cfg.kinds.contains(&Kind::Clock) {
            let _ = nemesis::set_clock(&cfg.out.join("nodes"), &node.id, 0);
        }
        if !node.child_running() {
            if let Err(e) = node.start() {
                errors
                    .lock()
                    .await
                    .push(format!("final heal: restart {}: {e}", node.id));
            }
        }
    }
}

/// Each replica's own state of every key (local reads: no coordination, no read repair).
async fn snapshot(
    shared: &Shared,
    keys: &BTreeSet<String>,
    record: bool,
) -> BTreeMap<String, Vec<(String, Vec<String>)>> {
    let mut out = BTreeMap::new();
    let local = GetOptions {
        local: true,
        timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    for key in keys {
        let mut replicas = Vec::new();
        for (i, client) in shared.clients.iter().enumerate() {
            let state = match client.get_with(key, local).await {
                Ok(read) => read
                    .siblings
                    .iter()
                    .map(|s| {
                        let v = s.value.as_ref().map_or("⊥".to_string(), |v| {
                            String::from_utf8_lossy(v).into_owned()
                        });
                        format!("{:016x}:{}={v}", s.dot.0, s.dot.1)
                    })
                    .collect(),
                Err(e) => vec![format!("unreadable: {e}")],
            };
            if record {
                let mut op = Op::new(FINAL, OpType::Info, "replica_get")
                    .key(key)
                    .value(json!(state));
                op.node = Some(shared.node_names[i].clone());
                shared.rec.record(op);
            }
            replicas.push((shared.node_names[i].clone(), state));
        }
        out.insert(key.clone(), replicas);
    }
    out
}

/// The final R=N read of every key, retried across nodes until it succeeds.
/// Rounds of final reads of one key (every client once per round, 500 ms apart) before it
/// counts as unread.
const FINAL_READ_ROUNDS: usize = 20;

async fn final_reads(
    shared: &Shared,
    keys: &BTreeSet<String>,
    workload: Workload,
    n: u8,
) -> Vec<String> {
    let mut failures = Vec::new();
    let f = match workload {
        Workload::Register => "get",
        Workload::Set => "read",
    };
    // Every primary answers (PR = R = N): at the end all nodes are up and healed, so no
    // fallback's hint may stand in for a primary the coordinator still thinks is down.
    let opts = GetOptions {
        r: Some(n),
        pr: Some(n),
        timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    // Each client talks to one node, and a node the membership nemesis took out of the ring
    // refuses every read: a round tries every client, starting with the last one that
    // answered, and only a round in which none answered waits before the next.
    let clients = shared.clients.len();
    let mut first = 0;
    for key in keys {
        let mut done = false;
        'rounds: for round in 0..FINAL_READ_ROUNDS {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for i in 0..clients {
                let c = (first + i) % clients;
                if let Ok(read) = shared.clients[c].get_with(key, opts).await {
                    shared
                        .rec
                        .record(Op::new(FINAL, OpType::Invoke, f).key(key));
                    shared.rec.record(
                        Op::new(FINAL, OpType::Ok, f)
                            .key(key)
                            .value(json!(sibling_values(&read))),
                    );
                    first = c;
                    done = true;
                    break 'rounds;
                }
            }
        }
        if !done {
            failures.push(key.clone());
        }
    }
    failures
}

pub async fn run(cfg: RunConfig) -> Result<Results, String> {
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(cfg.out.join("nodes"))
        .map_err(|e| format!("create {}: {e}", cfg.out.display()))?;
    let ips: Vec<String> = (0..cfg.nodes)
        .map(|i| {
            if cfg.netns {
                nemesis::node_ip(i)
            } else {
                "127.0.0.1".to_string()
            }
        })
        .collect();
    if cfg.netns {
        nemesis::setup_netfilter()?;
    }
    let uses_clock = cfg.kinds.contains(&Kind::Clock);
    let uses_disk = cfg.kinds.contains(&Kind::Disk);
    let n_flag = cfg.n.to_string();
    let mut nodes: Vec<NodeProcess> = Vec::new();
    // Under the disk nemesis every node's RocksDB dir is a small disk of its own (a tmpfs,
    // unmounted when the run ends) and its memtable is small (see `nemesis::DISK_WRITE_BUFFER_MB`).
    let mut disks = Vec::new();
    let node_config = cfg.out.join("nodes").join("node.toml");
    if uses_disk {
        std::fs::write(
            &node_config,
            format!("write_buffer_mb = {}\n", nemesis::DISK_WRITE_BUFFER_MB),
        )
        .map_err(|e| format!("write {}: {e}", node_config.display()))?;
    }
    for (i, ip) in ips.iter().enumerate() {
        let id = format!("n{}", i + 1);
        let mut args = vec![
            "--n".to_string(),
            n_flag.clone(),
            "--sync".into(),
            cfg.sync.clone(),
            "--read-fanout".into(),
            cfg.read_fanout.clone(),
        ];
        if uses_disk {
            args.push("--config".into());
            args.push(node_config.display().to_string());
        }
        if cfg.kinds.contains(&Kind::Overload) {
            args.push("--max-requests".into());
            args.push(nemesis::OVERLOAD_MAX_REQUESTS.to_string());
        }
        if cfg.anti_entropy_only {
            for a in AAE_ONLY_FLAGS {
                args.push(a.to_string());
            }
        }
        if let Some(settle) = cfg.tombstone_settle_s {
            args.push("--tombstone-settle-secs".into());
            args.push(settle.to_string());
            if !cfg.anti_entropy_only {
                args.push("--aae-interval-secs".into());
                args.push("2".into());
            }
        }
        if let Some(first) = nodes.first() {
            args.push("--seeds".into());
            args.push(first.gossip_addr.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dir = cfg.out.join("nodes").join(&id);
        if uses_disk {
            let disk = crate::disk::SmallDisk::mount(&dir.join("db"), nemesis::DISK_MB)?
                .ok_or("the disk nemesis needs root (it mounts a small disk per node)")?;
            disks.push(disk);
        }
        let mut node = NodeProcess::new(&id, &dir, &format!("{ip}:0"), &args);
        if uses_clock {
            nemesis::set_clock(&cfg.out.join("nodes"), &id, 0)?;
            for (k, v) in nemesis::faketime_env(&cfg.out.join("nodes"), &id) {
                node.set_env(&k, &v);
            }
        }
        if cfg.kinds.contains(&Kind::PowerLoss) {
            let preload = node.env_var("LD_PRELOAD").map(str::to_string);
            for (k, v) in crate::powerloss::env(&dir, preload.as_deref()) {
                node.set_env(&k, &v);
            }
        }
        node.start()?;
        nodes.push(node);
    }
    let cluster = Cluster { nodes };
    cluster.wait_converged(Duration::from_secs(60)).await?;
    cluster.wait_synced(Duration::from_secs(60)).await?;
    let client_cfg = ClientConfig {
        request_timeout: CLIENT_TIMEOUT,
        connect_timeout: Duration::from_millis(500),
        ..ClientConfig::default()
    };
    let clients: Vec<Client> = cluster
        .nodes
        .iter()
        .map(|n| Client::new([n.addr.clone()], client_cfg.clone()).expect("one address"))
        .collect();
    let node_names: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    let node_count = node_names.len();
    let shared = Arc::new(Shared {
        rec: Recorder::new(Some(&cfg.out.join("history.jsonl"))).map_err(|e| e.to_string())?,
        clients,
        node_names,
        not_serving: std::sync::Mutex::new(vec![None; node_count]),
        stop: AtomicBool::new(false),
        ops_done: AtomicU64::new(0),
        keys: Mutex::new(BTreeSet::new()),
    });
    let nodes = Arc::new(Mutex::new(cluster.nodes));
    let errors = Arc::new(Mutex::new(Vec::new()));

    eprintln!(
        "[jepsen] {} nodes up; running {:?} with nemeses {:?} for {} s (seed {})",
        cfg.nodes, cfg.workload, cfg.nemeses, cfg.time_limit_s, cfg.seed
    );
    let deadline = Instant::now() + Duration::from_secs(cfg.time_limit_s);
    let mut workers = Vec::new();
    for w in 0..cfg.concurrency {
        workers.push(tokio::spawn(client_loop(shared.clone(), cfg.clone(), w)));
    }
    let busy = Arc::new(Mutex::new(Busy::default()));
    let counter = Arc::new(AtomicU64::new(0));
    // Checked when the run was planned (main); should it not hold, the run fails, no fault.
    let lanes = match Kind::lanes(&cfg.kinds, cfg.overlap) {
        Ok(lanes) => lanes,
        Err(e) => {
            errors.lock().await.push(e);
            Vec::new()
        }
    };
    let nemesis_tasks: Vec<_> = (0u64..)
        .zip(lanes)
        .map(|lane| {
            tokio::spawn(nemesis_loop(
                shared.clone(),
                cfg.clone(),
                nodes.clone(),
                ips.clone(),
                deadline,
                errors.clone(),
                lane,
                busy.clone(),
                counter.clone(),
            ))
        })
        .collect();
    // Progress while it runs.
    while Instant::now() < deadline {
        tokio::time::sleep(
            Duration::from_secs(5).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
        eprintln!(
            "[jepsen] {:>4.0} s  {} ops",
            cfg.time_limit_s as f64
                - deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64(),
            shared.ops_done.load(Ordering::Relaxed)
        );
    }
    for task in nemesis_tasks {
        let _ = task.await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }

    eprintln!("[jepsen] healing; quiet period {} s", cfg.quiet_s);
    heal_all(&cfg, &nodes, &errors).await;
    let healed_at = Instant::now();
    wait_all_alive(&nodes)
        .await
        .map_err(|e| format!("after healing: {e}"))?;
    tokio::time::sleep(Duration::from_secs(cfg.quiet_s)).await;

    let keys = shared.keys.lock().await.clone();
    let n = cfg.n as usize;
    let mut before = checker::check_convergence(&snapshot(&shared, &keys, true).await, n);
    if cfg.anti_entropy_only {
        // Nothing reads meanwhile: only anti-entropy can bring the replicas together.
        let poll_start = Instant::now();
        while !before.converged && poll_start.elapsed() < CONVERGE_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(500)).await;
            before = checker::check_convergence(&snapshot(&shared, &keys, false).await, n);
        }
        eprintln!(
            "[jepsen] anti-entropy only: {}/{} keys converged {:.1} s after the quiet period",
            before.converged_keys,
            before.keys,
            poll_start.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "[jepsen] before final reads: {}/{} keys converged",
        before.converged_keys, before.keys
    );
    if cfg.kinds.contains(&Kind::Wipe) {
        // A node restarted on a wiped disk answers no reads until anti-entropy synced it, and
        // the final reads ask every primary (PR = N).
        if let Err(e) = wait_all_synced(&nodes, FINAL_SYNC_TIMEOUT).await {
            errors
                .lock()
                .await
                .push(format!("before the final reads: {e}"));
        }
    }
    // Hints still held would be replayed after the final reads, adding what those reads (of
    // the primaries only) could not see to the converged replicas they are compared with.
    if let Err(left) = wait_hints_drained(&nodes, FINAL_SYNC_TIMEOUT).await {
        eprintln!("[jepsen] hints still held before the final reads: {left}");
    }
    let unread = final_reads(&shared, &keys, cfg.workload, cfg.n).await;
    let mut errs = errors.lock().await.clone();
    if !unread.is_empty() {
        errs.push(format!("final reads failed for keys {unread:?}"));
    }
    let mut convergence = checker::check_convergence(&snapshot(&shared, &keys, false).await, n);
    let mut converged_after = None;
    let poll_start = Instant::now();
    loop {
        if convergence.converged {
            converged_after = Some(healed_at.elapsed().as_millis() as u64);
            break;
        }
        if poll_start.elapsed() > CONVERGE_TIMEOUT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        convergence = checker::check_convergence(&snapshot(&shared, &keys, false).await, n);
    }
    snapshot(&shared, &keys, true).await;
    shared.rec.flush();

    let history = shared.rec.ops();
    let (register, set) = match cfg.workload {
        Workload::Register => (
            Some(checker::check_register_with(
                &history,
                cfg.tombstone_settle_s.is_some(),
            )),
            None,
        ),
        Workload::Set => (None, Some(checker::check_set(&history))),
    };
    let availability = checker::availability(&history);
    let mut invalid_reasons = invalid_reasons(
        register.as_ref(),
        set.as_ref(),
        &convergence,
        &availability,
        &errs,
    );
    let final_agreement =
        checker::final_reads_against_replicas(&history, cfg.tombstone_settle_s.is_some());
    if !final_agreement.differ.is_empty() {
        let shown: Vec<&str> = final_agreement
            .differ
            .iter()
            .take(3)
            .map(String::as_str)
            .collect();
        invalid_reasons.push(format!(
            "final reads differ from the converged replicas ({} keys): {}",
            final_agreement.differ.len(),
            shown.join("; ")
        ));
    }
    let must = if cfg.anti_entropy_only {
        Some("without read repair or hints, anti-entropy alone must converge them")
    } else if hints_must_converge(&cfg.kinds) {
        Some("hinted handoff alone must deliver every missed write")
    } else {
        None
    };
    if let (Some(why), false) = (must, before.converged) {
        let shown: Vec<&str> = before
            .divergent
            .iter()
            .chain(&before.wrong_holder_count)
            .take(3)
            .map(String::as_str)
            .collect();
        invalid_reasons.push(format!(
            "not converged before the final reads ({}/{} keys): with {:?}, {why}: {}",
            before.converged_keys,
            before.keys,
            cfg.nemeses,
            shown.join("; ")
        ));
    }
    let (mut tombstones_purged, mut tombstones_live, mut aae_serve_rests) = (0, 0, 0);
    for node in nodes.lock().await.iter() {
        let c = Client::new([node.addr.clone()], ClientConfig::default()).expect("one address");
        if let Ok(s) = c.status().await {
            let get = |name: &str| crate::status_metric(&s, name).unwrap_or(0);
            tombstones_purged += get("storage.tombstones_purged");
            tombstones_live += get("tombstones.live");
            aae_serve_rests += get("aae.serve_rests");
        }
    }
    if cfg.tombstone_settle_s.is_some() {
        eprintln!(
            "[jepsen] tombstone GC: {tombstones_purged} purged by the nodes, {tombstones_live} still held"
        );
    }
    let valid = invalid_reasons.is_empty();
    // Stop the nodes gracefully; their logs stay in the run folder.
    for node in nodes.lock().await.iter_mut() {
        node.send_signal(libc::SIGCONT);
        let _ = node.stop();
    }
    Ok(Results {
        config: (*cfg).clone(),
        valid,
        invalid_reasons,
        ops: history.len(),
        register,
        set,
        convergence_before_reads: before,
        convergence,
        converged_after_heal_ms: converged_after,
        final_agreement,
        availability,
        nemesis_errors: errs,
        tombstones_purged,
        tombstones_live,
        aae_serve_rests,
    })
}

async fn wait_all_alive(nodes: &Mutex<Vec<NodeProcess>>) -> Result<(), String> {
    let ns = nodes.lock().await;
    let addrs: Vec<String> = ns.iter().map(|n| n.addr.clone()).collect();
    let ids: BTreeSet<String> = ns.iter().map(|n| n.id.clone()).collect();
    drop(ns);
    let start = Instant::now();
    loop {
        let mut ok = true;
        for a in &addrs {
            let c = Client::new([a.clone()], ClientConfig::default()).expect("one address");
            // Gossip members, not ring owners: a ring change may have taken a node out.
            match c.members().await {
                Ok(r) => {
                    let alive: BTreeSet<String> = r
                        .members
                        .iter()
                        .filter(|m| m.available)
                        .map(|m| m.node_id.clone())
                        .collect();
                    ok &= alive == ids;
                }
                Err(_) => ok = false,
            }
        }
        if ok {
            return Ok(());
        }
        if start.elapsed() > HEAL_TIMEOUT {
            return Err(format!(
                "nodes did not all see each other alive within {HEAL_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the replicas must have converged *before* the final reads (which read-repair): with
/// only processes killed and restarted, every write a replica missed was hinted (to a fallback,
/// or kept by its coordinator), so hinted handoff alone must bring it back. Faults that can
/// lose hints or keep writes from being hinted (a full disk, a reboot that loses unsynced
/// hints) need anti-entropy, which is not part of this check.
pub fn hints_must_converge(kinds: &[Kind]) -> bool {
    !kinds.is_empty() && kinds.iter().all(|k| matches!(k, Kind::Kill))
}

/// Every check a run must pass, as one line per failed check (empty = valid): the workload's
/// checker, convergence after healing, every fault healed with its effect observed, no harness
/// or nemesis error. (`run` adds the final reads against the converged replicas, and
/// convergence before the final reads where the profile demands it.)
pub fn invalid_reasons(
    register: Option<&checker::RegisterReport>,
    set: Option<&checker::SetReport>,
    convergence: &checker::ConvergenceReport,
    availability: &checker::AvailabilityReport,
    errors: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    fn list(out: &mut Vec<String>, what: &str, items: &[String]) {
        if !items.is_empty() {
            let shown: Vec<&str> = items.iter().take(3).map(String::as_str).collect();
            out.push(format!("{what} {}: {}", items.len(), shown.join("; ")));
        }
    }
    // The checkers' own anomaly lists: exactly what their `valid` is computed from.
    let anomalies = register
        .map(|r| r.anomalies().to_vec())
        .into_iter()
        .chain(set.map(|s| s.anomalies().to_vec()))
        .flatten();
    for (what, found) in anomalies {
        list(&mut out, what, found);
    }
    list(&mut out, "unhealed faults", &availability.unhealed);
    list(
        &mut out,
        "faults with no observed effect",
        &availability.unobserved,
    );
    list(&mut out, "errors", errors);
    if !convergence.converged {
        let mut why: Vec<String> = convergence.divergent.clone();
        why.extend(convergence.wrong_holder_count.iter().cloned());
        list(
            &mut out,
            &format!(
                "not converged ({}/{} keys)",
                convergence.converged_keys, convergence.keys
            ),
            &why,
        );
        if why.is_empty() {
            out.push("not converged".into());
        }
    }
    out
}

/// A human summary of the results.
pub fn summary(r: &Results) -> String {
    let mut s = String::new();
    let verdict = if r.valid { "VALID" } else { "INVALID" };
    s.push_str(&format!(
        "ringkv-jepsen: {verdict}\nworkload {:?}, nemeses {:?}, {} nodes (N={}), {} clients, {} s, seed {}\n{} history entries\n",
        r.config.workload, r.config.nemeses, r.config.nodes, r.config.n, r.config.concurrency,
        r.config.time_limit_s, r.config.seed, r.ops
    ));
    for reason in &r.invalid_reasons {
        s.push_str(&format!("  invalid: {reason}\n"));
    }
    if let Some(settle) = r.config.tombstone_settle_s {
        s.push_str(&format!(
            "tombstone GC (settle {settle} s): {} purged, {} held at the end\n",
            r.tombstones_purged, r.tombstones_live
        ));
    }
    if r.config.anti_entropy_only {
        s.push_str(&format!(
            "anti-entropy: {} answers to peers held back by busy nodes (aae.serve_rests)\n",
            r.aae_serve_rests
        ));
    }
    if let Some(reg) = &r.register {
        s.push_str(&format!(
            "register: {} keys; writes ok {} / info {} / fail {}; reads ok {}\n  lost {} · phantoms {} · from-failed {} · from-future {} · resurrected {} · excused-by-info {} · recovered {} · tombstones purged {}\n",
            reg.keys, reg.ok_writes, reg.info_writes, reg.fail_writes, reg.ok_reads,
            reg.lost.len(), reg.phantoms.len(), reg.from_failed.len(), reg.from_future.len(),
            reg.resurrected.len(), reg.excused_by_info, reg.recovered, reg.purged_tombstones
        ));
        for l in reg
            .lost
            .iter()
            .chain(&reg.phantoms)
            .chain(&reg.resurrected)
            .take(10)
        {
            s.push_str(&format!("    {l}\n"));
        }
    }
    if let Some(set) = &r.set {
        s.push_str(&format!(
            "set: adds ok {} / info {} / fail {}; final size {}\n  lost {} · unexpected {} · from-failed {} · duplicates {} · recovered {}\n",
            set.ok_adds, set.info_adds, set.fail_adds, set.final_size, set.lost.len(),
            set.unexpected.len(), set.from_failed.len(), set.duplicates.len(), set.recovered
        ));
        for l in set.lost.iter().take(10) {
            s.push_str(&format!("    lost {l}\n"));
        }
    }
    s.push_str(&format!(
        "convergence: before final reads {}/{} keys; after {}/{} keys{}\n",
        r.convergence_before_reads.converged_keys,
        r.convergence_before_reads.keys,
        r.convergence.converged_keys,
        r.convergence.keys,
        r.converged_after_heal_ms
            .map(|ms| format!(", converged {:.1} s after healing", ms as f64 / 1000.0))
            .unwrap_or_else(|| ", NOT converged".into())
    ));
    s.push_str(&format!(
        "final reads against the converged replicas: {} keys compared, {} differ{}\n",
        r.final_agreement.compared,
        r.final_agreement.differ.len(),
        if r.final_agreement.not_compared > 0 {
            format!(
                " ({} not compared: replicas divergent or unreadable)",
                r.final_agreement.not_compared
            )
        } else {
            String::new()
        }
    ));
    for d in r
        .convergence
        .divergent
        .iter()
        .chain(&r.convergence.wrong_holder_count)
        .take(5)
    {
        s.push_str(&format!("    {d}\n"));
    }
    s.push_str("availability (ok / fail / info by fault window):\n");
    for (w, st) in &r.availability.windows {
        let total = (st.ok + st.fail + st.info).max(1);
        s.push_str(&format!(
            "  {w:<22} {:>6} / {:>5} / {:>5}  ({:.1}% ok)\n",
            st.ok,
            st.fail,
            st.info,
            100.0 * st.ok as f64 / total as f64
        ));
    }
    s.push_str("latency of ok ops (ms): p50 / p95 / p99 / max\n");
    for (f, l) in &r.availability.latency {
        s.push_str(&format!(
            "  {f:<8} {:>7.2} / {:>7.2} / {:>7.2} / {:>8.2}  (n={})\n",
            l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms, l.count
        ));
    }
    for e in &r.nemesis_errors {
        s.push_str(&format!("error: {e}\n"));
    }
    if r.availability.observed + r.availability.unobserved.len() > 0 {
        s.push_str(&format!(
            "faults: {} with their effect observed, {} without{}\n",
            r.availability.observed,
            r.availability.unobserved.len(),
            if r.availability.unobserved.is_empty() {
                String::new()
            } else {
                format!(": {:?}", r.availability.unobserved)
            }
        ));
    }
    if !r.availability.unhealed.is_empty() {
        s.push_str(&format!("unhealed faults: {:?}\n", r.availability.unhealed));
    }
    s
}

/// Writes results.json and summary.txt into the run folder.
pub fn write_results(out: &std::path::Path, r: &Results) -> Result<String, String> {
    let json = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(out.join("results.json"), json).map_err(|e| e.to_string())?;
    let text = summary(r);
    std::fs::write(out.join("summary.txt"), &text).map_err(|e| e.to_string())?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn converged() -> checker::ConvergenceReport {
        checker::ConvergenceReport {
            keys: 2,
            converged_keys: 2,
            converged: true,
            ..Default::default()
        }
    }

    #[test]
    fn overlapping_faults_never_share_a_node_or_the_network() {
        let mut busy = Busy::default();
        assert_eq!(busy.free_for(Kind::Kill, 5), Some(vec![0, 1, 2, 3, 4]));
        busy.take(Kind::Kill, &[1, 3]);
        assert_eq!(busy.free_for(Kind::Pause, 5), Some(vec![0, 2, 4]));
        // A partition acts on links: it may start beside a fault on nodes, not beside another,
        // and learns which nodes run (it must cut a link between two of them).
        assert_eq!(busy.free_for(Kind::Partition, 5), Some(vec![0, 2, 4]));
        busy.take(Kind::Partition, &[]);
        assert_eq!(busy.free_for(Kind::Loss, 5), None);
        busy.take(Kind::Pause, &[0, 2, 4]);
        assert_eq!(busy.free_for(Kind::Clock, 5), None, "every node held");
        busy.release(Kind::Partition, &[]);
        assert_eq!(busy.free_for(Kind::Loss, 5), Some(vec![]));
        busy.release(Kind::Kill, &[1, 3]);
        assert_eq!(busy.free_for(Kind::Disk, 5), Some(vec![1, 3]));
    }

    #[test]
    fn a_run_is_valid_only_without_reasons_and_each_failed_check_is_named() {
        let ok = checker::RegisterReport {
            valid: true,
            ..Default::default()
        };
        let none = checker::AvailabilityReport::default();
        assert!(invalid_reasons(Some(&ok), None, &converged(), &none, &[]).is_empty());

        let lost = checker::RegisterReport {
            lost: vec!["k1: v7".into()],
            valid: false,
            ..Default::default()
        };
        let diverged = checker::ConvergenceReport {
            keys: 2,
            converged_keys: 1,
            divergent: vec!["k2: n1 [a] n2 []".into()],
            converged: false,
            ..Default::default()
        };
        let errors = vec!["restart n3: timed out".to_string()];
        let reasons = invalid_reasons(Some(&lost), None, &diverged, &none, &errors);
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].starts_with("lost 1: k1: v7"), "{reasons:?}");
        assert!(reasons[1].contains("restart n3"), "{reasons:?}");
        assert!(
            reasons[2].starts_with("not converged (1/2 keys)"),
            "{reasons:?}"
        );
    }
}
