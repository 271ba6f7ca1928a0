//! The one write seam: every batch of decoded events is stored here, in the
//! caller's transaction — by a tick, by gap fill, by `dlq replay` alike —
//! and every rewind removes events here. A write is, per batch:
//!
//! ```text
//! logs that do not decode → dead_letters (or halt, per on_bad_event)
//! logs parked already (same block hash) → skipped: they wait for replay
//! SAVEPOINT
//!   COPY (≥ 500 rows) or INSERT … ON CONFLICT DO NOTHING RETURNING id   -- new rows only
//!   INSERT INTO outbox … one delivery per (webhook, batch of new rows)   -- store::outbox
//!   SELECT logcursor_handle(handler_function, ids of the new rows)       -- set-based SQL handler
//!   Handler::handle(tx, new rows) for each Rust handler, within statement_timeout
//! RELEASE
//! ```
//!
//! Row triggers on `events` are a supported handler mechanism: they fire
//! inside the same savepoint, and `AFTER INSERT … FOR EACH ROW` fires once
//! per newly stored row on both paths (`ON CONFLICT DO NOTHING` inserts no
//! duplicate; a `COPY` that meets a stored row fails with 23505 and is
//! rolled back to the savepoint, its triggers' work with it, before the
//! rows are stored again by `INSERT … ON CONFLICT`). A `BEFORE INSERT`
//! trigger also fires for rows `ON CONFLICT` then discards: never an
//! effect there. `AFTER DELETE` fires for the rows [`Writer::remove_above`]
//! deletes, in the rewind's transaction.
//!
//! I8 (no input from the chain can stop a stream) and I10 (a failing effect
//! parks its event, never stops the stream unless asked to): an error that
//! concerns rows ([`StoreError::is_per_row`]: a value PostgreSQL refuses, a
//! constraint, a trigger's or handler's exception) rolls back to the
//! savepoint only. The failing row is then found — the one a handler names,
//! else by retrying halves of the batch — and parked whole in
//! `dead_letters` with the server's or handler's message; the others are
//! stored. `on_bad_event`/`on_handler_error = "halt"` stop instead. Any
//! other error (connection, timeout, deadlock, serialization, and class 42:
//! a grant, table or function missing) fails the transaction, and so does
//! a Rust handler's [`HandlerError::retry`] (a `tokio_postgres::Error`
//! converts to it by the same SQLSTATE classes). A Rust handler's call past
//! its deadline ([`Handlers::deadline`]) is rolled back to the savepoint and
//! halves of its batch are tried instead, parking nothing; only a single
//! event past it fails the transaction:
//! the tick is retried and nothing is parked for a fault that is not the
//! event's.
//!
//! I10 (effects exactly once per stored row): handlers run in the savepoint
//! that stores their rows, for rows that are new in it, so they commit
//! exactly when the rows do; a duplicate runs nothing; a rewind reverts
//! the effects of the rows it removes in its own transaction
//! ([`Writer::remove_above`]).
//!
//! No more than [`MAX_SAVEPOINTS`] savepoints in one transaction (more
//! overflow PostgreSQL's per-backend subtransaction cache and slow every
//! session of the cluster): [`Savepoints`] counts them, and a write that
//! would exceed the budget stops at the last row it finished, so that the
//! caller commits what is done (the rows handled form a prefix of the batch)
//! and the next transaction goes on.

mod batch;
pub mod guard;
pub mod handler;
mod revert;

use std::collections::VecDeque;
use std::ops::Range;

use tokio_postgres::types::Type;
use tracing::{info_span, Instrument};

pub use batch::{Batch, OnFailure, Row, Savepoints, Stop, WriteError, Written, MAX_SAVEPOINTS};
pub use handler::{Event, Handler, HandlerError, Handlers, Transaction};
pub use revert::REVERT_PAGE;

use crate::store::dead_letters::{self, Kind};
use crate::store::events::{self, Inserted, StoredEvent, COPY_FROM_ROWS};
use crate::store::outbox;
use crate::store::{GenericClient, StoreError};
use crate::types::{RawLog, StreamName};

