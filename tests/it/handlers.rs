//! Effects exactly once (I10), with the payments example's crediting
//! handler in each of its three forms — an `AFTER INSERT`/`AFTER DELETE`
//! row trigger, a set-based `handler_function`/`revert_function`, and the
//! Rust `Credit` handler (the example's own `credit.rs`, included below) —
//! checked against the balances the canonical chain implies.
//! `handlers_rewind.rs` undoes them by rewinds, `handlers_chaos.rs` runs
//! them in SIGKILLed replicas.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use logcursor::app::{App, BuildOptions, HandlerMap};
use logcursor::config::Config;
use logcursor::poller::{TickError, TickOutcome};
use logcursor::Handler;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::*;

#[path = "../../examples/payments/credit.rs"]
mod credit;

/// Which form of the crediting handler a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credit {
    Trigger,
    Function,
    Rust,
}

impl Credit {
    /// Migrates the database and installs the example's SQL for this form.
    pub async fn install(self, db: &TestDb) -> tokio_postgres::Client {
        migrate_as(&db.url, "test").await;
        let pg = db.client().await;
        pg.batch_execute(include_str!("../../examples/payments/schema.sql"))
            .await
            .expect("schema.sql");
        match self {
            Credit::Trigger => {
                pg.batch_execute(include_str!("../../examples/payments/trigger.sql"))
                    .await
            }
            Credit::Function => {
                pg.batch_execute(include_str!("../../examples/payments/function.sql"))
                    .await
            }
            Credit::Rust => Ok(()),
        }
        .expect("install the handler's SQL");
        pg
    }

    /// Stream keys this form needs.
    pub fn stream_extra(self) -> &'static str {
        match self {
            Credit::Function => "handler_function = \"credit_burns\"\nrevert_function = \"debit_burns\"",
            _ => "",
        }
    }

    /// `cfg` with the stream keys this form needs.
    pub fn configure(self, cfg: TestConfig) -> TestConfig {
        cfg.stream_toml(self.stream_extra())
    }

    /// `PAYMENTS_CREDIT` for the example binary.
    pub fn env(self) -> &'static str {
        match self {
            Credit::Rust => "rust",
            _ => "sql",
        }
    }

    /// The Rust handlers an in-process replica registers.
    pub fn handlers(self) -> HandlerMap {
        let mut map = HandlerMap::new();
        if self == Credit::Rust {
            let h: Arc<dyn Handler> = Arc::new(credit::Credit);
            map.insert("burns".into(), vec![h]);
        }
        map
    }

    /// An in-process replica of `cfg` with this form's handlers.
    pub async fn app(self, cfg: &Config) -> App {
        App::build_with(
            cfg,
            "r",
            BuildOptions { migrate: true },
            &self.handlers(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("build: {e}"))
    }
}

/// Runs a scenario once per form, each a test named after it.
macro_rules! each_form {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn trigger() {
                super::$scenario(super::Credit::Trigger).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn function() {
                super::$scenario(super::Credit::Function).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rust() {
                super::$scenario(super::Credit::Rust).await
            }
        }
    )*};
}
pub(crate) use each_form;

/// One Burned log on the chain.
#[derive(Debug, Clone)]
pub struct Burn {
    pub key: LogKey,
    pub from: String,
    pub amount: u128,
}

/// Every Burned log of `emitter` in blocks `0..=to` on the canonical chain.
pub async fn burns_on_chain(chain: &Chain, emitter: &str, to: i64) -> Vec<Burn> {
    if to < 0 {
        return Vec::new();
    }
    let logs = chain
        .rpc(
            "eth_getLogs",
            json!([{"fromBlock": "0x0", "toBlock": format!("{to:#x}"), "address": emitter,
                    "topics": [format!("0x{}", contract_event_topic())]}]),
        )
        .await;
    logs.as_array()
        .expect("logs")
        .iter()
        .map(|l| {
            let topic = l["topics"][1].as_str().expect("indexed from");
            let data = l["data"].as_str().expect("data").trim_start_matches("0x");
            Burn {
                key: (
                    l["transactionHash"].as_str().expect("tx").to_string(),
                    hex_i64(&l["logIndex"]),
                    hex_i64(&l["blockNumber"]),
                ),
                from: format!("0x{}", &topic[topic.len() - 40..]),
                amount: u128::from_str_radix(data, 16).expect("amount"),
            }
        })
        .collect()
}

/// The balance each of `accounts` should have after `burns`.
pub fn expected(burns: &[Burn], accounts: &[String]) -> BTreeMap<String, u128> {
    let mut out: BTreeMap<String, u128> = accounts.iter().map(|a| (a.clone(), 0)).collect();
    for b in burns {
        if let Some(v) = out.get_mut(&b.from) {
            *v += b.amount;
        }
    }
    out
}

