//! Positional helpers being replaced by [`super::World`] and
//! [`super::TestConfig`]; removed once no test calls them.

use super::chain::{Anvil, Chain};
use super::config::TestConfig;
use super::db::TestDb;

/// The one-stream config's text, `key = value` lines merged into the stream
/// and database tables.
pub fn config_toml(db_url: &str, rpc: &str, emitter: &str, stream_extra: &str, db_extra: &str) -> String {
    TestConfig::new(db_url, rpc, emitter)
        .stream_toml(stream_extra)
        .database_toml(db_extra)
        .toml()
}

pub async fn world() -> (Anvil, TestDb, Chain, String) {
    let w = super::World::new().await;
    (w.anvil, w.db, w.chain, w.emitter)
}
