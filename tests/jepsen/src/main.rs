//! `ringkv-jepsen`: run a consistency test against a real ringkv cluster and check it.
//!
//! Exit codes: 0 every check passed, 1 a check failed (see the run folder), 2 the test could not
//! run (missing prerequisites, a node failed to start).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::Parser;
use ringkv_jepsen::nemesis::{self, Kind};
use ringkv_jepsen::powerloss;
use ringkv_jepsen::runner::{self, RunConfig, Workload};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ringkv-jepsen",
    about = "Jepsen-style consistency tests for ringkv: real clusters, faults, histories, checkers",
    after_help = "Examples:\n  ringkv-jepsen --workload register --nemesis kill,partition --time-limit 60\n  ringkv-jepsen --workload set --nemesis pause --time-limit 30 --seed 7\n  ringkv-jepsen --workload register --nemesis clock,loss --time-limit 120\n  ringkv-jepsen --workload register --nemesis disk,reboot --time-limit 60\n  ringkv-jepsen --profile ci      # the short profile make test runs\n  ringkv-jepsen --profile full    # longer combinations (make jepsen)"
)]
struct Cli {
    /// register or set.
    #[arg(long, default_value = "register")]
    workload: String,
    /// Comma-separated faults: kill, reboot, powerloss, pause, partition, clock, loss, disk, wipe,
    /// membership; or none.
    #[arg(long, default_value = "kill,partition")]
    nemesis: String,
    /// Seconds of traffic (faults included).
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Concurrent client processes.
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Master seed (default: random, printed and recorded).
    #[arg(long)]
    seed: Option<u64>,
    /// Mean fault / heal duration in seconds.
    #[arg(long, default_value_t = 8)]
    interval: u64,
    /// Quiet period after healing, in seconds.
    #[arg(long, default_value_t = 5)]
    quiet: u64,
    /// Ops per second per client process.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Replication factor.
    #[arg(long, default_value_t = 3)]
    n: u8,
    /// Nodes' durability mode (none, group, always).
    #[arg(long, default_value = "group")]
    sync: String,
    /// Nodes' read fan-out: quorum (R replicas, spares on failure or after 20 ms) or all.
    #[arg(long, default_value = "quorum")]
    read_fanout: String,
    /// Parent folder of run folders.
    #[arg(long, default_value = "jepsen-results")]
    out: PathBuf,
    /// A named set of runs: ci (short, for make test) or full.
    #[arg(long)]
    profile: Option<String>,
    /// Anti-entropy alone: nodes run without read repair and without hinted handoff, with a
    /// 2 s anti-entropy interval, and the replicas must converge before any final read.
    #[arg(long)]
    anti_entropy_only: bool,
    /// Tombstone GC during the run: nodes check tombstones every 2 s and purge those stable at
    /// two checks this many seconds apart (the checkers then see reads of purged keys).
    #[arg(long)]
    tombstone_settle_secs: Option<u64>,
    /// Two nemesis lanes: up to two faults active at once, on different nodes, at most one on
    /// the network (not with wipe or membership).
    #[arg(long)]
    overlap: bool,
}

/// Environment variable set when the harness re-executed itself inside its namespace.
const NETNS_ENV: &str = "RKJ_NETNS";

