//! Wiring only: arguments → configuration → telemetry → command → exit code.

use std::process::ExitCode;

use clap::Parser;
use logcursor::cli::{self, Cli, EX_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
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
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let replica_id = cli.replica_id();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return report(anyhow::Error::new(e).context("cannot start the Tokio runtime")),
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let telemetry = logcursor::telemetry::init(&replica_id)?;
        let outcome = cli::execute(&cli.command, &config, &replica_id, &Default::default()).await;
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "stopped with an error");
        }
        // Flushing blocks on the exporter: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        Ok(outcome?)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(e),
    }
}

fn report(e: anyhow::Error) -> ExitCode {
    eprintln!("logcursor: {e:#}");
    ExitCode::FAILURE
}
