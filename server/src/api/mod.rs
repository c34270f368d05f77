//! The api layer: decodes frames and dispatches them to the services; nothing else.
//!
//! - `client.rs`: client frames → the coordinator (get/put/delete) or admin (ping, status,
//!   ring, members); counts requests and error outcomes.
//! - `peer.rs`: peer frames → the handshake first (`rpc::handshake`), then each message
//!   family to its service (replica, coordinator).
//! - `admin.rs`: status (a loop over the metrics registry and the worker runner), ring,
//!   members.
//!
//! Nothing imports this module but the root (`node.rs`), which builds the handlers.

pub mod admin;
pub mod client;
pub mod peer;

pub mod http;

use std::collections::HashMap;

use ringkv_protocol::{ErrorKind, Response};

use crate::metrics::{Counter, Histogram, Registry};

/// Client request kinds, as the `op` label.
pub const OPS: [&str; 9] = [
    "get", "put", "delete", "ping", "status", "ring", "members", "repair", "cluster",
];
/// The ops admission control applies to (the rest are admin requests).
pub const DATA_OPS: [&str; 3] = ["get", "put", "delete"];
/// Outcomes of a client request, as the `result` label: answered, or which error.
pub const RESULTS: [&str; 8] = [
    "ok",
    "timeout",
    "unavailable",
    "not_serving",
    "overloaded",
    "expired",
    "invalid",
    "error",
];

/// The `result` label of a reply to `op`. `expired` = a write dropped unexecuted because its
/// deadline passed before it ran, wherever it waited (the writer queue, a forward's queue): a
/// definite `Timeout` to a put or delete (admission counts its own drops, of any op);
/// `timeout` = the deadline passed with no quorum (a write's outcome then unknown; a read's
/// errors are always definite, it changed nothing); `not_serving` = this node serves no data
/// requests now (taken out of the ring, or it does not know the ring yet); `invalid` = the
/// client's fault (too large, malformed, invalid arguments, too many siblings).
pub fn result_of(resp: &Response, op: &str) -> &'static str {
    match resp {
        Response::Error(e) => match e.kind {
            ErrorKind::Timeout { .. } if e.definite && matches!(op, "put" | "delete") => "expired",
            ErrorKind::Timeout { .. } => "timeout",
            ErrorKind::Unavailable { .. } => "unavailable",
            ErrorKind::NotServing => "not_serving",
            ErrorKind::Overloaded { .. } => "overloaded",
            ErrorKind::TooLarge { .. }
            | ErrorKind::Malformed
            | ErrorKind::UnsupportedVersion { .. }
            | ErrorKind::InvalidRequest
            | ErrorKind::TooManySiblings { .. } => "invalid",
            _ => "error",
        },
        _ => "ok",
    }
}

/// Client requests by op and result (`requests{op,result}`), latency of the data ops
/// (`request.duration_seconds{op}`, admitted requests only), and siblings per read.
#[derive(Clone)]
pub struct RequestMetrics {
    counts: HashMap<(&'static str, &'static str), Counter>,
    seconds: HashMap<&'static str, Histogram>,
    pub siblings: Histogram,
}

impl RequestMetrics {
    pub fn new(registry: &Registry) -> RequestMetrics {
        let mut counts = HashMap::new();
        for op in OPS {
            // Admin requests are never shed, expired or timed out.
            let results: &[&'static str] = if DATA_OPS.contains(&op) {
                &RESULTS
            } else {
                &["ok", "invalid", "error"]
            };
            for &result in results {
                counts.insert(
                    (op, result),
                    registry.counter_with(
                        "requests",
                        "client requests answered, by op and result",
                        &[("op", op), ("result", result)],
                    ),
                );
            }
        }
        let seconds = DATA_OPS
            .into_iter()
            .map(|op| {
                let h = registry.histogram_with(
                    "request.duration_seconds",
                    "latency of admitted client gets, puts and deletes (errors included)",
                    &[("op", op)],
                );
                (op, h)
            })
            .collect();
        let siblings = registry.histogram(
            "read.siblings",
            "versions (siblings, tombstones included) per client read reply",
            [1.0, 2.0, 3.0, 5.0, 10.0, 25.0, 100.0],
        );
        RequestMetrics {
            counts,
            seconds,
            siblings,
        }
    }

    /// Counts one answered request.
    pub fn count(&self, op: &'static str, result: &'static str) {
        if let Some(c) = self
            .counts
            .get(&(op, result))
            .or_else(|| self.counts.get(&(op, "error")))
        {
            c.inc();
        }
    }

    /// The latency histogram of a data op.
    pub fn seconds(&self, op: &str) -> Option<&Histogram> {
        self.seconds.get(op)
    }

    /// The count of one (op, result) series (tests, status).
    pub fn get(&self, op: &'static str, result: &'static str) -> u64 {
        self.counts.get(&(op, result)).map_or(0, |c| c.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write dropped unexecuted (definite `Timeout`, wherever it waited) is `expired`, not a
    /// quorum `timeout`; a read's timeout is definite (it changed nothing) and stays a
    /// `timeout` (found in review: every read quorum timeout was counted expired, out of the
    /// quorum-failure alert).
    #[test]
    fn a_definite_write_timeout_is_expired_and_a_read_timeout_a_timeout() {
        let timeout = |definite| {
            Response::error(
                ErrorKind::Timeout { acks: 0, needed: 1 },
                definite,
                "n1: key k",
            )
        };
        assert_eq!(result_of(&timeout(true), "put"), "expired");
        assert_eq!(result_of(&timeout(true), "delete"), "expired");
        assert_eq!(result_of(&timeout(false), "put"), "timeout");
        assert_eq!(result_of(&timeout(true), "get"), "timeout");
        let overloaded = Response::error(ErrorKind::Overloaded { retry_after_ms: 5 }, true, "n1");
        assert_eq!(result_of(&overloaded, "get"), "overloaded");
        let not_serving = Response::error(ErrorKind::NotServing, true, "n1: joining");
        assert_eq!(result_of(&not_serving, "put"), "not_serving");
    }
}
