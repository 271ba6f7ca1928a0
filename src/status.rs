//! `logcursor status`: per stream, the cursor, the chain's head and safe
//! head, the lag, the events stored, and who moved the cursor last.

use serde::Serialize;

use crate::chain::{ChainClient, Endpoints};
use crate::config::Config;
use crate::store::pool::{Database, TxLimits};
use crate::store::{cursor, events, failed_ranges, StoreError};

/// One stream's state as seen from the database and its first endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub stream: String,
    pub chain_id: u64,
    /// `None`: the stream has no cursor row yet (never run).
    pub cursor: Option<i64>,
    pub head: Option<u64>,
    pub safe_head: Option<u64>,
    /// Blocks between the cursor and the safe head.
    pub lag_blocks: Option<u64>,
    pub events_stored: i64,
    /// Logs of this stream parked in `dead_letters`.
    pub dead_letters: i64,
    pub updated_by: Option<String>,
    /// Seconds since the cursor last moved.
    pub updated_secs_ago: Option<u64>,
    /// Why the head or the safe head is unknown, when one is.
    pub rpc_error: Option<String>,
    /// Why the stream is halted, when it is (e.g. a deep reorg under `halt`).
    pub halted: Option<String>,
    /// The last error, when the stream has been failing for longer than
    /// `stuck_after`.
    pub stuck: Option<String>,
    /// Skipped ranges waiting for the gap-fill worker.
    pub failed_ranges_pending: i64,
    /// Skipped ranges that failed `gapfill_max_attempts` times.
    pub failed_ranges_dead: i64,
    /// Blocks of filter backfills still to fetch.
    pub backfill_blocks_left: i64,
}

/// Reads every configured stream's status.
pub async fn collect(cfg: &Config, replica_id: &str) -> Result<Vec<StreamStatus>, StoreError> {
    let db = Database::new(&cfg.database.settings, replica_id)?;
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    let names: Vec<&str> = cfg.streams.iter().map(|s| s.name.as_str()).collect();
    let backlogs = failed_ranges::backlogs(&*tx, &names).await?;
    let mut read = Vec::new();
    for s in &cfg.streams {
        read.push((cursor::get(&*tx, &s.name).await?, events::count(&*tx, &s.name).await?));
    }
    // The chain is asked after COMMIT: no transaction waits on an endpoint.
    tx.commit().await.map_err(StoreError::db("read status"))?;
    let endpoints = Endpoints::new();
    let mut out = Vec::new();
    for (s, (row, stored)) in cfg.streams.iter().zip(read) {
        let backlog = backlogs
            .iter()
            .find(|(n, _)| n == s.name.as_str())
            .map(|(_, b)| *b)
            .unwrap_or_default();
        let chain = ChainClient::new(&endpoints, &s.rpc, s.chain_id, crate::poller::client_options(s));
        let rpc = chain.pick();
        // The head, then the finality tag's block: a tag the node fails to
        // answer leaves the head known and the safe head unknown.
        let (head, safe_head, rpc_error) = match rpc.block_number().await {
            Err(e) => (None, None, Some(format!("head unknown: {e}"))),
            Ok(head) => match s.safe_head_at(&rpc, head).await {
                Ok(safe) => (Some(head), Some(safe), None),
                Err(e) => {
                    let tag = s.finality.tag().unwrap_or("tagged");
                    (Some(head), None, Some(format!("safe head unknown ({tag} block): {e}")))
                }
            },
        };
        let cursor = row.as_ref().map(|r| r.cursor.processed.to_db());
        out.push(StreamStatus {
            stream: s.name.to_string(),
            chain_id: s.chain_id,
            cursor,
            head,
            safe_head,
            lag_blocks: safe_head.map(|sh| {
                let done = cursor.unwrap_or(s.start_block.to_db() - 1);
                u64::try_from(i64::try_from(sh).unwrap_or(i64::MAX).saturating_sub(done).max(0)).unwrap_or(0)
            }),
            events_stored: stored,
            dead_letters: backlog.dead_letters,
            updated_by: row.as_ref().and_then(|r| r.updated_by.clone()),
            updated_secs_ago: row
                .as_ref()
                .and_then(|r| r.updated_at.elapsed().ok())
                .map(|d| d.as_secs()),
            rpc_error,
            halted: row.as_ref().and_then(|r| r.halted_reason.clone()),
            stuck: row.as_ref().and_then(|r| {
                let since = r.failing_since?.elapsed().ok()?;
                (since >= s.stuck_after).then(|| {
                    format!(
                        "failing for {}s: {}",
                        since.as_secs(),
                        r.last_error.as_deref().unwrap_or("?")
                    )
                })
            }),
            failed_ranges_pending: backlog.pending,
            failed_ranges_dead: backlog.dead,
            backfill_blocks_left: backlog.backfill_blocks_left,
        });
    }
    db.close();
    Ok(out)
}

