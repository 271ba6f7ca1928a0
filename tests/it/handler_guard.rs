//! I10 across programs: once a stream's events were written with a Rust
//! handler, a program that does not run it (the stock binary, an older
//! build) writes nothing to the stream — no tick, no rewind, no start —
//! and says which handler it lacks; `retire-handler` lets it write again.

use std::sync::Arc;

use logcursor::app::{App, BuildOptions, HandlerMap};
use logcursor::{Event, Handler, HandlerError, Transaction};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Records every event it is given.
struct Touch;

#[logcursor::async_trait]
impl Handler for Touch {
    async fn handle(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
        for e in events {
            tx.execute("INSERT INTO touched VALUES ($1)", &[&e.id]).await?;
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
        &w.config().build(),
        name,
        BuildOptions { migrate: true },
        handlers,
        &CancellationToken::new(),
    )
    .await
}

async fn touched(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one("SELECT count(*) FROM touched", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_without_the_streams_rust_handler_writes_nothing_and_names_it() {
    let w = World::new().await;
    w.emit_burns(3, |_| 1).await;
    let pg = w.migrate().await;
    pg.batch_execute("CREATE TABLE touched (event_id bigint)")
        .await
        .expect("effects table");
    // A replica of the stock program, started before the application ever
    // wrote the stream (an old replica during a rolling update).
    let stock = build(&w, "stock", &HandlerMap::new())
        .await
        .expect("nothing recorded yet");
    let mut with_touch = HandlerMap::new();
    with_touch.insert("burns".into(), vec![Arc::new(Touch) as Arc<dyn Handler>]);
    let app = build(&w, "app", &with_touch).await.expect("build");
    app.tick_until_idle().await;
    assert_eq!((count_events(&pg).await, touched(&pg).await), (3, 3));
    let recorded: Vec<String> = pg
        .query_one("SELECT rust_handlers FROM block_cursors WHERE id = 'burns'", &[])
        .await
        .expect("record")
        .get(0);
    assert_eq!(recorded, ["Touch"], "named after its type");

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
