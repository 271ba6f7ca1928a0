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

use crate::backoff::CONNECT;
use crate::chain::ws::Push;
use crate::chain::{ChainError, Endpoints};
use crate::config::Config;
use crate::http::HttpState;
use crate::metrics::Registry;
use crate::poller::gapfill::GapFiller;
use crate::poller::{Poller, Stream};
use crate::store::pool::{Database, TxLimits};
use crate::store::{cursor, migrate, privileges, StoreError};
use crate::write::{Handler, Handlers};

/// Why the application could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stream {stream}: {source}")]
    Chain { stream: String, source: Box<ChainError> },
    #[error("stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("poller of stream {stream} stopped unexpectedly: {reason}")]
    PollerDied { stream: String, reason: String },
    #[error("start-up was interrupted by a signal")]
    Interrupted,
    #[error("cannot listen on telemetry.http_listen = {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// What an operator command was asked to act on does not exist.
    #[error("{0}")]
    NotFound(String),
}

/// What `build` does besides connecting.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Apply missing migrations (off for a least-privilege runtime role).
    pub migrate: bool,
}

/// Rust handlers by stream name, registered by an embedding application.
pub type HandlerMap = std::collections::HashMap<String, Vec<Arc<dyn Handler>>>;

/// A built application, ready to run.
pub struct App {
    db: Database,
    registry: Arc<Registry>,
    /// The bound HTTP listener, served by `run`.
    http: Option<tokio::net::TcpListener>,
    max_lag_blocks: Option<u64>,
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
        Self::build_with(cfg, replica_id, opts, &HandlerMap::new(), cancel).await
    }

    /// [`App::build`] with Rust handlers for some streams (by name).
    pub async fn build_with(
        cfg: &Config,
        replica_id: &str,
        opts: BuildOptions,
        handlers: &HandlerMap,
        cancel: &CancellationToken,
    ) -> Result<App, AppError> {
        if let Some(unknown) = handlers
            .keys()
            .find(|k| !cfg.streams.iter().any(|s| s.name == k.as_str()))
        {
            return Err(AppError::Stream {
                stream: unknown.clone(),
                reason: "a handler was registered for a stream the configuration does not have".into(),
            });
        }
        let db = Database::new(&cfg.database.settings, replica_id)?;
        let registry = Registry::new(replica_id);
        // Bound first: a port clash is a start-up error, not a later surprise.
        let http = match cfg.telemetry.http_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| AppError::Listen { addr, source })?,
            ),
            None => None,
        };
        let reachable = db.wait_until_reachable(cfg.database.connect_retry_for, cancel).await;
        if cancel.is_cancelled() {
            return Err(AppError::Interrupted);
        }
        reachable?;
        let retry_for = cfg.database.connect_retry_for;
        with_db_retry(&db, retry_for, cancel, || async {
            if opts.migrate {
                let applied = migrate::migrate(&db, replica_id).await?;
                if !applied.is_empty() {
                    tracing::info!(versions = ?applied, schema = db.schema(), "applied migrations");
                }
            }
            // Fail now, naming what is missing, rather than inside the first tick.
            let mut client = db.get().await?;
            let tx = db.begin(&mut client, TxLimits::SHORT).await?;
            privileges::check(&*tx, db.schema()).await?;
            check_functions(&*tx, cfg).await?;
            tx.commit().await.map_err(StoreError::db("commit start-up checks"))?;
            Ok(())
        })
        .await?;
        let endpoints = Endpoints::new();
        let mut pollers = Vec::new();
        for sc in &cfg.streams {
            let name = sc.name.to_string();
            let observer: Arc<dyn crate::chain::RpcObserver> = registry.clone();
            let rust = handlers.get(&name).cloned().unwrap_or_default();
            let stream = Stream::new(
                sc.clone(),
                &endpoints,
                Some(observer),
                Handlers {
                    rust,
                    ..Handlers::default()
                },
            );
            verify_chain(&stream, cfg.database.connect_retry_for, cancel).await?;
            let (at, created) = with_db_retry(&db, retry_for, cancel, || async {
                let mut client = db.get().await?;
                let tx = db.begin(&mut client, TxLimits::SHORT).await?;
                let seeded = cursor::seed(&*tx, &name, sc.start_block, replica_id).await?;
                tx.commit().await.map_err(StoreError::db("commit seed"))?;
                Ok(seeded)
            })
            .await?;
            if created {
                tracing::info!(stream = %name, start_block = %sc.start_block, "created cursor");
            } else if at.processed.next() != sc.start_block.get() {
                tracing::info!(stream = %name, cursor = %at.processed, start_block = %sc.start_block, "resuming from the stored cursor; start_block only seeds a new cursor");
            }
            let metrics = registry.stream(&name, sc.chain_id);
            let push = (!sc.ws.is_empty()).then(|| Arc::new(Push::default()));
            if let Some(p) = &push {
                let _ = metrics.push.set(Arc::clone(p));
            }
            pollers.push(Arc::new(Poller::new(
                Arc::new(stream),
                db.clone(),
                replica_id.to_string(),
                cfg.database.limits,
                metrics,
                push,
            )));
        }
        let streams: Vec<Arc<Stream>> = pollers.iter().map(|p| Arc::clone(&p.stream)).collect();
        let gap_filler =
            GapFiller::new(&streams, db.clone(), replica_id.to_string(), cfg.database.limits).map(Arc::new);
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

    /// The gap-fill worker (skipped ranges and filter backfills).
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
                streams: self.pollers.iter().map(|p| p.stream.cfg.name.to_string()).collect(),
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
                p.stream.cfg.name.to_string()
            });
        }
        for p in &self.pollers {
            if let Some(push) = &p.push {
                let (urls, push, token) = (p.stream.cfg.ws.clone(), Arc::clone(push), stop.clone());
                let stream = p.stream.cfg.name.to_string();
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
                    stream: p.stream.cfg.name.to_string(),
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

/// Runs a start-up step against the database again when the database went
/// away under it (restarted or failed over after it first answered), as
/// long as start-up may keep trying (`connect_retry_for` from the first
/// failure). Every step is one transaction that is safe to repeat.
async fn with_db_retry<T, F, Fut>(
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

/// Every configured SQL handler function exists (the server resolves it);
/// an error names the stream and the key.
async fn check_functions<C: crate::store::GenericClient>(c: &C, cfg: &Config) -> Result<(), AppError> {
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
async fn verify_chain(stream: &Stream, retry_for: Duration, cancel: &CancellationToken) -> Result<(), AppError> {
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