/// A fixed-width table for a terminal.
pub fn render_table(rows: &[StreamStatus]) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut lines: Vec<[String; 10]> = vec![[
        "STREAM".to_string(),
        "CHAIN".into(),
        "CURSOR".into(),
        "HEAD".into(),
        "SAFE HEAD".into(),
        "LAG".into(),
        "EVENTS".into(),
        "DEAD".into(),
        "BACKFILL".into(),
        "LAST BY".into(),
    ]];
    for r in rows {
        lines.push([
            r.stream.clone(),
            r.chain_id.to_string(),
            opt(r.cursor.map(|c| c.to_string())),
            opt(r.head.map(|c| c.to_string())),
            opt(r.safe_head.map(|c| c.to_string())),
            opt(r.lag_blocks.map(|c| c.to_string())),
            r.events_stored.to_string(),
            r.dead_letters.to_string(),
            if r.backfill_blocks_left > 0 {
                format!("{} blocks left", r.backfill_blocks_left)
            } else {
                "-".into()
            },
            match (&r.updated_by, r.updated_secs_ago) {
                (Some(by), Some(ago)) => format!("{by} ({ago}s ago)"),
                (Some(by), None) => by.clone(),
                _ => "-".into(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..10)
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    // What needs an operator, under the table: one line each.
    for r in rows {
        let notes = [("HALTED", &r.halted), ("STUCK", &r.stuck), ("RPC", &r.rpc_error)];
        for (what, why) in notes {
            if let Some(why) = why {
                out.push_str(&format!("{}: {what}: {why}\n", r.stream));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_halted_stuck_and_headless_streams_under_it() {
        let ok = StreamStatus {
            stream: "ok".into(),
            chain_id: 1,
            cursor: Some(10),
            head: Some(12),
            safe_head: Some(10),
            lag_blocks: Some(0),
            events_stored: 3,
            dead_letters: 0,
            updated_by: Some("r1".into()),
            updated_secs_ago: Some(2),
            rpc_error: None,
            halted: None,
            stuck: None,
            failed_ranges_pending: 0,
            failed_ranges_dead: 0,
            backfill_blocks_left: 0,
        };
        let halted = StreamStatus {
            stream: "burns".into(),
            halted: Some("deep reorg at 7: run logcursor rewind".into()),
            ..ok.clone()
        };
        let stuck = StreamStatus {
            stream: "mints".into(),
            stuck: Some("failing for 300s: timeout".into()),
            rpc_error: Some("head unknown: connection refused".into()),
            ..ok.clone()
        };
        let table = render_table(&[ok, halted, stuck]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4 + 3, "{table}");
        assert!(lines[0].starts_with("STREAM"), "{table}");
        assert_eq!(
            &lines[4..],
            [
                "burns: HALTED: deep reorg at 7: run logcursor rewind",
                "mints: STUCK: failing for 300s: timeout",
                "mints: RPC: head unknown: connection refused",
            ]
        );
    }
}
