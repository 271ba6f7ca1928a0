//! Integration tests on a real PostgreSQL (a database per test) and a real
//! anvil chain (one per test). Run them through `scripts/test`, which starts
//! a throwaway cluster and provides anvil.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed expectation is a failed test"
)]

mod abi;
mod adoption;
mod broken_handlers;
mod chain;
mod chaos;
mod consumer_reverts;
mod delivery;
mod deploy;
mod faults;
mod handler_guard;
mod handlers;
mod handlers_chaos;
mod handlers_rewind;
mod holes;
mod ingest;
mod nothing_lost;
mod observe;
mod perf;
mod process;
mod production;
mod reorgs;
mod scale;
mod support;
mod webhook_reverts;
mod webhooks;
