//! The effects a stream's batches carry into the transaction that stores
//! them: Rust [`Handler`]s registered by an embedding application, and a
//! configured set-based SQL function.

use std::sync::Arc;
use std::time::Duration;

pub use crate::store::events::StoredEvent as Event;

/// The transaction a handler runs in: the tick's (or gap fill's, or a
/// replay's), inside a savepoint of the write seam. Whatever the handler
/// writes through it commits with the events and the cursor, or not at all.
pub type Transaction<'a> = tokio_postgres::Transaction<'a>;

/// A user's effect, run exactly once per newly stored event, atomically
/// with it (I10).
///
/// `handle` receives the tick's transaction and the batch of events that
/// this write stored for the first time (never a duplicate), in block and
/// log order, for blocks at or below the safe head. `revert` receives the
/// events a rewind removes (a reorg deeper than the safe head, or an
/// operator's `logcursor rewind`), in the rewind's transaction.
///
/// An error parks events in `dead_letters` instead of stopping the stream
/// (`on_handler_error = "dead_letter"`, the default): the event the error
/// names ([`HandlerError::at`]), or, when it names none, the failing event
/// found by retrying halves of the batch. The rest of the batch commits.
/// `dlq replay` runs the handler again for a parked event, once. An error
/// that is not the events' fault ([`HandlerError::retry`], or a
/// `tokio_postgres::Error` such as a lock timeout) rolls the tick back to
/// be retried, parking nothing.
///
/// What a handler may rely on, and must respect:
/// - it runs after the stream's SQL `handler_function`, in registration
///   order with the stream's other handlers, inside a savepoint: it must
///   not commit, roll back or take savepoints of its own;
/// - it holds the stream's cursor lock: keep it short and off the network
///   (record what to deliver in a table, and deliver from there);
/// - batches come in cursor order, except that gap fill stores older
///   ranges later and a replayed event comes after those that followed it:
///   effects commutative per key (credits, counters) need nothing more.
///
/// ```
/// use logcursor::{Event, Handler, HandlerError, Transaction};
///
/// /// Credits `amount` to `from` for every Burned event.
/// struct Credit;
///
/// #[logcursor::async_trait]
/// impl Handler for Credit {
///     async fn handle(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
///         for (i, e) in events.iter().enumerate() {
///             let account = e.params["from"].as_str().unwrap_or_default();
///             let amount = e.params["amount"].as_str().unwrap_or("0");
///             let credited = tx
///                 .execute(
///                     "UPDATE balances SET amount = amount + $2::text::numeric WHERE account = $1",
///                     &[&account, &amount],
///                 )
///                 .await?;
///             if credited == 0 {
///                 return Err(HandlerError::at(i, format!("unknown account {account}")));
///             }
///         }
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Applies the effect of `events`, newly stored in `tx`.
    async fn handle(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError>;

    /// Undoes the effect of `events`, which a rewind removes in `tx` (in
    /// block and log order, in pages of up to 2,000: called once per page).
    /// An error fails the rewind: nothing is removed. The default does
    /// nothing.
    async fn revert(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
        let _ = (tx, events);
        Ok(())
    }

    /// The name the stream records this handler under: once a stream's
    /// events were written with it, a program that does not run a handler
    /// of this name refuses to write the stream (see
    /// [`guard`](super::guard)). The default is the type's name without its
    /// module path (`Credit` for `my_app::credit::Credit`); override it to
    /// keep the name when the type is renamed.
    fn name(&self) -> String {
        short_type_name(std::any::type_name::<Self>())
    }
}

/// `a::b::C<d::E>` → `C<E>`: every path in a type's name without its modules.
fn short_type_name(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    let mut segment = String::new();
    for ch in full.chars() {
        if ch.is_alphanumeric() || ch == '_' || ch == ':' {
            segment.push(ch);
        } else {
            out.push_str(segment.rsplit("::").next().unwrap_or_default());
            segment.clear();
            out.push(ch);
        }
    }
    out.push_str(segment.rsplit("::").next().unwrap_or_default());
    out
}

