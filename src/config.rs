//! Typed configuration from a TOML file plus environment overrides.
//!
//! [`Config::load`] reports every problem at once — unknown keys, wrong types,
//! missing keys, values out of range, and combinations that break an
//! invariant (an RPC deadline that outlives the transaction's idle timeout
//! would let a session sit idle in transaction past its bound: I6) — each
//! naming its key, e.g. `streams[1].confirmations`. `main` turns them into
//! exit status 64 (EX_USAGE).

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::chain::{abi::EventSet, Address, EndpointConfig};
use crate::redact::Secret;

/// The whole configuration of one `logcursor` process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where events and cursors live, and how long a tick may hold the lock.
    pub database: DatabaseConfig,
    /// Process-level behaviour (shutdown).
    pub service: ServiceConfig,
    /// The HTTP endpoints (health, metrics, status).
    pub telemetry: TelemetryConfig,
    /// The event streams; each one is a `block_cursors` row.
    pub streams: Vec<StreamConfig>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// The connection URL: `DATABASE_URL`, else the content of `url_file`,
    /// else `url`. Secret: it may carry the password.
    pub url: Secret,
    /// From `password_file`: overrides a password in the URL.
    pub password: Option<Secret>,
    /// Overrides the URL's `sslmode`.
    pub sslmode: Option<crate::store::tls::SslMode>,
    /// Overrides the URL's `sslrootcert`.
    pub sslrootcert: Option<std::path::PathBuf>,
    /// Connections in this replica's pool; each busy stream holds one for
    /// the length of its tick.
    pub pool_size: usize,
    /// TCP connect deadline for one attempt.
    pub connect_timeout: Duration,
    /// How long start-up keeps retrying an unreachable database before it
    /// gives up and exits non-zero.
    pub connect_retry_for: Duration,
    /// `SET LOCAL lock_timeout`: how long a tick waits for the cursor row
    /// lock before backing off (another replica is working).
    pub lock_timeout: Duration,
    /// `SET LOCAL statement_timeout`: the bound on any one statement.
    pub statement_timeout: Duration,
    /// `SET LOCAL idle_in_transaction_session_timeout`: the server ends a
    /// tick's session that sits idle (e.g. a frozen replica) this long (I6).
    pub idle_in_transaction_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Where `/livez`, `/readyz`, `/metrics` and `/status` are served;
    /// `None` (an empty string in the file) turns the server off.
    pub http_listen: Option<std::net::SocketAddr>,
    /// `/readyz` fails while a stream is more blocks than this behind its safe head.
    pub max_lag_blocks: u64,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// After SIGTERM/SIGINT, how long the tick in flight may take to commit
    /// or roll back before it is cut off.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// The stream's name and its `block_cursors.id`.
    pub name: String,
    /// Must equal every endpoint's `eth_chainId`; part of the event key.
    pub chain_id: u64,
    /// JSON-RPC endpoints, preferred in order. Their URLs are secrets:
    /// they often carry API keys.
    pub rpc: Vec<EndpointConfig>,
    /// Contracts whose logs are ingested.
    pub addresses: Vec<Address>,
    /// Human-readable event signatures, as written in the file.
    pub events: Vec<String>,
    /// First block ingested; only seeds a new cursor (never moves one).
    pub start_block: u64,
    /// Safe head = latest − confirmations.
    pub confirmations: u64,
    /// The most blocks one tick covers; bounds lock hold and response size.
    pub max_block_range: u64,
    /// Wait between ticks when there is nothing new (and no push
    /// subscription is live).
    pub poll_interval: Duration,
    /// WebSocket endpoints whose `newHeads` subscription wakes the poll
    /// loop at once (empty: polling only). Secrets, like `rpc`.
    pub ws: Vec<Secret>,
    /// Wait between ticks while a push subscription is live: a safety net
    /// only, since a tick starts as soon as a head arrives.
    pub ws_poll_interval: Duration,
    /// Deadline for one JSON-RPC request.
    pub rpc_timeout: Duration,
    /// Sub-ranges of one tick fetched at once (hides a remote provider's latency).
    pub fetch_concurrency: usize,
    /// While a backfill tick commits, fetch the next range already.
    pub pipeline: bool,
    /// Tries per request on retryable errors (1 = no retry).
    pub rpc_attempts: u32,
    /// How long a failing endpoint is passed over.
    pub rpc_cooldown: Duration,
    /// Which block tag, if any, also bounds the safe head.
    pub finality: Finality,
    /// What to do when a block at or below the cursor was reorganised away.
    pub on_deep_reorg: DeepReorgPolicy,
    /// How far back a rewind may look for the common ancestor; also how
    /// many processed block hashes are kept.
    pub max_reorg_depth: u64,
    /// What to do with a log that does not decode.
    pub on_bad_event: BadEventPolicy,
    /// What to do with a range the provider will not serve.
    pub on_unfetchable_range: UnfetchablePolicy,
    /// Failed attempts at one range before `skip_and_backfill` skips it.
    pub range_attempts: u32,
    /// A stream failing this long reports itself as stuck.
    pub stuck_after: Duration,
    /// The gap-fill worker's settings for this stream's skipped ranges.
    pub gapfill: GapFillConfig,
}

