//! Replicas in process: an `App` with pools of its own (so sessions of its
//! own), exactly as a separate process would have, stepped tick by tick.

use logcursor::app::{App, BuildOptions};
use logcursor::config::Config;
use logcursor::poller::TickOutcome;
use tokio_util::sync::CancellationToken;

/// A replica built in process (migrating, like `logcursor run`).
pub async fn build_app(cfg: &Config, replica: &str) -> App {
    App::build(cfg, replica, BuildOptions { migrate: true }, &CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("build {replica}: {e}"))
}

/// Stepping a replica's first stream by hand.
pub trait Step {
    /// Ticks the first poller until a tick finds nothing to do; every tick
    /// must succeed.
    fn tick_until_idle(&self) -> impl std::future::Future<Output = Vec<TickOutcome>>;
}

impl Step for App {
    async fn tick_until_idle(&self) -> Vec<TickOutcome> {
        let poller = &self.pollers()[0];
        let mut outcomes = Vec::new();
        for _ in 0..10_000 {
            let o = poller.tick(&CancellationToken::new()).await.expect("tick");
            let idle = matches!(o, TickOutcome::Idle { .. });
            outcomes.push(o);
            if idle {
                return outcomes;
            }
        }
        panic!("never became idle")
    }
}

/// [`Step::tick_until_idle`] as a function.
pub async fn tick_until_idle(app: &App) -> Vec<TickOutcome> {
    app.tick_until_idle().await
}
