//! Start-up checks: what the configuration names must exist before any
//! tick runs (handler functions, a healthy endpoint on the right chain).

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{AppError, HandlerMap};
use crate::backoff::CONNECT;
use crate::config::Config;
use crate::poller::Stream;
use crate::store::pool::Database;
use crate::store::StoreError;
use crate::write::guard;

/// Every configured SQL handler function exists (the server resolves it);
/// an error names the stream and the key.
pub(super) async fn check_functions<C: crate::store::GenericClient>(c: &C, cfg: &Config) -> Result<(), AppError> {
    for s in &cfg.streams {
        for (key, name) in [
            ("handler_function", &s.handler_function),
            ("revert_function", &s.revert_function),
        ] {
            let Some(name) = name else { continue };
            let found: bool = c
                .query_typed_one(
                    "SELECT to_regproc($1) IS NOT NULL",
                    &[(name, tokio_postgres::types::Type::TEXT)],
                )
                .await
                .map_err(StoreError::db("look up a handler function"))?
                .get(0);
            if !found {
                return Err(AppError::Stream {
                    stream: s.name.to_string(),
                    reason: format!("{key} = {name:?}: no such function (or it is overloaded); create it as {name}(batch events[]) in the database first"),
                });
            }
        }
    }
    Ok(())
}

/// The stream's endpoints must serve the configured chain: a wrong chain id
/// fails at once; one healthy endpoint is enough to start (the others are
/// checked on first use); while none answers, start-up retries for `retry_for`.
pub(super) async fn verify_chain(
    stream: &Stream,
    retry_for: Duration,
    cancel: &CancellationToken,
) -> Result<(), AppError> {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        match stream.chain.verify_chain_id().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && started.elapsed() < retry_for && !cancel.is_cancelled() => {
                attempt += 1;
                let delay = CONNECT.delay(attempt);
                tracing::warn!(stream = %stream.cfg.name, error = %e, retry_in = ?delay, "no RPC endpoint of the stream answers yet");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(AppError::Interrupted),
                }
            }
            Err(source) => {
                return Err(AppError::Chain {
                    stream: stream.cfg.name.to_string(),
                    source: Box::new(source),
                })
            }
        }
    }
}

/// Runs a start-up step against the database again when the database went
/// away under it (restarted or failed over after it first answered), as
/// long as start-up may keep trying (`connect_retry_for` from the first
/// failure). Every step is one transaction that is safe to repeat.
pub(super) async fn with_db_retry<T, F, Fut>(
    db: &Database,
    retry_for: Duration,
    cancel: &CancellationToken,
    mut step: F,
) -> Result<T, AppError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AppError>>,
{
    let started = Instant::now();
    loop {
        match step().await {
            Err(AppError::Store(e))
                if (e.is_connection_broken() || matches!(e, StoreError::Pool { .. }))
                    && started.elapsed() < retry_for
                    && !cancel.is_cancelled() =>
            {
                tracing::warn!(database = %db.target(), error = %e, "the database went away during start-up; trying again");
                let reachable = db
                    .wait_until_reachable(retry_for.saturating_sub(started.elapsed()), cancel)
                    .await;
                if cancel.is_cancelled() {
                    return Err(AppError::Interrupted);
                }
                reachable?;
            }
            other => return other,
        }
    }
}

/// What is wrong with `handlers` for `cfg`, as (stream, problem): a
/// stream the configuration does not have, or two handlers of a stream
/// that share a name (the record of [`guard`] could not tell them apart).
pub fn handler_problems(cfg: &Config, handlers: &HandlerMap) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    for (stream, registered) in handlers {
        if !cfg.streams.iter().any(|s| s.name == stream.as_str()) {
            problems.push((
                stream.clone(),
                format!(
                    "the application registers a handler for stream {stream:?}, which the configuration does not have"
                ),
            ));
        }
        match guard::duplicate_name(registered) {
            Some(name) if name.is_empty() => problems.push((
                stream.clone(),
                format!("a Rust handler of stream {stream:?} has an empty Handler::name, which the stream records"),
            )),
            Some(name) => problems.push((
                stream.clone(),
                format!(
                    "stream {stream:?} has two Rust handlers named {name:?} (or one registered twice): give each its own \
                     Handler::name, which the stream records"
                ),
            )),
            None => {}
        }
    }
    problems
}
