//! JSON-RPC over HTTP with a deadline on every request.
//!
//! Errors are typed by kind ([`ChainErrorKind`]): the caller asks
//! [`ChainError::is_retryable`] and never inspects message text. URLs are
//! printed only in redacted form (an API key in the path or query never
//! appears in an error, a log line or a span).

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ethers::types::{Log, H256, U256, U64};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Address, Hash32, Header, LogFilter, RawLog};
use crate::redact::{redact_url, Secret};

/// A stream's JSON-RPC endpoints. Requests go to the active endpoint; a
/// failure that is the endpoint's fault (timeout, connection, HTTP 429/5xx)
/// moves the next request to the next endpoint.
pub struct ChainClient {
    http: reqwest::Client,
    endpoints: Vec<Endpoint>,
    /// Index of the endpoint the next request uses.
    active: AtomicUsize,
    /// JSON-RPC request ids; only for matching answers in a packet capture.
    next_id: AtomicU64,
    /// The per-request deadline, also reported in timeout errors.
    timeout: Duration,
}

struct Endpoint {
    url: Secret,
    /// The redacted URL: the only form that is ever printed.
    display: String,
}

/// What went wrong with a request, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainErrorKind {
    /// No answer within the deadline.
    Timeout,
    /// Could not connect, or the connection broke.
    Connect(String),
    /// The HTTP status was not 2xx.
    Http { status: u16, message: String },
    /// The node answered with a JSON-RPC error object.
    Rpc {
        code: i64,
        message: String,
        data: Option<Value>,
    },
    /// The answer is not what the protocol promises (truncated JSON, a log
    /// outside the range, a missing field…): never stored, retried.
    Malformed(String),
    /// The endpoint serves another chain than the stream is configured for.
    WrongChain { expected: u64, actual: u64 },
}

/// A failed request, naming method and (redacted) endpoint.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{method} to {endpoint}: {kind}")]
pub struct ChainError {
    pub method: &'static str,
    /// Redacted endpoint URL.
    pub endpoint: String,
    pub kind: ChainErrorKind,
}

impl fmt::Display for ChainErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => write!(f, "timed out"),
            Self::Connect(r) => write!(f, "connection failed: {r}"),
            Self::Http { status, message } => write!(f, "HTTP {status}: {message}"),
            Self::Rpc { code, message, .. } => write!(f, "JSON-RPC error {code}: {message}"),
            Self::Malformed(r) => write!(f, "malformed response: {r}"),
            Self::WrongChain { expected, actual } => {
                write!(
                    f,
                    "endpoint serves chain id {actual}, but the stream is configured for chain id {expected}"
                )
            }
        }
    }
}

/// JSON-RPC codes that providers use for rate limiting and overload.
const RATE_LIMIT_CODES: [i64; 3] = [-32005, -32016, 429];

impl ChainError {
    /// Worth retrying later: the same request may succeed.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            ChainErrorKind::Timeout | ChainErrorKind::Connect(_) | ChainErrorKind::Malformed(_) => true,
            ChainErrorKind::Http { status, .. } => *status == 429 || *status >= 500,
            ChainErrorKind::Rpc { code, .. } => RATE_LIMIT_CODES.contains(code) || *code == -32603,
            ChainErrorKind::WrongChain { .. } => false,
        }
    }

    /// The endpoint, not the request, is at fault: try another endpoint.
    fn is_endpoint_fault(&self) -> bool {
        match &self.kind {
            ChainErrorKind::Timeout | ChainErrorKind::Connect(_) => true,
            ChainErrorKind::Http { status, .. } => *status == 429 || *status >= 500,
            ChainErrorKind::Rpc { code, .. } => RATE_LIMIT_CODES.contains(code),
            _ => false,
        }
    }
}

/// The JSON-RPC response envelope.
#[derive(Deserialize)]
struct Envelope<R> {
    #[serde(default = "none")]
    result: Option<R>,
    error: Option<RpcErrorObject>,
}

fn none<R>() -> Option<R> {
    None
}

#[derive(Deserialize)]
struct RpcErrorObject {
    code: i64,
    #[serde(default)]
    message: String,
    data: Option<Value>,
}

/// A block header as JSON-RPC returns it (only the fields used).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HeaderJson {
    number: Option<U64>,
    hash: Option<H256>,
    parent_hash: H256,
    timestamp: U256,
}

