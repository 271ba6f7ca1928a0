//! Operator commands that change state: `logcursor rewind`,
//! `logcursor dlq list|show|replay|discard`, `logcursor gapfill
//! list|retry`, `logcursor adopt-filter`, and ([`delivery`]) `logcursor
//! outbox …` and `logcursor consumers …`. Each runs in one transaction,
//! under the stream's cursor lock where it touches what a tick writes, and
//! stores or removes events only through the write seam (so handlers run,
//! or revert, exactly once).
//!
//! Operator commands cannot store orphans (I2): `dlq replay` stores a
//! letter only after its block's header shows the hash it was parked under
//! (else it stays, saying why); `rewind --to N` refuses an N whose stored
//! hash is no longer canonical and names the newest safe N.

pub mod delivery;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::app::{AppError, HandlerMap};
use crate::chain::{ChainError, Endpoints};
use crate::config::{Config, StreamConfig};
use crate::poller::{filter, Stream};
use crate::store::dead_letters::{self, DeadLetter};
use crate::store::failed_ranges::{self, Range};
use crate::store::pool::{Database, TxLimits};
use crate::store::{cursor, reorg, rust_handlers, StoreError};
use crate::types::{Hash32, LogFilter, RawLog};
use crate::write::{Batch, Handlers, Row, Savepoints, WriteError};

/// What a rewind did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewound {
    pub stream: String,
    pub from: i64,
    pub to: i64,
    pub events_deleted: u64,
}

fn stream_cfg<'a>(cfg: &'a Config, stream: &str) -> Result<&'a StreamConfig, AppError> {
    cfg.streams
        .iter()
        .find(|s| s.name == stream)
        .ok_or_else(|| AppError::Stream {
            stream: stream.to_string(),
            reason: "no such stream in the configuration".into(),
        })
}

/// The stream as a tick would build it (its writer, its handlers).
fn stream_of(cfg: &Config, sc: &StreamConfig, handlers: &HandlerMap) -> Stream {
    let deadline = cfg.database.limits.handler_deadline();
    Stream::new(
        sc.clone(),
        &Endpoints::new(),
        None,
        Handlers {
            rust: handlers.get(sc.name.as_str()).cloned().unwrap_or_default(),
            // The CLI's transactions run with TxLimits::SHORT: the
            // configured deadline, within theirs.
            deadline: Some(deadline.min(TxLimits::SHORT.handler_deadline())),
            ..Handlers::default()
        },
    )
}

