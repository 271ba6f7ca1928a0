//! The per-stream poll loop: tick, then wait (`poll_interval` when caught
//! up, backoff with jitter after a failure, nothing while backfilling),
//! until cancelled. The tick itself is in [`tick`].
//!
//! I5 (after faults stop, the cursor reaches the safe head in bounded time):
//! every failure is retried, with a backoff capped at [`MAX_BACKOFF`], and a
//! successful tick resets it; a lock timeout (another replica is working) is
//! retried after a short jittered pause and is not a failure.

pub mod gapfill;
pub mod parts;
pub mod tick;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::chain::abi::{DecodeError, EventSet};
use crate::chain::{ChainClient, ChainError, ClientOptions, Hash32, LogFilter, RawLog};
use crate::config::{DatabaseConfig, StreamConfig};
use crate::metrics::{now_secs, StreamMetrics};
use crate::store::events::NewEvent;
use crate::store::pool::Database;
use crate::store::StoreError;

/// The longest wait between two attempts after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A configured stream with what its ticks need.
pub struct Stream {
    pub cfg: StreamConfig,
    /// Decoder for the configured events.
    pub events: EventSet,
    /// The `eth_getLogs` filter (addresses × topic0s).
    pub filter: LogFilter,
    pub chain: ChainClient,
    /// Logs per block lately: sizes the parts of a range (see [`parts`]).
    pub density: parts::Density,
}

impl Stream {
    /// Builds the decoder, filter and RPC client of a validated stream
    /// config; `observer` is told about every RPC request.
    pub fn new(
        cfg: StreamConfig,
        observer: Option<Arc<dyn crate::chain::client::RpcObserver>>,
    ) -> Result<Stream, String> {
        let events = EventSet::parse(&cfg.events).map_err(|errs| {
            errs.into_iter()
                .map(|(i, e)| format!("events[{i}]: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let filter = LogFilter {
            addresses: cfg.addresses.clone(),
            topic0s: events.topic0s(),
        };
        let mut chain = ChainClient::new(&cfg.rpc, client_options(&cfg)).map_err(|e| e.to_string())?;
        if let Some(o) = observer {
            chain = chain.with_observer(o);
        }
        Ok(Stream {
            cfg,
            events,
            filter,
            chain,
            density: parts::Density::default(),
        })
    }
}

/// The RPC client settings of a stream.
pub fn client_options(cfg: &StreamConfig) -> ClientOptions {
    ClientOptions {
        timeout: cfg.rpc_timeout,
        attempts: cfg.rpc_attempts,
        cooldown: cfg.rpc_cooldown,
        max_block_range: cfg.max_block_range,
    }
}

/// The `SET LOCAL` bounds of every tick's transaction.
#[derive(Debug, Clone, Copy)]
pub struct TxLimits {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub idle_in_transaction_timeout: Duration,
}

impl From<&DatabaseConfig> for TxLimits {
    fn from(d: &DatabaseConfig) -> Self {
        TxLimits {
            lock_timeout: d.lock_timeout,
            statement_timeout: d.statement_timeout,
            idle_in_transaction_timeout: d.idle_in_transaction_timeout,
        }
    }
}

/// Runs the ticks of one stream on behalf of one replica.
pub struct Poller {
    pub stream: Arc<Stream>,
    db: Database,
    /// Written to `block_cursors.updated_by`; also the connection's `application_name`.
    replica_id: String,
    limits: TxLimits,
    /// What `/metrics` and `/status` show of this stream.
    pub metrics: Arc<StreamMetrics>,
    /// Consecutive ticks whose range could not be fetched (reset by any
    /// success); `skip_and_backfill` skips after `range_attempts`.
    range_failures: std::sync::atomic::AtomicU32,
    /// The next range, fetched while the last tick committed (pipelining).
    /// std Mutex: only swapped, never held across an await.
    prefetch: std::sync::Mutex<Option<Prefetch>>,
}

/// A range being fetched ahead of its tick (its first parts: the fetch
/// waits once [`parts::QUEUED`] are ready). Dropping it aborts the fetch.
type Prefetch = parts::Parts;

/// What a successful tick did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickOutcome {
    /// The cursor is at the safe head: nothing to do.
    Idle {
        cursor: i64,
        head: u64,
        safe_head: u64,
        lock_wait: Duration,
    },
    /// `[from, to]` was stored and the cursor moved to `to`.
    Advanced {
        from: u64,
        to: u64,
        head: u64,
        safe_head: u64,
        /// Timestamp of block `to` (seconds since the epoch).
        to_timestamp: u64,
        /// Logs the node returned for the range.
        logs: usize,
        /// Of those, logs that did not decode and went to `dead_letters`.
        dead_lettered: usize,
        inserted: u64,
        duplicates: u64,
        lock_wait: Duration,
        lock_hold: Duration,
    },
    /// A reorg below the safe head: events above `to` were deleted and the
    /// cursor moved back from `from` to `to`, the newest stored block that
    /// is still canonical (audited in `cursor_rewinds`).
    Rewound { from: i64, to: i64, events_deleted: u64 },
    /// `[from, to]` kept failing: recorded in `failed_ranges` for the
    /// gap-fill worker, and the cursor moved past it.
    Skipped { from: u64, to: u64, error: String },
}

/// Why a tick rolled back.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("stream {stream}: log {log_index} of tx {tx_hash} (block {block}) does not decode: {source}; the cursor stays before it")]
    Decode {
        stream: String,
        block: u64,
        tx_hash: Hash32,
        log_index: u64,
        source: DecodeError,
    },
    /// A reorg below the safe head that the stream's policy does not rewind:
    /// the stream is halted (recorded in `block_cursors.halted_reason`).
    #[error("stream {stream} halted: {reason}")]
    DeepReorg { stream: String, reason: String },
    /// The task fetching a range stopped before handing over all of it.
    #[error("the fetch of blocks up to {to} stopped before block {at} (its task ended)")]
    FetchEnded { at: u64, to: u64 },
    /// The RPC work of one tick took longer than its share of the idle timeout.
    #[error("RPC requests of this tick took longer than {budget:?} (90% of idle_in_transaction_timeout); rolled back before the server would end the session")]
    RpcBudget { budget: Duration },
    /// Shutdown interrupted the wait for the lock; nothing was done.
    #[error("cancelled while waiting for the cursor lock")]
    Cancelled,
}

impl TickError {
    /// Another replica held the lock past `lock_timeout`: not a fault.
    pub fn is_lock_timeout(&self) -> bool {
        matches!(self, TickError::Store(e) if e.is_lock_timeout())
    }
}

impl Poller {
    pub fn new(
        stream: Arc<Stream>,
        db: Database,
        replica_id: String,
        limits: TxLimits,
        metrics: Arc<StreamMetrics>,
    ) -> Poller {
        Poller {
            stream,
            db,
            replica_id,
            limits,
            metrics,
            range_failures: Default::default(),
            prefetch: std::sync::Mutex::new(None),
        }
    }

