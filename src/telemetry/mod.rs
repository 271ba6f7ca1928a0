//! Logs and traces: a `tracing` subscriber with an env filter (`RUST_LOG`,
//! default `info`), text or JSON (`LOG_FORMAT=json`) on stderr, and an
//! OpenTelemetry layer exporting spans over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`OTEL_EXPORTER_OTLP_PROTOCOL`:
//! `grpc`, or `http/protobuf` by default). The replica id is the resource's
//! `service.instance.id`; `OTEL_SERVICE_NAME` (default `logcursor`) and
//! `OTEL_RESOURCE_ATTRIBUTES` are honoured.
//!
//! Metrics go over OTLP too ([`otlp_metrics`]): read from the same registry
//! that `/metrics` serves, so a family exists in both or in neither.

pub mod otlp_metrics;

pub use otlp_metrics::MetricsExport;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes and stops the span exporter; call [`TelemetryGuard::shutdown`]
/// on the way out (dropping it does the same). Metrics are flushed by the
/// application that owns the registry ([`MetricsExport::finish`]).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports what is buffered. Blocks: call it off the async workers.
    pub fn shutdown(mut self) {
        self.flush();
    }

    fn flush(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("telemetry: flushing spans failed: {e}");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.flush();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0:?} is not supported (use grpc or http/protobuf)")]
    Protocol(String),
    /// An `OTEL_*` setting that does not parse (its value is not repeated: it may hold a secret).
    #[error("{0} is not valid")]
    Setting(&'static str),
}

/// Installs the global subscriber. Must run inside a Tokio runtime when
/// OTLP export is on (the gRPC exporter needs one).
pub fn init(replica_id: &str) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // LOG_SPANS=1: also log every span as it closes, with its busy and idle
    // time (a profile of the tick without an OTLP collector).
    let spans = if std::env::var("LOG_SPANS").is_ok_and(|v| v == "1") {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_span_events(spans)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_span_events(spans)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let protocol = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|_| "http/protobuf".into());
            if !matches!(protocol.as_str(), "grpc" | "http/protobuf") {
                return Err(TelemetryError::Protocol(protocol));
            }
            Some(tracer_provider(replica_id, &protocol)?)
        }
        _ => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("logcursor")));
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(TelemetryGuard { provider })
}

/// The OpenTelemetry resource of this replica, for spans and metrics alike.
fn resource(replica_id: &str) -> Resource {
    let mut resource = Resource::builder().with_attribute(KeyValue::new("service.instance.id", replica_id.to_string()));
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|s| s.split(',').any(|kv| kv.trim_start().starts_with("service.name=")));
    if !named_by_env {
        resource = resource.with_service_name("logcursor");
    }
    resource.build()
}

fn tracer_provider(replica_id: &str, protocol: &str) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
    let exporter = match protocol {
        "grpc" => SpanExporter::builder().with_tonic().build(),
        _ => SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build(),
    }
    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(replica_id))
        .build())
}
