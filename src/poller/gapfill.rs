//! The gap-fill worker: fetches the ranges that `skip_and_backfill`
//! streams skipped (`failed_ranges`), on every replica at once.
//!
//! Each pass claims one due row (`FOR UPDATE SKIP LOCKED`, a lease from the
//! database clock: see [`crate::store::failed_ranges`]), and in one
//! transaction fetches, stores and checks the range exactly as a tick would
//! ([`super::parts`]: events stored idempotently, what does not decode
//! parked, block hashes checked), then deletes the row — only if the lease
//! is still its own. A
//! failure releases the row with an exponential, capped backoff; after
//! `gapfill_max_attempts` it is marked dead and shown by `status`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::parts::{self, Parts, Stored};
use super::{Stream, TickError};
use crate::config::UnfetchablePolicy;
use crate::store::failed_ranges::{self, Claim};
use crate::store::pool::Database;
use crate::store::StoreError;

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapOutcome {
    /// Nothing was due.
    Idle,
    /// The range is stored and its row deleted.
    Filled {
        id: i64,
        stream: String,
        from: i64,
        to: i64,
        inserted: u64,
    },
    /// The attempt failed; the row waits for its next attempt (or is dead).
    Failed { id: i64, error: String, dead: bool },
    /// The lease ran out before the commit; the work was rolled back.
    LeaseLost { id: i64 },
}

/// One replica's gap-fill worker.
pub struct GapFiller {
    /// The streams whose skipped ranges this worker fills.
    streams: Vec<Arc<Stream>>,
    db: Database,
    /// Written to `failed_ranges.claimed_by`.
    replica_id: String,
}

impl GapFiller {
    /// A worker for the `skip_and_backfill` streams among `streams`, if any.
    pub fn new(streams: &[Arc<Stream>], db: Database, replica_id: String) -> Option<GapFiller> {
        let streams: Vec<Arc<Stream>> = streams
            .iter()
            .filter(|s| s.cfg.on_unfetchable_range == UnfetchablePolicy::SkipAndBackfill)
            .cloned()
            .collect();
        (!streams.is_empty()).then_some(GapFiller {
            streams,
            db,
            replica_id,
        })
    }

    /// Works until `cancel` fires: at once while rows are due, else every
    /// poll interval.
    pub async fn run(&self, cancel: CancellationToken) {
        let idle_wait = self
            .streams
            .iter()
            .map(|s| s.cfg.poll_interval)
            .min()
            .unwrap_or(Duration::from_secs(1));
        let mut failures = 0u32;
        while !cancel.is_cancelled() {
            let wait = match self.work_once().await {
                Ok(GapOutcome::Idle) => idle_wait,
                Ok(outcome) => {
                    failures = 0;
                    tracing::info!(?outcome, "gap-fill");
                    Duration::ZERO
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "gap-fill pass failed");
                    super::backoff(failures)
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => break,
                }
            }
        }
    }

    /// Claims and works one due range.
    pub async fn work_once(&self) -> Result<GapOutcome, TickError> {
        let names: Vec<String> = self.streams.iter().map(|s| s.cfg.name.clone()).collect();
        let lease = self
            .streams
            .iter()
            .map(|s| s.cfg.gapfill.lease)
            .max()
            .unwrap_or(Duration::from_secs(60));
        let client = self.db.get().await?;
        let Some(claim) = failed_ranges::claim(&**client, &names, &self.replica_id, lease).await? else {
            return Ok(GapOutcome::Idle);
        };
        drop(client);
        let Some(stream) = self.streams.iter().find(|s| s.cfg.name == claim.stream) else {
            return Ok(GapOutcome::Idle);
        };
        match self.fill(stream, &claim).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                let g = &stream.cfg.gapfill;
                let client = self.db.get().await?;
                let error = e.to_string();
                let dead =
                    failed_ranges::retry_later(&**client, claim.id, &error, g.backoff, g.backoff_max, g.max_attempts)
                        .await?;
                if dead {
                    tracing::error!(stream = %claim.stream, from = claim.from_block, to = claim.to_block, %error, "failed range is dead after gapfill_max_attempts");
                }
                Ok(GapOutcome::Failed {
                    id: claim.id,
                    error,
                    dead,
                })
            }
        }
    }

    async fn fill(&self, stream: &Arc<Stream>, claim: &Claim) -> Result<GapOutcome, TickError> {
        let (from, to) = (
            u64::try_from(claim.from_block).unwrap_or(0),
            u64::try_from(claim.to_block).unwrap_or(0),
        );
        let rpc = stream.chain.pick();
        let mut parts = Parts::spawn(Arc::clone(stream), rpc.index(), from, to);
        let mut client = self.db.get().await?;
        let tx = client.transaction().await.map_err(StoreError::db("begin gap-fill"))?;
        let mut stored = Stored::default();
        while let Some(part) = parts.next().await {
            stored.store(&*tx, stream, part?).await?;
        }
        if stored.short {
            let block = stored.to.map_or(from, |t| t + 1);
            return Err(rpc
                .error(
                    "eth_getLogs",
                    crate::chain::ChainErrorKind::BlockTooLarge {
                        block,
                        provider_message: "a single block overflows the provider".into(),
                    },
                )
                .into());
        }
        parts::verify(&rpc, &stored.blocks, to).await?;
        if !failed_ranges::complete(&*tx, claim.id, &self.replica_id).await? {
            // Dropping `tx` rolls the inserts back; the new claimer redoes them.
            return Ok(GapOutcome::LeaseLost { id: claim.id });
        }
        tx.commit().await.map_err(StoreError::db("commit gap-fill"))?;
        Ok(GapOutcome::Filled {
            id: claim.id,
            stream: claim.stream.clone(),
            from: claim.from_block,
            to: claim.to_block,
            inserted: stored.inserted,
        })
    }
}
