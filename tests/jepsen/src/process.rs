//! Real `ringkv` server processes: start, wait until ready, SIGTERM, kill -9, restart.
//! Used by the integration tests of every crate and by the harness.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a node may take to open storage and bind its port.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful shutdown may take before it counts as hung.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds a workspace binary: `$RINGKV_BIN_DIR/<name>`, else next to (or above) the running
/// executable, which is where cargo puts test binaries (`target/<profile>/deps/..`), else in
/// `$CARGO_TARGET_DIR/release` (doctests run from a temp dir).
pub fn bin_path(name: &str) -> PathBuf {
    find_bin(name).unwrap_or_else(|| {
        panic!(
            "binary {name} not found near {}: build it first (cargo build --release --bins) or set RINGKV_BIN_DIR",
            std::env::current_exe().map_or("?".into(), |e| e.display().to_string())
        )
    })
}

/// `bin_path`'s search; `None` when the file is nowhere (under `RINGKV_BIN_DIR`, it must be
/// there).
pub fn find_bin(name: &str) -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("RINGKV_BIN_DIR") {
        let candidate = Path::new(&dir).join(name);
        return candidate.is_file().then_some(candidate);
    }
    let exe = std::env::current_exe().expect("the running executable has a path");
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    let dir = std::env::var("CARGO_TARGET_DIR").ok()?;
    let candidate = Path::new(&dir).join("release").join(name);
    candidate.is_file().then_some(candidate)
}

