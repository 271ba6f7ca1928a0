//! `dead_letters`: logs parked whole, with why: they did not decode
//! (`decode`), PostgreSQL refused their row (`data`), or a handler failed
//! on them (`handler`).
//!
//! I1 with parking: a log at or below the cursor is either in `events` or
//! in `dead_letters` — never nowhere, never both. The dead letter is written
//! in the same transaction that moves the cursor past it; replay stores it
//! (running its handlers) and deletes it in one transaction; a rewind
//! deletes the dead letters above the block it rewinds to. A log parked
//! already is not tried again by a later tick ([`parked_keys`]): it waits
//! for replay.

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};
use crate::types::{Address, Hash32, RawLog};

/// Why a log was parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// It does not decode under the stream's events.
    Decode,
    /// PostgreSQL refused its row (a value, a constraint).
    Data,
    /// A handler (trigger, SQL function, Rust handler) failed on it.
    Handler,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Decode => "decode",
            Kind::Data => "data",
            Kind::Handler => "handler",
        }
    }

    fn parse(s: &str) -> Kind {
        match s {
            "data" => Kind::Data,
            "handler" => Kind::Handler,
            _ => Kind::Decode,
        }
    }
}

/// One stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub stream: String,
    pub chain_id: i64,
    pub log: RawLog,
    pub kind: Kind,
    pub error: String,
    pub attempts: i32,
    pub first_failed_at: std::time::SystemTime,
    pub last_failed_at: std::time::SystemTime,
}

/// Parks `logs` (each with why it failed); a log parked before counts one
/// more attempt and keeps the newest error.
pub async fn park<C: GenericClient>(
    c: &C,
    stream: &str,
    chain_id: u64,
    kind: Kind,
    logs: &[(&RawLog, String)],
) -> Result<()> {
    let chain_id = i64::try_from(chain_id).unwrap_or(i64::MAX);
    for (log, error) in logs {
        let topics: Vec<&[u8]> = log.topics.iter().map(|t| &t.0[..]).collect();
        let block = i64::try_from(log.block_number).unwrap_or(i64::MAX);
        let index = i32::try_from(log.log_index).unwrap_or(i32::MAX);
        c.execute_typed(
            "INSERT INTO dead_letters (stream, chain_id, block_number, block_hash, tx_hash, log_index, address, topics, data, error, kind)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (chain_id, tx_hash, log_index) DO UPDATE
                SET attempts = dead_letters.attempts + 1, error = EXCLUDED.error, last_failed_at = now(), kind = EXCLUDED.kind,
                    topics = EXCLUDED.topics, data = EXCLUDED.data, block_hash = EXCLUDED.block_hash,
                    block_number = EXCLUDED.block_number",
            &[
                (&stream, Type::TEXT),
                (&chain_id, Type::INT8),
                (&block, Type::INT8),
                (&&log.block_hash.0[..], Type::BYTEA),
                (&&log.tx_hash.0[..], Type::BYTEA),
                (&index, Type::INT4),
                (&&log.address.0[..], Type::BYTEA),
                (&topics, Type::BYTEA_ARRAY),
                (&log.data, Type::BYTEA),
                (&error, Type::TEXT),
                (&kind.as_str(), Type::TEXT),
            ],
        )
        .await
        .map_err(StoreError::db("park dead letter"))?;
    }
    Ok(())
}

/// Dead letters, oldest first; `ids` empty means all (of `stream`, if given).
/// With `lock`, the rows are locked until the transaction ends.
pub async fn list<C: GenericClient>(c: &C, stream: Option<&str>, ids: &[i64], lock: bool) -> Result<Vec<DeadLetter>> {
    const PLAIN: &str =
        "SELECT id, stream, chain_id, block_number, block_hash, tx_hash, log_index, address, topics, data,
                                error, attempts, first_failed_at, last_failed_at, kind
                           FROM dead_letters
                          WHERE ($1::text IS NULL OR stream = $1) AND (cardinality($2::int8[]) = 0 OR id = ANY($2))
                          ORDER BY id";
    const LOCKED: &str =
        "SELECT id, stream, chain_id, block_number, block_hash, tx_hash, log_index, address, topics, data,
                                 error, attempts, first_failed_at, last_failed_at, kind
                            FROM dead_letters
                           WHERE ($1::text IS NULL OR stream = $1) AND (cardinality($2::int8[]) = 0 OR id = ANY($2))
                           ORDER BY id FOR UPDATE";
    let rows = c
        .query_typed(
            if lock { LOCKED } else { PLAIN },
            &[(&stream, Type::TEXT), (&ids, Type::INT8_ARRAY)],
        )
        .await
        .map_err(StoreError::db("read dead letters"))?;
    Ok(rows.iter().map(from_row).collect())
}

