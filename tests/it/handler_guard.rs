//! I10 across programs: once a stream's events were written with a Rust
//! handler, a program that does not run it (the stock binary, an older
//! build) writes nothing to the stream — no tick, no rewind, no start —
//! and says which handler it lacks; `retire-handler` lets it write again.

use std::sync::Arc;
use std::time::Duration;

use logcursor::app::{App, BuildOptions, HandlerMap};
use logcursor::{Event, Handler, HandlerError, Transaction};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Records every event it is given, with its amount.
struct Touch;

#[logcursor::async_trait]
impl Handler for Touch {
    async fn handle(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
        for e in events {
            let amount = e.params["amount"].as_str().unwrap_or("0");
            tx.execute("INSERT INTO touched VALUES ($1, $2::text::numeric)", &[&e.id, &amount])
                .await?;
        }
        Ok(())
    }

    async fn revert(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        tx.execute("DELETE FROM touched WHERE event_id = ANY($1)", &[&ids])
            .await?;
        Ok(())
    }
}

async fn build(w: &World, name: &str, handlers: &HandlerMap) -> Result<App, logcursor::app::AppError> {
    App::build_with(
        &w.config()
            .stream(|s| {
                s.gapfill.max_attempts = 2;
                s.gapfill.backoff = Duration::from_millis(1);
                s.gapfill.backoff_max = Duration::from_millis(1);
            })
            .build(),
        name,
        BuildOptions { migrate: true },
        handlers,
        &CancellationToken::new(),
    )
    .await
}

fn with_touch() -> HandlerMap {
    let mut handlers = HandlerMap::new();
    handlers.insert("burns".into(), vec![Arc::new(Touch) as Arc<dyn Handler>]);
    handlers
}

async fn touched(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one("SELECT count(*) FROM touched", &[])
        .await
        .expect("count")
        .get(0)
}

