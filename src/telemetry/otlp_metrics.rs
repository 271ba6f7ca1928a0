//! Metrics over OTLP, read from the one registry: every
//! `OTEL_METRIC_EXPORT_INTERVAL` (default 60 s) and once more at shutdown,
//! the registry's text ([`Registry::encode`], exactly what `/metrics`
//! serves, database gauges included) becomes OTLP data points: a counter a
//! cumulative monotonic sum, a gauge a gauge, a histogram an explicit-bucket
//! histogram. Names follow OpenTelemetry's: `logcursor_events_inserted_total`
//! is `logcursor.events_inserted`, `logcursor_tick_duration_seconds` is
//! `logcursor.tick_duration` in unit `s`.
//!
//! Why not the OpenTelemetry SDK's meter: it can only be fed by its own
//! instruments (it has no observable histogram), so a second set of
//! instruments would mirror the registry, and drift from it.
//!
//! Settings (as the SDK reads them): `OTEL_EXPORTER_OTLP_ENDPOINT` turns it
//! on (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` overrides the URL),
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, or `http/protobuf` by default,
//! POSTed to `<endpoint>/v1/metrics`), `OTEL_EXPORTER_OTLP_HEADERS`
//! (`k=v,…`, values percent-decoded), `OTEL_EXPORTER_OTLP_TIMEOUT` (ms,
//! default 10 s). Each has a `_METRICS_` variant that wins. Header values
//! and URLs are secrets: never logged (URLs only redacted).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use super::TelemetryError;
use crate::metrics::{Registry, PREFIX};
use crate::redact::redact_url;

/// Where and how metrics are sent, from the `OTEL_*` variables.
#[derive(Clone)]
pub struct Settings {
    pub url: String,
    pub grpc: bool,
    /// Sent with every export (an API key, typically).
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub interval: Duration,
}

impl Settings {
    /// `None` when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset or empty.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Settings>, TelemetryError> {
        let Some(base) = var("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let either = |key: &str| {
            var(&key.replace("OTLP_", "OTLP_METRICS_"))
                .filter(|v| !v.is_empty())
                .or_else(|| var(key).filter(|v| !v.is_empty()))
        };
        let protocol = either("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "http/protobuf".into());
        let grpc = match protocol.as_str() {
            "grpc" => true,
            "http/protobuf" => false,
            _ => return Err(TelemetryError::Protocol(protocol)),
        };
        let url = match var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").filter(|e| !e.is_empty()) {
            Some(url) => url,
            None if grpc => base,
            None => format!("{}/v1/metrics", base.trim_end_matches('/')),
        };
        let millis = |key: &'static str, default: u64| match either(key) {
            None => Ok(Duration::from_millis(default)),
            Some(v) => v
                .trim()
                .parse()
                .map(Duration::from_millis)
                .map_err(|_| TelemetryError::Setting(key)),
        };
        let headers = match either("OTEL_EXPORTER_OTLP_HEADERS") {
            None => Vec::new(),
            Some(h) => parse_headers(&h).ok_or(TelemetryError::Setting("OTEL_EXPORTER_OTLP_HEADERS"))?,
        };
        Ok(Some(Settings {
            url,
            grpc,
            headers,
            timeout: millis("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000)?,
            interval: millis("OTEL_METRIC_EXPORT_INTERVAL", 60_000)?.max(Duration::from_millis(100)),
        }))
    }
}

/// `k=v,k2=v2`, values percent-encoded.
fn parse_headers(s: &str) -> Option<Vec<(String, String)>> {
    s.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let v = percent_decode(v.trim())?;
            Some((k.trim().to_ascii_lowercase(), v))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// The periodic exporter; [`MetricsExport::finish`] sends the last values.
pub struct MetricsExport {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    timeout: Duration,
}

impl MetricsExport {
    /// Starts exporting `registry` if `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub fn from_env(registry: &Arc<Registry>, replica_id: &str) -> Result<Option<MetricsExport>, TelemetryError> {
        match Settings::from_env(|k| std::env::var(k).ok())? {
            Some(settings) => Self::start(registry, replica_id, settings).map(Some),
            None => Ok(None),
        }
    }

    /// Exports every `settings.interval`, from a task of its own.
    pub fn start(
        registry: &Arc<Registry>,
        replica_id: &str,
        settings: Settings,
    ) -> Result<MetricsExport, TelemetryError> {
        let sink = Sink::new(&settings)?;
        let exporter = Exporter {
            registry: Arc::clone(registry),
            sink,
            resource: Resource {
                attributes: ResourceAttributesWithSchema::from(&super::resource(replica_id))
                    .attributes
                    .0,
                ..Default::default()
            },
            started: unix_nanos(),
            shown: redact_url(&settings.url),
        };
        let stop = CancellationToken::new();
        let token = stop.clone();
        let interval = settings.interval;
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => exporter.export().await,
                    _ = token.cancelled() => break,
                }
            }
            // The last values, e.g. the totals of a replica that is stopping.
            exporter.export().await;
        });
        Ok(MetricsExport {
            stop,
            task: Some(task),
            timeout: settings.timeout,
        })
    }

    /// Sends the values as they are now and stops (bounded by the export timeout).
    pub async fn finish(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            // A refresh (2 s) and one export.
            let bound = self.timeout + crate::metrics::REFRESH_WITHIN;
            if tokio::time::timeout(bound, task).await.is_err() {
                tracing::warn!(within = ?bound, "OTLP metrics: the last export did not finish in time");
            }
        }
    }
}

