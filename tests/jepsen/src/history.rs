//! The history: an append-only list of operations (JSON Lines), the only evidence the checkers
//! use (shared/notes/jepsen.md §1). Every client op is an `invoke` followed by exactly one
//! completion: `ok` (it happened), `fail` (it did not and never will) or `info` (unknown).

use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One history line. Field names follow the Jepsen note's schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Index in the history (real-time order).
    pub i: u64,
    /// Nanoseconds since the run started (one monotonic clock, the harness's).
    pub t: u64,
    /// The harness's wall clock in ms since the epoch (never a server clock), for matching
    /// the history with node logs.
    #[serde(default)]
    pub wall_ms: u64,
    /// Process id, or `nemesis` / `final`.
    pub p: String,
    #[serde(rename = "type")]
    pub kind: OpType,
    /// get, put, delete, add, read, kill, pause, partition, clock, loss, replica_get.
    pub f: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// put: the value; get/read ok: the list of sibling values; delete ok: the tombstone id;
    /// nemesis: what was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// base64url context token sent (null for a blind write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctx: Option<String>,
    /// `i` of the get whose context this write sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctx_src: Option<u64>,
    /// Entry node contacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definite: Option<bool>,
    /// put/delete ok: acks that came from fallbacks holding a hint (sloppy quorum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_acks: Option<u8>,
}

impl Op {
    pub fn new(p: impl Into<String>, kind: OpType, f: &str) -> Op {
        Op {
            i: 0,
            t: 0,
            wall_ms: 0,
            p: p.into(),
            kind,
            f: f.to_string(),
            key: None,
            value: None,
            ctx: None,
            ctx_src: None,
            node: None,
            err: None,
            fallback_acks: None,
            definite: None,
        }
    }

    pub fn key(mut self, key: &str) -> Op {
        self.key = Some(key.to_string());
        self
    }

    pub fn value(mut self, v: Value) -> Op {
        self.value = Some(v);
        self
    }

    /// The value as a string (puts, adds, tombstone ids).
    pub fn value_str(&self) -> Option<&str> {
        self.value.as_ref().and_then(Value::as_str)
    }

    /// The value as a list of strings (reads).
    pub fn value_list(&self) -> Vec<String> {
        match &self.value {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Records ops with their index and time under one lock, so index order is real-time order.
pub struct Recorder {
    inner: Mutex<RecorderInner>,
    start: Instant,
}

struct RecorderInner {
    out: Option<BufWriter<File>>,
    ops: Vec<Op>,
}

impl Recorder {
    /// Records to `path` (JSON Lines) and in memory; `None` = memory only (tests).
    pub fn new(path: Option<&Path>) -> std::io::Result<Recorder> {
        let out = match path {
            Some(p) => Some(BufWriter::new(File::create(p)?)),
            None => None,
        };
        Ok(Recorder {
            inner: Mutex::new(RecorderInner {
                out,
                ops: Vec::new(),
            }),
            start: Instant::now(),
        })
    }

    pub fn elapsed_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Appends `op`, stamping its index and time; returns the stamped op.
    pub fn record(&self, mut op: Op) -> Op {
        let mut inner = self.inner.lock().expect("history lock poisoned");
        op.i = inner.ops.len() as u64;
        op.t = self.elapsed_ns();
        op.wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Some(out) = inner.out.as_mut() {
            let line = serde_json::to_string(&op).expect("ops serialize");
            // The history is the evidence: a failed write here must not go unnoticed.
            writeln!(out, "{line}").expect("write history.jsonl");
        }
        inner.ops.push(op.clone());
        op
    }

    pub fn flush(&self) {
        let mut inner = self.inner.lock().expect("history lock poisoned");
        if let Some(out) = inner.out.as_mut() {
            out.flush().expect("flush history.jsonl");
        }
    }

    pub fn ops(&self) -> Vec<Op> {
        self.inner
            .lock()
            .expect("history lock poisoned")
            .ops
            .clone()
    }
}

/// Reads a history file back (for re-checking a run).
pub fn load(path: &Path) -> std::io::Result<Vec<Op>> {
    let f = std::io::BufReader::new(File::open(path)?);
    let mut ops = Vec::new();
    for (n, line) in f.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        ops.push(serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}:{}: {e}", path.display(), n + 1),
            )
        })?);
    }
    Ok(ops)
}
