//! Chain access against real anvil behind the fault-injecting proxy:
//! provider range limits, failover, malformed answers, lagging nodes.
//! Reorganisations are in `reorgs.rs`.

use std::time::Duration;

use logcursor::chain::ChainErrorKind;
use logcursor::poller::parts::PROBE_BLOCKS;
use logcursor::poller::{TickError, TickOutcome};
use serde_json::{json, Value};

use crate::support::proxy::{log_range, method_of, rpc_error, Action, Proxy};
use crate::support::*;

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
        let app = TestConfig::new(&db.url, &proxy.url, &emitter)
            .stream(|s| {
                s.max_block_range = 40;
                s.rpc_timeout = Duration::from_millis(400);
                s.rpc_attempts = 2;
                s.fetch_concurrency = 1;
            })
            .replica("r")
            .await;
        let (_, failed) = app.drive_until_idle().await;
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
    let w = World::new().await;
    w.emit_burns(400, |_| 1).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    let mut refusals = 0;
    proxy.set(move |r| match log_range(r) {
        Some((f, t)) if t - f + 1 > 5 && refusals < 3 => {
            refusals += 1;
            rpc_error(r, -32005, "query returned more than 10000 results", None)
        }
        _ => Action::Forward,
    });
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.max_block_range = 40;
            s.fetch_concurrency = 1;
        })
        .replica("r")
        .await;
    app.drive_until_idle().await;
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
    w.assert_stored_equals_chain(&w.pg().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_block_with_too_many_logs_is_an_alarm_not_a_skip_or_a_loop() {
    let w = World::new().await;
    w.emit_burns(10, |i| if i == 5 { 20 } else { 1 }).await;
    // The block holding the 20-event burn (automine may pack transactions, so look it up).
    let head = w.chain.block_number().await;
    let mut per_block = std::collections::BTreeMap::<i64, usize>::new();
    for (_, _, block) in w.chain.burned_logs(&w.emitter, head).await {
        *per_block.entry(block).or_default() += 1;
    }
    let dense_block: i64 = per_block
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, _)| *b)
        .expect("a dense block");
    let proxy = Proxy::start(&w.anvil.url).await;
    proxy.set(move |r| match log_range(r) {
        Some((f, t)) if (f..=t).contains(&(dense_block as u64)) => {
            rpc_error(r, -32005, "query returned more than 10000 results", None)
        }
        _ => Action::Forward,
    });
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.max_block_range = 64;
            s.fetch_concurrency = 1;
        })
        .replica("r")
        .await;
    let first = app
        .tick_once()
        .await
        .expect("the blocks before the dense one are stored");
    assert!(
        matches!(first, TickOutcome::Advanced { from: 0, to, .. } if to == dense_block as u64 - 1),
        "{first:?}"
    );
    for _ in 0..3 {
        proxy.forget();
        let err = app.tick_once().await.expect_err("the dense block cannot be fetched");
        let msg = err.to_string();
        assert!(
            matches!(&err, TickError::Chain(c) if matches!(c.kind, ChainErrorKind::BlockTooLarge { block, .. } if block == dense_block as u64)),
            "{msg}"
        );
        assert!(msg.contains(&format!("single block {dense_block}")), "{msg}");
        let requests = proxy.seen().iter().filter(|r| method_of(r) == "eth_getLogs").count();
        assert_eq!(requests, 1, "a failing tick asks for the dense block alone, once");
    }
    let pg = w.pg().await;
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
    let w = World::new().await;
    w.emit_burns(40, |i| i % 4 + 1).await;
    let (hangs, unavailable) = (Proxy::start(&w.anvil.url).await, Proxy::start(&w.anvil.url).await);
    let rpc_urls = format!(
        "rpc_urls = [\"{}\", \"{}\", \"{}\"]",
        hangs.url, unavailable.url, w.anvil.url
    );
    // Both broken endpoints answer eth_chainId at start, then break.
    let app = w
        .config()
        .stream_toml(&rpc_urls)
        .stream(|s| {
            s.rpc_timeout = Duration::from_millis(300);
            s.rpc_attempts = 2;
            s.rpc_cooldown = Duration::from_secs(3600);
            s.max_block_range = 8;
        })
        .replica("r")
        .await;
    hangs.set(|_| Action::Hang);
    unavailable.set(|_| Action::Reply(503, "upstream unavailable".into()));
    let (_, failed) = app.drive_until_idle().await;
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
    w.assert_stored_equals_chain(&w.pg().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_are_rejected_retried_and_never_stored() {
    let w = World::new().await;
    w.emit_burns(12, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| s.rpc_attempts = 2)
        .replica("r")
        .await;
    let pg = w.pg().await;
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
        let err = app.tick_once().await.expect_err(name);
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
    let err = app.tick_once().await.expect_err("truncated JSON");
    assert!(
        matches!(&err, TickError::Chain(c) if matches!(c.kind, ChainErrorKind::Malformed(_))),
        "{err}"
    );
    assert_eq!(cursor_of(&pg, "burns").await, Some(-1), "nothing advanced");
    let stored = count_events(&pg).await;
    assert_eq!(stored, 0, "nothing of a malformed answer is stored");

    proxy.pass();
    app.drive_until_idle().await;
    w.assert_stored_equals_chain(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_endpoint_is_passed_over_and_the_cursor_neither_moves_back_nor_skips() {
    let w = World::new().await;
    w.emit_burns(20, |_| 1).await;
    let pg = w.migrate().await;
    let lagging = Proxy::start(&w.anvil.url).await;
    let rpc_urls = format!("rpc_urls = [\"{}\", \"{}\"]", lagging.url, w.anvil.url);
    let app = w
        .config()
        .stream_toml(&rpc_urls)
        .stream(|s| s.rpc_cooldown = Duration::from_secs(3600))
        .replica("r")
        .await;
    app.drive_until_idle().await;
    let first_head = w.chain.block_number().await;
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
    w.emit_burns(10, |_| 2).await;
    let (_, failed) = app.drive_until_idle().await;
    assert!(
        matches!(failed.as_slice(), [TickError::Chain(c)] if matches!(c.kind, ChainErrorKind::Lagging { head: 3, .. })),
        "{failed:?}"
    );
    let head = w.chain.block_number().await;
    assert_contiguous_forward(&cursor_history(&pg, "burns").await, -1, head);
    w.assert_stored_equals_chain(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_repeats_its_api_key_never_gets_it_into_an_error() {
    const KEY: &str = "PROVIDERKEY123";
    let w = World::new().await;
    w.emit_burns(2, |_| 1).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    let app = w
        .config()
        .rpc(&format!("{}/v2/{KEY}", proxy.url))
        .stream(|s| s.rpc_attempts = 1)
        .replica("r")
        .await;
    let failed_tick = || async {
        let e = app.tick_once().await.expect_err("the provider refuses");
        format!("{e} | {e:?}")
    };
    // A JSON-RPC error whose message and data quote the request: to a
    // single call (the first of the tick), then inside a batch.
    let refuse = |r: &Value| {
        rpc_error(
            r,
            -32600,
            &format!("key {KEY} may not call {}", method_of(r)),
            Some(json!({"path": format!("/v2/{KEY}")})),
        )
    };
    for refused in ["any", "eth_getLogs"] {
        proxy.set(move |r| match method_of(r) {
            m if refused == "any" || m == refused => refuse(r),
            _ => Action::Forward,
        });
        let shown = failed_tick().await;
        assert!(shown.contains("may not call eth_"), "the message is kept: {shown}");
        assert!(!shown.contains(KEY) && shown.contains("<redacted>"), "{shown}");
    }
    // An HTTP error page that shows the URL.
    proxy.set(|_| Action::Reply(403, format!("<h1>Forbidden</h1> POST /v2/{KEY} is not allowed")));
    let shown = failed_tick().await;
    assert!(shown.contains("HTTP 403") && shown.contains("Forbidden"), "{shown}");
    assert!(!shown.contains(KEY), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dense_part_gets_its_headers_in_the_batch_of_its_logs() {
    let w = World::new().await;
    w.emit_burns(40, |_| 300).await; // 300 logs a block: parts of 6 blocks
    let proxy = Proxy::start(&w.anvil.url).await;
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| s.fetch_concurrency = 1)
        .replica("r")
        .await;
    let skip = proxy.requests().len();
    app.tick_until_idle().await;
    let requests = proxy.requests().split_off(skip);
    let header_of = |call: &Value| {
        (method_of(call) == "eth_getBlockByNumber")
            .then(|| u64::from_str_radix(call["params"][0].as_str()?.trim_start_matches("0x"), 16).ok())
            .flatten()
    };
    let mut dense = 0;
    // The first request probes the density (see poller::parts): not yet dense.
    let with_logs = requests.iter().filter(|c| c.iter().any(|c| log_range(c).is_some()));
    for calls in with_logs.skip(1) {
        let Some((from, to)) = calls.iter().find_map(log_range) else {
            continue;
        };
        if to - from + 1 > 8 {
            continue;
        }
        dense += 1;
        let headers: Vec<u64> = calls.iter().filter_map(header_of).collect();
        assert!(
            (from..=to).all(|n| headers.contains(&n)),
            "the logs of {from}..={to} came with the headers {headers:?}"
        );
    }
    // (So a dense part needs no second request for its timestamps.)
    assert!(dense >= 4, "several dense parts: {dense}");
    w.assert_stored_equals_chain(&w.pg().await).await;
}
