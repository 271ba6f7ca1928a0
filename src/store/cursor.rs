//! The `block_cursors` row of a stream: where it is, under which filter,
//! who moved it last.
//!
//! I3 (the cursor never moves backward): [`advance`] is a compare-and-set
//! that names the value read under the row lock and the strictly greater
//! new value; a mismatch touches no row and is an error, never ignored.
//! [`seed`] only ever inserts (`ON CONFLICT DO NOTHING`): a changed
//! `start_block` never moves an existing cursor.
//!
//! I9 (a cursor advances only under the filter it records): the row holds
//! the fingerprint of the filter that advanced it ([`Cursor::fingerprint`]);
//! [`advance`] requires it to be the caller's, so a replica with another
//! filter cannot move the cursor even if it got past the tick's check.

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};
use crate::types::{BlockNumber, Hash32, Processed};

/// The cursor as read (under the row lock, or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Every log the filter selects in blocks up to here is stored.
    pub processed: Processed,
    /// Hash of that block; `None` until the first range is processed.
    pub hash: Option<Hash32>,
    /// The filter the cursor advances under; `None` on a row written before
    /// fingerprints existed (the first replica to lock it records its own).
    pub fingerprint: Option<Hash32>,
}

/// How [`lock`] treats a row another transaction holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Wait (up to the transaction's `lock_timeout`).
    Wait,
    /// Fail at once with SQLSTATE 55P03: come back later, never park a
    /// pooled connection on another replica's tick.
    NoWait,
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

