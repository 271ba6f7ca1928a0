//! The drain's grace period, on paused time.

use super::*;

#[tokio::test(start_paused = true)]
async fn the_drain_waits_for_ticks_that_end_within_the_grace_period() {
    let mut tasks = JoinSet::new();
    for secs in [1, 5, 12] {
        tasks.spawn(tokio::time::sleep(Duration::from_secs(secs)));
    }
    let drained = drain(&mut tasks, Duration::from_secs(20)).await;
    assert_eq!(drained.aborted, 0);
    assert_eq!(
        drained.took,
        Duration::from_secs(12),
        "as long as the slowest, no longer"
    );
    assert!(tasks.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_drain_aborts_what_is_left_when_the_grace_period_ends() {
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    tasks.spawn(tokio::time::sleep(Duration::from_secs(3)));
    {
        let finished = Arc::clone(&finished);
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            finished.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let drained = drain(&mut tasks, Duration::from_secs(20)).await;
    assert_eq!(drained.aborted, 1, "the tick still in flight");
    assert_eq!(
        drained.took,
        Duration::from_secs(20),
        "not a moment past the grace period"
    );
    assert!(tasks.is_empty());
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(
        !finished.load(std::sync::atomic::Ordering::Relaxed),
        "an aborted tick never runs to its end (its transaction rolls back)"
    );
}
