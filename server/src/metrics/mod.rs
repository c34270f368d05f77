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
/// A fraction or ratio (base unit 1, not percent or parts per million); `Status` shows it in
/// thousandths.
pub type Ratio = prometheus_client::metrics::gauge::Gauge<f64, AtomicU64>;

/// A histogram: `prometheus-client`'s (buckets, exposition) plus its count and sum, which
/// that crate does not expose outside its tests, for `Status`.
#[derive(Debug, Clone)]
pub struct Histogram {
    inner: prometheus_client::metrics::histogram::Histogram,
    count: Arc<AtomicU64>,
    /// The sum of observations, as `f64` bits.
    sum: Arc<AtomicU64>,
    /// Of seconds (latencies; `Status` shows the sum in microseconds), else of a count.
    seconds: bool,
}

impl Histogram {
    pub fn new(buckets: impl IntoIterator<Item = f64>) -> Histogram {
        Histogram {
            inner: prometheus_client::metrics::histogram::Histogram::new(buckets),
            count: Arc::new(AtomicU64::new(0)),
            sum: Arc::new(AtomicU64::new(0f64.to_bits())),
            seconds: false,
        }
    }

    /// Latencies in seconds, 100 µs to about 13 s.
    pub fn latency() -> Histogram {
        Histogram {
            seconds: true,
            ..Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 18,
            ))
        }
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
    Ratio(Ratio),
    Histogram(Histogram),
}

/// `Status` carries integers: a fraction shows in thousandths.
fn thousandths(v: f64) -> u64 {
    (v * 1000.0).round().max(0.0) as u64
}

struct Entry {
    name: String,
    metric: Metric,
}

/// Label pairs of one series of a family (few, fixed values: an op, a result, a reason, a
/// worker, a peer; never a key or a vnode).
pub type Labels = Vec<(String, String)>;

type HistogramCtor = fn() -> prometheus_client::metrics::histogram::Histogram;

/// The families registered so far, by dotted name: a labelled metric registers its family
/// once and each label set is a series of it.
enum FamilyKind {
    Counter(prometheus_client::metrics::family::Family<Labels, Counter>),
    Gauge(prometheus_client::metrics::family::Family<Labels, Gauge>),
    Histogram(
        prometheus_client::metrics::family::Family<
            Labels,
            prometheus_client::metrics::histogram::Histogram,
            HistogramCtor,
        >,
    ),
}

fn latency_buckets() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
    )
}

/// `name{k=v,k2=v2}`: how a series of a family shows in `Status`.
pub fn series_name(name: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

fn owned(labels: &[(&str, &str)]) -> Labels {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

type FamilyProbeFn = Box<dyn Fn() -> Vec<(Labels, f64)> + Send + Sync>;

/// A gauge family whose series are read from a closure at every read (a value per peer, per
/// hint target, per worker state): series come and go with what they describe.
struct FamilyProbe {
    /// The Prometheus name (without the prefix) and the dotted one `Status` shows.
    name: String,
    dotted: String,
    help: String,
    /// A counter family (values only rise; exposed with `_total`), else gauges.
    counter: bool,
    /// Its values are fractions (ratios, phi): `Status` shows them in thousandths.
    fraction: bool,
    read: FamilyProbeFn,
}

impl std::fmt::Debug for FamilyProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FamilyProbe")
            .field("name", &self.name)
            .finish()
    }
}

