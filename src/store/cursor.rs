//! The `block_cursors` row of a stream: where it is, who moved it last.
//!
//! I3 (the cursor never moves backward): [`advance`] is a compare-and-set
//! that names the value read under the row lock and the strictly greater
//! new value; a mismatch touches no row and is an error, never ignored.
//! [`seed`] only ever inserts (`ON CONFLICT DO NOTHING`): a changed
//! `start_block` never moves an existing cursor.

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};
use crate::chain::Hash32;

/// The cursor as read under the row lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Every log in blocks up to here is stored; -1 before block 0.
    pub last_processed_block: i64,
    /// Hash of that block; `None` until the first range is processed.
    pub last_block_hash: Option<Hash32>,
}

/// The whole row, for `status`.
#[derive(Debug, Clone)]
pub struct CursorRow {
    pub cursor: Cursor,
    pub updated_at: std::time::SystemTime,
    pub updated_by: Option<String>,
    /// Why the stream is halted, when it is.
    pub halted_reason: Option<String>,
    /// Since when ticks keep failing (cleared by the next committed range).
    pub failing_since: Option<std::time::SystemTime>,
    pub last_error: Option<String>,
}

/// Creates the stream's row at `start_block - 1` unless it exists; returns
/// the cursor as it now stands and whether this call created it.
pub async fn seed<C: GenericClient>(c: &C, stream: &str, start_block: u64, by: &str) -> Result<(Cursor, bool)> {
    let initial = i64::try_from(start_block).unwrap_or(i64::MAX) - 1;
    let created = c
        .execute_typed(
            "INSERT INTO block_cursors (id, last_processed_block, updated_at, updated_by)
             VALUES ($1, $2, now(), $3) ON CONFLICT (id) DO NOTHING",
            &[(&stream, Type::TEXT), (&initial, Type::INT8), (&by, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("seed cursor"))?;
    let row = get(c, stream)
        .await?
        .ok_or_else(|| StoreError::CursorMissing(stream.to_string()))?;
    Ok((row.cursor, created == 1))
}

/// Reads the cursor and takes its row lock until the transaction ends.
/// Replicas queue here; under READ COMMITTED a waiter that wakes up reads
/// the row as the holder committed it.
pub async fn lock<C: GenericClient>(c: &C, stream: &str) -> Result<Cursor> {
    let row = c
        .query_typed_opt(
            "SELECT last_processed_block, last_block_hash FROM block_cursors WHERE id = $1 FOR UPDATE",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("lock cursor"))?
        .ok_or_else(|| StoreError::CursorMissing(stream.to_string()))?;
    Ok(Cursor {
        last_processed_block: row.get(0),
        last_block_hash: hash_from(row.get(1)),
    })
}

/// Moves the cursor from `old` to `new` (> `old`), recording `hash` (of
/// block `new`, when known) and who did it. Exactly one row must change.
pub async fn advance<C: GenericClient>(
    c: &C,
    stream: &str,
    old: i64,
    new: i64,
    hash: Option<Hash32>,
    by: &str,
) -> Result<()> {
    let hash_bytes: Option<&[u8]> = hash.as_ref().map(|h| &h.0[..]);
    let rows = c
        .execute_typed(
            "UPDATE block_cursors
                SET last_processed_block = $3, last_block_hash = $4, updated_at = now(), updated_by = $5,
                    halted_at = NULL, halted_reason = NULL, failing_since = NULL, last_error = NULL
              WHERE id = $1 AND last_processed_block = $2 AND $3 > $2",
            &[
                (&stream, Type::TEXT),
                (&old, Type::INT8),
                (&new, Type::INT8),
                (&hash_bytes, Type::BYTEA),
                (&by, Type::TEXT),
            ],
        )
        .await
        .map_err(StoreError::db("advance cursor"))?;
    if rows != 1 {
        return Err(StoreError::CursorMoved {
            stream: stream.to_string(),
            expected: old,
            rows,
        });
    }
    Ok(())
}

/// The row without locking it.
pub async fn get<C: GenericClient>(c: &C, stream: &str) -> Result<Option<CursorRow>> {
    let row = c
        .query_typed_opt(
            "SELECT last_processed_block, last_block_hash, updated_at, updated_by, halted_reason, failing_since, last_error
               FROM block_cursors WHERE id = $1",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("read cursor"))?;
    Ok(row.map(|r| CursorRow {
        cursor: Cursor {
            last_processed_block: r.get(0),
            last_block_hash: hash_from(r.get(1)),
        },
        updated_at: r.get(2),
        updated_by: r.get(3),
        halted_reason: r.get(4),
        failing_since: r.get(5),
        last_error: r.get(6),
    }))
}

fn hash_from(bytes: Option<Vec<u8>>) -> Option<Hash32> {
    bytes.and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok()).map(Hash32)
}

/// Marks the stream halted with `reason` (shown by `status`).
pub async fn halt<C: GenericClient>(c: &C, stream: &str, reason: &str) -> Result<()> {
    c.execute_typed(
        "UPDATE block_cursors SET halted_at = coalesce(halted_at, now()), halted_reason = $2 WHERE id = $1",
        &[(&stream, Type::TEXT), (&reason, Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("record halt"))?;
    Ok(())
}

/// Notes that the stream's last tick failed (for `status`: a stream failing
/// for long is stuck). Skipped when another replica holds the row: then
/// the stream is being worked on, and waiting here would stall this one.
pub async fn record_failure<C: GenericClient>(c: &C, stream: &str, error: &str) -> Result<()> {
    c.execute_typed(
        "UPDATE block_cursors SET failing_since = coalesce(failing_since, now()), last_error = $2
          WHERE id = (SELECT id FROM block_cursors WHERE id = $1 FOR UPDATE SKIP LOCKED)",
        &[(&stream, Type::TEXT), (&error, Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("record failure"))?;
    Ok(())
}
