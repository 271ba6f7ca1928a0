//! Test configs, built by key rather than by position.
//!
//! [`TestConfig::new`] is the one stream most tests run: `burns`, on one
//! RPC URL, watching one emitter's `Burned`, from block 0, with short polls
//! and timeouts. A test changes what it is about and nothing else:
//!
//! - [`TestConfig::stream`] edits the typed [`StreamConfig`] after parsing
//!   (`|s| s.confirmations = 2`): checked by the compiler, for in-process
//!   replicas;
//! - [`TestConfig::stream_toml`] (and `database_toml`, `telemetry_toml`)
//!   merges TOML into that table, keys and sub-tables
//!   relative to it (`"[[webhooks]]\nname = …"`): for what only the file can
//!   say, for configs the parser must judge, and for `logcursor` processes,
//!   which read a file ([`TestConfig::file`]).
//!
//! Every config goes through the binary's own parser ([`Config::parse`]).
//! Typed edits come after it and skip its checks (a `statement_timeout`
//! below `lock_timeout`, say): a test that makes one keeps the config one
//! the service would accept.

use logcursor::app::App;
use logcursor::config::{Config, DatabaseConfig, EnvOverrides, StreamConfig};

use super::chain::BURNED;

type Edit = Box<dyn FnOnce(&mut Config) + Send>;

/// A config under construction: its TOML document, and typed edits applied
/// once it is parsed.
pub struct TestConfig {
    doc: toml::Table,
    typed: Vec<Edit>,
}

impl TestConfig {
    /// One stream `burns` on `rpc`, watching `emitter`'s Burned events, into
    /// the database at `db_url`.
    pub fn new(db_url: &str, rpc: &str, emitter: &str) -> TestConfig {
        let text = format!(
            r#"[database]
url = "{db_url}"
pool_size = 4
lock_timeout = "2s"
statement_timeout = "10s"
idle_in_transaction_timeout = "20s"
connect_retry_for = "5s"

[service]
shutdown_grace = "10s"

[telemetry]
http_listen = "127.0.0.1:0"

[[streams]]
name = "burns"
chain_id = 31337
rpc_urls = ["{rpc}"]
addresses = ["{emitter}"]
events = ["{BURNED}"]
start_block = 0
confirmations = 0
max_block_range = 50
poll_interval = "50ms"
rpc_timeout = "2s"
"#
        );
        TestConfig::from_toml(&text)
    }

    /// A config written out in full by the test.
    pub fn from_toml(text: &str) -> TestConfig {
        TestConfig {
            doc: toml::from_str(text).unwrap_or_else(|e| panic!("test config is not TOML: {e}\n{text}")),
            typed: Vec::new(),
        }
    }

    /// Typed edits to the first stream, applied after parsing.
    pub fn stream(mut self, edit: impl FnOnce(&mut StreamConfig) + Send + 'static) -> TestConfig {
        self.typed.push(Box::new(move |c| edit(&mut c.streams[0])));
        self
    }

    /// Typed edits to `[database]`, applied after parsing.
    pub fn database(mut self, edit: impl FnOnce(&mut DatabaseConfig) + Send + 'static) -> TestConfig {
        self.typed.push(Box::new(move |c| edit(&mut c.database)));
        self
    }

    /// Merges `fragment` into the first stream's table: each key (or
    /// sub-table, as `[[webhooks]]`) replaces or adds that key.
    pub fn stream_toml(mut self, fragment: &str) -> TestConfig {
        merge(self.first_stream(), fragment);
        self
    }

    /// Merges `fragment` into `[database]`.
    pub fn database_toml(self, fragment: &str) -> TestConfig {
        self.table_toml("database", fragment)
    }

    /// Merges `fragment` into `[telemetry]`.
    pub fn telemetry_toml(self, fragment: &str) -> TestConfig {
        self.table_toml("telemetry", fragment)
    }

    /// Leaves `keys` out of `[database]`, so the service's defaults apply.
    pub fn database_unset(mut self, keys: &[&str]) -> TestConfig {
        if let Some(t) = self.doc.get_mut("database").and_then(toml::Value::as_table_mut) {
            keys.iter().for_each(|k| drop(t.remove(*k)));
        }
        self
    }

