//! Node configuration: an optional TOML file, overridden by command-line flags, then validated.
//! Every setting, its default and its limits are listed in docs/operations.md.

use std::net::SocketAddr;

use crate::admission::Limits;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::storage::store::SyncMode;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7379";
pub const DEFAULT_PEER_LISTEN: &str = "127.0.0.1:7380";
/// UDP; a separate port namespace from the TCP listeners.
pub const DEFAULT_GOSSIP_LISTEN: &str = "127.0.0.1:7380";
/// Used (with a warning) when no secret is configured: fine on a laptop, not in production.
pub const DEFAULT_CLUSTER_SECRET: &str = "ringkv-insecure-default-secret";
pub const DEFAULT_PHI_THRESHOLD: f64 = 8.0;
pub const DEFAULT_CLUSTER_NAME: &str = "ringkv";
/// Riak's and Cassandra's usual replication factor.
pub const DEFAULT_N: u8 = 3;
/// Upper bound for N: every write fans out to N replicas and every read gathers N states.
pub const MAX_N: u8 = 16;
pub const DEFAULT_VNODES: u32 = 256;
pub const MAX_VNODES: u32 = ringkv_protocol::limits::MAX_VNODES;
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
pub const DEFAULT_TIMEOUT_MS: u32 = 5_000;
/// Client gets, puts and deletes in flight per node (docs/operations.md, "Admission control").
/// Connections that are busy together are held to 3/8 of it (`admission::SHARED_FROM`); the
/// rest is for bursts of light connections.
pub const DEFAULT_MAX_REQUESTS: usize = 128;
/// MiB of client request bodies in flight per node.
pub const DEFAULT_MAX_REQUEST_MB: usize = 64;
/// Peer requests in flight per node.
pub const DEFAULT_PEER_MAX_REQUESTS: usize = 4096;
/// MiB of peer request bodies in flight per node.
pub const DEFAULT_PEER_MAX_REQUEST_MB: usize = 256;
/// Upper bound for any request deadline: a client cannot pin server resources for longer.
pub const MAX_TIMEOUT_MS: u32 = 600_000;
pub const DEFAULT_BLOCK_CACHE_MB: usize = 256;
pub const DEFAULT_WRITE_BUFFER_MB: usize = 64;