    /// A cursor read under the lock below what this replica last saw moved
    /// back behind its back: an operator's rewind, or a database failover
    /// that lost commits (asynchronous replication). Inserts are idempotent,
    /// so re-ingesting is safe; it is logged and counted, never hidden.
    pub(crate) fn note_regression(&self, read: i64) {
        let seen = self.metrics.cursor_block.load(Ordering::Relaxed);
        if read < seen {
            self.metrics.cursor_regressions.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                stream = %self.stream.cfg.name,
                last_seen = seen,
                now = read,
                "the cursor moved back since this replica last saw it (an operator rewind, or a database failover that lost commits); re-ingesting from it, inserts are idempotent"
            );
        }
    }

    /// Starts fetching `[from, to]` in the background (replacing, and so
    /// aborting, any earlier prefetch).
    fn start_prefetch(&self, from: u64, to: u64) {
        let endpoint = self.stream.chain.pick().index();
        let next = parts::Parts::spawn(Arc::clone(&self.stream), endpoint, from, to);
        *self.prefetch.lock().unwrap_or_else(|p| p.into_inner()) = Some(next);
    }

    /// The prefetched range, if it starts at `from` (the cursor read under
    /// the lock, plus one), ends within `to` (today's plan) and comes from
    /// the tick's endpoint; anything else was assumed on a cursor that has
    /// moved (or another node), and is discarded.
    fn take_prefetch(&self, from: u64, to: u64, endpoint: usize) -> Option<parts::Parts> {
        let p = self.prefetch.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        if p.from != from || p.to > to || p.endpoint != endpoint {
            self.metrics.prefetch_discarded.fetch_add(1, Ordering::Relaxed);
            return None; // dropped: aborted
        }
        self.metrics.prefetch_used.fetch_add(1, Ordering::Relaxed);
        Some(p)
    }

