//! The `events` table: decoded logs, keyed by (chain_id, tx_hash, log_index).
//!
//! I1 (every canonical log at or below the cursor is stored exactly once):
//! [`insert`] is `INSERT … ON CONFLICT DO NOTHING`, so storing a log again
//! (a retry, a replica that lost the race, a restart) changes nothing and
//! never aborts the transaction; it reports which rows were new, so that
//! effects run for those only.
//!
//! Bulk batches may instead go by binary [`copy`] straight into `events`:
//! the fastest bulk path PostgreSQL has (a quarter less server time than
//! `INSERT … ON CONFLICT`, measured in `scripts/bench`). `COPY` cannot skip
//! duplicates; the caller runs it inside a savepoint and, on a unique
//! violation (23505), rolls back to it and uses [`insert`] instead
//! (see `crate::write`).
//!
//! [`insert`] sends at most [`ROWS_PER_STATEMENT`] rows per statement as
//! arrays through UNNEST, so a statement has a fixed handful of bind
//! parameters however many events a tick carries (never near 65,535).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};
use crate::types::{Address, Hash32};

/// Rows per INSERT statement: bounds the statement's size in memory.
pub const ROWS_PER_STATEMENT: usize = 5_000;

/// Batches from this size on go by binary `COPY`: below it, the extra
/// round trips cost more than `COPY` saves.
pub const COPY_FROM_ROWS: usize = 500;

/// One decoded log, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub block_number: u64,
    pub block_hash: Hash32,
    /// Seconds since the epoch, from the block's header.
    pub block_timestamp: Option<u64>,
    pub tx_hash: Hash32,
    pub log_index: u32,
    pub address: Address,
    pub event_name: String,
    pub params: serde_json::Value,
}

impl AsRef<NewEvent> for NewEvent {
    fn as_ref(&self) -> &NewEvent {
        self
    }
}

impl NewEvent {
    /// The event's key within its chain.
    pub fn key(&self) -> (Hash32, u32) {
        (self.tx_hash, self.log_index)
    }
}

/// Which rows of a batch were new: `(index in the batch, events.id)`, in
/// batch order; the others were stored already. (After a [`copy`] that
/// was not asked for ids, every id is 0.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inserted {
    pub new: Vec<(usize, i64)>,
}

fn chain(chain_id: u64) -> i64 {
    i64::try_from(chain_id).unwrap_or(i64::MAX)
}

