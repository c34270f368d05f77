//! The node: wires config, storage and metrics, and answers client requests.
//!
//! With one node the replication factor is 1, so R and W above 1 are refused with a clear
//! error. Every error message starts with the node id and names the key and the cause.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ringkv_protocol::message::{ReadOptions, WriteOptions};
use ringkv_protocol::{
    CausalContext, ErrorKind, ReadReply, Request, Response, Sibling, StatusReply, WriteReply,
};

use crate::config::Config;
use crate::metrics::{inc, Metrics};
use crate::storage::{HexKey, Store, WriteError, WriteOp};
use crate::version::{KeyState, VersionVector};

/// Replication factor of a single node.
pub const N: u8 = 1;

pub struct Node {
    pub config: Config,
    pub store: Arc<Store>,
    pub metrics: Metrics,
    started: Instant,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Converts a stored state into what a client sees: all siblings plus the context token.
pub fn read_reply(key: &[u8], state: &KeyState) -> ReadReply {
    ReadReply {
        siblings: state
            .siblings()
            .iter()
            .map(|s| Sibling {
                actor: s.dot.actor,
                counter: s.dot.counter,
                timestamp_ms: s.timestamp_ms,
                value: s.value.clone(),
            })
            .collect(),
        context: Bytes::from(state.context().to_context().encode(key)),
    }
}

impl Node {
    pub fn new(config: Config, store: Arc<Store>) -> Node {
        Node {
            config,
            store,
            metrics: Metrics::default(),
            started: Instant::now(),
        }
    }

    fn err(&self, kind: ErrorKind, definite: bool, msg: impl std::fmt::Display) -> Response {
        inc(&self.metrics.errors);
        Response::error(
            kind,
            definite,
            format!("node {}: {msg}", self.config.node_id),
        )
    }

    fn deadline(&self, timeout_ms: u32) -> Duration {
        let ms = if timeout_ms == 0 {
            self.config.request_timeout_ms
        } else {
            timeout_ms.min(crate::config::MAX_TIMEOUT_MS)
        };
        Duration::from_millis(ms as u64)
    }

    /// Answers one request. Never panics on client input.
    pub async fn handle(&self, req: Request) -> Response {
        if let Err((kind, msg)) = req.validate() {
            return self.err(kind, true, msg);
        }
        match req {
            Request::Ping => {
                inc(&self.metrics.requests_ping);
                Response::Pong
            }
            Request::Status => {
                inc(&self.metrics.requests_status);
                Response::Status(self.status())
            }
            Request::Get { key, opts } => {
                inc(&self.metrics.requests_get);
                self.get(key, opts).await
            }
            Request::Put {
                key,
                value,
                context,
                opts,
            } => {
                inc(&self.metrics.requests_put);
                let Some(ctx) = self.decode_context(&key, &context) else {
                    return self.context_error(&key, &context);
                };
                self.write(key, Some(ctx), Some(value), opts, false).await
            }
            Request::Delete { key, context, opts } => {
                inc(&self.metrics.requests_delete);
                let ctx = if context.is_empty() {
                    None
                } else {
                    match self.decode_context(&key, &context) {
                        Some(ctx) => Some(ctx),
                        None => return self.context_error(&key, &context),
                    }
                };
                self.write(key, ctx, None, opts, true).await
            }
        }
    }

    fn decode_context(&self, key: &[u8], token: &[u8]) -> Option<VersionVector> {
        CausalContext::decode(token, key)
            .ok()
            .map(|c| VersionVector::from_context(&c))
    }

    fn context_error(&self, key: &[u8], token: &[u8]) -> Response {
        let cause = CausalContext::decode(token, key)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        self.err(
            ErrorKind::InvalidRequest,
            true,
            format!(
                "key {}: invalid causal context: {cause} (send back the token a read of this key returned)",
                HexKey(key.to_vec())
            ),
        )
    }

    fn check_quorum(&self, what: &str, n: u8, key: &[u8]) -> Option<Response> {
        (n > N).then(|| {
            self.err(
                ErrorKind::InvalidRequest,
                true,
                format!(
                    "key {}: {what}={n} exceeds the replication factor N={N}",
                    HexKey(key.to_vec())
                ),
            )
        })
    }

    async fn get(&self, key: Bytes, opts: ReadOptions) -> Response {
        if let Some(e) = self.check_quorum("R", opts.r, &key) {
            return e;
        }
        let store = self.store.clone();
        let k = key.clone();
        let read = tokio::task::spawn_blocking(move || store.get(&k));
        match tokio::time::timeout(self.deadline(opts.timeout_ms), read).await {
            Err(_) => {
                inc(&self.metrics.timeouts);
                self.err(
                    ErrorKind::Timeout { acks: 0, needed: 1 },
                    true,
                    format!("key {}: read timed out", HexKey(key.to_vec())),
                )
            }
            Ok(Err(join)) => self.err(
                ErrorKind::Internal,
                true,
                format!("key {}: read task failed: {join}", HexKey(key.to_vec())),
            ),
            Ok(Ok(Err(e))) => self.err(
                ErrorKind::Internal,
                true,
                format!("key {}: {e}", HexKey(key.to_vec())),
            ),
            Ok(Ok(Ok(state))) => Response::Get(read_reply(&key, &state)),
        }
    }