    /// Updates the metrics after a tick.
    fn record(&self, result: &Result<TickOutcome, TickError>, outcome: &'static str, took: Duration) {
        let m = &self.metrics;
        let error = result.as_ref().err().map(|e| e.to_string());
        m.tick(outcome, error, took);
        m.block_range
            .store(self.stream.chain.pick().log_span(), Ordering::Relaxed);
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
                m.cursor_block
                    .store(i64::try_from(*to).unwrap_or(i64::MAX), Ordering::Relaxed);
                m.cursor_block_time.store(*to_timestamp, Ordering::Relaxed);
                m.chain_head.store(*head, Ordering::Relaxed);
                m.safe_head.store(*safe_head, Ordering::Relaxed);
                m.events_inserted.fetch_add(*inserted, Ordering::Relaxed);
                m.duplicates.fetch_add(*duplicates, Ordering::Relaxed);
                m.dead_letters.fetch_add(*dead_lettered as u64, Ordering::Relaxed);
                m.last_advance.store(now_secs(), Ordering::Relaxed);
                m.lock_wait.observe(*lock_wait);
                m.lock_hold.observe(*lock_hold);
            }
            Ok(TickOutcome::Idle {
                cursor,
                head,
                safe_head,
                lock_wait,
            }) => {
                m.cursor_block.store(*cursor, Ordering::Relaxed);
                m.chain_head.store(*head, Ordering::Relaxed);
                m.safe_head.store(*safe_head, Ordering::Relaxed);
                m.lock_wait.observe(*lock_wait);
            }
            Ok(TickOutcome::Rewound { to, .. }) => {
                m.reorgs.fetch_add(1, Ordering::Relaxed);
                m.cursor_block.store(*to, Ordering::Relaxed);
            }
            Ok(TickOutcome::Skipped { to, .. }) => {
                m.ranges_skipped.fetch_add(1, Ordering::Relaxed);
                m.cursor_block
                    .store(i64::try_from(*to).unwrap_or(i64::MAX), Ordering::Relaxed);
            }
            Err(TickError::DeepReorg { .. }) => {
                m.reorgs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.is_lock_timeout() => {
                m.lock_timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }

    /// The wait after an idle tick: `ws_poll_interval` while a push
    /// subscription is live (a safety net: a head ends the wait at once),
    /// else `poll_interval`.
    fn idle_wait(&self) -> Duration {
        match self.metrics.push.get() {
            Some(p) if p.connected() => self.stream.cfg.ws_poll_interval,
            _ => self.stream.cfg.poll_interval,
        }
    }

    /// Ticks until `cancel` fires. Returns only then: failures are retried.
    pub async fn run(&self, cancel: CancellationToken) {
        let name = &self.stream.cfg.name;
        let mut consecutive_failures = 0u32;
        let mut progress = Progress::default();
        while !cancel.is_cancelled() {
            let result = self.tick(&cancel).await;
            let mut idle = false;
            let wait = match result {
                Ok(TickOutcome::Advanced {
                    from,
                    to,
                    inserted,
                    safe_head,
                    ..
                }) => {
                    consecutive_failures = 0;
                    progress.advanced(
                        name,
                        to - from + 1,
                        inserted,
                        safe_head.saturating_sub(to),
                        self.stream.cfg.max_block_range,
                    );
                    Duration::ZERO
                }
                Ok(TickOutcome::Idle { .. }) => {
                    consecutive_failures = 0;
                    idle = true;
                    self.idle_wait()
                }
                Ok(TickOutcome::Rewound { .. } | TickOutcome::Skipped { .. }) => Duration::ZERO,
                Err(TickError::Cancelled) => break,
                Err(e) if e.is_lock_timeout() => {
                    tracing::debug!(stream = %name, "cursor lock busy; another replica is working");
                    jitter(self.limits.lock_timeout.min(Duration::from_secs(1)))
                }
                Err(e) => {
                    consecutive_failures += 1;
                    let delay = backoff(consecutive_failures);
                    tracing::error!(stream = %name, error = %e, attempt = consecutive_failures, retry_in = ?delay, "tick failed and rolled back");
                    delay
                }
            };
            if !wait.is_zero() {
                let push = self.metrics.push.get().filter(|_| idle);
                if idle {
                    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                    self.metrics.idle_wait_ms.store(ms, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    // A new head (or a change of the subscription) ends an idle wait.
                    _ = async { match push { Some(p) => p.woken().await, None => std::future::pending().await } } => {}
                    _ = cancel.cancelled() => break,
                }
                self.metrics.idle_wait_ms.store(0, Ordering::Relaxed);
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

/// A log decoded under `events`, as the row it becomes.
pub fn decode_log(events: &EventSet, log: &RawLog) -> Result<NewEvent, DecodeError> {
    let decoded = events.decode(log)?;
    Ok(NewEvent {
        block_number: i64::try_from(log.block_number).unwrap_or(i64::MAX),
        block_hash: log.block_hash,
        tx_hash: log.tx_hash,
        // The client rejects log indexes above i32::MAX.
        log_index: i32::try_from(log.log_index).unwrap_or(i32::MAX),
        address: log.address,
        event_name: decoded.event_name,
        params: decoded.params,
    })
}

/// Exponential backoff from 500 ms, capped at [`MAX_BACKOFF`], with jitter
/// so that replicas that failed together do not retry together.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1 << attempt.saturating_sub(1).min(10));
    jitter(base.min(MAX_BACKOFF))
}

/// A random duration in [d/2, d].
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::thread_rng().gen::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_stays_capped() {
        for attempt in 1..40 {
            let d = backoff(attempt);
            let nominal = Duration::from_millis(500)
                .saturating_mul(1 << (attempt - 1).min(10))
                .min(MAX_BACKOFF);
            assert!(
                d >= nominal / 2 && d <= nominal,
                "attempt {attempt}: {d:?} vs {nominal:?}"
            );
        }
        assert!(backoff(30) <= MAX_BACKOFF);
    }
}