fn plan(cli: &Cli) -> Result<Vec<Cli>, String> {
    let with = |w: &str, n: &str, t: u64, seed: u64| Cli {
        workload: w.into(),
        nemesis: n.into(),
        time_limit: t,
        seed: Some(cli.seed.unwrap_or(seed)),
        profile: None,
        ..cli.clone()
    };
    let with_sync = |w: &str, n: &str, t: u64, seed: u64, sync: &str| Cli {
        sync: sync.into(),
        ..with(w, n, t, seed)
    };
    let aae_only = |w: &str, n: &str, t: u64, seed: u64| Cli {
        anti_entropy_only: true,
        ..with(w, n, t, seed)
    };
    // Tombstones purged while faults come and go: the nodes apply peer writes within half the
    // settle time (2 s, above the clients' 1.5 s deadline) or drop them.
    let gc = |w: &str, n: &str, t: u64, seed: u64| Cli {
        tombstone_settle_secs: Some(4),
        ..with(w, n, t, seed)
    };
    let overlap = |w: &str, n: &str, t: u64, seed: u64| Cli {
        overlap: true,
        ..with(w, n, t, seed)
    };
    match cli.profile.as_deref() {
        None => Ok(vec![cli.clone()]),
        Some("ci") => Ok(vec![
            with("register", "kill,partition", 35, 1),
            // Sloppy writes (5 nodes, fallbacks) under kills: hints alone converge the replicas.
            with("register", "kill", 25, 4),
            with("set", "pause", 20, 2),
            // No read repair, no hints: anti-entropy alone converges the replicas.
            Cli {
                interval: 4,
                ..aae_only("register", "kill,partition,pause", 30, 5)
            },
            // Shorter fault windows, so that both faults happen in a short run.
            Cli {
                interval: 4,
                ..with("register", "disk,reboot", 30, 3)
            },
            // Tombstone GC purging deleted keys between kills, partitions and a lost disk.
            gc("register", "kill,partition,wipe", 45, 6),
            // Ring changes (leave, kill + remove, join again) under kills, with tombstone GC:
            // a node taken out starts again on its old data before it is wiped. 70 s: the
            // second change is a join whose new node is killed and the change aborted.
            Cli {
                interval: 5,
                ..gc("register", "membership,kill", 70, 7)
            },
            // A flood beyond the nodes' client budget (32): shed requests are definite.
            Cli {
                interval: 4,
                ..with("register", "overload,kill", 30, 9)
            },
            // Anti-entropy alone converging the replicas while a flood keeps nodes over their
            // budget: repairs against a node that holds its answers back by its own load
            // (`aae.serve_rests`), or refuses them, still finish.
            Cli {
                interval: 4,
                ..aae_only("register", "overload,partition", 30, 12)
            },
            // Power losses: every file of a minority cut back to what was fsynced (sync group:
            // no acknowledged write may be lost).
            Cli {
                interval: 4,
                ..with("register", "powerloss,kill", 30, 11)
            },
            // Two faults at once: a kill during a partition, a pause during a kill.
            Cli {
                interval: 4,
                ..overlap("register", "kill,partition,pause", 30, 10)
            },
            // Ring changes while the other lane partitions the network: a change is switched
            // or aborted only by a claimant that reaches a majority of the owners that stay,
            // so the two sides never decide it two ways.
            Cli {
                interval: 5,
                ..overlap("register", "membership,partition", 60, 14)
            },
            // A second process started with a running node's id: it stops by itself, the
            // node keeps its place (kills in between).
            Cli {
                interval: 4,
                ..with("register", "duplicate,kill", 25, 13)
            },
        ]),
        Some("full") => Ok(vec![
            with("register", "kill,partition", 120, 11),
            with("register", "kill", 90, 20),
            with("register", "pause,clock", 120, 12),
            with("register", "partition,loss", 120, 13),
            with("set", "kill,pause", 90, 14),
            with("set", "partition,clock", 90, 15),
            with("register", "none", 60, 16),
            with("register", "disk,reboot,partition", 120, 17),
            with("set", "disk,kill", 90, 18),
            with_sync("register", "kill,reboot", 90, 19, "none"),
            // Reads asking every live replica (Riak's fan-out) under kills and partitions.
            Cli {
                read_fanout: "all".into(),
                ..with("register", "kill,partition", 90, 30)
            },
            aae_only("register", "kill,partition,pause", 120, 21),
            aae_only("set", "kill,partition", 90, 22),
            gc("register", "kill,partition,wipe", 180, 23),
            with("set", "wipe,pause", 120, 25),
            gc("register", "pause,clock", 150, 24),
            gc("register", "membership,kill", 180, 26),
            with("set", "membership,partition", 150, 27),
            with("register", "overload,partition", 120, 28),
            with("set", "overload,pause", 90, 29),
            aae_only("register", "overload,kill", 90, 35),
            // Two faults at once, on different nodes.
            overlap("register", "kill,partition,pause,clock", 120, 31),
            overlap("set", "powerloss,loss,disk,pause", 90, 32),
            // Power losses (every file cut back to what was fsynced).
            with("register", "powerloss,partition", 120, 33),
            with("set", "powerloss,pause", 90, 34),
            // Ring changes (joins, aborts, leaves, removes) across partitions.
            overlap("set", "membership,partition", 150, 37),
            // Second processes with a running node's id, between partitions.
            with("set", "duplicate,partition", 90, 36),
        ]),
        Some(other) => Err(format!("unknown profile {other:?}: expected ci or full")),
    }
}

fn kinds(spec: &str) -> Result<Vec<Kind>, String> {
    if spec == "none" || spec.is_empty() {
        return Ok(Vec::new());
    }
    spec.split(',').map(|s| Kind::parse(s.trim())).collect()
}

fn check_prerequisites(
    needs_root: bool,
    needs_netns: bool,
    needs_clock: bool,
    needs_powerloss: bool,
) -> Result<(), String> {
    if needs_root && !ringkv_jepsen::disk::can_mount() {
        return Err("the partition, loss and disk nemeses need root (ip netns, iptables, mount); run as root or drop them".into());
    }
    if needs_netns {
        for tool in ["ip", "iptables"] {
            let found = Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !found {
                return Err(format!(
                    "{tool} not found: install iproute2 and iptables (make deps does)"
                ));
            }
        }
    }
    if needs_powerloss && ringkv_jepsen::process::find_bin(powerloss::SHIM).is_none() {
        return Err(format!(
            "the powerloss nemesis needs {} (built by cargo build --release --workspace, next to the binaries)",
            powerloss::SHIM
        ));
    }
    if needs_clock && !std::path::Path::new(nemesis::LIBFAKETIME).exists() {
        return Err(format!(
            "the clock nemesis needs {} (Debian package libfaketime; make deps installs it)",
            nemesis::LIBFAKETIME
        ));
    }
    Ok(())
}