    async fn write(
        &self,
        key: Bytes,
        ctx: Option<VersionVector>,
        value: Option<Bytes>,
        opts: WriteOptions,
        is_delete: bool,
    ) -> Response {
        if let Some(e) = self.check_quorum("W", opts.w, &key) {
            return e;
        }
        let op = WriteOp::Update {
            key: key.clone(),
            ctx,
            value,
            timestamp_ms: now_ms(),
        };
        let result = tokio::time::timeout(self.deadline(opts.timeout_ms), self.store.write(op));
        match result.await {
            Err(_) => {
                inc(&self.metrics.timeouts);
                // The job is queued and may still commit: the outcome is unknown.
                self.err(
                    ErrorKind::Timeout { acks: 0, needed: 1 },
                    false,
                    format!(
                        "key {}: write not committed before the deadline",
                        HexKey(key.to_vec())
                    ),
                )
            }
            Ok(Err(e)) => self.write_error(e),
            Ok(Ok(outcome)) => {
                let dot = outcome.dot.expect("updates always mint a dot");
                let body = (opts.flags & WriteOptions::RETURN_BODY != 0)
                    .then(|| read_reply(&key, &outcome.state));
                let reply = WriteReply {
                    actor: dot.actor,
                    counter: dot.counter,
                    body,
                };
                if is_delete {
                    Response::Delete(reply)
                } else {
                    Response::Put(reply)
                }
            }
        }
    }

    fn write_error(&self, e: WriteError) -> Response {
        let definite = e.is_definite();
        let kind = match &e {
            WriteError::TooManySiblings { count, limit, .. } => ErrorKind::TooManySiblings {
                count: *count as u64,
                limit: *limit as u64,
            },
            WriteError::TooLarge { size, limit, .. } => ErrorKind::TooLarge {
                size: *size as u64,
                limit: *limit as u64,
            },
            WriteError::Overloaded { .. } => ErrorKind::Overloaded,
            WriteError::ShuttingDown => ErrorKind::Unavailable {
                alive: 0,
                needed: 1,
            },
            WriteError::Storage { .. } => ErrorKind::Internal,
        };
        self.err(kind, definite, e)
    }

    pub fn status(&self) -> StatusReply {
        let st = self.store.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut metrics = self.metrics.snapshot();
        metrics.extend([
            ("storage.updates".to_string(), load(&st.updates)),
            ("storage.merges".to_string(), load(&st.merges)),
            ("storage.merges_noop".to_string(), load(&st.merges_noop)),
            ("storage.write_batches".to_string(), load(&st.batches)),
            (
                "storage.synced_batches".to_string(),
                load(&st.synced_batches),
            ),
            ("storage.largest_group".to_string(), load(&st.largest_group)),
            ("storage.write_errors".to_string(), load(&st.write_errors)),
            ("storage.overloaded".to_string(), load(&st.overloaded)),
            (
                "storage.rejected_siblings".to_string(),
                load(&st.rejected_siblings),
            ),
            ("storage.rejected_size".to_string(), load(&st.rejected_size)),
            (
                "storage.sibling_warnings".to_string(),
                load(&st.sibling_warnings),
            ),
            (
                "storage.amnesia_detected".to_string(),
                load(&st.amnesia_detected),
            ),
            (
                "storage.writer_queue".to_string(),
                self.store.queue_depth() as u64,
            ),
            ("storage.next_counter".to_string(), load(&st.next_counter)),
            ("storage.incarnation".to_string(), load(&st.incarnation)),
        ]);
        let engine = self.store.engine();
        for (name, prop) in [
            ("rocksdb.estimate_keys", "rocksdb.estimate-num-keys"),
            ("rocksdb.live_sst_bytes", "rocksdb.live-sst-files-size"),
            ("rocksdb.memtable_bytes", "rocksdb.cur-size-all-mem-tables"),
            ("rocksdb.background_errors", "rocksdb.background-errors"),
        ] {
            if let Some(v) = engine.property(crate::storage::Cf::Data, prop) {
                metrics.push((name.to_string(), v));
            }
        }
        let writer_state = if self.store.is_running() {
            "running"
        } else {
            "stopped"
        };
        StatusReply {
            node_id: self.config.node_id.clone(),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            metrics,
            info: vec![
                ("listen".into(), self.config.listen.to_string()),
                (
                    "data_dir".into(),
                    self.config.data_dir.display().to_string(),
                ),
                ("sync_mode".into(), self.config.sync.to_string()),
                ("replication_factor".into(), N.to_string()),
                ("actor".into(), format!("{:016x}", load(&st.actor))),
                (
                    "worker.writer".into(),
                    format!(
                        "{writer_state}; queue {} of {}; {} batches",
                        self.store.queue_depth(),
                        crate::storage::store::QUEUE_CAPACITY,
                        load(&st.batches)
                    ),
                ),
            ],
        }
    }
}
