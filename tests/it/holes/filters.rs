//! A filter change never loses history (I9), and pending ranges can be
//! listed and retried by an operator.

use logcursor::admin;
use logcursor::poller::gapfill::GapOutcome;
use logcursor::poller::{TickError, TickOutcome};
use logcursor::store::failed_ranges::Kind;
use sha3::{Digest, Keccak256};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::logs_on_chain;
use crate::support::proxy::{delayed, log_range, rpc_error, Action, Proxy};
use crate::support::*;

const UNLISTED: &str = "event Unlisted(uint256 value)";

fn topic0(signature: &str) -> String {
    format!("0x{}", hex::encode(Keccak256::digest(signature.as_bytes())))
}

/// Some of everything on both contracts: burns and Unlisted events.
async fn history(chain: &Chain, contracts: &[&str], rounds: u64, base: u64) {
    let mut last = String::new();
    for i in 0..rounds {
        for (k, c) in contracts.iter().enumerate() {
            chain.burn(c, 2, base + i * 10 + k as u64 * 100).await;
            last = chain.unlisted(c, base + i).await;
        }
    }
    chain.receipt(&last).await;
}

/// A rolling update adds an event and an address to a running stream.
///
/// Checked by reverting each half: `filter::adopt` without its
/// `record_backfill` loop (the history of the added filter is never
/// stored, and status shows no backfill), and `filter::check` adopting a
/// replaced filter instead of returning `FilterReplaced` (the old replica
/// takes the cursor back under its filter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_event_and_address_are_backfilled_while_the_cursor_moves_and_old_replicas_back_off() {
    let w = World::new().await;
    let (chain, emitter) = (&w.chain, w.emitter.as_str());
    let second = chain.deploy_emitter().await;
    history(chain, &[emitter, &second], 6, 0).await;
    let pg = w.migrate().await;
    let old = w.replica("old").await;
    old.tick_until_idle().await;
    let adopted_at = cursor_of(&pg, "burns").await.expect("cursor");

    let new_cfg = w
        .config()
        .stream_toml(&format!(
            "addresses = [\"{emitter}\", \"{second}\"]\nevents = [\"{BURNED}\", \"{UNLISTED}\"]"
        ))
        .build();
    let new = build_app(&new_cfg, "new").await;
    history(chain, &[emitter, &second], 2, 1_000).await;
    let first = new.pollers()[0].tick(&CancellationToken::new()).await.expect("tick");
    assert!(
        matches!(first, TickOutcome::Advanced { from, .. } if from as i64 == adopted_at + 1),
        "the new filter is adopted and the cursor moves on at once: {first:?}"
    );

    let pending = admin::gapfill_list(&new_cfg, "operator", Some("burns"))
        .await
        .expect("list");
    assert_eq!(
        pending.len(),
        2,
        "one backfill per added part of the filter: {pending:?}"
    );
    for r in &pending {
        assert_eq!((r.kind, r.from_block, r.to_block), (Kind::Backfill, 0, adopted_at));
    }
    let status = logcursor::status::collect(&new_cfg, "status").await.expect("status");
    assert_eq!(status[0].backfill_blocks_left, 2 * (adopted_at + 1));

    // The old replica, still running during the rollout, backs off.
    history(chain, &[emitter], 1, 2_000).await;
    let moves = cursor_history(&pg, "burns").await.len();
    for _ in 0..3 {
        let r = old.pollers()[0].tick(&CancellationToken::new()).await;
        assert!(matches!(r, Err(TickError::FilterReplaced { .. })), "{r:?}");
    }
    assert_eq!(
        cursor_history(&pg, "burns").await.len(),
        moves,
        "the old replica moved nothing"
    );

    // The backfill goes on while the live cursor keeps moving.
    let filler = new.gap_filler().expect("gap-fill worker");
    let mut left = Vec::new();
    loop {
        match filler.work_once().await.expect("gap-fill pass") {
            GapOutcome::Idle => break,
            GapOutcome::Filled { .. } | GapOutcome::Progressed { .. } => {}
            other => panic!("{other:?}"),
        }
        left.push(logcursor::status::collect(&new_cfg, "status").await.expect("status")[0].backfill_blocks_left);
        new.pollers()[0]
            .tick(&CancellationToken::new())
            .await
            .expect("live tick");
    }
    assert_eq!(left.last(), Some(&0), "status counted down: {left:?}");
    assert!(left.windows(2).all(|w| w[1] < w[0]), "{left:?}");
    new.tick_until_idle().await;

    let cursor = cursor_of(&pg, "burns").await.expect("cursor");
    assert_eq!(cursor, chain.block_number().await);
    let mut stored = stored_logs(&pg).await;
    stored.sort();
    let expected: Vec<LogKey> = logs_on_chain(
        chain,
        &[emitter, &second],
        &[&topic0("Burned(address,uint256)"), &topic0("Unlisted(uint256)")],
        cursor,
    )
    .await
    .into_iter()
    .collect();
    assert_eq!(stored, expected, "every log of the new filter, history included, once");
    assert!(admin::gapfill_list(&new_cfg, "operator", None)
        .await
        .expect("list")
        .is_empty());
    // Caught up, the old replica is idle (no lock, nothing to move); with
    // a new block it backs off again.
    history(chain, &[emitter], 1, 3_000).await;
    let old_again = old.pollers()[0].tick(&CancellationToken::new()).await;
    assert!(
        matches!(old_again, Err(TickError::FilterReplaced { .. })),
        "{old_again:?}"
    );
}

