//! How long the poll loop waits after a tick, and the wait itself.
//!
//! | after the tick               | wait                                       |
//! |------------------------------|--------------------------------------------|
//! | advanced                     | none; the failure count is reset           |
//! | rewound, skipped, partial    | none                                       |
//! | idle                         | `poll_interval`, or `ws_poll_interval` while the push subscription is live (a head or a change of the subscription ends it at once); the failure count is reset |
//! | lock busy, filter replaced   | `lock_timeout` clamped to [100 ms, 1 s], jittered; not a failure |
//! | failed                       | the [`TICK`](crate::backoff::TICK) backoff: 500 ms doubling to 30 s, jittered (I5) |
//!
//! Cancellation ends any wait at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{TickError, TickOutcome};
use crate::backoff::{jitter, Failures};
use crate::chain::ws::Push;
use crate::config::StreamConfig;

/// What a tick's result asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pace {
    /// A range was committed: go on at once.
    Advanced,
    /// Rewound, skipped or partial: go on at once.
    Again,
    /// Caught up.
    Idle,
    /// Another replica holds the lock, or this replica's filter was replaced.
    Busy,
    Failed,
    /// Cancelled while waiting for the lock.
    Stop,
}

impl Pace {
    pub(crate) fn of(result: &Result<TickOutcome, TickError>) -> Pace {
        match result {
            Ok(TickOutcome::Advanced { .. }) => Pace::Advanced,
            Ok(TickOutcome::Idle { .. }) => Pace::Idle,
            Ok(TickOutcome::Rewound { .. } | TickOutcome::Skipped { .. } | TickOutcome::Partial { .. }) => Pace::Again,
            Err(TickError::Cancelled) => Pace::Stop,
            Err(e) if e.is_back_off() => Pace::Busy,
            Err(_) => Pace::Failed,
        }
    }
}

/// The waits of one stream's loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    pub poll_interval: Duration,
    pub ws_poll_interval: Duration,
    pub lock_timeout: Duration,
}

impl Pacing {
    pub(crate) fn of(cfg: &StreamConfig, lock_timeout: Duration) -> Pacing {
        Pacing {
            poll_interval: cfg.poll_interval,
            ws_poll_interval: cfg.ws_poll_interval,
            lock_timeout,
        }
    }

    /// The wait after a tick that ended as `pace`; counts or resets `failures`.
    pub(crate) fn after(&self, pace: Pace, failures: &mut Failures, push_live: bool) -> Duration {
        match pace {
            Pace::Advanced => {
                failures.reset();
                Duration::ZERO
            }
            Pace::Again | Pace::Stop => Duration::ZERO,
            Pace::Idle => {
                failures.reset();
                if push_live {
                    self.ws_poll_interval
                } else {
                    self.poll_interval
                }
            }
            Pace::Busy => jitter(
                self.lock_timeout
                    .clamp(Duration::from_millis(100), Duration::from_secs(1)),
            ),
            Pace::Failed => failures.failed(),
        }
    }
}

/// How a wait for a new head ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// The head changed.
    Head,
    /// `at_most` passed without a new head (or the follower is gone).
    TimedOut,
    Cancelled,
}

/// Waits until the head in `rx` changes, `at_most` passes, or `cancel`
/// fires. A follower that stopped (its sender dropped) never changes the
/// head again: the wait then lasts `at_most`, never spins.
pub(crate) async fn changed<T>(
    rx: &mut tokio::sync::watch::Receiver<T>,
    at_most: Duration,
    cancel: &CancellationToken,
) -> Woken {
    let head = async {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = head => Woken::Head,
        _ = tokio::time::sleep(at_most) => Woken::TimedOut,
        _ = cancel.cancelled() => Woken::Cancelled,
    }
}

