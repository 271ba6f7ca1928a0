//! Schema migrations from `sql/`, embedded in the binary, applied inside the
//! configured schema (`database.schema`): the schema is created if missing,
//! and `search_path` is set to it for the migration's transaction, so every
//! table, sequence, function and view the files create lives there. Two
//! deployments with different schemas share a database without seeing
//! each other.
//!
//! Singleton role: N replicas may start at once, and each runs [`migrate`].
//! They never race because the whole run happens in one transaction that
//! first takes `pg_advisory_xact_lock(MIGRATION_LOCK_CLASS, hashtext(schema))`:
//! the first replica applies what is missing and commits; the others wait on
//! the lock, then find nothing left to apply. The lock is transaction-scoped,
//! so it is released by COMMIT or by the session dying, and works behind a
//! transaction-mode PgBouncer (a session-level advisory lock would not).

use tokio_postgres::types::Type;

use super::pool::{Database, TxLimits};
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
    Migration {
        version: 5,
        name: "no_holes",
        sql: include_str!("../../sql/0005_no_holes.sql"),
    },
    Migration {
        version: 6,
        name: "handlers",
        sql: include_str!("../../sql/0006_handlers.sql"),
    },
    Migration {
        version: 7,
        name: "views",
        sql: include_str!("../../sql/0007_views.sql"),
    },
    Migration {
        version: 8,
        name: "delivery",
        sql: include_str!("../../sql/0008_delivery.sql"),
    },
    Migration {
        version: 9,
        name: "consumer_reverts",
        sql: include_str!("../../sql/0009_consumer_reverts.sql"),
    },
    Migration {
        version: 10,
        name: "rust_handlers",
        sql: include_str!("../../sql/0010_rust_handlers.sql"),
    },
];

/// Advisory lock class that serializes migrations of one schema ("lcmg" in ASCII).
pub const MIGRATION_LOCK_CLASS: i32 = 0x6c63_6d67;

/// The highest version this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Applies the missing migrations in `db`'s schema; returns the versions
/// this call applied (empty when another replica already did). Refuses a
/// schema that is newer than this binary.
pub async fn migrate(db: &Database, applied_by: &str) -> Result<Vec<i32>> {
    let mut client = db.get().await?;
    let limits = TxLimits {
        // Migrations may wait for other replicas' and build indexes; between
        // statements they wait on nothing, so a stalled one is cut off soon
        // (it holds the lock every starting replica waits for).
        lock_timeout: std::time::Duration::from_secs(300),
        statement_timeout: std::time::Duration::from_secs(3600),
        idle_in_transaction_timeout: TxLimits::SHORT.idle_in_transaction_timeout,
    };
    let tx = db.begin(&mut client, limits).await?;
    tx.execute_typed(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[(&MIGRATION_LOCK_CLASS, Type::INT4), (&db.schema(), Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("take the migration lock"))?;
    // Created only when missing (an owner role may lack CREATE on the
    // database but own its schema). The name is quoted by the server
    // (format's %I), never spliced by us.
    let create: Option<String> = tx
        .query_typed_one(
            "SELECT CASE WHEN to_regnamespace(quote_ident($1::text)) IS NULL
                         THEN format('CREATE SCHEMA %I', $1::text) END",
            &[(&db.schema(), Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("look for the schema"))?
        .get(0);
    if let Some(create) = create {
        tx.batch_execute(&create)
            .await
            .map_err(StoreError::db("create the schema"))?;
    }
    // Quiet the "already exists, skipping" NOTICE every later start would log.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(StoreError::db("quiet notices"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS logcursor_migrations (
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
