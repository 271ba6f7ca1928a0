//! The application: built in one step ([`App::build`]: database reachable,
//! schema migrated, every endpoint on the right chain, cursors seeded) and
//! run in another ([`App::run`]), so a test can start the real thing with
//! its own shutdown token.
//!
//! Shutdown: when the token fires, pollers stop taking ticks; the tick in
//! flight has `shutdown_grace` to commit or roll back, after which it is
//! aborted (its transaction rolls back: nothing half-done is ever
//! committed). A poller that ends or panics without being asked stops the
//! whole process with an error, so the orchestrator restarts it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::chain::ws::Push;
use crate::chain::ChainError;
use crate::config::Config;
use crate::http::HttpState;
use crate::metrics::Registry;
use crate::poller::gapfill::GapFiller;
use crate::poller::{Poller, Stream, TxLimits};
use crate::store::pool::Database;
use crate::store::{cursor, migrate, privileges, StoreError};

/// Why the application could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stream {stream}: {source}")]
    Chain { stream: String, source: ChainError },
    #[error("stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("poller of stream {stream} stopped unexpectedly: {reason}")]
    PollerDied { stream: String, reason: String },
    #[error("start-up was interrupted by a signal")]
    Interrupted,
}

/// What `build` does besides connecting.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Apply missing migrations (off for a least-privilege runtime role).
    pub migrate: bool,
}

/// A built application, ready to run.
pub struct App {
    db: Database,
    registry: Arc<Registry>,
    /// The bound HTTP listener, served by `run`.
    http: Option<tokio::net::TcpListener>,
    max_lag_blocks: u64,
    replica_id: String,
    pollers: Vec<Arc<Poller>>,
    /// Fills the ranges that `skip_and_backfill` streams skipped, if any do.
    gap_filler: Option<Arc<GapFiller>>,
    grace: Duration,
}

/// Per-stream totals of one run, for the exit log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    pub stream: String,
    pub ticks: u64,
    pub ranges_committed: u64,
    pub events_inserted: u64,
    pub duplicates: u64,
    pub failures: u64,
    /// Lock waits that timed out (another replica held the lock): not failures.
    pub lock_timeouts: u64,
}

