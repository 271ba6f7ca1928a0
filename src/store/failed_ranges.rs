//! `failed_ranges`: block ranges skipped by the poller, to be fetched later
//! by the gap-fill worker (`poller::gapfill`).
//!
//! I4 with `on_unfetchable_range = "skip_and_backfill"`: the blocks in
//! (start, cursor] are either stored or covered by a pending `failed_ranges`
//! row — the row is written in the same transaction that moves the cursor
//! past the range, and deleted in the same transaction that stores its
//! events.
//!
//! Singleton per row: a worker claims a due row by setting `claimed_by` and
//! `claimed_until = now() + lease` under `FOR UPDATE SKIP LOCKED`, so two
//! workers never claim the same row at once; all times come from the
//! database clock, never a replica's. A claimer that dies loses the row when
//! its lease ends, and the next worker reclaims it.

use std::time::Duration;

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};

/// One claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub id: i64,
    pub stream: String,
    pub from_block: i64,
    pub to_block: i64,
    /// Failed gap-fill attempts so far.
    pub attempts: i32,
}

/// Records `[from, to]` of `stream` as skipped, due at once.
pub async fn record<C: GenericClient>(c: &C, stream: &str, from: i64, to: i64, error: &str) -> Result<()> {
    c.execute_typed(
        "INSERT INTO failed_ranges (stream, from_block, to_block, last_error) VALUES ($1, $2, $3, $4)
         ON CONFLICT (stream, from_block, to_block) DO UPDATE SET last_error = EXCLUDED.last_error, dead = false",
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

/// Claims the most overdue row of one of `streams` for `lease` (autocommit:
/// the claim must be visible to other workers at once).
pub async fn claim<C: GenericClient>(c: &C, streams: &[String], by: &str, lease: Duration) -> Result<Option<Claim>> {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let row = c
        .query_typed_opt(
            "UPDATE failed_ranges f
                SET claimed_by = $2, claimed_until = now() + $3 * interval '1 millisecond'
               FROM (SELECT id FROM failed_ranges
                      WHERE stream = ANY($1) AND NOT dead AND next_attempt_at <= now()
                        AND (claimed_until IS NULL OR claimed_until < now())
                      ORDER BY next_attempt_at, id
                      LIMIT 1
                      FOR UPDATE SKIP LOCKED) due
              WHERE f.id = due.id
          RETURNING f.id, f.stream, f.from_block, f.to_block, f.attempts",
            &[(&streams, Type::TEXT_ARRAY), (&by, Type::TEXT), (&lease_ms, Type::INT8)],
        )
        .await
        .map_err(StoreError::db("claim failed range"))?;
    Ok(row.map(|r| Claim {
        id: r.get(0),
        stream: r.get(1),
        from_block: r.get(2),
        to_block: r.get(3),
        attempts: r.get(4),
    }))
}

/// Deletes a row whose range is now stored, if `by` still holds its lease;
/// `false` means the lease was lost (another worker may have it now).
pub async fn complete<C: GenericClient>(c: &C, id: i64, by: &str) -> Result<bool> {
    let n = c
        .execute_typed(
            "DELETE FROM failed_ranges WHERE id = $1 AND claimed_by = $2 AND claimed_until >= now()",
            &[(&id, Type::INT8), (&by, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("complete failed range"))?;
    Ok(n == 1)
}

/// Records a failed attempt: releases the claim and schedules the next try
/// at `now() + min(cap, base × 2^attempts)` (database time); after
/// `max_attempts` the row is marked dead. Returns whether it is dead.
pub async fn retry_later<C: GenericClient>(
    c: &C,
    id: i64,
    error: &str,
    base: Duration,
    cap: Duration,
    max_attempts: u32,
) -> Result<bool> {
    let base_ms = i64::try_from(base.as_millis()).unwrap_or(i64::MAX);
    let cap_ms = i64::try_from(cap.as_millis()).unwrap_or(i64::MAX);
    let max = i32::try_from(max_attempts).unwrap_or(i32::MAX);
    let row = c
        .query_typed_one(
            "UPDATE failed_ranges
                SET attempts = attempts + 1, last_error = $2, claimed_by = NULL, claimed_until = NULL,
                    next_attempt_at = now() + least($4::float8, $3::float8 * power(2, least(attempts, 30))) * interval '1 millisecond',
                    dead = attempts + 1 >= $5
              WHERE id = $1
          RETURNING dead",
            &[
                (&id, Type::INT8),
                (&error, Type::TEXT),
                (&(base_ms as f64), Type::FLOAT8),
                (&(cap_ms as f64), Type::FLOAT8),
                (&max, Type::INT4),
            ],
        )
        .await
        .map_err(StoreError::db("reschedule failed range"))?;
    Ok(row.get(0))
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

/// What a stream has parked, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub pending: i64,
    pub dead: i64,
    pub dead_letters: i64,
    /// The highest block below which nothing is pending: the cursor, or the
    /// block before the oldest skipped range that is not yet filled.
    pub watermark: i64,
}

/// The backlog of `stream` (one round trip).
pub async fn backlog<C: GenericClient>(c: &C, stream: &str) -> Result<Backlog> {
    let row = c
        .query_typed_one(
            "SELECT (SELECT count(*) FROM failed_ranges WHERE stream = $1 AND NOT dead),
                    (SELECT count(*) FROM failed_ranges WHERE stream = $1 AND dead),
                    (SELECT count(*) FROM dead_letters WHERE stream = $1),
                    least((SELECT last_processed_block FROM block_cursors WHERE id = $1),
                          (SELECT min(from_block) - 1 FROM failed_ranges WHERE stream = $1))",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("read backlog"))?;
    Ok(Backlog {
        pending: row.get(0),
        dead: row.get(1),
        dead_letters: row.get(2),
        watermark: row.get::<_, Option<i64>>(3).unwrap_or(-1),
    })
}
