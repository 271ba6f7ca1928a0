//! One tick: one READ COMMITTED transaction that holds the stream's cursor
//! row lock from the first statement to COMMIT.
//!
//! ```text
//! BEGIN ISOLATION LEVEL READ COMMITTED
//! set_config(lock_timeout / statement_timeout / idle_in_transaction_session_timeout, local)
//! SELECT … FROM block_cursors WHERE id = $stream FOR UPDATE   -- replicas queue here
//! range := [cursor+1, min(latest − confirmations, cursor + max_block_range)]
//!   empty → COMMIT (nothing changed), caller waits poll_interval
//! eth_getLogs(range) ∥ header(range end)
//! decode every log (any failure fails the tick: nothing is skipped)
//! INSERT … ON CONFLICT DO NOTHING (duplicates counted)
//! UPDATE block_cursors … WHERE last_processed_block = $old   -- exactly 1 row
//! COMMIT
//! ```
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
//! that freezes while holding the lock is cut off by the server.

use std::time::{Duration, Instant};

use tokio_postgres::types::Type;
use tokio_postgres::IsolationLevel;
use tokio_util::sync::CancellationToken;
use tracing::{field, info_span, Instrument};

use super::{Poller, TickError, TickOutcome};
use crate::chain::abi::DecodeError;
use crate::chain::{Header, RawLog};
use crate::store::events::NewEvent;
use crate::store::{cursor, events, StoreError};

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
            from_block = field::Empty,
            to_block = field::Empty,
            events_inserted = field::Empty,
            duplicates = field::Empty,
            outcome = field::Empty,
        )
    )]
    pub async fn tick(&self, cancel: &CancellationToken) -> Result<TickOutcome, TickError> {
        let result = self.tick_inner(cancel).await;
        let span = tracing::Span::current();
        match &result {
            Ok(TickOutcome::Idle { .. }) => span.record("outcome", "idle"),
            Ok(TickOutcome::Advanced { .. }) => span.record("outcome", "advanced"),
            Err(TickError::Cancelled) => span.record("outcome", "cancelled"),
            Err(e) if e.is_lock_timeout() => span.record("outcome", "lock_timeout"),
            Err(_) => span.record("outcome", "error"),
        };
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
                let _ = cancel_query.cancel_query(tokio_postgres::NoTls).await;
                return Err(TickError::Cancelled);
            }
        };
        let lock_wait = wait_started.elapsed();
        let locked_at = Instant::now();

        let head = s.chain.block_number().await?;
        let safe_head = head.saturating_sub(s.cfg.confirmations);
        let Some((from, to)) = plan_range(current.last_processed_block, safe_head, s.cfg.max_block_range) else {
            tx.commit().await.map_err(StoreError::db("commit idle tick"))?;
            return Ok(TickOutcome::Idle {
                cursor: current.last_processed_block,
                head,
                safe_head,
                lock_wait,
            });
        };
        let span = tracing::Span::current();
        span.record("from_block", from);
        span.record("to_block", to);

        let (logs, last_header) = tokio::try_join!(
            s.chain.get_logs(from, to, &s.filter).instrument(info_span!(
                "rpc.eth_getLogs",
                rpc.method = "eth_getLogs",
                from,
                to
            )),
            s.chain.header(to).instrument(info_span!(
                "rpc.eth_getBlockByNumber",
                rpc.method = "eth_getBlockByNumber",
                block = to
            )),
        )?;
        let last_header = last_header.ok_or(TickError::MissingBlock { block: to, head })?;
        check_last_block(&logs, &last_header).map_err(|reason| s.chain.inconsistent("eth_getLogs", reason))?;

        let rows = info_span!("decode", logs = logs.len()).in_scope(|| self.decode_all(&logs))?;
        let outcome = events::insert(&*tx, name, s.cfg.chain_id, &rows)
            .instrument(info_span!(
                "db.insert_events",
                db.system = "postgresql",
                db.operation = "INSERT",
                rows = rows.len()
            ))
            .await?;
        cursor::advance(
            &*tx,
            name,
            current.last_processed_block,
            to_i64(to),
            last_header.hash,
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

        span.record("events_inserted", outcome.inserted);
        span.record("duplicates", outcome.duplicates);
        Ok(TickOutcome::Advanced {
            from,
            to,
            head,
            logs: logs.len(),
            inserted: outcome.inserted,
            duplicates: outcome.duplicates,
            lock_wait,
            lock_hold: locked_at.elapsed(),
        })
    }

    /// Decodes every log, or names the first that does not decode.
    fn decode_all(&self, logs: &[RawLog]) -> Result<Vec<NewEvent>, TickError> {
        logs.iter()
            .map(|log| {
                let decoded = self
                    .stream
                    .events
                    .decode(log)
                    .map_err(|source| self.decode_error(log, source))?;
                Ok(NewEvent {
                    block_number: to_i64(log.block_number),
                    block_hash: log.block_hash,
                    tx_hash: log.tx_hash,
                    // The client rejects log indexes above i32::MAX.
                    log_index: i32::try_from(log.log_index).unwrap_or(i32::MAX),
                    address: log.address,
                    event_name: decoded.event_name,
                    params: decoded.params,
                })
            })
            .collect()
    }

    fn decode_error(&self, log: &RawLog, source: DecodeError) -> TickError {
        TickError::Decode {
            stream: self.stream.cfg.name.clone(),
            block: log.block_number,
            tx_hash: log.tx_hash,
            log_index: log.log_index,
            source,
        }
    }
}

/// The tick's range: `[cursor + 1, min(safe_head, cursor + max_range)]`,
/// or `None` when the cursor has reached the safe head.
pub fn plan_range(cursor: i64, safe_head: u64, max_range: u64) -> Option<(u64, u64)> {
    let from = u64::try_from(cursor + 1).ok()?;
    let to = safe_head.min(from.saturating_add(max_range.max(1) - 1));
    (to >= from).then_some((from, to))
}

/// Logs of the range's last block must carry that block's hash; otherwise
/// the node answered the two calls from different forks (a reorg between
/// them, or a load balancer in front of nodes that disagree).
fn check_last_block(logs: &[RawLog], last: &Header) -> Result<(), String> {
    match logs
        .iter()
        .find(|l| l.block_number == last.number && l.block_hash != last.hash)
    {
        None => Ok(()),
        Some(l) => Err(format!(
            "log {} of tx {} names block {} as {}, but the header says {}",
            l.log_index, l.tx_hash, l.block_number, l.block_hash, last.hash
        )),
    }
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
