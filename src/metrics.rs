//! The one metrics registry of a replica, on `prometheus-client`.
//!
//! Each module declares its own metrics next to where they change, as a
//! struct made with [`series!`](crate::series): a field is a metric, named
//! after the field, its doc comment the help text. Adding a metric is one
//! field and one line where the value changes, e.g.
//! `self.metrics.prefetch_used.inc()` in `poller::tick`. The struct
//! registers a family per field; each holder of a label set (a stream) takes
//! its own series out of them once ([`Families::of`]).
//!
//! Values that live elsewhere are read when scraped: [`Age`] (seconds since
//! a moment), [`Uptime`], and collectors that read the database first
//! ([`Refresh`], bounded by [`REFRESH_WITHIN`]).
//!
//! `/metrics` ([`crate::http`]) and the OTLP export ([`crate::telemetry`])
//! both read [`Registry::encode`]: a family exists in both or in neither.
//!
//! Every replica serves its own view: sum counters across replicas; take the
//! max of cursor gauges.
//!
//! A leaf: this module imports nothing of the crate.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::TypedMetric;

/// Every family's name starts with this and `_`.
pub const PREFIX: &str = "logcursor";

/// Upper bounds (seconds) of the duration histograms.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How long the values read at scrape time (the database's) may take; a
/// slow source leaves its families out of that scrape rather than stall it.
pub const REFRESH_WITHIN: Duration = Duration::from_secs(2);

/// The families of one replica, and the sources read before each scrape.
pub struct Registry {
    inner: prometheus_client::registry::Registry,
    refreshed: Vec<Arc<dyn Refresh>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            inner: prometheus_client::registry::Registry::with_prefix(PREFIX),
            refreshed: Vec::new(),
        }
    }

    /// Registers `metric` as `logcursor_<name>` (a counter gets `_total`);
    /// `help` is folded onto one line. Returns it, for the caller to keep.
    pub fn register<M: prometheus_client::registry::Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        self.inner.register(name, help.trim_end_matches('.'), metric.clone());
        metric
    }

    /// Families encoded by `collector` itself at each scrape.
    pub fn collect(&mut self, collector: impl Collector) {
        self.inner.register_collector(Box::new(collector));
    }

    /// A collector whose values are read (from the database) before each scrape.
    pub fn collect_refreshed<C: Collector + Refresh>(&mut self, collector: Arc<C>) {
        self.refreshed.push(Arc::clone(&collector) as Arc<dyn Refresh>);
        self.inner.register_collector(Box::new(collector));
    }

    /// Reads the sources (each within [`REFRESH_WITHIN`]), then encodes
    /// every family in the Prometheus text format (version 0.0.4).
    pub async fn encode(&self) -> String {
        futures::future::join_all(self.refreshed.iter().map(|r| async move {
            if tokio::time::timeout(REFRESH_WITHIN, r.refresh()).await.is_err() {
                tracing::warn!(source = r.name(), within = ?REFRESH_WITHIN, "metrics: a source did not answer in time; its families are left out");
                r.clear();
            }
        }))
        .await;
        self.encode_now()
    }

    /// The text as the sources were last read.
    pub fn encode_now(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug
        // in a collector, and a partial page says more than none.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.inner) {
            tracing::error!(error = %e, "metrics: encoding failed");
        }
        text
    }
}

/// The `Content-Type` of [`Registry::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A collector's values are read asynchronously before each scrape (a
/// collector's own `encode` cannot wait).
#[async_trait::async_trait]
pub trait Refresh: Send + Sync + 'static {
    /// For logs.
    fn name(&self) -> &'static str;
    /// Reads the values the next `encode` shows; on failure, logs it and
    /// shows nothing (never stale values).
    async fn refresh(&self);
    /// Shows nothing until the next successful refresh.
    fn clear(&self);
}

/// A metric that makes its own family, with nothing observed yet.
pub trait Make {
    fn make() -> Self;
}

impl Make for Counter {
    fn make() -> Self {
        Counter::default()
    }
}

impl Make for Gauge {
    fn make() -> Self {
        Gauge::default()
    }
}

impl Make for Histogram {
    /// Durations in seconds, on [`BUCKETS`].
    fn make() -> Self {
        Histogram::new(BUCKETS)
    }
}

impl Make for Age {
    fn make() -> Self {
        Age::default()
    }
}

/// What a label set needs to key a family.
pub trait Labels: Clone + Debug + Hash + Eq + EncodeLabelSet + Send + Sync + 'static {}
impl<T: Clone + Debug + Hash + Eq + EncodeLabelSet + Send + Sync + 'static> Labels for T {}

/// The family of `M` by label set `L`.
pub type Of<L, M> = Family<L, M, fn() -> M>;

/// A metric as one holder of the label set `L` sees it, and the family it
/// is taken from.
pub trait Series<L: Labels>: Sized {
    type Family: prometheus_client::registry::Metric + Clone;
    fn family() -> Self::Family;
    fn of(family: &Self::Family, labels: &L) -> Self;
}

impl<L: Labels, M> Series<L> for M
where
    M: Make + EncodeMetric + TypedMetric + Clone + Debug + Send + Sync + 'static,
{
    type Family = Of<L, M>;
    fn family() -> Self::Family {
        Family::new_with_constructor(M::make as fn() -> M)
    }
    /// Metrics share their value between clones: the holder's copy is the series.
    fn of(family: &Self::Family, labels: &L) -> Self {
        family.get_or_create(labels).clone()
    }
}

