//! The connection pool, the transactions every caller opens through it, and
//! start-up's bounded wait for the database.
//!
//! Every connection carries the replica id as `application_name` (so
//! `pg_stat_activity` shows who holds a cursor lock), a connect deadline,
//! and TCP keepalives plus `tcp_user_timeout`, so a dead peer is noticed in
//! seconds rather than after the kernel's two-hour default. A checkout waits
//! at most `checkout_timeout`. A connection that saw the server go away or
//! turn read-only is evicted ([`Database::evict_if_broken`]) instead of
//! being handed out again.
//!
//! Every transaction starts with [`Database::begin`]: READ COMMITTED, and
//! `search_path`, `lock_timeout`, `statement_timeout` and
//! `idle_in_transaction_session_timeout` set locally (one round trip), so
//! nothing depends on a server session (PgBouncer's transaction mode).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Timeouts};
use tokio_postgres::config::Host;
use tokio_postgres::types::Type;
use tokio_postgres::{CancelToken, IsolationLevel, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use super::{quote_ident, Result, StoreError};
use crate::backoff::CONNECT;
use crate::redact::Secret;

/// How to reach the database; built by the configuration.
#[derive(Debug, Clone)]
pub struct DbSettings {
    /// The connection URL. Secret: it may carry the password.
    pub url: Secret,
    /// Overrides a password in the URL.
    pub password: Option<Secret>,
    /// Overrides the URL's `sslmode`.
    pub sslmode: Option<super::tls::SslMode>,
    /// Overrides the URL's `sslrootcert`.
    pub sslrootcert: Option<std::path::PathBuf>,
    /// The schema that holds every object logcursor creates (validated: a
    /// plain identifier; always quoted).
    pub schema: String,
    /// Connections in this replica's pool.
    pub pool_size: usize,
    /// TCP connect deadline for one attempt.
    pub connect_timeout: Duration,
    /// The longest wait for a free pooled connection.
    pub checkout_timeout: Duration,
}

/// The `SET LOCAL` bounds of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxLimits {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub idle_in_transaction_timeout: Duration,
}

impl TxLimits {
    /// The longest one call of a Rust handler may take in a transaction
    /// with these limits: its `statement_timeout` (what a SQL handler
    /// function has, as one statement), and two thirds of the idle bound,
    /// so that a handler waiting elsewhere is given up before the server
    /// ends the session (its idle clock started before the call).
    pub fn handler_deadline(&self) -> Duration {
        self.statement_timeout.min(self.idle_in_transaction_timeout * 2 / 3)
    }

    /// Bounds for short administrative transactions (start-up checks,
    /// migrations, status, CLI). They never wait on the chain, so the idle
    /// bound is the default tick's (I6 holds for them too: a replica frozen
    /// in one is cut off as soon as one frozen in a tick).
    pub const SHORT: TxLimits = TxLimits {
        lock_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(30),
        idle_in_transaction_timeout: Duration::from_secs(15),
    };
}

/// A pool plus the printable name of what it connects to.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    /// `host:port/dbname`: never the user's password.
    target: String,
    /// The TLS connector, also used for query cancellation; `None`: plaintext.
    tls: Option<MakeRustlsConnect>,
    /// `search_path` value: the quoted schema.
    search_path: String,
    schema: String,
    /// When a transaction last began (see [`Database::answered_within`]).
    answered: Arc<Answered>,
}

/// The last moment the database answered, for health checks that must not
/// wait for a pooled connection.
struct Answered {
    epoch: Instant,
    /// Milliseconds after `epoch`, plus one (0: never).
    at_ms: AtomicU64,
}

impl Answered {
    fn mark(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.at_ms.fetch_max(ms + 1, Ordering::Relaxed);
    }
}

impl Database {
    /// Builds the pool; connects lazily (see [`Database::wait_until_reachable`]).
    pub fn new(cfg: &DbSettings, replica_id: &str) -> Result<Database> {
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
            .timeouts(Timeouts {
                wait: Some(cfg.checkout_timeout),
                create: Some(cfg.connect_timeout),
                recycle: Some(cfg.connect_timeout),
            })
            .build()
            .map_err(|e| StoreError::Pool {
                target: target.clone(),
                reason: e.to_string(),
            })?;
        Ok(Database {
            pool,
            target,
            tls: connector,
            search_path: quote_ident(&cfg.schema),
            schema: cfg.schema.clone(),
            answered: Arc::new(Answered {
                epoch: Instant::now(),
                at_ms: AtomicU64::new(0),
            }),
        })
    }