impl ChainClient {
    /// A client for `urls` (at least one) with `timeout` per request.
    pub fn new(urls: &[Secret], timeout: Duration) -> Result<ChainClient, ChainError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ChainError {
                method: "client",
                endpoint: "-".into(),
                kind: ChainErrorKind::Connect(describe_reqwest(e)),
            })?;
        let endpoints = urls
            .iter()
            .map(|u| Endpoint {
                display: redact_url(u.expose()),
                url: u.clone(),
            })
            .collect();
        Ok(ChainClient {
            http,
            endpoints,
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            timeout,
        })
    }

    /// Redacted URLs of the endpoints, in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.display.clone()).collect()
    }

    /// Checks that every endpoint serves `expected`; the first that does not
    /// (or cannot answer) is named in the error.
    pub async fn verify_chain_id(&self, expected: u64) -> Result<(), ChainError> {
        for ep in &self.endpoints {
            let id: U64 = self.call_on(ep, "eth_chainId", json!([])).await?;
            if id.as_u64() != expected {
                return Err(ChainError {
                    method: "eth_chainId",
                    endpoint: ep.display.clone(),
                    kind: ChainErrorKind::WrongChain {
                        expected,
                        actual: id.as_u64(),
                    },
                });
            }
        }
        Ok(())
    }

    /// The latest block number.
    pub async fn block_number(&self) -> Result<u64, ChainError> {
        let n: U64 = self.call("eth_blockNumber", json!([])).await?;
        Ok(n.as_u64())
    }

    /// The header at `number`, or `None` if the node does not have it.
    pub async fn header(&self, number: u64) -> Result<Option<Header>, ChainError> {
        const METHOD: &str = "eth_getBlockByNumber";
        let h: Option<HeaderJson> = self.call(METHOD, json!([format!("{number:#x}"), false])).await?;
        let Some(h) = h else { return Ok(None) };
        let malformed = |reason: String| self.error(METHOD, ChainErrorKind::Malformed(reason));
        let (Some(n), Some(hash)) = (h.number, h.hash) else {
            return Err(malformed(format!("block {number} has no number or hash")));
        };
        if n.as_u64() != number {
            return Err(malformed(format!("asked for block {number}, got block {n}")));
        }
        Ok(Some(Header {
            number,
            hash: Hash32(hash.0),
            parent_hash: Hash32(h.parent_hash.0),
            timestamp: h.timestamp.low_u64(),
        }))
    }

    /// Logs in `[from, to]` matching `filter`, in (block, log index) order.
    /// A response that contradicts the request (a log outside the range,
    /// from another address or topic, a removed log, a missing field) is
    /// rejected whole as [`ChainErrorKind::Malformed`]: nothing of it is used.
    pub async fn get_logs(&self, from: u64, to: u64, filter: &LogFilter) -> Result<Vec<RawLog>, ChainError> {
        const METHOD: &str = "eth_getLogs";
        let params = json!([{
            "fromBlock": format!("{from:#x}"),
            "toBlock": format!("{to:#x}"),
            "address": filter.addresses.iter().map(Address::to_string).collect::<Vec<_>>(),
            "topics": [filter.topic0s.iter().map(Hash32::to_string).collect::<Vec<_>>()],
        }]);
        let logs: Vec<Log> = self.call(METHOD, params).await?;
        let mut out = Vec::with_capacity(logs.len());
        for log in logs {
            let raw = to_raw(log).map_err(|r| self.error(METHOD, ChainErrorKind::Malformed(r)))?;
            if let Some(reason) = contradiction(&raw, from, to, filter) {
                return Err(self.error(METHOD, ChainErrorKind::Malformed(reason)));
            }
            out.push(raw);
        }
        out.sort_by_key(|l| (l.block_number, l.log_index));
        Ok(out)
    }

    /// An answer of the active endpoint that contradicts another of its
    /// answers (e.g. a log whose block hash differs from the header's).
    pub fn inconsistent(&self, method: &'static str, reason: String) -> ChainError {
        self.error(method, ChainErrorKind::Malformed(reason))
    }

    fn error(&self, method: &'static str, kind: ChainErrorKind) -> ChainError {
        ChainError {
            method,
            endpoint: self.active_endpoint().display.clone(),
            kind,
        }
    }

    fn active_endpoint(&self) -> &Endpoint {
        &self.endpoints[self.active.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    /// One request on the active endpoint; an endpoint fault moves later
    /// requests to the next endpoint.
    async fn call<R: DeserializeOwned>(&self, method: &'static str, params: Value) -> Result<R, ChainError> {
        let idx = self.active.load(Ordering::Relaxed) % self.endpoints.len();
        let result = self.call_on(&self.endpoints[idx], method, params).await;
        if let Err(e) = &result {
            if e.is_endpoint_fault() && self.endpoints.len() > 1 {
                let next = (idx + 1) % self.endpoints.len();
                if self
                    .active
                    .compare_exchange(idx, next, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    tracing::warn!(from = %self.endpoints[idx].display, to = %self.endpoints[next].display, error = %e, "switching RPC endpoint");
                }
            }
        }
        result
    }

    async fn call_on<R: DeserializeOwned>(
        &self,
        ep: &Endpoint,
        method: &'static str,
        params: Value,
    ) -> Result<R, ChainError> {
        let err = |kind| ChainError {
            method,
            endpoint: ep.display.clone(),
            kind,
        };
        let body = json!({
            "jsonrpc": "2.0",
            "id": self.next_id.fetch_add(1, Ordering::Relaxed),
            "method": method,
            "params": params,
        });
        let response = self
            .http
            .post(ep.url.expose())
            .json(&body)
            .send()
            .await
            .map_err(|e| err(classify_reqwest(e)))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| err(classify_reqwest(e)))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<Envelope<Value>>(&bytes)
                .ok()
                .and_then(|e| e.error)
                .map(|e| e.message)
                .unwrap_or_else(|| snippet(&bytes));
            return Err(err(ChainErrorKind::Http {
                status: status.as_u16(),
                message,
            }));
        }
        let envelope: Envelope<R> = serde_json::from_slice(&bytes)
            .map_err(|e| err(ChainErrorKind::Malformed(format!("{e} (in {} bytes)", bytes.len()))))?;
        if let Some(e) = envelope.error {
            return Err(err(ChainErrorKind::Rpc {
                code: e.code,
                message: e.message,
                data: e.data,
            }));
        }
        match envelope.result {
            Some(r) => Ok(r),
            // `null` is a valid answer for some methods (an unknown block):
            // let R decide whether it accepts it.
            None => serde_json::from_value(Value::Null)
                .map_err(|_| err(ChainErrorKind::Malformed("result is missing or null".into()))),
        }
    }

    /// The configured per-request deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

