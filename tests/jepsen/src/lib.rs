//! ringkv's Jepsen-style harness: real clusters of `ringkv` processes, nemeses, recorded
//! histories and checkers (see docs/jepsen.md). The process layer is also what every
//! integration test uses to run real server binaries.

pub mod checker;
pub mod cluster;
pub mod disk;
pub mod history;
pub mod nemesis;
pub mod observe;
pub mod peer;
pub mod powerloss;
pub mod process;
pub mod runner;

pub use cluster::Cluster;
pub use process::{bin_path, tool_json, NodeProcess};

/// A read's live values as sorted strings (test helper shared by the integration tests).
pub fn sorted_values(read: &ringkv_client::Read) -> Vec<String> {
    let mut v: Vec<String> = read
        .values()
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    v.sort();
    v
}

/// The value of metric `name` in a node's status reply, if it reports it.
pub fn status_metric(status: &ringkv_protocol::StatusReply, name: &str) -> Option<u64> {
    status
        .metrics
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
}

/// The value of metric `name` in the status of the node `client` talks to (test helper shared
/// by the integration tests); panics when the node does not report it.
pub async fn metric(client: &ringkv_client::Client, name: &str) -> u64 {
    let s = client.status().await.expect("status");
    status_metric(&s, name).unwrap_or_else(|| panic!("no metric {name}"))
}

/// Sum of a metric over the running nodes `which` of `c`.
pub async fn metric_total(c: &Cluster, which: &[usize], name: &str) -> u64 {
    let mut sum = 0;
    for &i in which {
        sum += metric(&c.client(i), name).await;
    }
    sum
}

/// Polls `check` (every 100 ms) until it returns true; panics naming `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A loopback listener whose connections have a small receive buffer (64 KiB), for fake nodes
/// that read slowly: what waits, waits in the sender rather than in this side's kernel; with
/// its address.
pub fn small_buffer_listener() -> (tokio::net::TcpListener, String) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket
        .set_recv_buffer_size(64 << 10)
        .expect("a receive buffer size");
    socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("bind on loopback");
    let listener = socket.listen(8).expect("listen");
    let addr = listener.local_addr().expect("its address").to_string();
    (listener, addr)
}

/// `GET path` on an HTTP address (the admin listener): (status code, body). A plain
/// HTTP/1.1 request with `Connection: close` on a std socket, so tests need no HTTP client.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no HTTP header in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: bad status line in {head:?}"))?;
    // Chunked bodies (hyper chunks a streamed body; a full body has a length).
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// The value of the Prometheus sample `name` whose labels include every pair of `labels`
/// (other labels may be present), summed over the series that match; `None` if none does.
pub fn prom_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<&str> = l.split(',').collect();
        if labels
            .iter()
            .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()))
        {
            if let Ok(v) = value.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// Runs `promtool check metrics` on a scrape: `Err` with its complaints (or that promtool is
/// missing: `make deps` installs it, Debian package `prometheus`).
pub fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run promtool ({e}): `make deps` installs it (Debian package prometheus)"
            )
        })?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics: {}: {said}", out.status))
    }
}
