//! The HTTP endpoints an orchestrator and an operator use:
//!
//! - `/livez`: the process is running its loops (200 until shutdown starts).
//! - `/readyz`: this replica can work: the database answers and its loops
//!   run; 503 with the reasons otherwise. Lag and halts are metrics and
//!   `/status`, not a reason to take every replica out of rotation at once
//!   (`telemetry.max_lag_blocks`, off by default, adds a lag gate).
//! - `/metrics`: Prometheus text ([`crate::metrics`]).
//! - `/status`: JSON per stream: cursor, heads, lag, last tick outcome, and
//!   which replica moved the cursor last.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::Registry;
use crate::store::pool::Database;
use crate::store::pool::TxLimits;
use crate::store::{cursor, failed_ranges};

/// What the handlers read.
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub db: Database,
    /// Configured stream names, in order.
    pub streams: Vec<String>,
    pub max_lag_blocks: Option<u64>,
    pub replica_id: String,
    /// Fires when shutdown starts: `/livez` and `/readyz` then fail.
    pub stopping: CancellationToken,
}

/// One stream in `/status`.
#[derive(Debug, Serialize)]
pub struct StreamView {
    pub stream: String,
    pub chain_id: u64,
    pub cursor: Option<i64>,
    pub head: u64,
    pub safe_head: u64,
    pub lag_blocks: u64,
    pub lag_seconds: Option<u64>,
    pub block_range: u64,
    pub last_tick_outcome: String,
    pub last_error: Option<String>,
    /// The replica that moved the cursor last (from the database).
    pub last_processed_by: Option<String>,
    pub last_processed_secs_ago: Option<u64>,
    pub halted: Option<String>,
}

/// The whole `/status` document.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub replica: String,
    pub uptime_seconds: u64,
    pub streams: Vec<StreamView>,
}

/// Serves until `cancel` fires.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<HttpState>, cancel: CancellationToken) {
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state);
    let shutdown = async move { cancel.cancelled().await };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

async fn livez(State(s): State<Arc<HttpState>>) -> Response {
    if s.stopping.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    let mut text = s.registry.render();
    // The backlog lives in the database; a slow database does not block the rest.
    match tokio::time::timeout(Duration::from_secs(2), database_metrics(&s.db, &s.streams)).await {
        Ok(Ok(more)) => text.push_str(&more),
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics: backlog unavailable"),
        Err(_) => tracing::warn!("metrics: backlog query took longer than 2s"),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

/// Failed ranges (pending, dead), dead letters and the contiguous watermark
/// per stream, as Prometheus text.
pub async fn database_metrics(db: &Database, streams: &[String]) -> Result<String, String> {
    use std::fmt::Write as _;
    let mut client = db.get().await.map_err(|e| e.to_string())?;
    let tx = db
        .begin(&mut client, TxLimits::SHORT)
        .await
        .map_err(|e| e.to_string())?;
    let names: Vec<&str> = streams.iter().map(String::as_str).collect();
    let rows = failed_ranges::backlogs(&*tx, &names).await.map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    type Pick = fn(&failed_ranges::Backlog) -> i64;
    let series: [(&str, &str, Pick); 5] = [
        (
            "logcursor_failed_ranges_pending",
            "Skipped ranges waiting for the gap-fill worker.",
            |b| b.pending,
        ),
        (
            "logcursor_failed_ranges_dead",
            "Skipped ranges that failed gapfill_max_attempts times.",
            |b| b.dead,
        ),
        ("logcursor_dead_letters", "Logs parked in dead_letters.", |b| {
            b.dead_letters
        }),
        (
            "logcursor_contiguous_watermark_block",
            "Highest block below which nothing is pending.",
            |b| b.watermark,
        ),
        (
            "logcursor_backfill_blocks_left",
            "Blocks of filter backfills still to fetch.",
            |b| b.backfill_blocks_left,
        ),
    ];
    for (name, help, pick) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (stream, b) in &rows {
            let _ = writeln!(out, "{name}{{stream=\"{stream}\"}} {}", pick(b));
        }
    }
    Ok(out)
}

async fn readyz(State(s): State<Arc<HttpState>>) -> Response {
    let mut reasons = Vec::new();
    if s.stopping.is_cancelled() {
        reasons.push("shutting down".to_string());
    }
    match s.max_lag_blocks {
        // The optional lag gate needs the cursors.
        Some(max) => match view(&s).await {
            Err(e) => reasons.push(format!("database: {e}")),
            Ok(v) => {
                for st in v.streams.iter().filter(|st| st.lag_blocks > max) {
                    reasons.push(format!(
                        "{} is {} blocks behind (max_lag_blocks = {max})",
                        st.stream, st.lag_blocks
                    ));
                }
            }
        },
        None => {
            if let Err(e) = reachable(&s.db).await {
                reasons.push(format!("database: {e}"));
            }
        }
    }
    let ready = reasons.is_empty();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(serde_json::json!({ "ready": ready, "reasons": reasons }))).into_response()
}

