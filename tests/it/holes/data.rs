//! No event can stop a stream (I8): what PostgreSQL cannot hold is kept
//! losslessly, a row it refuses is parked alone, and no transaction takes
//! more savepoints than the subtransaction cache holds.

use logcursor::poller::TickOutcome;
use serde_json::Value;

use crate::support::tap::PgTap;
use crate::support::*;

const RICH: &str = "event Rich(address indexed to, int256 indexed delta, uint256 id, int64 small, bytes32 tag, bool flag, string note, bytes blob, uint256[] list, (uint256,address) pair)";

/// Checked by decoding `string` as `String` again (src/chain/abi.rs, the
/// decoder's `kind: strings_as_bytes(&p.kind)` → `kind: p.kind.clone()`):
/// the NUL note is then refused by jsonb and parked, the invalid one
/// stored with U+FFFD, and the test fails on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_with_nul_or_invalid_utf8_are_stored_as_their_exact_bytes_and_the_cursor_reaches_the_head() {
    let w = World::new().await;
    let notes: [&[u8]; 4] = [
        b"pay\0me",
        &[0x66, 0x6f, 0xff, 0xfe, 0x00],
        "naïve ✓ \u{1F600}".as_bytes(),
        b"",
    ];
    w.emit_burns(2, |_| 1).await;
    let mut txs = Vec::new();
    for note in notes {
        txs.push(w.chain.send(Some(&w.emitter), rich_calldata(note)).await);
    }
    w.emit_burns(2, |_| 1).await;
    for tx in &txs {
        let r = w.chain.receipt(tx).await;
        assert_eq!(r["status"], "0x1", "rich() reverted: {r}");
    }
    let app = w
        .config()
        .stream_toml(&format!("events = [\"{BURNED}\", \"{RICH}\"]"))
        .replica("r")
        .await;
    app.tick_until_idle().await;

    let pg = w.pg().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(w.chain.block_number().await));
    let parked = dead_letter_count(&pg).await;
    assert_eq!(parked, 0, "nothing is parked: every string is storable");
    for (tx, note) in txs.iter().zip(notes) {
        let row = pg
            .query_one(
                "SELECT params->'note' FROM events WHERE tx_hash = decode($1, 'hex')",
                &[&tx.trim_start_matches("0x")],
            )
            .await
            .expect("the Rich event is stored");
        let stored: Value = row.get(0);
        match std::str::from_utf8(note) {
            Ok(text) if !text.contains('\0') => {
                assert_eq!(stored, Value::String(text.into()), "valid UTF-8 exactly as emitted")
            }
            _ => {
                assert_eq!(
                    stored,
                    serde_json::json!({ "bytes": format!("0x{}", hex::encode(note)) })
                );
            }
        }
    }
    assert_eq!(count_events(&pg).await, 4 + 4, "four burns and four notes");
}

/// Checked by making `Failure::from_db` treat every error as fatal
/// (src/write/mod.rs: `if e.is_per_row()` → `if false`): the tick then
/// rolls back forever and `tick_until_idle` fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_parked_with_the_servers_message_and_the_rest_commits() {
    let w = World::new().await;
    migrate_as(&w.db.url, "test").await;
    let pg = w.pg().await;
    pg.batch_execute(
        "ALTER TABLE events ADD CONSTRAINT no_thirteen CHECK (params->>'amount' IS DISTINCT FROM '13');
         CREATE FUNCTION refuse_27() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.params->>'amount' = '27' THEN RAISE EXCEPTION 'amount 27 is not welcome here'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_27 AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_27();",
    )
    .await
    .expect("constraint and trigger");
    w.emit_burns(20, |_| 3).await; // amounts 0..59, three per block
    let app = w.replica("r").await;
    app.tick_until_idle().await;

    let head = w.chain.block_number().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(head), "the stream went past both");
    let letters: Vec<(String, i64, String, String, i32)> = pg
        .query(
            "SELECT '0x' || encode(tx_hash, 'hex'), log_index::int8, kind, error, attempts FROM dead_letters ORDER BY block_number",
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(letters.len(), 2, "exactly the two refused rows: {letters:?}");
    assert_eq!(letters[0].2, "data");
    assert!(
        letters[0].3.contains("no_thirteen") && letters[0].3.contains("23514"),
        "{letters:?}"
    );
    assert_eq!(letters[1].2, "handler");
    assert!(letters[1].3.contains("amount 27 is not welcome here"), "{letters:?}");
    assert!(letters.iter().all(|l| l.4 == 1));

    let refused: Vec<(String, i64)> = letters.iter().map(|l| (l.0.clone(), l.1)).collect();
    let expected: Vec<LogKey> = w
        .chain
        .burned_logs(&w.emitter, head)
        .await
        .into_iter()
        .filter(|(tx, i, _)| !refused.contains(&(tx.clone(), *i)))
        .collect();
    let mut stored = stored_logs(&pg).await;
    stored.sort();
    assert_eq!(stored, expected, "every other row is stored, once");
    let amounts: Vec<String> = pg
        .query("SELECT params->>'amount' FROM events", &[])
        .await
        .expect("amounts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!amounts.contains(&"13".to_string()) && !amounts.contains(&"27".to_string()));
    assert_eq!(amounts.len(), 58);
}

/// Checked by lifting the budget (src/write/mod.rs: `Savepoints::left`
/// returning `true`): the tap then sees a transaction with hundreds of
/// savepoints and no `Partial` tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_transaction_takes_more_than_64_savepoints_and_the_next_tick_goes_on() {
    let w = World::new().await;
    migrate_as(&w.db.url, "test").await;
    let pg = w.pg().await;
    // Every odd amount fails: finding each failing row costs savepoints.
    pg.batch_execute(
        "CREATE FUNCTION refuse_odd() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF (NEW.params->>'amount')::numeric % 2 = 1 THEN RAISE EXCEPTION 'odd amount %', NEW.params->>'amount'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_odd AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_odd();",
    )
    .await
    .expect("trigger");
    w.chain.burn_many(&w.emitter, 300, 0).await;
    w.emit_burns(3, |_| 4).await;
    let tap = PgTap::start(&w.db.url).await;
    let app = w.config().database_url(&tap.url(&w.db.url)).replica("r").await;
    let outcomes = app.tick_until_idle().await;

    assert_eq!(
        tap.most_savepoints(),
        64,
        "the busiest transaction used the whole budget and no more: {outcomes:?}"
    );
    let partial = outcomes
        .iter()
        .filter(|o| matches!(o, TickOutcome::Partial { .. }))
        .count();
    assert!(
        partial >= 2,
        "the 300-log block took several transactions: {outcomes:?}"
    );
    let head = w.chain.block_number().await;
    assert_eq!(cursor_of(&pg, "burns").await, Some(head));
    let on_chain = w.chain.burned_logs(&w.emitter, head).await;
    let (stored, parked): (i64, i64) = {
        let r = pg
            .query_one(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM dead_letters WHERE attempts = 1 AND kind = 'handler')",
                &[],
            )
            .await
            .expect("counts");
        (r.get(0), r.get(1))
    };
    assert_eq!(parked, 150 + 6, "every odd amount parked once");
    assert_eq!(stored + parked, on_chain.len() as i64, "everything else stored once");
    let odd_stored: i64 = pg
        .query_one(
            "SELECT count(*) FROM events WHERE (params->>'amount')::numeric % 2 = 1",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(odd_stored, 0);
}
