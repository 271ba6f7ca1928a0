//! What reorg safety keeps in the database: recent block hashes, the halt
//! state, and audited rewinds.
//!
//! I2 (no stored row comes from an orphaned block at or below the safe
//! head): a tick reads only up to the safe head, checks before fetching that
//! the block under the cursor still has the stored hash, and when it does
//! not, either halts the stream or [`rewind`]s it: the orphaned events go,
//! the cursor moves back to the newest stored block that is still canonical,
//! all in the tick's transaction.
//!
//! I3's one exception: [`rewind`] moves the cursor backward, and only
//! together with a row in `cursor_rewinds` saying from where, to where, why
//! and by whom. Everything stored above the target goes with it in the same
//! transaction: events (through the write seam, which reverts their
//! effects: I10), dead letters, block hashes, the part of pending ranges
//! above it.

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};
use crate::types::Hash32;

/// Records the hashes of processed blocks and forgets those more than
/// `keep` blocks below `cursor`.
pub async fn remember_hashes<C: GenericClient>(
    c: &C,
    stream: &str,
    blocks: &[(i64, Hash32)],
    cursor: i64,
    keep: u64,
) -> Result<()> {
    let numbers: Vec<i64> = blocks.iter().map(|(n, _)| *n).collect();
    let hashes: Vec<&[u8]> = blocks.iter().map(|(_, h)| &h.0[..]).collect();
    c.execute_typed(
        "INSERT INTO block_hashes (stream, block_number, block_hash)
         SELECT $1, n, h FROM UNNEST($2::int8[], $3::bytea[]) AS u(n, h)
         ON CONFLICT (stream, block_number) DO UPDATE SET block_hash = EXCLUDED.block_hash",
        &[
            (&stream, Type::TEXT),
            (&numbers, Type::INT8_ARRAY),
            (&hashes, Type::BYTEA_ARRAY),
        ],
    )
    .await
    .map_err(StoreError::db("remember block hashes"))?;
    let oldest = cursor.saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX));
    c.execute_typed(
        "DELETE FROM block_hashes WHERE stream = $1 AND block_number < $2",
        &[(&stream, Type::TEXT), (&oldest, Type::INT8)],
    )
    .await
    .map_err(StoreError::db("forget old block hashes"))?;
    Ok(())
}

/// Stored hashes at or below `cursor`, newest first, at most `depth` blocks back.
pub async fn recent_hashes<C: GenericClient>(
    c: &C,
    stream: &str,
    cursor: i64,
    depth: u64,
) -> Result<Vec<(i64, Hash32)>> {
    let oldest = cursor.saturating_sub(i64::try_from(depth).unwrap_or(i64::MAX));
    let rows = c
        .query_typed(
            "SELECT block_number, block_hash FROM block_hashes
              WHERE stream = $1 AND block_number <= $2 AND block_number >= $3
              ORDER BY block_number DESC",
            &[(&stream, Type::TEXT), (&cursor, Type::INT8), (&oldest, Type::INT8)],
        )
        .await
        .map_err(StoreError::db("read block hashes"))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let bytes: Vec<u8> = r.get(1);
            <[u8; 32]>::try_from(bytes.as_slice())
                .ok()
                .map(|h| (r.get::<_, i64>(0), Hash32(h)))
        })
        .collect())
}

/// One audited move of the cursor back to `to` (from `from`, the value
/// read under the row lock): deletes the stream's block hashes and dead
/// letters above `to`, trims its pending ranges at `to`, moves the cursor,
/// clears any halt, and records the rewind with the number of events the
/// caller deleted (through the write seam, which reverts their effects).
#[allow(clippy::too_many_arguments, reason = "each is one column of the audit row")]
pub async fn rewind<C: GenericClient>(
    c: &C,
    stream: &str,
    from: i64,
    to: i64,
    old_hash: Option<Hash32>,
    new_hash: Option<Hash32>,
    reason: &str,
    by: &str,
    events_deleted: u64,
) -> Result<()> {
    if to >= from {
        return Err(StoreError::CursorMoved {
            stream: stream.to_string(),
            expected: from,
            rows: 0,
        });
    }
    c.execute_typed(
        "DELETE FROM block_hashes WHERE stream = $1 AND block_number > $2",
        &[(&stream, Type::TEXT), (&to, Type::INT8)],
    )
    .await
    .map_err(StoreError::db("delete orphaned block hashes"))?;
    super::dead_letters::delete_above(c, stream, to).await?;
    super::failed_ranges::forget_above(c, stream, to).await?;
    let new_bytes: Option<&[u8]> = new_hash.as_ref().map(|h| &h.0[..]);
    let old_bytes: Option<&[u8]> = old_hash.as_ref().map(|h| &h.0[..]);
    let moved = c
        .execute_typed(
            "UPDATE block_cursors
                SET last_processed_block = $3, last_block_hash = $4, updated_at = now(), updated_by = $5,
                    halted_at = NULL, halted_reason = NULL
              WHERE id = $1 AND last_processed_block = $2",
            &[
                (&stream, Type::TEXT),
                (&from, Type::INT8),
                (&to, Type::INT8),
                (&new_bytes, Type::BYTEA),
                (&by, Type::TEXT),
            ],
        )
        .await
        .map_err(StoreError::db("rewind cursor"))?;
    if moved != 1 {
        return Err(StoreError::CursorMoved {
            stream: stream.to_string(),
            expected: from,
            rows: moved,
        });
    }
    let deleted = i64::try_from(events_deleted).unwrap_or(i64::MAX);
    c.execute_typed(
        "INSERT INTO cursor_rewinds (stream, from_block, to_block, old_hash, new_hash, events_deleted, reason, by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            (&stream, Type::TEXT),
            (&from, Type::INT8),
            (&to, Type::INT8),
            (&old_bytes, Type::BYTEA),
            (&new_bytes, Type::BYTEA),
            (&deleted, Type::INT8),
            (&reason, Type::TEXT),
            (&by, Type::TEXT),
        ],
    )
    .await
    .map_err(StoreError::db("audit rewind"))?;
    Ok(())
}

/// The block hashes `stream`'s rows record at or below `at`, newest first,
/// at most `depth` blocks back: from `block_hashes` and from the events
/// themselves (one row per block), so that an operator's rewind target can
/// be checked against the chain.
pub async fn stored_hashes_at_or_below<C: GenericClient>(
    c: &C,
    stream: &str,
    at: i64,
    depth: u64,
) -> Result<Vec<(i64, Hash32)>> {
    let oldest = at.saturating_sub(i64::try_from(depth).unwrap_or(i64::MAX));
    let rows = c
        .query_typed(
            "SELECT block_number, block_hash FROM block_hashes
              WHERE stream = $1 AND block_number <= $2 AND block_number >= $3
             UNION
             SELECT DISTINCT block_number, block_hash FROM events
              WHERE stream = $1 AND block_number <= $2 AND block_number >= $3
             ORDER BY 1 DESC",
            &[(&stream, Type::TEXT), (&at, Type::INT8), (&oldest, Type::INT8)],
        )
        .await
        .map_err(StoreError::db("read stored block hashes"))?;
    Ok(rows
        .iter()
        .filter_map(|r| Hash32::from_slice(r.get::<_, &[u8]>(1)).map(|h| (r.get::<_, i64>(0), h)))
        .collect())
}
