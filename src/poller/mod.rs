//! The per-stream poll loop: tick, then wait (`poll_interval` when caught
//! up, the [`TICK`] backoff after a failure, nothing while backfilling:
//! `pace`), until cancelled. The tick itself is in [`tick`].
//!
//! | module      | owns                                                        |
//! |-------------|-------------------------------------------------------------|
//! | [`tick`]    | one tick: lock → plan → write parts → verify → advance      |
//! | [`parts`]   | a range fetched and decoded ahead of the writer, in parts   |
//! | [`verify`]  | the range continues the stored chain and did not change     |
//! | [`filter`]  | the filter a cursor advances under; adopting a new one      |
//! | [`gapfill`] | the worker that fetches skipped ranges and backfills        |
//! | [`metrics`] | the poller's metrics; the chain's observers                 |
//! | `record`    | the last tick and this run's totals, kept by the poller     |
//! | `pace`      | the waits between ticks                                     |
//!
//! I5 (after faults stop, the cursor reaches the safe head in bounded time):
//! every failure is retried, with a backoff capped at 30 s, and a
//! successful tick resets it; a busy lock (another replica is working) is
//! retried after a short jittered pause and is not a failure.

pub mod filter;
pub mod gapfill;
pub mod metrics;
mod pace;
pub mod parts;
mod record;
mod run;
pub mod tick;
pub mod verify;

pub use record::{LastTick, Totals};

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::chain::heads::Follower;
use crate::chain::{ChainClient, ChainError, ClientOptions, Endpoints, RpcObserver};
use crate::config::StreamConfig;
use crate::store::pool::{Database, TxLimits};
use crate::store::StoreError;
use crate::types::{Hash32, LogFilter};
use crate::write::{Handlers, WriteError, Writer};
use metrics::StreamMetrics;

/// A prefetched range older than this is not used: its view of the chain
/// is stale (it would be verified anyway; this bounds what it holds).
pub const PREFETCH_TTL: Duration = Duration::from_secs(5);

/// A configured stream with what its ticks need.
pub struct Stream {
    pub cfg: StreamConfig,
    /// The `eth_getLogs` filter (addresses × topic0s).
    pub filter: LogFilter,
    /// The filter's fingerprint: the cursor advances only under it (I9).
    pub fingerprint: Hash32,
    pub chain: ChainClient,
    /// Logs per block lately: sizes the parts of a range (see [`parts`]).
    pub density: parts::Density,
    /// The one write seam, with the stream's handlers.
    pub writer: Writer,
    /// Told after each commit that stored rows of this stream (wakes the
    /// stream's delivery workers at once).
    pub committed: tokio::sync::Notify,
    /// The head follower of each endpoint (same order as `chain`'s), when
    /// the stream runs in an app; empty: the loop asks for heads itself.
    pub followers: Vec<Arc<Follower>>,
    /// The logs this replica may have fetched and not yet written, across
    /// all streams (permits = logs; see `parts`).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The replica's prefetch slots (a prefetch holds one while it waits
    /// for its tick), so that waiting prefetches stay few.
    pub prefetch_slots: Arc<tokio::sync::Semaphore>,
}

impl Stream {
    /// Builds the filter, RPC client and writer of a validated stream
    /// config; `observer` is told about every RPC request.
    pub fn new(
        cfg: StreamConfig,
        endpoints: &Endpoints,
        observer: Option<Arc<dyn RpcObserver>>,
        mut handlers: Handlers,
    ) -> Stream {
        let filter = cfg.filter();
        let fingerprint = filter.fingerprint(cfg.chain_id);
        let mut chain = ChainClient::new(endpoints, &cfg.rpc, cfg.chain_id, client_options(&cfg));
        if let Some(o) = observer {
            chain = chain.with_observer(o);
        }
        handlers.sql = cfg.handler_function.clone();
        handlers.sql_revert = cfg.revert_function.clone();
        let writer = Writer {
            stream: cfg.name.clone(),
            chain_id: cfg.chain_id,
            on_bad_event: cfg.on_bad_event,
            on_handler_error: cfg.on_handler_error,
            handlers,
            webhooks: cfg.webhooks.iter().map(|w| (w.name.clone(), w.batch_size)).collect(),
            revert_page: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(crate::write::REVERT_PAGE)),
        };
        Stream {
            cfg,
            filter,
            fingerprint,
            chain,
            density: parts::Density::default(),
            writer,
            committed: tokio::sync::Notify::new(),
            followers: Vec::new(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(parts::LOGS_IN_FLIGHT_PER_REPLICA)),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(2)),
        }
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

/// Runs the ticks of one stream on behalf of one replica.
pub struct Poller {
    pub stream: Arc<Stream>,
    db: Database,
    /// Written to `block_cursors.updated_by`; also the connection's `application_name`.
    replica_id: String,
    limits: TxLimits,
    /// This stream's series in the replica's registry.
    pub metrics: StreamMetrics,
    /// The replica's tick permits: ticks in flight at once, bounded by the pool.
    permits: Arc<tokio::sync::Semaphore>,
    /// How many there are (all free when the poller is made).
    permits_total: usize,
    /// The last tick and this run's totals (see `record`).
    observed: Mutex<record::Observed>,
    /// The idle wait the loop is in now, in milliseconds (0: working, or
    /// backing off after a failure).
    idle_wait_ms: AtomicU64,
    /// The cursor this replica last read or moved: a lower one read later
    /// means it moved back (see [`Poller::note_regression`]).
    seen: AtomicI64,
    /// The head hash this stream last saw (see `tick`).
    head_seen: Mutex<Option<Hash32>>,
    /// Refusals of the range at the cursor (see [`tick::Refusals`]);
    /// `skip_and_backfill` skips after `range_attempts`.
    refusals: Mutex<tick::Refusals>,
    /// The next range, fetched while the last tick committed (pipelining).
    /// std Mutex: only swapped, never held across an await.
    prefetch: Mutex<Option<parts::Parts>>,
}