/// Policy for a range that keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnfetchablePolicy {
    /// Keep retrying it with backoff; the cursor waits.
    Retry,
    /// After `range_attempts` failures, record it in `failed_ranges`, move
    /// the cursor past it, and let the gap-fill worker fetch it later.
    SkipAndBackfill,
}

/// How the gap-fill worker retries a skipped range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapFillConfig {
    /// Attempts before a range is marked dead.
    pub max_attempts: u32,
    /// How long a claim holds a range.
    pub lease: Duration,
    /// Wait before the first retry; doubles each time.
    pub backoff: Duration,
    /// The longest wait between retries.
    pub backoff_max: Duration,
}

/// Policy for a log that does not decode under the configured events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadEventPolicy {
    /// Park it whole in `dead_letters` (same transaction) and move on.
    DeadLetter,
    /// Stop the stream before it, naming tx hash and log index.
    Halt,
}

/// The safe head: `latest − confirmations`, and optionally no higher than
/// the node's `safe` or `finalized` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finality {
    Latest,
    Safe,
    Finalized,
}

impl Finality {
    /// The JSON-RPC block tag, if any.
    pub fn tag(self) -> Option<&'static str> {
        match self {
            Finality::Latest => None,
            Finality::Safe => Some("safe"),
            Finality::Finalized => Some("finalized"),
        }
    }
}

/// Policy for a reorg deeper than the safe head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeepReorgPolicy {
    /// Stop the stream (others go on) until an operator runs `logcursor rewind`.
    Halt,
    /// Find the common ancestor, delete orphaned events, move the cursor
    /// back to it (audited in `cursor_rewinds`), and re-ingest.
    Rewind,
}

/// One thing wrong with the configuration, naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the key, e.g. `streams[0].rpc_urls`.
    pub key: String,
    pub message: String,
}

/// Every problem found, in file order.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file the problems were found in (or `<environment>`).
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration in {}:", self.source_name)?;
        for p in &self.problems {
            writeln!(f, "  - {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

/// The environment variables that override the file. Taken as a value so
/// tests need not touch the process environment.
#[derive(Debug, Clone, Default)]
pub struct EnvOverrides {
    /// `DATABASE_URL`.
    pub database_url: Option<String>,
    /// `LOGCURSOR_HTTP_LISTEN`: overrides `telemetry.http_listen`, so that
    /// replicas sharing one file can each have their own port.
    pub http_listen: Option<String>,
}

impl EnvOverrides {
    pub fn from_process() -> Self {
        Self {
            database_url: std::env::var("DATABASE_URL").ok().filter(|s| !s.is_empty()),
            http_listen: std::env::var("LOGCURSOR_HTTP_LISTEN").ok(),
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &std::path::Path, env: &EnvOverrides) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![Problem {
                key: "<file>".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::parse(&text, &name, env)
    }

    /// Parses and validates TOML text; `source_name` is used in messages.
    pub fn parse(text: &str, source_name: &str, env: &EnvOverrides) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let fail = |problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        };
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(fail(vec![Problem {
                    key: "<syntax>".into(),
                    message: e.to_string().trim().replace('\n', " "),
                }]))
            }
        };
        let mut root = Fields::new(&table, "", &mut problems);
        let database_table = root.table("database");
        let service_table = root.table("service");
        let telemetry_table = root.table("telemetry");
        let stream_tables = root.array_of_tables("streams");
        root.finish();

        let database = parse_database(database_table.as_ref(), env, &mut problems);
        let service = parse_service(service_table.as_ref(), &mut problems);
        let telemetry = parse_telemetry(telemetry_table.as_ref(), env, &mut problems);
        let mut streams = Vec::new();
        match stream_tables {
            Some(ts) if !ts.is_empty() => {
                for (i, t) in ts.iter().enumerate() {
                    if let Some(s) = parse_stream(t, i, &mut problems) {
                        streams.push(s);
                    }
                }
            }
            _ => problems.push(Problem {
                key: "streams".into(),
                message: "at least one [[streams]] table is required".into(),
            }),
        }
        check_streams_together(&streams, &mut problems);
        if let Some(db) = &database {
            check_timeouts(db, &streams, &mut problems);
        }
        match (database, service, telemetry) {
            (Some(database), Some(service), Some(telemetry)) if problems.is_empty() => Ok(Config {
                database,
                service,
                telemetry,
                streams,
            }),
            _ => Err(fail(problems)),
        }
    }
}

