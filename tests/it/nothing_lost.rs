//! Nothing lost, nothing stuck: dead letters and their replay.

use std::time::Duration;

use logcursor::admin;
use logcursor::app::App;
use logcursor::poller::TickOutcome;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::proxy::{method_of, Action, Proxy};
use crate::support::*;

/// Corrupts, in every eth_getLogs answer, log 0 of `wrong_topics` (drops
/// its indexed topic) and log 1 of `short_data` (cuts its data short).
fn corrupt(proxy: &Proxy, wrong_topics: String, short_data: String) {
    proxy.set(move |r| {
        if method_of(r) != "eth_getLogs" {
            return Action::Forward;
        }
        let (wt, sd) = (wrong_topics.clone(), short_data.clone());
        Action::Rewrite(Box::new(move |mut v: Value| {
            for log in v["result"].as_array_mut().into_iter().flatten() {
                let (tx, index) = (
                    log["transactionHash"].as_str().unwrap_or(""),
                    log["logIndex"].as_str().unwrap_or(""),
                );
                if tx == wt && index == "0x0" {
                    log["topics"] = json!([log["topics"][0]]);
                } else if tx == sd && index == "0x1" {
                    log["data"] = json!("0x0102030405");
                }
            }
            v
        }))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_logs_become_whole_dead_letters_and_replay_stores_them_once_the_source_is_fixed() {
    let w = World::new().await;
    w.emit_burns(5, |_| 2).await;
    let wrong_topics = w.chain.burn(&w.emitter, 2, 100).await;
    let short_data = w.chain.burn(&w.emitter, 2, 200).await;
    w.emit_burns(5, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    corrupt(&proxy, wrong_topics.clone(), short_data.clone());
    let cfg = w.config().rpc(&proxy.url).build();
    let app = build_app(&cfg, "r").await;
    let outcomes = app.tick_until_idle().await;
    let parked: usize = outcomes
        .iter()
        .map(|o| match o {
            TickOutcome::Advanced { dead_lettered, .. } => *dead_lettered,
            _ => 0,
        })
        .sum();
    assert_eq!(parked, 2);

    let pg = w.pg().await;
    let head = w.chain.block_number().await;
    assert_eq!(
        cursor_of(&pg, "burns").await,
        Some(head),
        "the cursor passes the bad logs"
    );
    let all_logs = w.chain.burned_logs(&w.emitter, head).await;
    let stored = stored_logs(&pg).await;
    assert_eq!(stored.len(), all_logs.len() - 2, "every other event is stored");
    let rows = pg
        .query(
            "SELECT '0x' || encode(tx_hash, 'hex'), log_index, cardinality(topics), '0x' || encode(data, 'hex'), error, attempts
               FROM dead_letters ORDER BY id",
            &[],
        )
        .await
        .expect("dead letters");
    let got: Vec<(String, i32, i32, String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(5)))
        .collect();
    assert_eq!(
        got,
        vec![
            (wrong_topics.clone(), 0, 1, format!("0x{:064x}", 100), 1),
            (short_data.clone(), 1, 2, "0x0102030405".to_string(), 1),
        ],
        "the raw logs are kept whole, as received"
    );
    let errors: Vec<String> = rows.iter().map(|r| r.get(4)).collect();
    assert!(errors[0].contains("expected 2 topics, log has 1"), "{errors:?}");
    assert!(errors[1].contains("does not decode"), "{errors:?}");

    let still = admin::dlq_replay(&cfg, "operator", &Default::default(), &[])
        .await
        .expect("replay");
    assert_eq!(still.stored.len(), 0, "the source still corrupts them");
    assert_eq!(still.still_failing.len(), 2);
    let attempts: Vec<i32> = pg
        .query("SELECT attempts FROM dead_letters ORDER BY id", &[])
        .await
        .expect("q")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, vec![2, 2]);

    proxy.pass();
    let fixed = admin::dlq_replay(&cfg, "operator", &Default::default(), &[])
        .await
        .expect("replay");
    assert_eq!((fixed.stored.len(), fixed.still_failing.len()), (2, 0));
    let left = dead_letter_count(&pg).await;
    assert_eq!(left, 0, "replay empties the table");
    let mut stored = stored_logs(&pg).await;
    stored.sort();
    assert_eq!(
        stored,
        all_logs.into_iter().collect::<Vec<_>>(),
        "every event exactly once"
    );
}

/// Answers HTTP 500 (a fault of the moment) to every eth_getLogs whose
/// range contains `block`.
fn refuse_block(proxy: &Proxy, block: u64) {
    proxy.set(move |r| match crate::support::proxy::log_range(r) {
        Some((f, t)) if (f..=t).contains(&block) => Action::Reply(500, "internal error".into()),
        _ => Action::Forward,
    });
}

/// Refuses, with a deterministic JSON-RPC error (the range itself is the
/// problem: a provider that pruned it, say), every eth_getLogs whose range
/// contains `block`.
fn refuse_range(proxy: &Proxy, block: u64) {
    proxy.set(move |r| match crate::support::proxy::log_range(r) {
        Some((f, t)) if (f..=t).contains(&block) => {
            crate::support::proxy::rpc_error(r, -32000, "history for this range is not available", None)
        }
        _ => Action::Forward,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_retry_an_unservable_range_holds_the_cursor_and_the_stream_reports_itself_stuck() {
    let w = World::new().await;
    w.emit_burns(12, |_| 1).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    refuse_block(&proxy, 6);
    let cfg = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.rpc_attempts = 1;
            s.max_block_range = 4;
            s.stuck_after = Duration::from_millis(1);
        })
        .build();
    let app = build_app(&cfg, "r").await;
    let poller = &app.pollers()[0];
    let mut errors = 0;
    for _ in 0..6 {
        if poller.tick(&CancellationToken::new()).await.is_err() {
            errors += 1;
        }
    }
    assert!(errors >= 4, "the refused range keeps failing");
    let pg = w.pg().await;
    assert_eq!(
        cursor_of(&pg, "burns").await,
        Some(5),
        "the blocks before the refused one are kept; the cursor waits right before block 6"
    );
    let status = logcursor::status::collect(&cfg, "status").await.expect("status");
    assert!(
        status[0].stuck.as_deref().is_some_and(|s| s.contains("HTTP 500")),
        "{:?}",
        status[0].stuck
    );
    proxy.pass();
    app.tick_until_idle().await;
    let status = logcursor::status::collect(&cfg, "status").await.expect("status");
    assert_eq!(status[0].stuck, None, "a committed range clears it");
    w.assert_stored_equals_chain(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_skip_and_backfill_the_cursor_passes_and_the_gap_fill_worker_stores_the_range_once() {
    let w = World::new().await;
    w.emit_burns(20, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    refuse_range(&proxy, 9);
    let cfg = backfill(&w)
        .rpc(&proxy.url)
        .stream(|s| {
            s.rpc_attempts = 1;
            s.max_block_range = 4;
            s.range_attempts = 3;
            s.gapfill.backoff = Duration::from_secs(10);
            s.gapfill.backoff_max = Duration::from_secs(3600);
            s.gapfill.max_attempts = 4;
        })
        .build();
    let app = build_app(&cfg, "r").await;
    let poller = &app.pollers()[0];
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        match poller.tick(&CancellationToken::new()).await {
            Ok(TickOutcome::Idle { .. }) => break,
            other => outcomes.push(other.is_ok()),
        }
    }
    assert_eq!(
        outcomes.iter().filter(|ok| !**ok).count(),
        2,
        "two failures, then the third attempt skips"
    );
    let pg = w.pg().await;
    let head = w.chain.block_number().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(head), "the cursor passed the range");
    let row = pg
        .query_one("SELECT id, from_block, to_block, attempts FROM failed_ranges", &[])
        .await
        .expect("one failed range");
    let (id, from, to): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(
        from <= 9 && 9 <= to,
        "the recorded range holds the refused block: {from}..={to}"
    );
    let on_chain = w.chain.burned_logs(&w.emitter, head).await;
    let database = logcursor::store::pool::Database::new(&cfg.database.settings, "metrics").expect("pool");
    let backlog = logcursor::http::database_metrics(&database, &["burns".to_string()])
        .await
        .expect("metrics");
    assert!(
        backlog.contains("logcursor_failed_ranges_pending{stream=\"burns\"} 1"),
        "{backlog}"
    );
    assert!(
        backlog.contains(&format!(
            "logcursor_contiguous_watermark_block{{stream=\"burns\"}} {}",
            from - 1
        )),
        "the watermark stops before the skipped range: {backlog}"
    );
    let missing = on_chain.iter().filter(|l| (from..=to).contains(&l.2)).count();
    assert_eq!(stored_logs(&pg).await.len(), on_chain.len() - missing);

    // Failing attempts back off exponentially, in database time.
    let filler = app.gap_filler().expect("gap-fill worker");
    let mut delays = Vec::new();
    for attempt in 1..=4 {
        pg.execute("UPDATE failed_ranges SET next_attempt_at = now()", &[])
            .await
            .expect("make due");
        let outcome = filler.work_once().await.expect("pass");
        let dead = matches!(
            outcome,
            logcursor::poller::gapfill::GapOutcome::Failed { dead: true, .. }
        );
        assert!(
            matches!(outcome, logcursor::poller::gapfill::GapOutcome::Failed { .. }),
            "{outcome:?}"
        );
        assert_eq!(dead, attempt == 4, "dead after gapfill_max_attempts");
        let secs: f64 = pg
            .query_one(
                "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM failed_ranges",
                &[],
            )
            .await
            .expect("delay")
            .get(0);
        delays.push(secs);
    }
    for (i, d) in delays.iter().enumerate() {
        let want = 10.0 * 2f64.powi(i as i32);
        assert!(
            (want - 1.0..=want).contains(d),
            "attempt {}: next try in {d:.1}s, want ~{want}s ({delays:?})",
            i + 1
        );
    }
    let status = logcursor::status::collect(&cfg, "status").await.expect("status");
    assert_eq!((status[0].failed_ranges_pending, status[0].failed_ranges_dead), (0, 1));

    // The provider serves it again and an operator revives the row: filled once.
    proxy.pass();
    pg.execute("UPDATE failed_ranges SET dead = false, next_attempt_at = now()", &[])
        .await
        .expect("revive");
    let filled = filler.work_once().await.expect("pass");
    assert!(
        matches!(filled, logcursor::poller::gapfill::GapOutcome::Filled { id: i, .. } if i == id),
        "{filled:?}"
    );
    assert_eq!(
        filler.work_once().await.expect("pass"),
        logcursor::poller::gapfill::GapOutcome::Idle
    );
    let left: i64 = pg
        .query_one("SELECT count(*) FROM failed_ranges", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0);
    let mut stored = stored_logs(&pg).await;
    stored.sort();
    assert_eq!(
        stored,
        on_chain.into_iter().collect::<Vec<_>>(),
        "every event exactly once"
    );
}

/// The world's config with `on_unfetchable_range = "skip_and_backfill"`.
fn backfill(w: &World) -> TestConfig {
    w.config().stream_toml("on_unfetchable_range = \"skip_and_backfill\"")
}

/// Ingests everything, then turns `ranges` back into gaps: their events are
/// deleted and each is recorded as a failed range, due now.
async fn with_gaps(ranges: &[(i64, i64)]) -> (World, tokio_postgres::Client) {
    let w = World::new().await;
    w.emit_burns(30, |i| i % 3 + 1).await;
    // anvil may pack several burns into one block: make sure every gap is
    // below the head.
    let highest = ranges.iter().map(|(_, t)| *t).max().unwrap_or(0);
    let head = w.chain.block_number().await;
    if head <= highest {
        w.chain.mine(u64::try_from(highest - head + 1).expect("blocks")).await;
    }
    backfill(&w).replica("seed").await.tick_until_idle().await;
    let pg = w.pg().await;
    for (f, t) in ranges {
        pg.execute("DELETE FROM events WHERE block_number BETWEEN $1 AND $2", &[f, t])
            .await
            .expect("gap");
        pg.execute(
            "INSERT INTO failed_ranges (stream, from_block, to_block, last_error) VALUES ('burns', $1, $2, 'test gap')",
            &[f, t],
        )
        .await
        .expect("failed range");
    }
    (w, pg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_gap_fill_workers_never_process_the_same_range() {
    let ranges: Vec<(i64, i64)> = (0..8).map(|i| (2 + i * 3, 4 + i * 3)).collect();
    let (w, pg) = with_gaps(&ranges).await;
    let (a, b) = (
        backfill(&w).replica("worker-a").await,
        backfill(&w).replica("worker-b").await,
    );
    let work = |app: App| async move {
        let filler = app.gap_filler().expect("worker");
        let mut filled = Vec::new();
        loop {
            match filler.work_once().await.expect("pass") {
                logcursor::poller::gapfill::GapOutcome::Filled { id, .. } => filled.push(id),
                // A chunk stored in part (anvil sometimes answers a block
                // above its head late): the rest is claimed again.
                logcursor::poller::gapfill::GapOutcome::Progressed { .. } => {}
                logcursor::poller::gapfill::GapOutcome::Idle => return filled,
                other => panic!("{other:?}"),
            }
        }
    };
    let (fa, fb) = tokio::join!(work(a), work(b));
    let mut all: Vec<i64> = fa.iter().chain(&fb).copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), fa.len() + fb.len(), "no range filled by both: {fa:?} {fb:?}");
    assert_eq!(all.len(), ranges.len(), "every range filled");
    w.assert_stored_equals_chain(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimer_killed_mid_claim_loses_its_lease_and_the_range_is_filled_once() {
    let (w, pg) = with_gaps(&[(5, 9)]).await;
    let hanging = Proxy::start(&w.anvil.url).await;
    hanging.set(|r| {
        if method_of(r) == "eth_getLogs" {
            Action::Hang
        } else {
            Action::Forward
        }
    });
    // A process reads this one: TOML only.
    let doomed_cfg = backfill(&w)
        .rpc(&hanging.url)
        .stream_toml("gapfill_lease = \"3s\"\nrpc_timeout = \"5s\"\nrpc_attempts = 1")
        .file();
    let mut doomed = spawn_replica(doomed_cfg.path(), "doomed", &[]);
    wait_for(
        "the doomed replica to claim the range",
        std::time::Duration::from_secs(30),
        || async {
            let n: i64 = pg
                .query_one("SELECT count(*) FROM failed_ranges WHERE claimed_by = 'doomed'", &[])
                .await
                .expect("claim")
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    doomed.kill().await.expect("SIGKILL");

    let survivor = backfill(&w).replica("survivor").await;
    let filler = survivor.gap_filler().expect("worker");
    use logcursor::poller::gapfill::GapOutcome;
    assert_eq!(
        filler.work_once().await.expect("pass"),
        GapOutcome::Idle,
        "the lease still holds the range"
    );
    wait_for(
        "the lease to end and the range to be reclaimed",
        std::time::Duration::from_secs(15),
        || async {
            match filler.work_once().await.expect("pass") {
                GapOutcome::Filled { .. } => Some(()),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(
        filler.work_once().await.expect("pass"),
        GapOutcome::Idle,
        "filled once, nothing left"
    );
    w.assert_stored_equals_chain(&pg).await;
}

/// I2 against gap fill: a rewind below a range a gap-fill worker holds
/// takes the worker's claim away (in the rewind's transaction, before its
/// events go), so a worker that fetched the orphaned branch cannot commit
/// it: its closing statement finds the claim gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_below_a_claimed_range_takes_the_gap_fill_claim_away() {
    let w = World::new().await;
    w.emit_burns(12, |_| 1).await;
    let cfg = w.config().build();
    let app = build_app(&cfg, "r").await;
    app.tick_until_idle().await;
    let pg = w.pg().await;
    let id: i64 = pg
        .query_one(
            "INSERT INTO failed_ranges (stream, from_block, to_block, last_error, claimed_by, claimed_until)
             VALUES ('burns', 4, 9, 'test', 'gap-worker', now() + interval '1 hour') RETURNING id",
            &[],
        )
        .await
        .expect("claimed range")
        .get(0);
    logcursor::admin::rewind(&cfg, "operator", &Default::default(), "burns", 6)
        .await
        .expect("rewind");
    let still_holds = logcursor::store::failed_ranges::complete(&pg, id, "gap-worker")
        .await
        .expect("complete");
    assert!(!still_holds, "the worker's claim went with the rewind");
    let row: (i64, Option<String>) = pg
        .query_one("SELECT to_block, claimed_by FROM failed_ranges WHERE id = $1", &[&id])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("the range stays, trimmed");
    assert_eq!(row, (6, None), "trimmed to the rewind target, unclaimed");
}
