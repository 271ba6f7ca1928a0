//! A reorganisation inside a tick is always seen (I2, I4), a backend behind
//! the head cannot truncate a range, and operator commands cannot store or
//! keep an orphan.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use logcursor::admin;
use logcursor::poller::TickError;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::proxy::{log_range, method_of, Action, Proxy};
use crate::support::*;

/// Blocks without logs are replaced by blocks with logs after eth_getLogs
/// answered and before the final header batch: every per-log check
/// passes, so only the chained range (the pinned end, each request's end
/// header) can see it.
///
/// Checked by reducing `verify::verify` to the blocks with logs (dropping
/// `e.ends` and the pinned end from `seen`): the tick then commits the
/// empty view, records the new branch's hash, and the 20 events are never
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_put_into_empty_blocks_by_a_reorg_while_a_tick_reads_them_are_never_lost() {
    let w = World::new().await;
    w.emit_burns(5, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    let app = w.config().rpc(&proxy.url).replica("r").await;
    app.tick_until_idle().await;
    let pg = w.pg().await;
    let before = cursor_of(&pg, "burns").await.expect("cursor");
    w.chain.mine(10).await;
    let from = json!(format!("{:#x}", before + 1));
    let (c, e) = (w.chain.clone(), w.emitter.clone());
    let (mut logs_answered, mut fired) = (false, false);
    proxy.set(move |r| match method_of(r) {
        "eth_getLogs" => {
            logs_answered = true;
            Action::Forward
        }
        // The final batch asks for the range's first block again: hold it
        // while the last 6 (empty) blocks become blocks with 20 events.
        "eth_getBlockByNumber" if logs_answered && !fired && r["params"][0] == from => {
            fired = true;
            let (c, e) = (c.clone(), e.clone());
            Action::After(Box::pin(async move { c.reorg(&e, 6, &[(20, 1_000)]).await }))
        }
        _ => Action::Forward,
    });
    let tick = app.pollers()[0].tick(&CancellationToken::new()).await;
    assert!(matches!(tick, Err(TickError::Reorged { .. })), "{tick:?}");
    assert_eq!(
        cursor_of(&pg, "burns").await,
        Some(before),
        "that view was not committed"
    );

    proxy.pass();
    app.tick_until_idle().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(w.chain.block_number().await));
    w.assert_stored_equals_chain(&pg).await;
    let new: i64 = pg
        .query_one(
            "SELECT count(*) FROM events WHERE (params->>'amount')::int >= 1000",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(new, 20, "the events of the new branch are stored");
}

/// A load balancer sends the batches with eth_getLogs to a backend whose
/// head is block `LAGS_AT`: it lacks the header of any later block and
/// returns the logs it has, as geth does. Everything else reaches an
/// up-to-date backend.
///
/// Checked by accepting a batch whose header is missing (src/chain/logs.rs
/// `read`: a null header answered as "no end header" instead of
/// `Lagging`): the cursor then passes `LAGS_AT` with the later logs missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_behind_the_head_never_truncates_a_range_silently() {
    const LAGS_AT: u64 = 15;
    let w = World::new().await;
    w.emit_burns(30, |_| 1).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    let lagging: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let l = Arc::clone(&lagging);
    proxy.set(move |r| {
        let id = r["id"].as_u64().unwrap_or(0);
        if let Some((_, to)) = log_range(r) {
            if to <= LAGS_AT {
                return Action::Forward;
            }
            // The header travels first in the same batch (id - 1).
            l.lock().unwrap().insert(id - 1);
            return Action::Rewrite(Box::new(|mut v: Value| {
                if let Some(logs) = v["result"].as_array_mut() {
                    logs.retain(|log| hex_i64(&log["blockNumber"]) <= LAGS_AT as i64);
                }
                v
            }));
        }
        if method_of(r) == "eth_getBlockByNumber" {
            let l = Arc::clone(&l);
            return Action::Rewrite(Box::new(move |mut v: Value| {
                if l.lock().unwrap().contains(&id) {
                    v["result"] = Value::Null;
                }
                v
            }));
        }
        Action::Forward
    });
    let app = w
        .config()
        .rpc(&proxy.url)
        .stream(|s| {
            s.rpc_attempts = 1;
            s.max_block_range = 8;
        })
        .replica("r")
        .await;
    let pg = w.pg().await;
    let mut failed = 0;
    for _ in 0..12 {
        if app.pollers()[0].tick(&CancellationToken::new()).await.is_err() {
            failed += 1;
        }
        let at = cursor_of(&pg, "burns").await.expect("cursor");
        assert!(at <= LAGS_AT as i64, "the cursor passed what the backend has: {at}");
        w.assert_stored_up_to(&pg, at).await;
    }
    assert!(failed > 0, "the lagging backend was noticed");
    assert_eq!(
        cursor_of(&pg, "burns").await,
        Some(LAGS_AT as i64),
        "the blocks it has are stored"
    );
    assert!(
        !lagging.lock().unwrap().is_empty(),
        "the backend was asked past its head"
    );

    proxy.pass();
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&pg).await;
}