    /// `host:port/dbname`, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The schema every object lives in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The `search_path` value every transaction sets (the quoted schema).
    pub fn search_path(&self) -> &str {
        &self.search_path
    }

    /// A pooled connection (waiting at most `checkout_timeout`).
    pub async fn get(&self) -> Result<Object> {
        self.pool.get().await.map_err(|e| StoreError::Pool {
            target: self.target.clone(),
            reason: describe_pool_error(e),
        })
    }

    /// Connections open now, and how many are idle in the pool.
    pub fn usage(&self) -> (usize, usize) {
        let s = self.pool.status();
        (s.size, s.available)
    }

    /// Starts a READ COMMITTED transaction on `client` with the schema's
    /// `search_path` and `limits`, all set locally in one round trip.
    pub async fn begin<'a>(
        &self,
        client: &'a mut Object,
        limits: TxLimits,
    ) -> Result<deadpool_postgres::Transaction<'a>> {
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(StoreError::db("begin"))?;
        tx.query_typed(
            "SELECT set_config('search_path', $1, true),
                    set_config('lock_timeout', $2, true),
                    set_config('statement_timeout', $3, true),
                    set_config('idle_in_transaction_session_timeout', $4, true)",
            &[
                (&self.search_path, Type::TEXT),
                (&millis(limits.lock_timeout), Type::TEXT),
                (&millis(limits.statement_timeout), Type::TEXT),
                (&millis(limits.idle_in_transaction_timeout), Type::TEXT),
            ],
        )
        .await
        .map_err(StoreError::db("set transaction limits"))?;
        self.answered.mark();
        Ok(tx)
    }

    /// Whether a transaction began on this pool within `window`: read from
    /// memory, so a health check answers at once whatever the pool's load.
    pub fn answered_within(&self, window: Duration) -> bool {
        let at = self.answered.at_ms.load(Ordering::Relaxed);
        if at == 0 {
            return false;
        }
        let now = u64::try_from(self.answered.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(at - 1) <= u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks the database as having answered (a query outside [`Database::begin`]).
    pub fn note_answered(&self) {
        self.answered.mark();
    }

    /// Takes `client` out of the pool for good when `err` says its
    /// connection is broken or read-only (see
    /// [`StoreError::is_connection_broken`]); otherwise returns it.
    pub fn evict_if_broken(&self, client: Object, err: &StoreError) -> Option<Object> {
        if err.is_connection_broken() {
            tracing::warn!(database = %self.target, error = %err, "evicting a database connection");
            drop(Object::take(client));
            None
        } else {
            Some(client)
        }
    }

    /// Tries to connect until it works, `give_up_after` passes, or `cancel`
    /// fires; backs off with the [`CONNECT`] schedule between attempts.
    pub async fn wait_until_reachable(&self, give_up_after: Duration, cancel: &CancellationToken) -> Result<()> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            match self.get().await {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() >= give_up_after || cancel.is_cancelled() => {
                    // The inner error names the target already: keep only its cause.
                    let cause = match e {
                        StoreError::Pool { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    let waited = humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()));
                    return Err(StoreError::Pool {
                        target: self.target.clone(),
                        reason: format!("unreachable for {waited}: {cause}"),
                    });
                }
                Err(e) => {
                    attempt += 1;
                    let delay = CONNECT.delay(attempt);
                    tracing::warn!(database = %self.target, error = %e, retry_in = ?delay, "database not reachable yet");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => {}
                    }
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

/// A duration as a PostgreSQL setting value.
pub fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
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
        PoolError::Timeout(kind) => format!("timed out waiting for a connection ({kind:?})"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_is_given_up_before_the_server_ends_an_idle_session() {
        let limits = TxLimits {
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            idle_in_transaction_timeout: Duration::from_secs(15),
        };
        assert_eq!(limits.handler_deadline(), Duration::from_secs(10));
        let short_statements = TxLimits {
            statement_timeout: Duration::from_millis(500),
            ..limits
        };
        assert_eq!(short_statements.handler_deadline(), Duration::from_millis(500));
    }
}