/// The cluster secret: its `Debug` never shows it (found in review: the flag, file and
/// config structs derive `Debug` with it in clear, one `debug!(?config)` from the log);
/// [`Secret::expose`] is the one way to read it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the HMAC keys only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Command-line flags. Any flag given overrides the same setting in `--config`.
#[derive(Debug, Parser, Default)]
#[command(
    name = "ringkv",
    version,
    about = "ringkv: a leaderless, Dynamo-style key-value store"
)]
pub struct Cli {
    /// TOML config file; flags override its settings.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// This node's unique, stable name ([A-Za-z0-9_.-], at most 64 characters).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Client listen address (HOST:PORT; port 0 = any free port).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Inter-node (peer) listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub peer_listen: Option<String>,
    /// Gossip (SWIM, UDP) listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub gossip_listen: Option<String>,
    /// Gossip addresses of existing members to join through (comma-separated).
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// Shared secret authenticating gossip packets and peer connections (HMAC-SHA256); also
    /// RINGKV_CLUSTER_SECRET.
    #[arg(long, env = "RINGKV_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<Secret>,
    /// Phi above which a member is treated as unavailable.
    #[arg(long)]
    pub phi_threshold: Option<f64>,
    /// Cluster name: peers presenting another name are refused.
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Replication factor N (all nodes of a cluster must agree).
    #[arg(long)]
    pub n: Option<u8>,
    /// Default read quorum R (1..=N; default a majority of N).
    #[arg(long)]
    pub r: Option<u8>,
    /// Default write quorum W (1..=N; default a majority of N).
    #[arg(long)]
    pub w: Option<u8>,
    /// Tokens (virtual nodes) this node owns on the ring.
    #[arg(long)]
    pub vnodes: Option<u32>,
    /// Data directory (created if missing).
    #[arg(long, value_name = "PATH")]
    pub data_dir: Option<PathBuf>,
    /// Durability of acknowledged writes: none, group (default) or always.
    #[arg(long)]
    pub sync: Option<String>,
    /// Most concurrent client connections; more are answered Overloaded and closed.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most requests in flight per connection; the server stops reading beyond it.
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// Default request deadline in ms, when the client sends none.
    #[arg(long)]
    pub request_timeout_ms: Option<u32>,
    /// Admin HTTP listener (/metrics, /health, /ready) as HOST:PORT, or "off" (the default).
    #[arg(long, value_name = "ADDR|off")]
    pub admin_listen: Option<String>,
    /// Client gets, puts and deletes in flight on this node; more are refused Overloaded.
    #[arg(long)]
    pub max_requests: Option<usize>,
    /// MiB of client request bodies, and of their replies until written, in flight on this
    /// node; more are refused Overloaded.
    #[arg(long)]
    pub max_request_mb: Option<usize>,
    /// Peer requests (replication, replica reads, hints, forwarded writes, anti-entropy) in
    /// flight on this node; more are refused Overloaded.
    #[arg(long)]
    pub peer_max_requests: Option<usize>,
    /// MiB of peer request bodies in flight on this node.
    #[arg(long)]
    pub peer_max_request_mb: Option<usize>,
    /// RocksDB block cache shared by all column families, in MiB.
    #[arg(long)]
    pub block_cache_mb: Option<usize>,
    /// Log filter (tracing EnvFilter syntax), e.g. info or ringkv_server=debug.
    #[arg(long)]
    pub log: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Start this run with a new actor id (a new incarnation). Required after restoring the
    /// data dir from a backup or copying it: the old actor's later versions are missing here.
    #[arg(long)]
    pub new_incarnation: bool,
    /// Hinted handoff and sloppy quorums (default true); false = writes go to primaries only
    /// and nothing is hinted (hints already held are still replayed).
    #[arg(long, value_name = "BOOL")]
    pub hinted_handoff: Option<bool>,
    /// Hint store cap over all targets, in MiB (default 1024).
    #[arg(long)]
    pub hints_max_mb: Option<u64>,
    /// Hint store cap per target node, in MiB (default 256).
    #[arg(long)]
    pub hints_max_mb_per_target: Option<u64>,
    /// Hints older than this many seconds are given up and their ranges marked for
    /// anti-entropy (default 10800 = 3 h, Cassandra's window).
    #[arg(long)]
    pub hint_window_secs: Option<u64>,
    /// Replay budget this node grants to all hint holders together, keys per second.
    #[arg(long)]
    pub hint_replay_keys_per_sec: Option<u32>,
    /// Replay budget this node grants to all hint holders together, KiB per second.
    #[arg(long)]
    pub hint_replay_kib_per_sec: Option<u64>,
    /// Read repair (default true); false leaves divergent replicas to hints and anti-entropy
    /// (for testing that those alone converge them).
    #[arg(long, value_name = "BOOL")]
    pub read_repair: Option<bool>,
    /// Which replicas a read asks: `quorum` (default: R of the live replicas, this node first,
    /// a spare started when one fails or is slow, as Cassandra) or `all` (every live replica,
    /// as Riak: more read repair, more work per read).
    #[arg(long, value_name = "quorum|all")]
    pub read_fanout: Option<String>,
    /// With `read_fanout = quorum`: milliseconds without R replies after which a read also
    /// asks a spare replica (default 20; 1–60 000).
    #[arg(long)]
    pub read_speculate_ms: Option<u32>,
    /// Join this node automatically while it owns nothing (default true): the claimant stages
    /// and commits its join, and its ranges are transferred before it owns them, like a
    /// Cassandra bootstrap. false = it waits for `kvctl cluster join` + `commit` (Riak style).
    #[arg(long, value_name = "BOOL")]
    pub auto_join: Option<bool>,
    /// Accept ring changes (`kvctl cluster join/leave/remove/replace/clear/commit`) and
    /// `kvctl repair` over the client port from other hosts than this node's own (default
    /// false: only from a loopback address, like nodetool's JMX; the client port is not
    /// authenticated). Reads of the plan and status are accepted from anywhere.
    #[arg(long, value_name = "BOOL")]
    pub cluster_admin_remote: Option<bool>,
    /// Merkle-tree anti-entropy with the other replicas (default true).
    #[arg(long, value_name = "BOOL")]
    pub anti_entropy: Option<bool>,
    /// Seconds between anti-entropy cycles over every shared range (default 600).
    #[arg(long)]
    pub aae_interval_secs: Option<u64>,
    /// Keys per second this node repairs by anti-entropy, sent and received (default 2000).
    #[arg(long)]
    pub aae_keys_per_sec: Option<u32>,
    /// Seconds a peer must have been unavailable for this node to run an anti-entropy exchange
    /// with it as soon as it is back, before the next cycle (default 30).
    #[arg(long)]
    pub aae_return_after_secs: Option<u64>,
    /// KiB per second this node repairs by anti-entropy, sent and received (default 8192).
    #[arg(long)]
    pub aae_kib_per_sec: Option<u64>,
    /// Keys per second this node receives in a ring change's transfers, and hands over after
    /// one (default 20000; scaled down by the CPU yield like every background budget).
    #[arg(long)]
    pub transfer_keys_per_sec: Option<u32>,
    /// KiB per second of the same (default 32768, Cassandra streams at 24 MiB/s).
    #[arg(long)]
    pub transfer_kib_per_sec: Option<u64>,
    /// Hours over which the verify scan recomputes the whole anti-entropy tree from the data,
    /// slowly, counting and fixing leaves that do not match (default 168 = a week; 0 = off).
    #[arg(long)]
    pub aae_verify_hours: Option<u64>,
    /// Tombstone GC: purge deleted keys' tombstones once causally stable (default true).
    #[arg(long, value_name = "BOOL")]
    pub tombstone_gc: Option<bool>,
    /// Least time between the two stability checks of a tombstone before it is purged, in
    /// seconds (default 600). Half of it is the longest request deadline and half the longest a
    /// peer write may wait to be applied: nothing in flight at the first check outlives it.
    #[arg(long)]
    pub tombstone_settle_secs: Option<u64>,
}

