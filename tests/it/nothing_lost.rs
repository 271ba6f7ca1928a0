//! Nothing lost, nothing stuck: dead letters and their replay.

use logcursor::admin;
use logcursor::app::{App, BuildOptions};
use logcursor::poller::TickOutcome;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;
use crate::proxy::{method_of, Action, Proxy};

async fn tick_until_idle(app: &App) -> Vec<TickOutcome> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        let o = app.pollers()[0].tick(&CancellationToken::new()).await.expect("tick");
        let idle = matches!(o, TickOutcome::Idle { .. });
        out.push(o);
        if idle {
            return out;
        }
    }
    panic!("never idle")
}

/// Corrupts, in every eth_getLogs answer, log 0 of `wrong_topics` (drops
/// its indexed topic) and log 1 of `short_data` (cuts its data short).
fn corrupt(proxy: &Proxy, wrong_topics: String, short_data: String) {
    proxy.set(move |r| {
        if method_of(r) != "eth_getLogs" {
            return Action::Forward;
        }
        let (wt, sd) = (wrong_topics.clone(), short_data.clone());
        Action::Rewrite(Box::new(move |mut v: Value| {
            for log in v["result"].as_array_mut().into_iter().flatten() {
                let (tx, index) = (
                    log["transactionHash"].as_str().unwrap_or(""),
                    log["logIndex"].as_str().unwrap_or(""),
                );
                if tx == wt && index == "0x0" {
                    log["topics"] = json!([log["topics"][0]]);
                } else if tx == sd && index == "0x1" {
                    log["data"] = json!("0x0102030405");
                }
            }
            v
        }))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_logs_become_whole_dead_letters_and_replay_stores_them_once_the_source_is_fixed() {
    let (anvil, db) = (Anvil::start().await, TestDb::new().await);
    let chain = Chain::new(&anvil.url).await;
    let emitter = chain.deploy_emitter().await;
    chain.emit_burns(&emitter, 5, |_| 2).await;
    let wrong_topics = chain.burn(&emitter, 2, 100).await;
    let short_data = chain.burn(&emitter, 2, 200).await;
    chain.emit_burns(&emitter, 5, |_| 2).await;
    let proxy = Proxy::start(&anvil.url).await;
    corrupt(&proxy, wrong_topics.clone(), short_data.clone());
    let toml = config_toml(&db.url, &proxy.url, &emitter, "", "");
    let app = App::build(
        &config(&toml),
        "r",
        BuildOptions { migrate: true },
        &CancellationToken::new(),
    )
    .await
    .expect("build");
    let outcomes = tick_until_idle(&app).await;
    let parked: usize = outcomes
        .iter()
        .map(|o| match o {
            TickOutcome::Advanced { dead_lettered, .. } => *dead_lettered,
            _ => 0,
        })
        .sum();
    assert_eq!(parked, 2);

    let pg = db.client().await;
    let head = chain.block_number().await;
    assert_eq!(
        cursor_of(&pg, "burns").await,
        Some(head),
        "the cursor passes the bad logs"
    );
    let all_logs = chain.burned_logs(&emitter, head).await;
    let stored = stored_logs(&pg).await;
    assert_eq!(stored.len(), all_logs.len() - 2, "every other event is stored");
    let rows = pg
        .query(
            "SELECT '0x' || encode(tx_hash, 'hex'), log_index, cardinality(topics), '0x' || encode(data, 'hex'), error, attempts
               FROM dead_letters ORDER BY id",
            &[],
        )
        .await
        .expect("dead letters");
    let got: Vec<(String, i32, i32, String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(5)))
        .collect();
    assert_eq!(
        got,
        vec![
            (wrong_topics.clone(), 0, 1, format!("0x{:064x}", 100), 1),
            (short_data.clone(), 1, 2, "0x0102030405".to_string(), 1),
        ],
        "the raw logs are kept whole, as received"
    );
    let errors: Vec<String> = rows.iter().map(|r| r.get(4)).collect();
    assert!(errors[0].contains("expected 2 topics, log has 1"), "{errors:?}");
    assert!(errors[1].contains("does not decode"), "{errors:?}");

    let cfg = config(&toml);
    let still = admin::dlq_replay(&cfg, "operator", &[]).await.expect("replay");
    assert_eq!(still.stored.len(), 0, "the source still corrupts them");
    assert_eq!(still.still_failing.len(), 2);
    let attempts: Vec<i32> = pg
        .query("SELECT attempts FROM dead_letters ORDER BY id", &[])
        .await
        .expect("q")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, vec![2, 2]);

    proxy.pass();
    let fixed = admin::dlq_replay(&cfg, "operator", &[]).await.expect("replay");
    assert_eq!((fixed.stored.len(), fixed.still_failing.len()), (2, 0));
    let left: i64 = pg
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "replay empties the table");
    let mut stored = stored_logs(&pg).await;
    stored.sort();
    assert_eq!(
        stored,
        all_logs.into_iter().collect::<Vec<_>>(),
        "every event exactly once"
    );
}
