//! `failed_ranges`: block ranges below a stream's cursor that still need
//! fetching, worked by the gap-fill worker (`poller::gapfill`) of every
//! replica:
//! - `skipped`: a range the provider would not serve, skipped by
//!   `on_unfetchable_range = "skip_and_backfill"`;
//! - `backfill`: what a changed filter adds below the cursor (I9), with the
//!   added part of the filter in `addresses`/`topic0s`.
//!
//! I4 with these: the blocks in (start, cursor] are either stored or
//! covered by a pending row. A row is written in the same transaction that
//! moves the cursor past its range (or adopts the filter), its progress
//! (`done_to`) moves in the transaction that stores the blocks up to it,
//! and it is deleted in the transaction that stores its last block.
//!
//! Singleton per row: a worker claims a due row by setting `claimed_by` and
//! `claimed_until = clock_timestamp() + lease` under `FOR UPDATE SKIP
//! LOCKED`, so two workers never claim the same row at once; every
//! transaction that writes for a claim checks at its end, on the database
//! clock (`clock_timestamp()`, not the transaction's start), that the lease
//! is still its own, and only the claimant may give a row back. A claimer
//! that dies loses the row when its lease ends, and the next worker
//! reclaims it.

use std::time::Duration;

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};
use crate::types::{Address, Hash32, LogFilter};

/// What a row is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Skipped,
    Backfill,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Skipped => "skipped",
            Kind::Backfill => "backfill",
        }
    }
}

/// One row, as claimed or listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub id: i64,
    pub stream: String,
    pub kind: Kind,
    pub from_block: i64,
    pub to_block: i64,
    /// Blocks up to here are stored (`from_block - 1` when none are).
    pub done_to: i64,
    /// For a backfill: the part of the filter to fetch (`None`: the stream's).
    pub filter: Option<LogFilter>,
    /// Failed attempts so far.
    pub attempts: i32,
    pub last_error: String,
    pub dead: bool,
    pub claimed_by: Option<String>,
}

