//! The speed features, for the failures they could introduce: a tick larger
//! than a statement's bind-parameter limit, concurrent sub-ranges that must
//! still cover each tick exactly once, and streams that must not wait on
//! each other.

use std::time::Duration;

use logcursor::poller::TickOutcome;
use tokio_util::sync::CancellationToken;

use crate::support::proxy::{log_range, Action, Proxy};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_larger_than_the_bind_parameter_limit_stores_every_event_once() {
    let w = World::new().await;
    let (per_tx, txs) = (2_800u64, 24u64);
    for i in 0..txs {
        w.chain.burn_many(&w.emitter, per_tx, i * per_tx).await;
    }
    let total = per_tx * txs;
    assert!(
        total > 65_535,
        "more rows than one statement could bind one parameter each for"
    );
    let app = w
        .config()
        .stream(|s| {
            s.max_block_range = 200;
            s.max_logs_per_tick = 100_000;
            s.rpc_timeout = Duration::from_secs(15);
            s.rpc_attempts = 1;
        })
        .replica("big")
        .await;
    let head = w.chain.block_number().await;
    let first = app.pollers()[0]
        .tick(&CancellationToken::new())
        .await
        .expect("one big tick");
    assert!(
        matches!(first, TickOutcome::Advanced { to, inserted, duplicates: 0, .. } if to == head as u64 && inserted == total),
        "{first:?}"
    );
    let pg = w.pg().await;
    assert_eq!(count_events(&pg).await, total as i64);
    let distinct: i64 = pg
        .query_one("SELECT count(DISTINCT (params->>'amount')) FROM events", &[])
        .await
        .expect("distinct")
        .get(0);
    assert_eq!(distinct, total as i64, "every event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sub_ranges_cover_every_tick_exactly_once() {
    let w = World::new().await;
    w.emit_burns(90, |i| i % 4 + 1).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.max_block_range = 40;
            s.fetch_concurrency = 4;
        })
        .replica("r")
        .await;
    app.tick_until_idle().await;
    let mut ranges: Vec<(u64, u64)> = proxy.seen().iter().filter_map(log_range).collect();
    assert!(
        ranges.len() >= 4 * 2,
        "ticks were split into concurrent sub-ranges: {ranges:?}"
    );
    ranges.sort();
    let head = w.chain.block_number().await as u64;
    let mut next = 0;
    for (from, to) in &ranges {
        assert_eq!(*from, next, "no block skipped or fetched twice: {ranges:?}");
        next = to + 1;
    }
    assert_eq!(next, head + 1, "the sub-ranges cover every block up to the head");
    w.assert_stored_equals_chain(&w.pg().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_streams_and_two_replicas_one_stream_advances_while_the_other_is_locked() {
    let w = World::new().await;
    let (chain, first) = (&w.chain, &w.emitter);
    let second = chain.deploy_emitter().await;
    // max_block_range as TOML, before the second stream copies the first.
    let cfg = w
        .config()
        .stream_toml("max_block_range = 10")
        .add_stream_toml(&format!("name = \"second\"\naddresses = [\"{second}\"]"))
        .build();
    let (a, b) = (build_app(&cfg, "replica-a").await, build_app(&cfg, "replica-b").await);
    // Another holder keeps the first stream's row locked for as long as it likes.
    let mut holder = w.pg().await;
    let hold = holder.transaction().await.expect("begin");
    hold.execute("SELECT 1 FROM block_cursors WHERE id = 'burns' FOR UPDATE", &[])
        .await
        .expect("lock");

    let token = CancellationToken::new();
    let runs = [a, b].map(|app| tokio::spawn(app.run(token.clone())));
    chain.emit_burns(first, 20, |_| 1).await;
    chain.emit_burns(&second, 20, |_| 2).await;
    let head = chain.block_number().await;
    let pg = w.pg().await;
    wait_for("the free stream at the head", Duration::from_secs(30), || async {
        (cursor_of(&pg, "second").await == Some(head)).then_some(())
    })
    .await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(-1), "the locked stream waited");

    hold.commit().await.expect("release");
    wait_for("the released stream at the head", Duration::from_secs(30), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    token.cancel();
    for r in runs {
        r.await.expect("join").expect("run");
    }
    let per_stream: Vec<(String, i64)> = pg
        .query(
            "SELECT stream, count(*) FROM events GROUP BY stream ORDER BY stream",
            &[],
        )
        .await
        .expect("counts")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_stream, vec![("burns".to_string(), 20), ("second".to_string(), 40)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_made_stale_by_another_replicas_commit_is_discarded_and_a_fresh_one_is_used() {
    let w = World::new().await;
    w.emit_burns(40, |i| i % 3 + 1).await;
    let pg = w.migrate().await;
    let cfg = w
        .config()
        .stream(|s| {
            s.max_block_range = 5;
            s.pipeline = true;
        })
        .build();
    let (a, b) = (build_app(&cfg, "a").await, build_app(&cfg, "b").await);
    let step = |app: &logcursor::app::App| {
        let p = std::sync::Arc::clone(&app.pollers()[0]);
        async move { p.tick(&CancellationToken::new()).await.expect("tick") }
    };
    let range = |o: TickOutcome| match o {
        TickOutcome::Advanced { from, to, .. } => (from, to),
        other => panic!("{other:?}"),
    };
    assert_eq!(range(step(&a).await), (0, 4)); // a prefetches 5..=9
    assert_eq!(range(step(&b).await), (5, 9)); // b takes 5..=9 first; prefetches 10..=14
    assert_eq!(range(step(&a).await), (10, 14)); // a's prefetch of 5..=9 is stale
    let (am, bm) = (&a.pollers()[0].metrics, &b.pollers()[0].metrics);
    assert_eq!(am.prefetch_discarded.get(), 1, "a discarded its stale prefetch");
    assert_eq!(range(step(&a).await), (15, 19)); // a's prefetch of 15..=19 still holds
    assert_eq!(am.prefetch_used.get(), 1, "a used its fresh prefetch");
    assert_eq!(bm.prefetch_used.get(), 0);
    b.tick_until_idle().await;
    a.tick_until_idle().await;
    let head = w.chain.block_number().await;
    w.assert_stored_up_to(&pg, head).await;
    assert_contiguous_forward(&cursor_history(&pg, "burns").await, -1, head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pipelining_replicas_killed_and_restarted_at_random_store_every_event_once() {
    let w = World::new().await;
    w.emit_burns(300, |i| i % 4 + 1).await;
    let head = w.chain.block_number().await;
    let pg = w.migrate().await;
    // The replicas are processes, which read a file: TOML only.
    let cfg = w.config().stream_toml("max_block_range = 2\npipeline = true").file();
    let mut replicas = vec![
        spawn_replica(cfg.path(), "p0", &[]),
        spawn_replica(cfg.path(), "p1", &[]),
    ];
    for round in 0..8 {
        let at = cursor_of(&pg, "burns").await.unwrap_or(-1);
        if at >= head - 10 {
            break;
        }
        wait_for("some progress", Duration::from_secs(30), || async {
            cursor_of(&pg, "burns").await.filter(|c| *c >= at + 4).map(|_| ())
        })
        .await;
        let victim = (rand::random::<u8>() % 2) as usize;
        let mut old = replicas.remove(victim);
        old.kill().await.expect("SIGKILL");
        replicas.insert(victim, spawn_replica(cfg.path(), &format!("p{victim}-{round}"), &[]));
    }
    wait_for("the cursor at the head", Duration::from_secs(60), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    stop_all(replicas).await;
    w.assert_stored_up_to(&pg, head).await;
    assert_contiguous_forward(&cursor_history(&pg, "burns").await, -1, head);
}

/// Parts are written while later ones are fetched: a part that fails after
/// others were written ends the tick there. What was written commits, the
/// cursor moves exactly to its end, and nothing after the gap is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_part_that_fails_commits_the_parts_before_it_and_nothing_after() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let w = World::new().await;
    w.emit_burns(120, |i| i % 3 + 1).await;
    let head = w.chain.block_number().await as u64;
    let pg = w.migrate().await;
    let proxy = Proxy::start(&w.anvil.url).await;
    // Once, refuse the request that reaches into the upper half of the chain.
    let bad = head / 2;
    let refused = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&refused);
    proxy.set(move |r| match log_range(r) {
        Some((f, t)) if f > 0 && (f..=t).contains(&bad) && !flag.swap(true, Ordering::SeqCst) => {
            Action::Reply(500, "upstream failed".into())
        }
        _ => Action::Forward,
    });
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.max_block_range = 2000;
            s.fetch_concurrency = 2;
            s.rpc_attempts = 1;
        })
        .replica("r")
        .await;
    let first = app.pollers()[0]
        .tick(&CancellationToken::new())
        .await
        .expect("the tick keeps the parts before the failure");
    let TickOutcome::Advanced { to, .. } = first else {
        panic!("{first:?}")
    };
    assert!(refused.load(Ordering::SeqCst), "the proxy refused a later part");
    let failed_from = proxy
        .seen()
        .iter()
        .filter_map(log_range)
        .find(|(f, t)| *f > 0 && (*f..=*t).contains(&bad))
        .map(|(f, _)| f)
        .expect("the refused request");
    assert_eq!(to + 1, failed_from, "the cursor stops right before the failed part");
    let stored_max: Option<i64> = pg
        .query_one("SELECT max(block_number) FROM events", &[])
        .await
        .expect("max")
        .get(0);
    assert!(
        stored_max.is_some_and(|m| m as u64 <= to),
        "nothing after the gap is stored: {stored_max:?} > {to}"
    );
    app.tick_until_idle().await;
    w.assert_stored_up_to(&pg, head as i64).await;
    assert_contiguous_forward(&cursor_history(&pg, "burns").await, -1, head as i64);
}

/// The push wake-up is a hint: a new head starts a tick at once, and when
/// the WebSocket goes away ingestion goes on by polling, then push resumes
/// once the socket is back. The safety-net poll while subscribed is an hour
/// away, so a row stored while subscribed was stored because of a head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_websocket_drops_ingestion_goes_on_by_polling_and_push_resumes() {
    let w = World::new().await;
    let ws = w.tcp_proxy().await;
    let app = w
        .config()
        .stream_toml(&format!("ws_urls = [\"ws://127.0.0.1:{}\"]", ws.port))
        .stream(|s| {
            s.poll_interval = Duration::from_millis(200);
            s.ws_poll_interval = Duration::from_secs(3600);
        })
        .replica("r")
        .await;
    let poller = std::sync::Arc::clone(&app.pollers()[0]);
    // The endpoint's head follower holds the subscription.
    let push = std::sync::Arc::clone(&poller.stream.followers[0].push);
    // The subscription's counters, as /metrics shows them (per endpoint).
    let registry = std::sync::Arc::clone(app.registry());
    let counted = |name: &str| {
        let series = format!("{name}{{endpoint=");
        registry
            .encode_now()
            .lines()
            .filter(|l| l.starts_with(series.as_str()))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
            .sum::<u64>()
    };
    let token = CancellationToken::new();
    let run = tokio::spawn(app.run(token.clone()));
    let pg = w.pg().await;

    // Waits until the subscription is `live` (or not): the follower then
    // polls every hour (with push) or every 200 ms (without), and the
    // stream waits for the follower's next head.
    let settle = |live: bool| {
        let push = std::sync::Arc::clone(&push);
        async move {
            wait_for("the subscription state", Duration::from_secs(60), || async {
                (push.connected() == live).then_some(())
            })
            .await;
        }
    };
    let emit_and_wait = |what: &'static str| {
        let (w, pg) = (&w, &pg);
        async move {
            w.emit_burns(3, |i| i + 1).await;
            let head = w.chain.block_number().await;
            wait_for(what, Duration::from_secs(30), || async {
                (cursor_of(pg, "burns").await == Some(head)).then_some(())
            })
            .await;
        }
    };

    settle(true).await;
    emit_and_wait("blocks stored on a push wake-up").await;
    assert!(
        counted("logcursor_ws_heads_total") >= 1,
        "heads arrived over the socket"
    );

    ws.cut();
    settle(false).await;
    assert_eq!(counted("logcursor_ws_drops_total"), 1, "the drop is counted");
    emit_and_wait("blocks stored by polling while the socket is gone").await;

    ws.restore();
    settle(true).await;
    let heads = counted("logcursor_ws_heads_total");
    emit_and_wait("blocks stored on a push wake-up again").await;
    assert!(counted("logcursor_ws_heads_total") > heads, "heads over the new socket");

    token.cancel();
    run.await.expect("join").expect("run");
    w.assert_stored_equals_chain(&pg).await;
}