fn parse_database(
    table: Option<&toml::Table>,
    env: &EnvOverrides,
    problems: &mut Vec<Problem>,
) -> Option<DatabaseConfig> {
    let empty = toml::Table::new();
    let mut f = Fields::new(table.unwrap_or(&empty), "database", problems);
    let file_url: Option<String> = f.optional("url");
    let url_file = f.secret_file("url_file");
    let password = f.secret_file("password_file");
    let sslmode = f.optional::<String>("sslmode").and_then(|m| match m.parse() {
        Ok(mode) => Some(mode),
        Err(e) => {
            f.problem("sslmode", e);
            None
        }
    });
    let sslrootcert: Option<String> = f.optional("sslrootcert");
    let pool_size = f.int_in("pool_size", Some(4), 1..=1000);
    let connect_timeout = f.duration("connect_timeout", "5s");
    let connect_retry_for = f.duration("connect_retry_for", "60s");
    let lock_timeout = f.duration("lock_timeout", "5s");
    let statement_timeout = f.duration("statement_timeout", "30s");
    let idle = f.duration("idle_in_transaction_timeout", "60s");
    let url = match env
        .database_url
        .clone()
        .or(url_file.map(|s| s.expose().to_string()))
        .or(file_url)
    {
        None => {
            f.problem("url", "required (or url_file, or set DATABASE_URL)".into());
            None
        }
        Some(u) => match crate::store::tls::split_url(&u)
            .and_then(|(rest, _)| rest.parse::<tokio_postgres::Config>().map_err(|e| e.to_string()))
        {
            Ok(_) => Some(Secret::new(u)),
            Err(e) => {
                // The parsers' messages never echo the URL, so no secret leaks.
                f.problem("url", format!("not a valid PostgreSQL URL: {e}"));
                None
            }
        },
    };
    f.finish();
    Some(DatabaseConfig {
        url: url?,
        password,
        sslmode,
        sslrootcert: sslrootcert.map(std::path::PathBuf::from),
        pool_size: usize::try_from(pool_size?).ok()?,
        connect_timeout: connect_timeout?,
        connect_retry_for: connect_retry_for?,
        lock_timeout: lock_timeout?,
        statement_timeout: statement_timeout?,
        idle_in_transaction_timeout: idle?,
    })
}

fn parse_service(table: Option<&toml::Table>, problems: &mut Vec<Problem>) -> Option<ServiceConfig> {
    let empty = toml::Table::new();
    let mut f = Fields::new(table.unwrap_or(&empty), "service", problems);
    let shutdown_grace = f.duration("shutdown_grace", "20s");
    f.finish();
    Some(ServiceConfig {
        shutdown_grace: shutdown_grace?,
    })
}

