//! Reorganisations against real anvil: one shallower than `confirmations`
//! never reaches a stored row (I2); one below the cursor halts the stream
//! or rewinds it, audited, per `on_deep_reorg`; finality tags bound the
//! safe head.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use logcursor::app::App;
use logcursor::poller::{TickError, TickOutcome};
use serde_json::json;

use crate::support::proxy::{method_of, rpc_error, Action, Proxy};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_shallower_than_confirmations_never_stores_an_orphaned_row() {
    let w = World::new().await;
    w.emit_burns(20, |_| 2).await;
    let app = w.config().stream(|s| s.confirmations = 3).replica("r").await;
    app.drive_until_idle().await;
    w.chain.reorg(&w.emitter, 3, &[(5, 1000)]).await; // replaces the 3 unconfirmed blocks
    w.emit_burns(5, |_| 1).await;
    w.chain.mine(3).await;
    let (_, failed) = app.drive_until_idle().await;
    assert!(failed.is_empty(), "{failed:?}");
    let pg = w.pg().await;
    w.assert_stored_equals_chain(&pg).await;
    let rows = pg
        .query(
            "SELECT DISTINCT block_number, '0x' || encode(block_hash, 'hex') FROM events",
            &[],
        )
        .await
        .expect("rows");
    for r in rows {
        let (n, h): (i64, String) = (r.get(0), r.get(1));
        assert_eq!(h, w.chain.block_hash(n).await, "block {n} of a stored row is canonical");
    }
}

