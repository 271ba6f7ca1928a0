//! Typed configuration from a TOML file plus the environment.
//!
//! [`Config::load`] reports every problem at once — unknown keys, wrong types,
//! missing keys, values out of range, unset `${VAR}` references, and
//! combinations that break an invariant — each naming its key, e.g.
//! `streams[1].confirmations`. `main` turns them into exit status 64
//! (EX_USAGE).
//!
//! | module     | owns                                                      |
//! |------------|-----------------------------------------------------------|
//! | [`env`]    | `${VAR}` / `${VAR:-default}` in any string value          |
//! | [`fields`] | reading a table key by key, collecting problems           |
//! | `sections` | `[database]`, `[service]`, `[telemetry]`                   |
//! | [`stream`] | one `[[streams]]` table (after `[defaults]`)               |
//! | [`webhook`]| one `[[streams.webhooks]]` table                           |
//!
//! Parse, don't validate: what comes out holds parsed values (a stream's
//! [`EventSet`], its [`StreamName`], [`BlockNumber`]s), so nothing
//! downstream parses or checks them again.

mod checks;
mod env;
mod fields;
mod sections;
mod stream;
pub mod webhook;

use std::fmt;
use std::time::Duration;

use fields::Fields;
use sections::{parse_database, parse_service, parse_telemetry};

use crate::chain::abi::EventSet;
use crate::chain::{ChainError, EndpointConfig, Rpc};
use crate::redact::Secret;
use crate::store::pool::{DbSettings, TxLimits};
use crate::types::{Address, BlockNumber, Hash32, LogFilter, StreamName};
use crate::write::OnFailure;

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
    /// How to connect: the URL (`DATABASE_URL`, else the content of
    /// `url_file`, else `url`), TLS, the schema, the pool.
    pub settings: DbSettings,
    /// How long start-up keeps retrying an unreachable database before it
    /// gives up and exits non-zero.
    pub connect_retry_for: Duration,
    /// The `SET LOCAL` bounds of a tick: `lock_timeout` (how long a tick
    /// waits for the cursor row lock), `statement_timeout`, and
    /// `idle_in_transaction_session_timeout` (the server ends a tick's
    /// session that sits idle this long, e.g. a frozen replica: I6).
    pub limits: TxLimits,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Where `/livez`, `/readyz`, `/metrics` and `/status` are served;
    /// `None` (an empty string in the file) turns the server off.
    pub http_listen: Option<std::net::SocketAddr>,
    /// When set, `/readyz` also fails while a stream is more blocks than
    /// this behind its safe head (off by default: lag takes every replica
    /// out of rotation at once, which helps nobody).
    pub max_lag_blocks: Option<u64>,
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
    pub name: StreamName,
    /// Must equal every endpoint's `eth_chainId`; part of the event key.
    pub chain_id: u64,
    /// JSON-RPC endpoints, preferred in order. Their URLs are secrets:
    /// they often carry API keys.
    pub rpc: Vec<EndpointConfig>,
    /// Contracts whose logs are ingested.
    pub addresses: Vec<Address>,
    /// The decoder of the configured events (parsed once, here).
    pub events: EventSet,
    /// The event signatures as written in the file.
    pub event_signatures: Vec<String>,
    /// First block ingested; only seeds a new cursor (never moves one).
    pub start_block: BlockNumber,
    /// Safe head = latest − confirmations.
    pub confirmations: u64,
    /// The most blocks one tick covers.
    pub max_block_range: u64,
    /// The most logs one tick stores: with `max_block_range`, bounds how
    /// long a tick holds the lock.
    pub max_logs_per_tick: u64,
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
    /// The most time the RPC work of one tick may take, the lock held
    /// meanwhile: a slower endpoint is given up (and cooled down).
    pub rpc_budget: Duration,
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
    /// What to do with a log that does not decode, or whose row the
    /// database refuses.
    pub on_bad_event: OnFailure,
    /// What to do with an event a handler fails on.
    pub on_handler_error: OnFailure,
    /// A SQL function `f(batch events[])` called once per batch of newly
    /// stored rows, in their transaction.
    pub handler_function: Option<String>,
    /// A SQL function `f(batch events[])` called with the rows a rewind removes.
    pub revert_function: Option<String>,
    /// Where the stream's new events are delivered, through the outbox.
    pub webhooks: Vec<webhook::WebhookConfig>,
    /// What to do with a range the provider will not serve.
    pub on_unfetchable_range: UnfetchablePolicy,
    /// Failed attempts at one range before `skip_and_backfill` skips it.
    pub range_attempts: u32,
    /// A stream failing this long reports itself as stuck.
    pub stuck_after: Duration,
    /// The gap-fill worker's settings for this stream's pending ranges.
    pub gapfill: GapFillConfig,
}

impl StreamConfig {
    /// The `eth_getLogs` filter: every address × every configured topic0.
    pub fn filter(&self) -> LogFilter {
        LogFilter {
            addresses: self.addresses.clone(),
            topic0s: self.events.topic0s(),
        }
    }