/// Runs the harness again inside a fresh network namespace and removes the namespace after.
fn reexec_in_netns() -> Result<ExitCode, String> {
    let name = format!("rkj-{}", std::process::id());
    let run = |args: &[&str]| nemesis::run("ip", args);
    run(&["netns", "add", &name])?;
    let result = (|| {
        run(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let status = Command::new("ip")
            .args(["netns", "exec", &name])
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(NETNS_ENV, &name)
            .status()
            .map_err(|e| format!("ip netns exec: {e}"))?;
        Ok(ExitCode::from(
            status.code().unwrap_or(2).clamp(0, 255) as u8
        ))
    })();
    let _ = run(&["netns", "del", &name]);
    result
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runs = match plan(&cli) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringkv-jepsen: {e}");
            return ExitCode::from(2);
        }
    };
    let mut all_kinds = Vec::new();
    for r in &runs {
        let ks = match kinds(&r.nemesis) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("ringkv-jepsen: {e}");
                return ExitCode::from(2);
            }
        };
        if let Err(e) = Workload::parse(&r.workload) {
            eprintln!("ringkv-jepsen: {e}");
            return ExitCode::from(2);
        }
        if ks.contains(&Kind::Disk) && ks.contains(&Kind::Overload) {
            eprintln!(
                "ringkv-jepsen: the disk and overload nemeses do not go together: the flood's writes fill the disk nemesis's {} MiB disks for real, and a node whose disk is full cannot restart",
                nemesis::DISK_MB
            );
            return ExitCode::from(2);
        }
        if let Err(e) = Kind::lanes(&ks, r.overlap) {
            eprintln!("ringkv-jepsen: {e}");
            return ExitCode::from(2);
        }
        all_kinds.extend(ks);
    }
    let needs_netns = all_kinds.iter().any(|k| k.needs_netns());
    let needs_root = all_kinds.iter().any(|k| k.needs_root());
    if let Err(e) = check_prerequisites(
        needs_root,
        needs_netns,
        all_kinds.contains(&Kind::Clock),
        all_kinds.contains(&Kind::PowerLoss),
    ) {
        eprintln!("ringkv-jepsen: missing prerequisite: {e}");
        return ExitCode::from(2);
    }
    let in_netns = std::env::var(NETNS_ENV).is_ok();
    if needs_netns && !in_netns {
        return match reexec_in_netns() {
            Ok(code) => code,
            Err(e) => {
                eprintln!("ringkv-jepsen: cannot set up the network namespace: {e}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut failed = false;
    let mut verdicts = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let seed = r.seed.unwrap_or_else(rand::random);
        let ks = kinds(&r.nemesis).expect("validated above");
        let out = r.out.join(format!(
            "{stamp}-{i}-{}-{}",
            r.workload,
            r.nemesis.replace(',', "+")
        ));
        let cfg = RunConfig {
            workload: Workload::parse(&r.workload).expect("validated above"),
            nemeses: ks.iter().map(|k| k.name()).collect(),
            kinds: ks,
            time_limit_s: r.time_limit,
            nodes: r.nodes,
            concurrency: r.concurrency,
            seed,
            out: out.clone(),
            interval_s: r.interval,
            quiet_s: r.quiet,
            rate: r.rate,
            netns: in_netns,
            n: r.n,
            sync: r.sync.clone(),
            read_fanout: r.read_fanout.clone(),
            anti_entropy_only: r.anti_entropy_only,
            tombstone_settle_s: r.tombstone_settle_secs,
            overlap: r.overlap,
        };
        eprintln!(
            "[jepsen] run {} of {}: results in {}",
            i + 1,
            runs.len(),
            out.display()
        );
        let results = match runtime.block_on(runner::run(cfg)) {
            Ok(res) => res,
            Err(e) => {
                eprintln!(
                    "ringkv-jepsen: the test could not run: {e} (node logs in {})",
                    out.display()
                );
                return ExitCode::from(2);
            }
        };
        match runner::write_results(&out, &results) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("ringkv-jepsen: cannot write results: {e}");
                return ExitCode::from(2);
            }
        }
        failed |= !results.valid;
        verdicts.push(format!(
            "run {} ({} / {}, seed {seed}): {}",
            i + 1,
            r.workload,
            r.nemesis,
            if results.valid {
                "VALID".to_string()
            } else {
                format!("INVALID: {}", results.invalid_reasons.join(" | "))
            }
        ));
    }
    if runs.len() > 1 {
        // A recap at the end, so that a log's tail shows every run's verdict and cause.
        println!("ringkv-jepsen: {} runs", runs.len());
        for v in &verdicts {
            println!("  {v}");
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
