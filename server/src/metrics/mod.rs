//! One registry for every counter, gauge and histogram of the node.
//!
//! Each subsystem declares its metrics once, in a `metric_set!` struct (the field, its stable
//! dotted name and its help text), and registers the set at start. `Status` (`kvctl status`) is
//! a loop over the registry ([`Registry::snapshot`]) and the Prometheus text exposition is the
//! same registry encoded by `prometheus-client` ([`Registry::encode`]). Names are stable and
//! documented in docs/operations.md; the Prometheus name is `ringkv_` + the dotted name with
//! dots as underscores (counters get `_total`).
//!
//! Values that live elsewhere (a queue length, a RocksDB property, the membership view) are
//! *probes*: a gauge refreshed from a closure each time the registry is read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub type Counter = prometheus_client::metrics::counter::Counter<u64, AtomicU64>;
pub type Gauge = prometheus_client::metrics::gauge::Gauge<u64, AtomicU64>;

/// A histogram: `prometheus-client`'s (buckets, exposition) plus its count and sum, which
/// that crate does not expose outside its tests, for `Status`.
#[derive(Debug, Clone)]
pub struct Histogram {
    inner: prometheus_client::metrics::histogram::Histogram,
    count: Arc<AtomicU64>,
    /// The sum of observations, as `f64` bits.
    sum: Arc<AtomicU64>,
}

impl Histogram {
    pub fn new(buckets: impl IntoIterator<Item = f64>) -> Histogram {
        Histogram {
            inner: prometheus_client::metrics::histogram::Histogram::new(buckets),
            count: Arc::new(AtomicU64::new(0)),
            sum: Arc::new(AtomicU64::new(0f64.to_bits())),
        }
    }

    /// Latencies in seconds, 100 µs to about 13 s.
    pub fn latency() -> Histogram {
        Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.0001, 2.0, 18,
        ))
    }

    pub fn observe(&self, v: f64) {
        self.inner.observe(v);
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::latency()
    }
}

/// Prefix of every Prometheus metric name.
pub const PROMETHEUS_PREFIX: &str = "ringkv";

/// A registered metric (cheap handles: clones share the value).
#[derive(Debug, Clone)]
pub enum Metric {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

struct Entry {
    name: String,
    metric: Metric,
}

type ProbeFn = Box<dyn Fn() -> u64 + Send + Sync>;

struct Probe {
    gauge: Gauge,
    read: ProbeFn,
}

pub struct Registry {
    prometheus: Mutex<prometheus_client::registry::Registry>,
    entries: Mutex<Vec<Entry>>,
    probes: Mutex<Vec<Probe>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            prometheus: Mutex::new(prometheus_client::registry::Registry::with_prefix(
                PROMETHEUS_PREFIX,
            )),
            entries: Mutex::new(Vec::new()),
            probes: Mutex::new(Vec::new()),
        }
    }
}

/// `storage.write_batches` → `storage_write_batches`.
fn prometheus_name(name: &str) -> String {
    name.replace(['.', '-'], "_")
}

impl Registry {
    /// Registers `metric` under the dotted `name`. Names are unique: registering one twice is a
    /// programming error.
    pub fn register(&self, name: &str, help: &str, metric: Metric) {
        let mut entries = self.entries.lock().expect("metrics registry lock poisoned");
        assert!(
            !entries.iter().any(|e| e.name == name),
            "metric {name} registered twice"
        );
        let mut prom = self
            .prometheus
            .lock()
            .expect("metrics registry lock poisoned");
        let pname = prometheus_name(name);
        match &metric {
            Metric::Counter(c) => prom.register(pname, help, c.clone()),
            Metric::Gauge(g) => prom.register(pname, help, g.clone()),
            Metric::Histogram(h) => prom.register(pname, help, h.inner.clone()),
        }
        entries.push(Entry {
            name: name.to_string(),
            metric,
        });
    }