fn to_raw(log: Log) -> Result<RawLog, String> {
    let missing = |field: &str| format!("a log has no {field}");
    Ok(RawLog {
        block_number: log.block_number.ok_or_else(|| missing("blockNumber"))?.as_u64(),
        block_hash: Hash32(log.block_hash.ok_or_else(|| missing("blockHash"))?.0),
        tx_hash: Hash32(log.transaction_hash.ok_or_else(|| missing("transactionHash"))?.0),
        log_index: {
            let i = log.log_index.ok_or_else(|| missing("logIndex"))?;
            if i > U256::from(i32::MAX) {
                return Err(format!("log index {i} out of range"));
            }
            i.as_u64()
        },
        address: Address(log.address.0),
        topics: log.topics.into_iter().map(|t| Hash32(t.0)).collect(),
        data: log.data.to_vec(),
        removed: log.removed.unwrap_or(false),
    })
}

/// Why a log cannot be part of the answer to this request, if it cannot.
fn contradiction(log: &RawLog, from: u64, to: u64, filter: &LogFilter) -> Option<String> {
    let at = || format!("log {} of tx {}", log.log_index, log.tx_hash);
    if log.removed {
        return Some(format!("{} is marked removed (a reorg signal)", at()));
    }
    if !(from..=to).contains(&log.block_number) {
        return Some(format!(
            "{} is in block {}, outside {from}..={to}",
            at(),
            log.block_number
        ));
    }
    if !filter.addresses.contains(&log.address) {
        return Some(format!("{} comes from {}, which was not asked for", at(), log.address));
    }
    match log.topics.first() {
        Some(t) if filter.topic0s.contains(t) => None,
        _ => Some(format!("{} has a topic0 that was not asked for", at())),
    }
}

fn classify_reqwest(e: reqwest::Error) -> ChainErrorKind {
    if e.is_timeout() {
        ChainErrorKind::Timeout
    } else if e.is_decode() || e.is_body() {
        ChainErrorKind::Malformed(describe_reqwest(e))
    } else {
        ChainErrorKind::Connect(describe_reqwest(e))
    }
}

/// The error and its causes, without the URL (which may carry an API key).
fn describe_reqwest(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
