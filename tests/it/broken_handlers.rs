//! Handlers broken by their deployment, not by an event: nothing is parked,
//! the tick rolls back, and the stream goes on where it stopped once the
//! deployment is mended (I10: effects exactly once, never skipped).
//!
//! - a trigger whose table is gone (SQLSTATE class 42, like a revoked grant
//!   or a dropped function) would fail on every event: it is not a reason
//!   to park them all;
//! - a Rust handler that awaits something that never comes is abandoned at
//!   the stream's `statement_timeout`, as its SQL `handler_function` would
//!   be, so it cannot hold the cursor lock and a tick permit forever.

use std::sync::Arc;
use std::time::Duration;

use logcursor::app::{App, BuildOptions, HandlerMap};
use logcursor::poller::TickError;
use logcursor::{Event, Handler, HandlerError, Transaction};
use tokio_util::sync::CancellationToken;

use crate::handlers::{balances, burns_on_chain, expected, open, Credit};
use crate::support::*;

async fn dead_letters(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .expect("count dead letters")
        .get(0)
}

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
    assert_eq!(dead_letters(&pg).await, 0, "no event is parked for the schema's fault");
    assert_eq!(cursor_of(&pg, "burns").await, Some(-1), "nothing committed");

    pg.batch_execute("ALTER TABLE balances_away RENAME TO balances")
        .await
        .expect("bring the table back");
    app.tick_until_idle().await;
    let head = w.chain.block_number().await;
    assert_eq!(dead_letters(&pg).await, 0);
    w.assert_stored_equals_chain(&pg).await;
    assert_eq!(
        balances(&pg).await,
        expected(&burns_on_chain(&w.chain, &w.emitter, head).await, &accounts),
        "every burn credited once"
    );
}

/// A handler waiting on a service that never answers.
struct Hangs;

#[logcursor::async_trait]
impl Handler for Hangs {
    async fn handle(&self, _tx: &Transaction<'_>, _events: &[Event]) -> Result<(), HandlerError> {
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_handler_that_never_returns_is_abandoned_at_statement_timeout_and_parks_nothing() {
    let w = World::new().await;
    w.emit_burns(3, |_| 2).await;
    let pg = w.migrate().await;
    let cfg = w
        .config()
        .database(|d| d.limits.statement_timeout = Duration::from_millis(500))
        .build();
    let mut handlers = HandlerMap::new();
    let h: Arc<dyn Handler> = Arc::new(Hangs);
    handlers.insert("burns".into(), vec![h]);
    let app = App::build_with(
        &cfg,
        "r",
        BuildOptions { migrate: true },
        &handlers,
        &CancellationToken::new(),
    )
    .await
    .expect("build");

    // Twice: the first abandoned call gave its permit and lock back.
    for attempt in 0..2 {
        let failed = failing_tick(&app, Duration::from_secs(30)).await;
        assert!(
            failed.to_string().contains("did not finish within 500ms"),
            "attempt {attempt}: {failed}"
        );
    }
    assert_eq!(dead_letters(&pg).await, 0, "nothing parked");
    assert_eq!(cursor_of(&pg, "burns").await, Some(-1), "nothing committed");
    assert_eq!(count_events(&pg).await, 0, "no event stored without its effect");
}
