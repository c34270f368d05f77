//! kvbench: a YCSB-style load generator (shared/BENCHMARKS.md).
//!
//! A load phase writes every record once; the run phase then issues reads and updates with the
//! workload's mix and key distribution, either **closed loop** (`connections` × `depth` workers,
//! each with one request in flight, for peak throughput) or **open loop** (requests start at a
//! fixed rate; latency is measured from each request's *intended* start, so a stalled server is
//! charged for the queue it causes: no coordinated omission).

pub mod k2v;
pub mod keys;
pub mod targets;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use keys::{key_name, KeyChooser};
use targets::{Caches, Conn, OpError, TargetKind};

/// YCSB core workloads (read proportion; the rest are updates).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub read_proportion: f64,
}

impl Workload {
    pub fn parse(s: &str) -> Result<Workload, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "a" => Workload {
                name: "A",
                read_proportion: 0.5,
            },
            "b" => Workload {
                name: "B",
                read_proportion: 0.95,
            },
            "c" => Workload {
                name: "C",
                read_proportion: 1.0,
            },
            "w" | "write" => Workload {
                name: "W",
                read_proportion: 0.0,
            },
            other => return Err(format!("unknown workload {other:?}: expected a, b, c or w")),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    pub target: TargetKind,
    pub addrs: Vec<String>,
    pub label: String,
    pub workload: Workload,
    pub records: u64,
    /// Keys are `<key_prefix><index, 12 digits>` ("user" by default, as YCSB).
    pub key_prefix: String,
    pub value_size: usize,
    pub distribution: String,
    pub duration_s: f64,
    /// Stop the run phase after this many ops (smoke runs), if set.
    pub max_ops: Option<u64>,
    pub connections: usize,
    pub depth: usize,
    /// Open loop at this many ops/s; closed loop when None.
    pub rate: Option<f64>,
    pub load: bool,
    pub seed: u64,
    pub timeout_ms: u64,
    /// ringkv: connections route each request to a replica of its key.
    pub ring_aware: bool,
    /// garage-k2v: the bucket and the S3/K2V region requests are signed for (the access key
    /// comes from the environment, see [`k2v`]).
    pub k2v_bucket: String,
    pub k2v_region: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Percentiles {
    fn from(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p95_us: h.value_at_quantile(0.95),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseResult {
    pub ops: u64,
    pub errors: u64,
    /// Operations an overloaded node refused at once (`Overloaded`, nothing done): not
    /// errors, not in the latencies. `throughput` counts successful operations only (goodput).
    pub shed: u64,
    pub duration_s: f64,
    pub throughput: f64,
    pub read: Percentiles,
    pub update: Percentiles,
    pub all: Percentiles,
    /// The first few error messages, for diagnosis.
    pub first_errors: Vec<String>,
    /// Reads that found no value (after a load phase this should be 0).
    pub not_found: u64,
    /// Open loop only: how long after its due time each operation began to run in the
    /// generator (its dispatcher thread's and runtime's own delays, e.g. waiting for a CPU it
    /// shares with the servers). Part of every latency above, but not the servers' doing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub late: Option<Percentiles>,
    /// Open loop only: the successful operations' latency counted from when each began in
    /// the generator instead of from its due time (`all` minus `late`, per operation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_send: Option<Percentiles>,
    /// Open loop only: the part of `late` spent before the dispatcher thread handed each
    /// operation to the runtime (its sleeps overshooting, or waits for a permit); the rest of
    /// `late` is the runtime's delay in starting the operation's task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch_late: Option<Percentiles>,
    /// Open loop only: how long, in total, the dispatcher waited because the generator's own
    /// limit of operations in flight (connections × depth × 4) was reached, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permit_wait_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub config: BenchConfig,
    pub git_commit: String,
    pub mode: &'static str,
    pub load: Option<PhaseResult>,
    pub run: PhaseResult,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Per-worker measurements, merged at the end of a phase.
struct Stats {
    read: Histogram<u64>,
    update: Histogram<u64>,
    errors: u64,
    shed: u64,
    not_found: u64,
    first_errors: Vec<String>,
    /// Open loop only.
    open: Option<OpenLoopStats>,
}

/// The open loop's split of each latency: the generator's own delay before an operation
/// began, and the rest.
struct OpenLoopStats {
    /// Each operation's start behind its due time, µs.
    late: Histogram<u64>,
    /// Successful operations' latency from their start, µs.
    from_send: Histogram<u64>,
    /// Each operation's hand-over to the runtime behind its due time, µs.
    dispatch_late: Histogram<u64>,
    /// Time the dispatcher waited for a permit.
    permit_wait: Duration,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            read: histogram(),
            update: histogram(),
            open: None,
            errors: 0,
            shed: 0,
            not_found: 0,
            first_errors: Vec::new(),
        }
    }

    fn merge(&mut self, o: Stats) {
        let _ = self.read.add(&o.read);
        let _ = self.update.add(&o.update);
        match (&mut self.open, o.open) {
            (Some(l), Some(o)) => {
                let _ = l.late.add(&o.late);
                let _ = l.from_send.add(&o.from_send);
                let _ = l.dispatch_late.add(&o.dispatch_late);
                l.permit_wait += o.permit_wait;
            }
            (l @ None, o) => *l = o,
            (Some(_), None) => {}
        }
        self.errors += o.errors;
        self.shed += o.shed;
        self.not_found += o.not_found;
        for e in o.first_errors {
            if self.first_errors.len() < 5 {
                self.first_errors.push(e);
            }
        }
    }

    fn result(self, elapsed: Duration) -> PhaseResult {
        let mut all = histogram();
        let _ = all.add(&self.read);
        let _ = all.add(&self.update);
        let ops = all.len() + self.errors + self.shed;
        PhaseResult {
            ops,
            errors: self.errors,
            shed: self.shed,
            duration_s: elapsed.as_secs_f64(),
            throughput: all.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            read: Percentiles::from(&self.read),
            update: Percentiles::from(&self.update),
            all: Percentiles::from(&all),
            first_errors: self.first_errors,
            not_found: self.not_found,
            late: self.open.as_ref().map(|o| Percentiles::from(&o.late)),
            from_send: self.open.as_ref().map(|o| Percentiles::from(&o.from_send)),
            dispatch_late: self
                .open
                .as_ref()
                .map(|o| Percentiles::from(&o.dispatch_late)),
            permit_wait_s: self.open.as_ref().map(|o| o.permit_wait.as_secs_f64()),
        }
    }
}

#[derive(Clone, Copy)]
enum OpKind {
    Read,
    Update,
}

async fn do_op(conn: &Conn, kind: OpKind, key: &str, value: &Bytes) -> Result<bool, OpError> {
    match kind {
        OpKind::Read => conn.read(key).await,
        OpKind::Update => conn.update(key, value.clone()).await.map(|()| true),
    }
}

/// A latency as recorded in the histograms: whole microseconds, at least 1.
fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

fn record(stats: &mut Stats, kind: OpKind, started: Instant, result: Result<bool, OpError>) {
    let us = micros(started.elapsed());
    match result {
        Ok(found) => {
            match kind {
                OpKind::Read => stats.read.saturating_record(us),
                OpKind::Update => stats.update.saturating_record(us),
            }
            if !found {
                stats.not_found += 1;
            }
        }
        Err(e) if e.shed => stats.shed += 1,
        Err(e) => {
            stats.errors += 1;
            if stats.first_errors.len() < 5 {
                stats.first_errors.push(e.message);
            }
        }
    }
}

/// Runs one operation and counts it for the progress line; the caller records its latency.
/// One operation, counted in the progress counters; `started` is when its latency starts
/// (the intended start in the open loop).
async fn counted(
    conn: &Conn,
    kind: OpKind,
    key: &str,
    value: &Bytes,
    counters: &Counters,
    started: Instant,
) -> Result<bool, OpError> {
    let r = do_op(conn, kind, key, value).await;
    match &r {
        Err(e) if e.shed => counters.shed.fetch_add(1, Ordering::Relaxed),
        Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
        Ok(_) => 0,
    };
    counters.done.fetch_add(1, Ordering::Relaxed);
    let us = started.elapsed().as_micros() as u64;
    counters.second_max_us.fetch_max(us, Ordering::Relaxed);
    r
}

/// Progress counters shared by the workers of a phase.
#[derive(Default)]
struct Counters {
    done: AtomicU64,
    errors: AtomicU64,
    shed: AtomicU64,
    /// The slowest operation since the last progress line (a stall shows in its second).
    second_max_us: AtomicU64,
}

/// The next operation of the run phase: a key from the distribution, read or update by the
/// workload's mix, and the value an update writes.
fn next_op(
    prefix: &str,
    chooser: &KeyChooser,
    read_p: f64,
    values: Values,
    rng: &mut StdRng,
) -> (String, OpKind, Bytes) {
    let key = key_name(prefix, chooser.next(rng));
    let kind = if rng.random_bool(read_p) {
        OpKind::Read
    } else {
        OpKind::Update
    };
    (key, kind, values.next(rng))
}

/// The open loop's dispatcher sleeps at least this long when it is ahead of its schedule.
const DISPATCH_TICK: Duration = Duration::from_micros(250);

/// Random letters a run's values are cut from (plus one value's size).
const VALUE_POOL_BYTES: usize = 1 << 20;

/// The values a run writes: `size`-byte windows at random offsets of one pool of random
/// letters made once per run, so an operation neither allocates its value nor draws a random
/// number per byte (both showed in the generator's profile in open loop at 2x the peak), and
/// successive writes of a key still carry different values.
#[derive(Clone, Copy)]
struct Values {
    /// Leaked once per run: a static slice makes every value a `Bytes` without a reference
    /// count shared by the threads that send them.
    pool: &'static [u8],
    size: usize,
}

impl Values {
    fn new(size: usize, seed: u64) -> Values {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7661_6c75_6573);
        let pool: Vec<u8> = (0..size + VALUE_POOL_BYTES)
            .map(|_| b'a' + rng.random_range(0..26u8))
            .collect();
        Values {
            pool: Box::leak(pool.into_boxed_slice()),
            size,
        }
    }

    fn next(&self, rng: &mut StdRng) -> Bytes {
        let at = rng.random_range(0..=self.pool.len() - self.size);
        Bytes::from_static(&self.pool[at..at + self.size])
    }
}

/// Prints a progress line every second while `running` holds.
fn progress(phase: &'static str, counters: Arc<Counters>, running: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut last = 0;
        while running.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n = counters.done.load(Ordering::Relaxed);
            eprintln!(
                "[kvbench] {phase} {:>5.1}s {:>10} ops {:>9} ops/s  max {:>7} us  errors {}  shed {}",
                start.elapsed().as_secs_f64(),
                n,
                n - last,
                counters.second_max_us.swap(0, Ordering::Relaxed),
                counters.errors.load(Ordering::Relaxed),
                counters.shed.load(Ordering::Relaxed)
            );
            last = n;
        }
    });
}