impl Drop for MetricsExport {
    fn drop(&mut self) {
        // Not finished (start-up failed later): no last export.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

enum Sink {
    Grpc(MetricsServiceClient<tonic::transport::Channel>, Vec<(String, String)>),
    Http {
        client: reqwest::Client,
        url: String,
        headers: reqwest::header::HeaderMap,
    },
}

impl Sink {
    fn new(s: &Settings) -> Result<Sink, TelemetryError> {
        if s.grpc {
            let channel = tonic::transport::Channel::from_shared(s.url.clone())
                .map_err(|_| TelemetryError::Setting("OTEL_EXPORTER_OTLP_ENDPOINT"))?
                .timeout(s.timeout)
                .connect_timeout(s.timeout)
                .connect_lazy();
            return Ok(Sink::Grpc(MetricsServiceClient::new(channel), s.headers.clone()));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &s.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| TelemetryError::Setting("OTEL_EXPORTER_OTLP_HEADERS"))?;
            let mut value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| TelemetryError::Setting("OTEL_EXPORTER_OTLP_HEADERS"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .timeout(s.timeout)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        Ok(Sink::Http {
            client,
            url: s.url.clone(),
            headers,
        })
    }

    async fn send(&self, request: ExportMetricsServiceRequest) -> Result<(), String> {
        match self {
            Sink::Grpc(client, headers) => {
                let mut request = tonic::Request::new(request);
                for (k, v) in headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?;
                    let value = v.parse().map_err(|_| format!("header {k}: not a valid value"))?;
                    request.metadata_mut().insert(key, value);
                }
                client
                    .clone()
                    .export(request)
                    .await
                    .map(|_| ())
                    .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
            }
            Sink::Http { client, url, headers } => {
                let response = client
                    .post(url)
                    .headers(headers.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(request.encode_to_vec())
                    .send()
                    .await
                    // Without the URL: it may hold a key.
                    .map_err(|e| e.without_url().to_string())?;
                match response.status() {
                    s if s.is_success() => Ok(()),
                    s => Err(format!("HTTP {s}")),
                }
            }
        }
    }
}

struct Exporter {
    registry: Arc<Registry>,
    sink: Sink,
    resource: Resource,
    /// Start of every cumulative series: when this replica began counting.
    started: u64,
    /// The redacted URL, for logs.
    shown: String,
}

impl Exporter {
    async fn export(&self) {
        let text = self.registry.encode().await;
        let metrics = to_otlp(&text, self.started, unix_nanos());
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: PREFIX.into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        if let Err(e) = self.sink.send(request).await {
            tracing::warn!(endpoint = %self.shown, error = %e, "OTLP metrics export failed; the next one sends the totals again");
        }
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One family of the text format.
#[derive(Debug, Default)]
struct Family {
    name: String,
    help: String,
    kind: String,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Sample {
    /// The sample's own name (`…_bucket`, `…_sum`, `…_total`, …).
    name: String,
    labels: Vec<(String, String)>,
    value: String,
}

/// Families of the Prometheus text format (version 0.0.4), as
/// `prometheus-client` writes them: `# HELP` and `# TYPE` before samples.
fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.push(Family {
                name: name.to_string(),
                help: help.replace("\\n", "\n").replace("\\\\", "\\"),
                ..Family::default()
            });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            match families.last_mut() {
                Some(f) if f.name == name => f.kind = kind.to_string(),
                _ => families.push(Family {
                    name: name.to_string(),
                    kind: kind.to_string(),
                    ..Family::default()
                }),
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            if let (Some(sample), Some(f)) = (parse_sample(line), families.last_mut()) {
                f.samples.push(sample);
            }
        }
    }
    families
}

/// `name{k="v",…} value`, label values unescaped.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut inside) = rest.strip_prefix('{') {
        loop {
            inside = inside.trim_start_matches(',');
            if let Some(after) = inside.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inside.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            inside = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.to_string();
    Some(Sample { name, labels, value })
}

/// OpenTelemetry's name and unit of a Prometheus family name.
fn otel_name(name: &str, kind: &str) -> (String, &'static str) {
    let name = if kind == "counter" {
        name.strip_suffix("_total").unwrap_or(name)
    } else {
        name
    };
    let (name, unit) = match name.strip_suffix("_seconds") {
        Some(n) => (n, "s"),
        None => (name, ""),
    };
    let name = match name.strip_prefix(PREFIX).and_then(|n| n.strip_prefix('_')) {
        Some(rest) => format!("{PREFIX}.{rest}"),
        None => name.to_string(),
    };
    (name, unit)
}

fn attributes(labels: &[(String, String)]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.clone())),
            }),
        })
        .collect()
}