    /// Leaves `keys` out of every stream's table, so the defaults apply.
    pub fn stream_unset(mut self, keys: &[&str]) -> TestConfig {
        for stream in self.streams() {
            let t = stream.as_table_mut().expect("a stream table");
            keys.iter().for_each(|k| drop(t.remove(*k)));
        }
        self
    }

    /// Another stream: the first stream's table with `fragment` merged in
    /// (at least a new `name`).
    pub fn add_stream_toml(mut self, fragment: &str) -> TestConfig {
        let mut stream = self.first_stream().clone();
        merge(&mut stream, fragment);
        self.streams().push(toml::Value::Table(stream));
        self
    }

    /// The first stream reads from `url` instead (a proxy, a dead port).
    pub fn rpc(self, url: &str) -> TestConfig {
        self.stream_toml(&format!("rpc_urls = [\"{url}\"]"))
    }

    /// The database is reached at `url` instead (a tap, another role).
    pub fn database_url(self, url: &str) -> TestConfig {
        self.database_toml(&format!("url = \"{url}\""))
    }

    /// The file's text. Typed edits cannot be written back to TOML, so a
    /// config that has them has no text: that is a mistake in the test.
    pub fn toml(&self) -> String {
        assert!(
            self.typed.is_empty(),
            "typed edits reach in-process replicas only: use stream_toml for a config a process reads"
        );
        self.text()
    }

    /// [`TestConfig::toml`] in a temporary file, for a `logcursor` process.
    pub fn file(&self) -> tempfile::NamedTempFile {
        write_config(&self.toml())
    }

    /// Parsed by the binary's parser, then the typed edits applied.
    pub fn build(self) -> Config {
        let mut cfg = config(&self.text());
        for edit in self.typed {
            edit(&mut cfg);
        }
        cfg
    }

    /// A replica built in process from this config (migrating, like
    /// `logcursor run`).
    pub async fn replica(self, name: &str) -> App {
        super::replica::build_app(&self.build(), name).await
    }

    fn text(&self) -> String {
        toml::to_string(&self.doc).unwrap_or_else(|e| panic!("test config does not serialize: {e}"))
    }

    fn table_toml(mut self, table: &str, fragment: &str) -> TestConfig {
        let t = self
            .doc
            .entry(table.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        merge(t.as_table_mut().expect("a table"), fragment);
        self
    }

    fn streams(&mut self) -> &mut Vec<toml::Value> {
        self.doc
            .get_mut("streams")
            .and_then(toml::Value::as_array_mut)
            .expect("a [[streams]] array")
    }

    fn first_stream(&mut self) -> &mut toml::Table {
        self.streams()[0].as_table_mut().expect("a stream table")
    }
}

/// Each top-level key of `fragment` replaces or adds that key of `into`.
fn merge(into: &mut toml::Table, fragment: &str) {
    let extra: toml::Table =
        toml::from_str(fragment).unwrap_or_else(|e| panic!("fragment is not TOML: {e}\n{fragment}"));
    into.extend(extra);
}

/// A config file for a `logcursor` process.
pub fn write_config(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().expect("temp file");
    std::fs::write(file.path(), text).expect("write config");
    file
}

/// `toml` parsed as the binary parses it; a refusal fails the test.
pub fn config(toml: &str) -> Config {
    Config::parse(toml, "test config", &EnvOverrides::default()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn fragments_replace_keys_and_add_tables_relative_to_the_stream() {
    let cfg = TestConfig::new(
        "postgres://u@h/db",
        "http://127.0.0.1:1",
        "0x00000000000000000000000000000000000000aa",
    )
    .stream_toml("max_block_range = 7\n[[webhooks]]\nname = \"w\"\nurl = \"http://127.0.0.1:2/hook\"")
    .telemetry_toml("max_lag_blocks = 10")
    .database_unset(&["lock_timeout"])
    .stream(|s| s.confirmations = 3)
    .build();
    let s = &cfg.streams[0];
    assert_eq!((s.max_block_range, s.confirmations), (7, 3));
    assert_eq!(s.webhooks.len(), 1);
    assert_eq!(cfg.telemetry.max_lag_blocks, Some(10));
    assert_eq!(
        cfg.database.limits.lock_timeout,
        std::time::Duration::from_secs(5),
        "an unset key takes the default (5s), not the test's 2s"
    );
}
