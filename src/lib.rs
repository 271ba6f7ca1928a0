//! logcursor ingests EVM contract events into PostgreSQL exactly once while
//! N identical replicas run side by side. Replicas serialize on one row per
//! stream (`block_cursors`, locked `FOR UPDATE` for a whole tick), so a range
//! is fetched and stored by one replica only, and a waiter resumes from
//! where the holder committed. A user's own effects (SQL triggers, a
//! set-based SQL function, Rust [`Handler`]s) run in the transaction that
//! stores their events, so they too happen exactly once.
//!
//! # As a library
//!
//! An application embeds logcursor to run its own logic on each event,
//! atomically with the cursor: it implements [`Handler`] and runs a
//! [`Service`], which is the whole `logcursor` command line (config, `run`,
//! `dlq replay`, `rewind`, …, telemetry, signals) with the handlers
//! registered. `examples/payments` is a complete one.
//!
//! ```no_run
//! use logcursor::{Event, Handler, HandlerError, Service, Transaction};
//!
//! struct Credit;
//!
//! #[logcursor::async_trait]
//! impl Handler for Credit {
//!     async fn handle(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), HandlerError> {
//!         for (i, e) in events.iter().enumerate() {
//!             let (account, amount) = (e.params["from"].as_str(), e.params["amount"].as_str());
//!             let n = tx
//!                 .execute(
//!                     "UPDATE balances SET amount = amount + $2::text::numeric WHERE account = $1",
//!                     &[&account, &amount],
//!                 )
//!                 .await?;
//!             if n == 0 {
//!                 // Parks this event in dead_letters; the rest of the batch commits.
//!                 return Err(HandlerError::at(i, "unknown account"));
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     Service::new().handler("burns", Credit).run()
//! }
//! ```
//!
//! The public surface, re-exported here: [`Service`] (the entry point),
//! [`Handler`], [`HandlerError`], [`Event`] and [`Transaction`] (what a
//! handler sees), [`async_trait`](macro@async_trait) (to implement it), and
//! [`tokio_postgres`] (the client the transaction belongs to, for its
//! parameter types). [`App`], [`BuildOptions`], [`HandlerMap`] and
//! [`Config`] are for an application that builds and runs replicas itself
//! (tests do). Everything else is public for the binary, the tests and
//! the curious, and may change.
//!
//! SQL handlers need no Rust at all: a row trigger `AFTER INSERT` on
//! `events`, or a set-based `handler_function`; see the README section
//! "Handlers: your effects, exactly once" and [`write`](mod@write).
//!
//! # Layers
//!
//! Dependencies point down: a module imports only modules on lower rows
//! (never its own row). `layers.rs` (a test) reads this drawing and every
//! `crate::`/`super::` path of `src/`, and fails on an import that points
//! up or sideways, or on a cycle.
//!
//! ```text
//! service                            the crate's entry point: handlers + command line → cli
//! cli                                command line → config → app
//! admin, status                      operator commands
//! app                                build and run replicas
//! http, telemetry                    endpoints; logs, traces, metrics export
//! delivery, views                    webhook workers; typed views per event
//! poller                             the tick (one transaction) and the loops
//! config                             TOML + env → the typed values of the rows below
//! write                              the one write seam: rows, handlers, outbox
//! chain, store                       JSON-RPC (only importer of ethers) | PostgreSQL
//! types, backoff, redact, metrics, shutdown   leaves
//! ```
//!
//! | module       | owns                                                         |
//! |--------------|--------------------------------------------------------------|
//! | [`types`]    | domain primitives: addresses, hashes, logs, blocks, stream names |
//! | [`backoff`]  | the one retry schedule type, and every schedule               |
//! | [`config`]   | TOML + env → typed config; every problem reported at once     |
//! | [`chain`]    | the only user of ethers: JSON-RPC client, ABI decoding        |
//! | [`store`]    | PostgreSQL: pool, migrations, one module per table            |
//! | [`write`]    | the write seam: events, handlers, outbox, isolation of failing rows |
//! | [`delivery`] | webhook delivery workers (the outbox, claimed and POSTed)     |
//! | [`poller`]   | the tick, the per-stream loop, gap fill                       |
//! | [`app`]      | build (connect, migrate, verify chain, seed) and run (drain)  |
//! | [`status`]   | `logcursor status`                                            |
//! | [`views`]    | typed views per event (`<stream>_<event>`)                    |
//! | [`admin`]    | `logcursor rewind`, `dlq`, `gapfill`, `adopt-filter`          |
//! | [`service`]  | the entry point for the binary and embedding applications     |
//! | [`cli`]      | command line                                                  |
//! | [`shutdown`] | SIGTERM/SIGINT → cancellation token                           |
//! | [`telemetry`]| tracing subscriber; OTLP export of spans and the registry     |
//! | [`metrics`]  | the one registry (prometheus-client); `series!` structs       |
//! | [`http`]     | `/livez`, `/readyz`, `/metrics`, `/status`                    |
//! | [`redact`]   | secrets that never print, URLs with keys removed              |
//!
//! # Invariants
//!
//! Each is stated where it is enforced, and each has a test that fails if
//! it breaks (`tests/it/`).
//!
//! - **I1** every canonical log at or below the cursor is stored exactly
//!   once, keyed by (chain_id, tx_hash, log_index) — [`store::events`]; or
//!   parked whole in `dead_letters`, never both — [`write`].
//! - **I2** no stored row comes from an orphaned block at or below the safe
//!   head — only blocks at or below the safe head are read, and every range
//!   is chained to the stored cursor hash and checked unchanged after it
//!   was read ([`poller::verify`]); operator commands check the chain too
//!   ([`admin`]).
//! - **I3** the cursor never moves backward — [`store::cursor::advance`];
//!   the one exception is an audited rewind ([`store::reorg::rewind`]). A
//!   cursor found lower than a replica last saw (a failover that lost
//!   commits) is logged and counted, never hidden ([`poller::Poller`]).
//! - **I4** no gaps: the chain's logs for (start, cursor] equal the stored
//!   rows — events and cursor commit in one transaction ([`poller::tick`]),
//!   a range written in parts ends at the last part before any gap
//!   ([`poller::parts`]), and skipped ranges and backfills are recorded in
//!   the transaction that passes them ([`store::failed_ranges`]).
//! - **I5** after faults stop, the cursor reaches the safe head within a
//!   bounded time — [`poller`] (capped backoff, every failure retried).
//! - **I6** no session stays idle in transaction longer than the configured
//!   bound — [`poller::tick`] (a heartbeat while the tick waits on the chain;
//!   only a frozen replica goes idle, and the server ends it).
//! - **I7** a webhook delivery happens at least once, with the same
//!   idempotency key on every attempt, until it is delivered or dead (a
//!   status that will never succeed, or its configured attempts spent) —
//!   [`delivery`]; a revert is sent only after every delivery it undoes is
//!   delivered or dead ([`store::outbox`]).
//! - **I8** no input from the chain can stop a stream: strings `jsonb`
//!   cannot hold are kept as their bytes ([`chain::abi`]), and a row
//!   PostgreSQL refuses is isolated and parked ([`write`]).
//! - **I9** a cursor advances only under the filter it records; what a
//!   changed filter adds below the cursor is backfilled — [`poller::filter`],
//!   [`store::cursor`].
//! - **I10** a user effect runs in the transaction that stores its rows,
//!   once per stored row; a rewind undoes it in the rewind's transaction; a
//!   failing effect parks its event, and an effect failing for no event's
//!   fault (a missing grant or table, a deadline passed) parks nothing and
//!   rolls back — [`write`]. A program that does not run every Rust handler
//!   a stream's events were written with writes nothing to it
//!   ([`write::guard`]).

pub mod admin;
pub mod app;
pub mod backoff;
pub mod chain;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod http;
pub mod metrics;
pub mod poller;
pub mod redact;
pub mod service;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod types;
pub mod views;
pub mod write;

#[cfg(test)]
mod layers;

pub use app::{App, BuildOptions, HandlerMap};
pub use async_trait::async_trait;
pub use config::Config;
pub use service::Service;
pub use tokio_postgres;
pub use write::{Event, Handler, HandlerError, Transaction};
