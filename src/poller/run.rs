//! The per-stream loop: wait for work, tick, wait again.
//!
//! With the endpoint's head follower (`chain::heads`, one per endpoint for
//! the whole replica) a stream does nothing while it is caught up: it waits
//! for its endpoint's head to change. Then, if the new safe head is past
//! the cursor it last saw (or the head may have been reorganised), it takes
//! one of the replica's tick permits (bounded by the pool) and ticks with
//! `NOWAIT`: a row another replica is ticking is never waited on — the
//! stream pauses briefly and looks again (by then the holder usually has
//! committed and the stream finds itself caught up), so a pooled connection
//! is never parked on another replica's lock, and streams spread over the
//! replicas instead of queueing behind each other.
//!
//! Without followers (a stream built outside an app) the loop polls: a
//! tick every `poll_interval`, each asking its endpoint for the head.
//!
//! A stream behind the head whose new blocks hold none of its logs (the
//! follower's hints, see `chain::heads`) waits up to `poll_interval` and
//! moves over several blocks at once, so that with hundreds of streams the
//! ones with events tick first; a hint only delays such a tick, the tick
//! itself still reads and checks its range.
//!
//! I5 (after faults stop, the cursor reaches the safe head in bounded
//! time): every failure is retried with a backoff capped at 30 s
//! ([`pace`](super::pace)); a busy row is not a failure.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pace::{self, Pace, Pacing, Woken};
use super::tick::Heads;
use super::{Poller, TickError, TickOutcome};
use crate::backoff::{jitter, Failures, TICK};
use crate::chain::heads::Head;
use crate::config::Finality;
use crate::store::cursor::LockMode;
use crate::types::Header;

/// A row another replica holds is looked at again after about this long.
const BUSY_PAUSE: Duration = Duration::from_millis(150);
/// Tick permits a lazy tick (cursor only, or a re-look) leaves free.
const RESERVED_FOR_EVENTS: usize = 2;
/// A lazy tick waiting for room looks again after about this long.
const LAZY_RETRY: Duration = Duration::from_millis(10);

impl Poller {
    /// Ticks until `cancel` fires. Returns only then: failures are retried.
    pub async fn run(&self, cancel: CancellationToken) {
        if self.stream.followers.is_empty() {
            return self.run_polling(cancel).await;
        }
        let mut failures = Failures::new(TICK);
        let mut progress = Progress::default();
        let mut last: Option<Header> = None;
        let mut force = true; // look once at start, whatever the head says
                              // When this replica last ticked the stream (see the deferral below).
        let mut last_tick = Instant::now();
        // This tick only moves the cursor over blocks without the stream's
        // logs, or looks again: it leaves tick permits to ticks with events.
        let mut lazy = false;
        while !cancel.is_cancelled() {
            let endpoint = self.stream.chain.pick().index();
            let follower = &self.stream.followers[endpoint.min(self.stream.followers.len() - 1)];
            let mut heads_rx = follower.watch();
            let Some(head) = *heads_rx.borrow_and_update() else {
                // No head yet: wait for the follower's first.
                if pace::changed(&mut heads_rx, self.stream.cfg.poll_interval, &cancel).await == Woken::Cancelled {
                    break;
                }
                continue;
            };
            let heads = self.heads_of(&head, last.as_ref());
            last = Some(head.header);
            let seen = self.seen.load(Ordering::Relaxed);
            let behind = i64::try_from(heads.safe_head).unwrap_or(i64::MAX) > seen;
            if !(force || behind || heads.suspect_reorg == Some(true)) {
                // Caught up as far as this replica knows: no database, no request.
                self.idle_wait_ms.store(1, Ordering::Relaxed);
                let woken = pace::changed(&mut heads_rx, self.stream.cfg.ws_poll_interval, &cancel).await;
                self.idle_wait_ms.store(0, Ordering::Relaxed);
                match woken {
                    Woken::Cancelled => break,
                    // The safety re-look: a cheap read, in case another
                    // replica's view or an operator moved the cursor.
                    Woken::TimedOut => (force, lazy) = (true, true),
                    Woken::Head => {}
                }
                continue;
            }
            // Behind, but the hints say the new blocks hold none of this
            // stream's logs: nothing to store, only the cursor to move. It
            // moves at most once per poll_interval then, several blocks at
            // a time, so the streams whose blocks hold logs tick first.
            if !force {
                let from = u64::try_from(seen.saturating_add(1)).unwrap_or(0);
                let due = last_tick + self.stream.cfg.poll_interval;
                let now = Instant::now();
                let short = heads.safe_head.saturating_sub(from) < self.stream.cfg.max_block_range;
                if now < due && short && follower.holds_logs(from, heads.safe_head, &self.stream.filter) == Some(false)
                {
                    self.metrics.ticks_deferred.inc();
                    match pace::changed(&mut heads_rx, due - now, &cancel).await {
                        Woken::Cancelled => break,
                        Woken::TimedOut => (force, lazy) = (true, true),
                        Woken::Head => {}
                    }
                    continue;
                }
            }
            if lazy && !self.room_for_lazy(&cancel).await {
                break;
            }
            lazy = false;
            last_tick = Instant::now();
            let result = {
                let Ok(_permit) = self.permits.acquire().await else {
                    break; // closed: the app is stopping
                };
                self.tick_with(&cancel, Some(heads), LockMode::NoWait).await
            };
            force = false;
            let pace = Pace::of(&result);
            if pace == Pace::Stop {
                break;
            }
            let wait = match pace {
                Pace::Advanced => {
                    failures.reset();
                    Duration::ZERO
                }
                Pace::Again => Duration::ZERO,
                Pace::Idle => {
                    failures.reset();
                    Duration::ZERO // wait for the next head, above
                }
                // An old replica whose filter was replaced (a rolling
                // update): it backs off on the failure schedule, not the
                // busy pause, and says so once.
                Pace::Busy if matches!(result, Err(TickError::FilterReplaced { .. })) => failures.failed(),
                Pace::Busy => jitter(BUSY_PAUSE * 2),
                Pace::Failed => failures.failed(),
                Pace::Stop => break,
            };
            self.report(&result, &mut progress, &failures, wait);
            if pace == Pace::Busy || pace == Pace::Failed {
                force = true; // look again after the pause, head or not
                if !pace::pause(wait, None, &cancel).await {
                    break;
                }
            }
        }
    }

