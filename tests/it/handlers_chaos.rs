//! Three replicas of the payments example (processes of the example
//! binary, as an operator runs it) with a crediting handler, SIGKILLed at
//! random while burns keep coming: at every kill, in one snapshot, every
//! balance equals the sum of its burns on chain at or below the cursor,
//! and so at the end. Half the kills land in the window between a tick's
//! effects and its COMMIT (a test-only trigger makes the cursor advance
//! take 100 ms, and the victim is the replica inside it), where a kill must
//! lose both the effects and the cursor move together.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::{Child, Command};

use crate::handlers::{balances, burns_on_chain, each_form, expected, open, Credit};
use crate::support::*;

/// The payments example binary, next to the test binary's directory
/// (`target/debug/examples/payments`; `scripts/test` builds it), or
/// `LOGCURSOR_TEST_PAYMENTS`.
pub fn payments_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LOGCURSOR_TEST_PAYMENTS") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test binary's path"); // target/debug/deps/it-…
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples").join("payments"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "the payments example is not built ({}): run `cargo build --examples` (scripts/test does)",
        bin.display()
    );
    bin
}

/// Test-only: every cursor advance sleeps 100 ms after the tick's effects
/// were written and before its COMMIT.
const SLOW_ADVANCE: &str = "
CREATE FUNCTION slow_advance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.1); RETURN NEW; END $$;
CREATE TRIGGER slow_advance BEFORE UPDATE OF last_processed_block ON block_cursors
    FOR EACH ROW EXECUTE FUNCTION slow_advance();";

const KILLS: usize = 8;

fn spawn(credit: Credit, config: &Path, logs: &Path, name: &str) -> Child {
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).expect("log file");
    Command::new(payments_bin())
        .args(["run", "--config"])
        .arg(config)
        .args(["--replica-id", name])
        .env("PAYMENTS_CREDIT", credit.env())
        .env("RUST_LOG", "info")
        .env_remove("DATABASE_URL")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("start payments")
}

/// In one snapshot: the cursor, and balances equal to the burns at or below it.
async fn assert_balances_match_cursor(
    pg: &mut tokio_postgres::Client,
    chain: &Chain,
    emitter: &str,
    accounts: &[String],
) -> i64 {
    let tx = pg
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .expect("snapshot");
    let cursor: i64 = tx
        .query_one("SELECT last_processed_block FROM block_cursors WHERE id = 'burns'", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    let rows = balances(&tx).await;
    tx.commit().await.expect("end snapshot");
    let want = expected(&burns_on_chain(chain, emitter, cursor).await, accounts);
    assert_eq!(rows, want, "balances at cursor {cursor}");
    cursor
}

each_form!(three_replicas_killed_at_random_credit_every_burn_once);

async fn three_replicas_killed_at_random_credit_every_burn_once(credit: Credit) {
    let w = World::new().await;
    let (chain, emitter) = (&w.chain, &w.emitter);
    let mut pg = credit.install(&w.db).await;
    pg.batch_execute(SLOW_ADVANCE).await.expect("slow advance");
    let mut senders = vec![chain.clone()];
    for i in 1..4 {
        senders.push(chain.as_account(i).await);
    }
    let accounts: Vec<String> = senders.iter().map(Chain::sender).collect();
    for a in &accounts {
        open(&pg, a).await;
    }
    let cfg = credit.configure(w.config().stream_toml("max_block_range = 3")).file();
    let logs = tempfile::tempdir().expect("log dir");
    let mut replicas: Vec<(String, Child)> = (0..3)
        .map(|i| {
            let name = format!("r{i}");
            (name.clone(), spawn(credit, cfg.path(), logs.path(), &name))
        })
        .collect();

    // Burns keep coming (one block each, 1 to 40 burns) until the kills are done.
    let stop = Arc::new(AtomicBool::new(false));
    let emitting = tokio::spawn({
        let (stop, emitter) = (Arc::clone(&stop), emitter.clone());
        async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 3_000 {
                let s = &senders[(i % 4) as usize];
                let count = [1, 3, 40, 2, 7][(i % 5) as usize];
                s.receipt(&s.burn(&emitter, count, i * 100).await).await;
                i += 1;
            }
            i
        }
    });

    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut progress = 0;
    for k in 0..KILLS {
        // Each kill after more burns were credited than at the last one.
        progress = wait_for("the cursor moving on", Duration::from_secs(60), || async {
            cursor_of(&pg, "burns").await.filter(|c| *c >= progress + 4)
        })
        .await;
        let victim = if k % 2 == 0 {
            // (A killed replica's backend may still be sleeping: ours are the live ones.)
            wait_for(
                "a replica between its effects and COMMIT",
                Duration::from_secs(60),
                || async {
                    let sleeping: Vec<String> = pg
                        .query(
                            "SELECT application_name FROM pg_stat_activity
                          WHERE datname = current_database() AND wait_event = 'PgSleep'",
                            &[],
                        )
                        .await
                        .expect("pg_stat_activity")
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    replicas.iter().position(|(n, _)| sleeping.contains(n))
                },
            )
            .await
        } else {
            rng.gen_range(0..replicas.len())
        };
        let (_, mut child) = replicas.swap_remove(victim);
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("reap");
        assert_balances_match_cursor(&mut pg, chain, emitter, &accounts).await;
        let name = format!("r{}", 3 + k);
        replicas.push((name.clone(), spawn(credit, cfg.path(), logs.path(), &name)));
    }
    stop.store(true, Ordering::Relaxed);
    let txs = emitting.await.expect("emitter");
    assert!(
        txs > KILLS as u64,
        "burns kept coming during the kills ({txs} transactions)"
    );

    let head = chain.block_number().await;
    wait_for("the cursor at the head", Duration::from_secs(90), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    stop_all(replicas.into_iter().map(|(_, c)| c).collect()).await;
    let at = assert_balances_match_cursor(&mut pg, chain, emitter, &accounts).await;
    assert_eq!(at, head);
    w.assert_stored_equals_chain(&pg).await;
    let parked = dead_letter_count(&pg).await;
    assert_eq!(parked, 0, "no burn was parked (seed {seed})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_registering_a_handler_for_a_stream_the_config_lacks_exits_64() {
    let cfg = TestConfig::new(
        "postgres://u@127.0.0.1:1/db",
        "http://127.0.0.1:1",
        "0x5fbdb2315678afecb367f032d93f642f64180aa3",
    )
    .file();
    let out = Command::new(payments_bin())
        .args(["run", "--config"])
        .arg(cfg.path())
        .env("PAYMENTS_STREAM", "transfers")
        .output()
        .await
        .expect("run payments");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("\"transfers\""), "names the stream: {stderr}");
}
