//! The command line: `run`, `migrate`, `status`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::app::{App, AppError, BuildOptions};
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
    /// Dead letters: logs that did not decode, kept whole.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
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

/// Runs a parsed command to completion.
pub async fn execute(command: &Command, cfg: &Config, replica_id: &str) -> Result<(), AppError> {
    match command {
        Command::Run { no_migrate } => {
            // Handlers go in before anything starts, so an early signal is never lost.
            let shutdown = crate::shutdown::install().map_err(|e| AppError::Stream {
                stream: "-".into(),
                reason: format!("cannot install signal handlers: {e}"),
            })?;
            let app = match App::build(cfg, replica_id, BuildOptions { migrate: !no_migrate }, &shutdown).await {
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
            let mut client = db.get().await?;
            let applied = migrate::migrate(&mut client, replica_id).await?;
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
            let r = crate::admin::rewind(cfg, replica_id, stream, *to).await?;
            println!(
                "rewound stream {} from block {} to {}; deleted {} events above it",
                r.stream, r.from, r.to, r.events_deleted
            );
            Ok(())
        }
        Command::Dlq { action } => dlq(action, cfg, replica_id).await,
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

async fn dlq(action: &DlqAction, cfg: &Config, replica_id: &str) -> Result<(), AppError> {
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
                return Err(AppError::Stream {
                    stream: "-".into(),
                    reason: format!("no dead letter with id {id}"),
                });
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
            println!("error:        {}\nattempts:     {}", d.error, d.attempts);
        }
        DlqAction::Replay { ids, all } => {
            let ids: &[i64] = if *all { &[] } else { ids };
            let r = admin::dlq_replay(cfg, replica_id, ids).await?;
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
