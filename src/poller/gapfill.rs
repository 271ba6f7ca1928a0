//! The gap-fill worker: fetches the ranges below a cursor that still need
//! it (`failed_ranges`: ranges `skip_and_backfill` skipped, and backfills of
//! what a changed filter adds), on every replica at once.
//!
//! Each pass claims one due row (`FOR UPDATE SKIP LOCKED`, a lease on the
//! database clock: see [`crate::store::failed_ranges`]) and works one chunk
//! of it (at most `max_block_range` blocks) under the tick's bounds:
//!
//! ```text
//! claim (its own short transaction)
//! fetch the chunk's parts, decode, verify against one batch of headers   -- before BEGIN,
//!                                                                        -- within rpc_budget
//! BEGIN; SET LOCAL timeouts
//!   the write seam, part by part (events, handlers; failing rows parked)
//!   progress (done_to, and the row given back, due at once) or delete the
//!   row — only while the lease is ours, checked with clock_timestamp() as
//!   the last statement
//! COMMIT
//! ```
//!
//! A row is given back after every chunk, so a long backfill goes on at
//! the next pass of any replica (a lease kept until it expired would hold
//! every following chunk back for `gapfill_lease`).
//!
//! A chunk that stops early (the savepoint budget) commits the prefix it
//! stored; a single block too large for the provider becomes a row of its
//! own, so the rest of the range goes on. A failure gives the row back —
//! only the claimant can — with the stream's `gapfill_backoff` doubling up
//! to `gapfill_backoff_max`; after `gapfill_max_attempts` it is marked dead
//! and shown by `status` and `logcursor gapfill list`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::parts::{Part, Parts};
use super::verify::{self, Expect};
use super::{Stream, TickError};
use crate::backoff::{Backoff, Failures, TICK};
use crate::chain::ChainErrorKind;
use crate::store::failed_ranges::{self, Range};
use crate::store::pool::{Database, TxLimits};
use crate::store::StoreError;
use crate::types::{BlockNumber, Hash32, Header};
use crate::write::{guard, Savepoints, WriteError};

/// How often gap fill retries a range that met a database fault (which
/// does not count toward `gapfill.max_attempts`), unless its backoff says
/// otherwise.
const DATABASE_FAULT_RETRY: Duration = Duration::from_secs(30);
/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapOutcome {
    /// Nothing was due.
    Idle,
    /// The range is stored and its row deleted.
    Filled {
        id: i64,
        stream: String,
        from: i64,
        to: i64,
        inserted: u64,
    },
    /// Part of the range is stored; the row continues after `done_to`.
    Progressed { id: i64, done_to: i64, inserted: u64 },
    /// A single block too large for the provider now waits as a row of its own.
    Isolated { id: i64, block: i64 },
    /// The attempt failed; the row waits for its next attempt (or is dead).
    Failed { id: i64, error: String, dead: bool },
    /// The lease ran out before the commit; the work was rolled back.
    LeaseLost { id: i64 },
}

/// One replica's gap-fill worker.
pub struct GapFiller {
    /// The streams whose pending ranges this worker works.
    streams: Vec<Arc<Stream>>,
    db: Database,
    /// Written to `failed_ranges.claimed_by`.
    replica_id: String,
    limits: TxLimits,
}

/// A chunk, fetched and checked, not yet written.
struct Fetched {
    parts: Vec<Part>,
}

impl GapFiller {
    /// A worker for `streams` (none when there are none).
    pub fn new(streams: &[Arc<Stream>], db: Database, replica_id: String, limits: TxLimits) -> Option<GapFiller> {
        (!streams.is_empty()).then(|| GapFiller {
            streams: streams.to_vec(),
            db,
            replica_id,
            limits,
        })
    }

    /// Works until `cancel` fires: at once while rows are due, else every
    /// poll interval.
    pub async fn run(&self, cancel: CancellationToken) {
        let idle_wait = self
            .streams
            .iter()
            .map(|s| s.cfg.poll_interval)
            .min()
            .unwrap_or(Duration::from_secs(1));
        let mut failures = Failures::new(TICK);
        while !cancel.is_cancelled() {
            let wait = match self.work_once().await {
                Ok(GapOutcome::Idle) => idle_wait,
                Ok(outcome) => {
                    failures.reset();
                    tracing::info!(?outcome, "gap-fill");
                    Duration::ZERO
                }
                Err(e) => {
                    let delay = failures.failed();
                    tracing::error!(error = %e, retry_in = ?delay, "gap-fill pass failed");
                    delay
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => break,
                }
            }
        }
    }

