//! Replicas in process: an `App` with pools of its own (so sessions of its
//! own), exactly as a separate process would have, stepped tick by tick.

use logcursor::app::{App, BuildOptions};
use logcursor::config::Config;
use std::future::Future;

use logcursor::poller::{TickError, TickOutcome};
use tokio_util::sync::CancellationToken;

/// A replica built in process (migrating, like `logcursor run`).
pub async fn build_app(cfg: &Config, replica: &str) -> App {
    App::build(cfg, replica, BuildOptions { migrate: true }, &CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("build {replica}: {e}"))
}

/// Stepping a replica's first stream by hand.
pub trait Step {
    /// One tick of the first poller.
    fn tick_once(&self) -> impl Future<Output = Result<TickOutcome, TickError>>;

    /// Ticks the first poller until a tick finds nothing to do; every tick
    /// must succeed.
    fn tick_until_idle(&self) -> impl Future<Output = Vec<TickOutcome>>;

    /// Ticks until idle, tolerating failed ticks (as the loop would, minus
    /// the backoff): what succeeded and what failed.
    fn drive_until_idle(&self) -> impl Future<Output = (Vec<TickOutcome>, Vec<TickError>)>;
}

impl Step for App {
    async fn tick_once(&self) -> Result<TickOutcome, TickError> {
        self.pollers()[0].tick(&CancellationToken::new()).await
    }

    async fn tick_until_idle(&self) -> Vec<TickOutcome> {
        let mut outcomes = Vec::new();
        for _ in 0..10_000 {
            let o = self.tick_once().await.expect("tick");
            let idle = matches!(o, TickOutcome::Idle { .. });
            outcomes.push(o);
            if idle {
                return outcomes;
            }
        }
        panic!("never became idle")
    }

    async fn drive_until_idle(&self) -> (Vec<TickOutcome>, Vec<TickError>) {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for _ in 0..2_000 {
            match self.tick_once().await {
                Ok(o @ TickOutcome::Idle { .. }) => {
                    ok.push(o);
                    return (ok, failed);
                }
                Ok(o) => ok.push(o),
                Err(e) => failed.push(e),
            }
        }
        panic!(
            "never idle; last errors: {:?}",
            failed.iter().rev().take(3).collect::<Vec<_>>()
        )
    }
}
