//! Bad input and faults at start-up and in a tick: each is a clear error
//! that names the problem, and nothing moves past it.

use std::time::Duration;

use logcursor::app::{App, AppError, BuildOptions};
use logcursor::chain::ChainErrorKind;
use logcursor::poller::{TickError, TickOutcome};
use logcursor::write::WriteError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_halt_a_log_that_does_not_decode_stops_the_stream_naming_it_and_the_cursor_stays_before_it() {
    let w = World::new().await; // the Emitter is deployed in block 1
    let first_bad = w.chain.burn(&w.emitter, 1, 0).await; // block 2
    w.chain.burn(&w.emitter, 2, 0).await; // block 3: must not be reached past block 2

    // Same topic0 (indexing is not part of the signature hash), but this ABI
    // expects one topic and two data words, so the real logs cannot decode.
    let wrong_abi = "events = [\"event Burned(address from, uint256 amount)\"]\non_bad_event = \"halt\"";
    // In a schema of its own: the halt is recorded with the schema's
    // search_path (it once ran outside a transaction and missed the table).
    let app = w
        .config()
        .stream_toml(wrong_abi)
        .stream(|s| s.max_block_range = 1)
        .database_toml("schema = \"ingest\"")
        .replica("r")
        .await;
    let poller = &app.pollers()[0];
    let tick = || async { poller.tick(&CancellationToken::new()).await };

    for block in [0, 1] {
        assert!(matches!(tick().await, Ok(TickOutcome::Advanced { to, .. }) if to == block));
    }
    for _ in 0..3 {
        let err = tick().await.expect_err("block 2 does not decode");
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                TickError::Write(WriteError::Halt {
                    block: 2,
                    log_index: 0,
                    ..
                })
            ),
            "{msg}"
        );
        assert!(msg.contains("expected 1 topics, log has 2"), "{msg}");
        assert!(
            msg.contains(&first_bad) && msg.contains("log 0"),
            "names tx hash and log index: {msg}"
        );
    }
    let pg = w.pg().await;
    pg.batch_execute("SET search_path = ingest").await.expect("search_path");
    assert_eq!(
        cursor_of(&pg, "burns").await,
        Some(1),
        "the cursor stays before the bad log"
    );
    let stored = count_events(&pg).await;
    assert_eq!(stored, 0, "nothing of the failed range is stored");
    let halted = halted_reason(&pg).await;
    assert!(
        halted.is_some_and(|h| h.contains(&first_bad)),
        "status shows why the stream stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_at_start_is_retried_then_fails_naming_the_host_not_the_password() {
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }; // dropped: nothing listens there now
    let url = format!("postgres://app:hunter2@127.0.0.1:{closed_port}/appdb");
    let cfg = TestConfig::new(
        &url,
        "http://127.0.0.1:1/?apikey=SECRETKEY",
        "0x5fbdb2315678afecb367f032d93f642f64180aa3",
    )
    .database(|d| {
        d.connect_retry_for = Duration::from_millis(1500);
        d.settings.connect_timeout = Duration::from_millis(500);
    })
    .build();
    let started = Instant::now();
    let err = match App::build(&cfg, "r", BuildOptions { migrate: true }, &CancellationToken::new()).await {
        Ok(_) => panic!("built against a closed port"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "gave up before the retry bound"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "retried far past the bound"
    );
    assert!(msg.contains(&format!("127.0.0.1:{closed_port}/appdb")), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_on_another_chain_refuses_to_start_naming_it_without_its_api_key() {
    let (anvil, db) = (Anvil::start().await, TestDb::new().await);
    let keyed = format!("{}/?apikey=SECRETKEY", anvil.url);
    let cfg = TestConfig::new(&db.url, &keyed, "0x5fbdb2315678afecb367f032d93f642f64180aa3")
        .stream(|s| s.chain_id = 1)
        .build();
    let err = match App::build(&cfg, "r", BuildOptions { migrate: true }, &CancellationToken::new()).await {
        Ok(_) => panic!("started on the wrong chain"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        matches!(&err, AppError::Chain { source, .. } if source.kind == ChainErrorKind::WrongChain { expected: 1, actual: 31337 }),
        "{msg}"
    );
    let port = anvil.url.rsplit(':').next().expect("port");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "names the endpoint: {msg}");
    assert!(!msg.contains("SECRETKEY"), "{msg}");
}