fn parse_telemetry(
    table: Option<&toml::Table>,
    env: &EnvOverrides,
    problems: &mut Vec<Problem>,
) -> Option<TelemetryConfig> {
    let empty = toml::Table::new();
    let mut f = Fields::new(table.unwrap_or(&empty), "telemetry", problems);
    let in_file = f.optional::<String>("http_listen");
    let listen = env
        .http_listen
        .clone()
        .or(in_file)
        .unwrap_or_else(|| "0.0.0.0:9464".into());
    let http_listen = if listen.is_empty() {
        Some(None)
    } else {
        match listen.parse() {
            Ok(a) => Some(Some(a)),
            Err(_) => {
                f.problem(
                    "http_listen",
                    format!("not an address like \"0.0.0.0:9464\": {listen:?}"),
                );
                None
            }
        }
    };
    let max_lag_blocks = f.int_in("max_lag_blocks", Some(100), 0..=i64::MAX);
    f.finish();
    Some(TelemetryConfig {
        http_listen: http_listen?,
        max_lag_blocks: max_lag_blocks?,
    })
}

fn parse_stream(table: &toml::Table, i: usize, problems: &mut Vec<Problem>) -> Option<StreamConfig> {
    let mut f = Fields::new(table, &format!("streams[{i}]"), problems);
    let name: Option<String> = f.required("name");
    let name = name.filter(|n| {
        let ok = !n.is_empty() && n.len() <= 128 && n.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c));
        if !ok {
            f.problem(
                "name",
                format!("must be 1-128 characters of [A-Za-z0-9_.:-], got {n:?}"),
            );
        }
        ok
    });
    let chain_id = f.int_in("chain_id", None, 1..=i64::MAX);
    let rpc = f.list("rpc_urls", "at least one endpoint", endpoint);
    let addresses = f.list("addresses", "at least one contract address", |a: String| {
        a.parse::<Address>().map_err(|e| e.to_string())
    });
    if let Some(list) = &addresses {
        for (j, a) in list.iter().enumerate() {
            if list[..j].contains(a) {
                f.problem(&format!("addresses[{j}]"), format!("{a} is listed twice"));
            }
        }
    }
    let events: Option<Vec<String>> = f.list("events", "at least one event signature", Ok);
    let events = events.filter(|evs| match EventSet::parse(evs) {
        Ok(_) => true,
        Err(errs) => {
            for (j, e) in errs {
                f.problem(&format!("events[{j}]"), e);
            }
            false
        }
    });
    let start_block = f.int_in("start_block", Some(0), 0..=i64::MAX - 1);
    let confirmations = f.int_in("confirmations", Some(2), 0..=100_000);
    let max_block_range = f.int_in("max_block_range", Some(2000), 1..=1_000_000);
    let poll_interval = f.positive_duration("poll_interval", "1s");
    let ws = ws_urls(&mut f, rpc.as_deref());
    let ws_poll_interval = f.positive_duration("ws_poll_interval", "30s");
    let rpc_timeout = f.positive_duration("rpc_timeout", "10s");
    let rpc_attempts = f.int_in("rpc_attempts", Some(3), 1..=20);
    let fetch_concurrency = f.int_in("fetch_concurrency", Some(4), 1..=64);
    let pipeline = f.optional::<bool>("pipeline").unwrap_or(true);
    let rpc_cooldown = f.duration("rpc_cooldown", "30s");
    let finality = f.choice(
        "finality",
        "latest",
        &[
            ("latest", Finality::Latest),
            ("safe", Finality::Safe),
            ("finalized", Finality::Finalized),
        ],
    );
    let on_deep_reorg = f.choice(
        "on_deep_reorg",
        "halt",
        &[("halt", DeepReorgPolicy::Halt), ("rewind", DeepReorgPolicy::Rewind)],
    );
    let max_reorg_depth = f.int_in("max_reorg_depth", Some(128), 1..=100_000);
    let on_unfetchable_range = f.choice(
        "on_unfetchable_range",
        "retry",
        &[
            ("retry", UnfetchablePolicy::Retry),
            ("skip_and_backfill", UnfetchablePolicy::SkipAndBackfill),
        ],
    );
    let range_attempts = f.int_in("range_attempts", Some(5), 1..=1000);
    let stuck_after = f.positive_duration("stuck_after", "2m");
    let gapfill_max_attempts = f.int_in("gapfill_max_attempts", Some(10), 1..=1000);
    let gapfill_lease = f.positive_duration("gapfill_lease", "60s");
    let gapfill_backoff = f.positive_duration("gapfill_backoff", "5s");
    let gapfill_backoff_max = f.positive_duration("gapfill_backoff_max", "10m");
    let on_bad_event = f.choice(
        "on_bad_event",
        "dead_letter",
        &[
            ("dead_letter", BadEventPolicy::DeadLetter),
            ("halt", BadEventPolicy::Halt),
        ],
    );
    f.finish();
    Some(StreamConfig {
        name: name?,
        chain_id: chain_id?,
        rpc: rpc?,
        addresses: addresses?,
        events: events?,
        start_block: start_block?,
        confirmations: confirmations?,
        max_block_range: max_block_range?,
        poll_interval: poll_interval?,
        ws: ws?,
        ws_poll_interval: ws_poll_interval?,
        rpc_timeout: rpc_timeout?,
        rpc_attempts: u32::try_from(rpc_attempts?).ok()?,
        fetch_concurrency: usize::try_from(fetch_concurrency?).ok()?,
        pipeline,
        rpc_cooldown: rpc_cooldown?,
        finality: finality?,
        on_deep_reorg: on_deep_reorg?,
        max_reorg_depth: max_reorg_depth?,
        on_bad_event: on_bad_event?,
        on_unfetchable_range: on_unfetchable_range?,
        range_attempts: u32::try_from(range_attempts?).ok()?,
        stuck_after: stuck_after?,
        gapfill: GapFillConfig {
            max_attempts: u32::try_from(gapfill_max_attempts?).ok()?,
            lease: gapfill_lease?,
            backoff: gapfill_backoff?,
            backoff_max: gapfill_backoff_max?,
        },
    })
}

