//! Many streams on few replicas (issue 16): replicas never park a pooled
//! connection on another replica's row lock, an idle stream costs no lock
//! and no transaction id, and each replica follows each endpoint's head
//! once (one WebSocket), whatever the number of streams on it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::support::*;

/// `n` streams, one per emitter, sharing everything else through `[defaults]`.
fn streams_toml(db_url: &str, pool_size: usize, defaults: &str, emitters: &[String]) -> String {
    let mut text = format!(
        "[database]\nurl = \"{db_url}\"\npool_size = {pool_size}\nlock_timeout = \"2s\"\n\
         statement_timeout = \"10s\"\nidle_in_transaction_timeout = \"20s\"\nconnect_retry_for = \"5s\"\n\n\
         [service]\nshutdown_grace = \"10s\"\n\n[telemetry]\nhttp_listen = \"127.0.0.1:0\"\n\n\
         [defaults]\nchain_id = 31337\nevents = [\"{BURNED}\"]\nstart_block = 0\nconfirmations = 0\n\
         max_block_range = 50\nrpc_timeout = \"2s\"\n{defaults}\n"
    );
    for (i, e) in emitters.iter().enumerate() {
        text.push_str(&format!("\n[[streams]]\nname = \"s{i:02}\"\naddresses = [\"{e}\"]\n"));
    }
    text
}

/// `per` Burned events from each emitter, one transaction each; the block
/// of the last (mined when its receipt is there).
async fn burn_each(chain: &Chain, emitters: &[String], per: u64) -> i64 {
    let mut last = String::new();
    for (i, e) in emitters.iter().enumerate() {
        last = chain.burn(e, per, i as u64 * 10).await;
    }
    hex_i64(&chain.receipt(&last).await["blockNumber"])
}

async fn deploy(chain: &Chain, n: usize) -> Vec<String> {
    let mut emitters = Vec::with_capacity(n);
    for _ in 0..n {
        emitters.push(chain.deploy_emitter().await);
    }
    emitters
}

