//! The connection pool, and start-up's bounded wait for the database.
//!
//! Every connection carries the replica id as `application_name` (so
//! `pg_stat_activity` shows who holds a cursor lock), a connect deadline,
//! and TCP keepalives plus `tcp_user_timeout`, so a dead peer is noticed in
//! seconds rather than after the kernel's two-hour default.

use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::config::Host;
use tokio_postgres::{CancelToken, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use super::{Result, StoreError};
use crate::config::DatabaseConfig;

/// A pool plus the printable name of what it connects to.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    /// `host:port/dbname`: never the user's password.
    target: String,
    /// The TLS connector, also used for query cancellation; `None`: plaintext.
    tls: Option<MakeRustlsConnect>,
}

impl Database {
    /// Builds the pool; connects lazily (see [`Database::wait_until_reachable`]).
    pub fn new(cfg: &DatabaseConfig, replica_id: &str) -> Result<Database> {
        let invalid = |reason: String| StoreError::Pool {
            target: "<database.url>".into(),
            reason,
        };
        let (rest, mut tls) = super::tls::split_url(cfg.url.expose()).map_err(invalid)?;
        if let Some(mode) = cfg.sslmode {
            tls.mode = mode;
        }
        if let Some(root) = &cfg.sslrootcert {
            tls.root_cert = Some(root.clone());
        }
        let mut pg: tokio_postgres::Config = rest.parse().map_err(|e| invalid(format!("invalid URL: {e}")))?;
        if let Some(password) = &cfg.password {
            pg.password(password.expose());
        }
        pg.ssl_mode(tls.pg_mode());
        pg.application_name(replica_id)
            .connect_timeout(cfg.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(20));
        let target = describe_target(&pg);
        let tls_config = tls.client_config().map_err(|reason| StoreError::Pool {
            target: target.clone(),
            reason,
        })?;
        let connector = tls_config.map(MakeRustlsConnect::new);
        let mc = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &connector {
            Some(c) => Manager::from_config(pg, c.clone(), mc()),
            None => Manager::from_config(pg, NoTls, mc()),
        };
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(cfg.connect_timeout))
            .build()
            .map_err(|e| StoreError::Pool {
                target: target.clone(),
                reason: e.to_string(),
            })?;
        Ok(Database {
            pool,
            target,
            tls: connector,
        })
    }

    /// `host:port/dbname`, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A pooled connection.
    pub async fn get(&self) -> Result<Object> {
        self.pool.get().await.map_err(|e| StoreError::Pool {
            target: self.target.clone(),
            reason: describe_pool_error(e),
        })
    }

    /// Tries to connect until it works, `give_up_after` passes, or `cancel`
    /// fires; backs off exponentially between attempts (capped at 5 s).
    pub async fn wait_until_reachable(&self, give_up_after: Duration, cancel: &CancellationToken) -> Result<()> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.get().await {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() >= give_up_after || cancel.is_cancelled() => {
                    // The inner error names the target already: keep only its cause.
                    let cause = match e {
                        StoreError::Pool { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    let waited = humantime::format_duration(round_secs(started.elapsed()));
                    return Err(StoreError::Pool {
                        target: self.target.clone(),
                        reason: format!("unreachable for {waited}: {cause}"),
                    });
                }
                Err(e) => {
                    tracing::warn!(database = %self.target, error = %e, retry_in = ?delay, "database not reachable yet");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Asks the server to cancel what the session of `token` is running,
    /// over the same kind of connection (TLS or not) as the pool's.
    pub async fn cancel(&self, token: CancelToken) {
        let _ = match &self.tls {
            Some(t) => token.cancel_query(t.clone()).await,
            None => token.cancel_query(NoTls).await,
        };
    }

    /// Closes the pool: idle connections are dropped, new `get`s fail.
    pub fn close(&self) {
        self.pool.close();
    }
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn describe_target(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        pg.get_dbname().or(pg.get_user()).unwrap_or("postgres")
    )
}

fn describe_pool_error(e: deadpool_postgres::PoolError) -> String {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(pg) => super::describe_pg(&pg),
        PoolError::Timeout(kind) => format!("timed out ({kind:?})"),
        other => other.to_string(),
    }
}
