//! One tick: one READ COMMITTED transaction that holds the stream's cursor
//! row lock from the first statement to COMMIT. Each phase is a method
//! named as below.
//!
//! Why this file is long: the tick is one transaction, read top to bottom
//! as the diagram below (the design notes: keep the tick readable in one
//! file). Its exits that are not an advance (skip a refused range, halt,
//! rewind) end the same transaction, so they stay beside it.
//!
//! ```text
//! look      head (one endpoint, pinned for the tick) and the cursor, unlocked:
//!           at the safe head → Idle, no transaction, no lock, no xid
//! lock      BEGIN; set_config(search_path, lock_timeout, statement_timeout,
//!           idle_in_transaction_session_timeout, local)
//!           SELECT … FROM block_cursors WHERE id = $stream FOR UPDATE   -- replicas queue here
//!           the row's filter is ours (else adopt a new one, or back off: filter)
//! plan      range := [cursor+1, min(safe_head, cursor + max_block_range)]
//!           pin: headers(from, to) in one batch; parent(from) = cursor hash,
//!           else a deep reorg → halt or rewind
//! write     for each part (fetched and decoded ahead, `parts`):
//!             the write seam: SAVEPOINT; COPY / INSERT … ON CONFLICT DO NOTHING;
//!             handlers; RELEASE (a failing row is parked, the rest goes on)
//!           until the range, max_logs_per_tick, or the savepoint budget ends
//! verify    headers of the first block, every block with logs, every request's
//!           end and the last block, in one batch: unchanged (`verify`)
//! advance   UPDATE block_cursors … WHERE last_processed_block = $old
//!             AND filter_fingerprint = $ours                    -- exactly 1 row
//!           pg_notify('<schema>.<stream>', {"stream","from","to","rows"})  -- when rows were stored
//!           COMMIT
//! ```
//!
//! While part k is written, parts k+1… are fetched; a part that fails after
//! others were written ends the range there (what was written commits, the
//! cursor moves to its end), so progress is never thrown away.
//!
//! Why READ COMMITTED: a replica blocked on the row lock re-reads the row
//! once the holder commits, and so sees the advanced cursor and polls only
//! the new range (under REPEATABLE READ it would fail with 40001 instead).
//! Any error drops the transaction, which rolls back: the events, their
//! effects and the cursor move together or not at all (I1, I4, I10).
//!
//! I6 (no session idle in transaction past its bound) holds per idle
//! stretch: while the tick waits on the chain it sends a heartbeat
//! statement every third of `idle_in_transaction_timeout` ([`Session`]),
//! so only a replica that cannot run at all (frozen, SIGSTOP) goes idle,
//! and the server ends its session after the bound. A slow but healthy
//! provider is bounded instead by `rpc_budget`, one deadline for all the
//! RPC work of the tick; with `max_block_range` and `max_logs_per_tick` it
//! bounds how long the lock is held. Later parts get the budget but a
//! reserve (`rpc_timeout`, at most half of it) kept for the final header
//! batch, so that parts written before a slow one commit.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{field, info_span, Instrument};

use super::parts::{Part, Parts};
use super::verify::{self, Expect};
use super::{filter, Poller, TickError, TickOutcome, PREFETCH_TTL};
use crate::chain::{ChainError, ChainErrorKind, Rpc};
use crate::config::{DeepReorgPolicy, UnfetchablePolicy};
use crate::store::cursor::{self, Cursor, LockMode};
use crate::store::{failed_ranges, reorg, StoreError};
use crate::types::{BlockNumber, Hash32, Header, Processed};
use crate::write::{guard, Savepoints, WriteError};

type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// The heads a tick works against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub head: u64,
    /// The head block's hash: when it changes while a stream is caught up,
    /// the cursor's block is checked (a reorg at the same height).
    pub head_hash: Hash32,
    pub safe_head: u64,
    /// Whether the head may have been reorganised since the last one seen
    /// (`None`: judge by its hash alone).
    pub suspect_reorg: Option<bool>,
}

/// Refusals of the range at one cursor position, counted toward
/// `skip_and_backfill`'s `range_attempts`.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    /// The first block of the refused range.
    at: u64,
    count: u32,
    /// Endpoints that refused it with a deterministic JSON-RPC error.
    endpoints: std::collections::BTreeSet<usize>,
}

/// The header of a skipped range's end is waited for at most this long.
const SKIP_HEADER_WAIT: Duration = Duration::from_secs(5);