    /// The safe head at chain head `head`: `confirmations` below it, and no
    /// higher than the `finality` tag's block when the node answered it
    /// (`tagged`). The tick and `logcursor status` both judge by this.
    pub fn safe_head(&self, head: u64, tagged: Option<u64>) -> u64 {
        let by_depth = head.saturating_sub(self.confirmations);
        tagged.map_or(by_depth, |t| by_depth.min(t))
    }

    /// [`StreamConfig::safe_head`] at `head`, asking `rpc` for the finality
    /// tag's block when the stream has one.
    pub async fn safe_head_at(&self, rpc: &Rpc<'_>, head: u64) -> Result<u64, ChainError> {
        let tagged = match self.finality.tag() {
            Some(tag) => rpc.tagged_block(tag).await?,
            None => None,
        };
        Ok(self.safe_head(head, tagged))
    }

    /// What the cursor's meaning depends on (I9).
    pub fn fingerprint(&self) -> Hash32 {
        self.filter().fingerprint(self.chain_id)
    }
}

/// Policy for a range that keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnfetchablePolicy {
    /// Keep retrying it with backoff; the cursor waits.
    Retry,
    /// After `range_attempts` refusals of the range itself (never for rate
    /// limits, 5xx or timeouts), record it in `failed_ranges`, move the
    /// cursor past it, and let the gap-fill worker fetch it later.
    SkipAndBackfill,
}

/// How the gap-fill worker retries a pending range.
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
    /// Find the common ancestor, delete orphaned events (reverting their
    /// effects), move the cursor back to it (audited), and re-ingest.
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

/// The environment the file is read with. Taken as a value so tests need
/// not touch the process environment.
#[derive(Debug, Clone, Default)]
pub struct EnvOverrides {
    /// `DATABASE_URL`: overrides `database.url`.
    pub database_url: Option<String>,
    /// `LOGCURSOR_HTTP_LISTEN`: overrides `telemetry.http_listen`, so that
    /// replicas sharing one file can each have their own port.
    pub http_listen: Option<String>,
    /// The variables `${VAR}` references read; `None`: the process's.
    pub vars: Option<std::collections::HashMap<String, String>>,
}

impl EnvOverrides {
    pub fn from_process() -> Self {
        Self {
            database_url: std::env::var("DATABASE_URL").ok().filter(|s| !s.is_empty()),
            http_listen: std::env::var("LOGCURSOR_HTTP_LISTEN").ok(),
            vars: None,
        }
    }

    fn var(&self, name: &str) -> Option<String> {
        match &self.vars {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
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
        let mut table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(fail(vec![Problem {
                    key: "<syntax>".into(),
                    message: e.to_string().trim().replace('\n', " "),
                }]))
            }
        };
        env::expand(&mut table, &|name| env.var(name), &mut problems);
        let mut root = Fields::new(&table, "", &mut problems);
        let database_table = root.table("database");
        let service_table = root.table("service");
        let telemetry_table = root.table("telemetry");
        let defaults = root.table("defaults");
        let stream_tables = root.array_of_tables("streams");
        root.finish();

        let database = parse_database(database_table.as_ref(), env, &mut problems);
        let service = parse_service(service_table.as_ref(), &mut problems);
        let telemetry = parse_telemetry(telemetry_table.as_ref(), env, &mut problems);
        if let Some(d) = &defaults {
            for k in d.keys().filter(|k| !stream::KEYS.contains(&k.as_str()) || *k == "name") {
                problems.push(Problem {
                    key: format!("defaults.{k}"),
                    message: if k == "name" {
                        "a name is each stream's own".into()
                    } else {
                        "unknown key (defaults take the keys of a stream)".into()
                    },
                });
            }
        }
        let mut streams = Vec::new();
        match stream_tables {
            Some(ts) if !ts.is_empty() => {
                for (i, t) in ts.iter().enumerate() {
                    let merged = with_defaults(t, defaults.as_ref());
                    if let Some(s) = stream::parse_stream(&merged, i, &mut problems) {
                        streams.push(s);
                    }
                }
            }
            _ => problems.push(Problem {
                key: "streams".into(),
                message: "at least one [[streams]] table is required".into(),
            }),
        }
        checks::check_streams_together(&streams, &mut problems);
        if let Some(db) = &database {
            checks::check_timeouts(db, &streams, &mut problems);
            for (i, s) in streams.iter().enumerate() {
                let channel = s.name.channel(&db.settings.schema);
                if channel.len() > 63 {
                    problems.push(Problem {
                        key: format!("streams[{i}].name"),
                        message: format!(
                            "with database.schema the notification channel {channel:?} is longer than PostgreSQL's 63 bytes: shorten the stream name or the schema"
                        ),
                    });
                }
            }
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

/// A stream table with every `[defaults]` key it does not set itself.
fn with_defaults(stream: &toml::Table, defaults: Option<&toml::Table>) -> toml::Table {
    let mut merged = defaults.cloned().unwrap_or_default();
    merged.retain(|k, _| stream::KEYS.contains(&k) && k != "name");
    for (k, v) in stream {
        merged.insert(k.clone(), v.clone());
    }
    merged
}

#[cfg(test)]
mod tests;