/// Every row of `balances`.
pub async fn balances(pg: &impl tokio_postgres::GenericClient) -> BTreeMap<String, u128> {
    pg.query("SELECT account, amount::text FROM balances", &[])
        .await
        .expect("read balances")
        .iter()
        .map(|r| (r.get(0), r.get::<_, String>(1).parse().expect("integral balance")))
        .collect()
}

/// Opens an account (the example's way: a row in `balances`).
pub async fn open(pg: &tokio_postgres::Client, account: &str) {
    pg.execute("INSERT INTO balances (account) VALUES ($1)", &[&account])
        .await
        .expect("open account");
}

/// (tx, log index, block) of every dead letter of the given kind.
async fn parked(pg: &tokio_postgres::Client, kind: &str) -> BTreeSet<LogKey> {
    pg.query(
        "SELECT '0x' || encode(tx_hash, 'hex'), log_index::bigint, block_number FROM dead_letters WHERE kind = $1",
        &[&kind],
    )
    .await
    .expect("read dead letters")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// `payments ARGS` (the example binary) against `config`; its stdout.
async fn payments(credit: Credit, args: &[&str], config: &std::path::Path) -> String {
    let out = tokio::process::Command::new(crate::handlers_chaos::payments_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .args(["--replica-id", "operator"])
        .env("PAYMENTS_CREDIT", credit.env())
        .env_remove("DATABASE_URL")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .await
        .expect("run payments");
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "payments {args:?}: {stdout}{}",
        text(&out.stderr)
    );
    stdout
}

each_form!(
    a_handler_error_parks_exactly_the_failing_burns_and_replay_credits_each_once,
    a_cursor_moved_back_stores_duplicates_without_crediting_them_again,
    a_lock_timeout_inside_a_handler_parks_nothing_and_the_tick_is_retried,
);

async fn a_handler_error_parks_exactly_the_failing_burns_and_replay_credits_each_once(credit: Credit) {
    let w = World::new().await;
    let (chain, emitter) = (&w.chain, &w.emitter);
    let pg = credit.install(&w.db).await;
    let (a, b, c) = (chain.clone(), chain.as_account(1).await, chain.as_account(2).await);
    open(&pg, &a.sender()).await;
    open(&pg, &b.sender()).await;
    // c has no account yet. Big transactions around its burns put them in
    // parts of 500+ rows (stored by COPY), where the failing row is found
    // by bisection; one of c's transactions emits three.
    a.burn_many(emitter, 600, 0).await;
    c.receipt(&c.burn(emitter, 1, 10_000).await).await;
    b.receipt(&b.burn(emitter, 3, 20_000).await).await;
    c.receipt(&c.burn(emitter, 3, 30_000).await).await;
    b.burn_many(emitter, 600, 40_000).await;
    c.receipt(&c.burn(emitter, 1, 50_000).await).await;
    a.receipt(&a.burn(emitter, 2, 60_000).await).await;
    let head = chain.block_number().await;
    let config = credit.configure(w.config());
    let cfg = config.file();
    let app = credit.app(&config.build()).await;
    app.tick_until_idle().await;

    let burns = burns_on_chain(chain, emitter, head).await;
    let of_c: BTreeSet<LogKey> = burns
        .iter()
        .filter(|x| x.from == c.sender())
        .map(|x| x.key.clone())
        .collect();
    assert_eq!(of_c.len(), 5);
    assert_eq!(
        cursor_of(&pg, "burns").await,
        Some(head),
        "the stream reached the safe head"
    );
    assert_eq!(parked(&pg, "handler").await, of_c, "exactly c's burns are parked");
    assert_eq!(dead_letter_count(&pg).await, 5);
    let error: String = pg
        .query_one("SELECT min(error) FROM dead_letters", &[])
        .await
        .expect("error")
        .get(0);
    assert!(
        error.contains("unknown account") && error.contains(&c.sender()),
        "{error}"
    );
    let stored: BTreeSet<LogKey> = stored_logs(&pg).await.into_iter().collect();
    let others: BTreeSet<LogKey> = burns
        .iter()
        .map(|x| x.key.clone())
        .filter(|k| !of_c.contains(k))
        .collect();
    assert_eq!(stored, others, "every other burn is stored");
    let accounts = [a.sender(), b.sender()];
    assert_eq!(
        balances(&pg).await,
        expected(&burns, &accounts),
        "every other burn credited once"
    );

    // Before the account exists, a replay changes nothing but the attempts.
    let out = payments(credit, &["dlq", "replay", "--all"], cfg.path()).await;
    assert!(out.contains("replayed: 0 stored, 5 still failing"), "{out}");
    assert_eq!(parked(&pg, "handler").await, of_c);
    assert_eq!(balances(&pg).await, expected(&burns, &accounts));

    open(&pg, &c.sender()).await;
    let ids: Vec<String> = pg
        .query("SELECT id::text FROM dead_letters ORDER BY id", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let out = payments(credit, &["dlq", "replay", "--all"], cfg.path()).await;
    assert!(out.contains("replayed: 5 stored, 0 still failing"), "{out}");
    let all = [a.sender(), b.sender(), c.sender()];
    assert_eq!(balances(&pg).await, expected(&burns, &all), "c credited once per burn");
    assert_eq!(dead_letter_count(&pg).await, 0);
    w.assert_stored_equals_chain(&pg).await;
    let untimed: i64 = pg
        .query_one("SELECT count(*) FROM events WHERE block_timestamp IS NULL", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(untimed, 0, "a replayed row carries its block's time, as a tick's does");

    // A second replay, of everything or of the same letters, does nothing.
    let out = payments(credit, &["dlq", "replay", "--all"], cfg.path()).await;
    assert!(out.contains("replayed: 0 stored, 0 still failing"), "{out}");
    let mut again = vec!["dlq", "replay"];
    again.extend(ids.iter().map(String::as_str));
    let out = payments(credit, &again, cfg.path()).await;
    assert!(out.contains("replayed: 0 stored, 0 still failing"), "{out}");
    assert_eq!(balances(&pg).await, expected(&burns, &all));
}

async fn a_cursor_moved_back_stores_duplicates_without_crediting_them_again(credit: Credit) {
    let w = World::new().await;
    let pg = credit.install(&w.db).await;
    let accounts = [w.chain.sender()];
    open(&pg, &accounts[0]).await;
    // Blocks of 100: the parts of the second pass (several blocks each,
    // 500+ rows: COPY, refused, then INSERT … ON CONFLICT) mix stored
    // burns with new ones.
    w.emit_burns(30, |_| 100).await;
    let app = credit.app(&credit.configure(w.config()).build()).await;
    app.tick_until_idle().await;
    // As a failover to a replica that lost the last commits would leave it.
    pg.execute(
        "UPDATE block_cursors SET last_processed_block = -1, last_block_hash = NULL",
        &[],
    )
    .await
    .expect("move the cursor back");
    w.emit_burns(4, |_| 50).await;
    let outcomes = app.tick_until_idle().await;
    let (inserted, duplicates) = outcomes.iter().fold((0, 0), |(i, d), o| match o {
        TickOutcome::Advanced {
            inserted, duplicates, ..
        } => (i + inserted, d + duplicates),
        _ => (i, d),
    });
    assert_eq!((inserted, duplicates), (200, 3_000), "{outcomes:?}");
    let head = w.chain.block_number().await;
    let burns = burns_on_chain(&w.chain, &w.emitter, head).await;
    assert_eq!(
        balances(&pg).await,
        expected(&burns, &accounts),
        "only the 200 new burns were credited"
    );
}

async fn a_lock_timeout_inside_a_handler_parks_nothing_and_the_tick_is_retried(credit: Credit) {
    let w = World::new().await;
    let pg = credit.install(&w.db).await;
    let accounts = [w.chain.sender()];
    open(&pg, &accounts[0]).await;
    w.emit_burns(5, |i| i + 1).await;
    let cfg = credit
        .configure(w.config())
        .database(|d| d.limits.lock_timeout = Duration::from_millis(300))
        .build();
    let app = credit.app(&cfg).await;
    // Someone else holds the balance row: the handler's UPDATE times out.
    let mut holder = w.pg().await;
    let hold = holder.transaction().await.expect("begin");
    hold.execute("SELECT 1 FROM balances FOR UPDATE", &[])
        .await
        .expect("lock the balance");
    let failed = app.pollers()[0]
        .tick(&CancellationToken::new())
        .await
        .expect_err("the tick fails while the balance is locked");
    assert!(!matches!(failed, TickError::DeepReorg { .. }), "{failed}");
    assert!(
        failed.to_string().contains("55P03") || failed.to_string().contains("lock"),
        "{failed}"
    );
    assert_eq!(dead_letter_count(&pg).await, 0, "nothing parked: {failed}");
    assert_eq!(cursor_of(&pg, "burns").await, Some(-1), "nothing committed");
    hold.rollback().await.expect("release");

    app.tick_until_idle().await;
    let head = w.chain.block_number().await;
    assert_eq!(dead_letter_count(&pg).await, 0);
    assert_eq!(
        balances(&pg).await,
        expected(&burns_on_chain(&w.chain, &w.emitter, head).await, &accounts)
    );
}