    /// Waits until a lazy tick leaves [`RESERVED_FOR_EVENTS`] tick permits
    /// free (when the replica has more than that many), so that a stream
    /// whose new blocks hold events never queues behind cursor-only ticks.
    /// `false`: cancelled.
    async fn room_for_lazy(&self, cancel: &CancellationToken) -> bool {
        if self.permits_total <= RESERVED_FOR_EVENTS {
            return true;
        }
        while self.permits.available_permits() <= RESERVED_FOR_EVENTS {
            if !pace::pause(jitter(LAZY_RETRY), None, cancel).await {
                return false;
            }
        }
        true
    }

    /// The heads a tick works against, from the follower's `head`.
    fn heads_of(&self, head: &Head, last: Option<&Header>) -> Heads {
        let cfg = &self.stream.cfg;
        let tagged = match cfg.finality {
            Finality::Latest => None,
            Finality::Safe => head.safe,
            Finality::Finalized => head.finalized,
        };
        let safe_head = cfg.safe_head(head.header.number, tagged);
        // A head that simply extends the last one cannot have reorganised
        // anything below it; anything else (a jump, the same height with
        // another hash) might have.
        let suspect = last.map(|l| {
            l.hash != head.header.hash && !(head.header.number == l.number + 1 && head.header.parent_hash == l.hash)
        });
        Heads {
            head: head.header.number,
            head_hash: head.header.hash,
            safe_head,
            suspect_reorg: suspect.or(Some(true)),
        }
    }

    /// Logs what a tick did (progress of a backfill, a failure).
    fn report(
        &self,
        result: &Result<TickOutcome, TickError>,
        progress: &mut Progress,
        failures: &Failures,
        wait: Duration,
    ) {
        let name = &self.stream.cfg.name;
        match result {
            Ok(TickOutcome::Advanced {
                from,
                to,
                inserted,
                safe_head,
                ..
            }) => progress.advanced(
                name,
                to - from + 1,
                *inserted,
                safe_head.saturating_sub(*to),
                self.stream.cfg.max_block_range,
            ),
            Err(e @ TickError::FilterReplaced { .. }) if failures.count() <= 1 => {
                tracing::warn!(stream = %name, error = %e, "backing off")
            }
            Err(TickError::FilterReplaced { .. }) => {}
            Err(e) if e.is_lock_busy() => {
                tracing::debug!(stream = %name, "cursor row busy: another replica is ticking it")
            }
            Err(e) => {
                tracing::error!(stream = %name, error = %e, attempt = failures.count(), retry_in = ?wait, "tick failed and rolled back")
            }
            Ok(_) => {}
        }
    }

    /// The loop without followers: a tick every `poll_interval`, each
    /// asking the endpoint for the head, waiting for a busy lock.
    async fn run_polling(&self, cancel: CancellationToken) {
        let pacing = Pacing::of(&self.stream.cfg, self.limits.lock_timeout);
        let mut failures = Failures::new(TICK);
        let mut progress = Progress::default();
        while !cancel.is_cancelled() {
            let result = self.tick(&cancel).await;
            let pace = Pace::of(&result);
            if pace == Pace::Stop {
                break;
            }
            let wait = pacing.after(pace, &mut failures, false);
            self.report(&result, &mut progress, &failures, wait);
            if wait.is_zero() {
                continue;
            }
            if pace == Pace::Idle {
                let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                self.idle_wait_ms.store(ms, Ordering::Relaxed);
            }
            let go_on = pace::pause(wait, None, &cancel).await;
            self.idle_wait_ms.store(0, Ordering::Relaxed);
            if !go_on {
                break;
            }
        }
    }
}

/// Backfill progress: logged at most every [`Progress::EVERY`] while a
/// stream is far behind, so a long backfill says how long it will take.
#[derive(Default)]
struct Progress {
    window_start: Option<Instant>,
    blocks: u64,
    events: u64,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(5);

    fn advanced(&mut self, stream: &str, blocks: u64, events: u64, remaining: u64, max_range: u64) {
        if remaining <= max_range {
            // Caught up (or nearly): live mode, nothing to report.
            *self = Progress::default();
            return;
        }
        let started = *self.window_start.get_or_insert_with(Instant::now);
        self.blocks += blocks;
        self.events += events;
        let elapsed = started.elapsed();
        if elapsed >= Self::EVERY {
            let secs = elapsed.as_secs_f64();
            let blocks_per_sec = self.blocks as f64 / secs;
            let eta = (blocks_per_sec > 0.0).then(|| Duration::from_secs_f64(remaining as f64 / blocks_per_sec));
            tracing::info!(
                stream,
                blocks_per_sec = format!("{blocks_per_sec:.1}"),
                events_per_sec = format!("{:.1}", self.events as f64 / secs),
                blocks_remaining = remaining,
                eta = eta.map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()),
                "backfill progress"
            );
            *self = Progress::default();
        }
    }
}