/// Reads a row selected as `id, stream, kind, from_block, to_block,
/// coalesce(done_to, from_block - 1), addresses, topic0s, attempts,
/// last_error, dead, claimed_by`.
fn from_row(r: &tokio_postgres::Row) -> Range {
    let addresses: Option<Vec<Vec<u8>>> = r.get(6);
    let topics: Option<Vec<Vec<u8>>> = r.get(7);
    Range {
        id: r.get(0),
        stream: r.get(1),
        kind: if r.get::<_, &str>(2) == "backfill" {
            Kind::Backfill
        } else {
            Kind::Skipped
        },
        from_block: r.get(3),
        to_block: r.get(4),
        done_to: r.get(5),
        filter: match (addresses, topics) {
            (Some(a), Some(t)) => Some(LogFilter {
                addresses: a.iter().filter_map(|x| Address::from_slice(x)).collect(),
                topic0s: t.iter().filter_map(|x| Hash32::from_slice(x)).collect(),
            }),
            _ => None,
        },
        attempts: r.get(8),
        last_error: r.get(9),
        dead: r.get(10),
        claimed_by: r.get(11),
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Records `[from, to]` of `stream` as skipped, due at once.
pub async fn record<C: GenericClient>(c: &C, stream: &str, from: i64, to: i64, error: &str) -> Result<()> {
    c.execute_typed(
        "INSERT INTO failed_ranges (stream, kind, from_block, to_block, last_error) VALUES ($1, 'skipped', $2, $3, $4)
         ON CONFLICT (stream, from_block, to_block) WHERE kind = 'skipped'
         DO UPDATE SET last_error = EXCLUDED.last_error, dead = false",
        &[
            (&stream, Type::TEXT),
            (&from, Type::INT8),
            (&to, Type::INT8),
            (&error, Type::TEXT),
        ],
    )
    .await
    .map_err(StoreError::db("record failed range"))?;
    Ok(())
}

/// Records a backfill of `filter` over `[from, to]`, due at once.
pub async fn record_backfill<C: GenericClient>(
    c: &C,
    stream: &str,
    from: i64,
    to: i64,
    filter: &LogFilter,
    why: &str,
) -> Result<()> {
    let addresses: Vec<&[u8]> = filter.addresses.iter().map(|a| &a.0[..]).collect();
    let topics: Vec<&[u8]> = filter.topic0s.iter().map(|t| &t.0[..]).collect();
    c.execute_typed(
        "INSERT INTO failed_ranges (stream, kind, from_block, to_block, addresses, topic0s, last_error)
         VALUES ($1, 'backfill', $2, $3, $4, $5, $6)
         ON CONFLICT (stream, from_block, to_block, addresses, topic0s) WHERE kind = 'backfill'
         DO UPDATE SET dead = false",
        &[
            (&stream, Type::TEXT),
            (&from, Type::INT8),
            (&to, Type::INT8),
            (&addresses, Type::BYTEA_ARRAY),
            (&topics, Type::BYTEA_ARRAY),
            (&why, Type::TEXT),
        ],
    )
    .await
    .map_err(StoreError::db("record backfill"))?;
    Ok(())
}

/// Claims the most overdue row of one of `streams` for `lease` (autocommit:
/// the claim must be visible to other workers at once).
pub async fn claim<C: GenericClient>(c: &C, streams: &[&str], by: &str, lease: Duration) -> Result<Option<Range>> {
    let row = c
        .query_typed_opt(
            "UPDATE failed_ranges f
                SET claimed_by = $2, claimed_until = clock_timestamp() + $3 * interval '1 millisecond'
               FROM (SELECT id FROM failed_ranges
                      WHERE stream = ANY($1) AND NOT dead AND next_attempt_at <= now()
                        AND (claimed_until IS NULL OR claimed_until < clock_timestamp())
                      ORDER BY next_attempt_at, id
                      LIMIT 1
                      FOR UPDATE SKIP LOCKED) due
              WHERE f.id = due.id
          RETURNING f.id, f.stream, f.kind, f.from_block, f.to_block, coalesce(f.done_to, f.from_block - 1),
                    f.addresses, f.topic0s, f.attempts, f.last_error, f.dead, f.claimed_by",
            &[
                (&streams, Type::TEXT_ARRAY),
                (&by, Type::TEXT),
                (&millis(lease), Type::FLOAT8),
            ],
        )
        .await
        .map_err(StoreError::db("claim failed range"))?;
    Ok(row.as_ref().map(from_row))
}

/// Records that blocks up to `done_to` of row `id` are stored and gives
/// the row back (due at once: the next pass of any worker goes on from
/// there), if `by` still holds its lease (checked on the database clock at
/// this statement, which the caller issues last before COMMIT); `false`
/// means the lease was lost and the caller must roll back.
pub async fn progress<C: GenericClient>(c: &C, id: i64, by: &str, done_to: i64) -> Result<bool> {
    let n = c
        .execute_typed(
            "UPDATE failed_ranges SET done_to = $3, attempts = 0, claimed_by = NULL, claimed_until = NULL
              WHERE id = $1 AND claimed_by = $2 AND claimed_until >= clock_timestamp()",
            &[(&id, Type::INT8), (&by, Type::TEXT), (&done_to, Type::INT8)],
        )
        .await
        .map_err(StoreError::db("record gap-fill progress"))?;
    Ok(n == 1)
}

/// Deletes a row whose range is now stored, if `by` still holds its lease
/// (on the database clock at this statement); `false`: the lease was lost.
pub async fn complete<C: GenericClient>(c: &C, id: i64, by: &str) -> Result<bool> {
    let n = c
        .execute_typed(
            "DELETE FROM failed_ranges WHERE id = $1 AND claimed_by = $2 AND claimed_until >= clock_timestamp()",
            &[(&id, Type::INT8), (&by, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("complete failed range"))?;
    Ok(n == 1)
}

/// Isolates the single block `block` of row `id` as a `skipped` row of its
/// own (with the row's filter), and moves the row past it and gives it
/// back; under `by`'s lease only. A block too large for the provider then
/// waits alone while the rest of the range goes on.
pub async fn isolate_block<C: GenericClient>(c: &C, id: i64, by: &str, block: i64, error: &str) -> Result<bool> {
    let n = c
        .execute_typed(
            "WITH r AS (
                UPDATE failed_ranges SET done_to = $3, claimed_by = NULL, claimed_until = NULL
                 WHERE id = $1 AND claimed_by = $2 AND claimed_until >= clock_timestamp()
             RETURNING stream, addresses, topic0s)
             INSERT INTO failed_ranges (stream, kind, from_block, to_block, addresses, topic0s, last_error)
             SELECT r.stream, 'skipped', $3, $3, r.addresses, r.topic0s, $4 FROM r
             ON CONFLICT DO NOTHING",
            &[
                (&id, Type::INT8),
                (&by, Type::TEXT),
                (&block, Type::INT8),
                (&error, Type::TEXT),
            ],
        )
        .await
        .map_err(StoreError::db("isolate an overflowing block"))?;
    Ok(n <= 1)
}

/// Records a failed attempt by the claimant `by`: releases the claim and
/// schedules the next try `delay` from now (database time). With
/// `Some(max_attempts)` the attempt counts, and after `max_attempts` the
/// row is marked dead; `None`: a failure that is not the range's (the
/// database's), which neither counts nor kills it. `None` when `by` no
/// longer holds the row (nothing is changed); else whether it is dead.
pub async fn retry_later<C: GenericClient>(
    c: &C,
    id: i64,
    by: &str,
    error: &str,
    delay: Duration,
    max_attempts: Option<u32>,
) -> Result<Option<bool>> {
    // -1: this attempt does not count.
    let max = max_attempts.map_or(-1, |m| i32::try_from(m).unwrap_or(i32::MAX));
    let row = c
        .query_typed_opt(
            "UPDATE failed_ranges
                SET attempts = attempts + CASE WHEN $5 < 0 THEN 0 ELSE 1 END,
                    last_error = $3, claimed_by = NULL, claimed_until = NULL,
                    next_attempt_at = now() + $4 * interval '1 millisecond',
                    dead = $5 >= 0 AND attempts + 1 >= $5
              WHERE id = $1 AND claimed_by = $2
          RETURNING dead",
            &[
                (&id, Type::INT8),
                (&by, Type::TEXT),
                (&error, Type::TEXT),
                (&millis(delay), Type::FLOAT8),
                (&max, Type::INT4),
            ],
        )
        .await
        .map_err(StoreError::db("reschedule failed range"))?;
    Ok(row.map(|r| r.get(0)))
}

/// Rows of `stream` (all streams when `None`), oldest first.
pub async fn list<C: GenericClient>(c: &C, stream: Option<&str>) -> Result<Vec<Range>> {
    let rows = c
        .query_typed(
            "SELECT id, stream, kind, from_block, to_block, coalesce(done_to, from_block - 1), addresses, topic0s,
                    attempts, last_error, dead, claimed_by
               FROM failed_ranges WHERE ($1::text IS NULL OR stream = $1) ORDER BY id",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("list failed ranges"))?;
    Ok(rows.iter().map(from_row).collect())
}

/// Makes rows due now with their attempts reset: `ids`, or every dead row
/// when `ids` is empty and `dead` is set. Returns how many.
pub async fn retry_now<C: GenericClient>(c: &C, ids: &[i64], dead: bool) -> Result<u64> {
    c.execute_typed(
        "UPDATE failed_ranges SET dead = false, attempts = 0, next_attempt_at = now()
          WHERE (cardinality($1::int8[]) > 0 AND id = ANY($1)) OR (cardinality($1::int8[]) = 0 AND $2 AND dead)",
        &[(&ids, Type::INT8_ARRAY), (&dead, Type::BOOL)],
    )
    .await
    .map_err(StoreError::db("retry failed ranges"))
}

/// Deletes `stream`'s rows that lie wholly above block `to` and trims the
/// rest to end at `to` (a rewind: those blocks are fetched again by the
/// stream itself).
pub async fn forget_above<C: GenericClient>(c: &C, stream: &str, to: i64) -> Result<()> {
    c.execute_typed(
        "DELETE FROM failed_ranges WHERE stream = $1 AND from_block > $2",
        &[(&stream, Type::TEXT), (&to, Type::INT8)],
    )
    .await
    .map_err(StoreError::db("forget failed ranges above a rewind"))?;
    c.execute_typed(
        // A gap-fill worker holding the row loses its claim: what it fetched
        // above `to` may be the orphaned branch, and it must not commit it.
        "UPDATE failed_ranges SET to_block = $2, claimed_by = NULL, claimed_until = NULL
          WHERE stream = $1 AND to_block > $2",
        &[(&stream, Type::TEXT), (&to, Type::INT8)],
    )
    .await
    .map_err(StoreError::db("trim failed ranges at a rewind"))?;
    Ok(())
}

/// (pending, dead) rows of `stream`.
pub async fn counts<C: GenericClient>(c: &C, stream: &str) -> Result<(i64, i64)> {
    let row = c
        .query_typed_one(
            "SELECT count(*) FILTER (WHERE NOT dead), count(*) FILTER (WHERE dead) FROM failed_ranges WHERE stream = $1",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("count failed ranges"))?;
    Ok((row.get(0), row.get(1)))
}

/// What a stream has parked, for `/metrics` and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    pub pending: i64,
    pub dead: i64,
    pub dead_letters: i64,
    /// Blocks of backfills still to fetch (to − done_to, summed).
    pub backfill_blocks_left: i64,
    /// The highest block below which nothing is pending: the cursor, or the
    /// block before the oldest unfilled block of a pending row.
    pub watermark: i64,
}

/// The backlog of every stream in `streams` (one round trip), by name.
pub async fn backlogs<C: GenericClient>(c: &C, streams: &[&str]) -> Result<Vec<(String, Backlog)>> {
    let rows = c
        .query_typed(
            "SELECT s.id,
                    (SELECT count(*) FROM failed_ranges f WHERE f.stream = s.id AND NOT f.dead),
                    (SELECT count(*) FROM failed_ranges f WHERE f.stream = s.id AND f.dead),
                    (SELECT count(*) FROM dead_letters d WHERE d.stream = s.id),
                    (SELECT coalesce(sum(f.to_block - coalesce(f.done_to, f.from_block - 1)), 0)::int8
                       FROM failed_ranges f WHERE f.stream = s.id AND f.kind = 'backfill' AND NOT f.dead),
                    least(s.last_processed_block,
                          (SELECT min(coalesce(f.done_to, f.from_block - 1)) FROM failed_ranges f WHERE f.stream = s.id))
               FROM block_cursors s WHERE s.id = ANY($1)",
            &[(&streams, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(StoreError::db("read backlog"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                Backlog {
                    pending: r.get(1),
                    dead: r.get(2),
                    dead_letters: r.get(3),
                    backfill_blocks_left: r.get(4),
                    watermark: r.get::<_, Option<i64>>(5).unwrap_or(-1),
                },
            )
        })
        .collect())
}
