//! Logs and traces: a `tracing` subscriber with an env filter (`RUST_LOG`,
//! default `info`), text or JSON (`LOG_FORMAT=json`) on stderr, and an
//! OpenTelemetry layer exporting spans over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`OTEL_EXPORTER_OTLP_PROTOCOL`:
//! `grpc`, or `http/protobuf` by default). The replica id is the resource's
//! `service.instance.id`; `OTEL_SERVICE_NAME` (default `logcursor`) and
//! `OTEL_RESOURCE_ATTRIBUTES` are honoured.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes and stops the span exporter; call [`TelemetryGuard::shutdown`]
/// on the way out (dropping it does the same).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
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
        if let Some(m) = self.meters.take() {
            if let Err(e) = m.shutdown() {
                eprintln!("telemetry: flushing metrics failed: {e}");
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
    let (provider, meters) = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let protocol = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|_| "http/protobuf".into());
            if !matches!(protocol.as_str(), "grpc" | "http/protobuf") {
                return Err(TelemetryError::Protocol(protocol));
            }
            let meters = meter_provider(replica_id, &protocol)?;
            opentelemetry::global::set_meter_provider(meters.clone());
            (Some(tracer_provider(replica_id, &protocol)?), Some(meters))
        }
        _ => (None, None),
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
    Ok(TelemetryGuard { provider, meters })
}

/// Exports `registry`'s gauges and counters over OTLP when an endpoint is
/// configured (histograms are on `/metrics`). Idempotent per registry.
pub fn export_metrics(registry: &std::sync::Arc<crate::metrics::Registry>) {
    use std::sync::atomic::Ordering;
    if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").map_or(true, |e| e.is_empty()) {
        return;
    }
    let meter = opentelemetry::global::meter("logcursor");
    type Pick = fn(&crate::metrics::StreamMetrics) -> u64;
    let gauges: [(&'static str, Pick); 5] = [
        ("logcursor.cursor_block", |m| {
            u64::try_from(m.cursor_block.load(Ordering::Relaxed)).unwrap_or(0)
        }),
        ("logcursor.chain_head_block", |m| m.chain_head.load(Ordering::Relaxed)),
        ("logcursor.safe_head_block", |m| m.safe_head.load(Ordering::Relaxed)),
        ("logcursor.lag_blocks", |m| m.lag_blocks()),
        ("logcursor.block_range", |m| m.block_range.load(Ordering::Relaxed)),
    ];
    for (name, pick) in gauges {
        let _ = meter
            .u64_observable_gauge(name)
            .with_callback(per_stream(registry, pick))
            .build();
    }
    let counters: [(&'static str, Pick); 4] = [
        ("logcursor.events_inserted", |m| {
            m.events_inserted.load(Ordering::Relaxed)
        }),
        ("logcursor.duplicates", |m| m.duplicates.load(Ordering::Relaxed)),
        ("logcursor.reorgs", |m| m.reorgs.load(Ordering::Relaxed)),
        ("logcursor.lock_timeouts", |m| m.lock_timeouts.load(Ordering::Relaxed)),
    ];
    for (name, pick) in counters {
        let _ = meter
            .u64_observable_counter(name)
            .with_callback(per_stream(registry, pick))
            .build();
    }
    // Histograms are recorded as they are observed (there is no observable
    // histogram): each stream's mirrors its observations to these.
    type PickHistogram = fn(&crate::metrics::StreamMetrics) -> &crate::metrics::Histogram;
    let histograms: [(&'static str, &'static str, PickHistogram); 3] = [
        ("logcursor.tick_duration", "Duration of a tick", |m| &m.tick_duration),
        ("logcursor.lock_wait", "Wait for the cursor row lock", |m| &m.lock_wait),
        ("logcursor.lock_hold", "Cursor row lock held, lock to commit", |m| {
            &m.lock_hold
        }),
    ];
    for (name, description, pick) in histograms {
        let h = meter
            .f64_histogram(name)
            .with_unit("s")
            .with_description(description)
            .with_boundaries(crate::metrics::BUCKETS.to_vec())
            .build();
        for (stream, m) in registry.streams() {
            pick(&m).mirror_to(h.clone(), &stream);
        }
    }
}

/// A callback observing `pick` of every stream, labelled by stream.
fn per_stream(
    registry: &std::sync::Arc<crate::metrics::Registry>,
    pick: fn(&crate::metrics::StreamMetrics) -> u64,
) -> impl Fn(&dyn opentelemetry::metrics::AsyncInstrument<u64>) + Send + Sync + 'static {
    let r = std::sync::Arc::clone(registry);
    move |o| {
        for (s, m) in r.streams() {
            o.observe(pick(&m), &[KeyValue::new("stream", s)]);
        }
    }
}

fn meter_provider(
    replica_id: &str,
    protocol: &str,
) -> Result<opentelemetry_sdk::metrics::SdkMeterProvider, TelemetryError> {
    use opentelemetry_otlp::{MetricExporter, WithExportConfig as _};
    let exporter = match protocol {
        "grpc" => MetricExporter::builder().with_tonic().build(),
        _ => MetricExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build(),
    }
    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_periodic_exporter(exporter)
        .with_resource(resource(replica_id))
        .build())
}

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