/// Runs the workspace tool `name` (`kvctl`, `kvbench`) with `args`, which must succeed (its
/// stderr is the panic message otherwise), and parses what it prints as JSON (`--json`).
pub fn tool_json(name: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin_path(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} did not run: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{name} {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[derive(Debug)]
pub struct NodeProcess {
    pub id: String,
    pub data_dir: PathBuf,
    /// The client address the node bound (known once ready).
    pub addr: String,
    /// The peer (inter-node) address the node bound (known once ready).
    pub peer_addr: String,
    /// The gossip (SWIM, UDP) address the node bound (known once ready).
    pub gossip_addr: String,
    /// The admin HTTP address (`--admin-listen`), empty when the node has none.
    pub admin_addr: String,
    listen: String,
    /// IP for the peer and gossip listeners when their ports are not known yet.
    ip: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl NodeProcess {
    /// Starts a node with a fresh temporary data dir on free 127.0.0.1 ports (`fixed_port`).
    pub fn start_temp(id: &str, extra: &[&str]) -> NodeProcess {
        let mut node = NodeProcess::new_temp(id, extra);
        node.start().unwrap_or_else(|e| panic!("{e}"));
        node
    }

    /// A node with a fresh temporary data dir, not yet started.
    pub fn new_temp(id: &str, extra: &[&str]) -> NodeProcess {
        NodeProcess::in_temp_dir(id, &format!("ringkv-{id}-"), "127.0.0.1:0", extra)
    }

    /// A node not yet started, on a fresh temporary data dir named from `prefix` (removed
    /// when the node is dropped).
    fn in_temp_dir(id: &str, prefix: &str, listen: &str, extra: &[&str]) -> NodeProcess {
        let temp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create a temp dir");
        let mut node = NodeProcess::new(id, temp.path(), listen, extra);
        node._temp = Some(temp);
        node
    }

    /// A second process for this node's id, not yet started (the duplicate nemesis, tests):
    /// a fresh temporary data dir, new ports on the same IP, this node's flags with its
    /// `--seeds` replaced by `seeds`, and none of its environment (no clock or power-loss
    /// shim: those act on this node's own files).
    pub fn twin(&self, seeds: &[String]) -> NodeProcess {
        let mut extra = Vec::new();
        let mut args = self.extra.iter();
        while let Some(a) = args.next() {
            if a == "--seeds" {
                args.next();
            } else if !a.starts_with("--seeds=") {
                extra.push(a.as_str());
            }
        }
        let seeds = seeds.join(",");
        if !seeds.is_empty() {
            extra.extend(["--seeds", seeds.as_str()]);
        }
        NodeProcess::in_temp_dir(
            &self.id,
            &format!("ringkv-{}-twin-", self.id),
            &format!("{}:0", self.ip),
            &extra,
        )
    }

    /// A node not yet started.
    pub fn new(id: &str, data_dir: &Path, listen: &str, extra: &[&str]) -> NodeProcess {
        NodeProcess {
            id: id.to_string(),
            data_dir: data_dir.to_path_buf(),
            addr: String::new(),
            peer_addr: String::new(),
            gossip_addr: String::new(),
            admin_addr: String::new(),
            listen: listen.to_string(),
            ip: listen
                .rsplit_once(':')
                .map_or("127.0.0.1", |(ip, _)| ip)
                .to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
            log: data_dir.join("node.log"),
            _temp: None,
        }
    }

    fn addr_file(&self) -> PathBuf {
        self.data_dir.join("ringkv.addr")
    }

    /// Spawns the process and waits until it accepts connections. On restart the node binds
    /// the same address it had before, so clients can reconnect.
    pub fn start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        std::fs::create_dir_all(&self.data_dir).map_err(|e| e.to_string())?;
        if let Some(log) = self.env_var(crate::powerloss::SYNC_LOG_ENV) {
            // Under the power-loss shim: what is on disk now is durable for this life.
            crate::powerloss::baseline(&self.data_dir, Path::new(log))?;
        }
        let _ = std::fs::remove_file(self.addr_file());
        // A first start on port 0 takes its ports below the kernel's ephemeral range: a port
        // the kernel handed out would be free for any connection's source port while the node
        // is down, and its restart could not bind it again (found as a flaky test: "Address
        // already in use" on a restart while other tests' nodes and clients ran).
        let or_fixed = |known: &str| {
            if known.is_empty() || known.ends_with(":0") {
                format!("{}:{}", self.ip, fixed_port(&self.ip).unwrap_or(0))
            } else {
                known.to_string()
            }
        };
        let listen = or_fixed(if self.addr.is_empty() {
            &self.listen
        } else {
            &self.addr
        });
        let peer_listen = or_fixed(&self.peer_addr);
        let gossip_listen = or_fixed(&self.gossip_addr);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let child = Command::new(bin_path("ringkv"))
            .arg("--node-id")
            .arg(&self.id)
            .arg("--listen")
            .arg(&listen)
            .arg("--peer-listen")
            .arg(&peer_listen)
            .arg("--gossip-listen")
            .arg(&gossip_listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn ringkv: {e}"))?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(self.addr_file()) {
                let field = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::to_string)
                };
                if let (Some(client), Some(peer), Some(gossip)) =
                    (field("client="), field("peer="), field("gossip="))
                {
                    self.addr = client;
                    self.peer_addr = peer;
                    self.gossip_addr = gossip;
                    self.admin_addr = field("admin=").unwrap_or_default();
                    return Ok(());
                }
            }
            if let Some(status) = self.exited() {
                return Err(format!(
                    "node {} exited during start-up ({status}); log:\n{}",
                    self.id,
                    self.log_tail(40)
                ));
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "node {} not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.id,
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An environment variable set for the node's process.
    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets an environment variable for the node's process (from its next start on).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// True while the process is started and not stopped or killed through this handle (a
    /// paused process counts as running).
    pub fn child_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process's exit status if it has exited by itself (it is then no longer running).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// kill -9: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn stop(&mut self) -> Result<ExitStatus, String> {
        let Some(mut c) = self.child.take() else {
            return Err(format!("node {} is not running", self.id));
        };
        self.signal(&c, libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            if start.elapsed() > STOP_TIMEOUT {
                let _ = c.kill();
                let _ = c.wait();
                return Err(format!(
                    "node {} did not stop within {STOP_TIMEOUT:?} after SIGTERM; log:\n{}",
                    self.id,
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory of the running process, bytes (`VmRSS` in /proc).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    pub fn send_signal(&self, sig: libc::c_int) {
        if let Some(c) = self.child.as_ref() {
            self.signal(c, sig);
        }
    }

    fn signal(&self, c: &Child, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(c.id()).expect("pids fit in pid_t");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Node listeners started on port 0 take ports in `FIXED_PORTS`: below the kernel's ephemeral
/// range, above well-known services, and clear of the ports the benchmark scripts use
/// (7379.., 12370–18379 in tools/bench.sh, 28379.. in open-loop.sh, overload-bench.py and
/// k2v-bench.py).
const FIXED_PORTS: std::ops::Range<u32> = 19_000..28_000;

/// A port of `ip` in `FIXED_PORTS` and below the kernel's ephemeral range
/// (`ip_local_port_range`), free for TCP and UDP now, so that neither `bind(0)` nor a
/// connection's source port can take it while its node is down between a kill and a restart.
/// Ports are handed out in turn from a start that differs between processes, and never twice
/// in a process until the range wraps; a port handed out is also claimed for the life of this
/// process (`claim_port`), so another test process running at the same time never takes it
/// while its node is down. `None` when fewer than 1 000 such ports exist or none is free (the
/// caller binds port 0).
fn fixed_port(ip: &str) -> Option<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u32>().ok())
        })
        .unwrap_or(32_768);
    let end = FIXED_PORTS.end.min(ephemeral_from);
    let span = end.checked_sub(FIXED_PORTS.start)?;
    if span < 1_000 {
        return None;
    }
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    (0..span).find_map(|_| {
        let port = FIXED_PORTS.start + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(port).ok()?;
        let free = claim_port(port)
            && std::net::TcpListener::bind((ip, port)).is_ok()
            && std::net::UdpSocket::bind((ip, port)).is_ok();
        free.then_some(port)
    })
}

/// Claims `port` for this process: an exclusive lock on a file named after it in the temp
/// dir, held until the process exits (the kernel drops it then, however the process ends).
/// False if another process holds it; true if this one does (claimed now or before). Found
/// as a known limit: a node's fixed port, free while it was down between a kill and a restart,
/// could be handed to a node of another test process starting at that moment, and the
/// restart then failed with "Address already in use". Without a usable temp dir, every port
/// counts as claimed (the bind check alone, as before).
fn claim_port(port: u16) -> bool {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    static HELD: Mutex<BTreeMap<u16, File>> = Mutex::new(BTreeMap::new());
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.contains_key(&port) {
        return true;
    }
    let dir = std::env::temp_dir().join("ringkv-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let Ok(file) = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
    else {
        return true;
    };
    match file.try_lock() {
        Ok(()) => {
            held.insert(port, file);
            true
        }
        Err(std::fs::TryLockError::WouldBlock) => false,
        // A file system without locks: the bind check alone, as before.
        Err(std::fs::TryLockError::Error(_)) => true,
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port another process holds is not handed out; once it lets go, this one claims it and
    /// keeps it (asking again is not a conflict with itself). The other process is stood in
    /// for by a second open of the lock file: `flock` locks belong to the open file, so it
    /// conflicts exactly as another process's would.
    #[test]
    fn a_port_claimed_by_another_process_is_not_handed_out() {
        let port = 27_917;
        let dir = std::env::temp_dir().join("ringkv-test-ports");
        std::fs::create_dir_all(&dir).unwrap();
        let other = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap();
        if other.try_lock().is_err() {
            // A test process of another run holds it right now: nothing to learn here.
            return;
        }
        assert!(!claim_port(port), "held by the other open file");
        drop(other);
        assert!(claim_port(port), "free again");
        assert!(claim_port(port), "ours, still");
        let again = OpenOptions::new()
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap();
        assert!(
            again.try_lock().is_err(),
            "claimed for the life of this process"
        );
    }
}
