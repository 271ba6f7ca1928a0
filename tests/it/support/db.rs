//! A database of its own per test on the throwaway cluster `scripts/test`
//! starts, the schema applied, the example roles, and the reads tests make of
//! what logcursor stored (rows, cursors, their recorded moves, lock holders).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::chain::LogKey;

/// A database of its own on the test cluster.
pub struct TestDb {
    pub url: String,
}

static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    pub async fn new() -> TestDb {
        let admin = std::env::var("LOGCURSOR_TEST_DATABASE_URL").expect(
            "LOGCURSOR_TEST_DATABASE_URL is not set: run the tests through scripts/test, which starts a throwaway PostgreSQL",
        );
        let name = format!(
            "lc_{}_{}_{}",
            std::process::id(),
            DB_COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let client = connect(&admin).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let mut url = url::Url::parse(&admin).expect("admin url");
        url.set_path(&name);
        TestDb { url: url.to_string() }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Applies the schema and installs the test-only cursor history trigger
    /// (the same file the demo uses), which records every cursor move.
    pub async fn migrate_with_history(&self) -> tokio_postgres::Client {
        let c = self.client().await;
        migrate_as(&self.url, "test").await;
        c.batch_execute(include_str!("../../sql/cursor_history.sql"))
            .await
            .expect("install cursor history trigger");
        c
    }
}

/// `sql/roles.example.sql` as psql would run it with `-v schema=NAME`: the
/// variable substituted, psql's own commands dropped.
pub fn roles_example(schema: &str) -> String {
    include_str!("../../../sql/roles.example.sql")
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(":\"schema\"", &format!("\"{schema}\""))
}

/// The sessions of this database whose `application_name` is LIKE
/// `pattern` and whose transaction holds a transaction id (it took a row
/// lock or wrote), as `name: query`.
pub async fn holding_xids(pg: &tokio_postgres::Client, pattern: &str) -> Vec<String> {
    pg.query(
        "SELECT application_name || ': ' || coalesce(query, '') FROM pg_stat_activity
          WHERE datname = current_database() AND application_name LIKE $1 AND backend_xid IS NOT NULL",
        &[&pattern],
    )
    .await
    .expect("pg_stat_activity")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The roles of `sql/roles.example.sql` for `schema` in a test database,
/// under names of their own: the first part (roles, database grants) is
/// applied by the admin; the second ([`ExampleRoles::grants`]) is for the
/// owner to run once it has migrated.
pub struct ExampleRoles {
    pub owner: String,
    pub app: String,
    pub grants: String,
    url: String,
}

impl ExampleRoles {
    pub async fn create(db: &TestDb, schema: &str) -> ExampleRoles {
        let dbname = url::Url::parse(&db.url)
            .expect("url")
            .path()
            .trim_start_matches('/')
            .to_string();
        let suffix = rand::random::<u32>();
        let (owner, app) = (format!("lc_owner_{suffix}"), format!("lc_app_{suffix}"));
        let example = roles_example(schema)
            .replace("logcursor_owner", &owner)
            .replace("logcursor_app", &app)
            .replace("DATABASE logcursor", &format!("DATABASE {dbname}"));
        let (roles, grants) = example.split_once("-- PART 2\n").expect("two parts");
        db.client().await.batch_execute(roles).await.expect("roles");
        ExampleRoles {
            grants: grants.to_string(),
            owner,
            app,
            url: db.url.clone(),
        }
    }

    /// The test database's URL, connecting as `role`.
    pub fn url_as(&self, role: &str) -> String {
        self.url.replacen("postgres@", &format!("{role}@"), 1)
    }
}

/// A pool to `url`, in `schema`.
pub fn database_in(url: &str, schema: &str) -> logcursor::store::pool::Database {
    let settings = logcursor::store::pool::DbSettings {
        url: logcursor::redact::Secret::new(url),
        password: None,
        sslmode: None,
        sslrootcert: None,
        schema: schema.into(),
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
        checkout_timeout: Duration::from_secs(5),
    };
    logcursor::store::pool::Database::new(&settings, "test").expect("pool")
}

/// Applies the schema as whoever `url` names.
pub async fn migrate_as(url: &str, by: &str) {
    migrate_in(url, "public", by).await
}

/// Applies the schema in `schema` as whoever `url` names.
pub async fn migrate_in(url: &str, schema: &str, by: &str) {
    let db = database_in(url, schema);
    logcursor::store::migrate::migrate(&db, by).await.expect("migrate");
    db.close();
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to test PostgreSQL");
    tokio::spawn(conn);
    client
}

/// Every stored event of the database, in the same shape as [`Chain::burned_logs`].
pub async fn stored_logs(db: &tokio_postgres::Client) -> Vec<LogKey> {
    db.query(
        "SELECT '0x' || encode(tx_hash, 'hex'), log_index::bigint, block_number FROM events ORDER BY 1, 2",
        &[],
    )
    .await
    .expect("read events")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Rows in `dead_letters`.
pub async fn dead_letter_count(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .expect("count dead letters")
        .get(0)
}

/// Rows in `events`.
pub async fn count_events(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM events", &[])
        .await
        .expect("count events")
        .get(0)
}

pub async fn cursor_of(db: &tokio_postgres::Client, stream: &str) -> Option<i64> {
    db.query_opt(
        "SELECT last_processed_block FROM block_cursors WHERE id = $1",
        &[&stream],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get(0))
}

/// The recorded cursor moves of a stream: (old, new, by), in commit order.
pub async fn cursor_history(db: &tokio_postgres::Client, stream: &str) -> Vec<(i64, i64, String)> {
    db.query(
        "SELECT old_block, new_block, moved_by FROM cursor_history WHERE stream = $1 ORDER BY seq",
        &[&stream],
    )
    .await
    .expect("read cursor history")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Why the (only) stream is halted, if it is.
pub async fn halted_reason(db: &tokio_postgres::Client) -> Option<String> {
    db.query_one("SELECT halted_reason FROM block_cursors", &[])
        .await
        .expect("the cursor row")
        .get(0)
}
