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

crate::metrics::metric_set! {
    /// Client requests by kind, and how many were answered with an error (registered
    /// without a prefix).
    pub struct RequestMetrics {
        get: Counter = "requests.get", "client gets";
        put: Counter = "requests.put", "client puts";
        delete: Counter = "requests.delete", "client deletes";
        ping: Counter = "requests.ping", "client pings";
        status: Counter = "requests.status", "status requests";
        ring: Counter = "requests.ring", "ring requests";
        cluster: Counter = "requests.cluster", "kvctl cluster requests";
        members: Counter = "requests.members", "members requests";
        repair: Counter = "requests.repair", "repair requests (anti-entropy cycles started on demand)";
        errors: Counter = "requests.errors", "client requests answered with an error";
        timeouts: Counter = "requests.timeouts", "client requests answered Timeout";
        unavailable: Counter = "requests.unavailable", "client requests answered Unavailable";
        get_seconds: Histogram = "requests.get_seconds", "latency of client gets, errors included";
        put_seconds: Histogram = "requests.put_seconds", "latency of client puts, errors included";
        delete_seconds: Histogram = "requests.delete_seconds", "latency of client deletes, errors included";
    }
}
