//! The systems the generator drives with the same workload: ringkv (client library), Redis
//! (RESP over TCP, pipelined), etcd (its v3 HTTP/JSON gateway, keep-alive) and Garage's K2V
//! API (signed HTTP/1.1, keep-alive; [`super::k2v`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use ringkv_client::{Client, ClientConfig, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::k2v::{K2vAuth, K2vConn};
use super::BenchConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Ringkv,
    Redis,
    Etcd,
    #[serde(rename = "garage-k2v")]
    GarageK2v,
}

impl TargetKind {
    pub fn parse(s: &str) -> Result<TargetKind, String> {
        match s {
            "ringkv" => Ok(TargetKind::Ringkv),
            "redis" => Ok(TargetKind::Redis),
            "etcd" => Ok(TargetKind::Etcd),
            "garage-k2v" => Ok(TargetKind::GarageK2v),
            other => Err(format!(
                "unknown target {other:?}: expected ringkv, redis, etcd or garage-k2v"
            )),
        }
    }
}

/// The causal contexts an application keeps: the last one seen per key, so each update
/// replaces what the client last read or wrote (a ringkv update is a write with context; a
/// Garage K2V insert sends the causality token of the last read).
pub struct ContextCache<T = Context> {
    shards: Vec<Mutex<HashMap<String, T>>>,
}

impl<T: Clone> Default for ContextCache<T> {
    fn default() -> Self {
        ContextCache::new()
    }
}

impl<T: Clone> ContextCache<T> {
    pub fn new() -> ContextCache<T> {
        ContextCache {
            shards: (0..64).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, T>> {
        let h = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) as usize;
        &self.shards[h % self.shards.len()]
    }

    fn get(&self, key: &str) -> Option<T> {
        self.shard(key)
            .lock()
            .expect("context cache lock")
            .get(key)
            .cloned()
    }

    fn set(&self, key: &str, ctx: T) {
        let mut shard = self.shard(key).lock().expect("context cache lock");
        // Replace in place: copying the key again for every write of a known key allocates.
        match shard.get_mut(key) {
            Some(slot) => *slot = ctx,
            None => {
                shard.insert(key.to_string(), ctx);
            }
        }
    }
}

/// Why an operation failed: refused by an overloaded node before any work (shed, counted
/// apart from errors), or anything else.
#[derive(Debug, Clone)]
pub struct OpError {
    pub shed: bool,
    pub message: String,
}

impl From<String> for OpError {
    fn from(message: String) -> OpError {
        OpError {
            shed: false,
            message,
        }
    }
}

impl From<ringkv_client::Error> for OpError {
    fn from(e: ringkv_client::Error) -> OpError {
        OpError {
            shed: e.is_overloaded(),
            message: e.to_string(),
        }
    }
}

/// One connection to the system under test.
#[derive(Clone)]
pub enum Conn {
    Ringkv {
        client: Client,
        contexts: Arc<ContextCache>,
    },
    Redis(RedisConn),
    Etcd(Arc<tokio::sync::Mutex<HttpConn>>),
    GarageK2v {
        conn: Arc<tokio::sync::Mutex<K2vConn>>,
        tokens: Arc<ContextCache<String>>,
    },
}

/// What the connections of one run share: the contexts (ringkv) and causality tokens
/// (Garage K2V) last seen per key.
#[derive(Default)]
pub struct Caches {
    pub contexts: Arc<ContextCache>,
    pub tokens: Arc<ContextCache<String>>,
}

impl Conn {
    /// Opens connection number `i` (spread round-robin over `addrs`).
    pub async fn connect(
        cfg: &BenchConfig,
        i: usize,
        caches: &Caches,
        timeout: Duration,
    ) -> Result<Conn, String> {
        let addrs = &cfg.addrs;
        let addr = &addrs[i % addrs.len()];
        match cfg.target {
            TargetKind::Ringkv => {
                let client_cfg = ClientConfig {
                    request_timeout: timeout,
                    ring_aware: cfg.ring_aware,
                    // A refused read is reported as shed, not retried: retries would add to
                    // the offered load the open loop is measuring at.
                    overload_retries: 0,
                    ..ClientConfig::default()
                };
                // Ring-aware: every address, this connection's own first; else just its own.
                let mine: Vec<String> = if cfg.ring_aware {
                    (0..addrs.len())
                        .map(|k| addrs[(i + k) % addrs.len()].clone())
                        .collect()
                } else {
                    vec![addr.clone()]
                };
                let client = Client::connect_with(mine, client_cfg)
                    .await
                    .map_err(|e| e.to_string())?;
                if cfg.ring_aware {
                    client.refresh_ring().await.map_err(|e| e.to_string())?;
                }
                Ok(Conn::Ringkv {
                    client,
                    contexts: caches.contexts.clone(),
                })
            }
            TargetKind::Redis => Ok(Conn::Redis(RedisConn::connect(addr).await?)),
            TargetKind::Etcd => Ok(Conn::Etcd(Arc::new(tokio::sync::Mutex::new(
                HttpConn::connect(addr).await?,
            )))),
            TargetKind::GarageK2v => {
                let auth = K2vAuth::from_env(&cfg.k2v_bucket, &cfg.k2v_region)?;
                Ok(Conn::GarageK2v {
                    conn: Arc::new(tokio::sync::Mutex::new(K2vConn::connect(addr, auth).await?)),
                    tokens: caches.tokens.clone(),
                })
            }
        }
    }