/// Why a handler failed: on which event if it knows, and whether the events
/// are at fault at all.
///
/// - [`HandlerError::at`]: the event at this index of the batch cannot be
///   handled (an unknown account): it is parked, the rest of the batch is
///   handled again without it.
/// - [`HandlerError::batch`]: some event of the batch cannot be handled;
///   the seam finds which by handling halves of the batch again.
/// - [`HandlerError::retry`]: nothing is wrong with the events (a lock
///   timeout, a lost connection, a service the handler depends on is
///   down): the whole transaction rolls back, nothing is parked, and the
///   tick is tried again with backoff.
///
/// A `tokio_postgres::Error` converts (`?`) by its SQLSTATE, as the seam
/// classifies errors of triggers and SQL functions: classes that concern a
/// row (data exceptions, constraint violations, an exception `RAISE`d by
/// code, …) are [`batch`](HandlerError::batch) errors; the others (lock
/// and statement timeouts, deadlocks, serialization failures, a lost
/// connection, and class 42: a missing grant, table or function) are
/// [`retry`](HandlerError::retry) errors. A handler that means to refuse
/// one event says so ([`HandlerError::at`], or `RAISE` in SQL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// Index into the batch of the event that failed, when known.
    pub event: Option<usize>,
    pub message: String,
    /// The events are not at fault: retry the transaction, park nothing.
    pub transient: bool,
}

impl HandlerError {
    /// The event at `index` of the batch cannot be handled.
    pub fn at(index: usize, message: impl Into<String>) -> HandlerError {
        HandlerError {
            event: Some(index),
            message: message.into(),
            transient: false,
        }
    }

    /// The batch failed; which event is found by retrying parts of it.
    pub fn batch(message: impl Into<String>) -> HandlerError {
        HandlerError {
            event: None,
            message: message.into(),
            transient: false,
        }
    }

    /// Not the events' fault: the transaction rolls back and is retried.
    pub fn retry(message: impl Into<String>) -> HandlerError {
        HandlerError {
            event: None,
            message: message.into(),
            transient: true,
        }
    }
}

impl From<tokio_postgres::Error> for HandlerError {
    fn from(e: tokio_postgres::Error) -> Self {
        let per_row = e.code().is_some_and(|c| crate::store::is_per_row_sqlstate(c.code()));
        let message = crate::store::describe_pg(&e);
        if per_row {
            HandlerError::batch(message)
        } else {
            HandlerError::retry(message)
        }
    }
}

/// The handlers of one stream.
#[derive(Clone, Default)]
pub struct Handlers {
    pub rust: Vec<Arc<dyn Handler>>,
    /// The longest one call of a Rust handler may take
    /// ([`TxLimits::handler_deadline`](crate::store::pool::TxLimits::handler_deadline)
    /// of the transaction it runs in: its `statement_timeout`, the bound the
    /// SQL `handler_function` has as one statement, within two thirds of
    /// its idle bound). Past it the
    /// call is abandoned and its savepoint rolled back; the seam tries
    /// halves of the batch, and a single event that still takes too long
    /// rolls the transaction back as for [`HandlerError::retry`]: a handler
    /// awaiting something that never comes cannot hold the cursor lock and a
    /// tick permit forever, and a slow one still gets through, in smaller
    /// batches. `None`: unbounded.
    pub deadline: Option<Duration>,
    /// A SQL function `f(batch events[])` called once per batch of new rows.
    pub sql: Option<String>,
    /// A SQL function `f(batch events[])` called with the rows a rewind removes.
    pub sql_revert: Option<String>,
}

impl Handlers {
    /// The names of the Rust handlers, sorted, each once.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.rust.iter().map(|h| h.name()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether any effect runs on a write (then new rows need their ids).
    pub fn any(&self) -> bool {
        !self.rust.is_empty() || self.sql.is_some()
    }

    /// One handler call, within [`Handlers::deadline`]: `Err(deadline)`
    /// when it passed (the call is dropped).
    pub(crate) async fn bounded<T>(&self, call: impl std::future::Future<Output = T>) -> Result<T, Duration> {
        match self.deadline {
            None => Ok(call.await),
            Some(deadline) => tokio::time::timeout(deadline, call).await.map_err(|_| deadline),
        }
    }
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers")
            .field("rust", &self.rust.len())
            .field("sql", &self.sql)
            .field("sql_revert", &self.sql_revert)
            .field("deadline", &self.deadline)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::short_type_name;

    #[test]
    fn a_handler_is_named_by_its_type_without_module_paths() {
        assert_eq!(short_type_name("payments::credit::Credit"), "Credit");
        assert_eq!(short_type_name("Credit"), "Credit");
        assert_eq!(
            short_type_name("app::Retry<app::fx::Credit, alloc::vec::Vec<u8>>"),
            "Retry<Credit, Vec<u8>>"
        );
    }
}