impl App {
    /// Connects (retrying an unreachable database for `connect_retry_for`),
    /// migrates, checks every endpoint's chain id, and seeds the cursors.
    pub async fn build(
        cfg: &Config,
        replica_id: &str,
        opts: BuildOptions,
        cancel: &CancellationToken,
    ) -> Result<App, AppError> {
        let db = Database::new(&cfg.database, replica_id)?;
        let registry = Registry::new(replica_id);
        // Bound first: a port clash is a start-up error, not a later surprise.
        let http = match cfg.telemetry.http_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| AppError::Stream {
                        stream: "-".into(),
                        reason: format!("cannot listen on telemetry.http_listen = {addr}: {e}"),
                    })?,
            ),
            None => None,
        };
        let reachable = db.wait_until_reachable(cfg.database.connect_retry_for, cancel).await;
        if cancel.is_cancelled() {
            return Err(AppError::Interrupted);
        }
        reachable?;
        if opts.migrate {
            let mut client = db.get().await?;
            let applied = migrate::migrate(&mut client, replica_id).await?;
            if !applied.is_empty() {
                tracing::info!(versions = ?applied, "applied migrations");
            }
        }
        // Fail now, naming what is missing, rather than inside the first tick.
        privileges::check(&**db.get().await?).await?;
        let mut pollers = Vec::new();
        for sc in &cfg.streams {
            let name = sc.name.clone();
            let observer: Arc<dyn crate::chain::client::RpcObserver> = registry.clone();
            let stream = Stream::new(sc.clone(), Some(observer)).map_err(|reason| AppError::Stream {
                stream: name.clone(),
                reason,
            })?;
            verify_chain(&stream, cfg.database.connect_retry_for, cancel).await?;
            let client = db.get().await?;
            let (at, created) = cursor::seed(&**client, &name, sc.start_block, replica_id).await?;
            if created {
                tracing::info!(stream = %name, start_block = sc.start_block, "created cursor");
            } else if at.last_processed_block + 1 != i64::try_from(sc.start_block).unwrap_or(i64::MAX) {
                tracing::info!(stream = %name, cursor = at.last_processed_block, start_block = sc.start_block, "resuming from the stored cursor; start_block only seeds a new cursor");
            }
            let metrics = registry.stream(&name, sc.chain_id);
            if !sc.ws.is_empty() {
                let _ = metrics.push.set(Arc::new(Push::default()));
            }
            pollers.push(Arc::new(Poller::new(
                Arc::new(stream),
                db.clone(),
                replica_id.to_string(),
                TxLimits::from(&cfg.database),
                metrics,
            )));
        }
        let streams: Vec<Arc<Stream>> = pollers.iter().map(|p| Arc::clone(&p.stream)).collect();
        let gap_filler = GapFiller::new(&streams, db.clone(), replica_id.to_string()).map(Arc::new);
        crate::telemetry::export_metrics(&registry);
        Ok(App {
            db,
            registry,
            http,
            max_lag_blocks: cfg.telemetry.max_lag_blocks,
            replica_id: replica_id.to_string(),
            pollers,
            gap_filler,
            grace: cfg.service.shutdown_grace,
        })
    }

    /// The pollers, e.g. for a test that steps one tick at a time.
    pub fn pollers(&self) -> &[Arc<Poller>] {
        &self.pollers
    }

    /// The address the HTTP endpoints listen on, when enabled.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// This replica's metrics.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The gap-fill worker, when a stream uses `skip_and_backfill`.
    pub fn gap_filler(&self) -> Option<&Arc<GapFiller>> {
        self.gap_filler.as_ref()
    }

    /// Runs every stream until `shutdown` fires, then drains.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<Vec<StreamSummary>, AppError> {
        let stop = shutdown.child_token();
        let mut tasks = JoinSet::new();
        // The HTTP server outlives the drain (it answers /livez while
        // stopping) and ends with the process.
        let http_stop = CancellationToken::new();
        let http_task = self.http.take().map(|listener| {
            let state = Arc::new(HttpState {
                registry: Arc::clone(&self.registry),
                db: self.db.clone(),
                streams: self.pollers.iter().map(|p| p.stream.cfg.name.clone()).collect(),
                max_lag_blocks: self.max_lag_blocks,
                replica_id: self.replica_id.clone(),
                stopping: stop.clone(),
            });
            tokio::spawn(crate::http::serve(listener, state, http_stop.clone()))
        });
        for p in &self.pollers {
            let p = Arc::clone(p);
            let token = stop.clone();
            tasks.spawn(async move {
                p.run(token).await;
                p.stream.cfg.name.clone()
            });
        }
        for p in &self.pollers {
            if let Some(push) = p.metrics.push.get() {
                let (urls, push, token) = (p.stream.cfg.ws.clone(), Arc::clone(push), stop.clone());
                let stream = p.stream.cfg.name.clone();
                let name = format!("newHeads subscription of {}", p.stream.cfg.name);
                tasks.spawn(async move {
                    crate::chain::ws::subscribe(stream, urls, push, token).await;
                    name
                });
            }
        }
        if let Some(g) = &self.gap_filler {
            let (g, token) = (Arc::clone(g), stop.clone());
            tasks.spawn(async move {
                g.run(token).await;
                "gap-fill worker".to_string()
            });
        }
        tracing::info!(streams = self.pollers.len(), "running");
        let mut outcome = Ok(());
        tokio::select! {
            // Biased: on shutdown both branches become ready together, and a
            // poller that returned because it was told to has not died.
            biased;
            _ = stop.cancelled() => {}
            ended = tasks.join_next() => {
                if !stop.is_cancelled() {
                    // Pollers only return when told to: anything else is a bug or a panic.
                    outcome = Err(died(ended));
                    stop.cancel();
                }
            }
        }
        self.drain(&mut tasks).await;
        http_stop.cancel();
        if let Some(t) = http_task {
            let _ = t.await;
        }
        self.db.close();
        let summaries = self.summaries();
        for s in &summaries {
            tracing::info!(stream = %s.stream, ticks = s.ticks, ranges = s.ranges_committed, events_inserted = s.events_inserted, duplicates = s.duplicates, failures = s.failures, "stream summary");
        }
        outcome.map(|()| summaries)
    }

    /// Waits up to the grace period for the ticks in flight, then aborts
    /// what is left (those transactions roll back).
    async fn drain(&self, tasks: &mut JoinSet<String>) {
        let started = Instant::now();
        let deadline = tokio::time::sleep(self.grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = tasks.join_next() => match next {
                    None => break,
                    Some(Err(e)) if e.is_panic() => tracing::error!(error = %e, "a poller panicked while stopping"),
                    Some(_) => {}
                },
                _ = &mut deadline => {
                    tracing::warn!(left = tasks.len(), grace = ?self.grace, "grace period over: aborting ticks in flight; their transactions roll back");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        tracing::info!(took = ?started.elapsed(), "pollers stopped");
    }

    fn summaries(&self) -> Vec<StreamSummary> {
        self.pollers
            .iter()
            .map(|p| {
                let m = &p.metrics;
                StreamSummary {
                    stream: p.stream.cfg.name.clone(),
                    ticks: m.ticks(None),
                    ranges_committed: m.ticks(Some("advanced")),
                    events_inserted: m.events_inserted.load(Ordering::Relaxed),
                    duplicates: m.duplicates.load(Ordering::Relaxed),
                    failures: m.ticks(Some("error")),
                    lock_timeouts: m.lock_timeouts.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

fn died(ended: Option<Result<String, tokio::task::JoinError>>) -> AppError {
    match ended {
        Some(Ok(stream)) => AppError::PollerDied {
            stream,
            reason: "returned without a shutdown".into(),
        },
        Some(Err(e)) => AppError::PollerDied {
            stream: "?".into(),
            reason: e.to_string(),
        },
        None => AppError::PollerDied {
            stream: "-".into(),
            reason: "no streams to run".into(),
        },
    }
}

/// Every endpoint must serve the configured chain. A wrong chain id fails
/// at once; an endpoint that cannot answer is retried for `retry_for`.
async fn verify_chain(stream: &Stream, retry_for: Duration, cancel: &CancellationToken) -> Result<(), AppError> {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        match stream.chain.verify_chain_id(stream.cfg.chain_id).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && started.elapsed() < retry_for && !cancel.is_cancelled() => {
                attempt += 1;
                let delay = crate::poller::backoff(attempt).min(Duration::from_secs(5));
                tracing::warn!(stream = %stream.cfg.name, error = %e, retry_in = ?delay, "RPC endpoint not ready");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(AppError::Interrupted),
                }
            }
            Err(source) => {
                return Err(AppError::Chain {
                    stream: stream.cfg.name.clone(),
                    source,
                })
            }
        }
    }
}