    /// A new counter, registered.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        let c = Counter::default();
        self.register(name, help, Metric::Counter(c.clone()));
        c
    }

    /// A gauge whose value is read from `read` whenever the registry is read.
    pub fn probe(&self, name: &str, help: &str, read: impl Fn() -> u64 + Send + Sync + 'static) {
        let gauge = Gauge::default();
        self.register(name, help, Metric::Gauge(gauge.clone()));
        self.probes
            .lock()
            .expect("metrics registry lock poisoned")
            .push(Probe {
                gauge,
                read: Box::new(read),
            });
    }

    fn refresh_probes(&self) {
        for p in self
            .probes
            .lock()
            .expect("metrics registry lock poisoned")
            .iter()
        {
            p.gauge.set((p.read)());
        }
    }

    /// Every metric as `(name, value)`, in registration order: what `Status` carries. A
    /// histogram (of seconds) shows as `name.count` and `name.sum_us`.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.refresh_probes();
        let entries = self.entries.lock().expect("metrics registry lock poisoned");
        let mut out = Vec::with_capacity(entries.len() + 4);
        for e in entries.iter() {
            match &e.metric {
                Metric::Counter(c) => out.push((e.name.clone(), c.get())),
                Metric::Gauge(g) => out.push((e.name.clone(), g.get())),
                Metric::Histogram(h) => {
                    out.push((format!("{}.count", e.name), h.count()));
                    // Seconds are shown as microseconds: an integer that still says something.
                    let sum = h.sum().max(0.0);
                    out.push((format!("{}.sum_us", e.name), (sum * 1e6).round() as u64));
                }
            }
        }
        out
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        self.refresh_probes();
        let prom = self
            .prometheus
            .lock()
            .expect("metrics registry lock poisoned");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &prom)
            .expect("writing to a String does not fail");
        out
    }
}

/// Declares a set of metrics: a struct of `Counter`/`Gauge` fields, each with its dotted name
/// and help text, and `register(&registry, prefix)` that registers them all under `prefix`.
macro_rules! metric_set {
    (
        $(#[$doc:meta])*
        pub struct $ty:ident {
            $( $(#[$fdoc:meta])* $field:ident: $kind:ident = $name:literal, $help:literal; )*
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Default, Clone)]
        pub struct $ty {
            $( $(#[$fdoc])* pub $field: $crate::metrics::$kind, )*
        }

        impl $ty {
            /// Registers every metric of the set, each named `prefix` + its name.
            pub fn register(&self, registry: &$crate::metrics::Registry, prefix: &str) {
                $(
                    registry.register(
                        &format!("{prefix}{}", $name),
                        $help,
                        $crate::metrics::Metric::$kind(self.$field.clone()),
                    );
                )*
            }
        }
    };
}
pub(crate) use metric_set;

metric_set! {
    /// Per listener (client `net.`, peer `peer_net.`).
    pub struct ListenerMetrics {
        connections_accepted: Counter = "connections_accepted", "connections accepted";
        connections_active: Gauge = "connections_active", "connections open now";
        connections_refused: Counter = "connections_refused", "connections refused at the connection limit";
        frames_rejected: Counter = "frames_rejected", "frames refused by the codec (too large, unknown version)";
        malformed: Counter = "malformed", "frames that did not decode";
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    metric_set! {
        pub struct TestSet {
            hits: Counter = "test.hits", "hits";
            depth: Gauge = "test.depth", "depth";
            latency: Histogram = "test.seconds", "latency";
        }
    }

    #[test]
    fn snapshot_and_exposition_read_the_same_values() {
        let reg = Registry::default();
        let set = TestSet::default();
        set.register(&reg, "");
        let extra = reg.counter("other.count", "other");
        reg.probe("test.probe", "probe", || 7);
        set.hits.inc();
        set.hits.inc();
        set.depth.set(5);
        extra.inc();
        set.latency.observe(0.002);
        set.latency.observe(0.003);
        let snap = reg.snapshot();
        assert_eq!(
            snap,
            vec![
                ("test.hits".to_string(), 2),
                ("test.depth".to_string(), 5),
                ("test.seconds.count".to_string(), 2),
                ("test.seconds.sum_us".to_string(), 5000),
                ("other.count".to_string(), 1),
                ("test.probe".to_string(), 7),
            ]
        );
        let text = reg.encode();
        assert!(text.contains("ringkv_test_hits_total 2"), "{text}");
        assert!(text.contains("ringkv_test_depth 5"), "{text}");
        assert!(text.contains("ringkv_test_probe 7"), "{text}");
        assert!(text.contains("ringkv_test_seconds_count 2"), "{text}");
        assert!(
            text.contains("ringkv_test_seconds_bucket{le=\"0.0032\"} 2"),
            "{text}"
        );
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_name_registers_once() {
        let reg = Registry::default();
        reg.counter("a.b", "x");
        reg.counter("a.b", "y");
    }
}
