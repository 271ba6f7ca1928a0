//! Operations: readiness is about this replica, addresses are chunked per
//! request, one healthy endpoint is enough to start, and a node without
//! finality tags is run on confirmations.

use std::time::Duration;

use logcursor::poller::TickOutcome;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::proxy::{log_range, method_of, rpc_error, Action, Proxy};
use crate::support::*;

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.expect("http");
    (r.status().as_u16(), r.text().await.expect("body"))
}

/// Ticks until idle, failed ticks included; returns how many failed.
async fn drive(app: &logcursor::app::App) -> usize {
    let mut failed = 0;
    for _ in 0..500 {
        match app.pollers()[0].tick(&CancellationToken::new()).await {
            Ok(TickOutcome::Idle { .. }) => return failed,
            Ok(_) => {}
            Err(_) => failed += 1,
        }
    }
    panic!("never idle")
}

/// Checked by putting back the old gate (src/http.rs `readyz`: 503 for a
/// halted stream, and `max_lag_blocks` defaulting to 100): the replica is
/// then taken out of rotation for what no replica can change. The gated
/// half failed before the heads were recorded for failed ticks too
/// (`StreamMetrics::saw_heads`): a replica restarted behind a stuck range
/// showed lag 0, in `/metrics` and to the gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_stays_200_while_a_stream_lags_or_is_halted_unless_a_lag_gate_is_set() {
    let w = World::new().await;
    w.emit_burns(30, |_| 1).await;
    w.chain.mine(150).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    proxy.set(|r| match log_range(r) {
        Some((_, t)) if t >= 20 => Action::Reply(500, "unavailable".into()),
        _ => Action::Forward,
    });
    let cfg = || {
        w.config().rpc(&proxy.url).stream(|s| {
            s.max_block_range = 5;
            s.rpc_attempts = 1;
        })
    };
    let app = cfg().replica("r").await;
    let addr = app.http_addr().expect("http");
    let token = CancellationToken::new();
    let run = tokio::spawn(app.run(token.clone()));
    let pg = w.pg().await;
    wait_for("the stream stuck behind", Duration::from_secs(30), || async {
        (cursor_of(&pg, "burns").await == Some(19)).then_some(())
    })
    .await;
    logcursor::store::cursor::halt(&pg, "burns", "halted by the test")
        .await
        .expect("halt");
    let (code, body) = http_get(addr, "/status").await;
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&body).expect("json");
    let lag = status["streams"][0]["lag_blocks"].as_u64().expect("lag");
    assert!(lag > 100, "{status}");
    assert_eq!(status["streams"][0]["halted"], json!("halted by the test"));
    for _ in 0..3 {
        let (code, body) = http_get(addr, "/readyz").await;
        assert_eq!(code, 200, "lag and halts are not this replica's to fix: {body}");
    }
    token.cancel();
    run.await.expect("join").expect("run");

    // With the optional gate, lag does take it out of rotation.
    let app = cfg().telemetry_toml("max_lag_blocks = 100").replica("gated").await;
    let addr = app.http_addr().expect("http");
    let token = CancellationToken::new();
    let run = tokio::spawn(app.run(token.clone()));
    let (code, body) = wait_for("readyz to apply the gate", Duration::from_secs(10), || async {
        let r = http_get(addr, "/readyz").await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert_eq!(code, 503);
    assert!(body.contains("max_lag_blocks = 100"), "{body}");
    // A replica whose every tick fails still knows, and says, the lag.
    let (_, metrics) = http_get(addr, "/metrics").await;
    let lag = metrics
        .lines()
        .find_map(|l| l.strip_prefix("logcursor_lag_blocks{stream=\"burns\",chain_id=\"31337\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("lag metric");
    assert!(lag > 100.0, "{lag}");
    token.cancel();
    run.await.expect("join").expect("run");
}

/// 1,200 addresses (the emitter among them) are asked for in requests of
/// at most 1,000; an HTTP 413 for a one-block request halves the addresses
/// per request instead of calling the block too large.
/// Checked by removing the 413 branch from `Rpc::get_logs`
/// (src/chain/logs.rs): the one-block request then fails as `BlockTooLarge`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_are_chunked_per_request_and_a_413_halves_them_not_the_range() {
    let w = World::new().await;
    w.emit_burns(10, |i| i + 1).await;
    let mut addresses: Vec<String> = (1..1_200u32).map(|i| format!("0x{i:040x}")).collect();
    addresses.insert(600, w.emitter.to_lowercase());
    let list = addresses
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let extra = format!("addresses = [{list}]");
    let proxy = Proxy::start(&w.anvil.url).await;
    let sizes = |proxy: &Proxy| -> Vec<((u64, u64), usize)> {
        proxy
            .seen()
            .iter()
            .filter_map(|r| Some((log_range(r)?, r["params"][0]["address"].as_array()?.len())))
            .collect()
    };

    let app = w.config().rpc(&proxy.url).stream_toml(&extra).replica("r").await;
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&w.pg().await).await;
    let asked = sizes(&proxy);
    assert!(asked.iter().all(|(_, n)| *n <= 1_000), "{asked:?}");
    let mut per_range: std::collections::BTreeMap<(u64, u64), usize> = Default::default();
    for (range, n) in &asked {
        *per_range.entry(*range).or_default() += n;
    }
    assert!(
        per_range.values().all(|n| *n == 1_200),
        "every range asked for every address once: {per_range:?}"
    );

    // A provider whose request bodies may not hold more than 300 addresses.
    let db2 = TestDb::new().await;
    proxy.forget();
    proxy.set(|r| match r["params"][0]["address"].as_array() {
        Some(a) if method_of(r) == "eth_getLogs" && a.len() > 300 => {
            Action::Reply(413, "Request Entity Too Large".into())
        }
        _ => Action::Forward,
    });
    let app = TestConfig::new(&db2.url, &proxy.url, &w.emitter)
        .stream_toml(&extra)
        .replica("r")
        .await;
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&db2.client().await).await;
    let asked = sizes(&proxy);
    assert!(
        asked.iter().any(|(_, n)| *n > 300),
        "the provider refused some: {asked:?}"
    );
    let last = asked.last().expect("requests").1;
    assert!(
        last <= 300 && last > 0,
        "addresses per request halved until accepted: {asked:?}"
    );
}

