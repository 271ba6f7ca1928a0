//! Handlers broken by their deployment, not by an event: nothing is parked,
//! the tick rolls back, and the stream goes on where it stopped once the
//! deployment is mended (I10: effects exactly once, never skipped).
//!
//! - a trigger whose table is gone (SQLSTATE class 42, like a revoked grant
//!   or a dropped function) would fail on every event: it is not a reason
//!   to park them all;
//! - a Rust handler that awaits something that never comes is abandoned at
//!   the transaction's `statement_timeout`, as its SQL `handler_function`
//!   would be, so it cannot hold the cursor lock and a tick permit forever;
//!   a handler merely slow for a large batch gets halves of it instead;
//! - gap fill retries a range that meets such a fault without counting the
//!   attempt, so the range is never given up for it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use logcursor::app::{App, BuildOptions, HandlerMap};
use logcursor::poller::TickError;
use logcursor::{Event, Handler, HandlerError, Transaction};
use tokio_util::sync::CancellationToken;

use crate::handlers::{balances, burns_on_chain, expected, open, Credit};
use crate::support::*;

/// One tick of the first stream, which must end (with an error) well
/// within `within`.
async fn failing_tick(app: &App, within: Duration) -> TickError {
    tokio::time::timeout(within, app.pollers()[0].tick(&CancellationToken::new()))
        .await
        .expect("the tick ends instead of waiting forever")
        .expect_err("the tick fails")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_whose_table_is_gone_parks_nothing_and_credits_every_burn_once_the_table_is_back() {
    let w = World::new().await;
    let pg = Credit::Trigger.install(&w.db).await;
    let accounts = [w.chain.sender()];
    open(&pg, &accounts[0]).await;
    w.emit_burns(5, |i| i + 1).await;
    pg.batch_execute("ALTER TABLE balances RENAME TO balances_away")
        .await
        .expect("move the table away");
    let app = w.replica("r").await;

    let failed = failing_tick(&app, Duration::from_secs(60)).await;
    assert!(failed.to_string().contains("42P01"), "undefined_table: {failed}");
    assert_eq!(
        dead_letter_count(&pg).await,
        0,
        "no event is parked for the schema's fault"
    );
    assert_eq!(cursor_of(&pg, "burns").await, Some(-1), "nothing committed");

    pg.batch_execute("ALTER TABLE balances_away RENAME TO balances")
        .await
        .expect("bring the table back");
    app.tick_until_idle().await;
    let head = w.chain.block_number().await;
    assert_eq!(dead_letter_count(&pg).await, 0);
    w.assert_stored_equals_chain(&pg).await;
    assert_eq!(
        balances(&pg).await,
        expected(&burns_on_chain(&w.chain, &w.emitter, head).await, &accounts),
        "every burn credited once"
    );
}

/// A handler that writes its effect, then waits on a service that never
/// answers.
struct Hangs;

#[logcursor::async_trait]
impl Handler for Hangs {
    async fn handle(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
        for e in events {
            tx.execute("INSERT INTO touched VALUES ($1)", &[&e.id]).await?;
        }
        std::future::pending().await
    }
}

/// An in-process replica with `handler` on `burns`, a 500 ms
/// `statement_timeout` (and a `lock_timeout` below it, as the parser asks).
async fn with_handler(w: &World, handler: Arc<dyn Handler>, stream_toml: &str) -> App {
    let cfg = w
        .config()
        .stream_toml(stream_toml)
        .database(|d| {
            d.limits.lock_timeout = Duration::from_millis(200);
            d.limits.statement_timeout = Duration::from_millis(500);
        })
        .build();
    let mut handlers = HandlerMap::new();
    handlers.insert("burns".into(), vec![handler]);
    App::build_with(
        &cfg,
        "r",
        BuildOptions { migrate: true },
        &handlers,
        &CancellationToken::new(),
    )
    .await
    .expect("build")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_handler_that_never_returns_is_abandoned_at_statement_timeout_and_parks_nothing() {
    let w = World::new().await;
    w.emit_burns(3, |_| 2).await;
    let pg = w.migrate().await;
    pg.batch_execute("CREATE TABLE touched (event_id bigint)")
        .await
        .expect("effects table");
    let app = with_handler(&w, Arc::new(Hangs), "").await;

    // Twice: the first abandoned tick gave its permit and lock back.
    for attempt in 0..2 {
        let failed = failing_tick(&app, Duration::from_secs(30)).await;
        assert!(
            failed.to_string().contains("did not finish 1 events within 500ms"),
            "attempt {attempt}: halves were tried down to one event: {failed}"
        );
    }
    assert_eq!(dead_letter_count(&pg).await, 0, "nothing parked");
    assert_eq!(cursor_of(&pg, "burns").await, Some(-1), "nothing committed");
    assert_eq!(count_events(&pg).await, 0, "no event stored without its effect");
    let touched: i64 = pg
        .query_one("SELECT count(*) FROM touched", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(touched, 0, "what the abandoned calls wrote was rolled back");
}

/// A handler whose work takes 80 ms an event, both ways: slow, but never
/// stuck.
struct Slow;

#[logcursor::async_trait]
impl Handler for Slow {
    async fn handle(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
        for e in events {
            tx.execute(
                "INSERT INTO effects SELECT $1, $2 FROM pg_sleep(0.08)",
                &[&e.tx_hash.to_string(), &i64::from(e.log_index)],
            )
            .await?;
        }
        Ok(())
    }

    async fn revert(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
        for e in events {
            let undone = tx
                .execute(
                    "DELETE FROM effects WHERE (tx_hash, log_index) = ($1, $2) AND (SELECT true FROM pg_sleep(0.08))",
                    &[&e.tx_hash.to_string(), &i64::from(e.log_index)],
                )
                .await?;
            if undone != 1 {
                return Err(HandlerError::at(0, "reverting an effect never applied"));
            }
        }
        Ok(())
    }
}

/// Migrates; creates the table [`Slow`] applies its effects to.
async fn with_effects_table(w: &World) -> tokio_postgres::Client {
    let pg = w.migrate().await;
    pg.batch_execute("CREATE TABLE effects (tx_hash text, log_index bigint, PRIMARY KEY (tx_hash, log_index))")
        .await
        .expect("effects table");
    pg
}

/// The effects table of [`Slow`], as (tx hash, log index).
async fn effects(pg: &tokio_postgres::Client) -> BTreeSet<(String, i64)> {
    pg.query("SELECT tx_hash, log_index FROM effects", &[])
        .await
        .expect("effects")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The stored events, as [`effects`] keys them.
async fn stored_keys(pg: &tokio_postgres::Client) -> BTreeSet<(String, i64)> {
    pg.query(
        "SELECT '0x' || encode(tx_hash, 'hex'), log_index::bigint FROM events",
        &[],
    )
    .await
    .expect("events")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// A deep reorg removes eight events whose `revert` takes longer than the
/// deadline in one page: the rewind fails, nothing removed, and the next
/// attempt reverts pages of half the size and gets through; every effect
/// of the removed events is undone once and the new branch's applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_too_slow_for_the_deadline_gets_through_in_smaller_pages() {
    let w = World::new().await;
    w.emit_burns(2, |_| 1).await; // blocks that stay: the rewind's common ancestor
    let hash = w.chain.burn(&w.emitter, 8, 0).await;
    w.chain.receipt(&hash).await;
    let pg = with_effects_table(&w).await;
    let app = with_handler(&w, Arc::new(Slow), "on_deep_reorg = \"rewind\"").await;
    app.tick_until_idle().await;
    assert_eq!(effects(&pg).await.len(), 10);

    // The block of the eight burns is replaced by one with two others.
    w.chain.reorg(&w.emitter, 1, &[(2, 100)]).await;
    let (_, failed) = app.drive_until_idle().await;
    assert!(
        failed
            .iter()
            .any(|e| e.to_string().contains("the next attempt reverts pages of 4")),
        "the first attempt was too slow: {failed:?}"
    );
    w.assert_stored_equals_chain(&pg).await;
    assert_eq!(
        effects(&pg).await,
        stored_keys(&pg).await,
        "undone once, the new branch applied"
    );
    assert_eq!(dead_letter_count(&pg).await, 0);
}

/// Eight events in one block take a slow handler longer than the deadline
/// in one call: the seam hands it halves instead, each within it, and every
/// effect is applied once (the abandoned call's writes rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_slow_for_the_deadline_is_handled_in_halves_each_event_once() {
    let w = World::new().await;
    let hash = w.chain.burn(&w.emitter, 8, 0).await;
    w.chain.receipt(&hash).await;
    let pg = with_effects_table(&w).await;
    let app = with_handler(&w, Arc::new(Slow), "").await;

    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&pg).await;
    assert_eq!(dead_letter_count(&pg).await, 0, "nothing parked");
    let effects: i64 = pg
        .query_one("SELECT count(*) FROM effects", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(effects, 8, "each of the 8 events' effect once");
}

/// Gap fill meets the same broken deployment: its attempts do not count,
/// so the range is never given up, and is filled once the table is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_fill_never_gives_a_range_up_for_a_broken_deployment() {
    let w = World::new().await;
    let pg = Credit::Trigger.install(&w.db).await;
    let accounts = [w.chain.sender()];
    open(&pg, &accounts[0]).await;
    w.emit_burns(10, |i| i + 1).await;
    let app = w
        .config()
        .stream(|s| {
            s.gapfill.max_attempts = 2;
            s.gapfill.backoff = Duration::from_millis(1);
            s.gapfill.backoff_max = Duration::from_millis(1);
        })
        .replica("r")
        .await;
    app.tick_until_idle().await;
    // Blocks 4..=7 become a pending range (their credits undone with them).
    pg.batch_execute(
        "DELETE FROM events WHERE block_number BETWEEN 4 AND 7;
         INSERT INTO failed_ranges (stream, from_block, to_block, last_error) VALUES ('burns', 4, 7, 'test gap');
         ALTER TABLE balances RENAME TO balances_away",
    )
    .await
    .expect("a gap, and the table gone");

    let filler = app.gap_filler().expect("gap filler");
    three_failed_gap_fills("three failed attempts", filler, |dead, error| {
        assert!(!dead, "never dead for the deployment's fault: {error}");
        assert!(error.contains("42P01"), "{error}");
    })
    .await;

    pg.batch_execute("ALTER TABLE balances_away RENAME TO balances")
        .await
        .expect("bring the table back");
    gap_fill_until_filled(filler).await;
    let head = w.chain.block_number().await;
    w.assert_stored_equals_chain(&pg).await;
    assert_eq!(dead_letter_count(&pg).await, 0);
    assert_eq!(
        balances(&pg).await,
        expected(&burns_on_chain(&w.chain, &w.emitter, head).await, &accounts),
        "every burn credited once"
    );
}
