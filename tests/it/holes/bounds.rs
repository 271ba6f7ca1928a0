//! Failover and bounds: only a range the provider itself refuses is ever
//! skipped, a frozen replica holds the others up for at most the default
//! idle bound, and a slow but healthy provider is not cut off.

use std::time::Duration;

use logcursor::poller::{TickError, TickOutcome};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::proxy::{delayed, log_range, method_of, rpc_error, Action, Proxy};
use crate::support::*;

/// Checked by removing the `refuses_the_range` test from
/// `Poller::refused_enough` (src/poller/tick.rs): rate-limit and internal
/// JSON-RPC errors then skip the range after `range_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_and_backfill_never_skips_a_range_for_rate_limits_5xx_or_timeouts() {
    let w = World::new().await;
    w.emit_burns(20, |_| 1).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream_toml("on_unfetchable_range = \"skip_and_backfill\"")
        .stream(|s| {
            s.rpc_attempts = 1;
            s.rpc_timeout = Duration::from_millis(300);
            s.max_block_range = 4;
            s.range_attempts = 2;
        })
        .replica("r")
        .await;
    let pg = w.pg().await;
    type Fault = fn(&serde_json::Value) -> Action;
    let faults: Vec<(&str, Fault)> = vec![
        ("HTTP 429", |_| Action::Reply(429, "Too Many Requests".into())),
        ("HTTP 503", |_| Action::Reply(503, "Service Unavailable".into())),
        ("timeout", |_| Action::Hang),
        ("-32005", |r| rpc_error(r, -32005, "limit exceeded", None)),
        ("429", |r| rpc_error(r, 429, "rate limited", None)),
        ("-32603", |r| rpc_error(r, -32603, "internal error", None)),
    ];
    for (name, fault) in faults {
        proxy.set(move |r| match log_range(r) {
            Some((f, t)) if (f..=t).contains(&9) => fault(r),
            _ => Action::Forward,
        });
        for _ in 0..6 {
            let r = app.pollers()[0].tick(&CancellationToken::new()).await;
            assert!(!matches!(r, Ok(TickOutcome::Skipped { .. })), "{name}: {r:?}");
        }
        assert_eq!(
            cursor_of(&pg, "burns").await,
            Some(8),
            "{name}: the cursor waits before block 9"
        );
        let skipped: i64 = pg
            .query_one("SELECT count(*) FROM failed_ranges", &[])
            .await
            .expect("q")
            .get(0);
        assert_eq!(skipped, 0, "{name}: nothing skipped");
    }
    // The provider refusing the range itself is what the policy is for.
    proxy.set(|r| match log_range(r) {
        Some((f, t)) if (f..=t).contains(&9) => rpc_error(r, -32000, "history for this range is not available", None),
        _ => Action::Forward,
    });
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(
            app.pollers()[0]
                .tick(&CancellationToken::new())
                .await
                .map_err(|e| e.to_string()),
        );
    }
    assert!(
        matches!(outcomes[1], Ok(TickOutcome::Skipped { from: 9, .. })),
        "skipped on the second refusal: {outcomes:?}"
    );
}

/// `cfg` without the timeout keys that have defaults: lock, statement and
/// idle timeouts (of `[database]`) and `rpc_timeout` (of the streams) as
/// shipped.
fn with_default_timeouts(cfg: TestConfig) -> TestConfig {
    cfg.database_unset(&["lock_timeout", "statement_timeout", "idle_in_transaction_timeout"])
        .stream_unset(&["rpc_timeout"])
}