/// `logcursor gapfill list|retry ID|retry --dead`, through the binary and
/// the library. Checked by making `failed_ranges::retry_now` a no-op (the
/// range then stays where it was and the worker finds nothing due).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gapfill_list_shows_pending_ranges_and_retry_makes_them_due_again() {
    let w = World::new().await;
    w.emit_burns(20, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    proxy.set(|r| match log_range(r) {
        Some((f, t)) if (f..=t).contains(&9) => rpc_error(r, -32000, "history for this range is not available", None),
        _ => Action::Forward,
    });
    // The CLI reads the same config from its file.
    let config = w.config().rpc(&proxy.url).stream_toml(
        "rpc_attempts = 1\nmax_block_range = 4\non_unfetchable_range = \"skip_and_backfill\"\nrange_attempts = 1\n\
         gapfill_backoff = \"1h\"\ngapfill_max_attempts = 2",
    );
    let file = config.file();
    let cfg = config.build();
    let cli = |args: &'static [&'static str]| {
        let path = file.path().to_path_buf();
        async move {
            let out = logcursor_cmd(args, &path, "operator")
                .output()
                .await
                .expect("run logcursor");
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            text(&out.stdout)
        }
    };
    let app = build_app(&cfg, "r").await;
    tick_until_skipped_and_idle(&app).await;
    let filler = app.gap_filler().expect("worker");
    let pg = w.pg().await;

    // A failure schedules the next try an hour away; `retry ID` makes it due now.
    assert!(matches!(
        filler.work_once().await.expect("pass"),
        GapOutcome::Failed { dead: false, .. }
    ));
    assert_eq!(
        filler.work_once().await.expect("pass"),
        GapOutcome::Idle,
        "not due for an hour"
    );
    let rows = admin::gapfill_list(&cfg, "operator", None).await.expect("list");
    assert_eq!(
        (rows.len(), rows[0].kind, rows[0].attempts),
        (1, Kind::Skipped, 1),
        "{rows:?}"
    );
    let id = rows[0].id;
    let retried = logcursor_cmd(&["gapfill", "retry", &id.to_string()], file.path(), "operator")
        .output()
        .await
        .expect("run");
    assert!(
        text(&retried.stdout).contains("1 ranges due now"),
        "{}",
        text(&retried.stderr)
    );
    assert!(matches!(
        filler.work_once().await.expect("pass"),
        GapOutcome::Failed { dead: false, .. }
    ));
    pg.execute("UPDATE failed_ranges SET next_attempt_at = now()", &[])
        .await
        .expect("an hour later");
    assert!(matches!(
        filler.work_once().await.expect("pass"),
        GapOutcome::Failed { dead: true, .. }
    ));

    let out = cli(&["gapfill", "list"]).await;
    assert!(
        out.contains("skipped") && out.contains("true") && out.contains("1 pending ranges"),
        "{out}"
    );
    assert!(out.contains("not available"), "{out}");
    proxy.pass();
    assert_eq!(
        filler.work_once().await.expect("pass"),
        GapOutcome::Idle,
        "a dead range waits"
    );
    assert!(cli(&["gapfill", "retry", "--dead"]).await.contains("1 ranges due now"));
    let rows = admin::gapfill_list(&cfg, "operator", None).await.expect("list");
    assert_eq!((rows[0].dead, rows[0].attempts), (false, 0));
    assert!(matches!(filler.work_once().await.expect("pass"), GapOutcome::Filled { id: i, .. } if i == id));
    assert!(admin::gapfill_list(&cfg, "operator", None)
        .await
        .expect("list")
        .is_empty());
    assert_eq!(
        admin::gapfill_retry(&cfg, "operator", &[], true).await.expect("retry"),
        0
    );
    w.assert_stored_equals_chain(&pg).await;
}

