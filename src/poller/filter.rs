//! The filter a cursor advances under (I9: a cursor advances only under the
//! filter it records; what a changed filter adds below the cursor is
//! backfilled, never skipped).
//!
//! Checked by every tick under the row lock, before anything is planned:
//! - the row's fingerprint is this replica's: go on;
//! - the row has none (a new stream, or one stored before fingerprints
//!   existed): record this replica's filter, nothing to backfill;
//! - this replica's filter is new to the stream: adopt it — record it, and
//!   for what it adds to the recorded filter (new addresses with every
//!   event, new events of the old addresses) write backfill ranges over
//!   `[start_block, cursor]` for the gap-fill worker — in the tick's
//!   transaction, so adoption and backfill commit together;
//! - this replica's filter was recorded before but replaced since (an old
//!   replica during a rolling update): back off, saying why, and never
//!   advance. Returning to an older filter is an operator's decision
//!   (`logcursor adopt-filter`), and backfills what it adds in turn.
//!
//! Removed addresses or events simply stop being fetched.

use super::{Stream, TickError};
use crate::store::cursor::{self, Cursor};
use crate::store::{failed_ranges, filters, GenericClient};
use crate::types::{BlockNumber, LogFilter};

/// The tick's check (see the module doc); `Ok` when the tick may go on.
pub(crate) async fn check<C: GenericClient>(c: &C, stream: &Stream, row: &Cursor, by: &str) -> Result<(), TickError> {
    let name = stream.cfg.name.as_str();
    match row.fingerprint {
        Some(fp) if fp == stream.fingerprint => Ok(()),
        None => {
            filters::record(c, name, &stream.filter, stream.cfg.chain_id, by).await?;
            cursor::set_filter(c, name, stream.fingerprint, stream.cfg.chain_id).await?;
            Ok(())
        }
        Some(theirs) => {
            if let Some(mine) = filters::get(c, name, stream.fingerprint).await? {
                let adopted = match filters::get(c, name, theirs).await? {
                    Some(t) => (
                        humantime::format_rfc3339_seconds(t.adopted_at).to_string(),
                        t.adopted_by,
                    ),
                    None => ("?".into(), "?".into()),
                };
                let _ = mine;
                return Err(TickError::FilterReplaced {
                    stream: name.to_string(),
                    adopted: adopted.0,
                    by: adopted.1,
                });
            }
            adopt(c, stream, row, by).await.map(|_| ())
        }
    }
}

/// Makes `stream`'s filter the one its cursor advances under, backfilling
/// what it adds to the recorded one over `[start_block, cursor]`. Returns
/// the backfill filters written. Runs in the caller's transaction, which
/// holds the row lock.
pub async fn adopt<C: GenericClient>(
    c: &C,
    stream: &Stream,
    row: &Cursor,
    by: &str,
) -> Result<Vec<LogFilter>, TickError> {
    let name = stream.cfg.name.as_str();
    let old = match row.fingerprint {
        Some(fp) if fp != stream.fingerprint => filters::get(c, name, fp).await?,
        _ => None,
    };
    let mut added = Vec::new();
    if let Some(old) = &old {
        if old.chain_id != stream.cfg.chain_id {
            return Err(TickError::OtherChain {
                stream: name.to_string(),
                recorded: old.chain_id,
                configured: stream.cfg.chain_id,
            });
        }
        added = stream.filter.added_since(&old.filter);
        let start = stream.cfg.start_block;
        if let Some(to) = row.processed.block().filter(|to| *to >= start.get()) {
            for f in &added {
                failed_ranges::record_backfill(
                    c,
                    name,
                    start.to_db(),
                    BlockNumber::saturating(to).to_db(),
                    f,
                    "the stream's filter changed: backfilling what it adds below the cursor",
                )
                .await?;
            }
            if !added.is_empty() {
                tracing::info!(
                    stream = name,
                    from = start.get(),
                    to,
                    filters = added.len(),
                    "adopted a changed filter; what it adds below the cursor is backfilled by the gap-fill worker"
                );
            }
        }
    }
    filters::record(c, name, &stream.filter, stream.cfg.chain_id, by).await?;
    cursor::set_filter(c, name, stream.fingerprint, stream.cfg.chain_id).await?;
    Ok(added)
}
