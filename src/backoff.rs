//! The one backoff of the codebase: exponential from a base, capped, with
//! jitter in `[d/2, d]` so that replicas that failed together do not retry
//! together. Every retrying loop uses it, each with its own constants
//! (below), so a reader finds every retry schedule in one place:
//!
//! | schedule      | base   | cap   | used by                                      |
//! |---------------|--------|-------|----------------------------------------------|
//! | [`TICK`]      | 500 ms | 30 s  | a stream's failed ticks (I5), gap fill passes, delivery workers |
//! | [`RPC`]       | 100 ms | 2 s   | one JSON-RPC request's retries               |
//! | [`CONNECT`]   | 100 ms | 5 s   | start-up's wait for the database and the chain, WebSocket reconnects |
//! | webhook's     | 1 s    | 5 min | a webhook delivery's retries (`backoff`, `backoff_max` of the webhook; a longer `Retry-After` wins) |
//!
//! Retries of a skipped range (gap fill) and of a webhook delivery are
//! scheduled on the database clock: their delays come from a [`Backoff`]
//! too, and only the resulting instant is computed by the database.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff: `base × 2^(attempt−1)`, at most `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

/// A stream's failed ticks (I5: every failure is retried, never more than
/// 30 s apart), gap-fill passes and delivery workers.
pub const TICK: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// One JSON-RPC request's retries on one endpoint.
pub const RPC: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
/// Waiting for a dependency to come up: the database at start, the chain
/// at start, a WebSocket subscription.
pub const CONNECT: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

impl Backoff {
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap }
    }

    /// The un-jittered delay before try `attempt + 1` (`attempt` ≥ 1 failures so far).
    pub fn nominal(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// [`Backoff::nominal`], jittered to `[d/2, d]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        jitter(self.nominal(attempt))
    }
}

/// A random duration in `[d/2, d]`.
pub fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::thread_rng().gen::<f64>())
}

/// Consecutive failures of one loop, and the wait each one earns.
#[derive(Debug, Clone, Copy)]
pub struct Failures {
    schedule: Backoff,
    count: u32,
}

impl Failures {
    pub fn new(schedule: Backoff) -> Failures {
        Failures { schedule, count: 0 }
    }

    /// Counts a failure; returns how long to wait before the next try.
    pub fn failed(&mut self) -> Duration {
        self.count = self.count.saturating_add(1);
        self.schedule.delay(self.count)
    }

    /// A success: the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.count = 0;
    }

    /// Failures since the last success.
    pub fn count(&self) -> u32 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_base_and_stay_capped() {
        for attempt in 1..64 {
            let nominal = TICK.nominal(attempt);
            let want = Duration::from_millis(500)
                .saturating_mul(1 << (attempt - 1).min(30))
                .min(Duration::from_secs(30));
            assert_eq!(nominal, want, "attempt {attempt}");
            let d = TICK.delay(attempt);
            assert!(
                d >= nominal / 2 && d <= nominal,
                "attempt {attempt}: {d:?} vs {nominal:?}"
            );
        }
        assert_eq!(RPC.nominal(1), Duration::from_millis(100));
        assert_eq!(RPC.nominal(3), Duration::from_millis(400));
        assert_eq!(RPC.nominal(9), Duration::from_secs(2));
    }

    #[test]
    fn failures_grow_the_wait_and_a_success_resets_it() {
        let mut f = Failures::new(TICK);
        let first = f.failed();
        assert!(first <= Duration::from_millis(500));
        for _ in 0..10 {
            f.failed();
        }
        assert_eq!(f.count(), 11);
        assert!(
            f.failed() >= Duration::from_secs(15),
            "capped at 30 s, jittered down to half at most"
        );
        f.reset();
        assert!(
            f.failed() <= Duration::from_millis(500),
            "back to the base after a success"
        );
    }
}