/// Ticks until idle, errors included (a refused range fails before it is skipped).
async fn tick_until_skipped_and_idle(app: &logcursor::app::App) -> Vec<Result<TickOutcome, String>> {
    let mut out = Vec::new();
    for _ in 0..200 {
        let r = app.pollers()[0].tick(&CancellationToken::new()).await;
        let idle = matches!(r, Ok(TickOutcome::Idle { .. }));
        out.push(r.map_err(|e| e.to_string()));
        if idle {
            return out;
        }
    }
    panic!("never idle: {out:?}")
}

/// Gap fill under the tick's bounds: it fetches before BEGIN (so a
/// provider slower than the idle bound does not matter: its transaction
/// never waits on the chain), commits the prefix it stored, and isolates a
/// single block too large for the provider as a row of its own while the
/// rest of the range goes on. Checked by making `GapFiller::fill` never
/// isolate (src/poller/gapfill.rs: `claim.from_block != claim.to_block` →
/// `false`): the range then fails whole at the block. It also found that a
/// row kept its lease after a chunk, so no worker could take the next chunk
/// before `gapfill_lease` ran out (the second pass was `Idle`): checked by
/// keeping the claim in `failed_ranges::progress` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_fill_fetches_before_begin_commits_its_prefix_and_isolates_an_overflowing_block() {
    const TOO_LARGE: u64 = 10;
    let w = World::new().await;
    w.emit_burns(20, |_| 2).await;
    let proxy = Proxy::start(&w.anvil.url).await;
    proxy.set(|r| match log_range(r) {
        Some((f, t)) if (f..=t).contains(&9) => rpc_error(r, -32000, "history for this range is not available", None),
        _ => Action::Forward,
    });
    let cfg = w
        .config()
        .rpc(&proxy.url)
        .stream_toml("on_unfetchable_range = \"skip_and_backfill\"")
        .stream(|s| {
            s.rpc_attempts = 1;
            s.rpc_timeout = Duration::from_secs(5);
            s.max_block_range = 8;
            s.range_attempts = 1;
            s.gapfill.backoff = Duration::from_secs(3600);
        })
        .database(|d| d.limits.idle_in_transaction_timeout = Duration::from_secs(1))
        .build();
    let app = build_app(&cfg, "r").await;
    tick_until_skipped_and_idle(&app).await;
    let pending = admin::gapfill_list(&cfg, "operator", None).await.expect("list");
    let (from, to) = (pending[0].from_block, pending[0].to_block);
    assert!(from < TOO_LARGE as i64 && (TOO_LARGE as i64) < to, "{pending:?}");

    // Now the provider answers, slower than the idle bound, and block 10
    // holds more logs than it serves.
    proxy.set(|r| match log_range(r) {
        Some((f, t)) if (f..=t).contains(&TOO_LARGE) => {
            rpc_error(r, -32602, "query returned more than 10000 results", None)
        }
        _ => delayed(Duration::from_millis(1_500)),
    });
    let filler = app.gap_filler().expect("worker");
    let mut outcomes = Vec::new();
    loop {
        let o = filler.work_once().await.expect("pass");
        if matches!(o, GapOutcome::Idle | GapOutcome::Failed { .. }) {
            outcomes.push(o);
            break;
        }
        outcomes.push(o);
    }
    assert!(
        matches!(outcomes[0], GapOutcome::Progressed { done_to, .. } if done_to == TOO_LARGE as i64 - 1),
        "the blocks before the large one commit: {outcomes:?}"
    );
    assert!(
        matches!(outcomes[1], GapOutcome::Isolated { block, .. } if block == TOO_LARGE as i64),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[2], GapOutcome::Filled { .. }),
        "the rest goes on: {outcomes:?}"
    );
    let left = admin::gapfill_list(&cfg, "operator", None).await.expect("list");
    assert_eq!(
        left.iter()
            .map(|r| (r.kind, r.from_block, r.to_block))
            .collect::<Vec<_>>(),
        vec![(Kind::Skipped, TOO_LARGE as i64, TOO_LARGE as i64)],
        "only the large block waits"
    );

    proxy.pass();
    assert_eq!(
        admin::gapfill_retry(&cfg, "operator", &[left[0].id], false)
            .await
            .expect("retry"),
        1
    );
    assert!(matches!(
        filler.work_once().await.expect("pass"),
        GapOutcome::Filled { .. }
    ));
    w.assert_stored_equals_chain(&w.pg().await).await;
}
