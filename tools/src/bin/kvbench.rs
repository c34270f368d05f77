//! kvbench: YCSB-style load generator for ringkv and the baselines (Redis, etcd, Garage K2V).
//!
//! Exit codes: 0 the run completed without errors, 1 it completed but some operations failed
//! (counted, with the first messages, in the summary), 2 it could not run.

use std::process::ExitCode;

use clap::Parser;
use ringkv_tools::bench::{self, targets::TargetKind, BenchConfig, Workload};

// mimalloc instead of glibc malloc, as in the server: the generator shares the machine with
// the nodes it measures, and in an open-loop profile at 2x the peak glibc's malloc/free were
// ~16% of its CPU (docs/benchmarks.md, Overload).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kvbench",
    version,
    about = "YCSB-style load generator for ringkv, Redis, etcd and Garage K2V"
)]
struct Cli {
    /// ringkv, redis, etcd or garage-k2v (Garage's K2V API; the access key from the
    /// environment: GARAGE_K2V_KEY_ID, GARAGE_K2V_SECRET).
    #[arg(long, default_value = "ringkv")]
    target: String,
    /// Server address(es), comma-separated; connections are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7379")]
    addr: Vec<String>,
    /// Name of this configuration in the output (e.g. "ringkv-3node").
    #[arg(long)]
    label: Option<String>,
    /// a (50/50 read/update), b (95/5), c (read only) or w (write only).
    #[arg(long, default_value = "a")]
    workload: String,
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Keys are this prefix followed by the record index (12 digits).
    #[arg(long, default_value = "user")]
    key_prefix: String,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// zipfian (0.99) or uniform.
    #[arg(long, default_value = "zipfian")]
    distribution: String,
    /// Run phase length in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop the run phase after this many operations.
    #[arg(long)]
    ops: Option<u64>,
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests in flight per connection (closed loop).
    #[arg(long, default_value_t = 16)]
    depth: usize,
    /// Open loop at this many ops/s (latency from the intended start time).
    #[arg(long)]
    rate: Option<f64>,
    /// Skip the load phase (records already written).
    #[arg(long)]
    no_load: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-request timeout in ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Threads of the generator's runtime (default: one per core). On a machine shared with the
    /// nodes under test, 1 leaves them a little more CPU (~0.02 core at 60k requests/s), but a
    /// descheduled thread then holds up every connection (docs/benchmarks.md, Overload).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// ringkv only: every connection knows every address and sends each request to a replica
    /// of its key (the client library's ring-aware routing); default: one address each.
    #[arg(long)]
    ring_aware: bool,
    /// garage-k2v only: the bucket holding the items.
    #[arg(long, default_value = "kvbench")]
    k2v_bucket: String,
    /// garage-k2v only: the region requests are signed for (Garage's `s3_region`).
    #[arg(long, default_value = "garage")]
    k2v_region: String,
    /// Also write the JSON summary to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Print the JSON summary on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let parsed =
        TargetKind::parse(&cli.target).and_then(|t| Workload::parse(&cli.workload).map(|w| (t, w)));
    let (target, workload) = match parsed {
        Ok(x) => x,
        Err(e) => {
            eprintln!("kvbench: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = BenchConfig {
        target,
        label: cli.label.unwrap_or_else(|| cli.target.clone()),
        addrs: cli.addr,
        workload,
        records: cli.records.max(1),
        key_prefix: cli.key_prefix,
        value_size: cli.value_size,
        distribution: cli.distribution,
        duration_s: cli.duration,
        max_ops: cli.ops,
        connections: cli.connections.max(1),
        depth: cli.depth.max(1),
        rate: cli.rate,
        load: !cli.no_load,
        seed: cli.seed,
        timeout_ms: cli.timeout_ms,
        ring_aware: cli.ring_aware,
        k2v_bucket: cli.k2v_bucket,
        k2v_region: cli.k2v_region,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = cli.threads {
        builder.worker_threads(t.into());
    }
    let runtime = builder
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let summary = match runtime.block_on(bench::run(cfg)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kvbench: {e}");
            return ExitCode::from(2);
        }
    };
    let json = serde_json::to_string_pretty(&summary).expect("summaries serialize");
    if let Some(path) = &cli.json_out {
        if let Err(e) = std::fs::write(path, &json) {
            eprintln!("kvbench: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if cli.json {
        println!("{json}");
    } else {
        print!("{}", bench::table(&summary));
    }
    let errors = summary.run.errors + summary.load.as_ref().map_or(0, |l| l.errors);
    if errors > 0 {
        eprintln!("kvbench: {errors} operations failed; see the summary");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