/// The database answers a trivial query within a second.
async fn reachable(db: &Database) -> Result<(), String> {
    let check = async {
        let client = db.get().await.map_err(|e| e.to_string())?;
        client.simple_query("SELECT 1").await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    tokio::time::timeout(Duration::from_secs(1), check)
        .await
        .map_err(|_| "no answer within 1s".to_string())?
}

async fn status(State(s): State<Arc<HttpState>>) -> Response {
    match view(&s).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "error": e }))).into_response(),
    }
}

/// Metrics joined with the cursor rows; the database part is bounded in time.
async fn view(s: &HttpState) -> Result<StatusView, String> {
    let read = async {
        let mut client = s.db.get().await.map_err(|e| e.to_string())?;
        let tx =
            s.db.begin(&mut client, TxLimits::SHORT)
                .await
                .map_err(|e| e.to_string())?;
        let names: Vec<&str> = s.streams.iter().map(String::as_str).collect();
        let found = cursor::get_many(&*tx, &names).await.map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        let rows: Vec<Option<cursor::CursorRow>> = s
            .streams
            .iter()
            .map(|n| found.iter().find(|(id, _)| id == n).map(|(_, r)| r.clone()))
            .collect();
        Ok::<_, String>(rows)
    };
    let rows = tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .map_err(|_| "no answer within 2s".to_string())??;
    let metrics = s.registry.streams();
    let streams = s
        .streams
        .iter()
        .zip(rows)
        .map(|(name, row)| {
            let m = metrics.iter().find(|(n, _)| n == name).map(|(_, m)| Arc::clone(m));
            let (outcome, error) = m.as_ref().map(|m| m.last_outcome()).unwrap_or_default();
            let load = |f: fn(&crate::metrics::StreamMetrics) -> u64| m.as_deref().map_or(0, f);
            let db_cursor = row.as_ref().map(|r| r.cursor.processed.to_db());
            let safe_head = load(|m| m.safe_head.load(std::sync::atomic::Ordering::Relaxed));
            StreamView {
                stream: name.clone(),
                chain_id: m.as_ref().map_or(0, |m| m.chain_id),
                cursor: db_cursor,
                head: load(|m| m.chain_head.load(std::sync::atomic::Ordering::Relaxed)),
                safe_head,
                // The database's cursor is the truth; this replica's view may be older.
                lag_blocks: db_cursor.map_or(0, |c| {
                    u64::try_from(i64::try_from(safe_head).unwrap_or(i64::MAX) - c).unwrap_or(0)
                }),
                lag_seconds: m.as_ref().and_then(|m| m.lag_seconds()),
                block_range: load(|m| m.block_range.load(std::sync::atomic::Ordering::Relaxed)),
                last_tick_outcome: if outcome.is_empty() { "none".into() } else { outcome },
                last_error: error,
                last_processed_by: row.as_ref().and_then(|r| r.updated_by.clone()),
                last_processed_secs_ago: row
                    .as_ref()
                    .and_then(|r| r.updated_at.elapsed().ok())
                    .map(|d| d.as_secs()),
                halted: row.as_ref().and_then(|r| r.halted_reason.clone()),
            }
        })
        .collect();
    Ok(StatusView {
        replica: s.replica_id.clone(),
        uptime_seconds: s.registry.uptime().as_secs(),
        streams,
    })
}