    /// Claims and works one due range.
    pub async fn work_once(&self) -> Result<GapOutcome, TickError> {
        let names: Vec<&str> = self.streams.iter().map(|s| s.cfg.name.as_str()).collect();
        let lease = self
            .streams
            .iter()
            .map(|s| s.cfg.gapfill.lease)
            .max()
            .unwrap_or(Duration::from_secs(60));
        let claim = {
            let mut client = self.db.get().await?;
            let tx = self.db.begin(&mut client, self.limits).await?;
            let claim = failed_ranges::claim(&*tx, &names, &self.replica_id, lease).await?;
            tx.commit().await.map_err(StoreError::db("commit claim"))?;
            claim
        };
        let Some(claim) = claim else {
            return Ok(GapOutcome::Idle);
        };
        let Some(stream) = self.streams.iter().find(|s| s.cfg.name == claim.stream.as_str()) else {
            return Ok(GapOutcome::Idle);
        };
        match self.fill(stream, &claim).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                let g = &stream.cfg.gapfill;
                // Only what the range itself meets counts toward dead: a
                // database fault (a restart, a timeout, a revoked grant, a
                // dropped table a handler uses), a handler's own retry or a
                // program without the stream's handlers is no reason to give
                // the range up. Those are retried every 30 s at most (each
                // try fetches the range again).
                let counts = !matches!(
                    e,
                    TickError::Store(_)
                        | TickError::Cancelled
                        | TickError::Write(
                            WriteError::Store(_) | WriteError::HandlerRetry { .. } | WriteError::HandlersMissing { .. }
                        )
                );
                let delay = if counts {
                    Backoff::new(g.backoff, g.backoff_max).nominal(claim.attempts.unsigned_abs() + 1)
                } else {
                    g.backoff.max(DATABASE_FAULT_RETRY).min(g.backoff_max)
                };
                let error = e.to_string();
                let mut client = self.db.get().await?;
                let tx = self.db.begin(&mut client, self.limits).await?;
                let dead = failed_ranges::retry_later(
                    &*tx,
                    claim.id,
                    &self.replica_id,
                    &error,
                    delay,
                    counts.then_some(g.max_attempts),
                )
                .await?;
                tx.commit().await.map_err(StoreError::db("commit gap-fill retry"))?;
                let dead = dead.unwrap_or(false);
                if dead {
                    tracing::error!(stream = %claim.stream, from = claim.from_block, to = claim.to_block, %error, "pending range is dead after gapfill_max_attempts");
                }
                Ok(GapOutcome::Failed {
                    id: claim.id,
                    error,
                    dead,
                })
            }
        }
    }

    /// One chunk of `claim`: fetched and checked before BEGIN, written and
    /// recorded in one short transaction.
    async fn fill(&self, stream: &Arc<Stream>, claim: &Range) -> Result<GapOutcome, TickError> {
        let from = BlockNumber::from_db(claim.done_to + 1).map_or(0, BlockNumber::get);
        let end = BlockNumber::from_db(claim.to_block).map_or(0, BlockNumber::get);
        if from > end {
            return self.finish(claim).await;
        }
        let to = end.min(from.saturating_add(stream.cfg.max_block_range - 1));
        let budget = stream.cfg.rpc_budget;
        let fetched = match tokio::time::timeout(budget, self.fetch(stream, claim, from, to)).await {
            Err(_) => return Err(TickError::RpcBudget { budget }),
            Ok(Err(TickError::Chain(c)))
                if matches!(c.kind, ChainErrorKind::BlockTooLarge { block, .. } if block == from)
                    && claim.from_block != claim.to_block =>
            {
                return self.isolate(claim, from, &c.to_string()).await;
            }
            Ok(r) => r?,
        };
        let mut client = self.db.get().await?;
        let tx = self.db.begin(&mut client, self.limits).await?;
        // Without the cursor row lock: the shared form of the handler check.
        guard::check(&*tx, &stream.cfg.name, &stream.writer.handlers, guard::Mode::Check).await?;
        let mut savepoints = Savepoints::handlers_checked();
        let mut inserted = 0;
        let mut done = from.checked_sub(1);
        for part in fetched.parts {
            let part_to = part.to;
            let written = stream.writer.write(&tx, &mut savepoints, part.batch).await?;
            inserted += written.inserted;
            if let Some(stop) = written.stopped {
                done = stop.incomplete_block.checked_sub(1).max(done);
                break;
            }
            done = Some(part_to);
        }
        let done = done.map_or(claim.done_to, |d| BlockNumber::saturating(d).to_db());
        let lease_held = if done >= claim.to_block {
            failed_ranges::complete(&*tx, claim.id, &self.replica_id).await?
        } else {
            failed_ranges::progress(&*tx, claim.id, &self.replica_id, done).await?
        };
        if !lease_held {
            // Dropping `tx` rolls the inserts back; the new claimer redoes them.
            return Ok(GapOutcome::LeaseLost { id: claim.id });
        }
        let done_block = BlockNumber::from_db(done).map_or(0, BlockNumber::get);
        super::tick::announce(&*tx, self.db.schema(), stream, from, done_block, inserted).await?;
        tx.commit().await.map_err(StoreError::db("commit gap-fill"))?;
        if inserted > 0 {
            stream.committed.notify_waiters();
        }
        Ok(if done >= claim.to_block {
            GapOutcome::Filled {
                id: claim.id,
                stream: claim.stream.clone(),
                from: claim.from_block,
                to: claim.to_block,
                inserted,
            }
        } else {
            GapOutcome::Progressed {
                id: claim.id,
                done_to: done,
                inserted,
            }
        })
    }

    /// The parts of `[from, to]` of the claim's filter, checked against one
    /// batch of headers: nothing changed while they were read.
    async fn fetch(&self, stream: &Arc<Stream>, claim: &Range, from: u64, to: u64) -> Result<Fetched, TickError> {
        let rpc = stream.chain.pick();
        let filter = claim.filter.clone().unwrap_or_else(|| stream.filter.clone());
        let mut parts = Parts::spawn(Arc::clone(stream), rpc.index(), from, to, filter);
        let mut got: Vec<Part> = Vec::new();
        let mut logs = 0u64;
        while let Some(part) = parts.next().await {
            match part {
                Ok(p) => {
                    logs += p.logs as u64;
                    let short = p.short;
                    got.push(p);
                    // Bounded memory: what is fetched before BEGIN is written in one go.
                    if short || logs >= stream.cfg.max_logs_per_tick {
                        break;
                    }
                }
                Err(e) if got.is_empty() => return Err(e),
                Err(e) => {
                    tracing::warn!(stream = %claim.stream, error = %e, "a later part of a pending range failed; storing the parts before it");
                    break;
                }
            }
        }
        let Some(last) = got.last().map(|p| p.to) else {
            return Err(TickError::FetchEnded { at: from, to });
        };
        let named: Vec<(u64, Hash32)> = got.iter().flat_map(|p| p.blocks.iter().copied()).collect();
        let ends: Vec<Header> = got.iter().flat_map(|p| p.ends.iter().copied()).collect();
        let pinned = ends.last().copied().ok_or(TickError::FetchEnded { at: from, to })?;
        let expect = Expect {
            from,
            cursor_hash: None,
            to: Some(last),
            written_to: last,
            pinned,
            named: &named,
            ends: &ends,
        };
        verify::verify(&rpc, &expect).await?;
        Ok(Fetched { parts: got })
    }

    /// Deletes a claim with nothing left to fetch.
    async fn finish(&self, claim: &Range) -> Result<GapOutcome, TickError> {
        let mut client = self.db.get().await?;
        let tx = self.db.begin(&mut client, self.limits).await?;
        if !failed_ranges::complete(&*tx, claim.id, &self.replica_id).await? {
            return Ok(GapOutcome::LeaseLost { id: claim.id });
        }
        tx.commit().await.map_err(StoreError::db("commit gap-fill"))?;
        Ok(GapOutcome::Filled {
            id: claim.id,
            stream: claim.stream.clone(),
            from: claim.from_block,
            to: claim.to_block,
            inserted: 0,
        })
    }

    /// Block `block` (the chunk's first) overflows the provider: it becomes
    /// a `skipped` row of its own and the claim goes on after it.
    async fn isolate(&self, claim: &Range, block: u64, error: &str) -> Result<GapOutcome, TickError> {
        let b = BlockNumber::saturating(block).to_db();
        let mut client = self.db.get().await?;
        let tx = self.db.begin(&mut client, self.limits).await?;
        if !failed_ranges::isolate_block(&*tx, claim.id, &self.replica_id, b, error).await? {
            return Ok(GapOutcome::LeaseLost { id: claim.id });
        }
        tx.commit().await.map_err(StoreError::db("commit isolated block"))?;
        Ok(GapOutcome::Isolated { id: claim.id, block: b })
    }
}
