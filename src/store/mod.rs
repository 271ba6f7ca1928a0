//! PostgreSQL: the connection pool, migrations, and one module per table.
//! Every function takes any executor ([`GenericClient`]: a pooled client or
//! a transaction), so the caller decides what is atomic; the tick passes its
//! one transaction to all of them.
//!
//! All SQL here uses unnamed statements (`query_typed`/`execute_typed`):
//! one round trip each, and nothing that outlives its transaction, which is
//! what a transaction-mode PgBouncer requires. Table names are unqualified:
//! every transaction sets `search_path` to the configured schema locally
//! ([`pool::Database::begin`]), so the schema name is never spliced into SQL.
//!
//! The store imports only the leaves [`crate::types`] and
//! [`crate::metrics`]: neither the chain layer nor the configuration.

pub mod consumers;
pub mod cursor;
pub mod dead_letters;
pub mod events;
pub mod failed_ranges;
pub mod filters;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod pool;
pub mod privileges;
pub mod reorg;
pub mod rust_handlers;
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
    #[error("the database schema {schema:?} is at version {have:?}, this binary needs {need}: run `logcursor migrate` with the owner role")]
    SchemaBehind {
        schema: String,
        have: Option<i32>,
        need: i32,
    },
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

    /// The lock wait timed out (`lock_timeout`) or was refused (`NOWAIT`):
    /// another replica is working.
    pub fn is_lock_busy(&self) -> bool {
        self.sqlstate() == Some("55P03")
    }

    /// The connection is unusable or points at a server that cannot take
    /// writes: it must leave the pool rather than be handed out again
    /// (a closed socket; SQLSTATE class 08; 57P01–57P03, an administrator or
    /// crash shutdown; 25006, a primary that became a read-only standby).
    pub fn is_connection_broken(&self) -> bool {
        match self {
            StoreError::Db { source, .. } => {
                source.is_closed()
                    || source.code().is_some_and(|c| {
                        let c = c.code();
                        c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "25006")
                    })
            }
            _ => false,
        }
    }

    /// An error about the rows of one statement rather than the session or
    /// the server: a value the column refuses, a constraint, an exception
    /// raised by a trigger or a handler function. Such an error is isolated
    /// to the rows that cause it (I8, I10); any other error fails the
    /// transaction and is retried whole.
    ///
    /// Classes: 09 triggered action, 21 cardinality, 22 data, 23 integrity
    /// (23505 never reaches here from an insert: ON CONFLICT), 27 triggered
    /// data change, 2F/38/39 routine exceptions, 44 check option, P0
    /// PL/pgSQL `RAISE`. Not class 42 (a revoked grant, a dropped table or
    /// function a trigger uses, SQL that does not compile): the schema is
    /// not what the code expects, which is no event's fault, and parking
    /// would send every event to `dead_letters`; the transaction rolls back
    /// and the stream waits (stuck after `stuck_after`) until it is mended.
    pub fn is_per_row(&self) -> bool {
        self.sqlstate().is_some_and(is_per_row_sqlstate)
    }
}

/// See [`StoreError::is_per_row`].
pub fn is_per_row_sqlstate(code: &str) -> bool {
    let class = &code[..code.len().min(2)];
    matches!(
        class,
        "09" | "21" | "22" | "23" | "27" | "2F" | "38" | "39" | "44" | "P0"
    )
}

/// A database error with its SQLSTATE and server message; never the
/// connection string.
pub(crate) fn describe_pg(e: &tokio_postgres::Error) -> String {
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

/// `name` as a quoted SQL identifier (for `search_path`, never spliced into
/// a statement).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_errors_are_told_from_session_errors_by_class() {
        for per_row in ["22P05", "23514", "23502", "P0001", "2F005", "22003"] {
            assert!(is_per_row_sqlstate(per_row), "{per_row}");
        }
        for whole in [
            "40001", "40P01", "55P03", "57014", "08006", "57P01", "53100", "25P02", "XX000", "42501", "42P01", "42883",
        ] {
            assert!(!is_per_row_sqlstate(whole), "{whole}");
        }
    }
}