/// Moves `stream`'s cursor back to `to` in one transaction under the row
/// lock (the chain asked before it, with no transaction open): deletes the
/// stream's events above `to` (reverting their effects),
/// stores the canonical hash of block `to`, clears a halt, and audits it in
/// `cursor_rewinds`. Refuses to move the cursor forward (which would skip
/// blocks), and refuses a `to` whose stored hash (or that of a stored block
/// below it) is no longer canonical, naming the newest safe target.
pub async fn rewind(
    cfg: &Config,
    replica_id: &str,
    handlers: &HandlerMap,
    stream: &str,
    to: i64,
) -> Result<Rewound, AppError> {
    let bad = |reason: String| AppError::Stream {
        stream: stream.to_string(),
        reason,
    };
    let sc = stream_cfg(cfg, stream)?;
    let floor = sc.start_block.to_db() - 1;
    if to < floor {
        return Err(bad(format!("--to {to} is before start_block - 1 ({floor})")));
    }
    let s = stream_of(cfg, sc, handlers);
    let db = connect(cfg, replica_id).await?;
    let refuse_forward = |from: i64| {
        bad(format!(
            "the cursor is at {from}; rewind only moves it back (to a block below {from})"
        ))
    };
    // The chain is asked with no transaction open (a slow provider cannot
    // hold the cursor lock, nor outlast the session's idle bound): the
    // stored hashes at or below `to` are read, their canonical headers
    // fetched, and the same hashes are read again under the lock. Should
    // they differ (gap fill or another rewind committed meanwhile), the
    // check is made again. A Rust handler too slow to revert a page makes
    // the writer halve its pages: the rewind is tried again with them.
    let (mut checks, mut slow) = (0, 0);
    while checks < REWIND_CHECKS {
        checks += 1;
        let (from, stored) = {
            let mut client = db.get().await?;
            let tx = db.begin(&mut client, TxLimits::SHORT).await?;
            let from = cursor::get(&*tx, stream).await?.map(|r| r.cursor.processed.to_db());
            let stored = reorg::stored_hashes_at_or_below(&*tx, stream, to, sc.max_reorg_depth).await?;
            tx.commit().await.map_err(StoreError::db("read stored hashes"))?;
            (from, stored)
        };
        if let Some(from) = from.filter(|f| to >= *f) {
            return Err(refuse_forward(from));
        }
        let new_hash = match u64::try_from(to) {
            Ok(block) => Some(canonical_below(&s, stream, block, &stored).await?),
            Err(_) => None,
        };
        let mut client = db.get().await?;
        let tx = db.begin(&mut client, TxLimits::SHORT).await?;
        let current = cursor::lock(&*tx, stream, cursor::LockMode::Wait).await?;
        let from = current.processed.to_db();
        if to >= from {
            return Err(refuse_forward(from));
        }
        if reorg::stored_hashes_at_or_below(&*tx, stream, to, sc.max_reorg_depth).await? != stored {
            continue; // rolled back on drop: checked again
        }
        let reason = format!("operator rewind from {from} to {to}");
        let deleted = match s.writer.remove_above(&tx, to).await {
            Ok(n) => n,
            Err(WriteError::RevertTooSlow { events, reason, .. }) if events > 1 && slow < MAX_SLOW_REVERTS => {
                slow += 1;
                checks -= 1; // not a check of the chain: the same rewind, smaller pages
                tracing::info!(stream, %reason, "trying the rewind again");
                continue;
            }
            Err(e @ WriteError::HandlersMissing { .. }) => return Err(e.into()),
            Err(e) => return Err(bad(e.to_string())),
        };
        reorg::rewind(
            &*tx,
            stream,
            from,
            to,
            current.hash,
            new_hash.flatten(),
            &reason,
            replica_id,
            deleted,
        )
        .await?;
        tx.commit().await.map_err(StoreError::db("commit rewind"))?;
        db.close();
        tracing::info!(stream, from, to, events_deleted = deleted, "rewound cursor");
        return Ok(Rewound {
            stream: stream.to_string(),
            from,
            to,
            events_deleted: deleted,
        });
    }
    db.close();
    Err(bad(format!(
        "the stored blocks at or below {to} changed during each of {REWIND_CHECKS} checks (gap fill or another rewind at work); try again"
    )))
}

/// How many times a rewind checks the chain before it gives up on a stream
/// whose stored blocks keep changing under it.
const REWIND_CHECKS: usize = 3;

/// Halvings of the revert page a rewind tries (2,000 events down to one).
const MAX_SLOW_REVERTS: usize = 11;

/// The canonical hash of `block`, after checking that none of the `stored`
/// hashes (at or below it) was reorganised away; asked of the chain with no
/// transaction open.
async fn canonical_below(
    s: &Stream,
    stream: &str,
    block: u64,
    stored: &[(i64, Hash32)],
) -> Result<Option<Hash32>, AppError> {
    let mut numbers: Vec<u64> = stored.iter().filter_map(|(n, _)| u64::try_from(*n).ok()).collect();
    numbers.push(block);
    numbers.sort_unstable();
    numbers.dedup();
    let canonical = s
        .chain
        .pick()
        .canonical_headers(&numbers)
        .await
        .map_err(|source| AppError::Chain {
            stream: stream.to_string(),
            source: Box::new(source),
        })?;
    let orphaned = stored
        .iter()
        .filter(|(n, h)| canonical.iter().any(|c| c.number as i64 == *n && c.hash != *h))
        .map(|(n, _)| *n)
        .min();
    if let Some(lowest) = orphaned {
        return Err(AppError::Stream {
            stream: stream.to_string(),
            reason: format!(
                "block {lowest} (at or below --to {block}) was stored with a hash the chain no longer has; rewinding to {block} would keep orphaned events. The newest safe target is {}",
                lowest - 1
            ),
        });
    }
    Ok(canonical.iter().find(|h| h.number == block).map(|h| h.hash))
}

/// What `dlq replay` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Dead letters now stored in `events` (their handlers ran) and deleted.
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
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let rows = dead_letters::list(&*tx, stream, ids, false).await?;
    tx.commit().await.map_err(StoreError::db("read dead letters"))?;
    db.close();
    Ok(rows)
}