/// The TOML file: the same settings as the flags, with underscores.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<String>,
    pub listen: Option<String>,
    pub peer_listen: Option<String>,
    pub gossip_listen: Option<String>,
    pub seeds: Option<Vec<String>>,
    pub cluster_secret: Option<Secret>,
    pub phi_threshold: Option<f64>,
    pub cluster_name: Option<String>,
    pub n: Option<u8>,
    pub r: Option<u8>,
    pub w: Option<u8>,
    pub vnodes: Option<u32>,
    pub data_dir: Option<PathBuf>,
    pub sync: Option<String>,
    pub max_connections: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub request_timeout_ms: Option<u32>,
    pub admin_listen: Option<String>,
    pub max_requests: Option<usize>,
    pub max_request_mb: Option<usize>,
    pub peer_max_requests: Option<usize>,
    pub peer_max_request_mb: Option<usize>,
    pub block_cache_mb: Option<usize>,
    pub write_buffer_mb: Option<usize>,
    pub log: Option<String>,
    pub log_format: Option<String>,
    pub hinted_handoff: Option<bool>,
    pub hints_max_mb: Option<u64>,
    pub hints_max_mb_per_target: Option<u64>,
    pub hint_window_secs: Option<u64>,
    pub hint_replay_keys_per_sec: Option<u32>,
    pub hint_replay_kib_per_sec: Option<u64>,
    pub read_repair: Option<bool>,
    pub read_fanout: Option<String>,
    pub read_speculate_ms: Option<u32>,
    pub auto_join: Option<bool>,
    pub cluster_admin_remote: Option<bool>,
    pub anti_entropy: Option<bool>,
    pub aae_interval_secs: Option<u64>,
    pub aae_keys_per_sec: Option<u32>,
    pub aae_return_after_secs: Option<u64>,
    pub aae_kib_per_sec: Option<u64>,
    pub transfer_keys_per_sec: Option<u32>,
    pub transfer_kib_per_sec: Option<u64>,
    pub aae_verify_hours: Option<u64>,
    pub tombstone_gc: Option<bool>,
    pub tombstone_settle_secs: Option<u64>,
}

/// Anti-entropy settings (docs/operations.md, "Anti-entropy").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AaeSettings {
    pub enabled: bool,
    pub interval_secs: u64,
    pub keys_per_sec: u32,
    /// A peer down at least this long is synced as soon as it is back.
    pub return_after_secs: u64,
    /// Bytes of states repaired per second (with `keys_per_sec`, the tighter applies).
    pub kib_per_sec: u64,
    /// The budgets of ring-change transfers and hand-overs.
    pub transfer_keys_per_sec: u32,
    pub transfer_kib_per_sec: u64,
    /// One verify scan of the whole tree takes this long (0: no verify scan).
    pub verify_hours: u64,
    /// The `tombstone_gc` worker (its passes run every `interval_secs`).
    pub tombstone_gc: bool,
    pub tombstone_settle_secs: u64,
}

impl AaeSettings {
    /// The tombstone settle time while tombstone GC runs (`None`: off). Half of it bounds a
    /// request's deadline (`Timeouts`), half how long a peer write may wait to be applied
    /// (`Store::limit_peer_writes`).
    pub fn settle(&self) -> Option<std::time::Duration> {
        self.tombstone_gc
            .then(|| std::time::Duration::from_secs(self.tombstone_settle_secs))
    }
}

impl Default for AaeSettings {
    fn default() -> Self {
        AaeSettings {
            enabled: true,
            // Garage syncs every 10 minutes, Riak exchanges every 8.
            interval_secs: 600,
            keys_per_sec: 2_000,
            return_after_secs: 30,
            // Cassandra streams at 24 MiB/s by default; a Riak exchange at up to 800 MB/s
            // hurt its foreground (riak_kv#689).
            kib_per_sec: 8 << 10,
            // A new node fills at tens of thousands of keys/s when the machine is free (the
            // anti-entropy budget, 2 000 keys/s, took a minute for 80 000 keys:
            // docs/benchmarks.md); the CPU yield still slows it under load.
            transfer_keys_per_sec: 20_000,
            transfer_kib_per_sec: 32 << 10,
            verify_hours: 168,
            tombstone_gc: true,
            // The longest request deadline (`MAX_TIMEOUT_MS`).
            tombstone_settle_secs: MAX_TIMEOUT_MS as u64 / 1000,
        }
    }
}

/// Hinted handoff settings (docs/operations.md, "Hinted handoff").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HintSettings {
    /// Sloppy quorums and new hints (replay of held hints runs regardless).
    pub enabled: bool,
    pub max_bytes: u64,
    pub max_bytes_per_target: u64,
    pub window_secs: u64,
    pub replay_keys_per_sec: u32,
    pub replay_bytes_per_sec: u64,
}

