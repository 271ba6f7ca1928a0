//! logcursor ingests EVM contract events into PostgreSQL exactly once while
//! N identical replicas run side by side. Replicas serialize on one row per
//! stream (`block_cursors`, locked `FOR UPDATE` for a whole tick), so a range
//! is fetched and stored by one replica only, and a waiter resumes from
//! where the holder committed.
//!
//! # Module map
//!
//! | module       | owns                                                         |
//! |--------------|--------------------------------------------------------------|
//! | [`config`]   | TOML + env → typed config; every problem reported at once     |
//! | [`chain`]    | the only user of ethers: JSON-RPC client, ABI decoding        |
//! | [`store`]    | PostgreSQL: pool, migrations, cursor row, events table        |
//! | [`poller`]   | the tick (one transaction) and the per-stream loop            |
//! | [`app`]      | build (connect, migrate, verify chain, seed) and run (drain)  |
//! | [`status`]   | `logcursor status`                                            |
//! | [`admin`]    | `logcursor rewind`                                            |
//! | [`cli`]      | command line                                                  |
//! | [`shutdown`] | SIGTERM/SIGINT → cancellation token                           |
//! | [`telemetry`]| tracing subscriber and OTLP export                            |
//! | [`metrics`]  | per-stream and per-endpoint metrics, Prometheus text          |
//! | [`http`]     | `/livez`, `/readyz`, `/metrics`, `/status`                    |
//! | [`redact`]   | secrets that never print, URLs with keys removed              |
//!
//! # Invariants
//!
//! Each is stated where it is enforced, and each has a test that fails if
//! it breaks (`tests/it/`).
//!
//! - **I1** every canonical log at or below the cursor is stored exactly
//!   once, keyed by (chain_id, tx_hash, log_index) — [`store::events`].
//! - **I2** no stored row comes from an orphaned block at or below the safe
//!   head — only blocks at or below the safe head are read, and every tick
//!   first checks the stored hash of the cursor's block ([`poller::tick`],
//!   [`store::reorg`]) and every log's block hash against one batch of
//!   headers fetched after its last part ([`poller::parts`]).
//! - **I3** the cursor never moves backward — [`store::cursor::advance`];
//!   the one exception is an audited rewind ([`store::reorg::rewind`]). A
//!   cursor found lower than a replica last saw (a failover that lost
//!   commits) is logged and counted, never hidden ([`poller::Poller`]).
//! - **I4** no gaps: the chain's logs for (start, cursor] equal the stored
//!   rows — events and cursor commit in one transaction ([`poller::tick`]),
//!   and a range written in parts ends at the last part before any gap
//!   ([`poller::parts`]).
//! - **I5** after faults stop, the cursor reaches the safe head within a
//!   bounded time — [`poller`] (capped backoff, every failure retried).
//! - **I6** no session stays idle in transaction longer than the configured
//!   bound — [`poller::tick`] and [`config`] (RPC deadline < idle timeout).

pub mod admin;
pub mod app;
pub mod chain;
pub mod cli;
pub mod config;
pub mod http;
pub mod metrics;
pub mod poller;
pub mod redact;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod telemetry;
