//! Chain access against real anvil behind the fault-injecting proxy:
//! provider range limits, failover, malformed answers, lagging nodes, reorgs.

use std::collections::BTreeSet;

use logcursor::app::App;
use logcursor::chain::ChainErrorKind;
use logcursor::poller::parts::PROBE_BLOCKS;
use logcursor::poller::{TickError, TickOutcome};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::proxy::{log_range, method_of, rpc_error, Action, Proxy};
use crate::support::*;

async fn build(cfg_toml: &str) -> App {
    build_app(&config(cfg_toml), "r").await
}

async fn tick(app: &App) -> Result<TickOutcome, TickError> {
    app.pollers()[0].tick(&CancellationToken::new()).await
}

/// Ticks until idle, tolerating failed ticks (as the loop would, minus the backoff).
async fn drive_until_idle(app: &App) -> (Vec<TickOutcome>, Vec<TickError>) {
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for _ in 0..2_000 {
        match tick(app).await {
            Ok(o @ TickOutcome::Idle { .. }) => {
                ok.push(o);
                return (ok, failed);
            }
            Ok(o) => ok.push(o),
            Err(e) => failed.push(e),
        }
    }
    panic!(
        "never idle; last errors: {:?}",
        failed.iter().rev().take(3).collect::<Vec<_>>()
    )
}

/// (span, accepted) of every eth_getLogs the proxy saw, given which it refused.
fn spans(requests: &[Value], refused: &dyn Fn(u64, u64) -> bool) -> Vec<(u64, bool)> {
    requests
        .iter()
        .filter_map(log_range)
        .map(|(f, t)| (t - f + 1, !refused(f, t)))
        .collect()
}

const CAP: u64 = 10;

/// Each provider's way of saying "at most CAP blocks", as a proxy answer.
/// Answers an eth_getLogs request (given its fromBlock) with a refusal.
type Refusal = Box<dyn Fn(&Value, u64) -> Action + Send + Sync>;

