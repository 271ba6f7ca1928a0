//! `logcursor outbox list|replay|discard` and `logcursor consumers list|reset`.

use super::connect;
use crate::app::AppError;
use crate::config::Config;
use crate::store::consumers::{self, Consumer, Target};
use crate::store::outbox::{self, Row};
use crate::store::pool::TxLimits;
use crate::store::StoreError;

/// Deliveries, newest first (of one webhook and/or status).
pub async fn outbox_list(
    cfg: &Config,
    replica_id: &str,
    webhook: Option<&str>,
    status: Option<&str>,
) -> Result<Vec<Row>, AppError> {
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let rows = outbox::list(&*tx, webhook, status).await?;
    tx.commit().await.map_err(StoreError::db("read outbox"))?;
    db.close();
    Ok(rows)
}

/// Dead deliveries (`ids`, or all when empty) are sent again: same
/// delivery id, same body; not those whose events a rewind removed.
pub async fn outbox_replay(cfg: &Config, replica_id: &str, ids: &[i64]) -> Result<outbox::Replayed, AppError> {
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let n = outbox::replay(&*tx, ids).await?;
    tx.commit().await.map_err(StoreError::db("commit outbox replay"))?;
    db.close();
    Ok(n)
}

/// Deletes deliveries for good. Returns how many.
pub async fn outbox_discard(cfg: &Config, replica_id: &str, ids: &[i64]) -> Result<u64, AppError> {
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let n = outbox::discard(&*tx, ids).await?;
    tx.commit().await.map_err(StoreError::db("commit outbox discard"))?;
    db.close();
    Ok(n)
}

/// Every consumer with its position and lag.
pub async fn consumers_list(cfg: &Config, replica_id: &str) -> Result<Vec<Consumer>, AppError> {
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let rows = consumers::list(&*tx, consumers::LAG_CAP).await?;
    tx.commit().await.map_err(StoreError::db("read consumers"))?;
    db.close();
    Ok(rows)
}

/// Moves consumer `name` to `to`; returns its new position.
pub async fn consumers_reset(cfg: &Config, replica_id: &str, name: &str, to: &Target) -> Result<String, AppError> {
    let db = connect(cfg, replica_id).await?;
    let mut client = db.get().await?;
    // Waits for a claim in flight (the consumer's row lock) to finish.
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let at = consumers::reset(&*tx, name, to).await?;
    tx.commit().await.map_err(StoreError::db("commit consumer reset"))?;
    db.close();
    at.ok_or_else(|| AppError::NotFound(format!("no consumer named {name:?}")))
}