/// Every stream's cursor, by name.
async fn cursors(pg: &tokio_postgres::Client) -> Vec<(String, i64)> {
    pg.query("SELECT id, last_processed_block FROM block_cursors ORDER BY id", &[])
        .await
        .expect("cursors")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Backends of the replicas (`application_name` starts with `prefix`) waiting on a lock now.
async fn waiting_on_locks(pg: &tokio_postgres::Client, prefix: &str) -> Vec<String> {
    pg.query(
        "SELECT application_name || ': ' || coalesce(query, '') FROM pg_stat_activity
          WHERE datname = current_database() AND application_name LIKE $1 || '%'
            AND wait_event_type = 'Lock'",
        &[&prefix],
    )
    .await
    .expect("pg_stat_activity")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Sessions the replicas hold now.
async fn sessions(pg: &tokio_postgres::Client, prefix: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND application_name LIKE $1 || '%'",
        &[&prefix],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

struct Replicas {
    runs: Vec<tokio::task::JoinHandle<()>>,
    registries: Vec<std::sync::Arc<logcursor::metrics::Registry>>,
    token: CancellationToken,
}

impl Replicas {
    /// `n` in-process replicas `{prefix}0…` of `cfg`, running.
    async fn start(cfg: &logcursor::config::Config, prefix: &str, n: usize) -> Replicas {
        let token = CancellationToken::new();
        let (mut runs, mut registries) = (Vec::new(), Vec::new());
        for i in 0..n {
            let app = build_app(cfg, &format!("{prefix}{i}")).await;
            registries.push(std::sync::Arc::clone(app.registry()));
            let token = token.clone();
            runs.push(tokio::spawn(async move {
                app.run(token).await.expect("run");
            }));
        }
        Replicas {
            runs,
            registries,
            token,
        }
    }

    /// Ticks of every stream on every replica with this outcome.
    fn ticks(&self, outcome: &str) -> u64 {
        let label = format!("outcome=\"{outcome}\"");
        self.registries
            .iter()
            .flat_map(|r| r.encode_now().lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| l.starts_with("logcursor_ticks_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>() as u64
    }

    fn idle_ticks(&self) -> u64 {
        self.ticks("idle")
    }

    /// Stops the replicas; none may have counted a failed tick (a busy row
    /// or a head another replica saw first is not a failure).
    async fn stop(self) {
        assert_eq!(self.ticks("error"), 0, "failed ticks");
        self.token.cancel();
        for r in self.runs {
            r.await.expect("join");
        }
    }
}

/// 20 streams, 3 replicas with two pooled connections each, and a session
/// of the test holding one stream's row for the whole run: every other
/// stream still reaches the head, no replica's connection ever waits on a
/// lock, and no replica opens more sessions than its pool. When the holder
/// commits, the held stream catches up too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_streams_advance_while_another_session_holds_one_row() {
    let w = World::new().await;
    let (db, chain) = (&w.db, &w.chain);
    let emitters = deploy(chain, 20).await;
    let rpc = chain.url.clone();
    let cfg = TestConfig::from_toml(&streams_toml(
        &db.url,
        2,
        &format!("rpc_urls = [\"{rpc}\"]\nws_urls = \"off\"\npoll_interval = \"50ms\""),
        &emitters,
    ))
    .build();
    // Seed the rows (as `migrate` + start would), then hold s07's.
    drop(build_app(&cfg, "scale-seed").await);
    let pg = db.client().await;
    let mut holder = db.client().await;
    let held = holder.transaction().await.expect("begin");
    held.query("SELECT 1 FROM block_cursors WHERE id = 's07' FOR UPDATE", &[])
        .await
        .expect("hold s07");
    let held_at = cursor_of(&pg, "s07").await.expect("s07 seeded");

    let replicas = Replicas::start(&cfg, "hold-r", 3).await;
    let head = burn_each(chain, &emitters, 2).await;
    let max_sessions = std::sync::atomic::AtomicI64::new(0);
    wait_for("every stream but s07 at the head", Duration::from_secs(60), || async {
        let parked = waiting_on_locks(&pg, "hold-r").await;
        assert!(parked.is_empty(), "a replica's connection waits on a lock: {parked:?}");
        max_sessions.fetch_max(sessions(&pg, "hold-r").await, std::sync::atomic::Ordering::Relaxed);
        let behind: Vec<(String, i64)> = cursors(&pg)
            .await
            .into_iter()
            .filter(|(id, c)| id != "s07" && *c < head)
            .collect();
        behind.is_empty().then_some(())
    })
    .await;
    let max_sessions = max_sessions.into_inner();
    assert!(
        max_sessions <= 3 * 2,
        "sessions of 3 replicas with pool_size = 2: {max_sessions}"
    );
    assert_eq!(cursor_of(&pg, "s07").await, Some(held_at), "the held row did not move");

    held.commit().await.expect("release s07");
    wait_for("s07 at the head once released", Duration::from_secs(30), || async {
        (cursor_of(&pg, "s07").await == Some(head)).then_some(())
    })
    .await;
    let stored: i64 = pg
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, 20 * 2, "each stream's two burns, once");
    replicas.stop().await;
}

/// A caught-up replica looks at its streams now and then (here every
/// 100 ms, the safety re-look of a quiet subscription) but takes no lock
/// and burns no transaction id: every row lock and every write leaves its
/// transaction id in a row's `xmin`/`xmax`, so the rows of every table the
/// replica touches are unchanged; and no replica backend ever holds a
/// transaction id. (`txid_current()` itself counts the whole cluster, where
/// the other tests write meanwhile; `scripts/bench` reads it alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stretch_takes_no_lock_and_burns_no_transaction_id() {
    let w = World::new().await;
    let (db, chain) = (&w.db, &w.chain);
    let emitters = deploy(chain, 20).await;
    let head = burn_each(chain, &emitters, 1).await;
    let defaults = format!(
        "rpc_urls = [\"{}\"]\npoll_interval = \"100ms\"\nws_poll_interval = \"100ms\"",
        chain.url
    );
    let cfg = TestConfig::from_toml(&streams_toml(&db.url, 4, &defaults, &emitters)).build();
    let replicas = Replicas::start(&cfg, "idle-r", 3).await;
    let pg = db.client().await;
    wait_for("every stream at the head", Duration::from_secs(60), || async {
        cursors(&pg).await.iter().all(|(_, c)| *c == head).then_some(())
    })
    .await;

    let versions = || async {
        pg.query(
            "SELECT 'block_cursors', ctid::text, xmin::text, xmax::text FROM block_cursors
             UNION ALL SELECT 'events', ctid::text, xmin::text, xmax::text FROM events
             UNION ALL SELECT 'failed_ranges', ctid::text, xmin::text, xmax::text FROM failed_ranges
             UNION ALL SELECT 'dead_letters', ctid::text, xmin::text, xmax::text FROM dead_letters
             ORDER BY 1, 2",
            &[],
        )
        .await
        .expect("row versions")
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
            )
        })
        .collect::<Vec<_>>()
    };
    let before = versions().await;
    let looks_before = replicas.idle_ticks();
    // Idle for at least 10 safety re-looks per stream and replica.
    wait_for("the replicas' idle looks", Duration::from_secs(60), || async {
        let held = holding_xids(&pg, "idle-r%").await;
        assert!(held.is_empty(), "an idle replica holds a transaction id: {held:?}");
        (replicas.idle_ticks() - looks_before >= 3 * 20 * 10).then_some(())
    })
    .await;
    assert_eq!(versions().await, before, "no row was locked or written while idle");
    assert_eq!(cursors(&pg).await.iter().filter(|(_, c)| *c != head).count(), 0);
    replicas.stop().await;
}

/// Each replica follows the endpoint's head over one WebSocket, shared by
/// its 20 streams: three replicas open three sockets, and blocks reach
/// every stream through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_websocket_per_endpoint_per_replica_not_per_stream() {
    let w = World::new().await;
    let (db, chain) = (&w.db, &w.chain);
    let emitters = deploy(chain, 20).await;
    let ws = w.tcp_proxy().await;
    let defaults = format!(
        "rpc_urls = [\"{}\"]\nws_urls = [\"ws://127.0.0.1:{}\"]\npoll_interval = \"200ms\"\nws_poll_interval = \"1h\"",
        chain.url, ws.port
    );
    let cfg = TestConfig::from_toml(&streams_toml(&db.url, 4, &defaults, &emitters)).build();
    let replicas = Replicas::start(&cfg, "ws-r", 3).await;
    let pg = db.client().await;
    wait_for("three sockets open", Duration::from_secs(30), || async {
        (ws.open() >= 3).then_some(())
    })
    .await;
    let head = burn_each(chain, &emitters, 1).await;
    wait_for("every stream at the head", Duration::from_secs(60), || async {
        cursors(&pg).await.iter().all(|(_, c)| *c == head).then_some(())
    })
    .await;
    assert_eq!(
        ws.accepted(),
        3,
        "one WebSocket per replica for the endpoint, not one per stream"
    );
    assert_eq!(ws.open(), 3, "and each stayed open");
    replicas.stop().await;
}