/// A metric with one more label `K`, chosen where it changes (a tick's
/// outcome, an RPC's method): `metrics.ticks.with(Outcome { .. }).inc()`.
#[derive(Clone, Debug)]
pub struct Labelled<L, K, M> {
    family: Of<(L, K), M>,
    labels: L,
}

impl<L: Labels, K: Labels, M> Labelled<L, K, M>
where
    M: Make + EncodeMetric + TypedMetric + Clone + Debug + Send + Sync + 'static,
{
    /// The series of `extra`, after the holder's labels.
    pub fn with(&self, extra: K) -> M {
        self.family.get_or_create(&(self.labels.clone(), extra)).clone()
    }
}

impl<L: Labels, K: Labels, M> Series<L> for Labelled<L, K, M>
where
    M: Make + EncodeMetric + TypedMetric + Clone + Debug + Send + Sync + 'static,
{
    type Family = Of<(L, K), M>;
    fn family() -> Self::Family {
        Family::new_with_constructor(M::make as fn() -> M)
    }
    fn of(family: &Self::Family, labels: &L) -> Self {
        Labelled {
            family: family.clone(),
            labels: labels.clone(),
        }
    }
}

/// The label set of a holder that adds none (the RPC observer).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct NoLabels;

impl EncodeLabelSet for NoLabels {
    fn encode(&self, _: &mut prometheus_client::encoding::LabelSetEncoder) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

/// Seconds since a moment (epoch seconds), computed when scraped; nothing
/// is shown until the moment is known.
#[derive(Clone, Debug, Default)]
pub struct Age(Arc<AtomicU64>);

impl Age {
    /// `epoch_secs` = 0: unknown.
    pub fn set(&self, epoch_secs: u64) {
        self.0.store(epoch_secs, Ordering::Relaxed);
    }

    /// Seconds since the moment, if known.
    pub fn get(&self) -> Option<u64> {
        let t = self.0.load(Ordering::Relaxed);
        (t > 0).then(|| now_secs().saturating_sub(t))
    }
}

impl TypedMetric for Age {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for Age {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self.get() {
            Some(age) => encoder.encode_gauge(&i64::try_from(age).unwrap_or(i64::MAX)),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// `logcursor_uptime_seconds{replica}`, read when scraped.
#[derive(Debug)]
pub struct Uptime {
    started: std::time::Instant,
    replica: String,
}

impl Uptime {
    pub fn new(replica: &str) -> Uptime {
        Uptime {
            started: std::time::Instant::now(),
            replica: replica.to_string(),
        }
    }
}

impl Collector for Uptime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "uptime_seconds",
            "Seconds since this replica started.",
            None,
            MetricType::Gauge,
        )?;
        let labels = [("replica", self.replica.as_str())];
        family
            .encode_family(&labels)?
            .encode_gauge(&self.started.elapsed().as_secs_f64())
    }
}

/// Makes a struct of metrics whose fields are registered as families by
/// one call, and taken per holder of a label set:
///
/// ```ignore
/// logcursor::series! {
///     /// What a stream's ticks did.
///     pub struct StreamMetrics for StreamLabels {
///         /// Events this replica stored.
///         pub events_inserted: Counter,
///     }
/// }
/// let families = StreamMetrics::register(&mut registry);
/// let burns: StreamMetrics = families.of(&labels);
/// burns.events_inserted.inc_by(30);
/// ```
///
/// A field's name is its family's (after `logcursor_`; a counter gets
/// `_total`), its doc comment the help text, its type a [`Series`]: a
/// [`Counter`], [`Gauge`], duration [`Histogram`] (seconds, [`BUCKETS`]),
/// [`Age`], or a [`Labelled`] one of those.
#[macro_export]
macro_rules! series {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident for $labels:ty {
            $(
                $(#[doc = $help:literal])+
                $fvis:vis $field:ident : $ty:ty
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug)]
        $vis struct $name {
            $( $(#[doc = $help])+ $fvis $field: $ty, )*
        }

        impl $name {
            /// Registers a family per field; each holder of a label set
            /// then takes its series with `of`.
            $vis fn register(registry: &mut $crate::metrics::Registry) -> $crate::metrics::Families<$labels, $name> {
                $(
                    let $field = registry.register(
                        stringify!($field),
                        concat!($($help, " "),+),
                        <$ty as $crate::metrics::Series<$labels>>::family(),
                    );
                )*
                $crate::metrics::Families::new(move |labels: &$labels| $name {
                    $( $field: <$ty as $crate::metrics::Series<$labels>>::of(&$field, labels), )*
                })
            }
        }
    };
}

/// The registered families of a [`series!`] struct.
pub struct Families<L, T>(Arc<dyn Fn(&L) -> T + Send + Sync>);

impl<L, T> Clone for Families<L, T> {
    fn clone(&self) -> Self {
        Families(Arc::clone(&self.0))
    }
}

impl<L, T> Families<L, T> {
    pub fn new(of: impl Fn(&L) -> T + Send + Sync + 'static) -> Self {
        Families(Arc::new(of))
    }

    /// The series of the holder of `labels` (created at zero on first use).
    pub fn of(&self, labels: &L) -> T {
        (self.0)(labels)
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