    /// Reads `key`; Ok(found).
    pub async fn read(&self, key: &str) -> Result<bool, OpError> {
        match self {
            Conn::Ringkv { client, contexts } => {
                let read = client.get(key).await?;
                contexts.set(key, read.context.clone());
                Ok(read.is_found())
            }
            Conn::Redis(r) => {
                let reply = r.call(&[b"GET", key.as_bytes()]).await?;
                Ok(reply.is_some())
            }
            Conn::Etcd(h) => {
                let body = format!(r#"{{"key":"{}"}}"#, STANDARD.encode(key));
                let resp = h.lock().await.post("/v3/kv/range", &body).await?;
                Ok(resp.contains("\"kvs\""))
            }
            Conn::GarageK2v { conn, tokens } => {
                let read = conn.lock().await.read(key).await?;
                if let Some(token) = read.token {
                    tokens.set(key, token);
                }
                Ok(read.found)
            }
        }
    }

    /// Writes `value` to `key`, replacing what this client last saw of it.
    pub async fn update(&self, key: &str, value: Bytes) -> Result<(), OpError> {
        match self {
            Conn::Ringkv { client, contexts } => {
                let ctx = contexts.get(key);
                let read = client.put_returning(key, value, ctx.as_ref()).await?;
                contexts.set(key, read.context);
                Ok(())
            }
            Conn::Redis(r) => {
                r.call(&[b"SET", key.as_bytes(), &value]).await?;
                Ok(())
            }
            Conn::Etcd(h) => {
                let body = format!(
                    r#"{{"key":"{}","value":"{}"}}"#,
                    STANDARD.encode(key),
                    STANDARD.encode(&value)
                );
                h.lock().await.post("/v3/kv/put", &body).await?;
                Ok(())
            }
            Conn::GarageK2v { conn, tokens } => {
                let token = tokens.get(key);
                conn.lock()
                    .await
                    .insert(key, value, token.as_deref())
                    .await?;
                Ok(())
            }
        }
    }
}

type RedisReply = Result<Option<Vec<u8>>, String>;

/// A pipelined RESP connection: requests are written in order and replies matched FIFO.
#[derive(Clone)]
pub struct RedisConn {
    tx: mpsc::Sender<(Vec<u8>, oneshot::Sender<RedisReply>)>,
}

impl RedisConn {
    pub async fn connect(addr: &str) -> Result<RedisConn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("redis {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<(Vec<u8>, oneshot::Sender<RedisReply>)>(1024);
        let pending: Arc<Mutex<VecDeque<oneshot::Sender<RedisReply>>>> = Arc::default();
        let (notify_tx, mut notify_rx) = mpsc::unbounded_channel::<()>();
        let p = pending.clone();
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                p.lock().expect("redis pending lock").push_back(reply);
                let _ = notify_tx.send(());
                let mut buf = req;
                while let Ok((more, reply)) = rx.try_recv() {
                    p.lock().expect("redis pending lock").push_back(reply);
                    let _ = notify_tx.send(());
                    buf.extend_from_slice(&more);
                }
                if wr.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut rd = BufReader::new(rd);
            while notify_rx.recv().await.is_some() {
                let reply = read_resp(&mut rd).await;
                let broken = reply.as_ref().is_err_and(|e| e.starts_with("io:"));
                if let Some(tx) = pending.lock().expect("redis pending lock").pop_front() {
                    let _ = tx.send(reply);
                }
                if broken {
                    return;
                }
            }
        });
        Ok(RedisConn { tx })
    }

