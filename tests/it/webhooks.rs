//! Webhooks through the outbox (I7): every event delivered at least once
//! with a stable idempotency key and signature while replicas die, a 3xx
//! refused, a rewind's revert sent for exactly what was delivered.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use logcursor::app::App;
use logcursor::delivery::Attempted;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::support::receiver::{Receiver, Reply};
use crate::support::*;

/// `cfg` with the stream's webhook table.
pub(crate) fn with_webhook(cfg: TestConfig, url: &str, secret_file: &std::path::Path) -> TestConfig {
    with_webhook_toml(cfg, url, secret_file, "")
}

/// `cfg` with the stream's webhook table, `extra` keys added to it.
pub(crate) fn with_webhook_toml(cfg: TestConfig, url: &str, secret_file: &std::path::Path, extra: &str) -> TestConfig {
    cfg.stream_toml(&format!(
        "[[webhooks]]\nname = \"payments-api\"\nurl = \"{url}\"\nsecret_file = \"{}\"\n\
         batch_size = 1\ntimeout = \"400ms\"\nmax_attempts = 100\nbackoff = \"20ms\"\nbackoff_max = \"200ms\"\n{extra}",
        secret_file.display()
    ))
}

/// A file holding the webhook's signing `secret`.
pub(crate) fn secret_file(secret: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("secret file");
    std::fs::write(file.path(), secret).expect("write secret");
    file
}

/// `w`'s config with every block taken at once and a deep reorg rewound.
pub(crate) fn rewinding_config(w: &World) -> TestConfig {
    w.config()
        .stream(|s| s.confirmations = 0)
        .stream_toml("on_deep_reorg = \"rewind\"")
}

/// Replica `r` of `cfg` with the stream's webhook to `url` (signed with
/// `secret`, `extra` keys added to its table), ticked until idle. (The
/// secret file is read as the config is parsed.)
pub(crate) async fn webhook_replica(cfg: TestConfig, url: &str, secret: &str, extra: &str) -> App {
    let secret_file = secret_file(secret);
    let app = with_webhook_toml(cfg, url, secret_file.path(), extra)
        .replica("r")
        .await;
    app.tick_until_idle().await;
    app
}

/// The outcome of the first delivery `app`'s webhook workers attempt. (A
/// delivery is claimable once every older transaction of the cluster has
/// ended.)
async fn first_attempt(app: &App) -> Attempted {
    let deliverer = app.deliverer().expect("webhook workers");
    wait_for("a delivery attempted", Duration::from_secs(30), || async {
        match deliverer.deliver_once(0).await.expect("deliver") {
            Attempted::Idle(_) => None,
            other => Some(other),
        }
    })
    .await
}