/// What a successful tick did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickOutcome {
    /// The cursor is at the safe head: nothing to do (no transaction was
    /// opened, no lock taken).
    Idle {
        /// The last processed block (`-1` before block 0).
        cursor: i64,
        head: u64,
        safe_head: u64,
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
        /// Of those, logs parked in `dead_letters` by this tick.
        dead_lettered: usize,
        inserted: u64,
        duplicates: u64,
        lock_wait: Duration,
        lock_hold: Duration,
    },
    /// The savepoint budget ran out inside the range's first block: what
    /// was handled of it is committed, the cursor stays, and the next tick
    /// goes on from there (logs handled already are not handled again).
    Partial {
        at: u64,
        inserted: u64,
        dead_lettered: usize,
    },
    /// A reorg below the safe head: events above `to` were deleted (their
    /// effects reverted) and the cursor moved back from `from` to `to`, the
    /// newest stored block that is still canonical (audited in `cursor_rewinds`).
    Rewound { from: i64, to: i64, events_deleted: u64 },
    /// `[from, to]` kept being refused: recorded in `failed_ranges` for the
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
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A reorg below the safe head that the stream's policy does not rewind:
    /// the stream is halted (recorded in `block_cursors.halted_reason`).
    #[error("stream {stream} halted: {reason}")]
    DeepReorg { stream: String, reason: String },
    /// The chain changed while the tick read it: nothing was committed.
    #[error("block {block} changed while the tick read it (was {was}, now {now}): a reorganisation; rolled back")]
    Reorged { block: u64, was: Hash32, now: Hash32 },
    /// The cursor advances under another filter, adopted after this
    /// replica's: this replica (an old one, during a rolling update) backs off.
    #[error("stream {stream}: the cursor now advances under another filter (adopted {adopted} by {by}); this replica's filter was replaced, so it does not advance it (run `logcursor adopt-filter --stream {stream}` to go back to this one)")]
    FilterReplaced {
        stream: String,
        adopted: String,
        by: String,
    },
    /// The cursor was recorded on another chain.
    #[error("stream {stream}: its cursor was recorded on chain {recorded}, this configuration says chain {configured}; a stream cannot move between chains (use a new stream name)")]
    OtherChain {
        stream: String,
        recorded: u64,
        configured: u64,
    },
    /// The task fetching a range stopped before handing over all of it.
    #[error("the fetch of blocks up to {to} stopped before block {at} (its task ended)")]
    FetchEnded { at: u64, to: u64 },
    /// The RPC work of one tick took longer than its budget.
    #[error(
        "the RPC work of this tick took longer than rpc_budget ({budget:?}); rolled back, and the endpoint cools down"
    )]
    RpcBudget { budget: Duration },
    /// Shutdown interrupted the wait for the lock; nothing was done.
    #[error("cancelled while waiting for the cursor lock")]
    Cancelled,
}

impl TickError {
    /// The database error under this one, if it is one (directly, or from
    /// the write seam).
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            TickError::Store(e) | TickError::Write(WriteError::Store(e)) => Some(e),
            _ => None,
        }
    }

    /// Another replica holds the lock (past `lock_timeout`, or at once
    /// with `NOWAIT`): not a fault.
    pub fn is_lock_busy(&self) -> bool {
        matches!(self, TickError::Store(e) if e.is_lock_busy())
    }

    /// Alias of [`TickError::is_lock_busy`].
    pub fn is_lock_timeout(&self) -> bool {
        self.is_lock_busy()
    }

    /// This replica should wait rather than count a failure.
    fn is_back_off(&self) -> bool {
        self.is_lock_busy() || matches!(self, TickError::FilterReplaced { .. })
    }
}

impl Poller {
    pub fn new(
        stream: Arc<Stream>,
        db: Database,
        replica_id: String,
        limits: TxLimits,
        metrics: StreamMetrics,
        permits: Arc<tokio::sync::Semaphore>,
    ) -> Poller {
        // Unknown until the first tick: shown as "before block 0".
        metrics.cursor_block.set(-1);
        Poller {
            stream,
            db,
            replica_id,
            limits,
            metrics,
            permits_total: permits.available_permits(),
            permits,
            observed: Mutex::default(),
            idle_wait_ms: AtomicU64::new(0),
            seen: AtomicI64::new(i64::MIN),
            head_seen: Mutex::new(None),
            refusals: Mutex::default(),
            prefetch: Mutex::new(None),
        }
    }

    /// A cursor read below what this replica last saw moved back behind its
    /// back: an operator's rewind, or a database failover that lost commits
    /// (asynchronous replication). Inserts are idempotent, so re-ingesting
    /// is safe; it is logged and counted, never hidden.
    pub(crate) fn note_regression(&self, read: i64) {
        let seen = self.seen.swap(read, Ordering::Relaxed);
        if read < seen {
            self.metrics.cursor_regressions.inc();
            tracing::warn!(
                stream = %self.stream.cfg.name,
                last_seen = seen,
                now = read,
                "the cursor moved back since this replica last saw it (an operator rewind, or a database failover that lost commits); re-ingesting from it, inserts are idempotent"
            );
        }
    }

    fn saw(&self, cursor: i64) {
        self.seen.fetch_max(cursor, Ordering::Relaxed);
    }

    /// The idle wait the loop is in now, in milliseconds (0: none).
    pub fn idle_wait_ms(&self) -> u64 {
        self.idle_wait_ms.load(Ordering::Relaxed)
    }
}
