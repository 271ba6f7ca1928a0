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
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::metrics::v1::{ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use super::TelemetryError;
use crate::metrics::{Registry, PREFIX};
use crate::redact::redact_url;

mod text;
use text::to_otlp;

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

#[cfg(test)]
mod tests;
