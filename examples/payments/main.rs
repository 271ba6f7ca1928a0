//! Payments, the example of logcursor as a library: every `Burned(address
//! indexed from, uint256 amount)` credits `amount` to `from`'s balance,
//! exactly once across replicas, SIGKILLs, reorgs and replays. An unknown
//! account's burn is parked in `dead_letters`; once the account exists,
//! `payments dlq replay` credits it, once. See README.md next to this file.
//!
//! The command line is logcursor's own (`run`, `migrate`, `status`, `dlq …`,
//! `rewind`, …). `PAYMENTS_CREDIT` chooses who credits: `rust` (the
//! default) registers the Rust handler of `credit.rs` for the stream
//! `PAYMENTS_STREAM` (default `burns`); `sql` registers nothing, for a
//! database where `trigger.sql` or `function.sql` does the crediting.

mod credit;

use std::process::ExitCode;

use logcursor::Service;

fn main() -> ExitCode {
    let stream = std::env::var("PAYMENTS_STREAM").unwrap_or_else(|_| "burns".into());
    let service = Service::new();
    match std::env::var("PAYMENTS_CREDIT").as_deref() {
        Ok("rust") | Err(_) => service.handler(stream, credit::Credit).run(),
        Ok("sql") => service.run(),
        Ok(other) => {
            eprintln!("payments: PAYMENTS_CREDIT={other:?}: use rust or sql");
            ExitCode::from(logcursor::cli::EX_USAGE)
        }
    }
}
