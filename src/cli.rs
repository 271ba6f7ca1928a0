//! The command line: `run`, `migrate`, `status`, `rewind`, `dlq …`,
//! `gapfill …`, `adopt-filter`. An embedding application runs the same
//! command line with its handlers registered (see [`crate::Service`]).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::app::{App, AppError, BuildOptions, HandlerMap};
use crate::config::{Config, ConfigError, EnvOverrides, Problem};
use crate::store::migrate;

/// Exit status for a bad command line or configuration (EX_USAGE).
pub const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "logcursor",
    version,
    about = "Ingest EVM contract events into PostgreSQL exactly once, across N replicas."
)]
pub struct Cli {
    /// The TOML configuration file.
    #[arg(long, env = "LOGCURSOR_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// This replica's name in logs, as PostgreSQL application_name, and in
    /// block_cursors.updated_by (default: hostname-pid).
    #[arg(long, env = "LOGCURSOR_REPLICA_ID", global = true)]
    pub replica_id: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every configured stream until SIGTERM/SIGINT.
    Run {
        /// Do not apply migrations at start (for a role without DDL rights;
        /// run `logcursor migrate` with an owner role instead).
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply the migrations in sql/ and exit.
    Migrate,
    /// Move a stream's cursor back to block N (deleting its events above N,
    /// audited in cursor_rewinds); resumes a stream halted by a deep reorg.
    Rewind {
        /// The stream (its name in the configuration).
        #[arg(long)]
        stream: String,
        /// The block to rewind to: every block above it is ingested again.
        #[arg(long)]
        to: i64,
    },
    /// Dead letters: logs that did not decode, that the database refused,
    /// or that a handler failed on, kept whole.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Ranges below a cursor still to fetch: skipped ranges and backfills of
    /// what a changed filter adds.
    Gapfill {
        #[command(subcommand)]
        action: GapfillAction,
    },
    /// Webhook deliveries (the outbox): list them, send dead ones again,
    /// or discard them.
    Outbox {
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// Durable SQL consumers of a stream (see `logcursor_claim`): list them
    /// with their lag, or move one.
    Consumers {
        #[command(subcommand)]
        action: ConsumersAction,
    },
    /// Remove Rust handlers from those a stream's events are written with
    /// (a handler retired on purpose): a program without them may write
    /// the stream again. Events stored or rewound from then on go without
    /// their effects; stop every program that runs them first (it would
    /// record them again).
    RetireHandler {
        /// The stream (its name in the configuration).
        #[arg(long)]
        stream: String,
        /// The handlers' names, as `Handler::name` gives them.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Make this configuration's filter (addresses × events) the one the
    /// stream's cursor advances under, backfilling what it adds: to return
    /// to a filter that a newer deployment replaced.
    AdoptFilter {
        /// The stream (its name in the configuration).
        #[arg(long)]
        stream: String,
    },
    /// Print each stream's cursor, heads, lag and event count.
    Status {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters, oldest first.
    List {
        /// Only this stream's.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Show one dead letter whole: topics, data, error, attempts.
    Show { id: i64 },
    /// Fetch again, decode with the current config, store what decodes.
    Replay {
        /// Dead letter ids (or --all).
        #[arg(required_unless_present = "all")]
        ids: Vec<i64>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete dead letters for good.
    Discard {
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OutboxAction {
    /// List deliveries, newest first.
    List {
        /// Only this webhook's.
        #[arg(long)]
        webhook: Option<String>,
        /// Only those with this status: pending, delivered or dead.
        #[arg(long)]
        status: Option<String>,
    },
    /// Send dead deliveries again (same delivery id and body): ids, or --all.
    Replay {
        #[arg(required_unless_present = "all")]
        ids: Vec<i64>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete deliveries for good.
    Discard {
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConsumersAction {
    /// List consumers: stream, position, lag.
    List,
    /// Move a consumer: --to start | latest | XID/ID (a position `list` shows).
    Reset {
        name: String,
        #[arg(long)]
        to: crate::store::consumers::Target,
    },
}

#[derive(Debug, Subcommand)]
pub enum GapfillAction {
    /// List pending ranges: kind, blocks, progress, attempts, last error.
    List {
        /// Only this stream's.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Make ranges due now with their attempts reset (ids, or --dead for
    /// every dead one).
    Retry {
        #[arg(required_unless_present = "dead")]
        ids: Vec<i64>,
        #[arg(long, conflicts_with = "ids")]
        dead: bool,
    },
}

impl Cli {
    /// The validated configuration, or every problem with it.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let Some(path) = &self.config else {
            return Err(ConfigError {
                source_name: "the command line".into(),
                problems: vec![Problem {
                    key: "--config".into(),
                    message: "required (or set LOGCURSOR_CONFIG)".into(),
                }],
            });
        };
        Config::load(path, &EnvOverrides::from_process())
    }

    /// `--replica-id`, else `hostname-pid`.
    pub fn replica_id(&self) -> String {
        self.replica_id.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| {
            format!(
                "{}-{}",
                gethostname::gethostname().to_string_lossy(),
                std::process::id()
            )
        })
    }
}

/// Runs a parsed command to completion, with `handlers` registered.
pub async fn execute(command: &Command, cfg: &Config, replica_id: &str, handlers: &HandlerMap) -> Result<(), AppError> {
    match command {
        Command::Run { no_migrate } => {
            // Handlers go in before anything starts, so an early signal is never lost.
            let shutdown = crate::shutdown::install().map_err(AppError::Signals)?;
            let opts = BuildOptions { migrate: !no_migrate };
            let app = match App::build_with(cfg, replica_id, opts, handlers, &shutdown).await {
                // A stop asked for during start-up is still a graceful stop.
                Err(AppError::Interrupted) => {
                    tracing::info!("stopped during start-up, before any tick");
                    return Ok(());
                }
                other => other?,
            };
            app.run(shutdown).await.map(|_| ())
        }
        Command::Migrate => {
            let db = crate::admin::connect(cfg, replica_id).await?;
            let applied = migrate::migrate(&db, replica_id).await?;
            let views = crate::views::define(&db, cfg).await?;
            println!("typed views: {}", views.join(", "));
            println!(
                "{}",
                if applied.is_empty() {
                    "schema is up to date".to_string()
                } else {
                    format!("applied migrations {applied:?}")
                }
            );
            Ok(())
        }
        Command::Rewind { stream, to } => {
            let r = crate::admin::rewind(cfg, replica_id, handlers, stream, *to).await?;
            println!(
                "rewound stream {} from block {} to {}; deleted {} events above it",
                r.stream, r.from, r.to, r.events_deleted
            );
            Ok(())
        }
        Command::Dlq { action } => dlq(action, cfg, replica_id, handlers).await,
        Command::Gapfill { action } => gapfill(action, cfg, replica_id).await,
        Command::Outbox { action } => outbox(action, cfg, replica_id).await,
        Command::Consumers { action } => consumers(action, cfg, replica_id).await,
        Command::RetireHandler { stream, names } => {
            let left = crate::admin::retire_handlers(cfg, replica_id, stream, names).await?;
            println!("stream {stream}: retired {names:?}; it now records the Rust handlers {left:?}");
            Ok(())
        }
        Command::AdoptFilter { stream } => {
            let added = crate::admin::adopt_filter(cfg, replica_id, stream).await?;
            println!(
                "stream {stream} now advances under this configuration's filter; {} backfill range(s) recorded",
                added.len()
            );
            Ok(())
        }
        Command::Status { json } => {
            let rows = crate::status::collect(cfg, replica_id).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
            } else {
                print!("{}", crate::status::render_table(&rows));
            }
            Ok(())
        }
    }
}

async fn outbox(action: &OutboxAction, cfg: &Config, replica_id: &str) -> Result<(), AppError> {
    use crate::admin::delivery as admin;
    match action {
        OutboxAction::List { webhook, status } => {
            let rows = admin::outbox_list(cfg, replica_id, webhook.as_deref(), status.as_deref()).await?;
            println!(
                "{:>8}  {:<36}  {:<12} {:<16} {:<7} {:>6}  {:<9} {:>8}  {:>6}  LAST ERROR",
                "ID", "DELIVERY ID", "STREAM", "WEBHOOK", "KIND", "EVENTS", "STATUS", "ATTEMPTS", "HTTP"
            );
            for r in &rows {
                println!(
                    "{:>8}  {:<36}  {:<12} {:<16} {:<7} {:>6}  {:<9} {:>8}  {:>6}  {}",
                    r.id,
                    r.delivery_id,
                    r.stream,
                    r.webhook,
                    r.kind,
                    r.events,
                    r.status,
                    r.attempts,
                    r.last_status.map_or("-".into(), |s| s.to_string()),
                    r.last_error.as_deref().unwrap_or("")
                );
            }
            println!("{} deliveries", rows.len());
        }
        OutboxAction::Replay { ids, all } => {
            let ids: &[i64] = if *all { &[] } else { ids };
            let r = admin::outbox_replay(cfg, replica_id, ids).await?;
            for id in &r.refused {
                println!(
                    "delivery {id} not replayed: a rewind removed events it carries (and sent their revert if \
                     the webhook was configured then); `logcursor outbox discard {id}` drops it"
                );
            }
            println!("{} dead deliveries due again, {} refused", r.due, r.refused.len());
        }
        OutboxAction::Discard { ids } => {
            let n = admin::outbox_discard(cfg, replica_id, ids).await?;
            println!("discarded {n} deliveries");
        }
    }
    Ok(())
}

async fn consumers(action: &ConsumersAction, cfg: &Config, replica_id: &str) -> Result<(), AppError> {
    use crate::admin::delivery as admin;
    match action {
        ConsumersAction::List => {
            let rows = admin::consumers_list(cfg, replica_id).await?;
            println!(
                "{:<24} {:<16} {:<24} {:>8} {:>8}",
                "CONSUMER", "STREAM", "POSITION", "LAG", "REVERTS"
            );
            for c in &rows {
                println!(
                    "{:<24} {:<16} {:<24} {:>8} {:>8}",
                    c.name, c.stream, c.position, c.lag, c.reverts
                );
            }
        }
        ConsumersAction::Reset { name, to } => {
            let at = admin::consumers_reset(cfg, replica_id, name, to).await?;
            println!("consumer {name} now at {at}");
        }
    }
    Ok(())
}

async fn gapfill(action: &GapfillAction, cfg: &Config, replica_id: &str) -> Result<(), AppError> {
    use crate::admin;
    match action {
        GapfillAction::List { stream } => {
            let rows = admin::gapfill_list(cfg, replica_id, stream.as_deref()).await?;
            println!(
                "{:>6}  {:<12} {:<8} {:>10} {:>10} {:>10}  {:>8}  {:<5}  LAST ERROR",
                "ID", "STREAM", "KIND", "FROM", "TO", "DONE TO", "ATTEMPTS", "DEAD"
            );
            for r in &rows {
                println!(
                    "{:>6}  {:<12} {:<8} {:>10} {:>10} {:>10}  {:>8}  {:<5}  {}",
                    r.id,
                    r.stream,
                    r.kind.as_str(),
                    r.from_block,
                    r.to_block,
                    r.done_to,
                    r.attempts,
                    r.dead,
                    r.last_error
                );
            }
            println!("{} pending ranges", rows.len());
        }
        GapfillAction::Retry { ids, dead } => {
            let n = admin::gapfill_retry(cfg, replica_id, ids, *dead).await?;
            println!("{n} ranges due now");
        }
    }
    Ok(())
}

async fn dlq(action: &DlqAction, cfg: &Config, replica_id: &str, handlers: &HandlerMap) -> Result<(), AppError> {
    use crate::admin;
    match action {
        DlqAction::List { stream } => {
            let rows = admin::dlq_list(cfg, replica_id, stream.as_deref(), &[]).await?;
            println!(
                "{:>6}  {:<12} {:>10}  {:<68} {:>5}  {:>8}  ERROR",
                "ID", "STREAM", "BLOCK", "TX", "LOG", "ATTEMPTS"
            );
            for d in &rows {
                println!(
                    "{:>6}  {:<12} {:>10}  {:<68} {:>5}  {:>8}  {}",
                    d.id,
                    d.stream,
                    d.log.block_number,
                    d.log.tx_hash.to_string(),
                    d.log.log_index,
                    d.attempts,
                    d.error
                );
            }
            println!("{} dead letters", rows.len());
        }
        DlqAction::Show { id } => {
            let rows = admin::dlq_list(cfg, replica_id, None, &[*id]).await?;
            let Some(d) = rows.first() else {
                return Err(AppError::NotFound(format!("no dead letter with id {id}")));
            };
            println!(
                "id:           {}\nstream:       {}\nchain id:     {}",
                d.id, d.stream, d.chain_id
            );
            println!(
                "block:        {} ({})\ntx:           {}\nlog index:    {}",
                d.log.block_number, d.log.block_hash, d.log.tx_hash, d.log.log_index
            );
            println!("address:      {}", d.log.address);
            for (i, t) in d.log.topics.iter().enumerate() {
                println!("topic[{i}]:     {t}");
            }
            println!("data:         0x{}", hex::encode(&d.log.data));
            println!(
                "kind:         {}\nerror:        {}\nattempts:     {}",
                d.kind.as_str(),
                d.error,
                d.attempts
            );
        }
        DlqAction::Replay { ids, all } => {
            let ids: &[i64] = if *all { &[] } else { ids };
            let r = admin::dlq_replay(cfg, replica_id, handlers, ids).await?;
            for (id, why) in &r.still_failing {
                println!("dead letter {id} still fails: {why}");
            }
            println!(
                "replayed: {} stored, {} still failing",
                r.stored.len(),
                r.still_failing.len()
            );
        }
        DlqAction::Discard { ids } => {
            let n = admin::dlq_discard(cfg, replica_id, ids).await?;
            println!("discarded {n} dead letters");
        }
    }
    Ok(())
}
