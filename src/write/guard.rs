//! I10 across programs: a stream's events are written only by a program
//! that runs every Rust handler they have been written with.
//!
//! Rust handlers live in an application's binary, not in the database or
//! the configuration: the stock `logcursor` binary, or an older build of
//! the application, would store, replay or rewind events without the
//! effects those handlers give them, silently. So the stream's cursor row
//! records the handlers its events have been written with
//! (`block_cursors.rust_handlers`), and the seam checks it at the first
//! write of every transaction — tick, gap fill, `dlq replay` — and at
//! every rewind, before anything is written:
//! - a recorded handler this program does not run: nothing is written
//!   ([`WriteError::HandlersMissing`]; the tick rolls back and the stream
//!   reports itself stuck, gap fill retries without giving the range up,
//!   the command fails, naming them);
//! - a handler this program runs and the record lacks: added to the record
//!   in the same transaction (it applies to events stored from then on);
//! - a handler retired on purpose leaves the record only by an operator's
//!   `logcursor retire-handler`.
//!
//! A handler is known by [`Handler::name`](super::Handler::name).

use super::{Handlers, WriteError};
use crate::store::{rust_handlers, GenericClient};

/// The check of the module doc, in `c`'s transaction: `Ok` when this
/// program may write `stream`; with `record`, handlers new to the stream
/// are recorded (a start-up check records nothing: it writes no event).
pub async fn check<C: GenericClient>(c: &C, stream: &str, handlers: &Handlers, record: bool) -> Result<(), WriteError> {
    let running = handlers.names();
    let Some(recorded) = rust_handlers::recorded(c, stream).await? else {
        return Ok(()); // no cursor row: nothing was written yet
    };
    let missing: Vec<String> = recorded.iter().filter(|r| !running.contains(r)).cloned().collect();
    if !missing.is_empty() {
        return Err(WriteError::HandlersMissing {
            stream: stream.to_string(),
            missing,
            running,
        });
    }
    if record && running.iter().any(|n| !recorded.contains(n)) {
        rust_handlers::record(c, stream, &running).await?;
        tracing::info!(stream, handlers = ?running, "recorded the stream's Rust handlers: a program without them will refuse to write it");
    }
    Ok(())
}
