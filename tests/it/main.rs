//! Integration tests on a real PostgreSQL (a database per test) and a real
//! anvil chain (one per test). Run them through `scripts/test`, which starts
//! a throwaway cluster and provides anvil.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed expectation is a failed test"
)]

mod chain;
mod chaos;
mod deploy;
mod faults;
mod helpers;
mod holes;
mod ingest;
mod nothing_lost;
mod observe;
mod perf;
mod process;
mod production;
mod proxy;
