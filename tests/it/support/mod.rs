//! The test harness, one file per concern:
//!
//! | module | what |
//! |---|---|
//! | [`world`] | [`World`]: a test's anvil, database, chain driver and contract |
//! | [`config`] | [`TestConfig`]: the one-stream config, changed by key (typed or TOML) |
//! | [`replica`] | replicas in process, stepped tick by tick ([`Step`]) |
//! | [`process`] | `logcursor` as a process: spawn, signal, collect exits |
//! | [`chain`] | anvil, the JSON-RPC driver, the test contract's ABI |
//! | [`db`] | a database per test, migrations, roles, reads of stored state |
//! | [`checks`] | waiting with a deadline; stored rows against the chain |
//!
//! Everything is re-exported here, so a test module says `use crate::support::*`.

pub mod chain;
pub mod checks;
pub mod config;
pub mod db;
pub mod legacy;
pub mod process;
pub mod replica;
pub mod world;

pub use chain::*;
pub use checks::*;
pub use config::*;
pub use db::*;
pub use legacy::*;
pub use process::*;
pub use replica::*;
pub use world::*;
