//! Operator commands that change state: `logcursor rewind` and
//! `logcursor dlq list|show|replay|discard`.

use tokio_util::sync::CancellationToken;

use crate::app::AppError;
use crate::chain::abi::EventSet;
use crate::chain::{ChainClient, ChainError, LogFilter, RawLog};
use crate::config::{Config, StreamConfig};
use crate::poller::decode_log;
use crate::store::dead_letters::{self, DeadLetter};
use crate::store::events::{self, NewEvent};
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

/// What `dlq replay` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Dead letters that now decode: stored in `events` and deleted.
    pub stored: Vec<i64>,
    /// Dead letters that still fail, with the new error (attempts + 1).
    pub still_failing: Vec<(i64, String)>,
}

/// Dead letters, oldest first (of one stream, or all).
pub async fn dlq_list(
    cfg: &Config,
    replica_id: &str,
    stream: Option<&str>,
    ids: &[i64],
) -> Result<Vec<DeadLetter>, AppError> {
    let db = connect(cfg, replica_id).await?;
    let client = db.get().await?;
    let rows = dead_letters::list(&**client, stream, ids, false).await?;
    db.close();
    Ok(rows)
}

/// Replays dead letters (`ids`, or all when empty): each is fetched again
/// from the chain (falling back to the stored copy when the node cannot
/// serve it) and decoded with the current configuration; one that decodes
/// is stored in `events` (idempotently) and deleted, one that does not
/// stays with attempts + 1 and the new error — all in one transaction.
pub async fn dlq_replay(cfg: &Config, replica_id: &str, ids: &[i64]) -> Result<Replayed, AppError> {
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = client.transaction().await.map_err(StoreError::db("begin replay"))?;
    let letters = dead_letters::list(&*tx, None, ids, true).await?;
    let mut report = Replayed::default();
    for dl in letters {
        match replay_one(cfg, &dl).await {
            Ok((stream, chain_id, event)) => {
                events::insert(&*tx, &stream, chain_id, &[event]).await?;
                dead_letters::discard(&*tx, &[dl.id]).await?;
                report.stored.push(dl.id);
            }
            Err(why) => {
                dead_letters::failed_again(&*tx, dl.id, &why).await?;
                report.still_failing.push((dl.id, why));
            }
        }
    }
    tx.commit().await.map_err(StoreError::db("commit replay"))?;
    db.close();
    Ok(report)
}

/// Deletes dead letters for good; returns how many there were.
pub async fn dlq_discard(cfg: &Config, replica_id: &str, ids: &[i64]) -> Result<u64, AppError> {
    let db = connect(cfg, replica_id).await?;
    let client = db.get().await?;
    let n = dead_letters::discard(&**client, ids).await?;
    db.close();
    Ok(n)
}

/// The row a dead letter becomes now, or why it still cannot.
async fn replay_one(cfg: &Config, dl: &DeadLetter) -> Result<(String, u64, NewEvent), String> {
    let sc = cfg
        .streams
        .iter()
        .find(|s| s.name == dl.stream)
        .ok_or_else(|| format!("stream {:?} is no longer configured", dl.stream))?;
    let set = EventSet::parse(&sc.events).map_err(|e| format!("{e:?}"))?;
    let log = match refetch(sc, &dl.log).await {
        Ok(Some(fresh)) if fresh.block_hash == dl.log.block_hash => fresh,
        Ok(Some(_)) => {
            return Err(format!(
                "block {} is no longer canonical (reorged)",
                dl.log.block_number
            ))
        }
        // The node does not have it (or cannot answer): decode the stored copy.
        Ok(None) | Err(_) => dl.log.clone(),
    };
    let event = decode_log(&set, &log).map_err(|e| e.to_string())?;
    Ok((sc.name.clone(), sc.chain_id, event))
}

/// The log as the chain has it now, by (block, tx hash, log index).
async fn refetch(sc: &StreamConfig, stored: &RawLog) -> Result<Option<RawLog>, ChainError> {
    let Some(topic0) = stored.topics.first() else {
        return Ok(None);
    };
    let chain = ChainClient::new(&sc.rpc, crate::poller::client_options(sc))?;
    let filter = LogFilter {
        addresses: vec![stored.address],
        topic0s: vec![*topic0],
    };
    let (logs, _) = chain
        .pick()
        .get_logs(stored.block_number, stored.block_number, &filter)
        .await?;
    Ok(logs
        .into_iter()
        .find(|l| l.tx_hash == stored.tx_hash && l.log_index == stored.log_index))
}

/// A pool to the configured database, once it answers (bounded retry).
pub(crate) async fn connect(cfg: &Config, replica_id: &str) -> Result<Database, AppError> {
    let db = Database::new(&cfg.database, replica_id)?;
    db.wait_until_reachable(cfg.database.connect_retry_for, &CancellationToken::new())
        .await?;
    Ok(db)
}
