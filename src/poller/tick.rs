//! One tick: one READ COMMITTED transaction that holds the stream's cursor
//! row lock from the first statement to COMMIT.
//!
//! ```text
//! BEGIN ISOLATION LEVEL READ COMMITTED
//! set_config(lock_timeout / statement_timeout / idle_in_transaction_session_timeout, local)
//! SELECT … FROM block_cursors WHERE id = $stream FOR UPDATE   -- replicas queue here
//! pick one endpoint for the whole tick
//! head ≥ cursor?  (else: the endpoint lags; fail, pass it over)
//! header(cursor).hash = stored hash?  (else: deep reorg → halt or rewind)
//! range := [cursor+1, min(latest − confirmations, [finalized], cursor + max_block_range)]
//!   empty → COMMIT (nothing changed), caller waits poll_interval
//! for each part of the range, in order (fetched and decoded ahead by a task
//!   of their own, `fetch_concurrency` at a time; see `parts`):
//!   logs that do not decode → dead_letters, or halt (roll back, record it)
//!   COPY / INSERT … ON CONFLICT DO NOTHING (duplicates counted)
//! headers of every block with logs + the range end in one batch; every log's
//!   block hash must match its header; remember block hashes
//! UPDATE block_cursors … WHERE last_processed_block = $old   -- exactly 1 row
//! COMMIT
//! ```
//!
//! While part k is written, parts k+1… are fetched; a part that fails after
//! others were written ends the range there (what was written commits, the
//! cursor moves to its end), so progress is never thrown away.
//!
//! Why READ COMMITTED: a replica blocked on the row lock re-reads the row
//! once the holder commits, and so sees the advanced cursor and polls only
//! the new range (under REPEATABLE READ it would fail with 40001 instead).
//! Any error drops the transaction, which rolls back: the events and the
//! cursor move together or not at all (I1, I4).
//!
//! I6 (no session idle in transaction past its bound): the transaction sets
//! `idle_in_transaction_session_timeout` locally, and each RPC request has a
//! deadline shorter than it (checked by config validation), so a replica
//! that freezes while holding the lock is cut off by the server. While the
//! writer waits for the next part the session is idle in transaction: that
//! wait, like the RPC calls of the tick itself, gives up at 90% of the bound.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;
use tokio_postgres::IsolationLevel;
use tokio_util::sync::CancellationToken;
use tracing::{field, info_span, Instrument};

use super::parts::{self, Part, Parts, Stored};
use super::{Poller, TickError, TickOutcome};
use crate::chain::{ChainError, ChainErrorKind, Hash32, Header, Rpc};
use crate::config::{DeepReorgPolicy, UnfetchablePolicy};
use crate::store::{cursor, failed_ranges, reorg, StoreError};

/// What the RPC phase of a tick found, before anything is written.
enum Fetched {
    /// The cursor is at the safe head.
    Idle { head: u64, safe_head: u64 },
    /// The block under the cursor is no longer canonical.
    Reorged { canonical: Hash32 },
    /// `[from, to]` failed again and the policy says skip it.
    Unfetchable { from: u64, to: u64, error: String },
    /// A range to store, `[from, to]` as planned: its first part, and the
    /// task fetching the others.
    Range {
        from: u64,
        to: u64,
        head: u64,
        safe_head: u64,
        first: Part,
        rest: Parts,
    },
}