/// The tick's transaction while it waits on the chain.
struct Session<'a> {
    tx: &'a Tx<'a>,
    /// A heartbeat statement this often keeps the session from being idle.
    beat: Duration,
    /// All the RPC work of the tick ends by then.
    deadline: Instant,
    /// Parts after the first are waited for until then: the rest of the
    /// budget is the final header batch's, so that the parts written
    /// commit when later ones are too slow (else every tick would spend
    /// the budget on the same range and roll back).
    parts_deadline: Instant,
    budget: Duration,
}

impl Session<'_> {
    /// Runs `work` (RPC only) with heartbeats, until the tick's deadline.
    async fn wait<T>(&self, work: impl std::future::Future<Output = Result<T, TickError>>) -> Result<T, TickError> {
        self.wait_until(self.deadline, work).await
    }

    /// [`Session::wait`] with an earlier deadline.
    async fn wait_until<T>(
        &self,
        until: Instant,
        work: impl std::future::Future<Output = Result<T, TickError>>,
    ) -> Result<T, TickError> {
        tokio::pin!(work);
        let deadline = tokio::time::sleep_until(until);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = &mut deadline => return Err(TickError::RpcBudget { budget: self.budget }),
                _ = tokio::time::sleep(self.beat) => {
                    self.tx
                        .batch_execute("SELECT 1")
                        .await
                        .map_err(StoreError::db("heartbeat"))?;
                }
            }
        }
    }
}

/// What a range's parts stored so far, in one transaction.
#[derive(Default)]
struct Stored {
    /// The last complete block; `None` before the first part.
    to: Option<u64>,
    logs: usize,
    parked: u64,
    inserted: u64,
    duplicates: u64,
    /// Every block with logs and the hash its logs name.
    blocks: Vec<(u64, Hash32)>,
    /// Every request's last block, as its backend had it.
    ends: Vec<Header>,
    /// The savepoint budget ran out inside block `at`.
    stopped_at: Option<u64>,
}

impl Poller {
    /// Runs one tick. `cancel` interrupts only the wait for the row lock
    /// (nothing has been done yet then); once the lock is held, the tick
    /// runs to COMMIT or rollback.
    pub async fn tick(&self, cancel: &CancellationToken) -> Result<TickOutcome, TickError> {
        self.tick_with(cancel, None, LockMode::Wait).await
    }

