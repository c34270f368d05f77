//! Node-wide counters, exported by `status` (and `kvctl status`).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($($field:ident => $name:literal),* $(,)?) => {
        /// Monotone counters and gauges; names are stable (documented in docs/operations.md).
        #[derive(Debug, Default)]
        pub struct Metrics { $(pub $field: AtomicU64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> Vec<(String, u64)> {
                vec![$(($name.to_string(), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

metrics! {
    connections_accepted => "net.connections_accepted",
    connections_active => "net.connections_active",
    connections_refused => "net.connections_refused",
    frames_rejected => "net.frames_rejected",
    malformed => "net.malformed",
    requests_get => "requests.get",
    requests_put => "requests.put",
    requests_delete => "requests.delete",
    requests_ping => "requests.ping",
    requests_status => "requests.status",
    errors => "requests.errors",
    timeouts => "requests.timeouts",
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
