//! The `events` table: decoded logs, keyed by (chain_id, tx_hash, log_index).
//!
//! I1 (every canonical log at or below the cursor is stored exactly once):
//! [`insert`] is `INSERT … ON CONFLICT DO NOTHING`, so storing a log again
//! (a retry, a replica that lost the race, a restart) changes nothing and
//! never aborts the transaction; the rows it skipped are counted as
//! duplicates.
//!
//! Two ways in, one outcome:
//! - A batch of [`COPY_FROM_ROWS`] rows or more goes first by binary `COPY`
//!   straight into `events`, inside a savepoint: the fastest bulk path
//!   PostgreSQL has (a quarter less server time than `INSERT … ON
//!   CONFLICT`, measured in `scripts/bench`). `COPY` cannot skip
//!   duplicates, so a unique violation (23505) rolls back to the savepoint
//!   only — the tick's transaction goes on — and the batch is stored again
//!   by the path below, which skips and counts them. Duplicates are rare
//!   (a rewind, a failover), so the common case pays for one pass.
//! - Smaller batches, and that fallback, go in as arrays through UNNEST
//!   with `ON CONFLICT DO NOTHING`, a bounded number of rows per statement,
//!   so the statement has a fixed handful of bind parameters however many
//!   events a tick carries (never near the 65,535 limit).
//!
//! [`insert`] must run inside a transaction (the savepoint needs one).

use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};
use crate::chain::{Address, Hash32};

/// Rows per INSERT statement: bounds the statement's size in memory.
pub const ROWS_PER_STATEMENT: usize = 5_000;

/// Batches from this size on go by binary `COPY` first: below it, the
/// savepoint and the extra round trips cost more than `COPY` saves.
pub const COPY_FROM_ROWS: usize = 500;

const COLUMNS: &str = "stream, chain_id, block_number, block_hash, tx_hash, log_index, address, event_name, params";

/// One decoded log, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub block_number: i64,
    pub block_hash: Hash32,
    pub tx_hash: Hash32,
    pub log_index: i32,
    pub address: Address,
    pub event_name: String,
    pub params: serde_json::Value,
}

/// What an insert did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    /// New rows.
    pub inserted: u64,
    /// Rows that were already stored (or repeated within the batch).
    pub duplicates: u64,
}

/// Stores `events` for `stream`, skipping (and counting) those already
/// stored. Runs inside the caller's transaction, which a duplicate never
/// aborts.
pub async fn insert<C: GenericClient>(
    c: &C,
    stream: &str,
    chain_id: u64,
    events: &[NewEvent],
) -> Result<InsertOutcome> {
    let chain_id = i64::try_from(chain_id).unwrap_or(i64::MAX);
    if events.len() >= COPY_FROM_ROWS {
        c.batch_execute("SAVEPOINT logcursor_copy")
            .await
            .map_err(StoreError::db("savepoint before COPY"))?;
        match copy(c, stream, chain_id, events).await {
            Ok(inserted) => {
                c.batch_execute("RELEASE SAVEPOINT logcursor_copy")
                    .await
                    .map_err(StoreError::db("release savepoint after COPY"))?;
                return Ok(InsertOutcome {
                    inserted,
                    duplicates: events.len() as u64 - inserted,
                });
            }
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                // Some rows are stored already: undo the COPY alone, then
                // store the batch the way that skips and counts them.
                c.batch_execute("ROLLBACK TO SAVEPOINT logcursor_copy; RELEASE SAVEPOINT logcursor_copy")
                    .await
                    .map_err(StoreError::db("roll back a COPY that met duplicates"))?;
            }
            Err(e) => return Err(StoreError::db("COPY events")(e)),
        }
    }
    insert_skipping_duplicates(c, stream, chain_id, events).await
}

/// Binary `COPY` of `events` into `events`; the number of rows stored.
async fn copy<C: GenericClient>(
    c: &C,
    stream: &str,
    chain_id: i64,
    events: &[NewEvent],
) -> std::result::Result<u64, tokio_postgres::Error> {
    let sink = c
        .client()
        .copy_in(&format!("COPY events ({COLUMNS}) FROM STDIN (FORMAT binary)"))
        .await?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::TEXT,
            Type::INT8,
            Type::INT8,
            Type::BYTEA,
            Type::BYTEA,
            Type::INT4,
            Type::BYTEA,
            Type::TEXT,
            Type::JSONB,
        ],
    );
    pin_mut!(writer);
    for e in events {
        writer
            .as_mut()
            .write(&[
                &stream,
                &chain_id,
                &e.block_number,
                &&e.block_hash.0[..],
                &&e.tx_hash.0[..],
                &e.log_index,
                &&e.address.0[..],
                &e.event_name,
                &e.params,
            ])
            .await?;
    }
    writer.finish().await
}

/// `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING`, in statements
/// of at most [`ROWS_PER_STATEMENT`] rows.
async fn insert_skipping_duplicates<C: GenericClient>(
    c: &C,
    stream: &str,
    chain_id: i64,
    events: &[NewEvent],
) -> Result<InsertOutcome> {
    let mut outcome = InsertOutcome::default();
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let block_numbers: Vec<i64> = chunk.iter().map(|e| e.block_number).collect();
        let block_hashes: Vec<&[u8]> = chunk.iter().map(|e| &e.block_hash.0[..]).collect();
        let tx_hashes: Vec<&[u8]> = chunk.iter().map(|e| &e.tx_hash.0[..]).collect();
        let log_indexes: Vec<i32> = chunk.iter().map(|e| e.log_index).collect();
        let addresses: Vec<&[u8]> = chunk.iter().map(|e| &e.address.0[..]).collect();
        let names: Vec<&str> = chunk.iter().map(|e| e.event_name.as_str()).collect();
        let params: Vec<&serde_json::Value> = chunk.iter().map(|e| &e.params).collect();
        let inserted = c
            .execute_typed(
                "INSERT INTO events (stream, chain_id, block_number, block_hash, tx_hash, log_index, address, event_name, params)
                 SELECT $1, $2, u.* FROM UNNEST($3::int8[], $4::bytea[], $5::bytea[], $6::int4[], $7::bytea[], $8::text[], $9::jsonb[]) AS u
                 ON CONFLICT (chain_id, tx_hash, log_index) DO NOTHING",
                &[
                    (&stream, Type::TEXT),
                    (&chain_id, Type::INT8),
                    (&block_numbers, Type::INT8_ARRAY),
                    (&block_hashes, Type::BYTEA_ARRAY),
                    (&tx_hashes, Type::BYTEA_ARRAY),
                    (&log_indexes, Type::INT4_ARRAY),
                    (&addresses, Type::BYTEA_ARRAY),
                    (&names, Type::TEXT_ARRAY),
                    (&params, Type::JSONB_ARRAY),
                ],
            )
            .await
            .map_err(StoreError::db("insert events"))?;
        outcome.inserted += inserted;
        outcome.duplicates += chunk.len() as u64 - inserted;
    }
    Ok(outcome)
}

/// Events stored for `stream`.
pub async fn count<C: GenericClient>(c: &C, stream: &str) -> Result<i64> {
    let row = c
        .query_typed_one(
            "SELECT count(*) FROM events WHERE stream = $1",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("count events"))?;
    Ok(row.get(0))
}
