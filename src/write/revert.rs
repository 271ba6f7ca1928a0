//! The rewind side of the write seam: [`Writer::remove_above`] undoes the
//! effects of the events a rewind removes, then deletes them, in the
//! rewind's transaction (I10): the stream's SQL `revert_function`, every
//! Rust handler's `revert`, and row triggers `AFTER DELETE` (which fire on
//! the delete itself); for a stream with webhooks, a `revert` delivery of
//! the removed events that were delivered (those never sent are dropped
//! from their pending deliveries); and, for SQL consumers, a copy of every
//! removed event, which each resolves against its position
//! ([`consumers::keep_removed`]).
//!
//! A rewind may remove any number of events (an operator's `rewind --to`
//! far back): they are reverted in pages of at most [`REVERT_PAGE`], in
//! block and log order, so that neither logcursor nor the server holds them
//! all at once. A Rust handler that does not revert a page within its
//! deadline fails the rewind (nothing is removed) and halves the pages of
//! the next attempt, down to one event: a slow `revert` still gets through.

use std::sync::atomic::Ordering;

use tokio_postgres::types::Type;

use super::{handler, WriteError, Writer};
use crate::store::{consumers, events, failed_ranges, outbox};

/// Events reverted per call of a revert function or handler.
pub const REVERT_PAGE: i64 = 2_000;

impl Writer {
    /// Removes the stream's events above block `to` in `tx`, reverting
    /// their effects first (see the module doc). Returns how many were
    /// removed.
    pub async fn remove_above(&self, tx: &handler::Transaction<'_>, to: i64) -> Result<u64, WriteError> {
        // Never remove events without the effects' undo (see super::guard).
        super::guard::check(tx, &self.stream, &self.handlers, super::guard::Mode::Record).await?;
        // First, so that a gap-fill worker filling above `to` loses its
        // claim before the events go: it then cannot commit the orphaned
        // branch (its commit waits for this row and finds the claim gone),
        // or it committed before, and the delete below sees its rows.
        failed_ranges::forget_above(tx, &self.stream, to).await?;
        consumers::keep_removed(tx, &self.stream, to).await?;
        if self.handlers.sql_revert.is_some() || !self.handlers.rust.is_empty() || !self.webhooks.is_empty() {
            self.revert_above(tx, to).await?;
        }
        Ok(events::delete_above(tx, &self.stream, to).await?)
    }

    /// Reverts the effects of the stream's events above `to`, page by page.
    async fn revert_above(&self, tx: &handler::Transaction<'_>, to: i64) -> Result<(), WriteError> {
        let page_size = self.revert_page.load(Ordering::Relaxed).clamp(1, REVERT_PAGE);
        let mut after = None;
        loop {
            let page = events::above(tx, &self.stream, to, after, page_size).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = Some((last.block_number, last.log_index));
            if !self.webhooks.is_empty() {
                let ids: Vec<i64> = page.iter().map(|e| e.id).collect();
                outbox::revert(tx, &self.stream, &ids).await?;
            }
            if let Some(function) = &self.handlers.sql_revert {
                let ids: Vec<i64> = page.iter().map(|e| e.id).collect();
                let reverted = tx
                    .execute_typed(
                        "SELECT logcursor_handle($1, $2)",
                        &[(function, Type::TEXT), (&ids, Type::INT8_ARRAY)],
                    )
                    .await;
                if let Err(e) = reverted {
                    let reason = crate::store::describe_pg(&e);
                    // 57014: past statement_timeout, a page too large for it.
                    return Err(match e.code().map(|c| c.code()) {
                        Some("57014") => self.slow_revert(page.len(), reason),
                        _ => WriteError::Revert {
                            stream: self.stream.to_string(),
                            reason,
                        },
                    });
                }
            }
            for h in &self.handlers.rust {
                match self.handlers.bounded(h.revert(tx, &page)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        return Err(WriteError::Revert {
                            stream: self.stream.to_string(),
                            reason: e.message,
                        })
                    }
                    Err(deadline) => {
                        let reason = format!(
                            "a handler did not revert {} events within {deadline:?} (its deadline)",
                            page.len()
                        );
                        return Err(self.slow_revert(page.len(), reason));
                    }
                }
            }
            if (page.len() as i64) < page_size {
                // Through: pages grow back towards REVERT_PAGE.
                let grown = page_size.saturating_mul(2).min(REVERT_PAGE);
                self.revert_page.store(grown, Ordering::Relaxed);
                return Ok(());
            }
        }
    }

    /// A page of `events` too slow to revert: the next attempt uses pages of
    /// half as many.
    fn slow_revert(&self, events: usize, reason: String) -> WriteError {
        let half = (events / 2).max(1);
        self.revert_page
            .store(i64::try_from(half).unwrap_or(1), Ordering::Relaxed);
        WriteError::RevertTooSlow {
            stream: self.stream.to_string(),
            events,
            reason: format!("{reason}; the next attempt reverts pages of {half}"),
        }
    }
}