/// A replica frozen (SIGSTOP) inside a tick, with every timeout at its
/// default, holds the others up for at most the 15 s idle bound.
/// Checked by setting the default `idle_in_transaction_timeout` back to
/// 60 s (src/config/mod.rs): the other replica then waits past the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_with_default_settings_delays_the_others_by_at_most_15_seconds() {
    let w = World::new().await;
    w.emit_burns(20, |_| 2).await;
    let pg = w.migrate().await;
    let proxy = Proxy::start(&w.anvil.url).await;
    proxy.set(|r| {
        if method_of(r) == "eth_getLogs" {
            Action::Hang
        } else {
            Action::Forward
        }
    });
    let other_cfg = with_default_timeouts(w.config()).build();
    assert_eq!(
        other_cfg.database.limits.idle_in_transaction_timeout,
        Duration::from_secs(15)
    );
    let token = CancellationToken::new();
    let other = build_app(&other_cfg, "other").await;
    let frozen_cfg = with_default_timeouts(w.config().rpc(&proxy.url)).file();
    let frozen = logcursor_cmd(&["run"], frozen_cfg.path(), "frozen")
        .spawn()
        .expect("start");
    // Inside a tick: the row lock taken (its transaction has an id) and
    // eth_getLogs asked (the head follower's log hint alone is no tick).
    wait_for("the frozen replica inside a tick", Duration::from_secs(30), || async {
        let locked = !holding_xids(&pg, "frozen").await.is_empty();
        (locked && proxy.seen().iter().any(|r| method_of(r) == "eth_getLogs")).then_some(())
    })
    .await;
    signal(&frozen, "STOP");
    let stopped_at = Instant::now();
    let run = tokio::spawn(other.run(token.clone()));
    wait_for("the other replica to advance", Duration::from_secs(40), || async {
        cursor_of(&pg, "burns").await.filter(|c| *c >= 0).map(|_| ())
    })
    .await;
    let stalled = stopped_at.elapsed();
    println!("a replica frozen inside a tick held the other up for {stalled:?}");
    assert!(
        stalled <= Duration::from_secs(17),
        "held up {stalled:?}: more than the 15 s bound"
    );

    proxy.pass();
    signal(&frozen, "CONT");
    signal(&frozen, "TERM");
    let out = finish(frozen, Duration::from_secs(40)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    token.cancel();
    run.await.expect("join").expect("run");
    let at = cursor_of(&pg, "burns").await.expect("cursor");
    w.assert_stored_up_to(&pg, at).await;
    assert_contiguous_forward(&cursor_history(&pg, "burns").await, -1, at);
}

/// Every answer takes longer than the idle bound, all of the tick's RPC
/// work well within `rpc_budget`: the tick commits.
/// Checked by removing the heartbeat arm from `Session::wait`
/// (src/poller/tick.rs): the server then ends the session and the tick fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_tick_on_a_provider_slower_than_the_idle_bound_is_not_cut_off() {
    let w = World::new().await;
    w.emit_burns(6, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    proxy.set(|_| delayed(Duration::from_millis(1_200)));
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.rpc_timeout = Duration::from_secs(5);
            s.rpc_budget = Duration::from_secs(60);
            s.fetch_concurrency = 1;
        })
        .database(|d| d.limits.idle_in_transaction_timeout = Duration::from_secs(1))
        .replica("r")
        .await;
    let tick = app.pollers()[0].tick(&CancellationToken::new()).await;
    match &tick {
        Ok(TickOutcome::Advanced { lock_hold, .. }) => {
            assert!(
                *lock_hold > Duration::from_secs(2),
                "{lock_hold:?}: the tick waited past the bound"
            )
        }
        other => panic!("{other:?}"),
    }
    proxy.pass();
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&w.pg().await).await;
}

/// The budget is the bound for a provider too slow for even the first
/// part: the tick gives up (and says so) rather than hold the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_whose_first_part_outlasts_rpc_budget_rolls_back_and_says_why() {
    let w = World::new().await;
    w.emit_burns(6, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.rpc_timeout = Duration::from_secs(1);
            s.rpc_budget = Duration::from_secs(2);
        })
        .replica("r")
        .await;
    // The pin, the first part's logs and its headers: 2.4 s of a 2 s budget.
    proxy.set(|_| delayed(Duration::from_millis(800)));
    let started = Instant::now();
    let tick = app.pollers()[0].tick(&CancellationToken::new()).await;
    assert!(matches!(tick, Err(TickError::RpcBudget { .. })), "{tick:?}");
    assert!(
        started.elapsed() < Duration::from_millis(3_500),
        "{:?}",
        started.elapsed()
    );
    let pg = w.pg().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(-1));
    proxy.pass();
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&pg).await;
}

/// The budget runs out while later parts are still on their way: the range
/// ends at the parts already written, which commit (the final header batch
/// has the rest of the budget), and the next tick goes on from there.
/// Before `Session::parts_deadline` the verify found the budget spent, the
/// tick rolled back, and the next one did the same: a provider slower than
/// the budget for a whole range stalled the stream for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_parts_that_outlast_the_rpc_budget_end_the_range_and_the_parts_before_them_commit() {
    use logcursor::poller::parts::PROBE_BLOCKS;
    let w = World::new().await;
    w.emit_burns(20, |_| 1).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    proxy.set(|r| match log_range(r) {
        Some((f, _)) if f >= PROBE_BLOCKS => delayed(Duration::from_secs(30)),
        _ => Action::Forward,
    });
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.rpc_timeout = Duration::from_secs(2);
            s.rpc_attempts = 3;
            s.rpc_budget = Duration::from_secs(3);
        })
        .replica("r")
        .await;
    let started = Instant::now();
    let first = app.pollers()[0].tick(&CancellationToken::new()).await;
    assert!(
        matches!(first, Ok(TickOutcome::Advanced { from: 0, to, .. }) if to == PROBE_BLOCKS - 1),
        "{first:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "within the budget: {:?}",
        started.elapsed()
    );
    let pg = w.pg().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(PROBE_BLOCKS as i64 - 1));
    proxy.pass();
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&pg).await;
}

