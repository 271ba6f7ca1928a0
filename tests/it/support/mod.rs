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
//! | [`checks`] | waiting with a deadline (gap fill too); stored rows against the chain |
//! | [`proxy`] | a fault-injecting JSON-RPC proxy in front of anvil |
//! | [`tap`] | TCP-level proxies: a WebSocket endpoint that goes away, a PostgreSQL tap |
//! | [`receiver`] | a real HTTP receiver for webhooks, with scripted replies |
//!
//! The proxies and the receiver are reached by path
//! (`crate::support::proxy::Proxy`); the rest is re-exported here, so a
//! test module says `use crate::support::*`.

pub mod chain;
pub mod checks;
pub mod config;
pub mod db;
pub mod process;
pub mod proxy;
pub mod receiver;
pub mod replica;
pub mod tap;
pub mod world;

pub use chain::*;
pub use checks::*;
pub use config::*;
pub use db::*;
pub use process::*;
pub use replica::*;
pub use world::*;