impl Default for HintSettings {
    fn default() -> Self {
        HintSettings {
            enabled: true,
            max_bytes: 1024 << 20,
            max_bytes_per_target: 256 << 20,
            window_secs: 3 * 3600,
            // About a tenth of what one node commits per second on the benchmark machine
            // (docs/benchmarks.md): a recovering node keeps most of its capacity for clients.
            replay_keys_per_sec: 5_000,
            replay_bytes_per_sec: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: String,
    pub listen: SocketAddr,
    pub peer_listen: SocketAddr,
    pub gossip_listen: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    pub cluster_secret: Secret,
    /// True when the secret is the built-in default (logged as a warning).
    pub default_secret: bool,
    pub phi_threshold: f64,
    pub cluster_name: String,
    pub n: u8,
    pub r: u8,
    pub w: u8,
    pub vnodes: u32,
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub timeouts: Timeouts,
    /// The admin HTTP listener; `None` = off.
    pub admin_listen: Option<SocketAddr>,
    /// The client budget (admission control).
    pub client_budget: Limits,
    /// The peer budget (admission control).
    pub peer_budget: Limits,
    pub block_cache_mb: usize,
    pub write_buffer_mb: usize,
    pub log: String,
    pub log_format: LogFormat,
    /// Start with a new actor (`--new-incarnation`, one-shot).
    pub new_incarnation: bool,
    pub hints: HintSettings,
    pub aae: AaeSettings,
    pub read_repair: bool,
    pub read_fanout: ReadFanout,
    pub read_speculate_ms: u32,
    pub auto_join: bool,
    /// Ring changes and repairs accepted from other hosts (else from loopback only).
    pub cluster_admin_remote: bool,
}

/// The deadlines this node gives client requests (docs/operations.md, "Deadlines").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The deadline of a request that names none (`request_timeout_ms`).
    pub default_ms: u32,
    /// The longest deadline a request may have; longer ones are cut to it. `MAX_TIMEOUT_MS`,
    /// and with tombstone GC at most half the settle time: a read repair or a coordinator's
    /// own hint can carry a state read at a request's start until its deadline, and is then
    /// applied within the other half (`Store::peer_write_limit`), so it lands before a
    /// tombstone checked stable at the request's start can be purged (aae/gc.rs).
    pub longest_ms: u32,
}

impl Timeouts {
    fn new(default_ms: Option<u32>, aae: &AaeSettings) -> Result<Timeouts, ConfigError> {
        let longest_ms = aae.settle().map_or(MAX_TIMEOUT_MS, |settle| {
            let half_settle_ms = (settle / 2).as_millis();
            MAX_TIMEOUT_MS.min(u32::try_from(half_settle_ms).unwrap_or(u32::MAX))
        });
        match default_ms {
            None => Ok(Timeouts {
                default_ms: DEFAULT_TIMEOUT_MS.min(longest_ms),
                longest_ms,
            }),
            Some(ms) if ms > longest_ms => Err(invalid(
                "request_timeout_ms",
                format!(
                    "{ms} ms is longer than half of tombstone_settle_secs ({} s): a \
                     request could outlive a deleted key's settle time and bring its value \
                     back after the purge; lower request_timeout_ms to at most {longest_ms} \
                     or raise tombstone_settle_secs",
                    aae.tombstone_settle_secs
                ),
            )),
            Some(ms) => Ok(Timeouts {
                default_ms: ms,
                longest_ms,
            }),
        }
    }

    /// The deadline of a request that asked for `asked_ms` (0: none).
    pub fn resolve(&self, asked_ms: u32) -> u32 {
        if asked_ms == 0 {
            self.default_ms
        } else {
            asked_ms.min(self.longest_ms)
        }
    }
}

/// Which replicas a read asks (`--read-fanout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFanout {
    /// R of the live replicas, spares on failure or after `read_speculate_ms`.
    Quorum,
    /// Every live replica.
    All,
}

impl std::str::FromStr for ReadFanout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quorum" => Ok(ReadFanout::Quorum),
            "all" => Ok(ReadFanout::All),
            other => Err(format!("{other:?}: expected quorum or all")),
        }
    }
}

/// Default of `read_speculate_ms`.
pub const DEFAULT_READ_SPECULATE_MS: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}")]
    Read { path: String, cause: String },
    #[error("invalid config file {path}: {cause}")]
    Parse { path: String, cause: String },
    #[error("missing setting {0} (give --{1} or set {0} in the config file)")]
    Missing(&'static str, &'static str),
    #[error("invalid {setting}: {cause}")]
    Invalid {
        setting: &'static str,
        cause: String,
    },
}

fn invalid(setting: &'static str, cause: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        cause: cause.into(),
    }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    setting: &'static str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        Err(invalid(setting, format!("{v} is outside {lo}..={hi}")))
    } else {
        Ok(v)
    }
}

/// A budget's MiB of request bodies in flight: at most 65 536, and at least the largest
/// valid request body `largest` (bytes), which the budget could otherwise never admit while
/// anything else is in flight.
fn byte_budget_mb(
    setting: &'static str,
    mb: usize,
    largest: usize,
    what: &str,
) -> Result<usize, ConfigError> {
    let least = largest.div_ceil(1 << 20);
    if mb < least {
        return Err(invalid(
            setting,
            format!(
                "{mb} MiB is less than the largest {what}, {largest} bytes: at least {least} \
                 (a request larger than the budget is admitted only when nothing else is in \
                 flight, so under steady traffic never)"
            ),
        ));
    }
    in_range(setting, mb, least, 1 << 16)
}