/// Writes every record once, closed loop.
async fn load_phase(cfg: &BenchConfig, conns: &[Conn], values: Values) -> PhaseResult {
    let workers = cfg.connections * cfg.depth;
    let next = Arc::new(AtomicU64::new(0));
    let counters = Arc::new(Counters::default());
    let running = Arc::new(AtomicBool::new(true));
    progress("load", counters.clone(), running.clone());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let conn = conns[w % conns.len()].clone();
        let (next, counters) = (next.clone(), counters.clone());
        let records = cfg.records;
        let prefix: Arc<str> = cfg.key_prefix.as_str().into();
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ (w as u64 + 1) << 1);
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= records {
                    break;
                }
                let value = values.next(&mut rng);
                let t = Instant::now();
                let key = key_name(&prefix, i);
                let r = counted(&conn, OpKind::Update, &key, &value, &counters, t).await;
                record(&mut stats, OpKind::Update, t, r);
            }
            stats
        }));
    }
    let mut stats = Stats::new();
    for t in tasks {
        if let Ok(s) = t.await {
            stats.merge(s);
        }
    }
    running.store(false, Ordering::Relaxed);
    stats.result(start.elapsed())
}

/// The run phase, closed or open loop.
async fn run_phase(cfg: &BenchConfig, conns: &[Conn], values: Values) -> PhaseResult {
    let chooser =
        Arc::new(KeyChooser::new(&cfg.distribution, cfg.records.max(1)).expect("validated"));
    let counters = Arc::new(Counters::default());
    let running = Arc::new(AtomicBool::new(true));
    progress("run ", counters.clone(), running.clone());
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.duration_s);
    let budget = Arc::new(AtomicU64::new(cfg.max_ops.unwrap_or(u64::MAX)));
    let take = |budget: &AtomicU64| {
        budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_ok()
    };
    let start = Instant::now();
    let stats = match cfg.rate {
        None => {
            let mut tasks = Vec::new();
            for w in 0..cfg.connections * cfg.depth {
                let conn = conns[w % conns.len()].clone();
                let (chooser, counters, budget) =
                    (chooser.clone(), counters.clone(), budget.clone());
                let read_p = cfg.workload.read_proportion;
                let prefix: Arc<str> = cfg.key_prefix.as_str().into();
                let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(31) ^ w as u64);
                tasks.push(tokio::spawn(async move {
                    let mut stats = Stats::new();
                    while Instant::now() < deadline && take(&budget) {
                        let (key, kind, value) =
                            next_op(&prefix, &chooser, read_p, values, &mut rng);
                        let t = Instant::now();
                        let r = counted(&conn, kind, &key, &value, &counters, t).await;
                        record(&mut stats, kind, t, r);
                    }
                    stats
                }));
            }
            let mut stats = Stats::new();
            for t in tasks {
                if let Ok(s) = t.await {
                    stats.merge(s);
                }
            }
            stats
        }
        Some(rate) => {
            // Open loop: op i is due at start + i/rate; its latency counts from then. The
            // schedule runs on its own thread with OS sleeps of at least `DISPATCH_TICK`
            // (a quarter millisecond late at most when it has the CPU): tokio's timer has a
            // 1 ms granularity and would add up to 1 ms of the generator's own lateness to
            // every latency. How late each operation really began is measured (`late`).
            let mut stats = Stats::new();
            stats.open = Some(OpenLoopStats {
                late: histogram(),
                from_send: histogram(),
                dispatch_late: histogram(),
                permit_wait: Duration::ZERO,
            });
            let shared = Arc::new(Mutex::new(stats));
            let limit = Arc::new(tokio::sync::Semaphore::new(cfg.connections * cfg.depth * 4));
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            let handle = tokio::runtime::Handle::current();
            let dispatch = {
                let (shared, counters, conns) = (shared.clone(), counters.clone(), conns.to_vec());
                let read_p = cfg.workload.read_proportion;
                let mut rng = StdRng::seed_from_u64(cfg.seed);
                let prefix = cfg.key_prefix.clone();
                move || {
                    let mut tasks = tokio::task::JoinSet::new();
                    let mut i: u64 = 0;
                    let mut permit_wait = Duration::ZERO;
                    loop {
                        let due = start + interval.mul_f64(i as f64);
                        if due >= deadline || !take(&budget) {
                            break;
                        }
                        let now = Instant::now();
                        if due > now {
                            // Wake at most once per tick and dispatch all that is due then:
                            // a sleep per operation (every ~16 µs at 60k ops/s) is a wake-up
                            // competing for the CPU the servers share.
                            std::thread::sleep((due - now).max(DISPATCH_TICK));
                        }
                        let permit = match limit.clone().try_acquire_owned() {
                            Ok(p) => p,
                            Err(_) => {
                                let waited = Instant::now();
                                let p = handle
                                    .block_on(limit.clone().acquire_owned())
                                    .expect("semaphore open");
                                permit_wait += waited.elapsed();
                                p
                            }
                        };
                        let handed = Instant::now().saturating_duration_since(due);
                        let conn = conns[(i as usize) % conns.len()].clone();
                        let (key, kind, value) =
                            next_op(&prefix, &chooser, read_p, values, &mut rng);
                        let (shared, counters) = (shared.clone(), counters.clone());
                        tasks.spawn_on(
                            async move {
                                let began = Instant::now();
                                let late = began.saturating_duration_since(due);
                                let r = counted(&conn, kind, &key, &value, &counters, due).await;
                                let ok = r.is_ok();
                                let mut stats = shared.lock().expect("stats lock");
                                record(&mut stats, kind, due, r);
                                if let Some(o) = &mut stats.open {
                                    o.late.saturating_record(micros(late));
                                    o.dispatch_late.saturating_record(micros(handed));
                                    if ok {
                                        o.from_send.saturating_record(micros(began.elapsed()));
                                    }
                                }
                                drop(stats);
                                drop(permit);
                            },
                            &handle,
                        );
                        i += 1;
                        while tasks.try_join_next().is_some() {}
                    }
                    if let Some(o) = &mut shared.lock().expect("stats lock").open {
                        o.permit_wait = permit_wait;
                    }
                    tasks
                }
            };
            let mut tasks = tokio::task::spawn_blocking(dispatch)
                .await
                .expect("the open-loop dispatcher does not panic");
            while tasks.join_next().await.is_some() {}
            Arc::try_unwrap(shared)
                .ok()
                .expect("all op tasks finished")
                .into_inner()
                .expect("stats lock")
        }
    };
    running.store(false, Ordering::Relaxed);
    stats.result(start.elapsed())
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub async fn run(cfg: BenchConfig) -> Result<Summary, String> {
    KeyChooser::new(&cfg.distribution, cfg.records.max(1))?;
    let caches = Caches::default();
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let mut conns = Vec::with_capacity(cfg.connections);
    for i in 0..cfg.connections {
        conns.push(targets::Conn::connect(&cfg, i, &caches, timeout).await?);
    }
    let values = Values::new(cfg.value_size, cfg.seed);
    let load = if cfg.load {
        Some(load_phase(&cfg, &conns, values).await)
    } else {
        None
    };
    let run = run_phase(&cfg, &conns, values).await;
    Ok(Summary {
        mode: if cfg.rate.is_some() { "open" } else { "closed" },
        git_commit: git_commit(),
        config: cfg,
        load,
        run,
    })
}