    /// A tick against `heads` (from the endpoint's follower; `None`: asked
    /// of the endpoint), taking the row lock per `mode`.
    #[tracing::instrument(
        name = "poll.tick",
        skip_all,
        fields(
            stream = %self.stream.cfg.name,
            chain_id = self.stream.cfg.chain_id,
            replica = %self.replica_id,
            endpoint = field::Empty,
            from_block = field::Empty,
            to_block = field::Empty,
            events_inserted = field::Empty,
            duplicates = field::Empty,
            outcome = field::Empty,
            otel.status_code = field::Empty,
            error.message = field::Empty,
        )
    )]
    pub(crate) async fn tick_with(
        &self,
        cancel: &CancellationToken,
        heads: Option<Heads>,
        mode: LockMode,
    ) -> Result<TickOutcome, TickError> {
        let started = Instant::now();
        let result = self.tick_inner(cancel, mode, heads).await;
        if let Err(e) = &result {
            if !(e.is_back_off() || matches!(e, TickError::Cancelled)) {
                self.record_failure(e).await;
            }
        }
        let outcome = match &result {
            Ok(TickOutcome::Idle { .. }) => "idle",
            Ok(TickOutcome::Advanced { .. }) => "advanced",
            Ok(TickOutcome::Partial { .. }) => "partial",
            Ok(TickOutcome::Rewound { .. }) => "rewound",
            Ok(TickOutcome::Skipped { .. }) => "skipped",
            Err(TickError::Cancelled) => "cancelled",
            Err(e) if e.is_lock_busy() => "lock_timeout",
            Err(TickError::FilterReplaced { .. }) => "filter_replaced",
            Err(_) => "error",
        };
        let span = tracing::Span::current();
        span.record("outcome", outcome);
        if let Err(e) = &result {
            if outcome == "error" {
                span.record("otel.status_code", "ERROR");
                span.record("error.message", e.to_string());
            }
        }
        self.record(&result, outcome, started.elapsed());
        result
    }

    async fn tick_inner(
        &self,
        cancel: &CancellationToken,
        mode: LockMode,
        heads: Option<Heads>,
    ) -> Result<TickOutcome, TickError> {
        let rpc = self.stream.chain.pick();
        tracing::Span::current().record("endpoint", rpc.endpoint());
        let followed = heads.is_some();
        let mut heads = match heads {
            Some(h) => h,
            None => self.look(&rpc).await.inspect_err(|e| self.cool_down_after(&rpc, e))?,
        };
        // Idle costs nothing: a plain read (no lock, no transaction id).
        let (peeked, peeked_hash, halted) = self.peek().await?;
        if followed && peeked.block().is_some_and(|c| c > heads.head) {
            // Another replica's follower saw a newer head first: ask the
            // node itself before calling it behind.
            heads = self.look(&rpc).await.inspect_err(|e| self.cool_down_after(&rpc, e))?;
        }
        // Known now, whatever the tick's outcome: a stream that fails from
        // the start of this replica still shows how far behind it is.
        self.saw_heads(heads.head, heads.safe_head, peeked);
        if let Some(c) = peeked.block().filter(|c| *c > heads.head) {
            // After a failover, a node behind the cursor: never move back.
            let e: TickError = rpc
                .error(
                    "eth_blockNumber",
                    ChainErrorKind::Lagging {
                        head: heads.head,
                        needed: c,
                    },
                )
                .into();
            self.cool_down_after(&rpc, &e);
            return Err(e);
        }
        // A halted stream is never idle: each tick checks again (a halt by
        // a deep reorg stays until a rewind; one by a bad event until the
        // stream gets past it).
        let mut reorged = halted;
        if peeked.next() > heads.safe_head && !halted {
            let head_moved = self.head_changed(heads.head_hash) && heads.suspect_reorg != Some(false);
            if let (true, Some(block), Some(stored)) = (head_moved, peeked.block(), peeked_hash) {
                // The chain changed while this stream is caught up: is the
                // cursor's block still the one processed? (A reorg at the
                // same height adds no range to pin.)
                let now = match rpc.canonical_headers(&[block]).await {
                    Ok(now) => now,
                    Err(e) => {
                        self.forget_head(); // not checked: the next tick checks again
                        return Err(e.into());
                    }
                };
                reorged = now[0].hash != stored;
            }
            if !reorged {
                self.saw(peeked.to_db());
                return Ok(TickOutcome::Idle {
                    cursor: peeked.to_db(),
                    head: heads.head,
                    safe_head: heads.safe_head,
                });
            }
        }
        let mut client = self.db.get().await?;
        let result = self.locked(&mut client, &rpc, heads, reorged, cancel, mode).await;
        if reorged && result.is_err() {
            // The reorg found at this head is still there: the next tick
            // must look again, though the head has not changed.
            self.forget_head();
        }
        if let Some(e) = result.as_ref().err().and_then(TickError::store_error) {
            // The connection saw the server go away or turn read-only
            // (in the tick or in the write seam): never again.
            if self.db.evict_if_broken(client, e).is_none() {
                return result;
            }
        }
        result
    }

    /// Everything under the lock.
    async fn locked(
        &self,
        client: &mut deadpool_postgres::Object,
        rpc: &Rpc<'_>,
        heads: Heads,
        check_cursor: bool,
        cancel: &CancellationToken,
        mode: LockMode,
    ) -> Result<TickOutcome, TickError> {
        let (tx, (current, recorded), lock_wait) = self.lock(client, cancel, mode).await?;
        let locked_at = Instant::now();
        let (budget, timeout) = (self.stream.cfg.rpc_budget, self.stream.cfg.rpc_timeout);
        let session = Session {
            tx: &tx,
            beat: self.limits.idle_in_transaction_timeout / 3,
            deadline: locked_at + budget,
            parts_deadline: locked_at + budget - timeout.min(budget / 2),
            budget,
        };
        filter::check(&*tx, &self.stream, &current, &self.replica_id).await?;
        // Before any RPC work: a program without the stream's handlers stops here.
        guard::check_recorded(
            &*tx,
            &self.stream.cfg.name,
            &self.stream.writer.handlers,
            guard::Mode::Record,
            &recorded,
        )
        .await?;
        let Some((from, planned_to)) = plan_range(current.processed, heads.safe_head, self.stream.cfg.max_block_range)
        else {
            if let (true, Some(block), Some(stored)) = (check_cursor, current.processed.block(), current.hash) {
                let now = session
                    .wait(async { Ok(rpc.canonical_headers(&[block]).await?) })
                    .await?;
                if now[0].hash != stored {
                    let ancestor = self.ancestor(&tx, &session, rpc, &current).await?;
                    return self.deep_reorg(tx, current, now[0].hash, ancestor).await;
                }
            }
            // Another replica got here first.
            tx.commit().await.map_err(StoreError::db("commit idle tick"))?;
            return Ok(TickOutcome::Idle {
                cursor: current.processed.to_db(),
                head: heads.head,
                safe_head: heads.safe_head,
            });
        };
        let pin = match session.wait(verify::pin(rpc, from, planned_to)).await {
            Ok(p) => p,
            Err(e) => {
                self.cool_down_after(rpc, &e);
                return Err(e);
            }
        };
        if let Err(canonical) = pin.check(current.hash) {
            let ancestor = self.ancestor(&tx, &session, rpc, &current).await?;
            return self.deep_reorg(tx, current, canonical, ancestor).await;
        }
        let span = tracing::Span::current();
        span.record("from_block", from);
        let first = self.first_part(rpc, &session, from, planned_to).await;
        let (first, rest) = match first {
            Ok(parts) => parts,
            Err(e) => {
                let Some((skip_from, skip_to)) = self.skippable(rpc, from, planned_to, &e) else {
                    return Err(e);
                };
                // Best effort, and bounded like the tick's other requests:
                // the header may be served when the logs are not.
                let until = session.deadline.min(Instant::now() + SKIP_HEADER_WAIT);
                let header = session
                    .wait_until(until, async { Ok(rpc.canonical_headers(&[skip_to]).await?) })
                    .await;
                let hash = header.ok().map(|h| h[0].hash);
                return self.skip(tx, &current, (skip_from, skip_to), e, hash).await;
            }
        };
        let stored = match self.write_parts(&tx, &session, rpc, first, rest).await {
            Err(TickError::Write(e @ WriteError::Halt { .. })) => {
                // Nothing of the range stays; the halt is recorded once the
                // lock is released.
                tx.rollback()
                    .await
                    .map_err(StoreError::db("roll back before halting"))?;
                return Err(self.halt(e).await);
            }
            other => other?,
        };
        let whole = stored.to.filter(|t| *t >= from);
        let expect = Expect {
            from,
            cursor_hash: current.hash,
            to: whole,
            written_to: stored.stopped_at.or(whole).unwrap_or(from),
            pinned: pin.to,
            named: &stored.blocks,
            ends: &stored.ends,
        };
        let verified = match session.wait(verify::verify(rpc, &expect)).await {
            Ok(v) => v,
            Err(e) => {
                self.cool_down_after(rpc, &e);
                return Err(e);
            }
        };
        let Some(to) = whole else {
            // The savepoint budget ran out inside the first block: commit what
            // was handled (checked above like a whole range); the cursor
            // stays and the next tick goes on.
            let at = stored.stopped_at.unwrap_or(from);
            announce(&*tx, self.db.schema(), &self.stream, at, at, stored.inserted).await?;
            tx.commit().await.map_err(StoreError::db("commit partial tick"))?;
            if stored.inserted > 0 {
                self.stream.committed.notify_waiters();
            }
            return Ok(TickOutcome::Partial {
                at,
                inserted: stored.inserted,
                dead_lettered: usize::try_from(stored.parked).unwrap_or(usize::MAX),
            });
        };
        span.record("to_block", to);
        self.advance(tx, &current, (from, to), stored.inserted, &verified)
            .await?;
        span.record("events_inserted", stored.inserted);
        span.record("duplicates", stored.duplicates);
        if self.stream.cfg.pipeline && to == planned_to && to < heads.safe_head {
            // Backfill: fetch the next range while this replica (or another)
            // works on; used only if the cursor is still where it assumes.
            self.start_prefetch(
                to + 1,
                heads.safe_head.min(to.saturating_add(self.stream.cfg.max_block_range)),
            );
        }
        self.refusals_reset();
        Ok(TickOutcome::Advanced {
            from,
            to,
            head: heads.head,
            safe_head: heads.safe_head,
            to_timestamp: verified.last_time,
            logs: stored.logs,
            dead_lettered: usize::try_from(stored.parked).unwrap_or(usize::MAX),
            inserted: stored.inserted,
            duplicates: stored.duplicates,
            lock_wait,
            lock_hold: locked_at.elapsed(),
        })
    }

    /// The head and the safe head, from the tick's endpoint.
    async fn look(&self, rpc: &Rpc<'_>) -> Result<Heads, TickError> {
        let cfg = &self.stream.cfg;
        let latest = rpc
            .latest()
            .instrument(info_span!(
                "rpc.eth_blockNumber",
                rpc.system = "jsonrpc",
                rpc.method = "eth_getBlockByNumber",
                server.address = rpc.endpoint()
            ))
            .await?;
        let head = latest.number;
        Ok(Heads {
            head,
            head_hash: latest.hash,
            safe_head: cfg.safe_head_at(rpc, head).await?,
            suspect_reorg: None,
        })
    }

    /// Forgets the head this stream saw, so that the next tick looks at the
    /// cursor's block again.
    fn forget_head(&self) {
        *self.head_seen.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether the head's hash differs from the last one this stream saw.
    fn head_changed(&self, now: Hash32) -> bool {
        let mut seen = self.head_seen.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *seen != Some(now);
        *seen = Some(now);
        changed
    }

    /// The cursor, its hash, and whether the stream is halted, read without a lock.
    async fn peek(&self) -> Result<(Processed, Option<Hash32>, bool), TickError> {
        let client = self.db.get().await?;
        let name = self.stream.cfg.name.as_str();
        // One statement, one round trip: no transaction to begin or end,
        // so no statement_timeout either: past it the server is asked to
        // cancel the read (an exclusive lock on the table, say).
        let cancel_query = client.cancel_token();
        let names = [name];
        let read = cursor::get_many_in(&**client, Some(self.db.search_path()), &names);
        tokio::pin!(read);
        let found = tokio::select! {
            r = &mut read => r?,
            _ = tokio::time::sleep(self.limits.statement_timeout) => {
                self.db.cancel(cancel_query).await;
                read.await?
            }
        };
        self.db.note_answered();
        let row = found
            .into_iter()
            .next()
            .map(|(_, r)| r)
            .ok_or_else(|| StoreError::CursorMissing(name.to_string()))?;
        Ok((row.cursor.processed, row.cursor.hash, row.halted_reason.is_some()))
    }

    /// BEGIN, the local settings, and the row lock; how long the lock took.
    async fn lock<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
        cancel: &CancellationToken,
        mode: LockMode,
    ) -> Result<(Tx<'c>, (Cursor, Vec<String>), Duration), TickError> {
        let cancel_query = client.cancel_token();
        let tx = self.db.begin(client, self.limits).await?;
        let wait_started = Instant::now();
        let current = tokio::select! {
            r = cursor::lock_recorded(&*tx, &self.stream.cfg.name, mode)
                .instrument(info_span!("cursor.lock", db.system = "postgresql", db.operation = "SELECT FOR UPDATE")) => r?,
            _ = cancel.cancelled() => {
                // Ask the server to abandon the lock wait; dropping `tx` then rolls back.
                self.db.cancel(cancel_query).await;
                return Err(TickError::Cancelled);
            }
        };
        self.note_regression(current.0.processed.to_db());
        Ok((tx, current, wait_started.elapsed()))
    }

    /// The first part of `[from, to]` (from the prefetch when it is for
    /// exactly this), and the parts after it being fetched.
    async fn first_part(
        &self,
        rpc: &Rpc<'_>,
        session: &Session<'_>,
        from: u64,
        to: u64,
    ) -> Result<(Part, Parts), TickError> {
        let mut parts = match self.take_prefetch(from, to, rpc.index()) {
            Some(p) => p,
            None => Parts::spawn(
                Arc::clone(&self.stream),
                rpc.index(),
                from,
                to,
                self.stream.filter.clone(),
            ),
        };
        let first = match session.wait(async { Ok(parts.next().await) }).await? {
            Some(Ok(part)) => part,
            Some(Err(e)) => return Err(e),
            None => return Err(TickError::FetchEnded { at: from, to }),
        };
        Ok((first, parts))
    }

    /// Writes each part as it arrives (the next ones are fetched meanwhile)
    /// until the range, `max_logs_per_tick` or the savepoint budget ends,
    /// or a later part fails (then what was written stands).
    async fn write_parts(
        &self,
        tx: &Tx<'_>,
        session: &Session<'_>,
        rpc: &Rpc<'_>,
        first: Part,
        mut rest: Parts,
    ) -> Result<Stored, TickError> {
        let mut stored = Stored::default();
        let mut budget = Savepoints::handlers_checked(); // at the lock
        let mut next = Some(first);
        loop {
            let part = match next.take() {
                Some(p) => p,
                None => match session
                    .wait_until(session.parts_deadline, async { Ok(rest.next().await) })
                    .await
                {
                    Ok(None) => break,
                    Ok(Some(Ok(p))) => p,
                    Ok(Some(Err(e))) | Err(e) => {
                        tracing::warn!(stream = %self.stream.cfg.name, error = %e, kept_to = ?stored.to, "a later part of the range failed; committing the parts before it");
                        self.cool_down_after(rpc, &e);
                        break;
                    }
                },
            };
            let (part_to, short, logs) = (part.to, part.short, part.logs);
            let written = self.stream.writer.write(tx, &mut budget, part.batch).await?;
            stored.logs += logs;
            stored.parked += written.parked;
            stored.inserted += written.inserted;
            stored.duplicates += written.duplicates;
            stored.blocks.extend(part.blocks);
            stored.ends.extend(part.ends);
            if let Some(stop) = written.stopped {
                stored.stopped_at = Some(stop.incomplete_block);
                stored.to = stop.incomplete_block.checked_sub(1).or(stored.to);
                break;
            }
            stored.to = Some(part_to);
            if short || stored.logs as u64 >= self.stream.cfg.max_logs_per_tick || !budget.left() {
                break; // the rest is the next tick's
            }
        }
        Ok(stored)
    }

    /// Records the verified hashes and moves the cursor; announces the
    /// stored rows (delivered at COMMIT); COMMIT.
    async fn advance(
        &self,
        tx: Tx<'_>,
        current: &Cursor,
        (from, to): (u64, u64),
        inserted: u64,
        verified: &verify::Verified,
    ) -> Result<(), TickError> {
        let name = self.stream.cfg.name.as_str();
        let hashes: Vec<(i64, Hash32)> = verified
            .hashes
            .iter()
            .map(|(n, h)| (BlockNumber::saturating(*n).to_db(), *h))
            .collect();
        let to = BlockNumber::saturating(to);
        reorg::remember_hashes(&*tx, name, &hashes, to.to_db(), self.stream.cfg.max_reorg_depth).await?;
        cursor::advance(
            &*tx,
            name,
            current.processed,
            to,
            Some(verified.last_hash),
            self.stream.fingerprint,
            &self.replica_id,
        )
        .instrument(info_span!(
            "cursor.advance",
            db.system = "postgresql",
            db.operation = "UPDATE"
        ))
        .await?;
        announce(&*tx, self.db.schema(), &self.stream, from, to.get(), inserted).await?;
        tx.commit()
            .instrument(info_span!(
                "db.commit",
                db.system = "postgresql",
                db.operation = "COMMIT"
            ))
            .await
            .map_err(StoreError::db("commit tick"))?;
        if inserted > 0 {
            self.stream.committed.notify_waiters();
        }
        self.saw(to.to_db());
        Ok(())
    }

    /// The first part of the range failed. With `skip_and_backfill`, a
    /// range the provider itself refuses (a block too large, the same
    /// deterministic error from every endpoint) `range_attempts` times is
    /// recorded in `failed_ranges` and passed; anything else (429, 5xx,
    /// timeouts, a lagging or malformed endpoint) is retried, never skipped.
    /// Whether `e` (the first part's failure) skips a range now, and which.
    fn skippable(&self, rpc: &Rpc<'_>, from: u64, to: u64, e: &TickError) -> Option<(u64, u64)> {
        self.cool_down_after(rpc, e);
        let TickError::Chain(c) = e else {
            return None;
        };
        if self.stream.cfg.on_unfetchable_range != UnfetchablePolicy::SkipAndBackfill
            || !self.refused_enough(from, rpc.index(), c)
        {
            return None;
        }
        // A single block that overflows is skipped alone.
        Some(match c.kind {
            ChainErrorKind::BlockTooLarge { block, .. } => (block, block),
            _ => (from, to),
        })
    }

    /// Records `[from, to]` in `failed_ranges` and moves the cursor past it
    /// (to `hash`, when its header was served).
    async fn skip(
        &self,
        tx: Tx<'_>,
        current: &Cursor,
        (from, to): (u64, u64),
        e: TickError,
        hash: Option<Hash32>,
    ) -> Result<TickOutcome, TickError> {
        let name = self.stream.cfg.name.as_str();
        let error = e.to_string();
        let (from_db, to_db) = (
            BlockNumber::saturating(from).to_db(),
            BlockNumber::saturating(to).to_db(),
        );
        failed_ranges::record(&*tx, name, from_db, to_db, &error).await?;
        cursor::advance(
            &*tx,
            name,
            current.processed,
            BlockNumber::saturating(to),
            hash,
            self.stream.fingerprint,
            &self.replica_id,
        )
        .await?;
        tx.commit().await.map_err(StoreError::db("commit skipped range"))?;
        self.refusals_reset();
        tracing::warn!(stream = name, from, to, %error, "skipped a range the provider will not serve; the gap-fill worker will fetch it");
        Ok(TickOutcome::Skipped { from, to, error })
    }

    /// Counts a refusal of the range at `from`; whether it may be skipped now.
    fn refused_enough(&self, from: u64, endpoint: usize, e: &ChainError) -> bool {
        if !e.refuses_the_range() {
            return false;
        }
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if r.at != from {
            *r = super::tick::Refusals {
                at: from,
                ..Default::default()
            };
        }
        r.count += 1;
        if matches!(e.kind, ChainErrorKind::Rpc { .. }) {
            r.endpoints.insert(endpoint);
        }
        let everywhere =
            matches!(e.kind, ChainErrorKind::BlockTooLarge { .. }) || r.endpoints.len() >= self.stream.chain.len();
        r.count >= self.stream.cfg.range_attempts && everywhere
    }

    fn refusals_reset(&self) {
        *self.refusals.lock().unwrap_or_else(|p| p.into_inner()) = Refusals::default();
    }

    /// An endpoint that failed, answered inconsistently or made the tick
    /// exceed its budget is passed over: the next tick takes another.
    fn cool_down_after(&self, rpc: &Rpc<'_>, e: &TickError) {
        let fault = match e {
            TickError::Chain(c) => c.is_endpoint_fault(),
            TickError::RpcBudget { .. } | TickError::Reorged { .. } | TickError::FetchEnded { .. } => true,
            _ => false,
        };
        if fault && self.stream.chain.len() > 1 {
            rpc.cool_down();
        }
    }

    /// A policy said halt: once the tick's transaction is rolled back,
    /// record the halt on its own, outside the lock.
    /// (In a transaction of its own: it needs the schema's `search_path`.)
    async fn halt(&self, e: WriteError) -> TickError {
        let reason = e.to_string();
        let record = async {
            let mut client = self.db.get().await?;
            let tx = self.db.begin(&mut client, self.limits).await?;
            cursor::halt(&*tx, &self.stream.cfg.name, &reason).await?;
            tx.commit().await.map_err(StoreError::db("commit halt"))
        };
        if let Err(err) = record.await {
            // The next tick meets the same event and tries again.
            tracing::warn!(stream = %self.stream.cfg.name, error = %err, "could not record the halt in block_cursors");
        }
        e.into()
    }

    /// Notes the failure on the cursor row, for `status` (best effort: the
    /// error is logged by the loop either way).
    async fn record_failure(&self, e: &TickError) {
        let record = async {
            let mut client = self.db.get().await?;
            let tx = self.db.begin(&mut client, self.limits).await?;
            cursor::record_failure(&*tx, &self.stream.cfg.name, &e.to_string()).await?;
            tx.commit().await.map_err(StoreError::db("commit failure note"))
        };
        if let Err(err) = record.await {
            tracing::debug!(stream = %self.stream.cfg.name, error = %err, "could not note the failure in block_cursors");
        }
    }

    /// Under `on_deep_reorg = "rewind"`, the newest stored block within
    /// `max_reorg_depth` that is still canonical; its headers are asked
    /// like any of the tick's (heartbeats, the budget).
    async fn ancestor(
        &self,
        tx: &Tx<'_>,
        session: &Session<'_>,
        rpc: &Rpc<'_>,
        current: &Cursor,
    ) -> Result<Option<(i64, Hash32)>, TickError> {
        let cfg = &self.stream.cfg;
        if cfg.on_deep_reorg != DeepReorgPolicy::Rewind {
            return Ok(None);
        }
        let candidates =
            reorg::recent_hashes(&**tx, cfg.name.as_str(), current.processed.to_db(), cfg.max_reorg_depth).await?;
        let numbers: Vec<u64> = candidates.iter().filter_map(|(n, _)| u64::try_from(*n).ok()).collect();
        let now = session
            .wait(async { Ok(rpc.canonical_headers(&numbers).await?) })
            .await?;
        Ok(candidates
            .into_iter()
            .zip(now)
            .find(|((_, was), is)| *was == is.hash)
            .map(|((n, h), _)| (n, h)))
    }

    /// The block under the cursor was reorganised away: halt the stream, or
    /// rewind it to `ancestor`, the newest stored block that is still
    /// canonical (see [`Poller::ancestor`]).
    async fn deep_reorg(
        &self,
        tx: Tx<'_>,
        current: Cursor,
        canonical: Hash32,
        ancestor: Option<(i64, Hash32)>,
    ) -> Result<TickOutcome, TickError> {
        let cfg = &self.stream.cfg;
        let name = cfg.name.as_str();
        let height = current.processed.to_db();
        let stored = current.hash.unwrap_or_default();
        let found = format!("block {height} was {stored} when processed, the chain now has {canonical}");
        let Some((to, to_hash)) = ancestor else {
            let reason = match cfg.on_deep_reorg {
                DeepReorgPolicy::Halt => format!("reorg below the safe head: {found}; on_deep_reorg = \"halt\": run `logcursor rewind --stream {name} --to N`"),
                DeepReorgPolicy::Rewind => format!("reorg below the safe head: {found}; no stored block within max_reorg_depth = {} is still canonical", cfg.max_reorg_depth),
            };
            cursor::halt(&*tx, name, &reason).await?;
            tx.commit().await.map_err(StoreError::db("commit halt"))?;
            return Err(TickError::DeepReorg {
                stream: name.to_string(),
                reason,
            });
        };
        let reason = format!("reorg below the safe head: {found}");
        let deleted = self.stream.writer.remove_above(&tx, to).await?;
        reorg::rewind(
            &*tx,
            name,
            height,
            to,
            Some(stored),
            Some(to_hash),
            &reason,
            &self.replica_id,
            deleted,
        )
        .await?;
        tx.commit().await.map_err(StoreError::db("commit rewind"))?;
        tracing::warn!(stream = name, from = height, to, events_deleted = deleted, %stored, %canonical, "deep reorg: rewound the cursor to the common ancestor");
        Ok(TickOutcome::Rewound {
            from: height,
            to,
            events_deleted: deleted,
        })
    }

    /// Starts fetching `[from, to]` in the background (replacing, and so
    /// aborting, any earlier prefetch).
    fn start_prefetch(&self, from: u64, to: u64) {
        // Only with a free slot: a prefetch waits for its tick holding
        // memory, so few may wait at once.
        let Ok(slot) = Arc::clone(&self.stream.prefetch_slots).try_acquire_owned() else {
            return;
        };
        let endpoint = self.stream.chain.pick().index();
        let next = Parts::prefetch(
            Arc::clone(&self.stream),
            endpoint,
            from,
            to,
            self.stream.filter.clone(),
            slot,
        );
        *self.prefetch.lock().unwrap_or_else(|p| p.into_inner()) = Some(next);
    }

    /// The prefetched range, if it starts at `from` (the cursor read under
    /// the lock, plus one), ends within `to` (today's plan), comes from the
    /// tick's endpoint and is younger than [`PREFETCH_TTL`]; anything else
    /// was assumed on a cursor that has moved (or another node, or an older
    /// chain), and is discarded. What is used is verified like any part.
    fn take_prefetch(&self, from: u64, to: u64, endpoint: usize) -> Option<Parts> {
        let p = self.prefetch.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        if p.from != from || p.to > to || p.endpoint != endpoint || p.started.elapsed() > PREFETCH_TTL {
            self.metrics.prefetch_discarded.inc();
            return None; // dropped: aborted
        }
        self.metrics.prefetch_used.inc();
        Some(p)
    }
}

