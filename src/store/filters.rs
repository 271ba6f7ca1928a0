//! `stream_filters`: every filter a stream's cursor has advanced under.
//!
//! I9: a filter is part of a cursor's meaning ("every log *this filter*
//! selects, up to here"). When a replica with a new filter first locks the
//! row, it adopts it in the tick's transaction: the new filter is recorded
//! here and on the cursor, and what it adds below the cursor becomes
//! backfill ranges ([`super::failed_ranges::record_backfill`]). A replica
//! whose filter is recorded here but is no longer the cursor's was
//! replaced (an old replica during a rolling update): it backs off. Going
//! back to an older filter is an operator's decision
//! (`logcursor adopt-filter`), which backfills what it adds in turn.

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};
use crate::types::{Address, Hash32, LogFilter};

/// A recorded filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub filter: LogFilter,
    pub chain_id: u64,
    pub adopted_at: std::time::SystemTime,
    pub adopted_by: String,
}

/// The filter recorded under `fingerprint` for `stream`, if any.
pub async fn get<C: GenericClient>(c: &C, stream: &str, fingerprint: Hash32) -> Result<Option<Recorded>> {
    let row = c
        .query_typed_opt(
            "SELECT addresses, topic0s, chain_id, adopted_at, adopted_by FROM stream_filters
              WHERE stream = $1 AND fingerprint = $2",
            &[(&stream, Type::TEXT), (&&fingerprint.0[..], Type::BYTEA)],
        )
        .await
        .map_err(StoreError::db("read stream filter"))?;
    Ok(row.map(|r| {
        let addresses: Vec<Vec<u8>> = r.get(0);
        let topics: Vec<Vec<u8>> = r.get(1);
        Recorded {
            filter: LogFilter {
                addresses: addresses.iter().filter_map(|a| Address::from_slice(a)).collect(),
                topic0s: topics.iter().filter_map(|t| Hash32::from_slice(t)).collect(),
            },
            chain_id: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
            adopted_at: r.get(3),
            adopted_by: r.get(4),
        }
    }))
}

/// Records `filter` as adopted now by `by` (again, if it was before).
pub async fn record<C: GenericClient>(c: &C, stream: &str, filter: &LogFilter, chain_id: u64, by: &str) -> Result<()> {
    let fingerprint = filter.fingerprint(chain_id);
    let addresses: Vec<&[u8]> = filter.addresses.iter().map(|a| &a.0[..]).collect();
    let topics: Vec<&[u8]> = filter.topic0s.iter().map(|t| &t.0[..]).collect();
    let chain = i64::try_from(chain_id).unwrap_or(i64::MAX);
    c.execute_typed(
        "INSERT INTO stream_filters (stream, fingerprint, chain_id, addresses, topic0s, adopted_by)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (stream, fingerprint) DO UPDATE SET adopted_at = now(), adopted_by = EXCLUDED.adopted_by",
        &[
            (&stream, Type::TEXT),
            (&&fingerprint.0[..], Type::BYTEA),
            (&chain, Type::INT8),
            (&addresses, Type::BYTEA_ARRAY),
            (&topics, Type::BYTEA_ARRAY),
            (&by, Type::TEXT),
        ],
    )
    .await
    .map_err(StoreError::db("record stream filter"))?;
    Ok(())
}
