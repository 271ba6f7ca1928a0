//! The crate as a library: an application embeds logcursor, registers its
//! Rust [`Handler`]s per stream, and runs with the same command line,
//! configuration, telemetry and signals as the `logcursor` binary (which is
//! itself `Service::new().run()`).
//!
//! ```no_run
//! use logcursor::{Event, Handler, HandlerError, Service, Transaction};
//!
//! /// Counts the stream's events in a table of the application's own.
//! struct Count;
//!
//! #[logcursor::async_trait]
//! impl Handler for Count {
//!     async fn handle(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
//!         let n = events.len() as i64;
//!         tx.execute("UPDATE event_count SET n = n + $1", &[&n]).await?;
//!         Ok(())
//!     }
//!
//!     async fn revert(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
//!         let n = events.len() as i64;
//!         tx.execute("UPDATE event_count SET n = n - $1", &[&n]).await?;
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     // `my-app run --config app.toml`, `my-app dlq replay --all`, … as with
//!     // `logcursor`; the handler runs for the stream named "transfers".
//!     Service::new().handler("transfers", Count).run()
//! }
//! ```
//!
//! Every command that stores or removes events runs the handlers: `run`
//! (ticks and gap fill), `dlq replay` (a parked event is handled once when
//! it is stored) and `rewind` (`revert` for what it removes). Replay and
//! rewind a stream with Rust handlers from the application that registers
//! them: the stock `logcursor` binary knows none, so a replay there would
//! store the event without its effect.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::app::HandlerMap;
use crate::cli::{self, Cli, EX_USAGE};
use crate::config::{Config, ConfigError, Problem};
use crate::write::Handler;

/// An application built on logcursor: its handlers, and the entry point
/// that parses the command line and runs it (see the [module](self) doc).
#[derive(Default)]
pub struct Service {
    /// Rust handlers by stream name, in registration order.
    handlers: HandlerMap,
}

impl Service {
    /// A service with no handlers (what the `logcursor` binary runs).
    pub fn new() -> Service {
        Service::default()
    }

    /// Registers `handler` for the stream named `stream` in the
    /// configuration. A stream may have several handlers: they run in
    /// registration order, in the same savepoint, after the stream's SQL
    /// `handler_function`. A name the configuration does not have is a
    /// configuration error (exit status 64).
    pub fn handler(self, stream: impl Into<String>, handler: impl Handler) -> Service {
        self.shared_handler(stream, Arc::new(handler))
    }

    /// [`Service::handler`] with an instance shared by several streams.
    pub fn shared_handler(mut self, stream: impl Into<String>, handler: Arc<dyn Handler>) -> Service {
        self.handlers.entry(stream.into()).or_default().push(handler);
        self
    }

    /// The handlers registered so far, by stream (for [`crate::App::build_with`]
    /// or [`crate::cli::execute`] in an application that drives those itself).
    pub fn handlers(&self) -> &HandlerMap {
        &self.handlers
    }

    /// Parses this process's command line and runs it: see [`Service::run_from`].
    pub fn run(self) -> ExitCode {
        self.run_from(std::env::args_os())
    }

    /// Parses `args` (the program name first) and runs the command: loads
    /// the configuration, installs telemetry, and runs with the handlers
    /// registered; `run` stops gracefully on SIGTERM or SIGINT. Exit status:
    /// 0 on success, 64 for a bad command line or configuration (every
    /// problem printed), 1 for any other failure (its cause chain printed).
    pub fn run_from<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = match Cli::try_parse_from(args) {
            Ok(c) => c,
            Err(e) if e.use_stderr() => {
                let _ = e.print();
                return ExitCode::from(EX_USAGE);
            }
            Err(e) => {
                let _ = e.print(); // --help, --version
                return ExitCode::SUCCESS;
            }
        };
        let source = cli.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let config = match cli.load_config().and_then(|c| self.check_streams(c, source)) {
            Ok(c) => c,
            Err(e) => {
                eprint!("{e}");
                return ExitCode::from(EX_USAGE);
            }
        };
        let replica_id = cli.replica_id();
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(r) => r,
            Err(e) => return report("cannot start the Tokio runtime", &e),
        };
        runtime.block_on(async {
            let telemetry = match crate::telemetry::init(&replica_id) {
                Ok(t) => t,
                Err(e) => return report("cannot install telemetry", &e),
            };
            let outcome = cli::execute(&cli.command, &config, &replica_id, &self.handlers).await;
            if let Err(e) = &outcome {
                tracing::error!(error = %e, "stopped with an error");
            }
            // Flushing blocks on the exporter: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report("", &e),
            }
        })
    }

    /// Every stream a handler was registered for is configured.
    fn check_streams(&self, config: Config, source_name: String) -> Result<Config, ConfigError> {
        let mut problems: Vec<(String, String)> = crate::app::handler_problems(&config, &self.handlers);
        if problems.is_empty() {
            return Ok(config);
        }
        problems.sort();
        Err(ConfigError {
            source_name,
            problems: problems
                .into_iter()
                .map(|(_, message)| Problem {
                    key: "streams".into(),
                    message,
                })
                .collect(),
        })
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut streams: Vec<(&String, usize)> = self.handlers.iter().map(|(k, v)| (k, v.len())).collect();
        streams.sort();
        f.debug_struct("Service").field("handlers", &streams).finish()
    }
}

/// Prints `e` with its cause chain (`context: e: cause: …`) and returns 1.
fn report(context: &str, e: &dyn std::error::Error) -> ExitCode {
    let mut line = String::from("logcursor: ");
    if !context.is_empty() {
        line.push_str(context);
        line.push_str(": ");
    }
    line.push_str(&e.to_string());
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // `#[error(transparent)]` and "…: {source}" messages repeat their cause.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    eprintln!("{line}");
    ExitCode::FAILURE
}