fn provider_formats() -> Vec<(&'static str, Refusal)> {
    let hex = |n: u64| format!("{n:#x}");
    vec![
        (
            "result cap with range",
            Box::new(move |r, from| {
                rpc_error(
                    r,
                    -32005,
                    &format!(
                        "query returned more than 10000 results. Try with this block range [{}, {}].",
                        hex(from),
                        hex(from + CAP - 1)
                    ),
                    None,
                )
            }),
        ),
        (
            "response size with range",
            Box::new(move |r, from| {
                rpc_error(r, -32602, &format!("Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range and no limit on the response size. Based on your parameters and the response size limit, this block range should work: [{}, {}]", hex(from), hex(from + CAP - 1)), None)
            }),
        ),
        (
            "retry with the range",
            Box::new(move |r, from| {
                rpc_error(
                    r,
                    -32000,
                    &format!(
                        "block range too large, retry with the range {}-{}",
                        from,
                        from + CAP - 1
                    ),
                    None,
                )
            }),
        ),
        (
            "limited to a N range",
            Box::new(|r, _| rpc_error(r, -32614, &format!("eth_getLogs is limited to a {CAP} range"), None)),
        ),
        (
            "exceed maximum block range",
            Box::new(|r, _| rpc_error(r, -32000, &format!("exceed maximum block range: {CAP}"), None)),
        ),
        (
            "Max range",
            Box::new(|r, _| rpc_error(r, -32000, &format!("invalid block range. Max range: {CAP}"), None)),
        ),
        (
            "error data from/to",
            Box::new(move |r, from| {
                rpc_error(
                    r,
                    -32000,
                    "query exceeds limits",
                    Some(json!({"from": hex(from), "to": hex(from + CAP - 1)})),
                )
            }),
        ),
        (
            "no suggestion",
            Box::new(|r, _| rpc_error(r, -32005, "query returned more than 10000 results", None)),
        ),
        (
            "HTTP 413",
            Box::new(|_, _| Action::Reply(413, "request entity too large".into())),
        ),
        ("timeout", Box::new(|_, _| Action::Hang)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_errors_in_every_provider_format_shrink_the_range_and_store_every_event_once() {
    let anvil = Anvil::start().await;
    let chain = Chain::new(&anvil.url).await;
    let emitter = chain.deploy_emitter().await;
    chain.emit_burns(&emitter, 60, |i| i % 3 + 1).await;
    for (name, refuse) in provider_formats() {
        let (db, proxy) = (TestDb::new().await, Proxy::start(&anvil.url).await);
        let too_big = |f: u64, t: u64| t - f + 1 > CAP;
        proxy.set(move |r| match log_range(r) {
            Some((f, t)) if too_big(f, t) => refuse(r, f),
            _ => Action::Forward,
        });
        let extra = "max_block_range = 40\nrpc_timeout = \"400ms\"\nrpc_attempts = 2\nfetch_concurrency = 1";
        let app = build(&config_toml(&db.url, &proxy.url, &emitter, extra, "")).await;
        let (_, failed) = drive_until_idle(&app).await;
        assert!(failed.is_empty(), "{name}: a range error failed the tick: {failed:?}");
        assert_stored_equals_chain(&db.client().await, &chain, &emitter).await;
        let seen = spans(&proxy.seen(), &too_big);
        // The stream's first request probes its log density (see poller::parts).
        assert_eq!(seen.first(), Some(&(PROBE_BLOCKS, true)), "{name}: {seen:?}");
        assert_eq!(
            seen.get(1),
            Some(&(40 - PROBE_BLOCKS, false)),
            "{name}: then the rest of max_block_range at once: {seen:?}"
        );
        assert!(
            seen.iter().filter(|(_, ok)| *ok).all(|(s, _)| *s <= CAP),
            "{name}: {seen:?}"
        );
        assert!(
            seen.iter().any(|(s, ok)| *ok && *s >= CAP / 2),
            "{name}: shrank sensibly: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_range_grows_back_after_the_provider_stops_refusing() {
    let (anvil, db, chain, emitter) = world().await;
    chain.emit_burns(&emitter, 400, |_| 1).await;
    let proxy = Proxy::start(&anvil.url).await;
    let mut refusals = 0;
    proxy.set(move |r| match log_range(r) {
        Some((f, t)) if t - f + 1 > 5 && refusals < 3 => {
            refusals += 1;
            rpc_error(r, -32005, "query returned more than 10000 results", None)
        }
        _ => Action::Forward,
    });
    let app = build(&config_toml(
        &db.url,
        &proxy.url,
        &emitter,
        "max_block_range = 40\nfetch_concurrency = 1",
        "",
    ))
    .await;
    drive_until_idle(&app).await;
    let accepted: Vec<u64> = proxy
        .seen()
        .iter()
        .filter_map(log_range)
        .map(|(f, t)| t - f + 1)
        .skip(1 + 3) // the density probe (see poller::parts), then three refusals
        .collect();
    let halved_thrice = (40 - PROBE_BLOCKS) / 2 / 2 / 2;
    assert_eq!(
        accepted.first(),
        Some(&halved_thrice),
        "halved three times from the rest of the range: {accepted:?}"
    );
    let grew: Vec<u64> = accepted.windows(2).filter(|w| w[1] > w[0]).map(|w| w[1]).collect();
    assert!(
        grew.len() >= 3 && accepted.contains(&40),
        "additive growth back to the maximum: {accepted:?}"
    );
    assert_stored_equals_chain(&db.client().await, &chain, &emitter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_block_with_too_many_logs_is_an_alarm_not_a_skip_or_a_loop() {
    let (anvil, db, chain, emitter) = world().await;
    chain.emit_burns(&emitter, 10, |i| if i == 5 { 20 } else { 1 }).await;
    // The block holding the 20-event burn (automine may pack transactions, so look it up).
    let head = chain.block_number().await;
    let mut per_block = std::collections::BTreeMap::<i64, usize>::new();
    for (_, _, block) in chain.burned_logs(&emitter, head).await {
        *per_block.entry(block).or_default() += 1;
    }
    let dense_block: i64 = per_block
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, _)| *b)
        .expect("a dense block");
    let proxy = Proxy::start(&anvil.url).await;
    proxy.set(move |r| match log_range(r) {
        Some((f, t)) if (f..=t).contains(&(dense_block as u64)) => {
            rpc_error(r, -32005, "query returned more than 10000 results", None)
        }
        _ => Action::Forward,
    });
    let app = build(&config_toml(
        &db.url,
        &proxy.url,
        &emitter,
        "max_block_range = 64\nfetch_concurrency = 1",
        "",
    ))
    .await;
    let first = tick(&app).await.expect("the blocks before the dense one are stored");
    assert!(
        matches!(first, TickOutcome::Advanced { from: 0, to, .. } if to == dense_block as u64 - 1),
        "{first:?}"
    );
    for _ in 0..3 {
        proxy.forget();
        let err = tick(&app).await.expect_err("the dense block cannot be fetched");
        let msg = err.to_string();
        assert!(
            matches!(&err, TickError::Chain(c) if matches!(c.kind, ChainErrorKind::BlockTooLarge { block, .. } if block == dense_block as u64)),
            "{msg}"
        );
        assert!(msg.contains(&format!("single block {dense_block}")), "{msg}");
        let requests = proxy.seen().iter().filter(|r| method_of(r) == "eth_getLogs").count();
        assert_eq!(requests, 1, "a failing tick asks for the dense block alone, once");
    }
    let pg = db.client().await;
    let cursor = cursor_of(&pg, "burns").await.expect("cursor");
    assert_eq!(
        cursor,
        dense_block - 1,
        "the cursor stops right before the block it could not fetch"
    );
    let past: i64 = pg
        .query_one("SELECT count(*) FROM events WHERE block_number >= $1", &[&dense_block])
        .await
        .expect("count")
        .get(0);
    assert_eq!(past, 0, "nothing at or after the block is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_times_out_and_one_that_answers_503_fail_over_and_nothing_is_lost() {
    let (anvil, db, chain, emitter) = world().await;
    chain.emit_burns(&emitter, 40, |i| i % 4 + 1).await;
    let (hangs, unavailable) = (Proxy::start(&anvil.url).await, Proxy::start(&anvil.url).await);
    let cfg = format!(
        "rpc_urls = [\"{}\", \"{}\", \"{}\"]\nrpc_timeout = \"300ms\"\nrpc_attempts = 2\nrpc_cooldown = \"1h\"\nmax_block_range = 8",
        hangs.url, unavailable.url, anvil.url
    );
    // Both broken endpoints answer eth_chainId at start, then break.
    let app = build(&config_toml(&db.url, &anvil.url, &emitter, &cfg, "")).await;
    hangs.set(|_| Action::Hang);
    unavailable.set(|_| Action::Reply(503, "upstream unavailable".into()));
    let (_, failed) = drive_until_idle(&app).await;
    assert_eq!(
        failed.len(),
        2,
        "one failed tick per broken endpoint, then the healthy one: {failed:?}"
    );
    assert!(
        matches!(&failed[0], TickError::Chain(c) if c.kind == ChainErrorKind::Timeout),
        "{:?}",
        failed[0]
    );
    assert!(
        matches!(&failed[1], TickError::Chain(c) if matches!(c.kind, ChainErrorKind::Http { status: 503, .. })),
        "{:?}",
        failed[1]
    );
    assert_stored_equals_chain(&db.client().await, &chain, &emitter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_are_rejected_retried_and_never_stored() {
    let (anvil, db, chain, emitter) = world().await;
    chain.emit_burns(&emitter, 12, |_| 2).await;
    let proxy = Proxy::start(&anvil.url).await;
    let app = build(&config_toml(&db.url, &proxy.url, &emitter, "rpc_attempts = 2", "")).await;
    let pg = db.client().await;
    type Corrupt = fn(&mut Value);
    let corruptions: Vec<(&str, Corrupt)> = vec![
        ("removed log", |l| l["removed"] = json!(true)),
        ("log outside the range", |l| l["blockNumber"] = json!("0xffff")),
        ("wrong block hash", |l| {
            l["blockHash"] = json!(format!("0x{}", "ab".repeat(32)))
        }),
        ("log from another address", |l| {
            l["address"] = json!(format!("0x{}", "11".repeat(20)))
        }),
        ("null log index", |l| l["logIndex"] = Value::Null),
    ];
    for (name, corrupt) in corruptions {
        proxy.set(move |r| {
            if method_of(r) != "eth_getLogs" {
                return Action::Forward;
            }
            Action::Rewrite(Box::new(move |mut v| {
                if let Some(first) = v["result"].get_mut(0) {
                    corrupt(first);
                }
                v
            }))
        });
        let err = tick(&app).await.expect_err(name);
        assert!(
            matches!(&err, TickError::Chain(c) if matches!(c.kind, ChainErrorKind::Malformed(_))),
            "{name}: {err}"
        );
    }
    proxy.set(|r| {
        if method_of(r) == "eth_getLogs" {
            Action::Reply(200, "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":[{\"address\":".into())
        } else {
            Action::Forward
        }
    });
    let err = tick(&app).await.expect_err("truncated JSON");
    assert!(
        matches!(&err, TickError::Chain(c) if matches!(c.kind, ChainErrorKind::Malformed(_))),
        "{err}"
    );
    assert_eq!(cursor_of(&pg, "burns").await, Some(-1), "nothing advanced");
    let stored = count_events(&pg).await;
    assert_eq!(stored, 0, "nothing of a malformed answer is stored");

    proxy.pass();
    drive_until_idle(&app).await;
    assert_stored_equals_chain(&pg, &chain, &emitter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_endpoint_is_passed_over_and_the_cursor_neither_moves_back_nor_skips() {
    let (anvil, db, chain, emitter) = world().await;
    chain.emit_burns(&emitter, 20, |_| 1).await;
    let pg = db.migrate_with_history().await;
    let lagging = Proxy::start(&anvil.url).await;
    let cfg = format!(
        "rpc_urls = [\"{}\", \"{}\"]\nrpc_cooldown = \"1h\"",
        lagging.url, anvil.url
    );
    let app = build(&config_toml(&db.url, &anvil.url, &emitter, &cfg, "")).await;
    drive_until_idle(&app).await;
    let first_head = chain.block_number().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(first_head));

    // After a failover to a node that is behind: head 3, blocks above unknown.
    lagging.set(|r| match method_of(r) {
        "eth_blockNumber" => Action::Rewrite(Box::new(|mut v| {
            v["result"] = json!("0x3");
            v
        })),
        "eth_getBlockByNumber" if r["params"][0] == "latest" => Action::Rewrite(Box::new(|mut v| {
            v["result"]["number"] = json!("0x3");
            v
        })),
        "eth_getLogs" => Action::Rewrite(Box::new(|mut v| {
            v["result"] = json!([]);
            v
        })),
        _ => Action::Forward,
    });
    chain.emit_burns(&emitter, 10, |_| 2).await;
    let (_, failed) = drive_until_idle(&app).await;
    assert!(
        matches!(failed.as_slice(), [TickError::Chain(c)] if matches!(c.kind, ChainErrorKind::Lagging { head: 3, .. })),
        "{failed:?}"
    );
    let head = chain.block_number().await;
    assert_contiguous_forward(&cursor_history(&pg, "burns").await, -1, head);
    assert_stored_equals_chain(&pg, &chain, &emitter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_shallower_than_confirmations_never_stores_an_orphaned_row() {
    let (anvil, db, chain, emitter) = world().await;
    chain.emit_burns(&emitter, 20, |_| 2).await;
    let app = build(&config_toml(&db.url, &anvil.url, &emitter, "confirmations = 3", "")).await;
    drive_until_idle(&app).await;
    chain.reorg(&emitter, 3, &[(5, 1000)]).await; // replaces the 3 unconfirmed blocks
    chain.emit_burns(&emitter, 5, |_| 1).await;
    chain.mine(3).await;
    let (_, failed) = drive_until_idle(&app).await;
    assert!(failed.is_empty(), "{failed:?}");
    let pg = db.client().await;
    assert_stored_equals_chain(&pg, &chain, &emitter).await;
    let rows = pg
        .query(
            "SELECT DISTINCT block_number, '0x' || encode(block_hash, 'hex') FROM events",
            &[],
        )
        .await
        .expect("rows");
    for r in rows {
        let (n, h): (i64, String) = (r.get(0), r.get(1));
        assert_eq!(h, chain.block_hash(n).await, "block {n} of a stored row is canonical");
    }
}

async fn ingest_then_reorg_below_the_cursor(policy: &str) -> (Anvil, TestDb, Chain, String, App, i64) {
    let (anvil, db, chain, emitter) = world().await;
    chain.emit_burns(&emitter, 20, |i| i % 2 + 1).await;
    let extra = format!("confirmations = 0\nmax_block_range = 4\non_deep_reorg = \"{policy}\"");
    let app = build(&config_toml(&db.url, &anvil.url, &emitter, &extra, "")).await;
    drive_until_idle(&app).await;
    let head = chain.block_number().await;
    // Deeper than the safe head (confirmations = 0): the last 5 stored blocks change.
    chain.reorg(&emitter, 5, &[(3, 5000), (4, 6000)]).await;
    (anvil, db, chain, emitter, app, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_reorg_under_halt_stops_the_stream_saying_why_until_an_operator_rewinds() {
    let (_anvil, db, chain, emitter, app, head) = ingest_then_reorg_below_the_cursor("halt").await;
    let err = tick(&app).await.expect_err("halted");
    let msg = err.to_string();
    assert!(matches!(err, TickError::DeepReorg { .. }), "{msg}");
    assert!(
        msg.contains("burns") && msg.contains(&format!("block {head} was 0x")) && msg.contains("now has 0x"),
        "{msg}"
    );
    let pg = db.client().await;
    let halted: Option<String> = pg
        .query_one("SELECT halted_reason FROM block_cursors", &[])
        .await
        .expect("row")
        .get(0);
    assert!(
        halted.is_some_and(|h| h.contains("logcursor rewind")),
        "status shows the halt"
    );
    assert!(tick(&app).await.is_err(), "stays halted");
    assert_eq!(cursor_of(&pg, "burns").await, Some(head), "a halt moves nothing");

    let to = head - 5;
    let r = logcursor::admin::rewind(
        &config(&config_toml(&db.url, &chain.url, &emitter, "", "")),
        "operator",
        &Default::default(),
        "burns",
        to,
    )
    .await
    .expect("rewind");
    assert_eq!((r.from, r.to), (head, to));
    drive_until_idle(&app).await;
    assert_stored_equals_chain(&pg, &chain, &emitter).await;
    let audit: Vec<(i64, i64, String)> = pg
        .query("SELECT from_block, to_block, by FROM cursor_rewinds", &[])
        .await
        .expect("audit")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(audit, vec![(head, to, "operator".to_string())]);
    let halted: Option<String> = pg
        .query_one("SELECT halted_reason FROM block_cursors", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(halted, None, "the rewind resumed the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_reorg_under_rewind_leaves_exactly_the_canonical_logs_and_one_audit_row() {
    let (_anvil, db, chain, emitter, app, head) = ingest_then_reorg_below_the_cursor("rewind").await;
    let first = tick(&app).await.expect("rewinds");
    let TickOutcome::Rewound {
        from,
        to,
        events_deleted,
    } = first
    else {
        panic!("{first:?}")
    };
    assert_eq!(from, head);
    assert!(
        to < head - 4 && to >= head - 8,
        "back to the newest stored block still canonical: {to}"
    );
    assert!(events_deleted > 0);
    chain.mine(1).await;
    drive_until_idle(&app).await;
    let pg = db.client().await;
    assert_stored_equals_chain(&pg, &chain, &emitter).await;
    let audits: i64 = pg
        .query_one("SELECT count(*) FROM cursor_rewinds", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(audits, 1);
    let amounts: BTreeSet<String> = pg
        .query(
            "SELECT params->>'amount' FROM events WHERE (params->>'amount')::numeric >= 5000",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        amounts.len(),
        7,
        "the replacement blocks' events are stored: {amounts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finality_tags_bound_the_safe_head_and_the_lower_bound_wins() {
    let anvil = Anvil::start().await;
    let chain = Chain::new(&anvil.url).await;
    let emitter = chain.deploy_emitter().await;
    chain.emit_burns(&emitter, 30, |_| 1).await;
    chain.mine(70).await;
    let tag_number = |tag: &'static str| {
        let chain = chain.clone();
        async move { hex_i64(&chain.rpc("eth_getBlockByNumber", json!([tag, false])).await["number"]) }
    };
    for (finality, confirmations) in [("finalized", 0), ("safe", 0), ("safe", 60)] {
        let db = TestDb::new().await;
        let extra = format!("finality = \"{finality}\"\nconfirmations = {confirmations}");
        let app = build(&config_toml(&db.url, &anvil.url, &emitter, &extra, "")).await;
        drive_until_idle(&app).await;
        let expected = tag_number(if finality == "finalized" { "finalized" } else { "safe" })
            .await
            .min(chain.block_number().await - confirmations);
        let cursor = cursor_of(&db.client().await, "burns").await;
        assert_eq!(
            cursor,
            Some(expected),
            "finality = {finality}, confirmations = {confirmations}"
        );
    }
}
