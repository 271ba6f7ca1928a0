//! Operator commands that change state: `logcursor rewind`.

use tokio_util::sync::CancellationToken;

use crate::app::AppError;
use crate::chain::ChainClient;
use crate::config::Config;
use crate::store::pool::Database;
use crate::store::{cursor, reorg, StoreError};

/// What a rewind did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewound {
    pub stream: String,
    pub from: i64,
    pub to: i64,
    pub events_deleted: u64,
}

/// Moves `stream`'s cursor back to `to` in one transaction under the row
/// lock: deletes the stream's events above `to`, stores the canonical hash
/// of block `to` (so the next tick's reorg check passes), clears a halt, and
/// audits it in `cursor_rewinds`. Refuses to move the cursor forward, which
/// would skip blocks.
pub async fn rewind(cfg: &Config, replica_id: &str, stream: &str, to: i64) -> Result<Rewound, AppError> {
    let bad = |reason: String| AppError::Stream {
        stream: stream.to_string(),
        reason,
    };
    let sc = cfg
        .streams
        .iter()
        .find(|s| s.name == stream)
        .ok_or_else(|| bad("no such stream in the configuration".into()))?;
    let floor = i64::try_from(sc.start_block).unwrap_or(i64::MAX) - 1;
    if to < floor {
        return Err(bad(format!("--to {to} is before start_block - 1 ({floor})")));
    }
    let new_hash = match u64::try_from(to) {
        Ok(block) => {
            let chain =
                ChainClient::new(&sc.rpc, crate::poller::client_options(sc)).map_err(|source| AppError::Chain {
                    stream: stream.to_string(),
                    source,
                })?;
            let headers = chain.pick().headers(&[block]).await.map_err(|source| AppError::Chain {
                stream: stream.to_string(),
                source,
            })?;
            headers.into_iter().next().flatten().map(|h| h.hash)
        }
        Err(_) => None,
    };
    let db = Database::new(&cfg.database, replica_id)?;
    db.wait_until_reachable(cfg.database.connect_retry_for, &CancellationToken::new())
        .await?;
    let mut client = db.get().await?;
    let tx = client.transaction().await.map_err(StoreError::db("begin rewind"))?;
    let current = cursor::lock(&*tx, stream).await?;
    let from = current.last_processed_block;
    if to >= from {
        return Err(bad(format!(
            "the cursor is at {from}; rewind only moves it back (to a block below {from})"
        )));
    }
    let reason = format!("operator rewind from {from} to {to}");
    let deleted = reorg::rewind(
        &*tx,
        stream,
        from,
        to,
        current.last_block_hash,
        new_hash,
        &reason,
        replica_id,
    )
    .await?;
    tx.commit().await.map_err(StoreError::db("commit rewind"))?;
    db.close();
    tracing::info!(stream, from, to, events_deleted = deleted, "rewound cursor");
    Ok(Rewound {
        stream: stream.to_string(),
        from,
        to,
        events_deleted: deleted,
    })
}
