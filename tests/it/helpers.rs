//! Real parts for the tests: a fresh database per test on the throwaway
//! cluster that `scripts/test` starts, an anvil per test, and a small
//! JSON-RPC driver for the committed test contract (tests/contracts).

use std::collections::BTreeSet;
use std::future::Future;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use logcursor::app::{App, BuildOptions};
use logcursor::config::{Config, EnvOverrides};
use logcursor::poller::TickOutcome;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

pub const BURNED: &str = "event Burned(address indexed from, uint256 amount)";

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
        c.batch_execute(include_str!("../sql/cursor_history.sql"))
            .await
            .expect("install cursor history trigger");
        c
    }
}

/// `sql/roles.example.sql` as psql would run it with `-v schema=NAME`: the
/// variable substituted, psql's own commands dropped.
pub fn roles_example(schema: &str) -> String {
    include_str!("../../sql/roles.example.sql")
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

/// An anvil of its own, on a port it picked; killed on drop.
pub struct Anvil {
    _child: Child,
    pub url: String,
}

impl Anvil {
    pub async fn start() -> Anvil {
        Self::start_with(&[]).await
    }

    pub async fn start_with(args: &[&str]) -> Anvil {
        let bin = std::env::var("LOGCURSOR_TEST_ANVIL").unwrap_or_else(|_| "anvil".into());
        let mut child = Command::new(&bin)
            .args(["--port", "0", "--host", "127.0.0.1"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start anvil ({bin}): {e}; run the tests through scripts/test"));
        let stdout = child.stdout.take().expect("anvil stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read anvil output") {
                if let Some(addr) = line.strip_prefix("Listening on ") {
                    return addr.trim().to_string();
                }
            }
            panic!("anvil exited before listening")
        })
        .await
        .expect("anvil did not start within 30s");
        // Keep draining stdout so anvil never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Anvil {
            _child: child,
            url: format!("http://{addr}"),
        }
    }
}

/// What most tests start from: an anvil of their own, a database of their
/// own, a driver for the chain, and the Emitter contract deployed on it.
pub async fn world() -> (Anvil, TestDb, Chain, String) {
    let (anvil, db) = (Anvil::start().await, TestDb::new().await);
    let chain = Chain::new(&anvil.url).await;
    let emitter = chain.deploy_emitter().await;
    (anvil, db, chain, emitter)
}

/// Drives the test contract over raw JSON-RPC (anvil's accounts are
/// unlocked, so eth_sendTransaction needs no signing).
#[derive(Clone)]
pub struct Chain {
    http: reqwest::Client,
    pub url: String,
    from: String,
    /// The next nonce of `from`: explicit nonces, because anvil assigning
    /// them itself under load can leave a transaction stuck in its pool.
    nonce: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// One log as the chain reports it: (tx hash, log index, block).
pub type LogKey = (String, i64, i64);

impl Chain {
    pub async fn new(url: &str) -> Chain {
        let mut c = Chain {
            http: reqwest::Client::new(),
            url: url.to_string(),
            from: String::new(),
            nonce: Default::default(),
        };
        let accounts = c.rpc("eth_accounts", json!([])).await;
        c.from = accounts[0].as_str().expect("an account").to_string();
        let next = c.rpc("eth_getTransactionCount", json!([c.from, "pending"])).await;
        c.nonce.store(hex_i64(&next) as u64, Ordering::SeqCst);
        c
    }

    /// The same chain, sending from anvil's unlocked account `index` (so
    /// that events carry another `msg.sender`), with its own nonces.
    pub async fn as_account(&self, index: usize) -> Chain {
        let mut c = self.clone();
        let accounts = c.rpc("eth_accounts", json!([])).await;
        c.from = accounts[index].as_str().expect("an account").to_string();
        let next = c.rpc("eth_getTransactionCount", json!([c.from, "pending"])).await;
        c.nonce = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(hex_i64(&next) as u64));
        c
    }

