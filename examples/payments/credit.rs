//! The payments example's Rust handler: every `Burned(from, amount)` credits
//! `amount` to `from`'s row in `balances`, in the transaction that stores
//! the event (so exactly once, whatever replicas run or die); an account
//! that has no row yet fails its event, which logcursor parks in
//! `dead_letters` until `dlq replay`.
//!
//! Set-based: one statement per batch (sums per account, credited with one
//! `UPDATE … FROM`), not one per event, so a backfill of thousands of burns
//! costs one round trip per batch. The tests include this file too
//! (`tests/it/handlers.rs`), so they exercise the very code shipped here.

use logcursor::tokio_postgres::types::Type;
use logcursor::{Event, Handler, HandlerError, Transaction};

/// Credits burns to balances; debits them again when a rewind removes them.
pub struct Credit;

/// Credits the sums per account; returns the accounts that have no row.
const CREDIT: &str = "
WITH burn AS (
    SELECT account, sum(amount::numeric) AS amount
      FROM unnest($1::text[], $2::text[]) AS u(account, amount)
     GROUP BY account),
credited AS (
    UPDATE balances b SET amount = b.amount + burn.amount
      FROM burn WHERE b.account = burn.account
    RETURNING b.account)
SELECT account FROM burn WHERE account NOT IN (SELECT account FROM credited)";

/// Takes back what [`CREDIT`] gave.
const DEBIT: &str = "
UPDATE balances b SET amount = b.amount - burn.amount
  FROM (SELECT account, sum(amount::numeric) AS amount
          FROM unnest($1::text[], $2::text[]) AS u(account, amount)
         GROUP BY account) AS burn
 WHERE b.account = burn.account";

/// The burns of a batch: (index in the batch, account, amount).
fn burns(events: &[Event]) -> Result<Vec<(usize, &str, &str)>, HandlerError> {
    let mut out = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        if e.event_name != "Burned" {
            continue;
        }
        match (e.params["from"].as_str(), e.params["amount"].as_str()) {
            (Some(from), Some(amount)) => out.push((i, from, amount)),
            _ => {
                return Err(HandlerError::at(
                    i,
                    format!("a Burned event without from/amount: {}", e.params),
                ))
            }
        }
    }
    Ok(out)
}

fn columns<'a>(burns: &[(usize, &'a str, &'a str)]) -> (Vec<&'a str>, Vec<&'a str>) {
    burns.iter().map(|(_, account, amount)| (*account, *amount)).unzip()
}

#[logcursor::async_trait]
impl Handler for Credit {
    async fn handle(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
        let burns = burns(events)?;
        if burns.is_empty() {
            return Ok(());
        }
        let (accounts, amounts) = columns(&burns);
        let unknown = tx
            .query_typed(CREDIT, &[(&accounts, Type::TEXT_ARRAY), (&amounts, Type::TEXT_ARRAY)])
            .await?;
        if let Some(row) = unknown.first() {
            // One event at a time: logcursor parks it and hands the rest of
            // the batch back (the credits above roll back with it).
            let account: &str = row.get(0);
            let first = burns.iter().find(|b| b.1 == account).map_or(0, |b| b.0);
            return Err(HandlerError::at(first, format!("unknown account {account}")));
        }
        Ok(())
    }

    async fn revert(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
        let burns = burns(events)?;
        if !burns.is_empty() {
            let (accounts, amounts) = columns(&burns);
            tx.execute_typed(DEBIT, &[(&accounts, Type::TEXT_ARRAY), (&amounts, Type::TEXT_ARRAY)])
                .await?;
        }
        Ok(())
    }
}