/// The Rust handlers the stream's cursor row records.
async fn recorded(pg: &tokio_postgres::Client) -> Vec<String> {
    pg.query_one("SELECT rust_handlers FROM block_cursors WHERE id = 'burns'", &[])
        .await
        .expect("record")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_without_the_streams_rust_handler_writes_nothing_and_names_it() {
    let w = World::new().await;
    w.emit_burns(3, |_| 1).await;
    let pg = w.migrate().await;
    pg.batch_execute("CREATE TABLE touched (event_id bigint, amount numeric)")
        .await
        .expect("effects table");
    // A replica of the stock program, started before the application ever
    // wrote the stream (an old replica during a rolling update).
    let stock = build(&w, "stock", &HandlerMap::new())
        .await
        .expect("nothing recorded yet");
    let app = build(&w, "app", &with_touch()).await.expect("build");
    app.tick_until_idle().await;
    assert_eq!((count_events(&pg).await, touched(&pg).await), (3, 3));
    assert_eq!(recorded(&pg).await, ["Touch"], "named after its type");

    // New events: the stock replica stores none of them.
    w.emit_burns(2, |_| 1).await;
    let cursor = cursor_of(&pg, "burns").await;
    let failed = stock
        .tick_once()
        .await
        .expect_err("the stock replica refuses")
        .to_string();
    assert!(
        failed.contains("[\"Touch\"]") && failed.contains("retire-handler"),
        "names the handler and the way out: {failed}"
    );
    assert_eq!(count_events(&pg).await, 3, "no event stored without its effect");
    assert_eq!(cursor_of(&pg, "burns").await, cursor, "the cursor did not move");
    // Nor does it start again, or rewind.
    let refused = build(&w, "stock-2", &HandlerMap::new())
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        refused.as_deref().is_some_and(|e| e.contains("[\"Touch\"]")),
        "{refused:?}"
    );
    let rewound = logcursor::admin::rewind(&w.config().build(), "op", &HandlerMap::new(), "burns", 0).await;
    assert!(
        rewound.as_ref().is_err_and(|e| e.to_string().contains("[\"Touch\"]")),
        "a rewind would remove events without their undo: {:?}",
        rewound.map(|r| r.to)
    );
    assert_eq!(count_events(&pg).await, 3);

    // The application stores them, each with its effect.
    app.tick_until_idle().await;
    assert_eq!((count_events(&pg).await, touched(&pg).await), (5, 5));

    // Retired on purpose, the handler no longer holds the stream.
    let cfg = w.config().build();
    let unknown = logcursor::admin::retire_handlers(&cfg, "op", "burns", &["Credit".into()]).await;
    assert!(
        unknown.is_err_and(|e| e.to_string().contains("no Rust handler named \"Credit\"")),
        "a name the stream does not record"
    );
    let left = logcursor::admin::retire_handlers(&cfg, "op", "burns", &["Touch".into()])
        .await
        .expect("retire");
    assert!(left.is_empty(), "{left:?}");
    w.emit_burns(1, |_| 1).await;
    stock.tick_until_idle().await;
    assert_eq!((count_events(&pg).await, touched(&pg).await), (6, 5));
    w.assert_stored_equals_chain(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_fill_and_dlq_replay_without_the_handler_refuse_and_give_nothing_up() {
    let w = World::new().await;
    w.emit_burns(4, |_| 3).await; // amounts 0..=11, three per block
    let pg = w.migrate().await;
    pg.batch_execute("CREATE TABLE touched (event_id bigint, amount numeric CHECK (amount <> 7))")
        .await
        .expect("effects table, refusing amount 7");
    let stock = build(&w, "stock", &HandlerMap::new())
        .await
        .expect("nothing recorded yet");
    // The application records its handler as it starts, before any write.
    let app = build(&w, "app", &with_touch()).await.expect("build");
    assert_eq!(recorded(&pg).await, ["Touch"]);
    app.tick_until_idle().await;
    assert_eq!(dead_letter_count(&pg).await, 1, "amount 7 parked by its handler");
    assert_eq!((count_events(&pg).await, touched(&pg).await), (11, 11));

    // The stock program's dlq replay would store it without its effect.
    pg.batch_execute("ALTER TABLE touched DROP CONSTRAINT touched_amount_check")
        .await
        .expect("accept amount 7");
    let cfg = w.config().build();
    let refused = logcursor::admin::dlq_replay(&cfg, "op", &HandlerMap::new(), &[]).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.to_string().contains("[\"Touch\"]")),
        "{:?}",
        refused.map(|r| r.stored)
    );
    assert_eq!((dead_letter_count(&pg).await, count_events(&pg).await), (1, 11));
    let replayed = logcursor::admin::dlq_replay(&cfg, "op", &with_touch(), &[])
        .await
        .expect("replay");
    assert_eq!(replayed.stored.len(), 1);
    assert_eq!((count_events(&pg).await, touched(&pg).await), (12, 12));

    // A range to fill again, with its effects gone with its events.
    pg.batch_execute(
        "DELETE FROM touched WHERE event_id IN (SELECT id FROM events WHERE block_number BETWEEN 3 AND 4);
         DELETE FROM events WHERE block_number BETWEEN 3 AND 4;
         INSERT INTO failed_ranges (stream, from_block, to_block, last_error) VALUES ('burns', 3, 4, 'test gap')",
    )
    .await
    .expect("a gap");
    let left = count_events(&pg).await;
    let stock_filler = stock.gap_filler().expect("gap filler");
    three_failed_gap_fills("three refused attempts", stock_filler, |dead, error| {
        assert!(!dead, "never given up for a missing handler: {error}");
        assert!(error.contains("[\"Touch\"]"), "{error}");
    })
    .await;
    assert_eq!(count_events(&pg).await, left, "the stock program filled nothing");
    gap_fill_until_filled(app.gap_filler().expect("gap filler")).await;
    assert_eq!((count_events(&pg).await, touched(&pg).await), (12, 12));
    w.assert_stored_equals_chain(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handlers_of_a_stream_may_not_share_a_name() {
    let w = World::new().await;
    let mut twice = HandlerMap::new();
    twice.insert(
        "burns".into(),
        vec![Arc::new(Touch) as Arc<dyn Handler>, Arc::new(Touch) as Arc<dyn Handler>],
    );
    let refused = build(&w, "app", &twice).await.err().map(|e| e.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("two Rust handlers named \"Touch\"")),
        "{refused:?}"
    );
}
