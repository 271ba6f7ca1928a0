//! JSON-RPC over HTTP: a deadline on every request (ethers' own `Http`
//! transport has none), retries of retryable errors with the [`RPC`]
//! backoff, batches matched by id, and every attempt reported to the
//! stream's observer. Errors never carry the URL (it may hold an API key).

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::client::Rpc;
use super::error::{ChainError, ChainErrorKind};
use crate::backoff::RPC;

/// JSON-RPC request ids; only for matching answers to requests.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The JSON-RPC response envelope.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    id: Value,
    #[serde(default)]
    result: Option<Value>,
    error: Option<RpcErrorObject>,
}

#[derive(Deserialize)]
struct RpcErrorObject {
    code: i64,
    #[serde(default)]
    message: String,
    data: Option<Value>,
}

/// One answer of a batch: its result, or the node's error for that call.
pub(super) type Answer = Result<Value, ChainErrorKind>;

impl Rpc<'_> {
    pub(super) async fn call<R: DeserializeOwned>(&self, method: &'static str, params: Value) -> Result<R, ChainError> {
        self.call_with(method, params, ChainError::is_retryable).await
    }

    /// One call with up to `attempts` tries while `retry` says so.
    pub(super) async fn call_with<R: DeserializeOwned>(
        &self,
        method: &'static str,
        params: Value,
        retry: impl Fn(&ChainError) -> bool,
    ) -> Result<R, ChainError> {
        let mut attempt = 1;
        loop {
            let body = json!({"jsonrpc": "2.0", "id": NEXT_ID.fetch_add(1, Ordering::Relaxed), "method": method, "params": params});
            let started = Instant::now();
            let result = match self.post(method, &body).await {
                Ok(bytes) => parse_single(&bytes).map_err(|k| self.error(method, k)),
                Err(e) => Err(e),
            };
            let result = result.and_then(|v| {
                serde_json::from_value::<R>(v)
                    .map_err(|e| self.error(method, ChainErrorKind::Malformed(format!("unexpected result: {e}"))))
            });
            self.observe(method, result.as_ref().map(|_| ()), started);
            match result {
                Err(e) if attempt < self.client.opts.attempts && retry(&e) => {
                    let delay = RPC.delay(attempt);
                    tracing::debug!(endpoint = %self.endpoint(), method, error = %e, attempt, retry_in = ?delay, "retrying RPC request");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One batch of calls (possibly of different methods), answered by one
    /// backend: each call's answer or error, in order. The whole batch is
    /// retried on a retryable transport error; an answer that is not a
    /// batch means the endpoint does not take batches (remembered; the
    /// caller falls back to single calls).
    pub(super) async fn batch(&self, calls: Vec<(&'static str, Value)>) -> Result<Vec<Answer>, ChainError> {
        let method = calls.first().map_or("batch", |(m, _)| *m);
        if calls.len() == 1 || !self.ep.takes_batches() {
            let mut out = Vec::with_capacity(calls.len());
            for (m, params) in calls {
                match self.call::<Value>(m, params).await {
                    Ok(v) => out.push(Ok(v)),
                    Err(e) if matches!(e.kind, ChainErrorKind::Rpc { .. }) => out.push(Err(e.kind)),
                    Err(e) => return Err(e),
                }
            }
            return Ok(out);
        }
        let mut attempt = 1;
        loop {
            let first_id = NEXT_ID.fetch_add(calls.len() as u64, Ordering::Relaxed);
            let body: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, (m, p))| json!({"jsonrpc": "2.0", "id": first_id + i as u64, "method": m, "params": p}))
                .collect();
            let started = Instant::now();
            let result = match self.post(method, &Value::Array(body)).await {
                Ok(bytes) => match parse_batch(&bytes, first_id, calls.len()) {
                    Err(NotABatch) => {
                        self.ep.refuses_batches();
                        return Box::pin(self.batch(calls)).await;
                    }
                    // Each answer's error is scrubbed where its caller makes
                    // it a ChainError (`Rpc::error`).
                    Ok(r) => r.map_err(|k| self.error(method, k)),
                },
                Err(e) if is_batch_refusal(&e.kind) => {
                    self.ep.refuses_batches();
                    return Box::pin(self.batch(calls)).await;
                }
                Err(e) => Err(e),
            };
            self.observe(method, result.as_ref().map(|_| ()), started);
            match result {
                Err(e) if attempt < self.client.opts.attempts && e.is_retryable() => {
                    tokio::time::sleep(RPC.delay(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn observe(&self, method: &'static str, result: Result<(), &ChainError>, started: Instant) {
        if let Some(o) = &self.client.observer {
            o.observe(self.endpoint(), method, result.map_err(|e| &e.kind), started.elapsed());
        }
    }

    /// POSTs `body` with the stream's deadline; a non-2xx status is an `Http` error.
    async fn post(&self, method: &'static str, body: &Value) -> Result<bytes::Bytes, ChainError> {
        self.ep.acquire().await;
        let err = |kind| self.error(method, kind);
        let response = self
            .client
            .shared
            .http()
            .post(self.ep.url.expose())
            .timeout(self.client.opts.timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| err(classify_reqwest(e)))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| err(classify_reqwest(e)))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<Envelope>(&bytes)
                .ok()
                .and_then(|e| e.error)
                .map(|e| e.message)
                .unwrap_or_else(|| self.ep.scrubber.excerpt(&bytes, 200));
            return Err(err(ChainErrorKind::Http {
                status: status.as_u16(),
                message,
            }));
        }
        Ok(bytes)
    }
}

/// A single answer's result (`null` included) or error.
fn parse_single(bytes: &[u8]) -> Result<Value, ChainErrorKind> {
    let envelope: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| ChainErrorKind::Malformed(format!("{e} (in {} bytes)", bytes.len())))?;
    envelope_result(envelope)
}

fn envelope_result(envelope: Envelope) -> Answer {
    if let Some(e) = envelope.error {
        return Err(ChainErrorKind::Rpc {
            code: e.code,
            message: e.message,
            data: e.data,
        });
    }
    Ok(envelope.result.unwrap_or(Value::Null))
}

/// The answer to a batch was a single object: the endpoint does not take batches.
struct NotABatch;

/// The answers of a batch of `n` calls with ids from `first_id`, in call
/// order. `Err(NotABatch)` when the endpoint answered with one object.
fn parse_batch(bytes: &[u8], first_id: u64, n: usize) -> Result<Result<Vec<Answer>, ChainErrorKind>, NotABatch> {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            return Ok(Err(ChainErrorKind::Malformed(format!(
                "batch answer: {e} (in {} bytes)",
                bytes.len()
            ))))
        }
    };
    let Value::Array(items) = value else {
        return Err(NotABatch);
    };
    Ok(match_answers(items, first_id, n))
}

fn match_answers(items: Vec<Value>, first_id: u64, n: usize) -> Result<Vec<Answer>, ChainErrorKind> {
    if items.len() != n {
        return Err(ChainErrorKind::Malformed(format!(
            "batch of {n} got {} answers",
            items.len()
        )));
    }
    let mut slots: Vec<Option<Answer>> = (0..n).map(|_| None).collect();
    for item in items {
        let env: Envelope =
            serde_json::from_value(item).map_err(|e| ChainErrorKind::Malformed(format!("batch answer: {e}")))?;
        let idx = env
            .id
            .as_u64()
            .and_then(|id| id.checked_sub(first_id))
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < n)
            .ok_or_else(|| ChainErrorKind::Malformed(format!("batch answer with unknown id {}", env.id)))?;
        slots[idx] = Some(envelope_result(env));
    }
    slots
        .into_iter()
        .map(|s| s.ok_or_else(|| ChainErrorKind::Malformed("batch answer missing an id".into())))
        .collect()
}

/// An HTTP status or JSON-RPC error that says "no batches here".
fn is_batch_refusal(kind: &ChainErrorKind) -> bool {
    match kind {
        ChainErrorKind::Http { status, message } => {
            (*status == 400 || *status == 405) && message.to_lowercase().contains("batch")
        }
        _ => false,
    }
}

fn classify_reqwest(e: reqwest::Error) -> ChainErrorKind {
    if e.is_timeout() {
        ChainErrorKind::Timeout
    } else if e.is_decode() || e.is_body() {
        ChainErrorKind::Malformed(crate::redact::describe_http_error(e))
    } else {
        ChainErrorKind::Connect(crate::redact::describe_http_error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_are_matched_by_id_whatever_their_order() {
        let answer = br#"[{"jsonrpc":"2.0","id":11,"result":"0x2"},{"jsonrpc":"2.0","id":10,"error":{"code":-32000,"message":"no"}}]"#;
        let Ok(Ok(got)) = parse_batch(answer, 10, 2) else {
            panic!("a batch")
        };
        assert!(matches!(&got[0], Err(ChainErrorKind::Rpc { code: -32000, .. })));
        assert_eq!(got[1], Ok(json!("0x2")));
        assert!(parse_batch(
            br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"batch"}}"#,
            10,
            2
        )
        .is_err());
        assert!(matches!(
            parse_batch(br#"[{"jsonrpc":"2.0","id":10,"result":1}]"#, 10, 2),
            Ok(Err(ChainErrorKind::Malformed(_)))
        ));
    }
}
