//! What a chaos run must show at the end: the rows are the chain's logs at
//! or below the cursor (hostile strings decoded losslessly), the cursor
//! moved forward only but for audited rewinds, and no session sat idle in
//! transaction past its bound (sampled during the run).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::world::Sender;
use crate::support::hex_i64;

/// The longest idle-in-transaction stretch seen, and whose.
#[derive(Debug, Default, Clone)]
pub struct Idle {
    pub longest: f64,
    pub by: String,
    pub samples: u64,
}

/// Samples `pg_stat_activity` every 100 ms until `stop` (reconnecting after
/// a PostgreSQL restart).
pub fn sample_idle(url: String, stop: CancellationToken) -> (Arc<Mutex<Idle>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Idle::default()));
    let s = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.is_cancelled() {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    Err(_) => None,
                };
            }
            if let Some(c) = &client {
                let rows = c
                    .query(
                        "SELECT application_name, extract(epoch FROM clock_timestamp() - state_change)::float8
                           FROM pg_stat_activity
                          WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
                        &[],
                    )
                    .await;
                if let Ok(rows) = rows {
                    let mut idle = s.lock().unwrap();
                    idle.samples += 1;
                    for r in rows {
                        let secs: f64 = r.get(1);
                        if secs > idle.longest {
                            idle.longest = secs;
                            idle.by = r.get(0);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (seen, task)
}

/// One log: (tx hash, log index, block, block hash).
pub type Key = (String, i64, i64, String);

/// The chain's logs of `emitter` with one of `topic0s` up to `to`, with
/// their data.
pub async fn chain_logs(sender: &Sender, emitter: &str, topic0s: &[String], to: i64) -> BTreeMap<Key, String> {
    let logs = sender
        .rpc(
            "eth_getLogs",
            json!([{"fromBlock": "0x0", "toBlock": format!("{to:#x}"), "address": emitter, "topics": [topic0s]}]),
        )
        .await
        .expect("logs");
    logs.as_array()
        .expect("logs")
        .iter()
        .map(|l| {
            (
                (
                    l["transactionHash"].as_str().expect("tx").to_string(),
                    hex_i64(&l["logIndex"]),
                    hex_i64(&l["blockNumber"]),
                    l["blockHash"].as_str().expect("hash").to_string(),
                ),
                l["data"].as_str().expect("data").to_string(),
            )
        })
        .collect()
}

/// Every stored row of `stream`, keyed like [`chain_logs`], with its params.
pub async fn stored(pg: &tokio_postgres::Client, stream: &str) -> BTreeMap<Key, Value> {
    pg.query(
        "SELECT '0x' || encode(tx_hash, 'hex'), log_index::int8, block_number, '0x' || encode(block_hash, 'hex'), params
           FROM events WHERE stream = $1",
        &[&stream],
    )
    .await
    .expect("events")
    .iter()
    .map(|r| ((r.get(0), r.get(1), r.get(2), r.get(3)), r.get(4)))
    .collect()
}

/// The `note` of a Rich log's data as logcursor must store it: the string
/// when it is valid UTF-8 without U+0000, else `{"bytes": "0x…"}`.
pub fn expected_note(data: &str) -> Value {
    let bytes = hex::decode(data.trim_start_matches("0x")).expect("hex data");
    let word = |i: usize| -> usize {
        let w = &bytes[i * 32..(i + 1) * 32];
        usize::try_from(u64::from_be_bytes(w[24..32].try_into().expect("8 bytes"))).expect("small")
    };
    // Non-indexed: id, small, tag, flag, note (offset), blob, list, pair.
    let at = word(4);
    let len = word(at / 32);
    let note = &bytes[at + 32..at + 32 + len];
    match std::str::from_utf8(note) {
        Ok(s) if !s.contains('\0') => Value::String(s.to_string()),
        _ => json!({ "bytes": format!("0x{}", hex::encode(note)) }),
    }
}

/// Walks the recorded cursor moves in commit order: each starts where the
/// last ended, and each backward one is an audited rewind (used in order).
/// Returns (moves, rewinds matched, violations).
pub fn audit(moves: &[(i64, i64, String)], rewinds: &[(i64, i64)], end: i64) -> (usize, usize, Vec<String>) {
    let mut at = -1;
    let mut unused = rewinds.iter();
    let mut matched = 0;
    let mut bad = Vec::new();
    for (old, new, by) in moves {
        if *old != at {
            bad.push(format!("a move by {by} started at {old}, the cursor was at {at}"));
        }
        if new < old {
            match unused.next() {
                Some((f, t)) if f == old && t == new => matched += 1,
                other => bad.push(format!(
                    "{by} moved the cursor back {old} -> {new}, unaudited (next audit row {other:?})"
                )),
            }
        } else if new == old {
            bad.push(format!("{by} 'moved' the cursor from {old} to itself"));
        }
        at = *new;
    }
    if at != end {
        bad.push(format!("the moves end at {at}, the cursor is at {end}"));
    }
    if unused.next().is_some() {
        bad.push("an audited rewind has no recorded move".into());
    }
    (moves.len(), matched, bad)
}
