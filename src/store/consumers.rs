//! `consumers`: durable, named readers of a stream's events in commit-safe
//! order, applied exactly once per consumer when the effect lives in this
//! database.
//!
//! A position is `(inserted_xid, id)`: the transaction that stored a row,
//! then its id. `logcursor_claim(consumer, stream, n)` (sql/0008) returns
//! the next rows after the consumer's position whose transaction id is
//! below the oldest transaction still running — every transaction below it
//! has finished, so no row can commit later behind the position — and
//! moves the position past them, in the caller's transaction:
//!
//! ```sql
//! BEGIN;
//! SELECT * FROM logcursor_claim('billing', 'burns', 100);  -- the next batch, or none
//! -- apply the effect of each row here
//! COMMIT;                                                  -- effects and position together
//! ```
//!
//! `events.id` alone is not such a position: gap fill and replays store
//! older blocks later, with higher ids but possibly behind a reader.
//! A long-running transaction anywhere in the cluster holds the horizon
//! back (consumers wait for it; they never skip).
//!
//! A rewind (a reorg below the cursor, or an operator's) removes events a
//! consumer may have applied. [`keep_removed`] copies them into
//! `removed_events`, in the rewind's transaction, waiting for no one (a
//! consumer can never hold a stream up). Each consumer resolves its
//! stream's removals in order `(removed_xid, id)`, only those committed
//! below the horizon like its claims, under its own row lock (sql/0009):
//!
//! - a removed event at or below the consumer's position was applied (every
//!   row up to the position was claimed, in order): it must be undone, and
//!   `logcursor_claim_reverts(consumer, stream, n)` returns it, once, in the
//!   consumer's transaction (most recently applied first, within a call and
//!   within one rewind);
//! - one above it was never applied, and never will be (it is gone): it is
//!   passed over;
//! - `logcursor_claim` resolves first, and does not move the position while
//!   an applied removal waits (it raises 55000, or returns nothing after
//!   `logcursor_claim_reverts` ran in the same transaction), nor while a
//!   removal is unresolved when it has read its rows (committed meanwhile,
//!   or not yet below the horizon: it returns nothing). So a position never
//!   passes a removed event before the consumer knows whether to undo it. A
//!   claim in flight when the rewind commits, even a new consumer's first,
//!   read the events before they went, and resolves them once it commits.
//!
//! So an effect is undone exactly once, as it was applied:
//!
//! ```sql
//! BEGIN;
//! SELECT * FROM logcursor_claim_reverts('billing', 'burns', 100);  -- removed events to undo, or none
//! -- undo the effect of each row here
//! SELECT * FROM logcursor_claim('billing', 'burns', 100);          -- then the next batch
//! -- apply the effect of each row here
//! COMMIT;
//! ```
//!
//! Claims of a stream hold a shared advisory lock for their transaction.
//! A rewind tries it exclusively (it never waits): taken, no claim is in
//! flight, so every consumer's resolved mark is visible, and the removals
//! every consumer has resolved are deleted (a stream without consumers
//! keeps none); not taken, it keeps the events and deletes nothing. A
//! consumer whose first claim is in flight can therefore never lose a
//! removal. A consumer that never claims again holds its stream's removals
//! back: `consumers reset` it, or delete its row. Claims must run READ
//! COMMITTED (an older snapshot could read events a rewind removed without
//! keeping them): others are refused.

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};

/// A consumer and how far behind its stream it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub name: String,
    pub stream: String,
    /// `XID/ID`: the last row applied (`0/0` before the first).
    pub position: String,
    /// Rows stored after the position (counted up to the cap asked for).
    pub lag: i64,
    /// Removed events it applied and has still to undo
    /// (`logcursor_claim_reverts`).
    pub reverts: i64,
    pub updated_at: std::time::SystemTime,
}

/// `consumers list` counts a consumer's lag up to this many rows.
pub const LAG_CAP: i64 = 1_000_000;

/// Every consumer, with its lag counted up to `cap` rows (an index range
/// scan of at most `cap` entries per consumer).
pub async fn list<C: GenericClient>(c: &C, cap: i64) -> Result<Vec<Consumer>> {
    let rows = c
        .query_typed(
            "SELECT k.name, k.stream, k.after_xid::text || '/' || k.after_id, k.updated_at,
                    (SELECT count(*) FROM (SELECT 1 FROM events e
                                            WHERE e.stream = k.stream
                                              AND (e.inserted_xid, e.id) > (k.after_xid, k.after_id)
                                            LIMIT $1) l),
                    (SELECT count(*) FROM removed_events r
                      WHERE r.stream = k.stream
                        AND (r.removed_xid, r.id) > (k.removed_after_xid, k.removed_after_id)
                        AND (r.event_xid, r.event_id) <= (k.after_xid, k.after_id))
               FROM consumers k ORDER BY k.name",
            &[(&cap, Type::INT8)],
        )
        .await
        .map_err(StoreError::db("list consumers"))?;
    Ok(rows
        .iter()
        .map(|r| Consumer {
            name: r.get(0),
            stream: r.get(1),
            position: r.get(2),
            updated_at: r.get(3),
            lag: r.get(4),
            reverts: r.get(5),
        })
        .collect())
}

