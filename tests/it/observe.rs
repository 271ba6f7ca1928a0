//! What operators watch: OTLP traces (received by an OTLP server inside the
//! test), `/metrics`, `/readyz`, `/status`, and a rolling restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use crate::support::proxy::{log_range, Action, Proxy};
use crate::support::*;

/// Collects every exported span and metric.
#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().expect("lock").push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().expect("lock").push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn value(v: &KeyValue) -> String {
    match v.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(span: &Span) -> BTreeMap<String, String> {
    span.attributes.iter().map(|kv| (kv.key.clone(), value(kv))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_exports_one_trace_with_its_child_spans_and_no_secrets() {
    let w = World::new().await;
    w.emit_burns(10, |_| 3).await;
    let head = w.chain.block_number().await;

    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let otlp = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .add_service(MetricsServiceServer::new(receiver.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let server = tokio::spawn(server);

    // A password in the database URL and an API key in the RPC URL: neither
    // may reach a span.
    let db_url = w.db.url.replacen("postgres@", "postgres:hunter2@", 1);
    let rpc = format!("{}/?apikey=SECRETKEY", w.anvil.url);
    let cfg = TestConfig::new(&db_url, &rpc, &w.emitter).file();
    let child = spawn_replica(
        cfg.path(),
        "traced-replica",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
        ],
    );
    let pg = w.pg().await;
    wait_for("the cursor at the head", Duration::from_secs(60), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    signal(&child, "TERM");
    let out = finish(child, Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    server.abort();

    let requests = receiver.requests.lock().expect("lock").clone();
    let mut spans = Vec::new();
    let mut resource = BTreeMap::new();
    for req in &requests {
        for rs in &req.resource_spans {
            if let Some(r) = &rs.resource {
                resource.extend(r.attributes.iter().map(|kv| (kv.key.clone(), value(kv))));
            }
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().cloned());
            }
        }
    }
    assert_eq!(resource.get("service.name").map(String::as_str), Some("logcursor"));
    assert_eq!(
        resource.get("service.instance.id").map(String::as_str),
        Some("traced-replica")
    );
    let tick = spans
        .iter()
        .find(|s| s.name == "poll.tick" && attrs(s).get("outcome").map(String::as_str) == Some("advanced"))
        .expect("a poll.tick span that advanced");
    let a = attrs(tick);
    for key in [
        "stream",
        "chain_id",
        "from_block",
        "to_block",
        "events_inserted",
        "duplicates",
        "outcome",
        "endpoint",
    ] {
        assert!(a.contains_key(key), "poll.tick lacks {key}: {a:?}");
    }
    assert_eq!(a["stream"], "burns");
    assert_eq!(a["events_inserted"], "30");
    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == tick.trace_id && s.parent_span_id == tick.span_id)
        .collect();
    let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    // The head comes from the endpoint's follower (its own requests, outside
    // the tick); the tick's own requests are its children.
    for want in [
        "cursor.lock",
        "rpc.eth_getLogs",
        "rpc.eth_getBlockByNumber",
        "decode",
        "db.insert_events",
        "cursor.advance",
        "db.commit",
    ] {
        assert!(
            names.contains(&want),
            "{want} missing among the tick's children {names:?}"
        );
    }
    let logs_span = children.iter().find(|s| s.name == "rpc.eth_getLogs").expect("rpc span");
    let la = attrs(logs_span);
    assert_eq!(la.get("rpc.method").map(String::as_str), Some("eth_getLogs"));
    assert_eq!(la.get("rpc.system").map(String::as_str), Some("jsonrpc"));
    let fetched: u64 = children
        .iter()
        .filter(|s| s.name == "rpc.eth_getLogs")
        .filter_map(|s| attrs(s).get("rpc.result_count").and_then(|c| c.parse::<u64>().ok()))
        .sum();
    assert_eq!(fetched, 30, "the sub-ranges' result counts add up to the tick's logs");
    assert!(
        la.get("server.address").is_some_and(|a| a.ends_with("?<redacted>")),
        "{la:?}"
    );
    assert_otlp_metrics(&receiver.metrics.lock().expect("lock"));
    let insert = children.iter().find(|s| s.name == "db.insert_events").expect("db span");
    assert_eq!(attrs(insert).get("db.system").map(String::as_str), Some("postgresql"));
    for s in &spans {
        for (k, v) in attrs(s) {
            assert!(
                !v.contains("hunter2") && !v.contains("SECRETKEY"),
                "span {} attribute {k} leaks a secret: {v}",
                s.name
            );
        }
    }
    // The span tree of one tick, for whoever reads the test output.
    let start = tick.start_time_unix_nano;
    eprintln!("poll.tick {:?}", a);
    let mut sorted = children.clone();
    sorted.sort_by_key(|s| s.start_time_unix_nano);
    for c in sorted {
        eprintln!(
            "  +{:>6.2} ms {:<26} {:>6.2} ms {:?}",
            (c.start_time_unix_nano - start) as f64 / 1e6,
            c.name,
            (c.end_time_unix_nano - c.start_time_unix_nano) as f64 / 1e6,
            attrs(c)
        );
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{addr}{path}")).await.expect("http");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

/// Sample lines of a Prometheus text document, checked for shape: every
/// sample's metric has a TYPE line, every line parses.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut typed = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().expect("name").to_string();
            let kind = parts.next().expect("kind");
            assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
            typed.push(name);
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().expect("name");
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(typed.iter().any(|t| t == name || t == base), "no TYPE for {name}");
        if series.contains('{') {
            assert!(series.ends_with('}'), "labels not closed: {line}");
        }
        samples.insert(series.to_string(), v);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readyz_and_status_tell_the_truth_about_lag_and_who_processed_what() {
    let w = World::new().await;
    w.emit_burns(60, |_| 1).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    // The node will not serve blocks from 20 on: the stream falls behind.
    proxy.set(|r| match log_range(r) {
        Some((_, t)) if t >= 20 => Action::Reply(500, "unavailable".into()),
        _ => Action::Forward,
    });
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.max_block_range = 5;
            s.rpc_attempts = 1;
        })
        .telemetry_toml("max_lag_blocks = 10")
        .replica("obs-replica")
        .await;
    let addr = app.http_addr().expect("http");
    let token = CancellationToken::new();
    let run = tokio::spawn(app.run(token.clone()));
    let pg = w.pg().await;

    wait_for("the stream stuck behind", Duration::from_secs(30), || async {
        (cursor_of(&pg, "burns").await == Some(19)).then_some(())
    })
    .await;
    assert_eq!(get(addr, "/livez").await.0, 200);
    let (code, body) = wait_for("readyz to fail on lag", Duration::from_secs(10), || async {
        let r = get(addr, "/readyz").await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert_eq!(code, 503);
    assert!(body.contains("blocks behind (max_lag_blocks = 10)"), "{body}");

    proxy.pass();
    let head = w.chain.block_number().await;
    wait_for("caught up", Duration::from_secs(30), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    let (code, body) = wait_for("readyz healthy again", Duration::from_secs(10), || async {
        let r = get(addr, "/readyz").await;
        (r.0 == 200).then_some(r)
    })
    .await;
    assert_eq!(code, 200, "{body}");

    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let samples = parse_prometheus(&body);
    let labels = "{stream=\"burns\",chain_id=\"31337\"}";
    assert_eq!(
        samples[&format!("logcursor_cursor_block{labels}")],
        head as f64,
        "cursor matches the database"
    );
    assert_eq!(samples[&format!("logcursor_lag_blocks{labels}")], 0.0);
    assert_eq!(samples[&format!("logcursor_safe_head_block{labels}")], head as f64);
    let stored = count_events(&pg).await;
    assert_eq!(
        samples[&format!("logcursor_events_inserted_total{labels}")],
        stored as f64
    );
    assert!(samples
        .keys()
        .any(|k| k.starts_with("logcursor_rpc_requests_total{") && k.contains("kind=\"http\"")));
    assert!(samples
        .keys()
        .any(|k| k.starts_with("logcursor_lock_hold_seconds_bucket{")));

    let (code, body) = get(addr, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("json");
    let s = &status["streams"][0];
    assert_eq!(s["stream"], "burns");
    assert_eq!(s["cursor"], serde_json::json!(head));
    assert_eq!(s["last_processed_by"], "obs-replica");
    assert!(s["last_tick_outcome"].is_string());
    token.cancel();
    run.await.expect("join").expect("run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_while_ingesting_loses_nothing_and_cuts_no_tick_off() {
    let w = World::new().await;
    let pg = w.migrate().await;
    let cfg = w.config().stream_toml("max_block_range = 3").file();

    let emitting = CancellationToken::new();
    let emitter_task = {
        let (chain, emitter, stop) = (w.chain.clone(), w.emitter.clone(), emitting.clone());
        tokio::spawn(async move {
            let mut total = 0;
            while !stop.is_cancelled() {
                total += chain.emit_burns(&emitter, 5, |i| i % 3 + 1).await;
            }
            total
        })
    };
    let mut replicas: Vec<Child> = (0..3)
        .map(|i| spawn_replica(cfg.path(), &format!("gen0-{i}"), &[]))
        .collect();
    for i in 0..3 {
        // Let the fleet work a little, then replace replica i: SIGTERM, wait, start a new one.
        let at = cursor_of(&pg, "burns").await.unwrap_or(-1);
        wait_for("progress", Duration::from_secs(30), || async {
            cursor_of(&pg, "burns").await.filter(|c| *c > at + 5).map(|_| ())
        })
        .await;
        let old = replicas.remove(0);
        signal(&old, "TERM");
        let out = finish(old, Duration::from_secs(30)).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(!stderr.contains("grace period over"), "a tick was cut off: {stderr}");
        replicas.push(spawn_replica(cfg.path(), &format!("gen1-{i}"), &[]));
    }
    emitting.cancel();
    let emitted = emitter_task.await.expect("emitter");
    let head = w.chain.block_number().await;
    wait_for("the cursor at the head", Duration::from_secs(60), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    stop_all(replicas).await;
    let mut stored = stored_logs(&pg).await;
    stored.sort();
    let on_chain: Vec<LogKey> = w.chain.burned_logs(&w.emitter, head).await.into_iter().collect();
    assert_eq!(on_chain.len() as u64, emitted);
    assert_eq!(stored, on_chain, "every event exactly once through the rolling restart");
    let history = cursor_history(&pg, "burns").await;
    assert_contiguous_forward(&history, -1, head);
    let movers: std::collections::BTreeSet<&str> = history.iter().map(|(_, _, by)| by.as_str()).collect();
    assert!(
        movers.iter().any(|m| m.starts_with("gen1-")),
        "the new generation took over: {movers:?}"
    );
}

/// The metrics flushed at shutdown: the events counter says 30, and the
/// tick-duration histogram (recorded as observed) holds the stream's ticks.
fn assert_otlp_metrics(requests: &[ExportMetricsServiceRequest]) {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
    let metrics: Vec<_> = requests
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .collect();
    let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
    let inserted = metrics
        .iter()
        .filter(|m| m.name == "logcursor.events_inserted")
        .filter_map(|m| match &m.data {
            Some(Data::Sum(s)) => s.data_points.last().and_then(|p| p.value),
            _ => None,
        })
        .next_back();
    assert_eq!(inserted, Some(Number::AsInt(30)), "events counter over OTLP: {names:?}");
    let ticks: u64 = metrics
        .iter()
        .filter(|m| m.name == "logcursor.tick_duration")
        .filter_map(|m| match &m.data {
            Some(Data::Histogram(h)) => h.data_points.last().map(|p| p.count),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    // A stream ticks when its endpoint's head moves, so one tick covers the
    // 30 events mined before it started; an idle stream does not tick again.
    assert!(
        ticks >= 1,
        "the tick-duration histogram over OTLP counts the ticks ({ticks}): {names:?}"
    );
    for name in ["logcursor.lock_wait", "logcursor.lock_hold"] {
        assert!(names.contains(&name), "{name} over OTLP: {names:?}");
    }
}
