//! I10 across programs: a stream's events are written only by a program
//! that runs every Rust handler they have been written with.
//!
//! Rust handlers live in an application's binary, not in the database or
//! the configuration: the stock `logcursor` binary, or an older build of
//! the application, would store, replay or rewind events without the
//! effects those handlers give them, silently. So the stream's cursor row
//! records the handlers its events have been written with
//! (`block_cursors.rust_handlers`), and every transaction that stores or
//! removes events checks it before it writes any:
//! - a recorded handler this program does not run: nothing is written
//!   ([`WriteError::HandlersMissing`]; the tick rolls back and the stream
//!   reports itself stuck, gap fill retries without giving the range up,
//!   the command fails, and the program refuses to start, naming them);
//! - a handler this program runs and the record lacks: added to the record
//!   (at start-up, or by a later transaction that writes), so that from
//!   then on a program without it refuses;
//! - a handler retired on purpose leaves the record only by an operator's
//!   `logcursor retire-handler`.
//!
//! Races. Ticks, rewinds, `dlq replay`, start-up and `retire-handler` read
//! and change the record under the stream's cursor row lock
//! ([`Mode::Record`]), so they see each other's changes. Gap fill does not
//! hold that lock: it reads the record under a shared advisory lock of the
//! stream ([`Mode::Check`]), and adding a handler to the record needs that
//! lock exclusively. Adding never waits for it (a transaction that cannot
//! take it at once leaves the handler for a later one), so no lock wait of
//! a tick or a start-up comes from here; a gap fill that checked commits
//! before a handler is added, or reads the record that holds it. (Removing
//! a handler, by `retire-handler`, only lets more programs write.)
//!
//! A handler is known by [`Handler::name`](super::Handler::name); two
//! handlers of one stream may not share a name ([`duplicate_name`]).

use tokio_postgres::types::Type;

use std::sync::Arc;

use super::{Handler, Handlers, WriteError};
use crate::store::{rust_handlers, GenericClient, StoreError};

/// How the caller holds the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Under the stream's cursor row lock: record handlers new to it (when
    /// the exclusive advisory lock is free at once).
    Record,
    /// Without the row lock, before writing (gap fill): check only, under
    /// the shared advisory lock, which holds back additions until commit.
    Check,
    /// Writing nothing (start-up while another replica holds the row):
    /// check only, taking no lock.
    ReadOnly,
}

/// The check of the module doc, in `c`'s transaction: `Ok` when this
/// program may write `stream`.
pub async fn check<C: GenericClient>(c: &C, stream: &str, handlers: &Handlers, mode: Mode) -> Result<(), WriteError> {
    if mode == Mode::Check {
        advisory(c, stream, "pg_advisory_xact_lock_shared").await?;
    }
    match rust_handlers::recorded(c, stream).await? {
        Some(recorded) => check_recorded(c, stream, handlers, mode, &recorded).await,
        None => Ok(()), // no cursor row: nothing was written yet
    }
}

/// [`check`] against `recorded`, the record as the caller read it under
/// the row lock ([`cursor::lock_recorded`](crate::store::cursor::lock_recorded)):
/// the tick's way, which reads the row once.
pub async fn check_recorded<C: GenericClient>(
    c: &C,
    stream: &str,
    handlers: &Handlers,
    mode: Mode,
    recorded: &[String],
) -> Result<(), WriteError> {
    let running = handlers.names();
    let missing: Vec<String> = recorded.iter().filter(|r| !running.contains(r)).cloned().collect();
    if !missing.is_empty() {
        return Err(WriteError::HandlersMissing {
            stream: stream.to_string(),
            missing,
            running,
        });
    }
    if mode == Mode::Record && running.iter().any(|n| !recorded.contains(n)) {
        if advisory(c, stream, "pg_try_advisory_xact_lock").await? {
            rust_handlers::record(c, stream, &running).await?;
            tracing::info!(stream, handlers = ?running, "recorded the stream's Rust handlers: a program without them will refuse to write it");
        } else {
            tracing::debug!(
                stream,
                "a gap fill is checking the handler record: recording in a later transaction"
            );
        }
    }
    Ok(())
}

/// Takes the stream's handler-record advisory lock for the transaction
/// (`function`: the shared lock, or a try of the exclusive one); whether
/// it is held.
async fn advisory<C: GenericClient>(c: &C, stream: &str, function: &str) -> Result<bool, StoreError> {
    let sql = format!(
        "SELECT coalesce({function}(hashtext('logcursor handlers'), hashtext(current_schema() || '/' || $1))::text, '')
                <> 'false'"
    );
    let row = c
        .query_typed_one(&sql, &[(&stream, Type::TEXT)])
        .await
        .map_err(StoreError::db("lock the stream's handler record"))?;
    Ok(row.get(0))
}

/// A name two handlers share, or an empty one: such handlers cannot be
/// told apart in the record.
pub fn duplicate_name(handlers: &[Arc<dyn Handler>]) -> Option<String> {
    let mut names: Vec<String> = handlers.iter().map(|h| h.name()).collect();
    names.sort();
    if names.iter().any(String::is_empty) {
        return Some(String::new());
    }
    names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0].clone())
}
