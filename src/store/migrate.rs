//! Schema migrations from `sql/`, embedded in the binary.
//!
//! Singleton role: N replicas may start at once, and each runs [`migrate`].
//! They never race because the whole run happens in one transaction that
//! first takes `pg_advisory_xact_lock(MIGRATION_LOCK_KEY)`: the first replica
//! applies what is missing and commits; the others wait on the lock, then
//! find nothing left to apply. The lock is transaction-scoped, so it is
//! released by COMMIT or by the session dying, and works behind a
//! transaction-mode PgBouncer (a session-level advisory lock would not).

use tokio_postgres::types::Type;

use super::{Result, StoreError};

/// One numbered file of `sql/`.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration this binary knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../sql/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "reorgs",
        sql: include_str!("../../sql/0002_reorgs.sql"),
    },
    Migration {
        version: 3,
        name: "dead_letters",
        sql: include_str!("../../sql/0003_dead_letters.sql"),
    },
    Migration {
        version: 4,
        name: "failed_ranges",
        sql: include_str!("../../sql/0004_failed_ranges.sql"),
    },
];

/// Advisory lock key that serializes migrations ("logcurso" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x6c6f_6763_7572_736f;

/// Applies the missing migrations; returns the versions this call applied
/// (empty when another replica already did). Refuses a database whose schema
/// is newer than this binary.
pub async fn migrate(client: &mut tokio_postgres::Client, applied_by: &str) -> Result<Vec<i32>> {
    let tx = client.transaction().await.map_err(StoreError::db("begin migration"))?;
    tx.execute_typed("SELECT pg_advisory_xact_lock($1)", &[(&MIGRATION_LOCK_KEY, Type::INT8)])
        .await
        .map_err(StoreError::db("take the migration lock"))?;
    // Quiet the "already exists, skipping" NOTICE every later start would log.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS logcursor_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now(),
             applied_by text
         )",
    )
    .await
    .map_err(StoreError::db("create logcursor_migrations"))?;
    let applied: Vec<i32> = tx
        .query_typed("SELECT version FROM logcursor_migrations ORDER BY version", &[])
        .await
        .map_err(StoreError::db("read logcursor_migrations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known_max = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some(newer) = applied.iter().find(|v| **v > known_max) {
        return Err(StoreError::Migration {
            version: *newer,
            reason: format!(
                "the database schema is newer than this binary (which knows up to {known_max}); upgrade logcursor"
            ),
        });
    }
    let mut done = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(m.sql).await.map_err(|source| StoreError::Migration {
            version: m.version,
            reason: super::describe_pg(&source),
        })?;
        tx.execute_typed(
            "INSERT INTO logcursor_migrations (version, name, applied_by) VALUES ($1, $2, $3)",
            &[
                (&m.version, Type::INT4),
                (&m.name, Type::TEXT),
                (&applied_by, Type::TEXT),
            ],
        )
        .await
        .map_err(StoreError::db("record migration"))?;
        done.push(m.version);
    }
    tx.commit().await.map_err(StoreError::db("commit migration"))?;
    Ok(done)
}