/// Waits `wait`, or less: until `push` wakes (a head, or the subscription
/// changed) when given, or `cancel` fires. `false`: cancelled.
pub(crate) async fn pause(wait: Duration, push: Option<&Push>, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = async { match push { Some(p) => p.woken().await, None => std::future::pending().await } } => true,
        _ = cancel.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::backoff::TICK;

    /// Tokio's timer rounds a sleep up to the next millisecond.
    fn waited(started: Instant, wait: Duration) {
        let took = started.elapsed();
        assert!(
            took >= wait && took < wait + Duration::from_millis(1),
            "waited {took:?}, not {wait:?}"
        );
    }

    const PACING: Pacing = Pacing {
        poll_interval: Duration::from_secs(1),
        ws_poll_interval: Duration::from_secs(30),
        lock_timeout: Duration::from_secs(5),
    };

    #[tokio::test(start_paused = true)]
    async fn an_idle_loop_waits_poll_interval_and_ws_poll_interval_while_push_is_live() {
        let mut failures = Failures::new(TICK);
        let cancel = CancellationToken::new();
        let wait = PACING.after(Pace::Idle, &mut failures, false);
        assert_eq!(wait, Duration::from_secs(1));
        let started = Instant::now();
        assert!(pause(wait, None, &cancel).await);
        assert_eq!(started.elapsed(), Duration::from_secs(1));

        let push = Push::default();
        let wait = PACING.after(Pace::Idle, &mut failures, true);
        assert_eq!(wait, Duration::from_secs(30));
        let started = Instant::now();
        assert!(pause(wait, Some(&push), &cancel).await);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(30),
            "no head: the whole safety-net wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_ends_the_idle_wait_and_cancellation_ends_any_wait() {
        let push = std::sync::Arc::new(Push::default());
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let head = {
            let push = std::sync::Arc::clone(&push);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(4)).await;
                push.head();
            })
        };
        assert!(pause(Duration::from_secs(30), Some(&push), &cancel).await);
        assert_eq!(started.elapsed(), Duration::from_secs(4), "woken by the head");
        head.await.expect("join");

        let started = Instant::now();
        let stop = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                cancel.cancel();
            })
        };
        assert!(!pause(Duration::from_secs(30), None, &cancel).await, "cancelled");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        stop.await.expect("join");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_longer_each_time_and_a_success_resets_the_wait() {
        let mut failures = Failures::new(TICK);
        let cancel = CancellationToken::new();
        let mut nominal = Duration::from_millis(500);
        for _ in 0..8 {
            let wait = PACING.after(Pace::Failed, &mut failures, false);
            assert!(
                wait >= nominal / 2 && wait <= nominal,
                "{wait:?} within [{:?}, {nominal:?}]",
                nominal / 2
            );
            let started = Instant::now();
            assert!(pause(wait, None, &cancel).await);
            waited(started, wait);
            nominal = (nominal * 2).min(Duration::from_secs(30));
        }
        assert_eq!(failures.count(), 8);
        assert!(
            PACING.after(Pace::Failed, &mut failures, false) >= Duration::from_secs(15),
            "capped at 30 s, jittered to half at most"
        );
        assert_eq!(PACING.after(Pace::Again, &mut failures, false), Duration::ZERO);
        assert_eq!(failures.count(), 9, "a rewind or a skip is no success");
        assert_eq!(PACING.after(Pace::Advanced, &mut failures, false), Duration::ZERO);
        assert!(PACING.after(Pace::Failed, &mut failures, false) <= Duration::from_millis(500));
        PACING.after(Pace::Idle, &mut failures, false);
        assert_eq!(failures.count(), 0, "an idle tick is a success too");
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_lock_pauses_briefly_and_is_not_a_failure() {
        let mut failures = Failures::new(TICK);
        failures.failed();
        for _ in 0..20 {
            let wait = PACING.after(Pace::Busy, &mut failures, false);
            assert!(
                wait >= Duration::from_millis(500) && wait <= Duration::from_secs(1),
                "lock_timeout 5 s clamped to 1 s, jittered: {wait:?}"
            );
        }
        assert_eq!(failures.count(), 1, "not counted, not reset");
        let short = Pacing {
            lock_timeout: Duration::from_millis(10),
            ..PACING
        };
        let wait = short.after(Pace::Busy, &mut failures, false);
        assert!(
            wait >= Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        let started = Instant::now();
        assert!(pause(wait, None, &CancellationToken::new()).await);
        waited(started, wait);
    }
}