/// Sends the stream's commit notification in `tx` when `rows` were stored
/// (PostgreSQL delivers it at COMMIT, never for a rollback).
pub(crate) async fn announce<C: crate::store::GenericClient>(
    tx: &C,
    schema: &str,
    stream: &super::Stream,
    from: u64,
    to: u64,
    rows: u64,
) -> Result<(), TickError> {
    if rows == 0 {
        return Ok(());
    }
    let payload =
        serde_json::json!({"stream": stream.cfg.name.as_str(), "from": from, "to": to, "rows": rows}).to_string();
    tx.execute_typed(
        "SELECT pg_notify($1, $2)",
        &[
            (&stream.cfg.name.channel(schema), tokio_postgres::types::Type::TEXT),
            (&payload, tokio_postgres::types::Type::TEXT),
        ],
    )
    .await
    .map_err(StoreError::db("notify"))?;
    Ok(())
}

/// The tick's range: `[cursor + 1, min(safe_head, cursor + max_range)]`,
/// or `None` when the cursor has reached the safe head.
pub fn plan_range(cursor: Processed, safe_head: u64, max_range: u64) -> Option<(u64, u64)> {
    let from = cursor.next();
    let to = safe_head.min(from.saturating_add(max_range.max(1) - 1));
    (to >= from).then_some((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: i64) -> Processed {
        Processed::from_db(n)
    }

    #[test]
    fn range_starts_after_the_cursor_and_stops_at_the_safe_head_or_the_cap() {
        assert_eq!(plan_range(at(-1), 10, 2000), Some((0, 10)));
        assert_eq!(plan_range(at(-1), 0, 2000), Some((0, 0)));
        assert_eq!(plan_range(at(9), 10, 2000), Some((10, 10)));
        assert_eq!(plan_range(at(10), 10, 2000), None);
        assert_eq!(plan_range(at(12), 10, 2000), None, "a cursor above the safe head waits");
        assert_eq!(plan_range(at(99), 10_000, 100), Some((100, 199)));
        assert_eq!(plan_range(at(99), 10_000, 1), Some((100, 100)));
    }
}