/// (tx hash, log index) of every event of a delivery body.
pub(crate) fn events_of(body: &Value) -> Vec<(String, i64)> {
    body["events"]
        .as_array()
        .map(|evs| {
            evs.iter()
                .map(|e| {
                    (
                        e["tx_hash"].as_str().unwrap_or("").to_string(),
                        e["log_index"].as_i64().unwrap_or(-1),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_get_every_event_at_least_once_with_stable_keys_and_signatures_while_replicas_die() {
    let w = World::new().await;
    w.emit_burns(12, |i| i % 2 + 1).await;
    let doomed = w.chain.burn(&w.emitter, 1, 999_999).await;
    w.emit_burns(8, |_| 1).await;
    let receiver = Receiver::start().await;
    let secret = "whsec-TEST-SECRET-42";
    let secret_file = secret_file(secret);
    let doomed_hash = doomed.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    receiver.set(move |body| {
        if events_of(body).iter().any(|(tx, _)| *tx == doomed_hash) {
            return Reply::Status(410);
        }
        match rng.gen_range(0..100) {
            0..=19 => Reply::Status(503),
            20..=23 => Reply::Hang,
            _ => Reply::Status(200),
        }
    });
    let config = with_webhook(w.config(), &receiver.url, secret_file.path());
    let (toml, cfg) = (config.toml(), config.file());
    let mut replicas: Vec<_> = (0..3)
        .map(|i| spawn_replica(cfg.path(), &format!("r{i}"), &[]))
        .collect();
    // Kill and restart replicas while deliveries are under way.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for round in 0..6 {
        wait_for("deliveries under way", Duration::from_secs(30), || async {
            (receiver.seen().len() > round * 4).then_some(())
        })
        .await;
        let victim = rng.gen_range(0..replicas.len());
        replicas[victim].kill().await.expect("SIGKILL");
        replicas[victim] = spawn_replica(cfg.path(), &format!("r{victim}-{round}"), &[]);
        w.emit_burns(1, |_| 2).await;
    }
    let head = w.chain.block_number().await;
    let on_chain = w.chain.burned_logs(&w.emitter, head).await;
    let wanted: BTreeSet<(String, i64)> = on_chain
        .iter()
        .filter(|(tx, _, _)| *tx != doomed)
        .map(|(tx, i, _)| (tx.clone(), *i))
        .collect();
    let delivered = || -> BTreeSet<(String, i64)> {
        receiver
            .seen()
            .iter()
            .filter(|r| r.answered.is_some_and(|s| (200..300).contains(&s)))
            .flat_map(|r| events_of(&r.json))
            .collect()
    };
    wait_for("every event but one delivered", Duration::from_secs(120), || async {
        delivered().is_superset(&wanted).then_some(())
    })
    .await;
    stop_all(replicas).await;

    let seen = receiver.seen();
    let mut bodies: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut keys_of_event: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
    for r in &seen {
        assert_eq!(
            r.signature.as_deref(),
            Some(logcursor::delivery::sign(secret.as_bytes(), r.body.as_bytes()).as_str()),
            "every request is signed over its exact body"
        );
        assert_eq!(r.json["delivery_id"].as_str(), Some(r.idempotency_key.as_str()));
        bodies
            .entry(r.idempotency_key.clone())
            .or_default()
            .insert(r.body.clone());
        for e in events_of(&r.json) {
            keys_of_event.entry(e).or_default().insert(r.idempotency_key.clone());
        }
    }
    assert!(
        bodies.values().all(|b| b.len() == 1),
        "every retry of a delivery carries the same key and the same body"
    );
    assert!(
        keys_of_event.values().all(|k| k.len() == 1),
        "each event is in exactly one delivery: enqueued once, whatever the replicas did"
    );
    assert!(seen.len() > bodies.len(), "the receiver's failures made some retries");
    assert!(!toml.contains(secret) && !seen.iter().any(|r| r.body.contains(secret)));

    let pg = w.pg().await;
    let dead: Vec<(i32, Option<i32>)> = pg
        .query("SELECT attempts, last_status FROM outbox WHERE status = 'dead'", &[])
        .await
        .expect("outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        dead,
        vec![(1, Some(410))],
        "the refused delivery is dead after one attempt, nothing else"
    );

    // Once the receiver takes it, a replay sends the same delivery again.
    // A replica watched over /metrics meanwhile: the outbox as it is.
    receiver.set(|_| Reply::Status(200));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let replica = spawn_replica(
        cfg.path(),
        "after-replay",
        &[("LOGCURSOR_HTTP_LISTEN", format!("127.0.0.1:{port}"))],
    );
    let gauge = |text: &str, name: &str| -> Option<f64> {
        let series = format!("{name}{{stream=\"burns\",webhook=\"payments-api\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
    };
    let scrape = || async {
        let url = format!("http://127.0.0.1:{port}/metrics");
        match reqwest::get(&url).await {
            Ok(r) => r.text().await.ok(),
            Err(_) => None,
        }
    };
    wait_for(
        "/metrics showing the dead delivery",
        Duration::from_secs(30),
        || async {
            let text = scrape().await?;
            (gauge(&text, "logcursor_outbox_dead") == Some(1.0)
                && gauge(&text, "logcursor_outbox_pending") == Some(0.0))
            .then_some(())
        },
    )
    .await;
    let out = finish(
        logcursor_cmd(&["outbox", "replay", "--all"], cfg.path(), "operator")
            .spawn()
            .expect("replay"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doomed_key = keys_of_event
        .iter()
        .find(|((tx, _), _)| *tx == doomed)
        .and_then(|(_, k)| k.iter().next().cloned())
        .expect("the refused delivery was tried");
    wait_for("the replayed delivery", Duration::from_secs(30), || async {
        receiver
            .seen()
            .iter()
            .any(|r| r.idempotency_key == doomed_key && r.answered == Some(200))
            .then_some(())
    })
    .await;
    wait_for(
        "/metrics: nothing dead or pending, the attempt counted",
        Duration::from_secs(30),
        || async {
            let text = scrape().await?;
            let delivered = text.lines().any(|l| {
                l.starts_with("logcursor_webhook_attempts_total{")
                    && l.contains("outcome=\"delivered\"")
                    && l.ends_with(" 1")
            });
            (delivered
                && gauge(&text, "logcursor_outbox_dead") == Some(0.0)
                && gauge(&text, "logcursor_outbox_pending") == Some(0.0))
            .then_some(())
        },
    )
    .await;
    let logs = stop_all(vec![replica]).await;
    for l in &logs {
        assert!(
            !l.contains(secret) && !l.contains("RECEIVER-SECRET-TOKEN"),
            "no secret in logs: {l}"
        );
    }
    let left: i64 = pg
        .query_one("SELECT count(*) FROM outbox WHERE status <> 'delivered'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "nothing pending or dead");
}

/// A 3xx is an answer, not a way on: followed, a 303 turns the POST into a
/// GET without the body, and that GET's 200 would mark the delivery done
/// though its events never arrived. Refused instead: dead, and replayable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_refused_and_never_followed() {
    let w = World::new().await;
    w.emit_burns(2, |_| 1).await;
    let receiver = Receiver::start().await;
    receiver.set(|_| Reply::Redirect);
    let app = webhook_replica(w.config(), &receiver.url, "s", "").await;
    let outcome = first_attempt(&app).await;
    assert!(
        matches!(outcome, Attempted::Dead { status: Some(303), .. }),
        "{outcome:?}"
    );
    assert_eq!(receiver.landed(), 0, "the redirect was not followed");
    assert_eq!(receiver.seen().len(), 1, "one POST, not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_echoes_its_url_never_gets_its_token_into_an_error_or_a_row() {
    let w = World::new().await;
    w.emit_burns(1, |_| 1).await;
    let receiver = Receiver::start().await;
    assert!(receiver.url.contains("RECEIVER-SECRET-TOKEN"));
    receiver.set(|_| Reply::Echo(404));
    let app = webhook_replica(w.config(), &receiver.url, "whsec-echo-0123", "").await;
    let outcome = first_attempt(&app).await;
    let Attempted::Dead {
        status: Some(404),
        error,
        ..
    } = &outcome
    else {
        panic!("refused at once: {outcome:?}");
    };
    // The receiver did repeat the token; what logcursor kept says so without it.
    assert!(
        error.starts_with("HTTP 404: no hook at POST /hook?<redacted>"),
        "{error}"
    );
    assert!(!format!("{outcome:?}").contains("RECEIVER-SECRET-TOKEN"), "{outcome:?}");
    let pg = w.pg().await;
    let kept: Vec<String> = pg
        .query("SELECT coalesce(last_error, '') FROM outbox", &[])
        .await
        .expect("outbox")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kept.len(), 1, "one delivery");
    assert!(
        kept[0].contains("<redacted>") && !kept[0].contains("RECEIVER-SECRET-TOKEN"),
        "{kept:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_after_delivery_sends_a_revert_of_the_removed_events_and_drops_what_was_never_sent() {
    let w = World::new().await;
    let (chain, emitter) = (&w.chain, &w.emitter);
    w.emit_burns(10, |_| 1).await;
    let receiver = Receiver::start().await;
    let app = webhook_replica(rewinding_config(&w), &receiver.url, "s", "").await;
    let deliverer = app.deliverer().expect("webhook workers");
    // Deliver everything stored so far. (A delivery is claimable once every
    // older transaction of the cluster has ended: other tests' included.)
    let step = || async {
        match deliverer.deliver_once(0).await.expect("deliver") {
            Attempted::Idle(_) | Attempted::Delivered { .. } => {}
            other => panic!("{other:?}"),
        }
    };
    wait_for("the first deliveries", Duration::from_secs(30), || async {
        step().await;
        (receiver.seen().iter().flat_map(|r| events_of(&r.json)).count() == 10).then_some(())
    })
    .await;
    let delivered: BTreeSet<(String, i64)> = receiver.seen().iter().flat_map(|r| events_of(&r.json)).collect();
    assert_eq!(delivered.len(), 10);
    let last_delivered_block = chain
        .burned_logs(emitter, chain.block_number().await)
        .await
        .iter()
        .map(|(_, _, b)| *b)
        .max()
        .expect("logs");
    // New events, stored but not yet delivered; then a reorg deeper than the
    // safe head replaces the blocks from the last delivered one on.
    w.emit_burns(2, |_| 1).await;
    app.tick_until_idle().await;
    let before = chain.block_number().await;
    let removed: BTreeSet<(String, i64)> = chain
        .burned_logs(emitter, before)
        .await
        .into_iter()
        .filter(|(_, _, b)| *b >= last_delivered_block)
        .map(|(tx, i, _)| (tx, i))
        .collect();
    assert!(!removed.is_subset(&delivered) && !removed.is_disjoint(&delivered));
    let depth = u64::try_from(before - last_delivered_block + 1).expect("depth");
    chain.reorg(emitter, depth, &[(1, 7000)]).await;
    chain.mine(1).await;
    app.tick_until_idle().await;
    let head = chain.block_number().await;
    let canonical: BTreeSet<(String, i64)> = chain
        .burned_logs(emitter, head)
        .await
        .into_iter()
        .map(|(tx, i, _)| (tx, i))
        .collect();
    wait_for(
        "the revert and the new branch's events",
        Duration::from_secs(30),
        || async {
            step().await;
            let seen = receiver.seen();
            let sent: BTreeSet<(String, i64)> = seen
                .iter()
                .filter(|r| r.json["type"] == "events")
                .flat_map(|r| events_of(&r.json))
                .collect();
            (seen.iter().any(|r| r.json["type"] == "revert") && canonical.is_subset(&sent)).then_some(())
        },
    )
    .await;
    let seen = receiver.seen();
    let reverts: Vec<&crate::support::receiver::Received> =
        seen.iter().filter(|r| r.json["type"] == "revert").collect();
    assert_eq!(reverts.len(), 1, "one revert for the webhook");
    let reverted: BTreeSet<(String, i64)> = events_of(&reverts[0].json).into_iter().collect();
    let was_delivered: BTreeSet<(String, i64)> = removed.intersection(&delivered).cloned().collect();
    assert_eq!(
        reverted, was_delivered,
        "exactly the removed events that had been delivered are reverted"
    );
    let never_sent: BTreeSet<(String, i64)> = removed.difference(&delivered).cloned().collect();
    let events_sent: BTreeSet<(String, i64)> = seen
        .iter()
        .filter(|r| r.json["type"] == "events")
        .flat_map(|r| events_of(&r.json))
        .collect();
    assert!(
        events_sent.is_disjoint(&never_sent),
        "events removed before they were sent are never sent"
    );
    let pg = w.pg().await;
    w.assert_stored_equals_chain(&pg).await;
    assert!(canonical.is_subset(&events_sent), "every canonical event was delivered");
}
