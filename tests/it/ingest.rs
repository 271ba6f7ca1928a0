//! The poll loop in process: replicas are `App`s with their own pools (so
//! their own PostgreSQL sessions), exactly as separate processes would be.

use std::time::Duration;

use logcursor::app::{App, StreamSummary};
use logcursor::poller::TickOutcome;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const STREAM: &str = "burns";

fn spawn_run(app: App, token: &CancellationToken) -> JoinHandle<Vec<StreamSummary>> {
    let token = token.clone();
    tokio::spawn(async move { app.run(token).await.expect("run") })
}

async fn wait_for_cursor(db: &tokio_postgres::Client, at: i64) {
    wait_for(&format!("cursor at {at}"), Duration::from_secs(60), || async {
        (cursor_of(db, STREAM).await == Some(at)).then_some(())
    })
    .await
}

fn totals(outcomes: &[TickOutcome]) -> (u64, u64) {
    outcomes.iter().fold((0, 0), |(i, d), o| match o {
        TickOutcome::Advanced {
            inserted, duplicates, ..
        } => (i + inserted, d + duplicates),
        _ => (i, d),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_stores_every_event_of_hundreds_of_transactions_exactly_once() {
    let w = World::new().await;
    let emitted = w.emit_burns(300, |i| i % 5 + 1).await;
    w.chain.mine(2).await; // bury the last events under `confirmations`
    let pg = w.migrate().await;
    let app = w.config().stream(|s| s.confirmations = 2).replica("solo").await;

    let token = CancellationToken::new();
    let run = spawn_run(app, &token);
    let safe_head = w.chain.block_number().await - 2;
    wait_for_cursor(&pg, safe_head).await;
    token.cancel();
    let summary = run.await.expect("join");

    let on_chain: Vec<LogKey> = w.chain.burned_logs(&w.emitter, safe_head).await.into_iter().collect();
    let mut stored = stored_logs(&pg).await;
    stored.sort();
    assert_eq!(
        on_chain.len() as u64,
        emitted,
        "every emitted event is at or below the safe head"
    );
    assert_eq!(stored, on_chain, "stored rows equal the chain's logs, each once");
    assert_contiguous_forward(&cursor_history(&pg, STREAM).await, -1, safe_head);
    assert_eq!(summary[0].duplicates, 0);
    assert_eq!(summary[0].events_inserted, emitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_started_together_store_every_event_once_and_never_process_a_range_twice() {
    let w = World::new().await;
    let mut emitted = w.emit_burns(150, |i| i % 4 + 1).await;
    let pg = w.migrate().await;
    let cfg = w.config().stream(|s| s.max_block_range = 7).build();

    let token = CancellationToken::new();
    let apps = tokio::join!(
        build_app(&cfg, "replica-a"),
        build_app(&cfg, "replica-b"),
        build_app(&cfg, "replica-c")
    );
    let runs = [apps.0, apps.1, apps.2].map(|app| spawn_run(app, &token));
    // Keep the chain moving while they run.
    emitted += w.emit_burns(60, |i| i % 3 + 1).await;
    let head = w.chain.block_number().await;
    wait_for_cursor(&pg, head).await;
    token.cancel();
    let mut summaries = Vec::new();
    for r in runs {
        summaries.extend(r.await.expect("join"));
    }

    let on_chain: Vec<LogKey> = w.chain.burned_logs(&w.emitter, head).await.into_iter().collect();
    let mut stored = stored_logs(&pg).await;
    stored.sort();
    assert_eq!(on_chain.len() as u64, emitted);
    assert_eq!(stored, on_chain, "every event exactly once");
    let history = cursor_history(&pg, STREAM).await;
    assert_contiguous_forward(&history, -1, head);
    let duplicates: u64 = summaries.iter().map(|s| s.duplicates).sum();
    let inserted: u64 = summaries.iter().map(|s| s.events_inserted).sum();
    assert_eq!(duplicates, 0, "no replica stored a range another had stored");
    assert_eq!(inserted, emitted);
    let movers: std::collections::BTreeSet<&str> = history.iter().map(|(_, _, by)| by.as_str()).collect();
    eprintln!("ranges committed: {} by {movers:?}", history.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_resumes_from_the_cursor_without_duplicates_or_gaps() {
    let w = World::new().await;
    w.emit_burns(120, |i| i % 3 + 1).await;
    let pg = w.migrate().await;
    let cfg = w.config().stream(|s| s.max_block_range = 20).build();

    let first = build_app(&cfg, "before-restart").await;
    for _ in 0..3 {
        let o = first.pollers()[0].tick(&CancellationToken::new()).await.expect("tick");
        assert!(matches!(o, TickOutcome::Advanced { .. }), "{o:?}");
    }
    drop(first);
    assert_eq!(cursor_of(&pg, STREAM).await, Some(59));

    let second = build_app(&cfg, "after-restart").await;
    let outcomes = second.tick_until_idle().await;
    let first_range = outcomes.first().expect("a tick");
    assert!(
        matches!(first_range, TickOutcome::Advanced { from: 60, .. }),
        "{first_range:?}"
    );
    let head = w.chain.block_number().await;
    let (_, duplicates) = totals(&outcomes);
    assert_eq!(duplicates, 0);
    let on_chain: Vec<LogKey> = w.chain.burned_logs(&w.emitter, head).await.into_iter().collect();
    let mut stored = stored_logs(&pg).await;
    stored.sort();
    assert_eq!(stored, on_chain);
    assert_contiguous_forward(&cursor_history(&pg, STREAM).await, -1, head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_already_stored_are_counted_as_duplicates_and_the_cursor_still_advances() {
    duplicates_are_counted_and_the_cursor_advances(false).await;
}

/// The same with parts big enough for the binary COPY path, whose unique
/// violation must roll back to its savepoint only and fall back to the path
/// that skips and counts duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_copy_that_meets_stored_rows_falls_back_and_counts_them_as_duplicates() {
    duplicates_are_counted_and_the_cursor_advances(true).await;
}

async fn duplicates_are_counted_and_the_cursor_advances(bulk: bool) {
    let w = World::new().await;
    let emitted = if bulk {
        let per_tx = logcursor::store::events::COPY_FROM_ROWS as u64 + 100;
        w.chain.burn_many(&w.emitter, per_tx, 0).await;
        w.chain.burn_many(&w.emitter, per_tx, per_tx).await;
        2 * per_tx
    } else {
        w.emit_burns(40, |i| i % 4 + 1).await
    };
    let pg = w.pg().await;
    let app = w.replica("replica").await;
    assert_eq!(totals(&app.tick_until_idle().await), (emitted, 0));
    let head = w.chain.block_number().await;

    // As after a failover to a replica whose copy lagged: some rows are
    // there, the cursor is behind them.
    let deleted = pg
        .execute("DELETE FROM events WHERE log_index % 2 = 0", &[])
        .await
        .expect("delete");
    pg.execute("UPDATE block_cursors SET last_processed_block = -1", &[])
        .await
        .expect("rewind");

    let (inserted, duplicates) = totals(&app.tick_until_idle().await);
    let regressions = app.pollers()[0].metrics.cursor_regressions.get();
    assert_eq!(
        regressions, 1,
        "the cursor moving back is noticed and counted, not hidden"
    );
    assert_eq!(inserted, deleted, "the missing rows are stored again");
    assert_eq!(
        duplicates,
        emitted - deleted,
        "the present rows are counted as duplicates, not errors"
    );
    assert_eq!(cursor_of(&pg, STREAM).await, Some(head));
    w.assert_stored_up_to(&pg, head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_events_of_the_same_transaction_are_both_stored() {
    let w = World::new().await;
    w.chain.burn(&w.emitter, 1, 100).await;
    let tx = w.chain.burn(&w.emitter, 3, 7).await;
    w.chain.unlisted(&w.emitter, 5).await;
    let pg = w.pg().await;
    w.replica("replica").await.tick_until_idle().await;

    let rows = pg
        .query(
            "SELECT log_index, event_name, params->>'amount', params->>'from' FROM events
              WHERE tx_hash = decode($1, 'hex') ORDER BY log_index",
            &[&tx.trim_start_matches("0x")],
        )
        .await
        .expect("query");
    let got: Vec<(i32, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        got,
        vec![
            (0, "Burned".into(), "7".into()),
            (1, "Burned".into(), "8".into()),
            (2, "Burned".into(), "9".into())
        ]
    );
    let from: String = rows[0].get(3);
    assert!(
        from.starts_with("0x") && from.len() == 42 && from == from.to_lowercase(),
        "{from}"
    );
    let total = count_events(&pg).await;
    assert_eq!(total, 4, "the unlisted event is not ingested");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_newer_than_the_safe_head_are_not_processed() {
    let w = World::new().await;
    w.emit_burns(20, |_| 2).await;
    let pg = w.pg().await;
    let app = w.config().stream(|s| s.confirmations = 5).replica("replica").await;
    let outcomes = app.tick_until_idle().await;
    let head = w.chain.block_number().await;
    let safe_head = head - 5;
    assert!(
        matches!(outcomes.last(), Some(TickOutcome::Idle { cursor, .. }) if *cursor == safe_head),
        "{outcomes:?}"
    );
    assert_eq!(cursor_of(&pg, STREAM).await, Some(safe_head));
    let newest: Option<i64> = pg
        .query_one("SELECT max(block_number) FROM events", &[])
        .await
        .expect("max")
        .get(0);
    assert!(
        newest.is_some_and(|b| b <= safe_head),
        "stored a block above the safe head: {newest:?}"
    );
    let above = w
        .chain
        .burned_logs(&w.emitter, head)
        .await
        .iter()
        .filter(|l| l.2 > safe_head)
        .count();
    // Automine may pack two transactions into a block under load: count, do not assume.
    assert!(above >= 2, "the chain has events above the safe head ({above})");

    w.chain.mine(5).await;
    app.tick_until_idle().await;
    w.assert_stored_up_to(&pg, head).await;
}