/// Removes dead letters by id; returns how many existed.
pub async fn discard<C: GenericClient>(c: &C, ids: &[i64]) -> Result<u64> {
    c.execute_typed(
        "DELETE FROM dead_letters WHERE id = ANY($1)",
        &[(&ids, Type::INT8_ARRAY)],
    )
    .await
    .map_err(StoreError::db("discard dead letters"))
}

/// Records another failed attempt of dead letter `id`.
pub async fn failed_again<C: GenericClient>(c: &C, id: i64, error: &str) -> Result<()> {
    c.execute_typed(
        "UPDATE dead_letters SET attempts = attempts + 1, error = $2, last_failed_at = now() WHERE id = $1",
        &[(&id, Type::INT8), (&error, Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("record dead letter attempt"))?;
    Ok(())
}

/// The keys of `stream`'s dead letters in blocks `[from, to]` with the
/// block hash they were parked under: logs a tick skips (they wait for
/// replay). A letter parked under another hash (a reorg) is not skipped.
pub async fn parked_keys<C: GenericClient>(
    c: &C,
    stream: &str,
    from: u64,
    to: u64,
) -> Result<std::collections::HashSet<(Hash32, u32, Hash32)>> {
    let (from, to) = (
        i64::try_from(from).unwrap_or(i64::MAX),
        i64::try_from(to).unwrap_or(i64::MAX),
    );
    let rows = c
        .query_typed(
            "SELECT tx_hash, log_index, block_hash FROM dead_letters
              WHERE stream = $1 AND block_number BETWEEN $2 AND $3",
            &[(&stream, Type::TEXT), (&from, Type::INT8), (&to, Type::INT8)],
        )
        .await
        .map_err(StoreError::db("read parked keys"))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some((
                Hash32::from_slice(r.get::<_, &[u8]>(0))?,
                u32::try_from(r.get::<_, i32>(1)).ok()?,
                Hash32::from_slice(r.get::<_, &[u8]>(2))?,
            ))
        })
        .collect())
}

/// Deletes `stream`'s dead letters above block `to` (a rewind: their blocks
/// are no longer canonical, or will be fetched again); returns how many.
pub async fn delete_above<C: GenericClient>(c: &C, stream: &str, to: i64) -> Result<u64> {
    c.execute_typed(
        "DELETE FROM dead_letters WHERE stream = $1 AND block_number > $2",
        &[(&stream, Type::TEXT), (&to, Type::INT8)],
    )
    .await
    .map_err(StoreError::db("delete dead letters above a rewind"))
}

/// The error a letter for `log` holds (by its key), if one is parked.
pub async fn error_of<C: GenericClient>(c: &C, log: &RawLog) -> Result<Option<String>> {
    let index = i32::try_from(log.log_index).unwrap_or(i32::MAX);
    let row = c
        .query_typed_opt(
            "SELECT error FROM dead_letters WHERE tx_hash = $1 AND log_index = $2 AND block_hash = $3",
            &[
                (&&log.tx_hash.0[..], Type::BYTEA),
                (&index, Type::INT4),
                (&&log.block_hash.0[..], Type::BYTEA),
            ],
        )
        .await
        .map_err(StoreError::db("read dead letter error"))?;
    Ok(row.map(|r| r.get(0)))
}

/// Dead letters of `stream`.
pub async fn count<C: GenericClient>(c: &C, stream: &str) -> Result<i64> {
    let row = c
        .query_typed_one(
            "SELECT count(*) FROM dead_letters WHERE stream = $1",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("count dead letters"))?;
    Ok(row.get(0))
}

fn hash(bytes: Vec<u8>) -> Hash32 {
    Hash32::from_slice(&bytes).unwrap_or_default()
}

fn from_row(r: &tokio_postgres::Row) -> DeadLetter {
    let topics: Vec<Vec<u8>> = r.get(8);
    let address: Vec<u8> = r.get(7);
    DeadLetter {
        id: r.get(0),
        stream: r.get(1),
        chain_id: r.get(2),
        log: RawLog {
            block_number: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
            block_hash: hash(r.get(4)),
            tx_hash: hash(r.get(5)),
            log_index: u64::try_from(r.get::<_, i32>(6)).unwrap_or(0),
            address: Address::from_slice(&address).unwrap_or(Address([0; 20])),
            topics: topics.into_iter().map(hash).collect(),
            data: r.get(9),
            removed: false,
        },
        kind: Kind::parse(r.get(14)),
        error: r.get(10),
        attempts: r.get(11),
        first_failed_at: r.get(12),
        last_failed_at: r.get(13),
    }
}