/// One `rpc_urls` entry: a URL, or `{ url = "…" | url_file = "…",
/// max_requests_per_second = N }`.
fn endpoint(value: toml::Value) -> Result<EndpointConfig, String> {
    const USAGE: &str =
        "must be an http(s) URL or { url = \"…\" (or url_file = \"/path\"), max_requests_per_second = N }";
    let (url, rate) = url_entry(value, &["http", "https"], USAGE)?;
    Ok(EndpointConfig {
        url,
        max_requests_per_second: rate,
    })
}

/// `ws_urls`: absent (polling only), `"derive"` (one per `rpc_urls` entry,
/// http → ws, https → wss, same host, path and query), or a list of
/// `ws://`/`wss://` URLs or `{ url_file = "…" }` tables.
fn ws_urls(f: &mut Fields<'_>, rpc: Option<&[EndpointConfig]>) -> Option<Vec<Secret>> {
    const USAGE: &str = "must be a ws(s) URL or { url = \"…\" (or url_file = \"/path\") }";
    match f.optional::<toml::Value>("ws_urls") {
        None => Some(Vec::new()),
        Some(toml::Value::String(s)) if s == "derive" => {
            rpc.map(|r| r.iter().filter_map(|e| derive_ws(&e.url)).collect())
        }
        Some(toml::Value::Array(items)) => {
            let (count, mut out) = (items.len(), Vec::with_capacity(items.len()));
            for (j, item) in items.into_iter().enumerate() {
                match url_entry(item, &["ws", "wss"], USAGE) {
                    Ok((url, None)) => out.push(url),
                    Ok((_, Some(_))) => f.problem(
                        &format!("ws_urls[{j}]"),
                        "max_requests_per_second applies to rpc_urls only".into(),
                    ),
                    Err(e) => f.problem(&format!("ws_urls[{j}]"), e),
                }
            }
            (out.len() == count).then_some(out)
        }
        Some(_) => {
            f.problem("ws_urls", "must be \"derive\" or a list of ws:// or wss:// URLs".into());
            None
        }
    }
}

/// The WebSocket URL of an HTTP endpoint: the same URL with ws/wss.
fn derive_ws(http: &Secret) -> Option<Secret> {
    let mut u = url::Url::parse(http.expose()).ok()?;
    let scheme = if u.scheme() == "https" { "wss" } else { "ws" };
    u.set_scheme(scheme).ok()?;
    Some(Secret::new(u.to_string()))
}

