//! What most tests start from: an anvil of their own, a database of their
//! own, a driver for the chain, and the Emitter contract deployed on it.

use logcursor::app::App;

use super::chain::{Anvil, Chain};
use super::checks;
use super::config::TestConfig;
use super::db::TestDb;
use super::tap::TcpProxy;

/// One test's chain and database. Fields are public: a test that needs the
/// parts themselves (a proxy in front of `anvil.url`, a second database)
/// takes them.
pub struct World {
    pub anvil: Anvil,
    pub db: TestDb,
    pub chain: Chain,
    /// The deployed Emitter, 0x-hex.
    pub emitter: String,
}

impl World {
    pub async fn new() -> World {
        World::with_anvil(&[]).await
    }

    /// A world whose anvil is started with `args` (`--block-time`, …).
    pub async fn with_anvil(args: &[&str]) -> World {
        let (anvil, db) = (Anvil::start_with(args).await, TestDb::new().await);
        let chain = Chain::new(&anvil.url).await;
        let emitter = chain.deploy_emitter().await;
        World {
            anvil,
            db,
            chain,
            emitter,
        }
    }

    /// The one-stream config on this world's chain, contract and database.
    pub fn config(&self) -> TestConfig {
        TestConfig::new(&self.db.url, &self.anvil.url, &self.emitter)
    }

    /// A TCP proxy in front of anvil, for its WebSocket endpoint to go
    /// away and come back.
    pub async fn tcp_proxy(&self) -> TcpProxy {
        let upstream = self
            .anvil
            .url
            .trim_start_matches("http://")
            .parse()
            .expect("anvil address");
        TcpProxy::start(upstream).await
    }

    /// A replica in process with the default [`World::config`].
    pub async fn replica(&self, name: &str) -> App {
        self.config().replica(name).await
    }

    /// Applies the schema and the cursor-history trigger; a session to the
    /// test database.
    pub async fn migrate(&self) -> tokio_postgres::Client {
        self.db.migrate_with_history().await
    }

    /// A session to the test database.
    pub async fn pg(&self) -> tokio_postgres::Client {
        self.db.client().await
    }

    /// `txs` transactions, the i-th emitting `per_tx(i)` Burned events;
    /// returns how many were emitted.
    pub async fn emit_burns(&self, txs: u64, per_tx: impl Fn(u64) -> u64) -> u64 {
        self.chain.emit_burns(&self.emitter, txs, per_tx).await
    }

    /// Stored rows equal the chain's Burned logs up to its head, each once.
    pub async fn assert_stored_equals_chain(&self, pg: &tokio_postgres::Client) {
        checks::assert_stored_equals_chain(pg, &self.chain, &self.emitter).await
    }

    /// Stored rows equal the chain's Burned logs up to block `to`, each once.
    pub async fn assert_stored_up_to(&self, pg: &tokio_postgres::Client, to: i64) {
        checks::assert_stored_up_to(pg, &self.chain, &self.emitter, to).await
    }
}