/// Keeps the events of `stream` above block `to` in `removed_events`, in
/// the rewind's transaction and before they are deleted; returns how many.
///
/// Never waits: it tries the stream's consumer lock (which claims in
/// flight hold shared). Taken, no claim is in flight, and every consumer's
/// resolved mark is visible: the removals all of them resolved are deleted
/// first, and a stream without consumers keeps nothing (claims that start
/// now wait for this rewind, and will not see the removed events). Not
/// taken, the events are kept and nothing is deleted.
pub async fn keep_removed<C: GenericClient>(c: &C, stream: &str, to: i64) -> Result<u64> {
    let quiet: bool = c
        .query_typed_one(
            "SELECT pg_try_advisory_xact_lock(hashtext('logcursor consumers'), hashtext(current_schema() || '/' || $1))",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("try the consumers' lock"))?
        .get(0);
    if quiet {
        let pruned = c
            .query_typed_one(
                "WITH pruned AS (
                   DELETE FROM removed_events r
                    WHERE r.stream = $1 AND r.removed_xid < pg_snapshot_xmin(pg_current_snapshot())
                      AND NOT EXISTS (SELECT 1 FROM consumers k
                                       WHERE k.stream = r.stream
                                         AND (k.removed_after_xid, k.removed_after_id) < (r.removed_xid, r.id))
                   RETURNING 1)
                 SELECT EXISTS (SELECT 1 FROM consumers WHERE stream = $1), (SELECT count(*) FROM pruned)",
                &[(&stream, Type::TEXT)],
            )
            .await
            .map_err(StoreError::db("prune removed events"))?;
        if !pruned.get::<_, bool>(0) {
            return Ok(0);
        }
    }
    c.execute_typed(
        "INSERT INTO removed_events (stream, event, event_xid, event_id)
         SELECT e.stream, to_jsonb(e), e.inserted_xid, e.id
           FROM events e
          WHERE e.stream = $1 AND e.block_number > $2
          -- ids in reverse order of application: a rewind's removals are
          -- resolved, and undone, most recently applied first
          ORDER BY e.inserted_xid DESC, e.id DESC",
        &[(&stream, Type::TEXT), (&to, Type::INT8)],
    )
    .await
    .map_err(StoreError::db("keep removed events"))
}

/// Where `reset` may move a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Before the first row: everything is read again.
    Start,
    /// After the last row of the transactions finished now (below the
    /// oldest one running, so nothing commits behind it): only what comes next.
    Latest,
    /// After the row at `XID/ID`.
    At { xid: u64, id: i64 },
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "start" => Ok(Target::Start),
            "latest" => Ok(Target::Latest),
            _ => {
                let bad = || format!("a position is start, latest or XID/ID (as `consumers list` shows), got {s:?}");
                let (xid, id) = s.split_once('/').ok_or_else(bad)?;
                Ok(Target::At {
                    xid: xid.parse().map_err(|_| bad())?,
                    id: id.parse().map_err(|_| bad())?,
                })
            }
        }
    }
}

/// Moves consumer `name` (which must exist) to `to`; returns its new
/// position. The removals of its stream so far count as resolved: the
/// operator's position says what was applied.
pub async fn reset<C: GenericClient>(c: &C, name: &str, to: &Target) -> Result<Option<String>> {
    let (mode, xid, id) = match to {
        Target::Start => ("start", "0".to_string(), 0i64),
        Target::Latest => ("latest", "0".to_string(), 0),
        Target::At { xid, id } => ("at", xid.to_string(), *id),
    };
    let row = c
        .query_typed_opt(
            "UPDATE consumers k SET (after_xid, after_id, updated_at) = (
                SELECT CASE $2 WHEN 'start' THEN '0'::xid8 WHEN 'at' THEN $3::xid8
                               ELSE coalesce(max(e.inserted_xid), '0'::xid8) END,
                       CASE $2 WHEN 'start' THEN 0 WHEN 'at' THEN $4
                               ELSE coalesce(max(e.id) FILTER (WHERE e.inserted_xid = (
                                        SELECT max(inserted_xid) FROM events
                                         WHERE stream = k.stream
                                           AND inserted_xid < pg_snapshot_xmin(pg_current_snapshot()))), 0) END,
                       now()
                  FROM events e
                 WHERE e.stream = k.stream AND e.inserted_xid < pg_snapshot_xmin(pg_current_snapshot()))
              WHERE k.name = $1
          RETURNING k.after_xid::text || '/' || k.after_id",
            &[
                (&name, Type::TEXT),
                (&mode, Type::TEXT),
                (&xid, Type::TEXT),
                (&id, Type::INT8),
            ],
        )
        .await
        .map_err(StoreError::db("reset consumer"))?;
    c.execute_typed(
        "UPDATE consumers k SET (removed_after_xid, removed_after_id) = (
            SELECT r.removed_xid, r.id FROM removed_events r
             WHERE r.stream = k.stream AND r.removed_xid < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY r.removed_xid DESC, r.id DESC LIMIT 1)
          WHERE k.name = $1
            AND EXISTS (SELECT 1 FROM removed_events r
                         WHERE r.stream = k.stream AND r.removed_xid < pg_snapshot_xmin(pg_current_snapshot()))",
        &[(&name, Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("reset consumer's removals"))?;
    Ok(row.map(|r| r.get(0)))
}
