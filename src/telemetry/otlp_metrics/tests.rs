use std::sync::Mutex;

use opentelemetry_proto::tonic::metrics::v1::metric::Data;

use opentelemetry_proto::tonic::metrics::v1::{number_data_point, AggregationTemporality, Metric};

use super::text::{parse, to_otlp};
use super::*;
use crate::metrics::{Counter, Gauge, Histogram, NoLabels};

crate::series! {
    struct Sample for NoLabels {
        /// Events stored.
        events_inserted: Counter,
        /// Blocks behind.
        lag_blocks: Gauge,
        /// Tick duration.
        tick_duration_seconds: Histogram,
    }
}

fn registry() -> (Registry, Sample) {
    let mut registry = Registry::new();
    let m = Sample::register(&mut registry).of(&NoLabels);
    m.events_inserted.inc_by(30);
    m.lag_blocks.set(-3);
    m.tick_duration_seconds.observe(0.002);
    m.tick_duration_seconds.observe(0.002);
    m.tick_duration_seconds.observe(7.0);
    registry.collect(crate::metrics::Uptime::new("r1"));
    (registry, m)
}

fn find<'a>(metrics: &'a [Metric], name: &str) -> &'a Metric {
    metrics.iter().find(|m| m.name == name).unwrap_or_else(|| {
        panic!(
            "{name} missing: {:?}",
            metrics.iter().map(|m| &m.name).collect::<Vec<_>>()
        )
    })
}

#[test]
fn every_family_of_the_text_becomes_an_otlp_metric_with_its_values() {
    let (registry, _) = registry();
    let text = registry.encode_now();
    let metrics = to_otlp(&text, 1, 2);
    let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    assert_eq!(metrics.len(), families, "one OTLP metric per family:\n{text}");

    let events = find(&metrics, "logcursor.events_inserted");
    assert_eq!(events.description, "Events stored.");
    let Some(Data::Sum(sum)) = &events.data else {
        panic!("a counter is a sum: {events:?}")
    };
    assert!(sum.is_monotonic);
    assert_eq!(sum.aggregation_temporality, AggregationTemporality::Cumulative as i32);
    assert_eq!(sum.data_points[0].value, Some(number_data_point::Value::AsInt(30)));
    assert_eq!(sum.data_points[0].start_time_unix_nano, 1);

    let Some(Data::Gauge(lag)) = &find(&metrics, "logcursor.lag_blocks").data else {
        panic!("a gauge")
    };
    assert_eq!(lag.data_points[0].value, Some(number_data_point::Value::AsInt(-3)));

    let ticks = find(&metrics, "logcursor.tick_duration");
    assert_eq!(ticks.unit, "s");
    let Some(Data::Histogram(h)) = &ticks.data else {
        panic!("a histogram")
    };
    let p = &h.data_points[0];
    assert_eq!(p.count, 3);
    assert_eq!(p.explicit_bounds, crate::metrics::BUCKETS.to_vec());
    assert_eq!(p.bucket_counts.len(), crate::metrics::BUCKETS.len() + 1);
    assert_eq!(p.bucket_counts.iter().sum::<u64>(), 3, "per-bucket, not cumulative");
    assert_eq!(p.bucket_counts[1], 2, "0.002 s falls in (0.001, 0.0025]");
    assert_eq!(p.bucket_counts[12], 1, "7 s falls in (5, 10]");
    assert!((p.sum.unwrap_or_default() - 7.004).abs() < 1e-9);

    let uptime = find(&metrics, "logcursor.uptime");
    let Some(Data::Gauge(g)) = &uptime.data else {
        panic!("a gauge")
    };
    assert_eq!(g.data_points[0].attributes[0].key, "replica");
}

#[test]
fn label_values_are_unescaped() {
    let text = "# HELP x_total Help.\n# TYPE x_total counter\nx_total{a=\"q\\\"uo\\\\te\",b=\"line\\nbreak\"} 4\n";
    let families = parse(text);
    assert_eq!(
        families[0].samples[0].labels,
        vec![
            ("a".to_string(), "q\"uo\\te".to_string()),
            ("b".to_string(), "line\nbreak".to_string())
        ]
    );
    assert_eq!(families[0].samples[0].value, "4");
}

#[test]
fn settings_follow_the_otel_variables() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| v.to_string())
    };
    assert!(
        Settings::from_env(env(&[])).expect("ok").is_none(),
        "off without an endpoint"
    );
    let s = Settings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]))
        .expect("ok")
        .expect("on");
    assert_eq!(s.url, "http://collector:4318/v1/metrics");
    assert!(!s.grpc, "http/protobuf by default");
    assert_eq!(s.interval, Duration::from_secs(60));
    let s = Settings::from_env(env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20k1, x-team=core"),
        ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1500"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
    ]))
    .expect("ok")
    .expect("on");
    assert_eq!(s.url, "http://collector:4317");
    assert!(s.grpc);
    assert_eq!(
        s.headers,
        vec![
            ("authorization".to_string(), "Bearer k1".to_string()),
            ("x-team".to_string(), "core".to_string())
        ]
    );
    assert_eq!(s.timeout, Duration::from_millis(1500));
    assert_eq!(s.interval, Duration::from_secs(5));
    assert!(matches!(
        Settings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        ])),
        Err(TelemetryError::Protocol(_))
    ));
}

/// A real HTTP receiver: what it got, and the authorization header.
type Received = Arc<Mutex<Vec<(ExportMetricsServiceRequest, Option<String>)>>>;

#[tokio::test]
async fn http_protobuf_export_sends_the_registry_with_the_headers_and_once_more_at_finish() {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::HeaderMap;
    let received: Received = Arc::default();
    async fn receive(State(r): State<Received>, headers: HeaderMap, body: Bytes) -> &'static str {
        let request = ExportMetricsServiceRequest::decode(body).expect("protobuf");
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        r.lock().expect("lock").push((request, auth));
        ""
    }
    let app = axum::Router::new()
        .route("/v1/metrics", axum::routing::post(receive))
        .with_state(Arc::clone(&received));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let (registry, m) = registry();
    let registry = Arc::new(registry);
    let settings = Settings {
        url: format!("http://{addr}/v1/metrics"),
        grpc: false,
        headers: vec![("authorization".into(), "Bearer k1".into())],
        timeout: Duration::from_secs(5),
        interval: Duration::from_secs(3600),
    };
    let export = MetricsExport::start(&registry, "r1", settings).expect("start");
    m.events_inserted.inc_by(12);
    export.finish().await;
    server.abort();

    let received = received.lock().expect("lock");
    assert_eq!(received.len(), 1, "no interval passed: only the last export");
    let (request, auth) = &received[0];
    assert_eq!(auth.as_deref(), Some("Bearer k1"));
    let resource = request.resource_metrics[0].resource.as_ref().expect("resource");
    assert!(resource.attributes.iter().any(|kv| kv.key == "service.instance.id"));
    let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
    let Some(Data::Sum(sum)) = &find(metrics, "logcursor.events_inserted").data else {
        panic!("a sum")
    };
    assert_eq!(
        sum.data_points[0].value,
        Some(number_data_point::Value::AsInt(42)),
        "the values at finish"
    );
}
