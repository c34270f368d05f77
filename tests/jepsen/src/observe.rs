//! Whether a fault took effect: evidence gathered while it is still active, just before it is
//! healed, and recorded with its `stop` in the history. A fault whose effect was not observed
//! fails the run (`checker::unobserved_faults`): a nemesis that silently did nothing (a rule
//! that matched no packet, a clock file the node never read, a flood the node never had to
//! shed) would otherwise pass as a run that survived the fault.

use crate::nemesis::{self, Active};
use crate::process::NodeProcess;
use ringkv_client::{Client, ClientConfig};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a fault's effect is waited for before it counts as not observed: libfaketime
/// re-reads a node's clock file once a second, and the shortest fault windows are under a
/// second, so an effect may show only after the window's planned end (the fault then lasts
/// that much longer).
pub const OBSERVE_WAIT: Duration = Duration::from_secs(5);

/// How long a ring change may take to show after its fault window: it completes only once its
/// new nodes received their ranges, and waits (correctly) while the claimant cannot reach a
/// majority of the owners that stay, e.g. across a partition of the other nemesis lane.
pub const CHANGE_WAIT: Duration = Duration::from_secs(60);

/// A node's disk counts as full below this many free bytes.
pub const FULL_BELOW: u64 = 1 << 20;

/// How far (seconds) a node's clock may be from the offset it was set to and still count as
/// set: its status reply's round trip, libfaketime's one-second cache and the strobe's flips.
pub const CLOCK_SLACK_S: f64 = 2.5;

/// What was seen of a fault: `observed` when the evidence shows it took effect.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    pub observed: bool,
    pub evidence: Value,
}

/// Counters read when a fault started, that its evidence is measured against.
#[derive(Debug, Default)]
pub struct Baseline {
    /// (node index, `storage.write_errors`) of the nodes whose disks were filled.
    write_errors: Vec<(usize, u64)>,
}

/// Reads what `observe` compares with, right after the fault started.
pub async fn baseline(active: &Active, nodes: &[NodeProcess]) -> Baseline {
    let mut b = Baseline::default();
    if let Active::Filled(idx) = active {
        for &i in idx {
            let errors = status_metric(&nodes[i], "storage.write_errors")
                .await
                .unwrap_or(0);
            b.write_errors.push((i, errors));
        }
    }
    b
}

/// Waits up to `OBSERVE_WAIT` for evidence that `active` took effect. A ring change
/// (`Active::Retired`) is observed by the runner, which knows the change it staged.
pub async fn observe(active: &Active, nodes: &[NodeProcess], base: &Baseline) -> Effect {
    until_observed(OBSERVE_WAIT, || observe_once(active, nodes, base)).await
}