/// Checked by making `ChainClient::verify_chain_id` require every endpoint
/// (src/chain/client.rs: `(false, Some(e))` → `(_, Some(e))`): start-up
/// then fails on the dead endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_healthy_endpoint_is_enough_to_start_and_the_dead_ones_are_passed_over() {
    let w = World::new().await;
    w.emit_burns(10, |_| 2).await;
    let hangs = Proxy::start(&w.anvil.url).await;
    hangs.set(|_| Action::Hang);
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port() // closed when dropped: connections are refused
    };
    let app = w
        .config()
        .stream_toml(&format!(
            "rpc_urls = [\"http://127.0.0.1:{refused}\", \"{}\", \"{}\"]",
            hangs.url, w.anvil.url
        ))
        .stream(|s| {
            s.rpc_timeout = Duration::from_millis(500);
            s.rpc_attempts = 1;
            s.rpc_cooldown = Duration::from_secs(3600);
        })
        .replica("r")
        .await;
    let failed = drive(&app).await;
    assert_eq!(failed, 2, "one failed tick per dead endpoint, then the healthy one");
    w.assert_stored_equals_chain(&w.pg().await).await;
}

/// A node that answers the `finalized` tag with an error (pre-merge, or
/// unsupported) is asked once; the stream then runs on confirmations.
/// Checked by returning the error from `Rpc::tagged_block` instead of
/// `Ok(None)` (src/chain/client.rs): every tick then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_finalized_tag_is_asked_once_and_runs_on_confirmations() {
    let w = World::new().await;
    w.emit_burns(10, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    proxy.set(|r| {
        if method_of(r) == "eth_getBlockByNumber" && r["params"][0] == "finalized" {
            rpc_error(r, -32000, "finalized block not found", None)
        } else {
            Action::Forward
        }
    });
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream_toml("finality = \"finalized\"")
        .stream(|s| s.confirmations = 3)
        .replica("r")
        .await;
    app.tick_until_idle().await;
    w.emit_burns(4, |_| 1).await;
    app.tick_until_idle().await;
    let pg = w.pg().await;
    let head = w.chain.block_number().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(head - 3), "latest - confirmations");
    w.assert_stored_up_to(&pg, head - 3).await;
    let asked = proxy
        .seen()
        .iter()
        .filter(|r| method_of(r) == "eth_getBlockByNumber" && r["params"][0] == "finalized")
        .count();
    assert_eq!(asked, 1, "the tag is asked once, then the node is known not to have it");
}

/// PostgreSQL goes away after start-up first reached it (a restart, a
/// failover): start-up tries again within `connect_retry_for` instead of
/// exiting 1. Found by `scripts/chaos` (a replica restarted during a
/// PostgreSQL restart exited); checked by calling the steps without
/// `with_db_retry` (src/app.rs): the build then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_during_start_up_is_tried_again() {
    let w = World::new().await;
    w.emit_burns(4, |_| 2).await;
    let tap = crate::support::tap::PgTap::start(&w.db.url).await;
    tap.cut_once_on("pg_advisory_xact_lock");
    let app = w.config().database_url(&tap.url(&w.db.url)).replica("r").await;
    assert_eq!(tap.cuts(), 1, "the migration's connection went away once");
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&w.pg().await).await;
}
