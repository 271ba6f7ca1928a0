//! Rewinds reach SQL consumers: a removed event a consumer applied comes
//! back once through `logcursor_claim_reverts`, one it never applied does
//! not, and `logcursor_claim` never moves a position past a removal not yet
//! resolved (sql/0009, `src/store/consumers.rs`). The effects are rows of
//! `applied`, whose primary key refuses a second application.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// How long a claim may wait for the cluster's oldest running transaction:
/// other tests hold one open for up to their idle bounds (15–20 s) at times.
const PATIENCE: Duration = Duration::from_secs(120);

/// The consumers' effects table.
async fn with_applied_table(pg: &tokio_postgres::Client) {
    pg.batch_execute("CREATE TABLE applied (tx_hash bytea, log_index int, PRIMARY KEY (tx_hash, log_index))")
        .await
        .expect("effects table");
}

/// (tx hash, log index) of every row of `query`'s result.
async fn keys(pg: &tokio_postgres::Client, query: &str) -> BTreeSet<(Vec<u8>, i32)> {
    pg.query(query, &[])
        .await
        .expect("keys")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// One consumer transaction, as the README shows it: claim the removed
/// events to undo and undo each (exactly one applied row goes), then claim
/// up to `n` new ones and apply each (a primary key refuses a second
/// application). Returns (undone, applied).
async fn consume(c: &mut tokio_postgres::Client, name: &str, n: i32) -> (usize, usize) {
    let tx = c.transaction().await.expect("begin");
    let (undone, applied) = consume_in(&tx, name, n).await;
    tx.commit().await.expect("commit");
    (undone, applied)
}

async fn consume_in(tx: &tokio_postgres::Transaction<'_>, name: &str, n: i32) -> (usize, usize) {
    let undo = tx
        .query(
            "SELECT tx_hash, log_index FROM logcursor_claim_reverts($1, 'burns', $2)",
            &[&name, &n],
        )
        .await
        .expect("claim reverts");
    for r in &undo {
        let (hash, index): (Vec<u8>, i32) = (r.get(0), r.get(1));
        let gone = tx
            .execute(
                "DELETE FROM applied WHERE tx_hash = $1 AND log_index = $2",
                &[&hash, &index],
            )
            .await
            .expect("undo");
        assert_eq!(gone, 1, "an effect is undone once, and only one that was applied");
    }
    let new = tx
        .query(
            "SELECT tx_hash, log_index FROM logcursor_claim($1, 'burns', $2)",
            &[&name, &n],
        )
        .await
        .expect("claim");
    for r in &new {
        let (hash, index): (Vec<u8>, i32) = (r.get(0), r.get(1));
        tx.execute("INSERT INTO applied VALUES ($1, $2)", &[&hash, &index])
            .await
            .expect("apply once");
    }
    (undo.len(), new.len())
}

/// Consumer transactions of up to `n` rows until `want` (undone, applied)
/// is reached in all; never more. Claims wait for the cluster's oldest
/// running transaction, which other tests' transactions hold back at times.
async fn consume_until(c: &mut tokio_postgres::Client, name: &str, n: i32, want: (usize, usize)) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut got = (0, 0);
    while got != want {
        assert!(tokio::time::Instant::now() < deadline, "got {got:?} of {want:?}");
        let (u, a) = consume(c, name, n).await;
        got = (got.0 + u, got.1 + a);
        assert!(got.0 <= want.0 && got.1 <= want.1, "got {got:?}, more than {want:?}");
        if (u, a) == (0, 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A rewind removes events a SQL consumer applied, some in a claim still in
/// flight when the rewind commits (the rewind waits for no consumer). The
/// consumer cannot claim past them before undoing: each removed event it
/// applied comes back once, whole, through `logcursor_claim_reverts`; those
/// it never claimed do not; and after the new rows are claimed its effects
/// equal the stored events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_gives_a_consumer_back_exactly_the_removed_events_it_applied_even_from_a_claim_in_flight() {
    let w = World::new().await;
    w.emit_burns(20, |_| 1).await; // one event a block
    let app = w.replica("r").await;
    app.tick_until_idle().await;
    let pg = w.pg().await;
    with_applied_table(&pg).await;
    let rows: Vec<(i64, Value)> = pg
        .query(
            "SELECT block_number, to_jsonb(e) FROM events e ORDER BY inserted_xid, id",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 20);

    let mut consumer = connect(&w.db.url).await;
    consume_until(&mut consumer, "ledger", 12, (0, 12)).await;
    // A claim of the next four, still in flight when the rewind commits.
    let mut in_flight = connect(&w.db.url).await;
    let claim = in_flight.transaction().await.expect("begin");
    assert_eq!(
        consume_in(&claim, "ledger", 4).await,
        (0, 4),
        "rows below the horizon already"
    );

    let to = rows[9].0; // removes the 11th event on: 2 applied, 4 in flight, 4 never claimed
    let r = logcursor::admin::rewind(&w.config().build(), "operator", &Default::default(), "burns", to)
        .await
        .expect("the rewind waits for no consumer");
    assert_eq!(r.events_deleted, 10);
    claim.commit().await.expect("commit the claim in flight");
    app.tick_until_idle().await; // the same blocks again, as new rows

    // Claiming new rows before undoing is refused, naming what to call.
    let refused = wait_for("the claim to see the removal", PATIENCE, || async {
        match consumer
            .query("SELECT 1 FROM logcursor_claim('ledger', 'burns', 100)", &[])
            .await
        {
            Err(e) => Some(e),
            Ok(got) => {
                assert!(got.is_empty(), "no row is claimed before the undo");
                None
            }
        }
    })
    .await;
    let db_error = refused.as_db_error().expect("a database error");
    assert_eq!(db_error.code().code(), "55000");
    assert!(
        db_error.message().contains("logcursor_claim_reverts"),
        "{}",
        db_error.message()
    );

    // The undo: exactly the six applied, each whole, once.
    let tx = consumer.transaction().await.expect("begin");
    let undo: Vec<Value> = tx
        .query(
            "SELECT to_jsonb(r) FROM logcursor_claim_reverts('ledger', 'burns', 100) r",
            &[],
        )
        .await
        .expect("claim reverts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let applied_then_removed: Vec<Value> = rows[10..16].iter().rev().map(|(_, e)| e.clone()).collect();
    assert_eq!(
        undo, applied_then_removed,
        "the removed rows as they were, most recently applied first"
    );
    tx.rollback().await.expect("roll back: the same six come back");
    consume_until(&mut consumer, "ledger", 100, (6, 10)).await; // fails on more than six, or on a second application
    assert_eq!(consume(&mut consumer, "ledger", 100).await, (0, 0), "nothing twice");

    assert_eq!(
        keys(&pg, "SELECT tx_hash, log_index FROM applied").await,
        keys(&pg, "SELECT tx_hash, log_index FROM events").await,
        "the consumer's effects are exactly the stored events"
    );
    let listed = logcursor::admin::delivery::consumers_list(&w.config().build(), "list")
        .await
        .expect("consumers list");
    assert_eq!((listed[0].lag, listed[0].reverts), (0, 0));
}

/// More applied events are removed than one transaction undoes: the
/// README's pattern (undo, then claim, in one transaction) goes on over
/// several transactions and ends, each effect undone once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_removed_events_than_one_transaction_undoes_are_undone_over_several() {
    let w = World::new().await;
    w.emit_burns(3, |_| 50).await; // 150 events in three blocks
    let app = w.replica("r").await;
    app.tick_until_idle().await;
    let pg = w.pg().await;
    with_applied_table(&pg).await;
    let mut consumer = connect(&w.db.url).await;
    consume_until(&mut consumer, "ledger", 100, (0, 150)).await;

    let first: i64 = pg
        .query_one("SELECT min(block_number) FROM events", &[])
        .await
        .expect("first block")
        .get(0);
    let r = logcursor::admin::rewind(&w.config().build(), "operator", &Default::default(), "burns", first - 1)
        .await
        .expect("rewind");
    assert_eq!(r.events_deleted, 150);
    app.tick_until_idle().await; // the same 150 again, as new rows
                                 // 100 at a time: fails on more, or on a second undo or application.
    consume_until(&mut consumer, "ledger", 100, (150, 150)).await;
    assert_eq!(
        keys(&pg, "SELECT tx_hash, log_index FROM applied").await,
        keys(&pg, "SELECT tx_hash, log_index FROM events").await
    );
}

/// A second process on the same consumer gets nothing at once, rather than
/// waiting for the first one's transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_consumer_gets_nothing_at_once_while_the_first_holds_it() {
    let w = World::new().await;
    w.emit_burns(4, |_| 1).await;
    w.replica("r").await.tick_until_idle().await;
    let pg = w.pg().await;
    with_applied_table(&pg).await;
    consume_until(&mut connect(&w.db.url).await, "ledger", 2, (0, 2)).await;

    let mut first = connect(&w.db.url).await;
    let holding = first.transaction().await.expect("begin");
    assert_eq!(
        consume_in(&holding, "ledger", 1).await,
        (0, 1),
        "the first moves the position"
    );
    let second = connect(&w.db.url).await;
    second
        .batch_execute("SET statement_timeout = '2s'")
        .await
        .expect("a bound on waiting");
    for call in [
        "SELECT 1 FROM logcursor_claim('ledger', 'burns', 10)",
        "SELECT 1 FROM logcursor_claim_reverts('ledger', 'burns', 10)",
    ] {
        let got = second.query(call, &[]).await.unwrap_or_else(|e| panic!("{call}: {e}"));
        assert!(got.is_empty(), "{call}: nothing while the first holds the consumer");
    }
    holding.commit().await.expect("commit");
}

/// A new consumer's first claim is in flight (its row not yet visible to
/// anyone) across two rewinds: neither deletes the first one's removals,
/// so the events it applied come back once it commits, and those of the
/// second rewind, which it never applied, do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_consumer_whose_first_claim_spans_two_rewinds_undoes_what_it_applied() {
    let w = World::new().await;
    w.emit_burns(10, |_| 1).await; // one event a block
    let app = w.replica("r").await;
    app.tick_until_idle().await;
    let pg = w.pg().await;
    with_applied_table(&pg).await;
    let blocks: Vec<i64> = pg
        .query("SELECT block_number FROM events ORDER BY block_number", &[])
        .await
        .expect("blocks")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let to = blocks[4]; // the last five events go

    // Claims read below the cluster's oldest running transaction, which
    // other tests hold back at times: wait until all ten are below it.
    wait_for("the events below the horizon", PATIENCE, || async {
        let below: i64 = pg
            .query_one(
                "SELECT count(*) FROM events WHERE inserted_xid < pg_snapshot_xmin(pg_current_snapshot())",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        (below == 10).then_some(())
    })
    .await;
    let mut fresh = connect(&w.db.url).await;
    let first_claim = fresh.transaction().await.expect("begin");
    let (_, applied) = consume_in(&first_claim, "fresh", 100).await;
    assert_eq!(applied, 10, "a new consumer's first claim, in flight");
    let cfg = w.config().build();
    for _ in 0..2 {
        logcursor::admin::rewind(&cfg, "operator", &Default::default(), "burns", to)
            .await
            .expect("rewind");
        app.tick_until_idle().await; // the five again, as new rows
    }
    first_claim.commit().await.expect("commit the first claim");

    // Five undone (the first rewind's); the second rewind's five were never
    // applied; then the five stored last are applied.
    consume_until(&mut fresh, "fresh", 100, (5, 5)).await;
    assert_eq!(
        keys(&pg, "SELECT tx_hash, log_index FROM applied").await,
        keys(&pg, "SELECT tx_hash, log_index FROM events").await
    );
}

/// Claims refuse what would break them: a transaction older than READ
/// COMMITTED (its snapshot could hold events a rewind removed without
/// keeping them), and fewer than one row asked for (no progress, ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_refuse_a_repeatable_read_snapshot_and_fewer_than_one_row() {
    let w = World::new().await;
    let mut pg = w.migrate().await;
    let tx = pg
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .expect("begin");
    let refused = tx
        .query("SELECT 1 FROM logcursor_claim('ledger', 'burns', 10)", &[])
        .await
        .expect_err("REPEATABLE READ is refused");
    assert_eq!(refused.code().map(|c| c.code()), Some("25000"), "{refused}");
    tx.rollback().await.expect("rollback");
    for call in [
        "SELECT 1 FROM logcursor_claim('ledger', 'burns', 0)",
        "SELECT 1 FROM logcursor_claim_reverts('ledger', 'burns', NULL)",
    ] {
        let refused = pg.query(call, &[]).await.expect_err(call);
        assert_eq!(refused.code().map(|c| c.code()), Some("22023"), "{call}: {refused}");
    }
}

