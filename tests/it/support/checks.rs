//! Waiting for a condition with a deadline (a gap-fill worker's outcomes
//! too), and the assertions most tests end with: stored rows equal the
//! chain, cursor moves form one forward chain.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use logcursor::poller::gapfill::{GapFiller, GapOutcome};
use tokio::time::Instant;

use super::chain::{Chain, LogKey};
use super::db::stored_logs;

/// Asserts that the moves form one forward chain from `start` to `end`:
/// each range starts right after the previous one ended, so no block range
/// was processed twice and none was skipped.
pub fn assert_contiguous_forward(history: &[(i64, i64, String)], start: i64, end: i64) {
    let mut at = start;
    for (old, new, by) in history {
        assert_eq!(*old, at, "a move by {by} started at {old}, expected {at}: {history:?}");
        assert!(
            new > old,
            "the cursor moved backward or stood still ({old} -> {new} by {by})"
        );
        at = *new;
    }
    assert_eq!(at, end, "the moves end at {at}, expected {end}");
}

/// Polls `check` until it yields a value or `within` passes.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Works `filler` until three of its attempts have failed, each failure's
/// `dead` flag and error shown to `check`; idle passes are waited through,
/// any other outcome fails the test.
pub async fn three_failed_gap_fills(what: &str, filler: &GapFiller, check: impl Fn(bool, &str)) {
    let failed = AtomicUsize::new(0);
    wait_for(what, Duration::from_secs(30), || async {
        match filler.work_once().await.expect("gap fill") {
            GapOutcome::Failed { dead, error, .. } => {
                check(dead, &error);
                failed.fetch_add(1, Ordering::SeqCst);
            }
            GapOutcome::Idle => {}
            other => panic!("{other:?}"),
        }
        (failed.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
}

/// Works `filler` until a pass fills a range.
pub async fn gap_fill_until_filled(filler: &GapFiller) {
    wait_for("the range filled", Duration::from_secs(30), || async {
        matches!(filler.work_once().await.expect("gap fill"), GapOutcome::Filled { .. }).then_some(())
    })
    .await;
}

/// The stored rows equal the chain's Burned logs up to block `to`, each once.
pub async fn assert_stored_up_to(pg: &tokio_postgres::Client, chain: &Chain, emitter: &str, to: i64) {
    let mut stored = stored_logs(pg).await;
    stored.sort();
    let on_chain: Vec<LogKey> = chain.burned_logs(emitter, to).await.into_iter().collect();
    assert_eq!(
        stored, on_chain,
        "stored rows equal the canonical chain's logs up to {to}, each once"
    );
}

/// [`assert_stored_up_to`] the current head.
pub async fn assert_stored_equals_chain(pg: &tokio_postgres::Client, chain: &Chain, emitter: &str) {
    let head = chain.block_number().await;
    assert_stored_up_to(pg, chain, emitter, head).await;
}