/// The write seam of one stream.
#[derive(Debug, Clone)]
pub struct Writer {
    pub stream: StreamName,
    pub chain_id: u64,
    pub on_bad_event: OnFailure,
    pub on_handler_error: OnFailure,
    pub handlers: Handlers,
    /// The stream's webhooks: (name, events per delivery).
    pub webhooks: Vec<(String, usize)>,
    /// Events per revert page: [`REVERT_PAGE`](revert::REVERT_PAGE), halved
    /// each time a Rust handler's `revert` passes its deadline.
    pub revert_page: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// How one attempt at a segment of rows ended.
enum Attempt {
    Stored {
        inserted: u64,
        duplicates: u64,
    },
    /// A per-row failure; `at`: the segment index the failure names;
    /// `duplicate`: a unique violation (COPY met a stored row).
    Failed {
        kind: Kind,
        message: String,
        at: Option<usize>,
        duplicate: bool,
    },
    /// A handler's call passed its deadline (rolled back to the savepoint).
    Slow {
        message: String,
    },
    /// No savepoint left.
    NoBudget,
}

impl Writer {
    /// Stores `batch` in `tx` (see the module doc). `budget` is the
    /// transaction's savepoint budget.
    pub async fn write(
        &self,
        tx: &handler::Transaction<'_>,
        budget: &mut Savepoints,
        batch: Batch,
    ) -> Result<Written, WriteError> {
        if !budget.handlers_checked {
            guard::check(tx, &self.stream, &self.handlers, guard::Mode::Record).await?;
            budget.handlers_checked = true;
        }
        let mut out = Written::default();
        if let Some((log, why)) = batch.undecodable.first() {
            if self.on_bad_event == OnFailure::Halt {
                return Err(self.halt(log, "does not decode", why.clone()));
            }
            let parked: Vec<(&RawLog, String)> = batch.undecodable.iter().map(|(l, e)| (l, e.clone())).collect();
            dead_letters::park(tx, &self.stream, self.chain_id, Kind::Decode, &parked).await?;
            out.parked += parked.len() as u64;
            tracing::warn!(stream = %self.stream, count = parked.len(), first_tx = %log.tx_hash, first_log_index = log.log_index, error = %why, "logs that do not decode were parked in dead_letters");
        }
        let rows = self.without_parked(tx, batch.rows, &mut out).await?;
        if rows.is_empty() {
            return Ok(out);
        }
        // Segments of rows still to store, in order: what is handled is
        // always a prefix of `rows` (see `Stop`).
        let mut queue: VecDeque<Range<usize>> = VecDeque::new();
        queue.push_back(0..rows.len());
        let mut copy_refused = false;
        while let Some(seg) = queue.pop_front() {
            let use_copy = seg.len() >= COPY_FROM_ROWS && !copy_refused;
            match self.attempt(tx, budget, &rows[seg.clone()], use_copy).await? {
                Attempt::Stored { inserted, duplicates } => {
                    out.inserted += inserted;
                    out.duplicates += duplicates;
                }
                Attempt::Slow { message } => {
                    // Smaller batches, nothing parked: time is no event's fault.
                    if seg.len() == 1 {
                        return Err(WriteError::HandlerTooSlow {
                            stream: self.stream.to_string(),
                            reason: message,
                        });
                    }
                    tracing::info!(stream = %self.stream, events = seg.len(), error = %message, "a handler was too slow for this batch; trying halves");
                    let mid = seg.start + seg.len() / 2;
                    queue.push_front(mid..seg.end);
                    queue.push_front(seg.start..mid);
                }
                Attempt::NoBudget => {
                    out.stopped = Some(Stop {
                        incomplete_block: rows[seg.start].event.block_number,
                    });
                    tracing::info!(stream = %self.stream, savepoints = MAX_SAVEPOINTS, "savepoint budget of this transaction spent; committing what is done");
                    return Ok(out);
                }
                Attempt::Failed {
                    kind,
                    message,
                    at,
                    duplicate,
                } => {
                    if duplicate && use_copy {
                        // COPY met rows stored before: store them the way that skips them.
                        copy_refused = true;
                        queue.push_front(seg);
                        continue;
                    }
                    let policy = match kind {
                        Kind::Handler => self.on_handler_error,
                        _ => self.on_bad_event,
                    };
                    let culprit = at.or((seg.len() == 1).then_some(0));
                    match culprit {
                        Some(i) => {
                            let row = &rows[seg.start + i];
                            if policy == OnFailure::Halt {
                                let what = match kind {
                                    Kind::Handler => "failed in a handler (on_handler_error = \"halt\")",
                                    _ => "was refused by the database (on_bad_event = \"halt\")",
                                };
                                return Err(self.halt(&row.raw, what, message));
                            }
                            dead_letters::park(tx, &self.stream, self.chain_id, kind, &[(&row.raw, message.clone())])
                                .await?;
                            out.parked += 1;
                            tracing::warn!(stream = %self.stream, block = row.raw.block_number, tx = %row.raw.tx_hash, log_index = row.raw.log_index, kind = kind.as_str(), error = %message, "an event was parked in dead_letters; the rest of its batch goes on");
                            let after = seg.start + i + 1..seg.end;
                            let before = seg.start..seg.start + i;
                            if !after.is_empty() {
                                queue.push_front(after);
                            }
                            if !before.is_empty() {
                                queue.push_front(before);
                            }
                        }
                        None => {
                            let mid = seg.start + seg.len() / 2;
                            queue.push_front(mid..seg.end);
                            queue.push_front(seg.start..mid);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// `rows` without those parked already under the same block hash.
    async fn without_parked<C: GenericClient>(
        &self,
        tx: &C,
        rows: Vec<Row>,
        out: &mut Written,
    ) -> Result<Vec<Row>, WriteError> {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(rows);
        };
        let parked =
            dead_letters::parked_keys(tx, &self.stream, first.event.block_number, last.event.block_number).await?;
        if parked.is_empty() {
            return Ok(rows);
        }
        let before = rows.len();
        let kept: Vec<Row> = rows
            .into_iter()
            .filter(|r| !parked.contains(&(r.event.tx_hash, r.event.log_index, r.event.block_hash)))
            .collect();
        out.skipped_parked += (before - kept.len()) as u64;
        Ok(kept)
    }

    /// One savepoint: store `rows` and run the handlers on the new ones.
    async fn attempt(
        &self,
        tx: &handler::Transaction<'_>,
        budget: &mut Savepoints,
        rows: &[Row],
        use_copy: bool,
    ) -> Result<Attempt, WriteError> {
        if !budget.take() {
            return Ok(Attempt::NoBudget);
        }
        tx.batch_execute("SAVEPOINT logcursor_write")
            .await
            .map_err(StoreError::db("savepoint"))?;
        let result = self.store_and_handle(tx, rows, use_copy).await;
        match result {
            Ok((inserted, duplicates)) => {
                match tx.batch_execute("RELEASE SAVEPOINT logcursor_write").await {
                    Ok(()) => Ok(Attempt::Stored { inserted, duplicates }),
                    // 25P02: a handler swallowed an error of its own statement.
                    Err(e) if e.code().map(|c| c.code()) == Some("25P02") => {
                        self.roll_back(tx).await?;
                        Ok(Attempt::Failed {
                            kind: Kind::Handler,
                            message: "a handler returned success after one of its statements failed (the transaction was aborted)".into(),
                            at: None,
                            duplicate: false,
                        })
                    }
                    Err(e) => Err(StoreError::db("release savepoint")(e).into()),
                }
            }
            Err(Failure::Row {
                kind,
                message,
                at,
                duplicate,
            }) => {
                self.roll_back(tx).await?;
                Ok(Attempt::Failed {
                    kind,
                    message,
                    at,
                    duplicate,
                })
            }
            Err(Failure::Slow { message }) => {
                self.roll_back(tx).await?;
                Ok(Attempt::Slow { message })
            }
            Err(Failure::Fatal(e)) => Err(e),
        }
    }

    async fn roll_back<C: GenericClient>(&self, tx: &C) -> Result<(), WriteError> {
        tx.batch_execute("ROLLBACK TO SAVEPOINT logcursor_write; RELEASE SAVEPOINT logcursor_write")
            .await
            .map_err(StoreError::db("roll back to savepoint"))?;
        Ok(())
    }

    /// Inserts `rows` and runs the handlers on the new ones; (inserted, duplicates).
    async fn store_and_handle(
        &self,
        tx: &handler::Transaction<'_>,
        rows: &[Row],
        use_copy: bool,
    ) -> Result<(u64, u64), Failure> {
        let span = info_span!(
            "db.insert_events",
            db.system = "postgresql",
            db.operation = if use_copy { "COPY" } else { "INSERT" },
            rows = rows.len()
        );
        let inserted: Inserted = if use_copy {
            events::copy(tx, &self.stream, self.chain_id, rows, self.wants_ids())
                .instrument(span)
                .await
                .map_err(|e| Failure::from_db(StoreError::db("COPY events")(e), Kind::Data))?
        } else {
            events::insert(tx, &self.stream, self.chain_id, rows)
                .instrument(span)
                .await
                .map_err(|e| Failure::from_db(e, Kind::Data))?
        };
        let new = inserted.new.len() as u64;
        if new > 0 && !self.webhooks.is_empty() {
            let ids: Vec<i64> = inserted.new.iter().map(|(_, id)| *id).collect();
            for (webhook, batch_size) in &self.webhooks {
                outbox::enqueue(tx, &self.stream, webhook, &ids, *batch_size)
                    .await
                    .map_err(|e| Failure::Fatal(e.into()))?;
            }
        }
        if new > 0 && self.handlers.any() {
            let stored: Vec<StoredEvent> = inserted
                .new
                .iter()
                .map(|(i, id)| StoredEvent::from_new(&rows[*i].event, *id, &self.stream, self.chain_id))
                .collect();
            if let Some(function) = &self.handlers.sql {
                let ids: Vec<i64> = stored.iter().map(|e| e.id).collect();
                tx.execute_typed(
                    "SELECT logcursor_handle($1, $2)",
                    &[(function, Type::TEXT), (&ids, Type::INT8_ARRAY)],
                )
                .instrument(info_span!("handler.sql", function = %function, events = ids.len()))
                .await
                .map_err(|e| Failure::from_db(StoreError::db("handler_function")(e), Kind::Handler))?;
            }
            for h in &self.handlers.rust {
                self.handlers
                    .bounded(h.handle(tx, &stored))
                    .instrument(info_span!("handler.rust", events = stored.len()))
                    .await
                    .map_err(|deadline| Failure::Slow {
                        message: format!(
                            "a handler did not finish {} events within {deadline:?} (its deadline)",
                            stored.len()
                        ),
                    })?
                    .map_err(|e| {
                        if e.transient {
                            return Failure::Fatal(WriteError::HandlerRetry {
                                stream: self.stream.to_string(),
                                reason: e.message,
                            });
                        }
                        Failure::Row {
                            kind: Kind::Handler,
                            // The handler's index is into the new rows; ours into the segment.
                            at: e.event.and_then(|i| inserted.new.get(i)).map(|(row, _)| *row),
                            message: e.message,
                            duplicate: false,
                        }
                    })?;
            }
        }
        Ok((new, rows.len() as u64 - new))
    }

    /// New rows need their ids (handlers and deliveries refer to them).
    fn wants_ids(&self) -> bool {
        self.handlers.any() || !self.webhooks.is_empty()
    }

    fn halt(&self, log: &RawLog, what: &'static str, reason: String) -> WriteError {
        WriteError::Halt {
            stream: self.stream.to_string(),
            block: log.block_number,
            tx_hash: log.tx_hash,
            log_index: log.log_index,
            what,
            reason,
        }
    }
}

/// Why storing a segment failed.
enum Failure {
    /// The rows (or one of them) are at fault.
    Row {
        kind: Kind,
        message: String,
        at: Option<usize>,
        duplicate: bool,
    },
    /// A Rust handler's call passed its deadline: no row is at fault, the
    /// batch is too slow as a whole.
    Slow {
        message: String,
    },
    Fatal(WriteError),
}

impl Failure {
    /// A database error: per-row if its class says so (a trigger's or
    /// function's exception counts as a handler's), else fatal.
    fn from_db(e: StoreError, kind: Kind) -> Failure {
        if e.is_per_row() {
            let raised_by_code = e
                .sqlstate()
                .is_some_and(|c| ["P0", "38", "39", "2F", "09", "27"].iter().any(|p| c.starts_with(p)));
            Failure::Row {
                kind: if raised_by_code { Kind::Handler } else { kind },
                duplicate: e.sqlstate() == Some("23505"),
                message: e.to_string(),
                at: None,
            }
        } else {
            Failure::Fatal(e.into())
        }
    }
}
