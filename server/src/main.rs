//! The `ringkv` server binary: parse flags, set up logging, run until SIGTERM or ctrl-c.

use clap::Parser;
use ringkv_server::config::{Cli, Config, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

// mimalloc instead of glibc malloc: a request's memory is often allocated on one thread and
// freed on another (tokio workers and the store's writer thread), and glibc then takes the
// owning arena's lock; in a syscall profile of a write-only load, half of the node's futex
// calls were those arena locks (docs/benchmarks.md). mimalloc frees across threads lock-free.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let config = match Config::load(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringkv: {e}");
            std::process::exit(2);
        }
    };
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        eprintln!("ringkv: invalid --log filter {:?}: {e}", config.log);
        std::process::exit(2);
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ringkv-worker")
        .build()
        .expect("the tokio runtime starts");
    let node_id = config.node_id.clone();
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            signal.cancel();
        });
        ringkv_server::run(config, shutdown).await
    });
    // Dropping the runtime drops the last handles to storage, which closes RocksDB.
    drop(runtime);
    if let Err(e) = result {
        eprintln!("ringkv: {e}");
        tracing::error!(node = %node_id, error = %e, "exiting");
        std::process::exit(1);
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
