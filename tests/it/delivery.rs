//! Delivery beyond the database: commit notifications and durable SQL
//! consumers. Webhooks through the outbox are in `webhooks.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::poll_fn;
use serde_json::Value;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_stores_rows_notifies_its_stream_channel_and_an_idle_tick_does_not() {
    let w = World::new().await;
    let app = w.replica("r").await;
    let (listener, mut conn) = tokio_postgres::connect(&w.db.url, NoTls).await.expect("connect");
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = poll_fn(|cx| conn.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN \"public.burns\"").await.expect("listen");

    w.emit_burns(3, |_| 2).await;
    app.tick_until_idle().await;
    let (channel, payload) = tokio::time::timeout(Duration::from_secs(10), notes.recv())
        .await
        .expect("a notification within 10 s")
        .expect("one");
    assert_eq!(channel, "public.burns");
    let p: Value = serde_json::from_str(&payload).expect("json payload");
    assert_eq!(p["stream"], "burns");
    assert_eq!(p["rows"], 6, "{p}");
    assert!(p["from"].as_u64() <= p["to"].as_u64(), "{p}");

    // An idle tick commits nothing and says nothing.
    app.tick_until_idle().await;
    listener.batch_execute("SELECT 1").await.expect("round trip");
    assert!(notes.try_recv().is_err(), "no notification without stored rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_apply_each_event_exactly_once_while_gap_fill_stores_an_older_range() {
    let w = World::new().await;
    w.emit_burns(30, |i| i % 3 + 1).await;
    let app = w.replica("seed").await;
    app.tick_until_idle().await;
    let pg = w.pg().await;
    // Three ranges become gaps that gap fill stores later, in transactions
    // newer than every row the consumers have seen.
    for (f, t) in [(3i64, 6i64), (12, 14), (20, 25)] {
        pg.execute("DELETE FROM events WHERE block_number BETWEEN $1 AND $2", &[&f, &t])
            .await
            .expect("gap");
        pg.execute(
            "INSERT INTO failed_ranges (stream, from_block, to_block, last_error) VALUES ('burns', $1, $2, 'test gap')",
            &[&f, &t],
        )
        .await
        .expect("failed range");
    }
    pg.batch_execute("CREATE TABLE applied (tx_hash bytea, log_index int, by_consumer int)")
        .await
        .expect("effects table");

    let stop = tokio_util::sync::CancellationToken::new();
    let mut consumers = Vec::new();
    for me in 0..2i32 {
        let (url, stop) = (w.db.url.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            let mut c = connect(&url).await;
            while !stop.is_cancelled() {
                let tx = c.transaction().await.expect("begin");
                let rows = tx
                    .query(
                        "SELECT tx_hash, log_index FROM logcursor_claim('ledger', 'burns', 4)",
                        &[],
                    )
                    .await
                    .expect("claim");
                for r in &rows {
                    let (hash, index): (Vec<u8>, i32) = (r.get(0), r.get(1));
                    tx.execute("INSERT INTO applied VALUES ($1, $2, $3)", &[&hash, &index, &me])
                        .await
                        .expect("apply");
                }
                tx.commit().await.expect("commit");
                if rows.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let applied = || async {
        let n: i64 = pg
            .query_one("SELECT count(*) FROM applied", &[])
            .await
            .expect("count")
            .get(0);
        n
    };
    let stored: i64 = pg
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .expect("count")
        .get(0);
    wait_for(
        "the consumers to apply what is stored",
        Duration::from_secs(30),
        || async { (applied().await == stored).then_some(()) },
    )
    .await;
    let filler = app.gap_filler().expect("gap filler");
    loop {
        match filler.work_once().await.expect("gap fill") {
            logcursor::poller::gapfill::GapOutcome::Idle => break,
            logcursor::poller::gapfill::GapOutcome::Filled { .. }
            | logcursor::poller::gapfill::GapOutcome::Progressed { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let head = w.chain.block_number().await;
    let on_chain = w.chain.burned_logs(&w.emitter, head).await;
    wait_for(
        "the consumers to apply the filled ranges",
        Duration::from_secs(30),
        || async { (applied().await == on_chain.len() as i64).then_some(()) },
    )
    .await;
    stop.cancel();
    for c in consumers {
        c.await.expect("consumer");
    }
    let twice: i64 = pg
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM applied GROUP BY tx_hash, log_index HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(twice, 0, "no event applied twice");
    let got: BTreeSet<(String, i64)> = pg
        .query(
            "SELECT '0x' || encode(tx_hash, 'hex'), log_index::int8 FROM applied",
            &[],
        )
        .await
        .expect("applied")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: BTreeSet<(String, i64)> = on_chain.into_iter().map(|(tx, i, _)| (tx, i)).collect();
    assert_eq!(
        got, want,
        "every event applied exactly once, the older ones stored later included"
    );
    let by: Vec<i32> = pg
        .query("SELECT DISTINCT by_consumer FROM applied ORDER BY 1", &[])
        .await
        .expect("by")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!by.is_empty());

    // /metrics: the consumer's lag is what was stored after its position.
    let lag = || async {
        let text = app.registry().encode().await;
        text.lines()
            .find_map(|l| l.strip_prefix("logcursor_consumer_lag_rows{consumer=\"ledger\",stream=\"burns\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    assert_eq!(lag().await, Some(0.0), "caught up");
    let more = w.emit_burns(2, |_| 3).await;
    app.tick_until_idle().await;
    assert_eq!(lag().await, Some(more as f64), "the rows stored since");
}