    /// The address this driver sends from, lowercase 0x-hex.
    pub fn sender(&self) -> String {
        self.from.to_lowercase()
    }

    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let resp: Value = self
            .http
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .expect("rpc send")
            .json()
            .await
            .expect("rpc json");
        if let Some(err) = resp.get("error") {
            panic!("{method} failed: {err}");
        }
        resp["result"].clone()
    }

    /// Calls the Emitter's `signature` with `args`; waits for the receipt.
    pub async fn call(&self, emitter: &str, signature: &str, args: &[crate::abi::Arg]) -> String {
        let hash = self
            .send(Some(emitter), crate::abi::calldata(&method_id(signature), args))
            .await;
        let receipt = self.receipt(&hash).await;
        assert_eq!(receipt["status"], "0x1", "{signature} reverted");
        hash
    }

    /// The timestamp of block `n`, seconds since the epoch.
    pub async fn block_time(&self, n: i64) -> i64 {
        let b = self
            .rpc("eth_getBlockByNumber", json!([format!("{n:#x}"), false]))
            .await;
        hex_i64(&b["timestamp"])
    }

    /// Sends a transaction with calldata `data` (to `to`, or a deployment).
    pub async fn send(&self, to: Option<&str>, data: String) -> String {
        self.send_with_gas(to, data, 1_000_000).await
    }

    async fn send_with_gas(&self, to: Option<&str>, data: String, gas: u64) -> String {
        let nonce = self.nonce.fetch_add(1, Ordering::SeqCst);
        let mut tx =
            json!({"from": self.from, "data": data, "gas": format!("{gas:#x}"), "nonce": format!("{nonce:#x}")});
        if let Some(to) = to {
            tx["to"] = json!(to);
        }
        let hash = self.rpc("eth_sendTransaction", json!([tx])).await;
        hash.as_str().expect("tx hash").to_string()
    }

    /// Deploys the Emitter contract; returns its address.
    pub async fn deploy_emitter(&self) -> String {
        let bytecode = contract()["bytecode"].as_str().expect("bytecode").to_string();
        let hash = self.send(None, bytecode).await;
        let receipt = self.receipt(&hash).await;
        receipt["contractAddress"]
            .as_str()
            .expect("contract address")
            .to_string()
    }

    pub async fn receipt(&self, hash: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.rpc("eth_getTransactionReceipt", json!([hash])).await;
            if !r.is_null() {
                return r;
            }
            if Instant::now() > deadline {
                let tx = self.rpc("eth_getTransactionByHash", json!([hash])).await;
                let pool = self.rpc("txpool_status", json!([])).await;
                let head = self.block_number().await;
                panic!("no receipt for {hash} after 30s: tx {tx}, pool {pool}, head {head}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// One transaction emitting `count` Burned events (amounts base..).
    pub async fn burn(&self, emitter: &str, count: u64, base: u64) -> String {
        let data = format!("0x{}{}{}", method_id("burn(uint256,uint256)"), word(count), word(base));
        self.send(Some(emitter), data).await
    }

    /// One transaction emitting thousands of Burned events (8M gas: at most
    /// three such fit a block), waiting for its receipt.
    pub async fn burn_many(&self, emitter: &str, count: u64, base: u64) {
        let data = format!("0x{}{}{}", method_id("burn(uint256,uint256)"), word(count), word(base));
        let hash = self.send_with_gas(Some(emitter), data, 8_000_000).await;
        let receipt = self.receipt(&hash).await;
        assert_eq!(receipt["status"], "0x1", "burn of {count} events ran out of gas");
    }

    /// One transaction emitting an event that no test configures.
    pub async fn unlisted(&self, emitter: &str, value: u64) -> String {
        let data = format!("0x{}{}", method_id("unlisted(uint256)"), word(value));
        self.send(Some(emitter), data).await
    }

    /// `txs` transactions (one block each under automine), the i-th emitting
    /// `per_tx(i)` events. Returns the number of events emitted.
    pub async fn emit_burns(&self, emitter: &str, txs: u64, per_tx: impl Fn(u64) -> u64) -> u64 {
        let mut total = 0;
        let mut last = String::new();
        for i in 0..txs {
            let n = per_tx(i);
            last = self.burn(emitter, n, total).await;
            total += n;
        }
        if !last.is_empty() {
            self.receipt(&last).await;
        }
        total
    }

    /// Replaces the last `depth` blocks; each `(count, base)` becomes a burn
    /// in the first replacement block. Resyncs the nonce afterwards.
    pub async fn reorg(&self, emitter: &str, depth: u64, burns: &[(u64, u64)]) {
        let txs: Vec<Value> = burns
            .iter()
            .map(|(count, base)| {
                let data = format!(
                    "0x{}{}{}",
                    method_id("burn(uint256,uint256)"),
                    word(*count),
                    word(*base)
                );
                json!([{"from": self.from, "to": emitter, "data": data, "gas": "0xf4240"}, 0])
            })
            .collect();
        self.rpc("anvil_reorg", json!([depth, txs])).await;
        let next = self.rpc("eth_getTransactionCount", json!([self.from, "pending"])).await;
        self.nonce.store(hex_i64(&next) as u64, Ordering::SeqCst);
    }

    /// The canonical hash of block `n`.
    pub async fn block_hash(&self, n: i64) -> String {
        let b = self
            .rpc("eth_getBlockByNumber", json!([format!("{n:#x}"), false]))
            .await;
        b["hash"].as_str().expect("block hash").to_string()
    }

    pub async fn mine(&self, blocks: u64) {
        self.rpc("anvil_mine", json!([format!("{blocks:#x}")])).await;
    }

    pub async fn block_number(&self) -> i64 {
        hex_i64(&self.rpc("eth_blockNumber", json!([])).await)
    }

    /// Every Burned log of `emitter` from block 0 to `to`, as the chain has them.
    pub async fn burned_logs(&self, emitter: &str, to: i64) -> BTreeSet<LogKey> {
        if to < 0 {
            return BTreeSet::new(); // a cursor before block 0 covers nothing
        }
        let topic0 = format!("0x{}", contract_event_topic());
        let logs = self
            .rpc(
                "eth_getLogs",
                json!([{"fromBlock": "0x0", "toBlock": format!("{to:#x}"), "address": emitter, "topics": [topic0]}]),
            )
            .await;
        logs.as_array()
            .expect("logs")
            .iter()
            .map(|l| {
                (
                    l["transactionHash"].as_str().expect("tx").to_string(),
                    hex_i64(&l["logIndex"]),
                    hex_i64(&l["blockNumber"]),
                )
            })
            .collect()
    }
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

/// Asserts that the moves form one forward chain from `start` to `end`:
/// each range starts right after the previous one ended, so no block range
/// was processed twice and none was skipped.
pub fn assert_contiguous_forward(history: &[(i64, i64, String)], start: i64, end: i64) {
    let mut at = start;
    for (old, new, by) in history {
        assert_eq!(*old, at, "a move by {by} started at {old}, expected {at}: {history:?}");
        assert!(
            new > old,
            "the cursor moved backward or stood still ({old} -> {new} by {by})"
        );
        at = *new;
    }
    assert_eq!(at, end, "the moves end at {at}, expected {end}");
}

/// Polls `check` until it yields a value or `within` passes.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A config for one stream on `rpc` watching `emitter`'s Burned events.
/// Each `key = value` line of `stream_extra` (`db_extra`) replaces or adds
/// that key in the stream table (`[database]`).
pub fn config_toml(db_url: &str, rpc: &str, emitter: &str, stream_extra: &str, db_extra: &str) -> String {
    let database = format!(
        "url = \"{db_url}\"\npool_size = 4\nlock_timeout = \"2s\"\nstatement_timeout = \"10s\"\n\
         idle_in_transaction_timeout = \"20s\"\nconnect_retry_for = \"5s\""
    );
    let stream = format!(
        "name = \"burns\"\nchain_id = 31337\nrpc_urls = [\"{rpc}\"]\naddresses = [\"{emitter}\"]\n\
         events = [\"{BURNED}\"]\nstart_block = 0\nconfirmations = 0\nmax_block_range = 50\n\
         poll_interval = \"50ms\"\nrpc_timeout = \"2s\""
    );
    format!(
        "[database]\n{}\n\n[service]\nshutdown_grace = \"10s\"\n\n[telemetry]\nhttp_listen = \"127.0.0.1:0\"\n\n[[streams]]\n{}\n",
        with_overrides(&database, db_extra),
        with_overrides(&stream, stream_extra)
    )
}

fn with_overrides(base: &str, extra: &str) -> String {
    let key = |line: &str| line.split('=').next().unwrap_or("").trim().to_string();
    let replaced: Vec<String> = extra.lines().filter(|l| l.contains('=')).map(key).collect();
    base.lines()
        .filter(|l| !replaced.contains(&key(l)))
        .chain(extra.lines())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A replica built in process (migrating, like `logcursor run`).
pub async fn build_app(cfg: &Config, replica: &str) -> App {
    App::build(cfg, replica, BuildOptions { migrate: true }, &CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("build {replica}: {e}"))
}

/// Steps the first poller until a tick finds nothing to do; every tick must succeed.
pub async fn tick_until_idle(app: &App) -> Vec<TickOutcome> {
    let poller = &app.pollers()[0];
    let mut outcomes = Vec::new();
    for _ in 0..10_000 {
        let o = poller.tick(&CancellationToken::new()).await.expect("tick");
        let idle = matches!(o, TickOutcome::Idle { .. });
        outcomes.push(o);
        if idle {
            return outcomes;
        }
    }
    panic!("never became idle")
}

/// The stored rows equal the chain's Burned logs up to block `to`, each once.
pub async fn assert_stored_up_to(pg: &tokio_postgres::Client, chain: &Chain, emitter: &str, to: i64) {
    let mut stored = stored_logs(pg).await;
    stored.sort();
    let on_chain: Vec<LogKey> = chain.burned_logs(emitter, to).await.into_iter().collect();
    assert_eq!(
        stored, on_chain,
        "stored rows equal the canonical chain's logs up to {to}, each once"
    );
}

/// [`assert_stored_up_to`] the current head.
pub async fn assert_stored_equals_chain(pg: &tokio_postgres::Client, chain: &Chain, emitter: &str) {
    let head = chain.block_number().await;
    assert_stored_up_to(pg, chain, emitter, head).await;
}

/// A config file for a `logcursor` process.
pub fn write_config(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().expect("temp file");
    std::fs::write(file.path(), text).expect("write config");
    file
}

/// `logcursor ARGS --config CONFIG --replica-id REPLICA`, with a clean
/// environment (no DATABASE_URL, no OTLP export), info logs, piped output.
pub fn logcursor_cmd(args: &[&str], config: &std::path::Path, replica: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_logcursor"));
    c.args(args)
        .arg("--config")
        .arg(config)
        .arg("--replica-id")
        .arg(replica)
        .env_remove("DATABASE_URL")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// A `logcursor run` replica process with extra environment variables.
pub fn spawn_replica(config: &std::path::Path, replica: &str, envs: &[(&str, String)]) -> Child {
    let mut c = logcursor_cmd(&["run"], config, replica);
    c.envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    c.spawn().expect("start logcursor")
}

/// Waits for a child to exit, within `within`, collecting its output.
pub async fn finish(child: Child, within: Duration) -> std::process::Output {
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .expect("process did not exit in time")
        .expect("wait for process")
}

/// SIGTERM to every replica, then each must exit 0 within 30 s; returns
/// their stderr, in order.
pub async fn stop_all(replicas: Vec<Child>) -> Vec<String> {
    for r in &replicas {
        signal(r, "TERM");
    }
    let mut logs = Vec::new();
    for r in replicas {
        let out = finish(r, Duration::from_secs(30)).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{:?}: {stderr}", out.status);
        logs.push(stderr);
    }
    logs
}

/// Sends a signal by name (TERM, STOP, CONT) to a child, as an operator would.
pub fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("running child");
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn config(toml: &str) -> Config {
    Config::parse(toml, "test config", &EnvOverrides::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn contract() -> Value {
    serde_json::from_str(include_str!("../contracts/Emitter.json")).expect("Emitter.json")
}

pub fn method_id(signature: &str) -> String {
    contract()["methods"][signature]
        .as_str()
        .expect("method id")
        .to_string()
}

/// keccak256("Burned(address,uint256)"), as the chain reports it in topic0.
pub fn contract_event_topic() -> &'static str {
    "696de425f79f4a40bc6d2122ca50507f0efbeabbff86a84871b7196ab8ea8df7"
}

pub fn word(v: u64) -> String {
    format!("{v:064x}")
}

/// `bytes` as an ABI dynamic value: its length, then the bytes padded to words.
fn dynamic(bytes: &[u8]) -> String {
    let mut padded = bytes.to_vec();
    padded.resize(bytes.len().div_ceil(32) * 32, 0);
    format!("{}{}", word(bytes.len() as u64), hex::encode(padded))
}

/// Calldata of the Emitter's `rich(…)` whose `note` is exactly `note`:
/// any bytes, since the ABI does not check that a string is UTF-8.
pub fn rich_calldata(note: &[u8]) -> String {
    let blob = [0xde, 0xad];
    let (note_tail, blob_tail) = (dynamic(note), dynamic(&blob));
    let note_at = 11 * 32;
    let blob_at = note_at + note_tail.len() / 2;
    let list_at = blob_at + blob_tail.len() / 2;
    let head = [
        format!("{:0>64}", "aa"), // to
        "f".repeat(63) + "b",     // delta = -5
        word(7),                  // id
        "f".repeat(63) + "d",     // small = -3
        "ab".repeat(32),          // tag
        word(1),                  // flag
        word(note_at as u64),     // note
        word(blob_at as u64),     // blob
        word(list_at as u64),     // list
        word(9),                  // pair.a
        format!("{:0>64}", "bb"), // pair.b
    ]
    .concat();
    let list = format!("{}{}{}", word(2), word(1), word(2));
    format!(
        "0x{}{head}{note_tail}{blob_tail}{list}",
        method_id("rich(address,int256,uint256,int64,bytes32,bool,string,bytes,uint256[],(uint256,address))")
    )
}

pub fn hex_i64(v: &Value) -> i64 {
    let s = v.as_str().expect("hex quantity");
    i64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex number")
}