impl prometheus_client::collector::Collector for FamilyProbe {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let series = (self.read)();
        let kind = if self.counter {
            prometheus_client::metrics::counter::ConstCounter::new(0f64).metric_type()
        } else {
            prometheus_client::metrics::gauge::ConstGauge::new(0f64).metric_type()
        };
        let mut family = encoder.encode_descriptor(&self.name, &self.help, None, kind)?;
        for (labels, value) in series {
            let series = family.encode_family(&labels)?;
            if self.counter {
                // Counts are integers: shown without a fraction.
                prometheus_client::metrics::counter::ConstCounter::new(value.max(0.0) as u64)
                    .encode(series)?;
            } else {
                prometheus_client::metrics::gauge::ConstGauge::new(value).encode(series)?;
            }
        }
        Ok(())
    }
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
    families: Mutex<std::collections::HashMap<String, FamilyKind>>,
    family_probes: Mutex<Vec<Arc<FamilyProbe>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            prometheus: Mutex::new(prometheus_client::registry::Registry::with_prefix(
                PROMETHEUS_PREFIX,
            )),
            entries: Mutex::new(Vec::new()),
            probes: Mutex::new(Vec::new()),
            families: Mutex::new(std::collections::HashMap::new()),
            family_probes: Mutex::new(Vec::new()),
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
            Metric::Ratio(r) => prom.register(pname, help, r.clone()),
            Metric::Histogram(h) => prom.register(pname, help, h.inner.clone()),
        }
        entries.push(Entry {
            name: name.to_string(),
            metric,
        });
    }

    /// One series of the family `name` (registered with its first series): a counter, gauge
    /// or histogram (seconds) labelled `labels`. Registering the same series twice, or a
    /// family under two kinds, is a programming error.
    fn series(&self, name: &str, help: &str, labels: &[(&str, &str)], kind: Metric) -> Metric {
        let labels = owned(labels);
        let shown = series_name(name, &labels);
        let mut entries = self.entries.lock().expect("metrics registry lock poisoned");
        assert!(
            !entries.iter().any(|e| e.name == shown || e.name == name),
            "metric {shown} registered twice"
        );
        let mut families = self
            .families
            .lock()
            .expect("metrics registry lock poisoned");
        let family = families.entry(name.to_string()).or_insert_with(|| {
            let mut prom = self
                .prometheus
                .lock()
                .expect("metrics registry lock poisoned");
            let pname = prometheus_name(name);
            match &kind {
                Metric::Counter(_) => {
                    let f = prometheus_client::metrics::family::Family::default();
                    prom.register(pname, help, f.clone());
                    FamilyKind::Counter(f)
                }
                Metric::Gauge(_) => {
                    let f = prometheus_client::metrics::family::Family::default();
                    prom.register(pname, help, f.clone());
                    FamilyKind::Gauge(f)
                }
                Metric::Ratio(_) => panic!("metric {name}: ratios are not labelled"),
                Metric::Histogram(_) => {
                    let f = prometheus_client::metrics::family::Family::new_with_constructor(
                        latency_buckets as HistogramCtor,
                    );
                    prom.register(pname, help, f.clone());
                    FamilyKind::Histogram(f)
                }
            }
        });
        let metric = match (family, kind) {
            (FamilyKind::Counter(f), Metric::Counter(_)) => {
                Metric::Counter(f.get_or_create_owned(&labels))
            }
            (FamilyKind::Gauge(f), Metric::Gauge(_)) => {
                Metric::Gauge(f.get_or_create_owned(&labels))
            }
            (FamilyKind::Histogram(f), Metric::Histogram(_)) => Metric::Histogram(Histogram {
                inner: f.get_or_create_owned(&labels),
                count: Arc::new(AtomicU64::new(0)),
                sum: Arc::new(AtomicU64::new(0f64.to_bits())),
                seconds: true,
            }),
            _ => panic!("metric family {name} registered with two kinds"),
        };
        entries.push(Entry {
            name: shown,
            metric: metric.clone(),
        });
        metric
    }

    /// A counter of the family `name`, labelled.
    pub fn counter_with(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        match self.series(name, help, labels, Metric::Counter(Counter::default())) {
            Metric::Counter(c) => c,
            _ => unreachable!("series returns the kind it was given"),
        }
    }

    /// A gauge of the family `name`, labelled.
    pub fn gauge_with(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        match self.series(name, help, labels, Metric::Gauge(Gauge::default())) {
            Metric::Gauge(g) => g,
            _ => unreachable!("series returns the kind it was given"),
        }
    }

    /// A latency histogram (seconds) of the family `name`, labelled.
    pub fn histogram_with(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Histogram {
        match self.series(name, help, labels, Metric::Histogram(Histogram::latency())) {
            Metric::Histogram(h) => h,
            _ => unreachable!("series returns the kind it was given"),
        }
    }

    /// A gauge family whose series (label set, value) are read from `read` whenever the
    /// registry is read: a value per peer or per worker, coming and going with them.
    pub fn probe_family(
        &self,
        name: &str,
        help: &str,
        read: impl Fn() -> Vec<(Labels, f64)> + Send + Sync + 'static,
    ) {
        self.add_family_probe(name, help, false, false, Box::new(read));
    }

    /// `probe_family` of fractions (phi per peer): `Status` shows them in thousandths.
    pub fn probe_fraction_family(
        &self,
        name: &str,
        help: &str,
        read: impl Fn() -> Vec<(Labels, f64)> + Send + Sync + 'static,
    ) {
        self.add_family_probe(name, help, false, true, Box::new(read));
    }

    /// A counter family read from `read` at every read (counts kept elsewhere, per worker).
    pub fn probe_counter_family(
        &self,
        name: &str,
        help: &str,
        read: impl Fn() -> Vec<(Labels, f64)> + Send + Sync + 'static,
    ) {
        self.add_family_probe(name, help, true, false, Box::new(read));
    }

    fn add_family_probe(
        &self,
        name: &str,
        help: &str,
        counter: bool,
        fraction: bool,
        read: FamilyProbeFn,
    ) {
        let probe = Arc::new(FamilyProbe {
            name: prometheus_name(name),
            dotted: name.to_string(),
            help: help.to_string(),
            counter,
            fraction,
            read,
        });
        {
            let mut families = self
                .family_probes
                .lock()
                .expect("metrics registry lock poisoned");
            assert!(
                !families.iter().any(|p| p.name == probe.name),
                "metric {name} registered twice"
            );
            families.push(probe.clone());
        }
        // Registered under the registry's prefix like every other metric.
        self.prometheus
            .lock()
            .expect("metrics registry lock poisoned")
            .register_collector(Box::new(probe));
    }

    /// A histogram with its own buckets (not seconds), registered.
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: impl IntoIterator<Item = f64>,
    ) -> Histogram {
        let h = Histogram::new(buckets);
        self.register(name, help, Metric::Histogram(h.clone()));
        h
    }

    /// A gauge read from `read` (a fraction, a ratio) whenever the registry is read.
    pub fn probe_f64(
        &self,
        name: &str,
        help: &str,
        read: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        self.probe_fraction_family(name, help, move || vec![(Vec::new(), read())]);
    }

    /// A counter whose value is kept elsewhere (it only rises), read from `read` whenever the
    /// registry is read; exposed with `_total`.
    pub fn probe_counter(
        &self,
        name: &str,
        help: &str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.probe_counter_family(name, help, move || vec![(Vec::new(), read() as f64)]);
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
    /// histogram of seconds shows as `name.count` and `name.sum_us`, another (of a count) as
    /// `name.count` and `name.sum`; fractions (ratios, phi) in thousandths.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.refresh_probes();
        let entries = self.entries.lock().expect("metrics registry lock poisoned");
        let mut out = Vec::with_capacity(entries.len() + 4);
        for e in entries.iter() {
            match &e.metric {
                Metric::Counter(c) => out.push((e.name.clone(), c.get())),
                Metric::Gauge(g) => out.push((e.name.clone(), g.get())),
                Metric::Ratio(r) => out.push((e.name.clone(), thousandths(r.get()))),
                Metric::Histogram(h) => {
                    out.push((format!("{}.count", e.name), h.count()));
                    let sum = h.sum().max(0.0);
                    if h.seconds {
                        // Seconds are shown as microseconds: an integer that still says
                        // something.
                        out.push((format!("{}.sum_us", e.name), (sum * 1e6).round() as u64));
                    } else {
                        out.push((format!("{}.sum", e.name), sum.round() as u64));
                    }
                }
            }
        }
        drop(entries);
        let probes = self
            .family_probes
            .lock()
            .expect("metrics registry lock poisoned");
        for p in probes.iter() {
            for (labels, value) in (p.read)() {
                // Fractions (phi, ratios) show as thousandths, whole or not (1.0 as 1000):
                // an integer that still says something (`Status` carries integers).
                let v = if p.fraction {
                    thousandths(value)
                } else {
                    value.max(0.0).round() as u64
                };
                out.push((series_name(&p.dotted, &labels), v));
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
        prometheus_client::encoding::prometheus_text::encode(&mut out, &prom)
            .expect("writing to a String does not fail");
        out
    }

    /// The `Content-Type` of [`Registry::encode`] (the Prometheus text format 0.0.4).
    pub const CONTENT_TYPE: &'static str =
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
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
        connections_refused: Counter = "connections_refused", "connections refused at the connection limit (or, on the peer port, the per-address limit of unauthenticated ones)";
        frames_rejected: Counter = "frames_rejected", "frames refused by the codec (too large, unknown version)";
        malformed: Counter = "malformed", "frames that did not decode";
        write_stalls: Counter = "write_stalls", "connections closed because the other side read none of their replies for the write-stall timeout (30 s)";
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

    /// Found in review: `Status` showed a fraction that happened to be whole (a pressure
    /// ratio at exactly 1.0) as `1`, which reads as 0.001 beside its thousandths, and the sum
    /// of a histogram of counts (siblings per read) in "microseconds".
    #[test]
    fn status_shows_fractions_in_thousandths_and_count_sums_as_counts() {
        let reg = Registry::default();
        reg.probe_f64("x.pressure_ratio", "a ratio", || 1.0);
        reg.probe_fraction_family("x.phi", "phi", || {
            vec![
                (vec![("peer".into(), "a".into())], 2.0),
                (vec![("peer".into(), "b".into())], 0.5),
            ]
        });
        reg.probe_family("x.by_state", "counts", || {
            vec![(vec![("state".into(), "up".into())], 3.0)]
        });
        let siblings = reg.histogram("x.siblings", "versions per read", [1.0, 2.0, 4.0]);
        for _ in 0..3 {
            siblings.observe(1.0);
        }
        let snap: std::collections::BTreeMap<String, u64> = reg.snapshot().into_iter().collect();
        assert_eq!(snap["x.pressure_ratio"], 1000);
        assert_eq!(snap["x.phi{peer=a}"], 2000);
        assert_eq!(snap["x.phi{peer=b}"], 500);
        assert_eq!(snap["x.by_state{state=up}"], 3);
        assert_eq!(snap["x.siblings.count"], 3);
        assert_eq!(snap["x.siblings.sum"], 3);
        assert!(!snap.contains_key("x.siblings.sum_us"));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_name_registers_once() {
        let reg = Registry::default();
        reg.counter("a.b", "x");
        reg.counter("a.b", "y");
    }
}
