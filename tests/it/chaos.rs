//! The chaos proof of issue 11, run by `scripts/chaos` (ignored otherwise):
//! `CHAOS_REPLICAS` replica processes ingest one stream while, for
//! `CHAOS_DURATION`, replicas are SIGKILLed (and restarted) and SIGSTOPped
//! (and continued), PostgreSQL is restarted (`pg_ctl restart -m fast` or
//! `immediate`), the RPC between replicas and anvil fails in every way
//! `faults` knows, reorganisations deeper than the confirmations happen
//! during ticks (`on_deep_reorg = "rewind"` heals them), and hostile
//! strings are emitted on the watched contract. `CHAOS_SEED` fixes the
//! schedule of actions and faults (timing still varies).
//!
//! Then the faults stop, every replica is woken, and the run must show:
//! the cursor reaches the safe head, the rows equal the chain's logs at or
//! below it (strings decoded losslessly), the cursor moved forward only
//! but for audited rewinds, no session sat idle in transaction past its
//! bound, and every replica exits 0 on SIGTERM. It prints the figures.
//!
//! Needs, besides what every test needs, `LOGCURSOR_CHAOS_PG_RESTART`: a
//! command that restarts the cluster, given `fast` or `immediate`.

mod checks;
mod faults;
mod replicas;
mod world;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha3::{Digest, Keccak256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::proxy::Proxy;
use crate::support::*;

const STREAM: &str = "chaos";
const CONFIRMATIONS: u64 = 2;
/// The default `idle_in_transaction_timeout`, which the replicas run with.
const IDLE_BOUND: f64 = 15.0;
const RICH_SIGNATURE: &str = "Rich(address,int256,uint256,int64,bytes32,bool,string,bytes,uint256[],(uint256,address))";
const RICH: &str = "event Rich(address indexed to, int256 indexed delta, uint256 id, int64 small, bytes32 tag, bool flag, string note, bytes blob, uint256[] list, (uint256,address) pair)";

/// Counts by what happened, shared by the tasks of the run.
#[derive(Clone, Default)]
pub struct Tally(Arc<Mutex<BTreeMap<&'static str, u64>>>);

impl Tally {
    pub fn add(&self, what: &'static str, n: u64) {
        *self.0.lock().unwrap().entry(what).or_default() += n;
    }

    pub fn get(&self, what: &str) -> u64 {
        self.0.lock().unwrap().get(what).copied().unwrap_or(0)
    }

    fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().unwrap().clone()
    }
}

struct Settings {
    seed: u64,
    duration: Duration,
    replicas: usize,
    restart_pg: String,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Settings {
            seed: var("CHAOS_SEED").map_or_else(rand::random, |s| s.parse().expect("CHAOS_SEED: a number")),
            duration: var("CHAOS_DURATION").map_or(Duration::from_secs(600), |d| {
                humantime::parse_duration(&d).expect("CHAOS_DURATION: e.g. 10m")
            }),
            replicas: var("CHAOS_REPLICAS").map_or(3, |n| n.parse().expect("CHAOS_REPLICAS: a number")),
            restart_pg: var("LOGCURSOR_CHAOS_PG_RESTART").expect("LOGCURSOR_CHAOS_PG_RESTART: run scripts/chaos"),
        }
    }
}

fn topic0(signature: &str) -> String {
    format!("0x{}", hex::encode(Keccak256::digest(signature.as_bytes())))
}

/// Written in full: the database timeouts are the defaults (`IDLE_BOUND`).
fn replica_config(db_url: &str, rpc: &str, emitter: &str) -> String {
    format!(
        "[database]\nurl = \"{db_url}\"\npool_size = 4\nconnect_retry_for = \"120s\"\n\n\
         [service]\nshutdown_grace = \"20s\"\n\n[telemetry]\nhttp_listen = \"127.0.0.1:0\"\n\n\
         [[streams]]\nname = \"{STREAM}\"\nchain_id = 31337\nrpc_urls = [\"{rpc}\"]\naddresses = [\"{emitter}\"]\n\
         events = [\"{BURNED}\", \"{RICH}\"]\nstart_block = 0\nconfirmations = {CONFIRMATIONS}\n\
         max_block_range = 25\npoll_interval = \"200ms\"\nrpc_timeout = \"2s\"\nrpc_attempts = 2\n\
         rpc_cooldown = \"0s\"\non_deep_reorg = \"rewind\"\n"
    )
}