/// A URL entry: a string, or a table with `url` or `url_file` (and, where
/// allowed, `max_requests_per_second`), whose scheme is one of `schemes`.
/// Messages never repeat the URL: it may hold an API key.
fn url_entry(value: toml::Value, schemes: &[&str], usage: &str) -> Result<(Secret, Option<f64>), String> {
    let (url, rate) = match value {
        toml::Value::String(u) => (u, None),
        toml::Value::Table(mut t) => {
            let url = match (t.remove("url"), t.remove("url_file")) {
                (Some(toml::Value::String(u)), None) => u,
                (None, Some(toml::Value::String(path))) => read_secret(&path)?.expose().to_string(),
                _ => return Err(usage.into()),
            };
            let rate = match t.remove("max_requests_per_second") {
                None => None,
                Some(toml::Value::Integer(n)) if n > 0 => Some(n as f64),
                Some(toml::Value::Float(x)) if x > 0.0 => Some(x),
                Some(_) => return Err("max_requests_per_second must be a positive number".into()),
            };
            if let Some(k) = t.keys().next() {
                return Err(format!("unknown key {k:?} in endpoint table"));
            }
            (url, rate)
        }
        _ => return Err(usage.into()),
    };
    match url::Url::parse(url.trim()) {
        Ok(p) if schemes.contains(&p.scheme()) && p.host_str().is_some() => Ok((Secret::new(url.trim()), rate)),
        _ => Err(format!(
            "must be a URL with a host and the scheme {}://",
            schemes.join(":// or ")
        )),
    }
}

/// The trimmed content of a secret file.
fn read_secret(path: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("{path} is empty"));
    }
    Ok(Secret::new(trimmed))
}

/// Rules that involve more than one stream.
fn check_streams_together(streams: &[StreamConfig], problems: &mut Vec<Problem>) {
    let mut names = HashSet::new();
    for (i, s) in streams.iter().enumerate() {
        if !names.insert(s.name.as_str()) {
            problems.push(Problem {
                key: format!("streams[{i}].name"),
                message: format!(
                    "{:?} is used by an earlier stream; names are cursor ids and must be unique",
                    s.name
                ),
            });
        }
    }
    // Events are keyed by (chain_id, tx_hash, log_index) across streams, so
    // two streams watching the same event of the same contract would each
    // see the other's rows as duplicates; refuse the ambiguity.
    let mut watched: Vec<(usize, u64, Address, BTreeSet<[u8; 32]>)> = Vec::new();
    for (i, s) in streams.iter().enumerate() {
        let Ok(set) = EventSet::parse(&s.events) else {
            continue;
        };
        let topics: BTreeSet<[u8; 32]> = set.topic0s().into_iter().map(|t| t.0).collect();
        for a in &s.addresses {
            if let Some((j, ..)) = watched
                .iter()
                .find(|(j, c, wa, wt)| *j != i && *c == s.chain_id && wa == a && !wt.is_disjoint(&topics))
            {
                problems.push(Problem {
                    key: format!("streams[{i}].addresses"),
                    message: format!(
                        "{a} on chain {} with an overlapping event is already watched by streams[{j}]; an event is stored once, so two streams cannot share it",
                        s.chain_id
                    ),
                });
            }
            watched.push((i, s.chain_id, *a, topics.clone()));
        }
    }
}

/// Timeout combinations that would break the lock bound (I6).
fn check_timeouts(db: &DatabaseConfig, streams: &[StreamConfig], problems: &mut Vec<Problem>) {
    if db.lock_timeout >= db.statement_timeout {
        problems.push(Problem {
            key: "database.lock_timeout".into(),
            message: format!(
                "({}) must be shorter than database.statement_timeout ({}): the lock wait is part of a statement",
                humantime::format_duration(db.lock_timeout),
                humantime::format_duration(db.statement_timeout)
            ),
        });
    }
    for (i, s) in streams.iter().enumerate() {
        let worst = s.rpc_timeout.saturating_mul(s.rpc_attempts);
        if worst >= db.idle_in_transaction_timeout {
            problems.push(Problem {
                key: format!("streams[{i}].rpc_timeout"),
                message: format!(
                    "({}) × rpc_attempts ({}) = {} must be shorter than database.idle_in_transaction_timeout ({}): the transaction is idle while RPC requests run",
                    humantime::format_duration(s.rpc_timeout),
                    s.rpc_attempts,
                    humantime::format_duration(worst),
                    humantime::format_duration(db.idle_in_transaction_timeout)
                ),
            });
        }
    }
}

