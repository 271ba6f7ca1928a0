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

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use tokio::time::Instant;

use tokio::sync::Semaphore;

use crate::chain::heads::{Followers, Need, ObserverOf};
use crate::chain::ws::PushObserver;
use crate::chain::{ChainError, Endpoints, RpcObserver};
use crate::config::Config;
use crate::delivery::Deliverer;
use crate::http::HttpState;
use crate::metrics::{NoLabels, Registry, Uptime};
use crate::poller::gapfill::GapFiller;
use crate::poller::metrics::{EndpointLabels, PushMetrics, RpcMetrics, StreamLabels, StreamMetrics};
use crate::poller::parts::LOGS_IN_FLIGHT_PER_REPLICA;
use crate::poller::{Poller, Stream};
use crate::store::metrics::{BacklogGauges, DeliveryGauges};
use crate::store::pool::{Database, TxLimits};
use crate::store::{cursor, migrate, privileges, StoreError};
use crate::telemetry::{MetricsExport, TelemetryError};
use crate::write::{guard, Handler, Handlers};

mod checks;
pub use checks::handler_problems;
use checks::{check_functions, verify_chain, with_db_retry};

/// Why the application could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stream {stream}: {source}")]
    Chain { stream: String, source: Box<ChainError> },
    #[error("stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    /// The write seam refused (its message names the stream).
    #[error(transparent)]
    Write(#[from] crate::write::WriteError),
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
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
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
    /// The replica's one metrics registry: `/metrics` and OTLP read it.
    registry: Arc<Registry>,
    /// The OTLP metrics export, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set;
    /// `run` sends its last values after the drain.
    otlp: Option<MetricsExport>,
    started: std::time::Instant,
    /// The bound HTTP listener, served by `run`.
    http: Option<tokio::net::TcpListener>,
    max_lag_blocks: Option<u64>,
    replica_id: String,
    pollers: Vec<Arc<Poller>>,
    /// Fills the ranges that `skip_and_backfill` streams skipped, if any do.
    gap_filler: Option<Arc<GapFiller>>,
    /// Delivers the outbox to the streams' webhooks, if any have some.
    deliverer: Option<Arc<Deliverer>>,
    /// One head follower per endpoint, shared by the streams on it.
    followers: Followers,
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
        if let Some((stream, reason)) = handler_problems(cfg, handlers).into_iter().next() {
            return Err(AppError::Stream { stream, reason });
        }
        let db = Database::new(&cfg.database.settings, replica_id)?;
        let mut registry = Registry::new();
        registry.collect(Uptime::new(replica_id));
        let stream_metrics = StreamMetrics::register(&mut registry);
        let push_metrics = PushMetrics::register(&mut registry);
        let rpc: Arc<dyn RpcObserver> = Arc::new(RpcMetrics::register(&mut registry).of(&NoLabels));
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
                crate::views::define(&db, cfg).await?;
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
        let observe: ObserverOf = Box::new(move |endpoint: &str| -> Arc<dyn PushObserver> {
            Arc::new(push_metrics.of(&EndpointLabels {
                endpoint: endpoint.to_string(),
            }))
        });
        let followers = Followers::new(endpoints.clone(), Some(observe));
        // Ticks in flight at once: the pool, less room for the gap filler,
        // the deliveries and the endpoints' reads.
        let permits = Arc::new(Semaphore::new(cfg.database.settings.pool_size.saturating_sub(2).max(1)));
        let in_flight = Arc::new(Semaphore::new(LOGS_IN_FLIGHT_PER_REPLICA));
        let prefetch_slots = Arc::new(Semaphore::new(permits.available_permits()));
        let mut pollers = Vec::new();
        for sc in &cfg.streams {
            let name = sc.name.to_string();
            let rust = handlers.get(&name).cloned().unwrap_or_default();
            let mut stream = Stream::new(
                sc.clone(),
                &endpoints,
                Some(Arc::clone(&rpc)),
                Handlers {
                    rust,
                    deadline: Some(cfg.database.limits.handler_deadline()),
                    ..Handlers::default()
                },
            );
            stream.followers = sc
                .rpc
                .iter()
                .enumerate()
                .map(|(i, endpoint)| {
                    let need = Need {
                        ws: sc.ws.get(i).cloned(),
                        tag: sc.finality.tag(),
                        poll_interval: sc.poll_interval,
                        ws_poll_interval: sc.ws_poll_interval,
                        filter: stream.filter.clone(),
                    };
                    followers.follow(endpoint, sc.chain_id, crate::poller::client_options(sc), &need)
                })
                .collect();
            stream.in_flight = Arc::clone(&in_flight);
            stream.prefetch_slots = Arc::clone(&prefetch_slots);
            verify_chain(&stream, cfg.database.connect_retry_for, cancel).await?;
            let (at, created) = with_db_retry(&db, retry_for, cancel, || async {
                let mut client = db.get().await?;
                let tx = db.begin(&mut client, TxLimits::SHORT).await?;
                let seeded = cursor::seed(&*tx, &name, sc.start_block, replica_id).await?;
                // Refuse now, naming them, a stream written with Rust
                // handlers this program does not run, and record those it
                // runs unless another replica is ticking the stream (then
                // our first tick records them; every write checks too).
                let mode = if cursor::try_lock(&*tx, &name).await? {
                    guard::Mode::Record
                } else {
                    guard::Mode::ReadOnly
                };
                match guard::check(&*tx, &name, &stream.writer.handlers, mode).await {
                    Err(crate::write::WriteError::Store(e)) => return Err(e.into()),
                    other => other?,
                }
                tx.commit().await.map_err(StoreError::db("commit seed"))?;
                Ok(seeded)
            })
            .await?;
            if created {
                tracing::info!(stream = %name, start_block = %sc.start_block, "created cursor");
            } else if at.processed.next() != sc.start_block.get() {
                tracing::info!(stream = %name, cursor = %at.processed, start_block = %sc.start_block, "resuming from the stored cursor; start_block only seeds a new cursor");
            }
            let labels = StreamLabels {
                stream: name.clone(),
                chain_id: sc.chain_id,
            };
            pollers.push(Arc::new(Poller::new(
                Arc::new(stream),
                db.clone(),
                replica_id.to_string(),
                cfg.database.limits,
                stream_metrics.of(&labels),
                Arc::clone(&permits),
            )));
        }
        let streams: Vec<Arc<Stream>> = pollers.iter().map(|p| Arc::clone(&p.stream)).collect();
        let gap_filler =
            GapFiller::new(&streams, db.clone(), replica_id.to_string(), cfg.database.limits).map(Arc::new);
        let deliverer = Deliverer::new(&streams, db.clone(), replica_id.to_string(), &mut registry).map(Arc::new);
        let names = cfg.streams.iter().map(|s| s.name.to_string()).collect();
        registry.collect_refreshed(Arc::new(BacklogGauges::new(db.clone(), names)));
        let webhooks = deliverer.as_ref().map(|d| d.targets()).unwrap_or_default();
        registry.collect_refreshed(Arc::new(DeliveryGauges::new(db.clone(), webhooks)));
        let registry = Arc::new(registry);
        let otlp = MetricsExport::from_env(&registry, replica_id)?;
        Ok(App {
            db,
            registry,
            otlp,
            started: std::time::Instant::now(),
            http,
            max_lag_blocks: cfg.telemetry.max_lag_blocks,
            replica_id: replica_id.to_string(),
            pollers,
            gap_filler,
            deliverer,
            followers,
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

    /// The webhook delivery workers, when a stream has webhooks.
    pub fn deliverer(&self) -> Option<&Arc<Deliverer>> {
        self.deliverer.as_ref()
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
                pollers: self.pollers.clone(),
                max_lag_blocks: self.max_lag_blocks,
                replica_id: self.replica_id.clone(),
                stopping: stop.clone(),
                started: self.started,
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
        for f in self.followers.all() {
            let (token, name) = (stop.clone(), format!("head follower of {}", f.endpoint()));
            tasks.spawn(async move {
                f.run(token).await;
                name
            });
        }
        if let Some(d) = &self.deliverer {
            let (d, token) = (Arc::clone(d), stop.clone());
            tasks.spawn(async move {
                d.run(token).await;
                "webhook delivery".to_string()
            });
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
        drain(&mut tasks, self.grace).await;
        http_stop.cancel();
        if let Some(t) = http_task {
            let _ = t.await;
        }
        if let Some(otlp) = self.otlp.take() {
            // Before the pool closes: the last export reads the database's gauges too.
            otlp.finish().await;
        }
        self.db.close();
        let summaries = self.summaries();
        for s in &summaries {
            tracing::info!(stream = %s.stream, ticks = s.ticks, ranges = s.ranges_committed, events_inserted = s.events_inserted, duplicates = s.duplicates, failures = s.failures, "stream summary");
        }
        outcome.map(|()| summaries)
    }

    fn summaries(&self) -> Vec<StreamSummary> {
        self.pollers
            .iter()
            .map(|p| {
                let t = p.totals();
                StreamSummary {
                    stream: p.stream.cfg.name.to_string(),
                    ticks: t.ticks,
                    ranges_committed: t.advanced,
                    events_inserted: t.events_inserted,
                    duplicates: t.duplicates,
                    failures: t.failures,
                    lock_timeouts: t.lock_timeouts,
                }
            })
            .collect()
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Tasks still running when the grace period ended, aborted.
    pub aborted: usize,
    pub took: Duration,
}

/// Waits up to `grace` for `tasks` (the pollers, told to stop) to end, then
/// aborts what is left: a tick in flight is dropped, and its transaction
/// rolls back, so nothing half-done is committed.
pub async fn drain<T: 'static>(tasks: &mut JoinSet<T>, grace: Duration) -> Drained {
    let started = Instant::now();
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    let mut aborted = 0;
    loop {
        tokio::select! {
            next = tasks.join_next() => match next {
                None => break,
                Some(Err(e)) if e.is_panic() => tracing::error!(error = %e, "a poller panicked while stopping"),
                Some(_) => {}
            },
            _ = &mut deadline => {
                aborted = tasks.len();
                tracing::warn!(left = aborted, ?grace, "grace period over: aborting ticks in flight; their transactions roll back");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    let took = started.elapsed();
    tracing::info!(?took, "pollers stopped");
    Drained { aborted, took }
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

#[cfg(test)]
mod tests;