/// Resolved removals go at the next rewind that finds no claim in flight;
/// one a consumer has not resolved yet stays; and claiming reverts for two
/// consumers in one transaction lets each claim go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_go_once_every_consumer_resolved_them_and_two_consumers_share_a_transaction() {
    let w = World::new().await;
    w.emit_burns(6, |_| 1).await;
    let app = w.replica("r").await;
    app.tick_until_idle().await;
    let pg = w.pg().await;
    with_applied_table(&pg).await;
    pg.batch_execute("CREATE TABLE applied_b (LIKE applied INCLUDING ALL)")
        .await
        .expect("b's effects table");
    let kept = || async {
        let n: i64 = pg
            .query_one("SELECT count(*) FROM removed_events", &[])
            .await
            .expect("count")
            .get(0);
        n
    };
    let to: i64 = pg
        .query_one("SELECT max(block_number) - 3 FROM events", &[])
        .await
        .expect("to")
        .get(0);
    let (mut a, b) = (connect(&w.db.url).await, connect(&w.db.url).await);
    consume_until(&mut a, "ledger", 100, (0, 6)).await;
    wait_for("b to claim all six", PATIENCE, || async {
        let got = b
            .query(
                "SELECT tx_hash, log_index FROM logcursor_claim('other', 'burns', 100)",
                &[],
            )
            .await
            .expect("claim");
        (!got.is_empty()).then_some(())
    })
    .await;
    let cfg = w.config().build();
    let rewind = || async {
        logcursor::admin::rewind(&cfg, "operator", &Default::default(), "burns", to)
            .await
            .expect("rewind");
        app.tick_until_idle().await;
    };

    rewind().await;
    assert_eq!(kept().await, 3, "the three removed, kept once for both consumers");
    // Both claim reverts in one transaction, one at a time: each one's claim
    // then returns nothing rather than raising, and the next transaction
    // goes on. (Once the removals are below the horizon: resolvable.)
    wait_for("the removals below the horizon", PATIENCE, || async {
        let below: bool = pg
            .query_one(
                "SELECT bool_and(removed_xid < pg_snapshot_xmin(pg_current_snapshot())) FROM removed_events",
                &[],
            )
            .await
            .expect("horizon")
            .get(0);
        below.then_some(())
    })
    .await;
    let tx = a.transaction().await.expect("begin");
    for name in ["ledger", "other"] {
        let got = tx
            .query("SELECT 1 FROM logcursor_claim_reverts($1, 'burns', 1)", &[&name])
            .await
            .expect("claim reverts");
        assert_eq!(got.len(), 1, "{name}");
    }
    let more = tx
        .query("SELECT 1 FROM logcursor_claim('ledger', 'burns', 100)", &[])
        .await
        .expect("no error after claim_reverts in this transaction");
    assert!(more.is_empty(), "nothing claimed while reverts wait");
    tx.rollback().await.expect("rollback");
    consume_until(&mut a, "ledger", 100, (3, 3)).await; // ledger resolved; other has not

    rewind().await;
    assert_eq!(kept().await, 6, "other has not resolved the first three: nothing goes");
    // other undoes the first rewind's three and passes over the second's,
    // once each is below the horizon.
    let undone = std::sync::atomic::AtomicUsize::new(0);
    wait_for("other to resolve both rewinds", PATIENCE, || async {
        let got = b
            .query("SELECT 1 FROM logcursor_claim_reverts('other', 'burns', 100)", &[])
            .await
            .expect("claim reverts");
        undone.fetch_add(got.len(), std::sync::atomic::Ordering::SeqCst);
        let pending: i64 = b
            .query_one(
                "SELECT count(*) FROM removed_events r, consumers k
                  WHERE k.name = 'other' AND (r.removed_xid, r.id) > (k.removed_after_xid, k.removed_after_id)",
                &[],
            )
            .await
            .expect("pending")
            .get(0);
        (pending == 0).then_some(())
    })
    .await;
    assert_eq!(
        undone.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "only what other applied"
    );
    consume_until(&mut a, "ledger", 100, (3, 3)).await;

    rewind().await;
    assert_eq!(
        kept().await,
        3,
        "the six both resolved went; the third rewind's three stay"
    );
}