fn number(s: &Sample, start: u64, now: u64) -> NumberDataPoint {
    let value = match s.value.parse::<i64>() {
        Ok(i) => number_data_point::Value::AsInt(i),
        Err(_) => number_data_point::Value::AsDouble(s.value.parse().unwrap_or(f64::NAN)),
    };
    NumberDataPoint {
        attributes: attributes(&s.labels),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(value),
        ..Default::default()
    }
}

/// Every family of the text as an OTLP metric (cumulative since `start`).
fn to_otlp(text: &str, start: u64, now: u64) -> Vec<Metric> {
    parse(text)
        .into_iter()
        .filter(|f| !f.samples.is_empty())
        .filter_map(|f| {
            let cumulative = AggregationTemporality::Cumulative as i32;
            let data = match f.kind.as_str() {
                "counter" => metric::Data::Sum(Sum {
                    data_points: f.samples.iter().map(|s| number(s, start, now)).collect(),
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
                "gauge" => metric::Data::Gauge(Gauge {
                    data_points: f.samples.iter().map(|s| number(s, start, now)).collect(),
                }),
                "histogram" => metric::Data::Histogram(Histogram {
                    data_points: histogram_points(&f, start, now),
                    aggregation_temporality: cumulative,
                }),
                _ => return None,
            };
            let (name, unit) = otel_name(&f.name, &f.kind);
            Some(Metric {
                name,
                description: f.help,
                unit: unit.into(),
                data: Some(data),
                ..Default::default()
            })
        })
        .collect()
}

/// Groups a histogram's `_bucket`/`_sum`/`_count` samples by label set; the
/// text's cumulative buckets become OTLP's per-bucket counts.
fn histogram_points(f: &Family, start: u64, now: u64) -> Vec<HistogramDataPoint> {
    let mut points: Vec<(Vec<(String, String)>, HistogramDataPoint, Vec<(f64, u64)>)> = Vec::new();
    for s in &f.samples {
        let labels: Vec<(String, String)> = s.labels.iter().filter(|(k, _)| k != "le").cloned().collect();
        let i = match points.iter().position(|(l, _, _)| *l == labels) {
            Some(i) => i,
            None => {
                let point = HistogramDataPoint {
                    attributes: attributes(&labels),
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    ..Default::default()
                };
                points.push((labels, point, Vec::new()));
                points.len() - 1
            }
        };
        let (_, point, buckets) = &mut points[i];
        let suffix = s.name.strip_prefix(f.name.as_str()).unwrap_or("");
        match suffix {
            "_bucket" => {
                let le = s.labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v.as_str());
                let bound = match le {
                    Some("+Inf") => f64::INFINITY,
                    Some(b) => b.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                buckets.push((bound, s.value.parse().unwrap_or(0)));
            }
            "_sum" => point.sum = s.value.parse().ok(),
            "_count" => point.count = s.value.parse().unwrap_or(0),
            _ => {}
        }
    }
    points
        .into_iter()
        .map(|(_, mut point, mut buckets)| {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut below = 0;
            for (bound, cumulative) in buckets {
                point.bucket_counts.push(cumulative.saturating_sub(below));
                below = cumulative;
                if bound.is_finite() {
                    point.explicit_bounds.push(bound);
                }
            }
            point
        })
        .collect()
}

#[cfg(test)]
mod tests;
