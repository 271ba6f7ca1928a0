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
//! consumer may have applied. [`keep_reverts`] keeps each such event for
//! each consumer whose position had passed it, in the rewind's
//! transaction; the consumer claims them back with
//! `logcursor_claim_reverts(consumer, n)` (sql/0009) and undoes their
//! effects in its own transaction, so an effect is undone exactly once, as
//! it was applied:
//!
//! ```sql
//! BEGIN;
//! SELECT * FROM logcursor_claim_reverts('billing', 100);  -- removed events to undo, or none
//! -- undo the effect of each row here
//! SELECT * FROM logcursor_claim('billing', 'burns', 100);  -- then the next batch
//! -- apply the effect of each row here
//! COMMIT;
//! ```
//!
//! A claim in flight while a rewind runs is waited for: the rewind locks
//! the stream's consumers (`FOR SHARE`) before it reads their positions, so
//! the events of a claim that commits meanwhile are kept too.

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
    /// Removed events kept for it to undo (`logcursor_claim_reverts`).
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
                    (SELECT count(*) FROM consumer_reverts r WHERE r.consumer = k.name)
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

/// Keeps, for every consumer of `stream`, the events above block `to` that
/// it has claimed (at or below its position), in the rewind's transaction
/// and before they are deleted; returns how many (event, consumer) pairs.
pub async fn keep_reverts<C: GenericClient>(c: &C, stream: &str, to: i64) -> Result<u64> {
    // First wait for the claims in flight: the positions read below are
    // those after they commit (each statement sees the latest commits).
    c.execute_typed(
        "SELECT 1 FROM consumers WHERE stream = $1 FOR SHARE",
        &[(&stream, Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("lock consumers"))?;
    c.execute_typed(
        "INSERT INTO consumer_reverts (consumer, event)
         SELECT k.name, to_jsonb(e)
           FROM consumers k JOIN events e ON e.stream = k.stream
          WHERE k.stream = $1 AND e.block_number > $2
            AND (e.inserted_xid, e.id) <= (k.after_xid, k.after_id)
          ORDER BY k.name, e.block_number, e.log_index",
        &[(&stream, Type::TEXT), (&to, Type::INT8)],
    )
    .await
    .map_err(StoreError::db("keep consumer reverts"))
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

/// Moves consumer `name` (which must exist) to `to`; returns its new position.
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
    Ok(row.map(|r| r.get(0)))
}