/// Replays dead letters (`ids`, or all when empty), each in its own
/// transaction: the letter's block must still be canonical (its header is
/// fetched: a letter whose block was reorganised away, or that the node
/// cannot confirm, stays); the log is fetched again when the node serves it
/// (else the parked copy is used), decoded with the current configuration,
/// and stored through the write seam — so its handlers run, once — and the
/// letter is deleted. One that still fails stays, with attempts + 1 and the
/// new error.
pub async fn dlq_replay(
    cfg: &Config,
    replica_id: &str,
    handlers: &HandlerMap,
    ids: &[i64],
) -> Result<Replayed, AppError> {
    let db = connect(cfg, replica_id).await?;
    let letters = {
        let mut client = db.get().await?;
        let tx = db.begin(&mut client, TxLimits::SHORT).await?;
        let rows = dead_letters::list(&*tx, None, ids, false).await?;
        tx.commit().await.map_err(StoreError::db("read dead letters"))?;
        rows
    };
    let mut report = Replayed::default();
    for dl in letters {
        let outcome = replay_one(cfg, &db, handlers, &dl).await?;
        match outcome {
            Ok(()) => report.stored.push(dl.id),
            Err(why) => {
                let mut client = db.get().await?;
                let tx = db.begin(&mut client, TxLimits::SHORT).await?;
                dead_letters::failed_again(&*tx, dl.id, &why).await?;
                tx.commit().await.map_err(StoreError::db("commit replay"))?;
                report.still_failing.push((dl.id, why));
            }
        }
    }
    db.close();
    Ok(report)
}

/// One letter: `Ok(Ok(()))` stored and deleted, `Ok(Err(why))` still failing.
async fn replay_one(
    cfg: &Config,
    db: &Database,
    handlers: &HandlerMap,
    dl: &DeadLetter,
) -> Result<Result<(), String>, AppError> {
    let Some(sc) = cfg.streams.iter().find(|s| s.name == dl.stream.as_str()) else {
        return Ok(Err(format!("stream {:?} is no longer configured", dl.stream)));
    };
    let stream = stream_of(cfg, sc, handlers);
    let (log, timestamp) = match canonical_log(&stream, &dl.log).await {
        Ok(found) => found,
        Err(why) => return Ok(Err(why)),
    };
    let decoded = match sc.events.decode(&log) {
        Ok(d) => d,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let row = Row::new(log, decoded.event_name, decoded.params, Some(timestamp));
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    // Serialized with the stream's ticks and rewinds by its cursor row: a
    // rewind that removed the letter's block since the check above took
    // the letter with it (nothing to replay); one that comes later waits,
    // and removes the replayed row with its block.
    cursor::lock(&*tx, &dl.stream, cursor::LockMode::Wait).await?;
    // The letter leaves first, so the seam does not skip it as parked; a
    // failure parks it again (attempts count on).
    if dead_letters::discard(&*tx, &[dl.id]).await? != 1 {
        return Ok(Err(
            "the dead letter is gone (a rewind removed its block, or another replay took it)".into(),
        ));
    }
    let written = stream
        .writer
        .write(
            &tx,
            &mut Savepoints::new(),
            Batch {
                rows: vec![row],
                undecodable: Vec::new(),
            },
        )
        .await?;
    if written.parked > 0 {
        // A handler (or the database) refused it again: keep the letter as
        // it was (rolled back), with the new error counted by the caller.
        let why = dead_letters::error_of(&*tx, &dl.log)
            .await?
            .unwrap_or_else(|| "still failing".into());
        drop(tx);
        return Ok(Err(why));
    }
    tx.commit().await.map_err(StoreError::db("commit replay"))?;
    Ok(Ok(()))
}

/// The log as the canonical chain has it, with its block's timestamp (as
/// a tick stores it), or why it cannot be replayed: the header of its
/// block must carry the hash it was parked under.
async fn canonical_log(stream: &Stream, stored: &RawLog) -> Result<(RawLog, u64), String> {
    let rpc = stream.chain.pick();
    let header = rpc
        .headers(&[stored.block_number])
        .await
        .map_err(|e| format!("cannot confirm block {} is canonical: {e}", stored.block_number))?
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| {
            format!(
                "cannot confirm block {} is canonical: the node does not have it",
                stored.block_number
            )
        })?;
    if header.hash != stored.block_hash {
        return Err(format!(
            "block {} is no longer canonical (parked under {}, the chain now has {}): refused",
            stored.block_number, stored.block_hash, header.hash
        ));
    }
    let log = match refetch(stream, stored).await {
        Ok(Some(fresh)) if fresh.block_hash == stored.block_hash => fresh,
        // The node does not serve it again: the parked copy, of a canonical block.
        _ => stored.clone(),
    };
    Ok((log, header.timestamp))
}

