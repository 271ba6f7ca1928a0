//! The HTTP endpoints an orchestrator and an operator use:
//!
//! - `/livez`: the process is running its loops (200 until shutdown starts).
//! - `/readyz`: this replica can work: the database answers (from memory
//!   when a transaction began in the last 5 s, else one trivial query) and
//!   shutdown has not started; 503 with the reasons otherwise. Lag and halts are metrics and
//!   `/status`, not a reason to take every replica out of rotation at once
//!   (`telemetry.max_lag_blocks`, off by default, adds a lag gate).
//! - `/metrics`: Prometheus text of the replica's one registry
//!   ([`crate::metrics`]), the database's gauges read first.
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
use crate::poller::Poller;
use crate::store::cursor;
use crate::store::metrics::BacklogGauges;
use crate::store::pool::Database;
use crate::store::pool::TxLimits;

/// What the handlers read.
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub db: Database,
    /// Every configured stream's poller, in order.
    pub pollers: Vec<Arc<Poller>>,
    pub max_lag_blocks: Option<u64>,
    pub replica_id: String,
    /// Fires when shutdown starts: `/livez` and `/readyz` then fail.
    pub stopping: CancellationToken,
    /// For `/status`'s uptime.
    pub started: std::time::Instant,
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
    let text = s.registry.encode().await;
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// The database's part of `/metrics` alone (failed ranges pending and dead,
/// dead letters, the contiguous watermark, backfill left per stream).
pub async fn database_metrics(db: &Database, streams: &[String]) -> Result<String, String> {
    let gauges = Arc::new(BacklogGauges::new(db.clone(), streams.to_vec()));
    gauges.read_now().await.map_err(|e| e.to_string())?;
    let mut registry = Registry::new();
    registry.collect(gauges);
    Ok(registry.encode_now())
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
        // From memory while the loops' transactions show the database
        // answering; one short query only when nothing began lately.
        None if s.db.answered_within(ANSWERED_LATELY) => {}
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

/// A transaction began this recently: the database answers (`/readyz`
/// then needs no connection, so it answers in microseconds at any stream
/// count and whatever the pool's load).
const ANSWERED_LATELY: Duration = Duration::from_secs(5);

/// The database answers a trivial query within a second.
async fn reachable(db: &Database) -> Result<(), String> {
    let check = async {
        let client = db.get().await.map_err(|e| e.to_string())?;
        client.simple_query("SELECT 1").await.map_err(|e| e.to_string())?;
        db.note_answered();
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
        let names: Vec<&str> = s.pollers.iter().map(|p| p.stream.cfg.name.as_str()).collect();
        let found = cursor::get_many(&*tx, &names).await.map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        let rows: Vec<Option<cursor::CursorRow>> = names
            .iter()
            .map(|n| found.iter().find(|(id, _)| id == n).map(|(_, r)| r.clone()))
            .collect();
        Ok::<_, String>(rows)
    };
    let rows = tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .map_err(|_| "no answer within 2s".to_string())??;
    let streams = s
        .pollers
        .iter()
        .zip(rows)
        .map(|(p, row)| {
            let last = p.last_tick();
            let db_cursor = row.as_ref().map(|r| r.cursor.processed.to_db());
            StreamView {
                stream: p.stream.cfg.name.to_string(),
                chain_id: p.stream.cfg.chain_id,
                cursor: db_cursor,
                head: last.head,
                safe_head: last.safe_head,
                // The database's cursor is the truth; this replica's view may be older.
                lag_blocks: db_cursor.map_or(0, |c| {
                    u64::try_from(i64::try_from(last.safe_head).unwrap_or(i64::MAX) - c).unwrap_or(0)
                }),
                lag_seconds: last.cursor_time.map(|t| crate::metrics::now_secs().saturating_sub(t)),
                block_range: p.stream.chain.pick().log_span(),
                last_tick_outcome: if last.outcome.is_empty() {
                    "none".into()
                } else {
                    last.outcome.to_string()
                },
                last_error: last.error,
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
        uptime_seconds: s.started.elapsed().as_secs(),
        streams,
    })
}