fn block(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn time(secs: Option<u64>) -> Option<SystemTime> {
    secs.map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

/// Stores `events` for `stream`, skipping those already stored; returns
/// which were new, with their ids.
/// (Generic over `AsRef`: the write seam passes its rows as they are,
/// without copying the events out of them.)
pub async fn insert<C: GenericClient, E: AsRef<NewEvent> + Sync>(
    c: &C,
    stream: &str,
    chain_id: u64,
    events: &[E],
) -> Result<Inserted> {
    let chain_id = chain(chain_id);
    let mut out = Inserted::default();
    for (chunk_no, chunk) in events.chunks(ROWS_PER_STATEMENT).enumerate() {
        let base = chunk_no * ROWS_PER_STATEMENT;
        let chunk: Vec<&NewEvent> = chunk.iter().map(AsRef::as_ref).collect();
        let block_numbers: Vec<i64> = chunk.iter().map(|e| block(e.block_number)).collect();
        let block_hashes: Vec<&[u8]> = chunk.iter().map(|e| &e.block_hash.0[..]).collect();
        let times: Vec<Option<SystemTime>> = chunk.iter().map(|e| time(e.block_timestamp)).collect();
        let tx_hashes: Vec<&[u8]> = chunk.iter().map(|e| &e.tx_hash.0[..]).collect();
        let log_indexes: Vec<i32> = chunk.iter().map(|e| e.log_index as i32).collect();
        let addresses: Vec<&[u8]> = chunk.iter().map(|e| &e.address.0[..]).collect();
        let names: Vec<&str> = chunk.iter().map(|e| e.event_name.as_str()).collect();
        let params: Vec<&serde_json::Value> = chunk.iter().map(|e| &e.params).collect();
        let rows = c
            .query_typed(
                "INSERT INTO events (stream, chain_id, block_number, block_hash, block_timestamp, tx_hash, log_index, address, event_name, params)
                 SELECT $1, $2, u.* FROM UNNEST($3::int8[], $4::bytea[], $5::timestamptz[], $6::bytea[], $7::int4[], $8::bytea[], $9::text[], $10::jsonb[]) AS u
                 ON CONFLICT (chain_id, tx_hash, log_index) DO NOTHING
                 RETURNING id, tx_hash, log_index",
                &[
                    (&stream, Type::TEXT),
                    (&chain_id, Type::INT8),
                    (&block_numbers, Type::INT8_ARRAY),
                    (&block_hashes, Type::BYTEA_ARRAY),
                    (&times, Type::TIMESTAMPTZ_ARRAY),
                    (&tx_hashes, Type::BYTEA_ARRAY),
                    (&log_indexes, Type::INT4_ARRAY),
                    (&addresses, Type::BYTEA_ARRAY),
                    (&names, Type::TEXT_ARRAY),
                    (&params, Type::JSONB_ARRAY),
                ],
            )
            .await
            .map_err(StoreError::db("insert events"))?;
        if rows.is_empty() {
            continue;
        }
        let position: HashMap<(Hash32, u32), usize> =
            chunk.iter().enumerate().map(|(i, e)| (e.key(), base + i)).collect();
        let mut new: Vec<(usize, i64)> = rows
            .iter()
            .filter_map(|r| {
                let tx = Hash32::from_slice(r.get::<_, &[u8]>(1))?;
                let index = u32::try_from(r.get::<_, i32>(2)).ok()?;
                position.get(&(tx, index)).map(|i| (*i, r.get::<_, i64>(0)))
            })
            .collect();
        new.sort_unstable();
        out.new.extend(new);
    }
    Ok(out)
}

/// Binary `COPY` of `events` into `events`: every row is new or the whole
/// statement fails (23505 on a duplicate). With `ids`, the ids are taken
/// from the sequence first (one round trip) so that the caller learns them.
pub async fn copy<C: GenericClient, E: AsRef<NewEvent> + Sync>(
    c: &C,
    stream: &str,
    chain_id: u64,
    events: &[E],
    ids: bool,
) -> std::result::Result<Inserted, tokio_postgres::Error> {
    let chain_id = chain(chain_id);
    let count = i64::try_from(events.len()).unwrap_or(i64::MAX);
    let taken: Option<Vec<i64>> = if ids {
        let rows = c
            .query_typed(
                "SELECT nextval('events_id_seq') FROM generate_series(1, $1)",
                &[(&count, Type::INT8)],
            )
            .await?;
        Some(rows.iter().map(|r| r.get(0)).collect())
    } else {
        None
    };
    let (statement, mut types) = match taken {
        Some(_) => (
            "COPY events (id, stream, chain_id, block_number, block_hash, block_timestamp, tx_hash, log_index, address, event_name, params) FROM STDIN (FORMAT binary)",
            vec![Type::INT8],
        ),
        None => (
            "COPY events (stream, chain_id, block_number, block_hash, block_timestamp, tx_hash, log_index, address, event_name, params) FROM STDIN (FORMAT binary)",
            vec![],
        ),
    };
    types.extend([
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::BYTEA,
        Type::TIMESTAMPTZ,
        Type::BYTEA,
        Type::INT4,
        Type::BYTEA,
        Type::TEXT,
        Type::JSONB,
    ]);
    let sink = c.client().copy_in(statement).await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for (i, e) in events.iter().map(AsRef::as_ref).enumerate() {
        let number = block(e.block_number);
        let at = time(e.block_timestamp);
        let index = e.log_index as i32;
        let hash = &e.block_hash.0[..];
        let tx = &e.tx_hash.0[..];
        let address = &e.address.0[..];
        let id = taken.as_ref().map(|t| t[i]);
        let mut row: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::with_capacity(11);
        if let Some(id) = &id {
            row.push(id);
        }
        row.extend_from_slice(&[
            &stream,
            &chain_id,
            &number,
            &hash,
            &at,
            &tx,
            &index,
            &address,
            &e.event_name,
            &e.params,
        ]);
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    Ok(Inserted {
        new: match taken {
            Some(ids) => ids.into_iter().enumerate().collect(),
            None => (0..events.len()).map(|i| (i, 0)).collect(),
        },
    })
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

/// A stored event, as handlers and deliveries see it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// `events.id`: unique, but not commit order (gap fill stores older
    /// blocks later): never use it as a consumer offset.
    pub id: i64,
    pub stream: String,
    pub chain_id: u64,
    pub block_number: u64,
    pub block_hash: Hash32,
    /// Seconds since the epoch (`None` for rows stored before block times were kept).
    pub block_timestamp: Option<u64>,
    pub tx_hash: Hash32,
    pub log_index: u32,
    /// The contract that emitted it.
    pub address: Address,
    pub event_name: String,
    /// The decoded parameters (see `chain::abi` for the encoding).
    pub params: serde_json::Value,
}

impl StoredEvent {
    /// The stored row of `e`, new with id `id`.
    pub fn from_new(e: &NewEvent, id: i64, stream: &str, chain_id: u64) -> StoredEvent {
        StoredEvent {
            id,
            stream: stream.to_string(),
            chain_id,
            block_number: e.block_number,
            block_hash: e.block_hash,
            block_timestamp: e.block_timestamp,
            tx_hash: e.tx_hash,
            log_index: e.log_index,
            address: e.address,
            event_name: e.event_name.clone(),
            params: e.params.clone(),
        }
    }
}

/// `stream`'s events above block `to` (what a rewind to `to` removes), in
/// block and log order: at most `limit` of them, after the event at
/// (block, log index) `after` when given.
pub async fn above<C: GenericClient>(
    c: &C,
    stream: &str,
    to: i64,
    after: Option<(u64, u32)>,
    limit: i64,
) -> Result<Vec<StoredEvent>> {
    let (after_block, after_index) = after.map_or((-1, -1), |(b, i)| (block(b), i64::from(i)));
    let rows = c
        .query_typed(
            "SELECT id, stream, chain_id, block_number, block_hash, block_timestamp, tx_hash, log_index, address, event_name, params
               FROM events WHERE stream = $1 AND block_number > $2 AND (block_number, log_index) > ($3, $4)
              ORDER BY block_number, log_index LIMIT $5",
            &[
                (&stream, Type::TEXT),
                (&to, Type::INT8),
                (&after_block, Type::INT8),
                (&after_index, Type::INT8),
                (&limit, Type::INT8),
            ],
        )
        .await
        .map_err(StoreError::db("read events above a rewind"))?;
    Ok(rows
        .iter()
        .map(|r| StoredEvent {
            id: r.get(0),
            stream: r.get(1),
            chain_id: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
            block_number: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
            block_hash: Hash32::from_slice(r.get::<_, &[u8]>(4)).unwrap_or_default(),
            block_timestamp: r
                .get::<_, Option<SystemTime>>(5)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            tx_hash: Hash32::from_slice(r.get::<_, &[u8]>(6)).unwrap_or_default(),
            log_index: u32::try_from(r.get::<_, i32>(7)).unwrap_or(0),
            address: Address::from_slice(r.get::<_, &[u8]>(8)).unwrap_or(Address([0; 20])),
            event_name: r.get(9),
            params: r.get(10),
        })
        .collect())
}

/// Deletes `stream`'s events above block `to` (a rewind); returns how many.
/// Row triggers `AFTER DELETE` on `events` see each, in this transaction.
pub async fn delete_above<C: GenericClient>(c: &C, stream: &str, to: i64) -> Result<u64> {
    c.execute_typed(
        "DELETE FROM events WHERE stream = $1 AND block_number > $2",
        &[(&stream, Type::TEXT), (&to, Type::INT8)],
    )
    .await
    .map_err(StoreError::db("delete events above a rewind"))
}