async fn restart_postgres(command: &str, mode: &'static str, tally: &Tally) {
    let status = tokio::process::Command::new(command)
        .arg(mode)
        .status()
        .await
        .expect("run the PostgreSQL restart command");
    assert!(status.success(), "{command} {mode}: {status}");
    tally.add(
        if mode == "fast" {
            "postgres: restart -m fast"
        } else {
            "postgres: restart -m immediate"
        },
        1,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "runs for minutes: scripts/chaos"]
async fn chaos() {
    let s = Settings::from_env();
    println!(
        "chaos: seed {} for {} with {} replicas",
        s.seed,
        humantime::format_duration(s.duration),
        s.replicas
    );
    let started = Instant::now();
    let w = World::new().await;
    // The run sends through a sender that survives reorgs; `w.chain` is not used again.
    let sender = world::Sender::new(&w.anvil.url).await;
    let (db, emitter) = (&w.db, w.emitter.clone());
    w.migrate().await;
    let tally = Tally::default();
    let proxy = Proxy::start(&w.anvil.url).await;
    let faults_on = Arc::new(AtomicBool::new(true));
    let args = (
        Arc::clone(&sender),
        emitter.clone(),
        tally.clone(),
        Arc::clone(&faults_on),
    );
    faults::install(&proxy, s.seed, args.0, args.1, CONFIRMATIONS, args.2, args.3);
    let config = TestConfig::from_toml(&replica_config(&db.url, &proxy.url, &emitter)).file();
    let logs = tempfile::Builder::new()
        .prefix("logcursor-chaos-logs")
        .tempdir()
        .expect("logs dir");
    let mut replicas = replicas::Replicas::start(s.replicas, config.path(), logs.path());
    let stop = CancellationToken::new();
    let (idle, sampler) = checks::sample_idle(db.url.clone(), stop.clone());
    let emitting = world::start_emitter(
        Arc::clone(&sender),
        emitter.clone(),
        s.seed,
        tally.clone(),
        stop.clone(),
    );
    let pg = || async { db.client().await };

    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut unexpected = Vec::new();
    let mut next_report = Instant::now() + Duration::from_secs(30);
    while started.elapsed() < s.duration {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1_000..3_000))).await;
        replicas.wake(false);
        unexpected.extend(replicas.exited());
        match rng.gen_range(0..100) {
            0..=34 => replicas.kill_one(&mut rng, &tally).await,
            35..=64 => replicas.freeze_one(&mut rng, &tally),
            65..=72 => restart_postgres(&s.restart_pg, "fast", &tally).await,
            73..=79 => restart_postgres(&s.restart_pg, "immediate", &tally).await,
            _ => {}
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(30);
            let cursor = match tokio::time::timeout(Duration::from_secs(5), async {
                cursor_of(&pg().await, STREAM).await
            })
            .await
            {
                Ok(c) => format!("{c:?}"),
                Err(_) => "?".into(),
            };
            println!(
                "  {:>4}s  head {}  cursor {cursor}  {:?}",
                started.elapsed().as_secs(),
                sender.block_number().await,
                tally.snapshot()
            );
        }
    }

    // Calm: no more faults or events, every replica up.
    faults_on.store(false, Ordering::Relaxed);
    stop.cancel();
    emitting.await.expect("emitter");
    replicas.wake(true);
    let head = sender.block_number().await;
    let safe = head - CONFIRMATIONS as i64;
    let calm = Instant::now();
    let pg = db.client().await;
    let converged = wait_until(Duration::from_secs(180), || async {
        let cursor = cursor_of(&pg, STREAM).await;
        let pending: i64 = pg
            .query_one("SELECT count(*) FROM failed_ranges", &[])
            .await
            .ok()?
            .get(0);
        (cursor == Some(safe) && pending == 0).then_some(())
    })
    .await;
    let healed_in = calm.elapsed();
    unexpected.extend(replicas.exited());
    let starts = replicas.starts();
    let exits = replicas.terminate().await;
    sampler.await.expect("sampler");
    let idle = idle.lock().unwrap().clone();

    // The checks.
    let cursor = cursor_of(&pg, STREAM).await.expect("cursor");
    let on_chain = checks::chain_logs(
        &sender,
        &emitter,
        &[topic0("Burned(address,uint256)"), topic0(RICH_SIGNATURE)],
        cursor,
    )
    .await;
    let stored = checks::stored(&pg, STREAM).await;
    let missing: Vec<_> = on_chain.keys().filter(|k| !stored.contains_key(*k)).collect();
    let extra: Vec<_> = stored.keys().filter(|k| !on_chain.contains_key(*k)).collect();
    // (Rich strings, of them hostile, stored wrong)
    let mut notes = (0u64, 0u64, Vec::new());
    for (key, data) in &on_chain {
        let Some(note) = stored.get(key).and_then(|p| p.get("note")) else {
            continue;
        };
        let want = checks::expected_note(data);
        notes.0 += 1;
        notes.1 += u64::from(want.is_object());
        if *note != want {
            notes.2.push(format!("{key:?}: stored {note}, emitted {want}"));
        }
    }
    let moves = cursor_history(&pg, STREAM).await;
    let rewinds: Vec<(i64, i64)> = pg
        .query(
            "SELECT from_block, to_block FROM cursor_rewinds WHERE stream = $1 ORDER BY id",
            &[&STREAM],
        )
        .await
        .expect("rewinds")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let (move_count, audited, violations) = checks::audit(&moves, &rewinds, cursor);
    let dead_letters = dead_letter_count(&pg).await;
    let mismatches = missing.len() + extra.len() + notes.2.len();

    let t = tally.snapshot();
    println!(
        "\nchaos: CHAOS_SEED={} CHAOS_DURATION={} CHAOS_REPLICAS={} scripts/chaos",
        s.seed,
        humantime::format_duration(s.duration),
        s.replicas
    );
    println!(
        "  replicas: {} SIGKILLs, {} SIGSTOPs, {} starts in all",
        tally.get("replica: SIGKILL"),
        tally.get("replica: SIGSTOP"),
        starts
    );
    println!(
        "  PostgreSQL restarts: {} (fast {}, immediate {})",
        tally.get("postgres: restart -m fast") + tally.get("postgres: restart -m immediate"),
        tally.get("postgres: restart -m fast"),
        tally.get("postgres: restart -m immediate")
    );
    for (k, v) in t.iter().filter(|(k, _)| k.starts_with("fault: ")) {
        println!("  {k}: {v}");
    }
    for (k, v) in t.iter().filter(|(k, _)| k.starts_with("sent: ")) {
        println!("  {k}: {v}");
    }
    println!(
        "  events: {} on the canonical chain at or below cursor {cursor} (head {head}), {} stored; Rich strings {} ({} hostile)",
        on_chain.len(),
        stored.len(),
        notes.0,
        notes.1
    );
    println!(
        "  missing {}, extra (orphaned or duplicate) {}, wrong strings {}: mismatches = {mismatches}",
        missing.len(),
        extra.len(),
        notes.2.len()
    );
    println!(
        "  cursor: {move_count} moves, {audited} audited rewinds, {} violations; dead letters {dead_letters}",
        violations.len()
    );
    println!(
        "  idle in transaction: longest {:.1}s by {:?} in {} samples (bound {IDLE_BOUND}s)",
        idle.longest, idle.by, idle.samples
    );
    println!(
        "  healed: {} after the faults stopped ({:?})",
        if converged {
            "cursor at the safe head, nothing pending"
        } else {
            "NOT within 180 s"
        },
        healed_in
    );
    println!("  exits on SIGTERM: {exits:?}; replicas that exited by themselves: {unexpected:?}");

    let all_zero = exits.iter().all(|(_, c)| *c == Some(0));
    let ok = converged
        && mismatches == 0
        && violations.is_empty()
        && idle.longest <= IDLE_BOUND + 1.0
        && all_zero
        && unexpected.is_empty()
        && dead_letters == 0;
    println!("RESULT: {}", if ok { "OK" } else { "FAILED" });
    if !ok {
        println!("  replica logs kept in {}", logs.keep().display());
    }
    assert!(converged, "the cursor did not reach the safe head within 180 s of calm");
    assert_eq!(
        mismatches, 0,
        "missing {missing:?}\nextra {extra:?}\nnotes {:?}",
        notes.2
    );
    assert!(violations.is_empty(), "{violations:?}");
    assert!(idle.longest <= IDLE_BOUND + 1.0, "{idle:?}");
    assert!(all_zero, "{exits:?}");
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert_eq!(dead_letters, 0);
}

/// Polls `check` until it yields or `within` passes; whether it yielded.
async fn wait_until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await.is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}