/// Looks (`once`, every 250 ms) until an effect is observed or `wait` has passed; the last
/// look.
pub async fn until_observed<F, Fut>(wait: Duration, mut once: F) -> Effect
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Effect>,
{
    let until = Instant::now() + wait;
    loop {
        let effect = once().await;
        if effect.observed || Instant::now() >= until {
            return effect;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn observe_once(active: &Active, nodes: &[NodeProcess], base: &Baseline) -> Effect {
    match active {
        Active::Killed(idx) | Active::Rebooted(idx) | Active::Wiped(idx) => {
            // Down for its clients: its port refuses connections.
            let mut refused = Vec::new();
            let mut answered = Vec::new();
            for &i in idx {
                match connect_refused(&nodes[i].addr).await {
                    true => refused.push(nodes[i].id.clone()),
                    false => answered.push(nodes[i].id.clone()),
                }
            }
            Effect {
                observed: !idx.is_empty() && answered.is_empty(),
                evidence: json!({"connection_refused": refused, "still_accepting": answered}),
            }
        }
        Active::Paused(idx) => {
            let mut states = Map::new();
            let mut all = !idx.is_empty();
            for &i in idx {
                let state = nodes[i].pid().and_then(proc_state);
                all &= state.is_some_and(|s| s == 'T' || s == 't');
                states.insert(
                    nodes[i].id.clone(),
                    json!(state.map_or("gone".to_string(), |s| s.to_string())),
                );
            }
            Effect {
                observed: all,
                evidence: json!({"process_state": states}),
            }
        }
        Active::Netfilter => {
            let (dropped, rules) = match nemesis::dropped_packets() {
                Ok(counts) => counts,
                Err(e) => {
                    return Effect {
                        observed: false,
                        evidence: json!({"error": e}),
                    }
                }
            };
            Effect {
                observed: dropped > 0,
                evidence: json!({
                    "dropped_packets": dropped,
                    "rules": rules,
                    "last_heard_ms": last_heard(nodes).await,
                }),
            }
        }
        Active::Filled(idx) => {
            let mut seen = Map::new();
            let mut all = !idx.is_empty();
            for &i in idx {
                let free = free_bytes(&nemesis::db_dir(&nodes[i]));
                let before = base
                    .write_errors
                    .iter()
                    .find(|(n, _)| *n == i)
                    .map_or(0, |(_, e)| *e);
                let now = status_metric(&nodes[i], "storage.write_errors").await;
                let failed = now.map(|e| e.saturating_sub(before));
                all &= free.is_some_and(|f| f < FULL_BELOW) || failed.is_some_and(|f| f > 0);
                seen.insert(
                    nodes[i].id.clone(),
                    json!({"free_bytes": free, "write_errors_since_start": failed}),
                );
            }
            Effect {
                observed: all,
                evidence: Value::Object(seen),
            }
        }
        Active::Skewed(offsets) | Active::Strobing(offsets) => {
            let strobe = matches!(active, Active::Strobing(_));
            let mut seen = Map::new();
            let mut all = !offsets.is_empty();
            for &(i, off) in offsets {
                let skew = clock_skew_s(&nodes[i]).await;
                all &= skew.is_some_and(|d| clock_matches(d, off, strobe));
                seen.insert(
                    nodes[i].id.clone(),
                    json!({"set_s": off, "seen_s": skew.map(|d| (d * 10.0).round() / 10.0)}),
                );
            }
            Effect {
                observed: all,
                evidence: json!({"clock": seen}),
            }
        }
        Active::Flooding(flood) => {
            let (took, shed) = flood.counts();
            Effect {
                observed: shed > 0,
                evidence: json!({
                    "flood_writes_taken": took,
                    "flood_writes_shed": shed,
                    "stalled_readers": flood.stalled_readers(),
                }),
            }
        }
        Active::Duplicated(twin) => {
            // The twin stopped by itself, with a failure and the error naming the other
            // process, while the node it copied still answers its clients.
            let (ended, success, line, victim) = {
                let mut t = twin.lock().expect("twin lock");
                t.poll();
                (t.ended.clone(), t.success, t.error_line(), t.victim)
            };
            let answers = !connect_refused(&nodes[victim].addr).await;
            Effect {
                observed: ended.is_some() && !success && line.is_some() && answers,
                evidence: json!({
                    "twin_ended": ended,
                    "twin_error": line,
                    "node_answers": answers,
                }),
            }
        }
        Active::Retired(_) => Effect {
            observed: false,
            evidence: json!({"error": "a ring change is observed by the runner"}),
        },
    }
}

/// Whether a clock seen `skew_s` seconds off real time shows the offset `set_s` (a strobe
/// flips its sign every second, so either sign counts).
pub fn clock_matches(skew_s: f64, set_s: i64, strobe: bool) -> bool {
    let off = set_s as f64;
    (skew_s - off).abs() <= CLOCK_SLACK_S || (strobe && (skew_s + off).abs() <= CLOCK_SLACK_S)
}

/// The state letter of a process (`/proc/<pid>/stat`'s third field: `T` stopped).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: the state follows its last `)`.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether a TCP connection to `addr` is refused (nothing listens there).
async fn connect_refused(addr: &str) -> bool {
    match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

/// Free bytes of the filesystem holding `dir` (for an unprivileged user).
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) with a NUL-terminated path and a zeroed struct it fills.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

fn client(node: &NodeProcess) -> Option<Client> {
    Client::new(
        [node.addr.clone()],
        ClientConfig {
            request_timeout: Duration::from_secs(1),
            overload_retries: 0,
            ..ClientConfig::default()
        },
    )
    .ok()
}

async fn status_metric(node: &NodeProcess, name: &str) -> Option<u64> {
    crate::status_metric(&client(node)?.status().await.ok()?, name)
}

/// How far (seconds) the node's wall clock is from this process's, from its status reply's
/// `clock_ms` (the reply's round trip is under the slack).
async fn clock_skew_s(node: &NodeProcess) -> Option<f64> {
    let status = client(node)?.status().await.ok()?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis() as f64;
    let clock_ms: f64 = status
        .info
        .iter()
        .find(|(n, _)| n == "clock_ms")?
        .1
        .parse()
        .ok()?;
    Some((clock_ms - now_ms) / 1000.0)
}

/// Each running node's view of the others it has not heard from for a second or more:
/// `{node: {peer: ms since its last packet}}`. Shown beside a partition's evidence, not
/// required: the shortest windows end before a node notices.
async fn last_heard(nodes: &[NodeProcess]) -> Value {
    let mut out = Map::new();
    // A node another fault paused would answer only after its timeout: skipped.
    let answering = |n: &&NodeProcess| {
        n.child_running()
            && n.pid()
                .and_then(proc_state)
                .is_some_and(|s| s != 'T' && s != 't')
    };
    for node in nodes.iter().filter(answering) {
        let Some(c) = client(node) else { continue };
        let Ok(members) = c.members().await else {
            continue;
        };
        let silent: Map<String, Value> = members
            .members
            .iter()
            .filter(|m| m.node_id != node.id && m.last_heard_ms >= 1000)
            .map(|m| {
                let ms = if m.last_heard_ms == u64::MAX {
                    json!("never")
                } else {
                    json!(m.last_heard_ms)
                };
                (m.node_id.clone(), ms)
            })
            .collect();
        if !silent.is_empty() {
            out.insert(node.id.clone(), Value::Object(silent));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_counts_as_set_within_the_slack_and_a_strobe_either_way() {
        assert!(clock_matches(41.2, 40, false));
        assert!(clock_matches(-39.0, -40, false));
        assert!(
            !clock_matches(0.3, 40, false),
            "an offset the node never read"
        );
        assert!(
            !clock_matches(-40.0, 40, false),
            "the opposite sign is not a skew's"
        );
        assert!(clock_matches(-40.0, 40, true), "a strobe flips the sign");
        assert!(!clock_matches(0.0, 40, true));
    }

    #[test]
    fn the_state_of_this_process_reads_as_running() {
        let state = proc_state(std::process::id()).expect("our own /proc entry");
        assert!(state == 'R' || state == 'S', "{state}");
        assert_eq!(proc_state(u32::MAX), None);
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_and_a_listening_one_is_not() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().to_string();
        assert!(!connect_refused(&open).await);
        drop(l);
        assert!(connect_refused(&open).await);
    }

    #[test]
    fn free_bytes_of_a_temp_dir_are_known() {
        let d = tempfile::tempdir().unwrap();
        assert!(free_bytes(d.path()).is_some_and(|f| f > 0));
        assert_eq!(free_bytes(&d.path().join("missing")), None);
    }
}
