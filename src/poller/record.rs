//! What a poller knows of its own work, kept by the poller (not by its
//! metrics): the last tick as it saw it (for `/status`) and the totals of
//! this run (for the exit summary). After each tick [`Poller::record`]
//! updates both, then the metrics from them.

use std::time::Duration;

use super::metrics::{gauge_value, Outcome};
use super::{Poller, TickError, TickOutcome};
use crate::types::{BlockNumber, Processed};

/// The last tick, as this replica saw it.
#[derive(Debug, Clone, Default)]
pub struct LastTick {
    /// `advanced`, `idle`, `error`, … (empty before the first tick).
    pub outcome: &'static str,
    /// The error of a failed tick.
    pub error: Option<String>,
    /// The cursor the tick read or moved (`None` before the first tick).
    pub cursor: Option<Processed>,
    /// Timestamp (epoch seconds) of the cursor's block, once a tick advanced to it.
    pub cursor_time: Option<u64>,
    pub head: u64,
    pub safe_head: u64,
}

impl LastTick {
    /// Blocks between the cursor and the safe head (0 when unknown or caught up).
    pub fn lag_blocks(&self) -> u64 {
        match self.cursor {
            None => 0,
            Some(c) => u64::try_from(gauge_value(self.safe_head).saturating_sub(c.to_db())).unwrap_or(0),
        }
    }
}

/// Counts of this run, for the exit summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub ticks: u64,
    /// Ticks that moved the cursor over a range.
    pub advanced: u64,
    /// Ticks that failed and rolled back.
    pub failures: u64,
    /// Lock waits that timed out (another replica held the lock): not failures.
    pub lock_timeouts: u64,
    pub events_inserted: u64,
    pub duplicates: u64,
}

/// A poller's record of its ticks.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub last: LastTick,
    pub totals: Totals,
}

impl Poller {
    /// The last tick, as this replica saw it.
    pub fn last_tick(&self) -> LastTick {
        self.observed.lock().unwrap_or_else(|p| p.into_inner()).last.clone()
    }

    /// This run's totals.
    pub fn totals(&self) -> Totals {
        self.observed.lock().unwrap_or_else(|p| p.into_inner()).totals
    }

    /// Records a finished tick: first what the poller knows, then the metrics.
    pub(crate) fn record(&self, result: &Result<TickOutcome, TickError>, outcome: &'static str, took: Duration) {
        let m = &self.metrics;
        let mut o = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        o.totals.ticks += 1;
        o.last.outcome = outcome;
        o.last.error = result.as_ref().err().map(|e| e.to_string());
        match result {
            Ok(TickOutcome::Advanced {
                to,
                head,
                safe_head,
                to_timestamp,
                inserted,
                duplicates,
                dead_lettered,
                lock_wait,
                lock_hold,
                ..
            }) => {
                o.totals.advanced += 1;
                o.totals.events_inserted += inserted;
                o.totals.duplicates += duplicates;
                o.last.cursor = Some(Processed(Some(BlockNumber::saturating(*to))));
                o.last.cursor_time = Some(*to_timestamp);
                (o.last.head, o.last.safe_head) = (*head, *safe_head);
                m.events_inserted.inc_by(*inserted);
                m.duplicates.inc_by(*duplicates);
                m.dead_letters.inc_by(*dead_lettered as u64);
                m.last_advance_timestamp_seconds
                    .set(gauge_value(crate::metrics::now_secs()));
                m.lag_seconds.set(*to_timestamp);
                m.lock_wait_seconds.observe(lock_wait.as_secs_f64());
                m.lock_hold_seconds.observe(lock_hold.as_secs_f64());
            }
            Ok(TickOutcome::Idle {
                cursor,
                head,
                safe_head,
            }) => {
                o.last.cursor = Some(Processed::from_db(*cursor));
                (o.last.head, o.last.safe_head) = (*head, *safe_head);
            }
            Ok(TickOutcome::Partial {
                inserted,
                dead_lettered,
                ..
            }) => {
                o.totals.events_inserted += inserted;
                m.events_inserted.inc_by(*inserted);
                m.dead_letters.inc_by(*dead_lettered as u64);
            }
            Ok(TickOutcome::Rewound { to, .. }) => {
                o.last.cursor = Some(Processed::from_db(*to));
                m.reorgs.inc();
            }
            Ok(TickOutcome::Skipped { to, .. }) => {
                o.last.cursor = Some(Processed(Some(BlockNumber::saturating(*to))));
                m.ranges_skipped.inc();
            }
            Err(TickError::DeepReorg { .. }) => {
                o.totals.failures += 1;
                m.reorgs.inc();
            }
            Err(e) if e.is_lock_busy() => {
                o.totals.lock_timeouts += 1;
                m.lock_timeouts.inc();
            }
            Err(TickError::Cancelled | TickError::FilterReplaced { .. }) => {}
            Err(_) => o.totals.failures += 1,
        }
        m.ticks.with(Outcome { outcome }).inc();
        m.tick_duration_seconds.observe(took.as_secs_f64());
        m.block_range.set(gauge_value(self.stream.chain.pick().log_span()));
        self.show(&o.last);
    }

    /// The heads and the cursor a tick read before doing anything else:
    /// known now, whatever the tick's outcome, so that a stream failing
    /// since this replica started still shows how far behind it is.
    pub(crate) fn saw_heads(&self, head: u64, safe_head: u64, cursor: Processed) {
        let mut o = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        (o.last.head, o.last.safe_head, o.last.cursor) = (head, safe_head, Some(cursor));
        self.show(&o.last);
    }

    /// The cursor, heads and lag gauges, from `last`.
    fn show(&self, last: &LastTick) {
        let m = &self.metrics;
        if let Some(c) = last.cursor {
            m.cursor_block.set(c.to_db());
        }
        m.chain_head_block.set(gauge_value(last.head));
        m.safe_head_block.set(gauge_value(last.safe_head));
        m.lag_blocks.set(gauge_value(last.lag_blocks()));
    }
}
