//! What the write seam takes and gives: a batch of rows, its outcome, the
//! failure policies, and the savepoint budget of a transaction.

use crate::store::events::NewEvent;
use crate::store::StoreError;
use crate::types::RawLog;

/// Savepoints one transaction may take.
pub const MAX_SAVEPOINTS: u32 = 64;

/// What to do with an event that cannot be stored or handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Park it whole in `dead_letters` (same transaction) and go on.
    DeadLetter,
    /// Stop the stream before it (the transaction rolls back).
    Halt,
}

/// The write seam's state in one transaction: its savepoint budget, and
/// whether the stream's Rust handlers were checked in it (see
/// [`super::guard`]).
#[derive(Debug)]
pub struct Savepoints {
    used: u32,
    pub(super) handlers_checked: bool,
}

impl Default for Savepoints {
    fn default() -> Self {
        Savepoints::new()
    }
}

impl Savepoints {
    pub fn new() -> Savepoints {
        Savepoints {
            used: 0,
            handlers_checked: false,
        }
    }

    /// The state of a transaction whose caller already made the handler
    /// check ([`super::guard::check`]) itself.
    pub fn handlers_checked() -> Savepoints {
        Savepoints {
            used: 0,
            handlers_checked: true,
        }
    }

    /// Savepoints taken so far.
    pub fn used(&self) -> u32 {
        self.used
    }

    /// Whether another one may be taken.
    pub fn left(&self) -> bool {
        self.used < MAX_SAVEPOINTS
    }

    pub(super) fn take(&mut self) -> bool {
        if self.left() {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// One decoded log and the log itself (kept to park it whole).
#[derive(Debug, Clone)]
pub struct Row {
    pub event: NewEvent,
    pub raw: RawLog,
}

impl Row {
    /// The row of `log`, decoded as `event_name` with `params`, in a block
    /// of `block_timestamp`.
    pub fn new(log: RawLog, event_name: String, params: serde_json::Value, block_timestamp: Option<u64>) -> Row {
        Row {
            event: NewEvent {
                block_number: log.block_number,
                block_hash: log.block_hash,
                block_timestamp,
                tx_hash: log.tx_hash,
                log_index: u32::try_from(log.log_index).unwrap_or(u32::MAX),
                address: log.address,
                event_name,
                params,
            },
            raw: log,
        }
    }
}

impl AsRef<NewEvent> for Row {
    fn as_ref(&self) -> &NewEvent {
        &self.event
    }
}

/// A batch to store: rows in (block, log index) order, and logs that did
/// not decode, with why.
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: Vec<Row>,
    pub undecodable: Vec<(RawLog, String)>,
}

/// What a write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub inserted: u64,
    pub duplicates: u64,
    /// Logs parked by this write (undecodable, refused, or failed by a handler).
    pub parked: u64,
    /// Logs skipped because they were parked before.
    pub skipped_parked: u64,
    /// `None`: every row was handled. `Some(b)`: the savepoint budget ran
    /// out; every block up to and including `b` is complete (`b` may be
    /// below the batch's first block: nothing is complete).
    pub stopped: Option<Stop>,
}

/// Where an unfinished write stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// The first block not completely handled.
    pub incomplete_block: u64,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A policy said halt: the caller rolls back and records the halt.
    #[error(
        "stream {stream}: log {log_index} of tx {tx_hash} (block {block}) {what}: {reason}; the cursor stays before it"
    )]
    Halt {
        stream: String,
        block: u64,
        tx_hash: crate::types::Hash32,
        log_index: u64,
        what: &'static str,
        reason: String,
    },
    /// A Rust handler failed for a reason that is not its events' (a lock
    /// timeout, a lost connection): the transaction rolls back and is
    /// retried; nothing is parked.
    #[error("stream {stream}: a handler asked to retry: {reason}")]
    HandlerRetry { stream: String, reason: String },
    /// One event takes a Rust handler longer than its deadline: the
    /// transaction rolls back; nothing is parked.
    #[error("stream {stream}: {reason}")]
    HandlerTooSlow { stream: String, reason: String },
    /// The stream's events were written with Rust handlers this program
    /// does not run: it writes nothing (see [`super::guard`]).
    #[error(
        "stream {stream}: its events have been written with the Rust handler(s) {missing:?}, which this program \
         does not run (the stock logcursor binary runs none; this one runs {running:?}): storing, replaying or \
         rewinding events here would skip their effects, so nothing is written. Run the application that \
         registers them; a handler retired on purpose is removed from the record with \
         `logcursor retire-handler --stream {stream} NAME`"
    )]
    HandlersMissing {
        stream: String,
        missing: Vec<String>,
        running: Vec<String>,
    },
    /// A handler failed while reverting a rewind (nothing was removed).
    #[error("stream {stream}: reverting the effects of a rewind failed: {reason}")]
    Revert { stream: String, reason: String },
    /// A Rust handler did not revert a page of `events` within its
    /// deadline (nothing was removed); the next attempt uses half pages.
    #[error("stream {stream}: reverting the effects of a rewind failed: {reason}")]
    RevertTooSlow {
        stream: String,
        events: usize,
        reason: String,
    },
}
