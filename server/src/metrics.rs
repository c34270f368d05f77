//! Node-wide counters, exported by `status` (and `kvctl status`). Names are stable and
//! documented in docs/operations.md.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($(#[$doc:meta])* $ty:ident { $($field:ident => $name:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $ty { $(pub $field: AtomicU64,)* }

        impl $ty {
            /// `(prefix + name, value)` for every counter.
            pub fn snapshot(&self, prefix: &str) -> Vec<(String, u64)> {
                vec![$((format!("{prefix}{}", $name), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

metrics! {
    /// Per listener (client `net.`, peer `peer_net.`).
    Metrics {
        connections_accepted => "connections_accepted",
        connections_active => "connections_active",
        connections_refused => "connections_refused",
        frames_rejected => "frames_rejected",
        malformed => "malformed",
    }
}

metrics! {
    /// Requests and their coordination.
    RequestMetrics {
        get => "requests.get",
        put => "requests.put",
        delete => "requests.delete",
        ping => "requests.ping",
        status => "requests.status",
        ring => "requests.ring",
        members => "requests.members",
        errors => "requests.errors",
        timeouts => "requests.timeouts",
        unavailable => "requests.unavailable",
        forwarded => "coordinator.forwarded_writes",
        forwarded_after_local_failure => "coordinator.forwarded_after_local_failure",
        deletes_read_first => "coordinator.deletes_read_first",
        coordinated_writes => "coordinator.writes",
        coordinated_reads => "coordinator.reads",
        replicate_sent => "coordinator.replicate_sent",
        replicate_failed => "coordinator.replicate_failed",
        late_acks => "coordinator.late_acks",
        read_repairs => "read_repair.sent",
        read_repair_failed => "read_repair.failed",
        peer_read_local => "peer.read_local",
        peer_replicate => "peer.replicate",
        peer_forward => "peer.forward",
        peers_refused => "peer.handshakes_refused",
        peer_auth_failures => "peer.auth_failures",
    }
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