impl Config {
    /// Reads `--config` (if any), applies the flags on top and validates the result.
    pub fn load(cli: Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let node_id = cli
            .node_id
            .or(file.node_id)
            .ok_or(ConfigError::Missing("node_id", "node-id"))?;
        validate_node_id(&node_id)?;
        let listen_s = cli
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_s.parse().map_err(|e| {
            invalid(
                "listen",
                format!("{listen_s:?} is not HOST:PORT with a numeric IP ({e})"),
            )
        })?;
        let peer_s = cli
            .peer_listen
            .or(file.peer_listen)
            .unwrap_or_else(|| DEFAULT_PEER_LISTEN.to_string());
        let peer_listen: SocketAddr = peer_s.parse().map_err(|e| {
            invalid(
                "peer_listen",
                format!("{peer_s:?} is not HOST:PORT with a numeric IP ({e})"),
            )
        })?;
        if peer_listen == listen && listen.port() != 0 {
            return Err(invalid(
                "peer_listen",
                format!("{peer_listen} is also the client listen address"),
            ));
        }
        let gossip_s = cli
            .gossip_listen
            .or(file.gossip_listen)
            .unwrap_or_else(|| DEFAULT_GOSSIP_LISTEN.to_string());
        let gossip_listen: SocketAddr = gossip_s.parse().map_err(|e| {
            invalid(
                "gossip_listen",
                format!("{gossip_s:?} is not HOST:PORT with a numeric IP ({e})"),
            )
        })?;
        let mut seeds = Vec::new();
        for seed in cli.seeds.or(file.seeds).unwrap_or_default() {
            let seed = seed.trim();
            if seed.is_empty() {
                continue;
            }
            seeds.push(seed.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "seeds",
                    format!("{seed:?} is not a gossip HOST:PORT with a numeric IP ({e})"),
                )
            })?);
        }
        let (cluster_secret, default_secret) = match cli.cluster_secret.or(file.cluster_secret) {
            Some(s) if s.expose().is_empty() => {
                return Err(invalid("cluster_secret", "empty secret"))
            }
            Some(s) => (s, false),
            None => (Secret::new(DEFAULT_CLUSTER_SECRET), true),
        };
        let phi_threshold = cli
            .phi_threshold
            .or(file.phi_threshold)
            .unwrap_or(DEFAULT_PHI_THRESHOLD);
        if !(phi_threshold.is_finite() && (1.0..=50.0).contains(&phi_threshold)) {
            return Err(invalid(
                "phi_threshold",
                format!("{phi_threshold} is outside 1..=50"),
            ));
        }
        let cluster_name = cli
            .cluster_name
            .or(file.cluster_name)
            .unwrap_or_else(|| DEFAULT_CLUSTER_NAME.to_string());
        validate_name("cluster_name", &cluster_name)?;
        let n = in_range("n", cli.n.or(file.n).unwrap_or(DEFAULT_N), 1, MAX_N)?;
        let majority = n / 2 + 1;
        let r = in_range("r", cli.r.or(file.r).unwrap_or(majority), 1, n)?;
        let w = in_range("w", cli.w.or(file.w).unwrap_or(majority), 1, n)?;
        let vnodes = in_range(
            "vnodes",
            cli.vnodes.or(file.vnodes).unwrap_or(DEFAULT_VNODES),
            1,
            MAX_VNODES,
        )?;
        let data_dir = cli
            .data_dir
            .or(file.data_dir)
            .ok_or(ConfigError::Missing("data_dir", "data-dir"))?;
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "empty path"));
        }
        if data_dir.exists() && !data_dir.is_dir() {
            return Err(invalid(
                "data_dir",
                format!("{} exists and is not a directory", data_dir.display()),
            ));
        }
        let sync = match cli.sync.or(file.sync) {
            Some(s) => s.parse::<SyncMode>().map_err(|e| invalid("sync", e))?,
            None => SyncMode::Group,
        };
        let max_connections = in_range(
            "max_connections",
            cli.max_connections
                .or(file.max_connections)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            1,
            65_536,
        )?;
        let max_in_flight = in_range(
            "max_in_flight",
            cli.max_in_flight
                .or(file.max_in_flight)
                .unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            1,
            65_536,
        )?;
        let request_timeout_ms = cli
            .request_timeout_ms
            .or(file.request_timeout_ms)
            .map(|ms| in_range("request_timeout_ms", ms, 1, MAX_TIMEOUT_MS))
            .transpose()?;
        let admin_listen = match cli.admin_listen.or(file.admin_listen) {
            None => None,
            Some(a) if a == "off" => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "admin_listen",
                    format!("{a:?} is not HOST:PORT with a numeric IP, or off ({e})"),
                )
            })?),
        };
        let client_budget = Limits {
            requests: in_range(
                "max_requests",
                cli.max_requests
                    .or(file.max_requests)
                    .unwrap_or(DEFAULT_MAX_REQUESTS),
                1,
                1 << 20,
            )?,
            bytes: byte_budget_mb(
                "max_request_mb",
                cli.max_request_mb
                    .or(file.max_request_mb)
                    .unwrap_or(DEFAULT_MAX_REQUEST_MB),
                ringkv_protocol::limits::MAX_REQUEST_BODY_LEN,
                "client request",
            )? << 20,
        };
        let peer_budget = Limits {
            requests: in_range(
                "peer_max_requests",
                cli.peer_max_requests
                    .or(file.peer_max_requests)
                    .unwrap_or(DEFAULT_PEER_MAX_REQUESTS),
                16,
                1 << 20,
            )?,
            bytes: byte_budget_mb(
                "peer_max_request_mb",
                cli.peer_max_request_mb
                    .or(file.peer_max_request_mb)
                    .unwrap_or(DEFAULT_PEER_MAX_REQUEST_MB),
                ringkv_protocol::limits::MAX_PEER_BODY_LEN,
                "peer request (a replica write of the largest state)",
            )? << 20,
        };
        let block_cache_mb = in_range(
            "block_cache_mb",
            cli.block_cache_mb
                .or(file.block_cache_mb)
                .unwrap_or(DEFAULT_BLOCK_CACHE_MB),
            8,
            1 << 20,
        )?;
        let write_buffer_mb = in_range(
            "write_buffer_mb",
            file.write_buffer_mb.unwrap_or(DEFAULT_WRITE_BUFFER_MB),
            4,
            4096,
        )?;
        let defaults = HintSettings::default();
        let hints_max_mb = in_range(
            "hints_max_mb",
            cli.hints_max_mb
                .or(file.hints_max_mb)
                .unwrap_or(defaults.max_bytes >> 20),
            1,
            1 << 20,
        )?;
        let hints_max_mb_per_target = in_range(
            "hints_max_mb_per_target",
            cli.hints_max_mb_per_target
                .or(file.hints_max_mb_per_target)
                .unwrap_or((defaults.max_bytes_per_target >> 20).min(hints_max_mb)),
            1,
            hints_max_mb,
        )?;
        let hints = HintSettings {
            enabled: cli
                .hinted_handoff
                .or(file.hinted_handoff)
                .unwrap_or(defaults.enabled),
            max_bytes: hints_max_mb << 20,
            max_bytes_per_target: hints_max_mb_per_target << 20,
            window_secs: in_range(
                "hint_window_secs",
                cli.hint_window_secs
                    .or(file.hint_window_secs)
                    .unwrap_or(defaults.window_secs),
                1,
                30 * 24 * 3600,
            )?,
            replay_keys_per_sec: in_range(
                "hint_replay_keys_per_sec",
                cli.hint_replay_keys_per_sec
                    .or(file.hint_replay_keys_per_sec)
                    .unwrap_or(defaults.replay_keys_per_sec),
                1,
                10_000_000,
            )?,
            replay_bytes_per_sec: in_range(
                "hint_replay_kib_per_sec",
                cli.hint_replay_kib_per_sec
                    .or(file.hint_replay_kib_per_sec)
                    .unwrap_or(defaults.replay_bytes_per_sec >> 10),
                64,
                16 << 20,
            )? << 10,
        };
        let aae_defaults = AaeSettings::default();
        let aae = AaeSettings {
            enabled: cli
                .anti_entropy
                .or(file.anti_entropy)
                .unwrap_or(aae_defaults.enabled),
            interval_secs: in_range(
                "aae_interval_secs",
                cli.aae_interval_secs
                    .or(file.aae_interval_secs)
                    .unwrap_or(aae_defaults.interval_secs),
                1,
                7 * 24 * 3600,
            )?,
            keys_per_sec: in_range(
                "aae_keys_per_sec",
                cli.aae_keys_per_sec
                    .or(file.aae_keys_per_sec)
                    .unwrap_or(aae_defaults.keys_per_sec),
                1,
                10_000_000,
            )?,
            return_after_secs: in_range(
                "aae_return_after_secs",
                cli.aae_return_after_secs
                    .or(file.aae_return_after_secs)
                    .unwrap_or(aae_defaults.return_after_secs),
                1,
                7 * 24 * 3600,
            )?,
            kib_per_sec: in_range(
                "aae_kib_per_sec",
                cli.aae_kib_per_sec
                    .or(file.aae_kib_per_sec)
                    .unwrap_or(aae_defaults.kib_per_sec),
                16,
                16 << 20,
            )?,
            transfer_keys_per_sec: in_range(
                "transfer_keys_per_sec",
                cli.transfer_keys_per_sec
                    .or(file.transfer_keys_per_sec)
                    .unwrap_or(aae_defaults.transfer_keys_per_sec),
                1,
                10_000_000,
            )?,
            transfer_kib_per_sec: in_range(
                "transfer_kib_per_sec",
                cli.transfer_kib_per_sec
                    .or(file.transfer_kib_per_sec)
                    .unwrap_or(aae_defaults.transfer_kib_per_sec),
                16,
                16 << 20,
            )?,
            verify_hours: in_range(
                "aae_verify_hours",
                cli.aae_verify_hours
                    .or(file.aae_verify_hours)
                    .unwrap_or(aae_defaults.verify_hours),
                0,
                24 * 365,
            )?,
            tombstone_gc: cli
                .tombstone_gc
                .or(file.tombstone_gc)
                .unwrap_or(aae_defaults.tombstone_gc),
            tombstone_settle_secs: in_range(
                "tombstone_settle_secs",
                cli.tombstone_settle_secs
                    .or(file.tombstone_settle_secs)
                    .unwrap_or(aae_defaults.tombstone_settle_secs),
                2,
                30 * 24 * 3600,
            )?,
        };
        let timeouts = Timeouts::new(request_timeout_ms, &aae)?;
        let log = cli.log.or(file.log).unwrap_or_else(|| "info".into());
        let log_format = match cli.log_format.or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?}: expected text or json"),
                ))
            }
        };
        Ok(Config {
            node_id,
            listen,
            peer_listen,
            gossip_listen,
            seeds,
            cluster_secret,
            default_secret,
            phi_threshold,
            cluster_name,
            n,
            r,
            w,
            vnodes,
            data_dir,
            sync,
            max_connections,
            max_in_flight,
            timeouts,
            admin_listen,
            client_budget,
            peer_budget,
            block_cache_mb,
            write_buffer_mb,
            log,
            log_format,
            new_incarnation: cli.new_incarnation,
            hints,
            aae,
            read_repair: cli.read_repair.or(file.read_repair).unwrap_or(true),
            read_fanout: match cli.read_fanout.or(file.read_fanout) {
                Some(s) => s.parse().map_err(|e| invalid("read_fanout", e))?,
                None => ReadFanout::Quorum,
            },
            read_speculate_ms: in_range(
                "read_speculate_ms",
                cli.read_speculate_ms
                    .or(file.read_speculate_ms)
                    .unwrap_or(DEFAULT_READ_SPECULATE_MS),
                1,
                60_000,
            )?,
            auto_join: cli.auto_join.or(file.auto_join).unwrap_or(true),
            cluster_admin_remote: cli
                .cluster_admin_remote
                .or(file.cluster_admin_remote)
                .unwrap_or(false),
        })
    }

    /// Where the node writes the address it actually bound (useful with port 0).
    pub fn addr_file(&self) -> PathBuf {
        self.data_dir.join(ADDR_FILE)
    }
}