/// Reads the keys of one TOML table, recording a [`Problem`] for each
/// missing, mistyped or unknown key instead of stopping at the first.
struct Fields<'a> {
    table: &'a toml::Table,
    prefix: String,
    problems: &'a mut Vec<Problem>,
    /// Keys read so far; whatever else the table holds is unknown.
    known: HashSet<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(table: &'a toml::Table, prefix: &str, problems: &'a mut Vec<Problem>) -> Self {
        Self {
            table,
            prefix: prefix.to_string(),
            problems,
            known: HashSet::new(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn problem(&mut self, key: &str, message: String) {
        let key = self.key(key);
        self.problems.push(Problem { key, message });
    }

    fn optional<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<T> {
        self.known.insert(key);
        let value = self.table.get(key)?.clone();
        let kind = value.type_str();
        match T::deserialize(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let msg = e.message().to_string();
                self.problem(key, format!("wrong type ({kind}): {msg}"));
                None
            }
        }
    }

    fn required<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<T> {
        if !self.table.contains_key(key) {
            self.known.insert(key);
            self.problem(key, "required".into());
            return None;
        }
        self.optional(key)
    }

    /// A duration such as "1s", "250ms", "2m"; `default` when absent.
    fn duration(&mut self, key: &'static str, default: &str) -> Option<Duration> {
        let text = self.optional::<String>(key).unwrap_or_else(|| default.to_string());
        match humantime::parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(key, format!("not a duration like \"1s\" or \"250ms\": {e}"));
                None
            }
        }
    }

    /// An integer within `range`; `default` when absent (`None`: required).
    fn int_in(&mut self, key: &'static str, default: Option<i64>, range: std::ops::RangeInclusive<i64>) -> Option<u64> {
        let v = match default {
            Some(d) => self
                .optional::<i64>(key)
                .or(if self.table.contains_key(key) { None } else { Some(d) })?,
            None => self.required::<i64>(key)?,
        };
        if !range.contains(&v) {
            self.problem(
                key,
                format!("must be between {} and {}, got {v}", range.start(), range.end()),
            );
            return None;
        }
        u64::try_from(v).ok()
    }

    fn positive_duration(&mut self, key: &'static str, default: &str) -> Option<Duration> {
        let d = self.duration(key, default)?;
        if d.is_zero() {
            self.problem(key, "must be greater than zero".into());
            return None;
        }
        Some(d)
    }

    /// A required, non-empty list whose items each pass `item`; every bad
    /// item is reported with its index.
    fn list<T, R>(&mut self, key: &'static str, what: &str, item: impl Fn(T) -> Result<R, String>) -> Option<Vec<R>>
    where
        T: DeserializeOwned,
    {
        let raw: Vec<T> = self.required(key)?;
        if raw.is_empty() {
            self.problem(key, format!("must list {what}"));
            return None;
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut ok = true;
        for (j, v) in raw.into_iter().enumerate() {
            match item(v) {
                Ok(r) => out.push(r),
                Err(msg) => {
                    self.problem(&format!("{key}[{j}]"), msg);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// The trimmed content of the file named by `key` (orchestrators mount
    /// secrets as files). Problems name the key and the path, never the content.
    fn secret_file(&mut self, key: &'static str) -> Option<Secret> {
        let path: String = self.optional(key)?;
        match read_secret(&path) {
            Ok(s) => Some(s),
            Err(e) => {
                self.problem(key, e);
                None
            }
        }
    }

    /// One of `choices` (by name); `default` when absent.
    fn choice<T: Copy>(&mut self, key: &'static str, default: &str, choices: &[(&str, T)]) -> Option<T> {
        let text = self.optional::<String>(key).unwrap_or_else(|| default.to_string());
        let found = choices.iter().find(|(name, _)| *name == text).map(|(_, v)| *v);
        if found.is_none() {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            self.problem(key, format!("must be one of {names:?}, got {text:?}"));
        }
        found
    }

    fn table(&mut self, key: &'static str) -> Option<toml::Table> {
        self.optional(key)
    }

    fn array_of_tables(&mut self, key: &'static str) -> Option<Vec<toml::Table>> {
        self.optional(key)
    }

    /// Records every key that was never asked for.
    fn finish(self) {
        let unknown: Vec<String> = self
            .table
            .keys()
            .filter(|k| !self.known.contains(k.as_str()))
            .map(|k| {
                if self.prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{}.{k}", self.prefix)
                }
            })
            .collect();
        for key in unknown {
            self.problems.push(Problem {
                key,
                message: "unknown key".into(),
            });
        }
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