/// Checked by reverting each guard in turn: `admin::canonical_log` without
/// its hash comparison (the orphan is stored), `reorg::rewind` without
/// `dead_letters::delete_above` (the letter stays), `admin::rewind` without
/// the `orphaned` check (the rewind to an orphaned block succeeds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_never_store_or_keep_an_orphan() {
    let w = World::new().await;
    migrate_as(&w.db.url, "test").await;
    let pg = w.pg().await;
    pg.batch_execute(
        "CREATE FUNCTION refuse_777() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.params->>'amount' = '777' THEN RAISE EXCEPTION 'not 777'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_777 AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_777();",
    )
    .await
    .expect("trigger");
    w.emit_burns(8, |_| 1).await;
    let bad = w.chain.burn(&w.emitter, 1, 777).await;
    let bad_block = hex_i64(&w.chain.receipt(&bad).await["blockNumber"]);
    w.emit_burns(4, |_| 1).await;
    let cfg = w.config().build();
    let app = build_app(&cfg, "r").await;
    app.tick_until_idle().await;
    let letters = || async {
        let n: i64 = w
            .pg()
            .await
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .await
            .expect("q")
            .get(0);
        n
    };
    assert_eq!(letters().await, 1);

    // The operator fixes the handler; meanwhile the chain replaced every
    // block from the one before the letter's.
    pg.batch_execute("DROP TRIGGER refuse_777 ON events")
        .await
        .expect("drop");
    let head = w.chain.block_number().await;
    w.chain
        .reorg(&w.emitter, (head - bad_block + 2) as u64, &[(3, 5_000)])
        .await;
    let stored_before = count_events(&pg).await;

    let replay = admin::dlq_replay(&cfg, "operator", &Default::default(), &[])
        .await
        .expect("replay");
    assert!(replay.stored.is_empty(), "{replay:?}");
    assert_eq!(replay.still_failing.len(), 1);
    assert!(replay.still_failing[0].1.contains("no longer canonical"), "{replay:?}");
    assert_eq!(count_events(&pg).await, stored_before, "replay stored nothing");
    assert_eq!(letters().await, 1, "the letter stays");

    let refused = admin::rewind(&cfg, "operator", &Default::default(), "burns", bad_block).await;
    let safe = bad_block - 2;
    match refused {
        Err(e) => assert!(
            e.to_string().contains(&format!("The newest safe target is {safe}")),
            "{e}"
        ),
        Ok(r) => panic!("a rewind to the orphaned block {bad_block} was accepted: {r:?}"),
    }
    let rewound = admin::rewind(&cfg, "operator", &Default::default(), "burns", safe)
        .await
        .expect("rewind to the safe block");
    assert_eq!(rewound.to, safe);
    assert_eq!(
        letters().await,
        0,
        "the rewind removed the dead letter above its target"
    );

    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&pg).await;
    assert_eq!(letters().await, 0);
}