/// File in the data dir holding `client=HOST:PORT`, `peer=HOST:PORT` and `gossip=HOST:PORT`
/// once the node accepts connections.
pub const ADDR_FILE: &str = "ringkv.addr";

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        cause: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        cause: parse_error(&text, &e),
    })
}

/// A config file's parse error for the operator: where and what, without the source lines toml
/// quotes, and without even the message when the error is on the `cluster_secret` line (a
/// message like "invalid type: integer `123456`" would print the secret to the log).
fn parse_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let before = |at: usize| &text.as_bytes()[..at.min(text.len())];
    let line_of = |at: usize| before(at).iter().filter(|b| **b == b'\n').count();
    let (first, last) = (line_of(span.start), line_of(span.end));
    let line_start = before(span.start)
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let col = span.start.min(text.len()) - line_start + 1;
    let on_secret = text
        .lines()
        .skip(first)
        .take(last - first + 1)
        .any(|l| l.contains("secret"));
    if on_secret {
        format!(
            "line {}: invalid cluster_secret (it must be a quoted string; its value is not shown)",
            first + 1
        )
    } else {
        format!("line {}, column {col}: {}", first + 1, e.message())
    }
}

pub fn validate_node_id(id: &str) -> Result<(), ConfigError> {
    validate_name("node_id", id)
}

