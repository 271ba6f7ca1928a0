//! SIGTERM and SIGINT → a [`CancellationToken`].
//!
//! - SIGTERM: what Kubernetes and compose send to stop a container.
//! - SIGINT: Ctrl-C in a terminal.
//!
//! The first signal cancels the token: pollers stop taking ticks and the tick
//! in flight commits or rolls back within the grace period. A second signal
//! exits at once with status 130: the database rolls back whatever the
//! killed transaction held, so this loses nothing either, it just skips the
//! drain. Cancelling twice is harmless (a token stays cancelled).

use futures::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;

/// Exit status after a second signal.
pub const FORCED_EXIT: i32 = 130;

/// Installs the handlers (before any poller starts) and returns the token
/// that the first signal cancels.
pub fn install() -> std::io::Result<CancellationToken> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        while let Some(signal) = signals.next().await {
            seen += 1;
            let name = if signal == SIGTERM { "SIGTERM" } else { "SIGINT" };
            if seen == 1 {
                tracing::info!(
                    signal = name,
                    "shutting down: finishing the tick in flight (send again to exit at once)"
                );
                trigger.cancel();
            } else {
                tracing::warn!(
                    signal = name,
                    "second signal: exiting at once; open transactions roll back"
                );
                std::process::exit(FORCED_EXIT);
            }
        }
    });
    Ok(token)
}
