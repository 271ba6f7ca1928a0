//! Reverts on webhooks against what they undo: a revert never overtakes
//! the delivery it undoes (on an unordered webhook too), and a dead
//! delivery whose events a rewind removed is not replayed.

use std::time::Duration;

use logcursor::app::App;

use crate::support::receiver::{Receiver, Reply};
use crate::support::*;
use crate::webhooks::{events_of, rewinding_config, secret_file, webhook_replica, with_webhook};

/// A reorg from the block of transaction `tx` up (no events on the new
/// branch), a block mined on top, and `app` ticked until idle.
async fn reorg_away(w: &World, app: &App, tx: &str) {
    let logs = w.chain.burned_logs(&w.emitter, w.chain.block_number().await).await;
    let block = logs
        .iter()
        .find(|(t, _, _)| t == tx)
        .map(|(_, _, b)| *b)
        .expect("the event");
    let depth = u64::try_from(w.chain.block_number().await - block + 1).expect("depth");
    w.chain.reorg(&w.emitter, depth, &[]).await;
    w.chain.mine(1).await;
    app.tick_until_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_unordered_webhook_a_revert_waits_for_the_delivery_it_undoes() {
    let w = World::new().await;
    // A block that stays, then the event the reorg will remove.
    w.emit_burns(1, |_| 1).await;
    let target = w.chain.burn(&w.emitter, 1, 5).await;
    let receiver = Receiver::start().await;
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (gate, refused) = (open.clone(), target.clone());
    receiver.set(move |body| {
        let carries_target = events_of(body).iter().any(|(tx, _)| *tx == refused);
        match body["type"].as_str() {
            Some("events") if carries_target && !gate.load(std::sync::atomic::Ordering::SeqCst) => Reply::Status(503),
            _ => Reply::Status(200),
        }
    });
    let app = webhook_replica(rewinding_config(&w), &receiver.url, "s", "ordered = false\n").await;
    let deliverer = app.deliverer().expect("webhook workers");
    let step = || async { deliverer.deliver_once(0).await.expect("deliver") };
    let of_target = |r: &crate::support::receiver::Received| {
        r.json["type"] == "events" && events_of(&r.json).iter().any(|(tx, _)| *tx == target)
    };
    let attempts = || receiver.seen().iter().filter(|r| of_target(r)).count();
    wait_for("the event's delivery refused once", Duration::from_secs(30), || async {
        step().await;
        (attempts() >= 1).then_some(())
    })
    .await;
    // A reorg removes the event while its delivery is being retried: the
    // receiver may have applied it (a 503 can come after the work), so a
    // revert is written.
    reorg_away(&w, &app, &target).await;
    let pg = w.pg().await;
    let reverts: i64 = pg
        .query_one("SELECT count(*) FROM outbox WHERE kind = 'revert'", &[])
        .await
        .expect("reverts")
        .get(0);
    assert_eq!(reverts, 1, "the rewind wrote a revert");
    // The delivery is retried several times; the revert, due all along, waits.
    let before = attempts();
    wait_for(
        "three more attempts of the delivery",
        Duration::from_secs(30),
        || async {
            step().await;
            (attempts() >= before + 3).then_some(())
        },
    )
    .await;
    assert!(
        receiver.seen().iter().all(|r| r.json["type"] != "revert"),
        "the revert overtook the delivery it undoes"
    );
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for("the revert delivered", Duration::from_secs(30), || async {
        step().await;
        receiver.seen().iter().any(|r| r.json["type"] == "revert").then_some(())
    })
    .await;
    let seen = receiver.seen();
    let first_revert = seen.iter().position(|r| r.json["type"] == "revert");
    let delivered = seen.iter().position(|r| of_target(r) && r.answered == Some(200));
    assert!(
        matches!((delivered, first_revert), (Some(d), Some(r)) if d < r),
        "the delivery succeeded before its revert was sent: {:?}",
        seen.iter()
            .map(|r| (r.json["type"].clone(), r.answered))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_delivery_whose_events_a_rewind_removed_is_not_replayed() {
    let w = World::new().await;
    w.emit_burns(1, |_| 1).await;
    let target = w.chain.burn(&w.emitter, 1, 5).await;
    let receiver = Receiver::start().await;
    receiver.set(|body| match body["type"].as_str() {
        Some("events") => Reply::Status(410),
        _ => Reply::Status(200),
    });
    let app = webhook_replica(rewinding_config(&w), &receiver.url, "s", "").await;
    let deliverer = app.deliverer().expect("webhook workers");
    let pg = w.pg().await;
    let count = |sql: &'static str| {
        let pg = &pg;
        async move { pg.query_one(sql, &[]).await.expect("count").get::<_, i64>(0) }
    };
    wait_for("both deliveries dead", Duration::from_secs(30), || async {
        deliverer.deliver_once(0).await.expect("deliver");
        (count("SELECT count(*) FROM outbox WHERE status = 'dead'").await == 2).then_some(())
    })
    .await;
    let target_delivery: i64 = pg
        .query_one(
            "SELECT o.id FROM outbox o JOIN events e ON e.id = ANY(o.event_ids)
              WHERE encode(e.tx_hash, 'hex') = $1",
            &[&target.trim_start_matches("0x").to_string()],
        )
        .await
        .expect("the target's delivery")
        .get(0);
    // A reorg removes the refused event: its delivery had been sent, so a
    // revert is written; the other dead delivery's event stays.
    reorg_away(&w, &app, &target).await;
    assert_eq!(count("SELECT count(*) FROM outbox WHERE kind = 'revert'").await, 1);

    let replayed = logcursor::store::outbox::replay(&pg, &[]).await.expect("replay");
    assert_eq!(
        replayed,
        logcursor::store::outbox::Replayed {
            due: 1,
            refused: vec![target_delivery]
        },
        "the delivery of the removed event stays dead; the other is due again"
    );
    let status: String = pg
        .query_one("SELECT status FROM outbox WHERE id = $1", &[&target_delivery])
        .await
        .expect("row")
        .get(0);
    assert_eq!(status, "dead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_waiting_on_a_rewind_sees_what_the_rewind_removed() {
    let w = World::new().await;
    w.emit_burns(1, |_| 1).await;
    let receiver = Receiver::start().await;
    let secret_file = secret_file("s");
    let config = || with_webhook(w.config(), &receiver.url, secret_file.path()).build();
    let app = crate::support::replica::build_app(&config(), "r").await;
    app.tick_until_idle().await;
    let pg = w.pg().await;
    let id: i64 = pg
        .query_one(
            "UPDATE outbox SET status = 'dead', body = '{}', attempts = 1 RETURNING id",
            &[],
        )
        .await
        .expect("a dead delivery")
        .get(0);
    // A rewind in flight: it holds the delivery's row and removes its event.
    let mut rewinder = w.pg().await;
    let rewind = rewinder.transaction().await.expect("begin");
    rewind
        .execute("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .expect("lock");
    rewind
        .execute(
            "DELETE FROM events e USING outbox o WHERE o.id = $1 AND e.id = ANY(o.event_ids)",
            &[&id],
        )
        .await
        .expect("remove the event");
    let config = config();
    let replay = tokio::spawn(async move { logcursor::admin::delivery::outbox_replay(&config, "op", &[id]).await });
    wait_for(
        "the replay waiting on the rewind's lock",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FROM outbox%'",
                &[],
            )
            .await
            .expect("activity")
            .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await;
    rewind.commit().await.expect("commit the rewind");
    let replayed = replay.await.expect("join").expect("replay");
    assert_eq!(replayed.refused, vec![id], "{replayed:?}");
    assert_eq!(replayed.due, 0);
}