fn validate_name(setting: &'static str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > 64 {
        return Err(invalid(
            setting,
            format!("{id:?} must be 1 to 64 characters"),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(invalid(
            setting,
            format!("{id:?} contains {c:?}; allowed: A-Z a-z 0-9 _ . -"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: toml's error quotes the offending line (and type errors their value),
    /// so an unquoted or numeric secret was printed to stderr and the logs.
    #[test]
    fn a_config_parse_error_never_shows_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        for (text, secret) in [
            (
                "node_id = \"a\"\ncluster_secret = 8f1b2c3d4e5f\n",
                "8f1b2c3d4e5f",
            ),
            ("node_id = \"a\"\ncluster_secret = 123456789\n", "123456789"),
            (
                "cluster_secret = \"s3cr3t-value\nnode_id = \"a\"\n",
                "s3cr3t-value",
            ),
        ] {
            let path = dir.path().join("n.toml");
            std::fs::write(&path, text).unwrap();
            let e = read_file(&path).expect_err(text).to_string();
            assert!(!e.contains(secret), "{e}");
            assert!(e.contains("cluster_secret") && e.contains("line"), "{e}");
        }
        // Other errors still say where and what.
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "node_id = \"a\"\nvnodes = \"many\"\n").unwrap();
        let e = read_file(&path)
            .expect_err("a string for a number")
            .to_string();
        assert!(e.contains("line 2") && e.contains("invalid type"), "{e}");
    }

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["ringkv"];
        all.extend_from_slice(args);
        Cli::parse_from(all)
    }

    /// Found in review: the secret was in clear in the derived `Debug` of the flags, the file
    /// settings and the validated config (and of the gossip settings), one `debug!(?config)`
    /// away from the log.
    #[test]
    fn no_debug_print_of_the_settings_shows_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "cluster_secret = \"from-the-file-7c1e\"\n").unwrap();
        let file = read_file(&path).unwrap();
        assert_eq!(
            file.cluster_secret.as_ref().map(Secret::expose),
            Some("from-the-file-7c1e")
        );
        assert!(!format!("{file:?}").contains("from-the-file-7c1e"));
        let flags = cli(&[
            "--node-id",
            "a",
            "--data-dir",
            "/tmp/x",
            "--n",
            "1",
            "--cluster-secret",
            "from-the-flag-9d2f",
        ]);
        assert!(!format!("{flags:?}").contains("from-the-flag-9d2f"));
        let config = Config::load(flags).unwrap();
        assert_eq!(config.cluster_secret.expose(), "from-the-flag-9d2f");
        let shown = format!("{config:?}");
        assert!(!shown.contains("from-the-flag-9d2f"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            "node_id = \"a\"\nlisten = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\nsync = \"none\"\n",
        )
        .unwrap();
        let c = Config::load(cli(&[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]))
        .unwrap();
        assert_eq!(c.node_id, "a");
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.sync, SyncMode::None);
        assert_eq!(c.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(
            (c.n, c.r, c.w),
            (3, 2, 2),
            "quorums default to a majority of N"
        );
        let c = Config::load(cli(&["--node-id", "a", "--data-dir", "/tmp/x", "--n", "1"])).unwrap();
        assert_eq!((c.n, c.r, c.w), (1, 1, 1));
    }

    #[test]
    fn no_request_deadline_outlasts_the_tombstone_settle_time() {
        let base = ["--node-id", "a", "--data-dir", "/x"];
        let load = |extra: &[&str]| Config::load(cli(&[&base[..], extra].concat()));
        let c = load(&[]).unwrap();
        assert_eq!(
            c.timeouts,
            Timeouts {
                default_ms: DEFAULT_TIMEOUT_MS,
                longest_ms: 300_000
            },
            "half the default settle time is the longest deadline"
        );
        // A settle time of 4 s cuts every deadline to 2 s, the default one included.
        let c = load(&["--tombstone-settle-secs", "4"]).unwrap();
        assert_eq!((c.timeouts.default_ms, c.timeouts.longest_ms), (2000, 2000));
        assert_eq!(c.timeouts.resolve(0), 2000);
        assert_eq!(c.timeouts.resolve(60_000), 2000);
        assert_eq!(c.timeouts.resolve(500), 500);
        let c = load(&[
            "--tombstone-settle-secs",
            "30",
            "--request-timeout-ms",
            "800",
        ])
        .unwrap();
        assert_eq!(
            (c.timeouts.default_ms, c.timeouts.longest_ms),
            (800, 15_000)
        );
        // Without tombstone GC the settle time bounds nothing.
        let c = load(&["--tombstone-gc", "false", "--tombstone-settle-secs", "2"]).unwrap();
        assert_eq!(c.timeouts.resolve(60_000), 60_000);
        assert_eq!(c.timeouts.resolve(u32::MAX), MAX_TIMEOUT_MS);
        // A default deadline set longer than half the settle time is refused, naming both.
        let e = load(&[
            "--tombstone-settle-secs",
            "4",
            "--request-timeout-ms",
            "5000",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("request_timeout_ms") && e.contains("tombstone_settle_secs"),
            "{e}"
        );
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        let cases: &[(&[&str], &str)] = &[
            (&["--data-dir", "/tmp/x"], "node_id"),
            (&["--node-id", "a b", "--data-dir", "/tmp/x"], "node_id"),
            (&["--node-id", "a"], "data_dir"),
            (
                &[
                    "--node-id",
                    "a",
                    "--data-dir",
                    "/tmp/x",
                    "--listen",
                    "localhost",
                ],
                "listen",
            ),
            (
                &[
                    "--node-id",
                    "a",
                    "--data-dir",
                    "/tmp/x",
                    "--sync",
                    "sometimes",
                ],
                "sync",
            ),
            (
                &[
                    "--node-id",
                    "a",
                    "--data-dir",
                    "/tmp/x",
                    "--read-fanout",
                    "most",
                ],
                "read_fanout",
            ),
            (
                &[
                    "--node-id",
                    "a",
                    "--data-dir",
                    "/tmp/x",
                    "--read-speculate-ms",
                    "0",
                ],
                "read_speculate_ms",
            ),
            (
                &[
                    "--node-id",
                    "a",
                    "--data-dir",
                    "/tmp/x",
                    "--max-in-flight",
                    "0",
                ],
                "max_in_flight",
            ),
            (
                &["--node-id", "a", "--data-dir", "/x", "--n", "3", "--w", "4"],
                "invalid w",
            ),
            (
                &["--node-id", "a", "--data-dir", "/x", "--n", "0"],
                "invalid n",
            ),
            (
                &["--node-id", "a", "--data-dir", "/x", "--seeds", "nohost"],
                "seeds",
            ),
            (
                &[
                    "--node-id",
                    "a",
                    "--data-dir",
                    "/x",
                    "--cluster-name",
                    "a b",
                ],
                "cluster_name",
            ),
            (
                &[
                    "--node-id",
                    "a",
                    "--data-dir",
                    "/x",
                    "--phi-threshold",
                    "0.5",
                ],
                "phi_threshold",
            ),
            (
                &["--node-id", "a", "--data-dir", "/x", "--gossip-listen", "x"],
                "gossip_listen",
            ),
        ];
        for (args, setting) in cases {
            let err = Config::load(cli(args)).unwrap_err().to_string();
            assert!(err.contains(setting), "{args:?}: {err}");
        }
    }

    /// A byte budget smaller than the largest valid request would refuse such a request
    /// whenever anything else is in flight: under steady traffic, forever (a replica write of
    /// a large state, and so W, would never get in).
    #[test]
    fn a_byte_budget_smaller_than_the_largest_request_is_refused() {
        let base = ["--node-id", "a", "--data-dir", "/x"];
        for (flag, setting) in [
            ("--max-request-mb", "max_request_mb"),
            ("--peer-max-request-mb", "peer_max_request_mb"),
        ] {
            let args: Vec<&str> = base.iter().copied().chain([flag, "1"]).collect();
            let err = Config::load(cli(&args)).unwrap_err().to_string();
            assert!(
                err.contains(setting) && err.contains("largest"),
                "{args:?}: {err}"
            );
        }
        let c = Config::load(cli(&base)).unwrap();
        assert!(c.client_budget.bytes >= ringkv_protocol::limits::MAX_REQUEST_BODY_LEN);
        assert!(c.peer_budget.bytes >= ringkv_protocol::limits::MAX_PEER_BODY_LEN);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "node_id = \"a\"\nlisten_addr = \"x\"\n").unwrap();
        let err = Config::load(cli(&["--config", path.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }
}