async fn ingest_then_reorg_below_the_cursor(policy: &str) -> (World, App, i64) {
    let w = World::new().await;
    w.emit_burns(20, |i| i % 2 + 1).await;
    let app = w
        .config()
        .stream_toml(&format!("on_deep_reorg = \"{policy}\""))
        .stream(|s| {
            s.confirmations = 0;
            s.max_block_range = 4;
        })
        .replica("r")
        .await;
    app.drive_until_idle().await;
    let head = w.chain.block_number().await;
    // Deeper than the safe head (confirmations = 0): the last 5 stored blocks change.
    w.chain.reorg(&w.emitter, 5, &[(3, 5000), (4, 6000)]).await;
    (w, app, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_reorg_under_halt_stops_the_stream_saying_why_until_an_operator_rewinds() {
    let (w, app, head) = ingest_then_reorg_below_the_cursor("halt").await;
    let err = app.tick_once().await.expect_err("halted");
    let msg = err.to_string();
    assert!(matches!(err, TickError::DeepReorg { .. }), "{msg}");
    assert!(
        msg.contains("burns") && msg.contains(&format!("block {head} was 0x")) && msg.contains("now has 0x"),
        "{msg}"
    );
    let pg = w.pg().await;
    let halted = halted_reason(&pg).await;
    assert!(
        halted.is_some_and(|h| h.contains("logcursor rewind")),
        "status shows the halt"
    );
    assert!(app.tick_once().await.is_err(), "stays halted");
    assert_eq!(cursor_of(&pg, "burns").await, Some(head), "a halt moves nothing");

    let to = head - 5;
    let r = logcursor::admin::rewind(&w.config().build(), "operator", &Default::default(), "burns", to)
        .await
        .expect("rewind");
    assert_eq!((r.from, r.to), (head, to));
    app.drive_until_idle().await;
    w.assert_stored_equals_chain(&pg).await;
    let audit: Vec<(i64, i64, String)> = pg
        .query("SELECT from_block, to_block, by FROM cursor_rewinds", &[])
        .await
        .expect("audit")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(audit, vec![(head, to, "operator".to_string())]);
    let halted = halted_reason(&pg).await;
    assert_eq!(halted, None, "the rewind resumed the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_reorg_under_rewind_leaves_exactly_the_canonical_logs_and_one_audit_row() {
    let (w, app, head) = ingest_then_reorg_below_the_cursor("rewind").await;
    let first = app.tick_once().await.expect("rewinds");
    let TickOutcome::Rewound {
        from,
        to,
        events_deleted,
    } = first
    else {
        panic!("{first:?}")
    };
    assert_eq!(from, head);
    assert!(
        to < head - 4 && to >= head - 8,
        "back to the newest stored block still canonical: {to}"
    );
    assert!(events_deleted > 0);
    w.chain.mine(1).await;
    app.drive_until_idle().await;
    let pg = w.pg().await;
    w.assert_stored_equals_chain(&pg).await;
    let audits: i64 = pg
        .query_one("SELECT count(*) FROM cursor_rewinds", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(audits, 1);
    let amounts: BTreeSet<String> = pg
        .query(
            "SELECT params->>'amount' FROM events WHERE (params->>'amount')::numeric >= 5000",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        amounts.len(),
        7,
        "the replacement blocks' events are stored: {amounts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finality_tags_bound_the_safe_head_and_the_lower_bound_wins() {
    let anvil = Anvil::start().await;
    let chain = Chain::new(&anvil.url).await;
    let emitter = chain.deploy_emitter().await;
    chain.emit_burns(&emitter, 30, |_| 1).await;
    chain.mine(70).await;
    let tag_number = |tag: &'static str| {
        let chain = chain.clone();
        async move { hex_i64(&chain.rpc("eth_getBlockByNumber", json!([tag, false])).await["number"]) }
    };
    for (finality, confirmations) in [("finalized", 0), ("safe", 0), ("safe", 60)] {
        let db = TestDb::new().await;
        let app = TestConfig::new(&db.url, &anvil.url, &emitter)
            .stream_toml(&format!("finality = \"{finality}\""))
            .stream(move |s| s.confirmations = u64::try_from(confirmations).expect("confirmations"))
            .replica("r")
            .await;
        app.drive_until_idle().await;
        let expected = tag_number(if finality == "finalized" { "finalized" } else { "safe" })
            .await
            .min(chain.block_number().await - confirmations);
        let cursor = cursor_of(&db.client().await, "burns").await;
        assert_eq!(
            cursor,
            Some(expected),
            "finality = {finality}, confirmations = {confirmations}"
        );
    }
}

/// `status` judges the safe head as the tick does: a `finalized` stream
/// caught up with its tag shows no lag, though the head is far above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_safe_head_the_finality_tag_bounds_and_no_lag_once_caught_up() {
    let w = World::new().await;
    w.emit_burns(10, |_| 1).await;
    w.chain.mine(70).await;
    let cfg = w.config().stream_toml("finality = \"finalized\"").build();
    build_app(&cfg, "r").await.drive_until_idle().await;
    let finalized = hex_i64(&w.chain.rpc("eth_getBlockByNumber", json!(["finalized", false])).await["number"]);
    let head = w.chain.block_number().await;
    assert!(
        finalized < head,
        "anvil finalizes below its head ({finalized} < {head})"
    );

    let status = logcursor::status::collect(&cfg, "status").await.expect("status");
    assert_eq!(status[0].head, Some(u64::try_from(head).expect("head")));
    assert_eq!(status[0].safe_head, Some(u64::try_from(finalized).expect("finalized")));
    assert_eq!(status[0].cursor, Some(finalized), "the tick stopped at the tag");
    assert_eq!(status[0].lag_blocks, Some(0), "caught up: no lag");
}

/// Header requests (`eth_getBlockByNumber`) through a proxy, held until
/// released: all of them, or only the first.
struct Hold {
    held: Arc<AtomicBool>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Hold {
    fn headers(proxy: &Proxy, only_first: bool) -> Hold {
        let (held, release) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(tokio::sync::Semaphore::new(0)),
        );
        proxy.set({
            let (held, release) = (held.clone(), release.clone());
            move |r| {
                if method_of(r) != "eth_getBlockByNumber" || (held.swap(true, Ordering::SeqCst) && only_first) {
                    return Action::Forward;
                }
                let release = release.clone();
                Action::After(Box::pin(async move {
                    let _ = release.acquire().await;
                }))
            }
        });
        Hold { held, release }
    }

    /// Until a header request is held.
    async fn wait(&self) {
        wait_for("a header request held", Duration::from_secs(30), || async {
            self.held.load(Ordering::SeqCst).then_some(())
        })
        .await
    }

    fn release(&self) {
        self.release.add_permits(1_000);
    }
}

/// The world's config through `proxy`, with RPC deadlines long enough for
/// held requests to outlast the test's waits.
fn long_deadlines(w: &World, proxy: &Proxy) -> logcursor::config::Config {
    w.config()
        .rpc(&proxy.url)
        .stream_toml("rpc_timeout = \"60s\"\nrpc_budget = \"120s\"")
        .build()
}

/// An operator's rewind asks the chain for the headers it checks before it
/// takes the cursor lock: however slow the provider, replicas go on, and
/// the rewind's session is never idle in a transaction meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_rewind_asks_the_chain_with_no_transaction_open_and_replicas_go_on_meanwhile() {
    let w = World::new().await;
    w.emit_burns(12, |_| 1).await;
    let pg = w.migrate().await;
    let app = w.replica("r").await;
    app.tick_until_idle().await;
    let to = cursor_of(&pg, "burns").await.expect("cursor") - 4;

    // The rewind's header requests wait until released.
    let proxy = Proxy::start(&w.anvil.url).await;
    let hold = Hold::headers(&proxy, false);
    let cfg = long_deadlines(&w, &proxy);
    let rewind =
        tokio::spawn(async move { logcursor::admin::rewind(&cfg, "operator", &Default::default(), "burns", to).await });
    hold.wait().await;

    let in_transaction: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'operator' AND xact_start IS NOT NULL",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert_eq!(in_transaction, 0, "no transaction is open while the chain is asked");
    w.emit_burns(2, |_| 1).await;
    app.tick_until_idle().await; // takes the cursor lock: nobody holds it
    let from = cursor_of(&pg, "burns").await.expect("cursor");

    hold.release();
    let r = rewind.await.expect("join").expect("rewind");
    assert_eq!(
        (r.from, r.to),
        (from, to),
        "rewound from where the replica left the cursor"
    );
    assert_eq!(cursor_of(&pg, "burns").await, Some(to));
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&pg).await;
}

/// A stored hash at or below `--to` that changes while the rewind asks the
/// chain (gap fill, another rewind) is seen under the lock: the rewind
/// checks again, on what is stored now, and refuses to keep what the
/// chain no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_hash_that_changes_while_the_rewind_asks_the_chain_is_checked_again() {
    let w = World::new().await;
    w.emit_burns(12, |_| 1).await;
    let pg = w.migrate().await;
    w.replica("r").await.tick_until_idle().await;
    let to = cursor_of(&pg, "burns").await.expect("cursor") - 4;
    let below = to - 2; // a block at or below `to` that holds an event

    let proxy = Proxy::start(&w.anvil.url).await;
    let hold = Hold::headers(&proxy, true); // only the first check is held
    let cfg = long_deadlines(&w, &proxy);
    let rewind =
        tokio::spawn(async move { logcursor::admin::rewind(&cfg, "operator", &Default::default(), "burns", to).await });
    hold.wait().await;
    // Meanwhile, block `below` is stored under another hash.
    let changed = pg
        .execute(
            "UPDATE events SET block_hash = '\\x00000000000000000000000000000000000000000000000000000000000000ee'::bytea
              WHERE stream = 'burns' AND block_number = $1",
            &[&below],
        )
        .await
        .expect("change a stored hash");
    assert_eq!(changed, 1);
    hold.release();

    let refused = rewind.await.expect("join").expect_err("refused on the second check");
    assert!(
        refused
            .to_string()
            .contains(&format!("block {below} (at or below --to {to})")),
        "{refused}"
    );
    assert_eq!(cursor_of(&pg, "burns").await, Some(to + 4), "nothing moved");
}

/// A node that fails the finality tag leaves `status` the head it knows,
/// with the safe head unknown and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_keeps_the_head_when_the_finality_tag_fails() {
    let w = World::new().await;
    w.migrate().await;
    let proxy = Proxy::start(&w.anvil.url).await;
    proxy.set(|r| {
        if method_of(r) == "eth_getBlockByNumber" && r["params"][0] == "finalized" {
            rpc_error(r, -32603, "internal error: no finalized block", None)
        } else {
            Action::Forward
        }
    });
    let cfg = w
        .config()
        .rpc(&proxy.url)
        .stream_toml("finality = \"finalized\"\nrpc_attempts = 1")
        .build();
    let head = w.chain.block_number().await;
    let status = logcursor::status::collect(&cfg, "status").await.expect("status");
    assert_eq!(status[0].head, Some(u64::try_from(head).expect("head")));
    assert_eq!(status[0].safe_head, None);
    let why = status[0].rpc_error.as_deref().unwrap_or_default();
    assert!(why.contains("safe head unknown (finalized block)"), "{why}");
}