/// A human table of a summary.
pub fn table(s: &Summary) -> String {
    let c = &s.config;
    let mut out = format!(
        "{} ({}), workload {}, {} records x {} B, {}, {} loop, {} conn x {} deep{}\n",
        c.label,
        serde_json::to_string(&c.target)
            .unwrap_or_default()
            .trim_matches('"'),
        c.workload.name,
        c.records,
        c.value_size,
        c.distribution,
        s.mode,
        c.connections,
        c.depth,
        c.rate
            .map(|r| format!(" at {r:.0} ops/s"))
            .unwrap_or_default()
    );
    out.push_str("phase   op       ops/s       count  errors    p50 us    p95 us    p99 us  p99.9 us    max us\n");
    let mut row = |phase: &str, op: &str, p: &Percentiles, thr: f64, errors: u64| {
        out.push_str(&format!(
            "{phase:<7} {op:<7} {thr:>9.0} {:>11} {errors:>7} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            p.count, p.p50_us, p.p95_us, p.p99_us, p.p999_us, p.max_us
        ));
    };
    if let Some(l) = &s.load {
        row("load", "update", &l.update, l.throughput, l.errors);
    }
    let r = &s.run;
    row("run", "all", &r.all, r.throughput, r.errors);
    if r.read.count > 0 {
        row(
            "run",
            "read",
            &r.read,
            r.read.count as f64 / r.duration_s,
            0,
        );
    }
    if r.update.count > 0 {
        row(
            "run",
            "update",
            &r.update,
            r.update.count as f64 / r.duration_s,
            0,
        );
    }
    if let (Some(late), Some(sent)) = (&r.late, &r.from_send) {
        row("run", "late", late, 0.0, 0);
        row("run", "sent", sent, r.throughput, 0);
        if let Some(d) = &r.dispatch_late {
            row("run", "handed", d, 0.0, 0);
        }
        out.push_str(
            "late: how long after its due time each operation began in the generator (its own \
             delay, part of the latencies above); handed: the part of it before the dispatcher \
             handed the operation to the runtime; sent: the same operations' latency counted \
             from when they began\n",
        );
        if let Some(w) = r.permit_wait_s {
            out.push_str(&format!(
                "the dispatcher waited {w:.3} s in all for the generator's limit of operations \
                 in flight\n"
            ));
        }
    }
    if r.shed > 0 {
        out.push_str(&format!(
            "shed: {} operations refused Overloaded ({:.0}/s; not errors, not in the latencies)\n",
            r.shed,
            r.shed as f64 / r.duration_s.max(1e-9)
        ));
    }
    for e in &r.first_errors {
        out.push_str(&format!("error: {e}\n"));
    }
    out
}
