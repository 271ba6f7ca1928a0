//! PostgreSQL: the connection pool, migrations, the cursor row and the
//! events table. Every function takes any executor ([`GenericClient`]: a
//! pooled client or a transaction), so the caller decides what is atomic;
//! the tick passes its one transaction to all of them.
//!
//! All SQL here uses unnamed statements (`query_typed`/`execute_typed`):
//! one round trip each, and nothing that outlives its transaction, which is
//! what a transaction-mode PgBouncer requires.

pub mod cursor;
pub mod dead_letters;
pub mod events;
pub mod failed_ranges;
pub mod migrate;
pub mod pool;
pub mod privileges;
pub mod reorg;
pub mod tls;

pub use tokio_postgres::GenericClient;

/// Errors of the store, by kind.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A database call failed; the SQLSTATE (if any) is in the source.
    #[error("{what}: {}", describe_pg(.source))]
    Db {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The pool could not hand out a connection.
    #[error("no database connection to {target}: {reason}")]
    Pool { target: String, reason: String },
    /// The stream has no cursor row (it is created by seeding at start).
    #[error("stream {0:?} has no block_cursors row")]
    CursorMissing(String),
    /// The compare-and-set found another value: someone else moved the
    /// cursor under our lock, which the row lock should make impossible.
    #[error("cursor of stream {stream:?} is no longer at {expected}: compare-and-set touched {rows} rows")]
    CursorMoved { stream: String, expected: i64, rows: u64 },
    /// The schema is older than this binary (or missing): migrations have
    /// not been applied, and this role may not apply them.
    #[error("the database schema is at version {have:?}, this binary needs {need}: run `logcursor migrate` with the owner role")]
    SchemaBehind { have: Option<i32>, need: i32 },
    /// The role lacks privileges the runtime needs.
    #[error("database role {role:?} lacks {}; grant them (see sql/roles.example.sql)", missing.join(", "))]
    Privileges { role: String, missing: Vec<String> },
    /// A migration file is not what this binary expects.
    #[error("migration {version}: {reason}")]
    Migration { version: i32, reason: String },
}

impl StoreError {
    pub(crate) fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        move |source| StoreError::Db { what, source }
    }

    /// The SQLSTATE of a database error, e.g. `55P03` for a lock timeout.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            StoreError::Db { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// The lock wait timed out (`lock_timeout`): another replica is working.
    pub fn is_lock_timeout(&self) -> bool {
        self.sqlstate() == Some("55P03")
    }
}

/// A database error with its SQLSTATE and server message; never the
/// connection string.
fn describe_pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}) {}", db.message(), db.code().code(), db.detail().unwrap_or(""))
            .trim_end()
            .to_string(),
        None => {
            let mut out = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                out.push_str(": ");
                out.push_str(&s.to_string());
                src = s.source();
            }
            out
        }
    }
}

pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;
