//! The `logcursor` binary as an operator runs it: signals, exit codes, and
//! several processes starting at once.

use std::time::Duration;

use tokio::process::{Child, Command};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_logcursor");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_ingest_exits_0_leaves_no_session_in_transaction_and_no_partial_range() {
    let w = World::new().await;
    w.emit_burns(400, |i| i % 3 + 1).await;
    let head = w.chain.block_number().await;
    let cfg = w.config().stream_toml("max_block_range = 1").file();
    let pg = w.pg().await;

    let child = logcursor_cmd(&["run"], cfg.path(), "sigterm-replica")
        .spawn()
        .expect("start logcursor");
    wait_for("ingest under way", Duration::from_secs(60), || async {
        cursor_of(&pg, "burns").await.filter(|c| *c >= 5).map(|_| ())
    })
    .await;
    signal(&child, "TERM");
    let out = finish(child, Duration::from_secs(30)).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "exit status; stderr:\n{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");

    let cursor = cursor_of(&pg, "burns").await.expect("cursor");
    assert!(
        cursor < head,
        "the signal arrived mid-ingest (cursor {cursor}, head {head})"
    );
    w.assert_stored_up_to(&pg, cursor).await; // no partial range
    let lingering = wait_for("the replica's sessions to close", Duration::from_secs(10), || async {
        let n: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database()
                    AND (application_name = 'sigterm-replica' OR state LIKE 'idle in transaction%')",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        (n == 0).then_some(n)
    })
    .await;
    assert_eq!(lingering, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_is_a_graceful_stop() {
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    // The database never answers: start-up keeps retrying it for a minute.
    let cfg = TestConfig::new(
        &format!("postgres://u@127.0.0.1:{closed_port}/db"),
        "http://127.0.0.1:1",
        "0x5fbdb2315678afecb367f032d93f642f64180aa3",
    )
    .database_toml("connect_retry_for = \"60s\"\nconnect_timeout = \"200ms\"")
    .file();
    let mut child = logcursor_cmd(&["run"], cfg.path(), "early").spawn().expect("start");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("database not reachable yet") {
                return;
            }
        }
        panic!("logcursor exited before retrying the database");
    })
    .await
    .expect("start-up retrying the database");
    signal(&child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops promptly")
        .expect("wait");
    let mut rest = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        rest.push_str(&line);
        rest.push('\n');
    }
    assert_eq!(status.code(), Some(0), "{rest}");
    assert!(!rest.contains("ERROR"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_exits_64_and_names_every_bad_key() {
    let cfg = write_config(
        r#"
[database]
url = "postgres://u:hunter2@127.0.0.1:1/db"
pool_sise = 3

[[streams]]
name = "s"
chain_id = 0
rpc_urls = ["http://127.0.0.1:1/SECRETKEY"]
addresses = ["0xnot-an-address"]
events = ["event Burned(address indexed from, uint256 amount)"]
confirmations = "two"
"#,
    );
    let out = logcursor_cmd(&["run"], cfg.path(), "bad").output().await.expect("run");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for key in [
        "database.pool_sise",
        "streams[0].chain_id",
        "streams[0].addresses[0]",
        "streams[0].confirmations",
    ] {
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
    }
    assert!(!stderr.contains("hunter2") && !stderr.contains("SECRETKEY"), "{stderr}");

    let missing = Command::new(BIN)
        .arg("status")
        .env_remove("LOGCURSOR_CONFIG")
        .output()
        .await
        .expect("run");
    assert_eq!(missing.status.code(), Some(64));
    assert!(text(&missing.stderr).contains("--config"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_starting_at_once_on_an_empty_database_apply_migrations_once() {
    let w = World::new().await;
    let emitted = w.emit_burns(30, |_| 2).await;
    let head = w.chain.block_number().await;
    let cfg = w.config().file();
    let pg = w.pg().await;

    let children: Vec<Child> = ["r1", "r2", "r3"]
        .iter()
        .map(|r| logcursor_cmd(&["run"], cfg.path(), r).spawn().expect("start"))
        .collect();
    wait_for("the cursor at the head", Duration::from_secs(60), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    stop_all(children).await;
    let versions: Vec<i32> = pg
        .query("SELECT version FROM logcursor_migrations ORDER BY version", &[])
        .await
        .expect("migrations table")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known: Vec<i32> = logcursor::store::migrate::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, known, "each migration recorded once");
    let stored = count_events(&pg).await;
    assert_eq!(stored as u64, emitted);

    // `status` reads the same state back.
    let out = logcursor_cmd(&["status", "--json"], cfg.path(), "status")
        .output()
        .await
        .expect("status");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(rows[0]["cursor"], serde_json::json!(head));
    assert_eq!(rows[0]["events_stored"], serde_json::json!(emitted));
    assert_eq!(rows[0]["lag_blocks"], serde_json::json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_while_holding_the_lock_stalls_others_only_until_the_idle_timeout() {
    use crate::support::proxy::{method_of, Action, Proxy};
    use tokio_util::sync::CancellationToken;

    let w = World::new().await;
    w.emit_burns(30, |i| i % 3 + 1).await;
    let pg = w.migrate().await;
    let proxy = Proxy::start(&w.anvil.url).await;
    // The frozen replica's node hangs on eth_getLogs: it is inside a tick,
    // holding the cursor lock, when it is stopped.
    proxy.set(|r| {
        if method_of(r) == "eth_getLogs" {
            Action::Hang
        } else {
            Action::Forward
        }
    });
    // Both replicas run with these (the frozen one reads them from a file).
    let cfg = || {
        w.config()
            .stream_toml("rpc_timeout = \"1s\"\nrpc_attempts = 2")
            .database_toml("lock_timeout = \"500ms\"\nstatement_timeout = \"5s\"\nidle_in_transaction_timeout = \"3s\"")
    };
    // The other replica is built (connected, migrated, chain checked)
    // first, so that it ticks as soon as the first one freezes.
    let token = CancellationToken::new();
    let other = cfg().replica("other").await;
    let frozen_cfg = cfg().rpc(&proxy.url).file();
    let frozen = logcursor_cmd(&["run"], frozen_cfg.path(), "frozen")
        .spawn()
        .expect("start");
    // Inside a tick: holding the row lock (which gives its transaction an
    // id) and waiting on eth_getLogs. (The head follower's log hint is an
    // eth_getLogs outside any transaction: the request alone says nothing.)
    wait_for("the first replica inside a tick", Duration::from_secs(30), || async {
        let locked = !holding_xids(&pg, "frozen").await.is_empty();
        (locked && proxy.seen().iter().any(|r| method_of(r) == "eth_getLogs")).then_some(())
    })
    .await;
    signal(&frozen, "STOP");
    let stopped_at = tokio::time::Instant::now();
    let run = tokio::spawn(other.run(token.clone()));
    wait_for(
        "the other replica to advance the cursor",
        Duration::from_secs(15),
        || async { cursor_of(&pg, "burns").await.filter(|c| *c >= 0).map(|_| ()) },
    )
    .await;
    let stalled = stopped_at.elapsed();
    assert!(
        stalled < Duration::from_secs(3 + 3),
        "stalled {stalled:?}: more than the idle timeout plus a margin"
    );

    // Wake the frozen replica: its transaction is gone; it must carry on harmlessly.
    proxy.pass();
    signal(&frozen, "CONT");
    w.emit_burns(10, |_| 2).await;
    let head = w.chain.block_number().await;
    wait_for("both replicas caught up", Duration::from_secs(30), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    // The other replica (woken by pushed heads) wins every race now; with
    // it stopped, the woken one must go on alone.
    token.cancel();
    let summary = run.await.expect("join").expect("run");
    assert!(
        summary[0].lock_timeouts > 0,
        "the other replica met the held lock and backed off: {summary:?}"
    );
    w.emit_burns(3, |_| 1).await;
    let head = w.chain.block_number().await;
    wait_for("the woken replica to commit again", Duration::from_secs(30), || async {
        let mine: i64 = pg
            .query_one("SELECT count(*) FROM cursor_history WHERE moved_by = 'frozen'", &[])
            .await
            .expect("history")
            .get(0);
        (mine > 0 && cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    signal(&frozen, "TERM");
    let out = finish(frozen, Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    w.assert_stored_up_to(&pg, head).await;
    assert_contiguous_forward(&cursor_history(&pg, "burns").await, -1, head);
}