/// An endpoint that makes a tick exceed its budget is passed over: the
/// next tick takes the next endpoint. Checked by removing
/// `TickError::RpcBudget` from the faults of `Poller::cool_down_after`
/// (src/poller/tick.rs): the next tick goes to the slow endpoint again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_makes_a_tick_exceed_its_budget_cools_down_and_the_next_one_takes_over() {
    let w = World::new().await;
    w.emit_burns(6, |_| 2).await;
    let (slow, next) = (Proxy::start(&w.anvil.url).await, Proxy::start(&w.anvil.url).await);
    let app = w
        .config()
        .stream_toml(&format!("rpc_urls = [\"{}\", \"{}\"]", slow.url, next.url))
        .stream(|s| {
            s.rpc_timeout = Duration::from_secs(1);
            s.rpc_budget = Duration::from_secs(2);
            s.rpc_cooldown = Duration::from_secs(3600);
        })
        .replica("r")
        .await;
    slow.set(|_| delayed(Duration::from_millis(800)));
    let first = app.pollers()[0].tick(&CancellationToken::new()).await;
    assert!(matches!(first, Err(TickError::RpcBudget { .. })), "{first:?}");
    next.forget();
    let second = app.pollers()[0].tick(&CancellationToken::new()).await;
    assert!(matches!(second, Ok(TickOutcome::Advanced { .. })), "{second:?}");
    assert!(
        next.seen().iter().any(|r| method_of(r) == "eth_getLogs"),
        "the next endpoint served the tick"
    );
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&w.pg().await).await;
}

/// A rewind on a provider slower than the idle bound: the headers that
/// find the common ancestor are waited for like every other RPC of the
/// tick (heartbeats, the budget), so the rewind commits. Before
/// `Poller::ancestor` they were asked with the session idle, and the server
/// ended it; checked by asking them outside `Session::wait` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_on_a_provider_slower_than_the_idle_bound_commits() {
    let w = World::new().await;
    w.emit_burns(10, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream_toml("on_deep_reorg = \"rewind\"")
        .stream(|s| s.rpc_timeout = Duration::from_secs(5))
        .database(|d| d.limits.idle_in_transaction_timeout = Duration::from_secs(1))
        .replica("r")
        .await;
    app.tick_until_idle().await;
    w.chain.reorg(&w.emitter, 3, &[(4, 500)]).await;
    proxy.set(|_| delayed(Duration::from_millis(1_200)));
    let tick = app.pollers()[0].tick(&CancellationToken::new()).await;
    assert!(matches!(tick, Ok(TickOutcome::Rewound { .. })), "{tick:?}");
    proxy.pass();
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&w.pg().await).await;
}

/// I6 outside ticks: a replica that stalls inside the migration
/// transaction (frozen during start-up, holding the migration lock that
/// every starting replica waits for) is cut off by the server after the
/// default 15 s idle bound, like a tick. Found by `scripts/chaos` (a
/// replica stopped during start-up sat idle in transaction past 15 s: the
/// migration allowed 300 s, the start-up checks 60 s); checked by setting
/// the migration's idle bound back to 300 s (src/store/migrate.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_stalled_mid_transaction_is_ended_by_the_server_after_the_idle_bound() {
    let db = TestDb::new().await;
    let tap = crate::support::tap::PgTap::start(&db.url).await;
    tap.delay_once_on("pg_advisory_xact_lock", Duration::from_secs(20));
    let stalled = tokio::spawn({
        let url = tap.url(&db.url);
        async move { logcursor::store::migrate::migrate(&database_in(&url, "public"), "stalled").await }
    });
    let pg = db.client().await;
    let idle = || async {
        pg.query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE application_name = 'test' AND state LIKE 'idle in transaction%' AND datname = current_database()",
            &[],
        )
        .await
        .expect("activity")
        .get::<_, i64>(0)
    };
    wait_for("the stalled migration session", Duration::from_secs(10), || async {
        (idle().await == 1).then_some(())
    })
    .await;
    let since = Instant::now();
    wait_for("the server to end it", Duration::from_secs(17), || async {
        (idle().await == 0).then_some(())
    })
    .await;
    println!("the stalled migration session was ended after {:?}", since.elapsed());
    let result = stalled.await.expect("join");
    assert!(result.is_err(), "its transaction was ended, not committed: {result:?}");
    migrate_as(&db.url, "test").await; // and a replica after it migrates at once
}