/// Creates the stream's row before `start_block` unless it exists; returns
/// the cursor as it now stands and whether this call created it.
pub async fn seed<C: GenericClient>(c: &C, stream: &str, start: BlockNumber, by: &str) -> Result<(Cursor, bool)> {
    let initial = Processed::before(start).to_db();
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

/// Takes the cursor's row lock if no one holds it (`false`: someone does;
/// the transaction is not aborted, unlike `NOWAIT`).
pub async fn try_lock<C: GenericClient>(c: &C, stream: &str) -> Result<bool> {
    let row = c
        .query_typed_opt(
            "SELECT 1 FROM block_cursors WHERE id = $1 FOR UPDATE SKIP LOCKED",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("try the cursor lock"))?;
    Ok(row.is_some())
}

/// Reads the cursor and takes its row lock until the transaction ends.
/// Under READ COMMITTED a waiter that wakes up reads the row as the holder
/// committed it.
pub async fn lock<C: GenericClient>(c: &C, stream: &str, mode: LockMode) -> Result<Cursor> {
    Ok(lock_recorded(c, stream, mode).await?.0)
}

/// [`lock`], with the Rust handlers the row records
/// ([`super::rust_handlers`]), read in the same statement.
pub async fn lock_recorded<C: GenericClient>(c: &C, stream: &str, mode: LockMode) -> Result<(Cursor, Vec<String>)> {
    const WAIT: &str = "SELECT last_processed_block, last_block_hash, filter_fingerprint, rust_handlers
                          FROM block_cursors WHERE id = $1 FOR UPDATE";
    const NOWAIT: &str = "SELECT last_processed_block, last_block_hash, filter_fingerprint, rust_handlers
                            FROM block_cursors WHERE id = $1 FOR UPDATE NOWAIT";
    let sql = match mode {
        LockMode::Wait => WAIT,
        LockMode::NoWait => NOWAIT,
    };
    let row = c
        .query_typed_opt(sql, &[(&stream, Type::TEXT)])
        .await
        .map_err(StoreError::db("lock cursor"))?
        .ok_or_else(|| StoreError::CursorMissing(stream.to_string()))?;
    let cursor = Cursor {
        processed: Processed::from_db(row.get(0)),
        hash: hash_from(row.get(1)),
        fingerprint: hash_from(row.get(2)),
    };
    Ok((cursor, row.get(3)))
}

/// The cursors of `streams`, without locking (a read takes no transaction
/// id): what a replica checks before deciding a stream has work.
pub async fn peek<C: GenericClient>(c: &C, streams: &[&str]) -> Result<Vec<(String, Processed)>> {
    let rows = c
        .query_typed(
            "SELECT id, last_processed_block FROM block_cursors WHERE id = ANY($1)",
            &[(&streams, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(StoreError::db("read cursors"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), Processed::from_db(r.get(1))))
        .collect())
}

/// Moves the cursor from `old` to `new` (> `old`), recording `hash` (of
/// block `new`, when known) and who did it, under filter `fingerprint`.
/// Exactly one row must change.
pub async fn advance<C: GenericClient>(
    c: &C,
    stream: &str,
    old: Processed,
    new: BlockNumber,
    hash: Option<Hash32>,
    fingerprint: Hash32,
    by: &str,
) -> Result<()> {
    let hash_bytes: Option<&[u8]> = hash.as_ref().map(|h| &h.0[..]);
    let (old_db, new_db) = (old.to_db(), new.to_db());
    let rows = c
        .execute_typed(
            "UPDATE block_cursors
                SET last_processed_block = $3, last_block_hash = $4, updated_at = now(), updated_by = $5,
                    halted_at = NULL, halted_reason = NULL, failing_since = NULL, last_error = NULL
              WHERE id = $1 AND last_processed_block = $2 AND $3 > $2 AND filter_fingerprint = $6",
            &[
                (&stream, Type::TEXT),
                (&old_db, Type::INT8),
                (&new_db, Type::INT8),
                (&hash_bytes, Type::BYTEA),
                (&by, Type::TEXT),
                (&&fingerprint.0[..], Type::BYTEA),
            ],
        )
        .await
        .map_err(StoreError::db("advance cursor"))?;
    if rows != 1 {
        return Err(StoreError::CursorMoved {
            stream: stream.to_string(),
            expected: old_db,
            rows,
        });
    }
    Ok(())
}

/// Records that the cursor now advances under `fingerprint` (on chain `chain_id`).
pub async fn set_filter<C: GenericClient>(c: &C, stream: &str, fingerprint: Hash32, chain_id: u64) -> Result<()> {
    let chain = i64::try_from(chain_id).unwrap_or(i64::MAX);
    c.execute_typed(
        "UPDATE block_cursors SET filter_fingerprint = $2, chain_id = $3 WHERE id = $1",
        &[
            (&stream, Type::TEXT),
            (&&fingerprint.0[..], Type::BYTEA),
            (&chain, Type::INT8),
        ],
    )
    .await
    .map_err(StoreError::db("record cursor filter"))?;
    Ok(())
}

/// The row without locking it.
pub async fn get<C: GenericClient>(c: &C, stream: &str) -> Result<Option<CursorRow>> {
    Ok(get_many(c, &[stream]).await?.into_iter().next().map(|(_, r)| r))
}

/// The rows of `streams` without locking them (one round trip), by id.
pub async fn get_many<C: GenericClient>(c: &C, streams: &[&str]) -> Result<Vec<(String, CursorRow)>> {
    get_many_in(c, None, streams).await
}

/// [`get_many`] naming the table in `schema` (a quoted identifier): one
/// statement on its own, outside any transaction, needs no `search_path`.
pub async fn get_many_in<C: GenericClient>(
    c: &C,
    schema: Option<&str>,
    streams: &[&str],
) -> Result<Vec<(String, CursorRow)>> {
    let table = schema.map_or_else(|| "block_cursors".to_string(), |s| format!("{s}.block_cursors"));
    let rows = c
        .query_typed(
            &format!(
                "SELECT id, last_processed_block, last_block_hash, filter_fingerprint, updated_at, updated_by,
                        halted_reason, failing_since, last_error
                   FROM {table} WHERE id = ANY($1)"
            ),
            &[(&streams, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(StoreError::db("read cursor"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                CursorRow {
                    cursor: Cursor {
                        processed: Processed::from_db(r.get(1)),
                        hash: hash_from(r.get(2)),
                        fingerprint: hash_from(r.get(3)),
                    },
                    updated_at: r.get(4),
                    updated_by: r.get(5),
                    halted_reason: r.get(6),
                    failing_since: r.get(7),
                    last_error: r.get(8),
                },
            )
        })
        .collect())
}

pub(crate) fn hash_from(bytes: Option<Vec<u8>>) -> Option<Hash32> {
    bytes.and_then(|b| Hash32::from_slice(&b))
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
/// for long is stuck), in `tx`. Skipped when another replica holds the row:
/// then the stream is being worked on, and waiting here would park a
/// pooled connection on its lock. The row is locked first with `SKIP
/// LOCKED` and updated after, so the update never waits: a single
/// `UPDATE … WHERE id = (SELECT … SKIP LOCKED)` was seen waiting on the
/// lock of a replica that took the row in between.
pub async fn record_failure<C: GenericClient>(tx: &C, stream: &str, error: &str) -> Result<()> {
    let free = tx
        .query_typed(
            "SELECT 1 FROM block_cursors WHERE id = $1 FOR UPDATE SKIP LOCKED",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("record failure"))?;
    if free.is_empty() {
        return Ok(());
    }
    tx.execute_typed(
        "UPDATE block_cursors SET failing_since = coalesce(failing_since, now()), last_error = $2 WHERE id = $1",
        &[(&stream, Type::TEXT), (&error, Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("record failure"))?;
    Ok(())
}