/// I6 while parts are written: the session is idle in transaction while the
/// writer waits for the next part. A part whose retries outlast the idle
/// bound (three 1 s timeouts plus the retry pauses, against 3.05 s) must be
/// given up on at 90% of the bound, so that the parts before it commit;
/// waiting it out would let the server end the session and lose them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_slower_than_the_idle_bound_is_given_up_before_the_server_ends_the_session() {
    use logcursor::poller::parts::PROBE_BLOCKS;
    let w = World::new().await;
    w.emit_burns(20, |_| 1).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    // Every request for logs after the density probe hangs.
    proxy.set(|r| match log_range(r) {
        Some((f, _)) if f >= PROBE_BLOCKS => Action::Hang,
        _ => Action::Forward,
    });
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.rpc_timeout = Duration::from_secs(1);
            s.rpc_attempts = 3;
        })
        .database(|d| d.limits.idle_in_transaction_timeout = Duration::from_millis(3050))
        .replica("r")
        .await;
    let first = app.pollers()[0]
        .tick(&CancellationToken::new())
        .await
        .expect("the tick commits the probe part before the bound");
    assert!(
        matches!(first, TickOutcome::Advanced { from: 0, to, .. } if to == PROBE_BLOCKS - 1),
        "{first:?}"
    );
    let pg = w.pg().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(PROBE_BLOCKS as i64 - 1));
    proxy.pass();
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&pg).await;
}