/// The log as the chain has it now, by (block, tx hash, log index).
async fn refetch(stream: &Stream, stored: &RawLog) -> Result<Option<RawLog>, ChainError> {
    let Some(topic0) = stored.topics.first() else {
        return Ok(None);
    };
    let filter = LogFilter {
        addresses: vec![stored.address],
        topic0s: vec![*topic0],
    };
    let got = stream
        .chain
        .pick()
        .get_logs(stored.block_number, stored.block_number, &filter)
        .await?;
    Ok(got
        .logs
        .into_iter()
        .find(|l| l.tx_hash == stored.tx_hash && l.log_index == stored.log_index))
}

/// Deletes dead letters for good; returns how many there were.
pub async fn dlq_discard(cfg: &Config, replica_id: &str, ids: &[i64]) -> Result<u64, AppError> {
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let n = dead_letters::discard(&*tx, ids).await?;
    tx.commit().await.map_err(StoreError::db("commit discard"))?;
    db.close();
    Ok(n)
}

/// Pending ranges (skipped and backfills), oldest first.
pub async fn gapfill_list(cfg: &Config, replica_id: &str, stream: Option<&str>) -> Result<Vec<Range>, AppError> {
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let rows = failed_ranges::list(&*tx, stream).await?;
    tx.commit().await.map_err(StoreError::db("read pending ranges"))?;
    db.close();
    Ok(rows)
}

/// Makes ranges due now with their attempts reset: `ids`, or every dead
/// range with `dead`. Returns how many.
pub async fn gapfill_retry(cfg: &Config, replica_id: &str, ids: &[i64], dead: bool) -> Result<u64, AppError> {
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let n = failed_ranges::retry_now(&*tx, ids, dead).await?;
    tx.commit().await.map_err(StoreError::db("commit retry"))?;
    db.close();
    Ok(n)
}

/// Makes this configuration's filter the one `stream`'s cursor advances
/// under (going back to a replaced filter is an operator's decision), and
/// backfills what it adds. Returns the backfill filters written.
pub async fn adopt_filter(cfg: &Config, replica_id: &str, stream: &str) -> Result<Vec<LogFilter>, AppError> {
    let sc = stream_cfg(cfg, stream)?;
    let s = Arc::new(stream_of(cfg, sc, &HandlerMap::new()));
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let current = cursor::lock(&*tx, stream, cursor::LockMode::Wait).await?;
    let added = filter::adopt(&*tx, &s, &current, replica_id)
        .await
        .map_err(|e| AppError::Stream {
            stream: stream.to_string(),
            reason: e.to_string(),
        })?;
    tx.commit().await.map_err(StoreError::db("commit filter adoption"))?;
    db.close();
    Ok(added)
}

/// Removes `names` from the Rust handlers `stream` records, so that a
/// program without them may write it again (see [`crate::write::guard`]):
/// for a handler retired on purpose. Serialized with the stream's ticks by
/// its cursor row. Returns the handlers still recorded; a name the stream
/// does not record is an error naming those it does.
pub async fn retire_handlers(
    cfg: &Config,
    replica_id: &str,
    stream: &str,
    names: &[String],
) -> Result<Vec<String>, AppError> {
    stream_cfg(cfg, stream)?;
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let (_, recorded) = cursor::lock_recorded(&*tx, stream, cursor::LockMode::Wait).await?;
    if let Some(unknown) = names.iter().find(|n| !recorded.contains(n)) {
        return Err(AppError::NotFound(format!(
            "stream {stream} records no Rust handler named {unknown:?} (it records {recorded:?}); nothing retired"
        )));
    }
    rust_handlers::retire(&*tx, stream, names).await?;
    tx.commit().await.map_err(StoreError::db("commit retire-handler"))?;
    db.close();
    tracing::warn!(stream, retired = ?names, "retired Rust handlers: events stored from now on may go without their effects");
    Ok(recorded.into_iter().filter(|r| !names.contains(r)).collect())
}

/// A pool to the configured database, once it answers (bounded retry).
pub(crate) async fn connect(cfg: &Config, replica_id: &str) -> Result<Database, AppError> {
    let db = Database::new(&cfg.database.settings, replica_id)?;
    db.wait_until_reachable(cfg.database.connect_retry_for, &CancellationToken::new())
        .await?;
    Ok(db)
}