impl Poller {
    /// Runs one tick. `cancel` interrupts only the wait for the row lock
    /// (nothing has been done yet then); once the lock is held, the tick
    /// runs to COMMIT or rollback.
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
    pub async fn tick(&self, cancel: &CancellationToken) -> Result<TickOutcome, TickError> {
        let started = Instant::now();
        let result = self.tick_inner(cancel).await;
        match &result {
            Ok(_) => self.range_failures.store(0, Ordering::Relaxed),
            Err(e) if is_unfetchable(e) => {
                self.range_failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        if let Err(e) = &result {
            if !(e.is_lock_timeout() || matches!(e, TickError::Cancelled)) {
                self.record_failure(e).await;
            }
        }
        let outcome = match &result {
            Ok(TickOutcome::Idle { .. }) => "idle",
            Ok(TickOutcome::Advanced { .. }) => "advanced",
            Ok(TickOutcome::Rewound { .. }) => "rewound",
            Ok(TickOutcome::Skipped { .. }) => "skipped",
            Err(TickError::Cancelled) => "cancelled",
            Err(e) if e.is_lock_timeout() => "lock_timeout",
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

    async fn tick_inner(&self, cancel: &CancellationToken) -> Result<TickOutcome, TickError> {
        let s = &self.stream;
        let name = s.cfg.name.as_str();
        let mut client = self.db.get().await?;
        let cancel_query = client.cancel_token();
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(StoreError::db("begin tick"))?;
        tx.query_typed(
            "SELECT set_config('lock_timeout', $1, true),
                    set_config('statement_timeout', $2, true),
                    set_config('idle_in_transaction_session_timeout', $3, true)",
            &[
                (&millis(self.limits.lock_timeout), Type::TEXT),
                (&millis(self.limits.statement_timeout), Type::TEXT),
                (&millis(self.limits.idle_in_transaction_timeout), Type::TEXT),
            ],
        )
        .await
        .map_err(StoreError::db("set transaction limits"))?;

        let wait_started = Instant::now();
        let current = tokio::select! {
            r = cursor::lock(&*tx, name).instrument(info_span!("cursor.lock", db.system = "postgresql", db.operation = "SELECT FOR UPDATE")) => r?,
            _ = cancel.cancelled() => {
                // Ask the server to abandon the lock wait; dropping `tx` then rolls back.
                self.db.cancel(cancel_query).await;
                return Err(TickError::Cancelled);
            }
        };
        let lock_wait = wait_started.elapsed();
        let locked_at = Instant::now();
        self.note_regression(current.last_processed_block);

        let rpc = s.chain.pick();
        tracing::Span::current().record("endpoint", rpc.endpoint());
        let skip_on_failure = s.cfg.on_unfetchable_range == UnfetchablePolicy::SkipAndBackfill
            && self.range_failures.load(Ordering::Relaxed) + 1 >= s.cfg.range_attempts;
        let fetched = match self.within_budget(self.fetch(&rpc, &current, skip_on_failure)).await {
            Err(e) => {
                if matches!(&e, TickError::Chain(c) if c.is_endpoint_fault()) {
                    rpc.cool_down();
                }
                return Err(e);
            }
            Ok(f) => f,
        };
        let (from, planned_to, head, safe_head, first, mut rest) = match fetched {
            Fetched::Idle { head, safe_head } => {
                tx.commit().await.map_err(StoreError::db("commit idle tick"))?;
                return Ok(TickOutcome::Idle {
                    cursor: current.last_processed_block,
                    head,
                    safe_head,
                    lock_wait,
                });
            }
            Fetched::Reorged { canonical } => return self.deep_reorg(tx, &rpc, current, canonical).await,
            Fetched::Unfetchable { from, to, error } => {
                // Best effort: the header may be served when the logs are not.
                let hash = self
                    .within_budget(canonical_hashes(&rpc, &[to]))
                    .await
                    .ok()
                    .map(|h| h[0]);
                failed_ranges::record(&*tx, name, to_i64(from), to_i64(to), &error).await?;
                cursor::advance(
                    &*tx,
                    name,
                    current.last_processed_block,
                    to_i64(to),
                    hash,
                    &self.replica_id,
                )
                .await?;
                tx.commit().await.map_err(StoreError::db("commit skipped range"))?;
                tracing::warn!(stream = name, from, to, %error, "skipped a range the provider will not serve; the gap-fill worker will fetch it");
                return Ok(TickOutcome::Skipped { from, to, error });
            }
            Fetched::Range {
                from,
                to,
                head,
                safe_head,
                first,
                rest,
            } => (from, to, head, safe_head, first, rest),
        };
        let span = tracing::Span::current();
        span.record("from_block", from);

        // Write each part as it arrives; the next ones are fetched meanwhile.
        let mut stored = Stored::default();
        let mut next = Some(Ok(first));
        while let Some(item) = match next.take() {
            Some(item) => Some(item),
            None => self.next_part(&mut rest).await,
        } {
            let part = match item {
                Ok(part) => part,
                Err(e) => {
                    tracing::warn!(stream = name, error = %e, kept_to = ?stored.to, "a later part of the range failed; committing the parts before it");
                    break;
                }
            };
            match stored.store(&*tx, s, part).await {
                Ok(()) => {}
                Err(e @ TickError::Decode { .. }) => {
                    // on_bad_event = halt: nothing of the range stays; the
                    // halt is recorded on its own once the lock is released.
                    tx.rollback()
                        .await
                        .map_err(StoreError::db("roll back before halting"))?;
                    cursor::halt(&**client, name, &format!("{e}; on_bad_event = \"halt\"")).await?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
            if stored.short {
                break; // a single block overflows after this part
            }
        }
        drop(rest); // stops fetching past a stop
        let to = stored.to.unwrap_or(from); // the first part was stored
        span.record("to_block", to);
        let verified = self.within_budget(parts::verify(&rpc, &stored.blocks, to)).await?;
        let hashes: Vec<(i64, Hash32)> = verified.hashes.iter().map(|(n, h)| (to_i64(*n), *h)).collect();
        reorg::remember_hashes(&*tx, name, &hashes, to_i64(to), s.cfg.max_reorg_depth).await?;
        cursor::advance(
            &*tx,
            name,
            current.last_processed_block,
            to_i64(to),
            Some(verified.last_hash),
            &self.replica_id,
        )
        .instrument(info_span!(
            "cursor.advance",
            db.system = "postgresql",
            db.operation = "UPDATE"
        ))
        .await?;
        tx.commit()
            .instrument(info_span!(
                "db.commit",
                db.system = "postgresql",
                db.operation = "COMMIT"
            ))
            .await
            .map_err(StoreError::db("commit tick"))?;

        span.record("events_inserted", stored.inserted);
        span.record("duplicates", stored.duplicates);
        if s.cfg.pipeline && to == planned_to && to < safe_head {
            // Backfill: fetch the next range while this replica (or another)
            // works on; used only if the cursor is still where it assumes.
            self.start_prefetch(to + 1, safe_head.min(to.saturating_add(s.cfg.max_block_range)));
        }
        Ok(TickOutcome::Advanced {
            from,
            to,
            head,
            safe_head,
            to_timestamp: verified.last_time,
            logs: stored.logs,
            dead_lettered: stored.dead_lettered,
            inserted: stored.inserted,
            duplicates: stored.duplicates,
            lock_wait,
            lock_hold: locked_at.elapsed(),
        })
    }

    /// The next part, waited for at most 90% of the idle-in-transaction
    /// timeout (the session is idle in transaction meanwhile: I6).
    async fn next_part(&self, parts: &mut Parts) -> Option<Result<Part, TickError>> {
        self.within_budget(async { parts.next().await.transpose() })
            .await
            .transpose()
    }

    /// Notes the failure on the cursor row, for `status` (best effort: the
    /// error is logged by the loop either way).
    async fn record_failure(&self, e: &TickError) {
        if let Ok(client) = self.db.get().await {
            let _ = cursor::record_failure(&**client, &self.stream.cfg.name, &e.to_string()).await;
        }
    }

    /// The RPC work of a tick must end before the server's idle-in-transaction
    /// timeout would end the session (I6): give up a little earlier, cleanly.
    async fn within_budget<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, TickError>>,
    ) -> Result<T, TickError> {
        let budget = self.limits.idle_in_transaction_timeout.mul_f64(0.9);
        tokio::time::timeout(budget, work)
            .await
            .unwrap_or(Err(TickError::RpcBudget { budget }))
    }

    /// Everything the tick needs from the chain, from one endpoint, checked
    /// for consistency: the head is not behind the cursor, the cursor's block
    /// still has its stored hash, every log carries its header's hash.
    async fn fetch(
        &self,
        rpc: &Rpc<'_>,
        current: &cursor::Cursor,
        skip_on_failure: bool,
    ) -> Result<Fetched, TickError> {
        let cfg = &self.stream.cfg;
        let head = rpc
            .block_number()
            .instrument(info_span!(
                "rpc.eth_blockNumber",
                rpc.system = "jsonrpc",
                rpc.method = "eth_blockNumber",
                server.address = rpc.endpoint()
            ))
            .await?;
        let cursor_block = u64::try_from(current.last_processed_block).ok();
        if let Some(c) = cursor_block.filter(|c| *c > head) {
            return Err(rpc
                .error("eth_blockNumber", ChainErrorKind::Lagging { head, needed: c })
                .into());
        }
        if let (Some(c), Some(stored)) = (cursor_block, current.last_block_hash) {
            let canonical = canonical_hashes(rpc, &[c]).await?[0];
            if canonical != stored {
                return Ok(Fetched::Reorged { canonical });
            }
        }
        let mut safe_head = head.saturating_sub(cfg.confirmations);
        if let Some(tag) = cfg.finality.tag() {
            // A node without the tag (pre-merge, some L2s) has nothing final yet.
            let tagged = rpc.tagged_header(tag).await?.map_or(0, |h| h.number);
            safe_head = safe_head.min(tagged);
        }
        let Some((from, to)) = plan_range(current.last_processed_block, safe_head, cfg.max_block_range) else {
            return Ok(Fetched::Idle { head, safe_head });
        };
        let endpoint = rpc.index();
        let (rest, first) = match self.take_prefetch(from, to, endpoint) {
            Some(mut p) => match p.next().await {
                Some(Ok(part)) => (p, Ok(part)),
                // A failed prefetch is just fetched again, inside the tick.
                _ => self.first_part(from, to, endpoint).await,
            },
            None => self.first_part(from, to, endpoint).await,
        };
        match first {
            Ok(first) => Ok(Fetched::Range {
                from,
                to: rest.to,
                head,
                safe_head,
                first,
                rest,
            }),
            Err(e) if skip_on_failure && is_unfetchable(&e) => {
                // A single block that overflows is skipped alone.
                let (from, to) = match &e {
                    TickError::Chain(ChainError {
                        kind: ChainErrorKind::BlockTooLarge { block, .. },
                        ..
                    }) => (*block, *block),
                    _ => (from, rest.to),
                };
                Ok(Fetched::Unfetchable {
                    from,
                    to,
                    error: e.to_string(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Starts fetching `[from, to]` and waits for its first part.
    async fn first_part(&self, from: u64, to: u64, endpoint: usize) -> (Parts, Result<Part, TickError>) {
        let mut parts = Parts::spawn(Arc::clone(&self.stream), endpoint, from, to);
        let first = parts
            .next()
            .await
            .unwrap_or(Err(TickError::FetchEnded { at: from, to }));
        (parts, first)
    }
}

/// A failure of the range itself (the provider will not serve it), as
/// opposed to a lagging node or the database.
fn is_unfetchable(e: &TickError) -> bool {
    matches!(e, TickError::Chain(c) if !matches!(c.kind, ChainErrorKind::Lagging { .. }))
}

/// The canonical hashes of `blocks` (one batched request); a block the
/// node does not have means it is lagging.
pub(crate) async fn canonical_hashes(rpc: &Rpc<'_>, blocks: &[u64]) -> Result<Vec<Hash32>, TickError> {
    Ok(canonical_headers(rpc, blocks)
        .await?
        .into_iter()
        .map(|h| h.hash)
        .collect())
}

/// The canonical headers of `blocks`; see [`canonical_hashes`].
pub(crate) async fn canonical_headers(rpc: &Rpc<'_>, blocks: &[u64]) -> Result<Vec<Header>, TickError> {
    let headers = rpc
        .headers(blocks)
        .instrument(info_span!(
            "rpc.eth_getBlockByNumber",
            rpc.system = "jsonrpc",
            rpc.method = "eth_getBlockByNumber",
            server.address = rpc.endpoint(),
            blocks = blocks.len()
        ))
        .await?;
    blocks
        .iter()
        .zip(headers)
        .map(|(n, h)| {
            h.ok_or_else(|| {
                let head = blocks.iter().copied().min().unwrap_or(0).saturating_sub(1);
                rpc.error("eth_getBlockByNumber", ChainErrorKind::Lagging { head, needed: *n })
                    .into()
            })
        })
        .collect()
}

impl Poller {
    /// The block under the cursor was reorganised away: halt the stream, or
    /// rewind it to the newest stored block that is still canonical.
    async fn deep_reorg(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        rpc: &Rpc<'_>,
        current: cursor::Cursor,
        canonical: Hash32,
    ) -> Result<TickOutcome, TickError> {
        let cfg = &self.stream.cfg;
        let name = cfg.name.as_str();
        let height = current.last_processed_block;
        let stored = current.last_block_hash.unwrap_or(Hash32([0; 32]));
        let found = format!("block {height} was {stored} when processed, the chain now has {canonical}");
        let ancestor = match cfg.on_deep_reorg {
            DeepReorgPolicy::Halt => None,
            DeepReorgPolicy::Rewind => {
                let candidates = reorg::recent_hashes(&*tx, name, height, cfg.max_reorg_depth).await?;
                let numbers: Vec<u64> = candidates.iter().filter_map(|(n, _)| u64::try_from(*n).ok()).collect();
                let now = self.within_budget(canonical_hashes(rpc, &numbers)).await?;
                candidates
                    .into_iter()
                    .zip(now)
                    .find(|((_, was), is)| was == is)
                    .map(|((n, h), _)| (n, h))
            }
        };
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
        let deleted = reorg::rewind(
            &*tx,
            name,
            height,
            to,
            Some(stored),
            Some(to_hash),
            &reason,
            &self.replica_id,
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
}

/// The tick's range: `[cursor + 1, min(safe_head, cursor + max_range)]`,
/// or `None` when the cursor has reached the safe head.
pub fn plan_range(cursor: i64, safe_head: u64, max_range: u64) -> Option<(u64, u64)> {
    let from = u64::try_from(cursor + 1).ok()?;
    let to = safe_head.min(from.saturating_add(max_range.max(1) - 1));
    (to >= from).then_some((from, to))
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn to_i64(block: u64) -> i64 {
    i64::try_from(block).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::plan_range;

    #[test]
    fn range_starts_after_the_cursor_and_stops_at_the_safe_head_or_the_cap() {
        assert_eq!(plan_range(-1, 10, 2000), Some((0, 10)));
        assert_eq!(plan_range(-1, 0, 2000), Some((0, 0)));
        assert_eq!(plan_range(9, 10, 2000), Some((10, 10)));
        assert_eq!(plan_range(10, 10, 2000), None);
        assert_eq!(plan_range(12, 10, 2000), None, "a cursor above the safe head waits");
        assert_eq!(plan_range(99, 10_000, 100), Some((100, 199)));
        assert_eq!(plan_range(99, 10_000, 1), Some((100, 100)));
    }
}