    pub async fn call(&self, args: &[&[u8]]) -> RedisReply {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((req, tx))
            .await
            .map_err(|_| "redis connection closed".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("redis connection closed".into()))
    }
}

async fn read_resp<R: tokio::io::AsyncBufRead + Unpin>(rd: &mut R) -> RedisReply {
    let mut line = String::new();
    if rd
        .read_line(&mut line)
        .await
        .map_err(|e| format!("io: {e}"))?
        == 0
    {
        return Err("io: connection closed".into());
    }
    let line = line.trim_end();
    match line.as_bytes().first() {
        Some(b'+') | Some(b':') => Ok(Some(line.as_bytes()[1..].to_vec())),
        Some(b'-') => Err(format!("redis error: {}", &line[1..])),
        Some(b'$') => {
            let len: i64 = line[1..]
                .parse()
                .map_err(|e| format!("bad bulk length: {e}"))?;
            if len < 0 {
                return Ok(None);
            }
            // Redis's own bound on a bulk string (proto-max-bulk-len): nothing kvbench reads
            // is larger, and a bad length must not make it allocate without bound.
            if len > 512 << 20 {
                return Err(format!("bulk length {len} exceeds 512 MiB"));
            }
            let mut data = vec![0u8; len as usize + 2];
            rd.read_exact(&mut data)
                .await
                .map_err(|e| format!("io: {e}"))?;
            data.truncate(len as usize);
            Ok(Some(data))
        }
        _ => Err(format!("unexpected RESP reply {line:?}")),
    }
}

/// A keep-alive HTTP/1.1 connection for etcd's JSON gateway (one request at a time).
pub struct HttpConn {
    addr: String,
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl HttpConn {
    pub async fn connect(addr: &str) -> Result<HttpConn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("etcd {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        Ok(HttpConn {
            addr: addr.to_string(),
            rd: BufReader::new(rd),
            wr,
        })
    }

    pub async fn post(&mut self, path: &str, body: &str) -> Result<String, String> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.wr
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("etcd write: {e}"))?;
        let mut status = String::new();
        self.rd
            .read_line(&mut status)
            .await
            .map_err(|e| format!("etcd read: {e}"))?;
        let mut len: Option<usize> = None;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            if self
                .rd
                .read_line(&mut h)
                .await
                .map_err(|e| format!("etcd read: {e}"))?
                == 0
            {
                return Err("etcd closed the connection".into());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().ok();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.rd
                    .read_line(&mut size)
                    .await
                    .map_err(|e| e.to_string())?;
                let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
                let mut chunk = vec![0u8; n + 2];
                self.rd
                    .read_exact(&mut chunk)
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            let n = len.ok_or("etcd reply without a length")?;
            body.resize(n, 0);
            self.rd
                .read_exact(&mut body)
                .await
                .map_err(|e| e.to_string())?;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        if !status.contains(" 200 ") {
            return Err(format!("etcd: {} {body}", status.trim()));
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resp_replies_parse() {
        let mut input: &[u8] = b"+OK\r\n$5\r\nhello\r\n$-1\r\n-ERR wrong type\r\n:42\r\n";
        let mut rd = BufReader::new(&mut input);
        assert_eq!(read_resp(&mut rd).await, Ok(Some(b"OK".to_vec())));
        assert_eq!(read_resp(&mut rd).await, Ok(Some(b"hello".to_vec())));
        assert_eq!(read_resp(&mut rd).await, Ok(None));
        assert_eq!(
            read_resp(&mut rd).await,
            Err("redis error: ERR wrong type".into())
        );
        assert_eq!(read_resp(&mut rd).await, Ok(Some(b"42".to_vec())));
        assert!(read_resp(&mut rd).await.unwrap_err().starts_with("io:"));
    }
}
