//! JSON-RPC over HTTP: a deadline on every request, retries with jittered
//! exponential backoff on retryable errors only, failover between endpoints
//! with a cool-down, an optional per-endpoint request rate, batched header
//! requests, and the adaptive `eth_getLogs` range ([`super::range`]).
//!
//! Errors are typed by kind ([`ChainErrorKind`]): callers ask
//! [`ChainError::is_retryable`] and never inspect message text. URLs are
//! printed only in redacted form, so an API key in the path or query never
//! reaches an error, a log line or a span.
//!
//! A tick pins one endpoint ([`ChainClient::pick`] → [`Rpc`]) so that the
//! answers it combines (head, headers, logs) come from one node and can be
//! checked against each other.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ethers::types::{Log, H256, U256, U64};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::range::{too_large, AdaptiveSpan};
use super::{Address, Hash32, Header, LogFilter, RawLog};
use crate::redact::{redact_url, Secret};

/// Most requests in one JSON-RPC batch (providers cap batches at 100-1000).
const MAX_BATCH: usize = 100;

/// One configured endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub url: Secret,
    /// Requests per second this endpoint may receive; `None`: unlimited.
    pub max_requests_per_second: Option<f64>,
}

/// How the client treats every endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Deadline of one HTTP request.
    pub timeout: Duration,
    /// Tries per call (1 = no retry) on retryable errors, on one endpoint.
    pub attempts: u32,
    /// How long an endpoint that failed a call is passed over.
    pub cooldown: Duration,
    /// The largest `eth_getLogs` span; the learned span starts here.
    pub max_block_range: u64,
}

/// Told about every request attempt (for metrics).
pub trait RpcObserver: Send + Sync {
    /// `endpoint` is the redacted URL.
    fn observe(&self, endpoint: &str, method: &'static str, result: Result<(), &ChainErrorKind>, latency: Duration);
}

/// A stream's endpoints.
pub struct ChainClient {
    http: reqwest::Client,
    endpoints: Vec<Endpoint>,
    opts: ClientOptions,
    observer: Option<std::sync::Arc<dyn RpcObserver>>,
    /// JSON-RPC request ids; only for matching answers in a capture.
    next_id: AtomicU64,
}

struct Endpoint {
    url: Secret,
    /// The redacted URL: the only form that is ever printed.
    display: String,
    limiter: Option<RateLimiter>,
    /// std Mutex: held only for a few assignments, never across an await.
    state: Mutex<EndpointState>,
}

struct EndpointState {
    /// Passed over until then after a failed call.
    cooling_until: Option<Instant>,
    /// The learned `eth_getLogs` span of this endpoint.
    span: AdaptiveSpan,
}

/// Spaces requests at least `interval` apart.
struct RateLimiter {
    interval: Duration,
    next_slot: tokio::sync::Mutex<Instant>,
}

impl RateLimiter {
    async fn acquire(&self) {
        let slot = {
            let mut next = self.next_slot.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
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
    /// outside the range, a removed log, a missing field, a block hash that
    /// disagrees with the header…): never stored, retried.
    Malformed(String),
    /// The endpoint serves another chain than the stream is configured for.
    WrongChain { expected: u64, actual: u64 },
    /// The endpoint is behind: its head is below a block the tick needs.
    Lagging { head: u64, needed: u64 },
    /// One block's logs exceed what the provider serves: an alarm, since no
    /// smaller request exists. Nothing is skipped.
    BlockTooLarge { block: u64, provider_message: String },
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
                write!(f, "endpoint serves chain id {actual}, but the stream is configured for chain id {expected}")
            }
            Self::Lagging { head, needed } => write!(f, "endpoint is behind: its head {head} is below block {needed}"),
            Self::BlockTooLarge { block, provider_message } => write!(
                f,
                "the logs of the single block {block} exceed what the provider serves ({provider_message}); nothing was skipped"
            ),
        }
    }
}

/// JSON-RPC codes that providers use for rate limiting and overload.
const RATE_LIMIT_CODES: [i64; 3] = [-32005, -32016, 429];

impl ChainError {
    /// Worth retrying: the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            ChainErrorKind::Timeout
            | ChainErrorKind::Connect(_)
            | ChainErrorKind::Malformed(_)
            | ChainErrorKind::Lagging { .. } => true,
            ChainErrorKind::Http { status, .. } => *status == 429 || *status >= 500,
            ChainErrorKind::Rpc { code, .. } => RATE_LIMIT_CODES.contains(code) || *code == -32603,
            ChainErrorKind::WrongChain { .. } | ChainErrorKind::BlockTooLarge { .. } => false,
        }
    }

    /// The endpoint, not the request, is at fault: prefer another one.
    pub fn is_endpoint_fault(&self) -> bool {
        match &self.kind {
            ChainErrorKind::Timeout | ChainErrorKind::Connect(_) | ChainErrorKind::Lagging { .. } => true,
            ChainErrorKind::Http { status, .. } => *status == 429 || *status >= 500,
            ChainErrorKind::Rpc { code, .. } => RATE_LIMIT_CODES.contains(code),
            ChainErrorKind::Malformed(_) => true,
            _ => false,
        }
    }
}

/// The JSON-RPC response envelope.
#[derive(Deserialize)]
struct Envelope<R> {
    #[serde(default)]
    id: Value,
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
    pub fn new(endpoints: &[EndpointConfig], opts: ClientOptions) -> Result<ChainClient, ChainError> {
        let http = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ChainError {
                method: "client",
                endpoint: "-".into(),
                kind: ChainErrorKind::Connect(describe_reqwest(e)),
            })?;
        let endpoints = endpoints
            .iter()
            .map(|e| Endpoint {
                display: redact_url(e.url.expose()),
                url: e.url.clone(),
                limiter: e.max_requests_per_second.filter(|r| *r > 0.0).map(|r| RateLimiter {
                    interval: Duration::from_secs_f64(1.0 / r),
                    next_slot: tokio::sync::Mutex::new(Instant::now()),
                }),
                state: Mutex::new(EndpointState {
                    cooling_until: None,
                    span: AdaptiveSpan::new(opts.max_block_range),
                }),
            })
            .collect();
        Ok(ChainClient {
            http,
            endpoints,
            opts,
            observer: None,
            next_id: AtomicU64::new(1),
        })
    }

    /// Reports every request attempt to `observer`.
    pub fn with_observer(mut self, observer: std::sync::Arc<dyn RpcObserver>) -> ChainClient {
        self.observer = Some(observer);
        self
    }

    /// Redacted URLs of the endpoints, in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.display.clone()).collect()
    }

    /// The endpoint to use now: the first, in configured order, that is not
    /// cooling down (so a recovered primary is preferred again); if all are,
    /// the one that recovers first.
    pub fn pick(&self) -> Rpc<'_> {
        let now = Instant::now();
        let cooling = |e: &Endpoint| e.lock().cooling_until.filter(|t| *t > now);
        let ep = self
            .endpoints
            .iter()
            .find(|e| cooling(e).is_none())
            .or_else(|| self.endpoints.iter().min_by_key(|e| cooling(e)))
            .unwrap_or(&self.endpoints[0]);
        Rpc { client: self, ep }
    }

    /// The endpoint [`Rpc::index`] named: to hand a tick's endpoint to
    /// another task, which cannot borrow the `Rpc`.
    pub fn at(&self, index: usize) -> Rpc<'_> {
        let ep = self.endpoints.get(index).unwrap_or(&self.endpoints[0]);
        Rpc { client: self, ep }
    }

    /// Checks that every endpoint serves `expected`; names the first that does not.
    pub async fn verify_chain_id(&self, expected: u64) -> Result<(), ChainError> {
        for ep in &self.endpoints {
            let rpc = Rpc { client: self, ep };
            let id: U64 = rpc.call("eth_chainId", json!([])).await?;
            if id.as_u64() != expected {
                return Err(rpc.error(
                    "eth_chainId",
                    ChainErrorKind::WrongChain {
                        expected,
                        actual: id.as_u64(),
                    },
                ));
            }
        }
        Ok(())
    }
}

impl Endpoint {
    fn lock(&self) -> std::sync::MutexGuard<'_, EndpointState> {
        // A panic while holding this lock leaves plain numbers behind: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Requests pinned to one endpoint.
pub struct Rpc<'a> {
    client: &'a ChainClient,
    ep: &'a Endpoint,
}

impl Rpc<'_> {
    /// The redacted URL of this endpoint.
    pub fn endpoint(&self) -> &str {
        &self.ep.display
    }

    /// The position of this endpoint in the configured list.
    pub fn index(&self) -> usize {
        self.client
            .endpoints
            .iter()
            .position(|e| std::ptr::eq(e, self.ep))
            .unwrap_or(0)
    }

    /// The learned `eth_getLogs` span of this endpoint.
    pub fn log_span(&self) -> u64 {
        self.ep.lock().span.get()
    }

    /// Passes this endpoint over for the cool-down (when a stream has others).
    pub fn cool_down(&self) {
        if self.client.endpoints.len() > 1 {
            self.ep.lock().cooling_until = Some(Instant::now() + self.client.opts.cooldown);
            tracing::warn!(endpoint = %self.ep.display, cooldown = ?self.client.opts.cooldown, "passing over RPC endpoint");
        }
    }

    /// An error of this endpoint: an answer that contradicts another of its
    /// answers, or one the caller judged from context (lagging).
    pub fn error(&self, method: &'static str, kind: ChainErrorKind) -> ChainError {
        ChainError {
            method,
            endpoint: self.ep.display.clone(),
            kind,
        }
    }

    /// The latest block number.
    pub async fn block_number(&self) -> Result<u64, ChainError> {
        let n: U64 = self.call("eth_blockNumber", json!([])).await?;
        Ok(n.as_u64())
    }

    /// The header of a tagged block (`"safe"`, `"finalized"`), if the node has one.
    pub async fn tagged_header(&self, tag: &'static str) -> Result<Option<Header>, ChainError> {
        let h: Option<HeaderJson> = self.call("eth_getBlockByNumber", json!([tag, false])).await?;
        h.map(|h| self.header_from(h, None)).transpose()
    }

    /// The headers at `numbers`, in one or a few batched requests; `None`
    /// where the node does not have the block.
    pub async fn headers(&self, numbers: &[u64]) -> Result<Vec<Option<Header>>, ChainError> {
        let mut out = Vec::with_capacity(numbers.len());
        for chunk in numbers.chunks(MAX_BATCH) {
            let params = chunk.iter().map(|n| json!([format!("{n:#x}"), false])).collect();
            let raw: Vec<Option<HeaderJson>> = self.call_batch("eth_getBlockByNumber", params).await?;
            for (n, h) in chunk.iter().zip(raw) {
                out.push(h.map(|h| self.header_from(h, Some(*n))).transpose()?);
            }
        }
        Ok(out)
    }

    fn header_from(&self, h: HeaderJson, asked: Option<u64>) -> Result<Header, ChainError> {
        let malformed = |r: String| self.error("eth_getBlockByNumber", ChainErrorKind::Malformed(r));
        let (Some(number), Some(hash)) = (h.number, h.hash) else {
            return Err(malformed("a block has no number or hash".into()));
        };
        if let Some(n) = asked.filter(|n| *n != number.as_u64()) {
            return Err(malformed(format!("asked for block {n}, got block {number}")));
        }
        Ok(Header {
            number: number.as_u64(),
            hash: Hash32(hash.0),
            parent_hash: Hash32(h.parent_hash.0),
            timestamp: h.timestamp.low_u64(),
        })
    }

    /// Every log in `[from, covered]` matching `filter`, in (block, log
    /// index) order, with `covered` = `to` unless a single block overflows
    /// what the provider serves: then `covered` is the block before it, so
    /// that the caller can keep the blocks before it, and the overflowing
    /// block is an error of its own when it comes first. Fetched in spans
    /// that adapt to the endpoint; the spans cover `[from, covered]`
    /// exactly, each block once. A response that contradicts its request is
    /// rejected whole as `Malformed`.
    pub async fn get_logs(&self, from: u64, to: u64, filter: &LogFilter) -> Result<(Vec<RawLog>, u64), ChainError> {
        const METHOD: &str = "eth_getLogs";
        let mut out = Vec::new();
        let mut at = from;
        while at <= to {
            let end = to.min(at.saturating_add(self.log_span() - 1));
            match self.logs_once(at, end, filter).await {
                Ok(logs) => {
                    out.extend(logs);
                    self.ep.lock().span.grow();
                    at = end + 1;
                }
                Err(e) => match too_large(&e.kind, at, end) {
                    Some(_) if at == end && at > from => {
                        tracing::warn!(endpoint = %self.ep.display, block = at, "a single block overflows eth_getLogs; keeping the blocks before it");
                        return Ok((sorted(out), at - 1));
                    }
                    Some(_) if at == end => {
                        let provider_message = e.kind.to_string();
                        return Err(self.error(
                            METHOD,
                            ChainErrorKind::BlockTooLarge {
                                block: at,
                                provider_message,
                            },
                        ));
                    }
                    Some(advice) => {
                        self.ep.lock().span.shrink(end - at + 1, advice);
                        tracing::debug!(endpoint = %self.ep.display, from = at, to = end, next_span = self.log_span(), "eth_getLogs range too large; shrinking");
                    }
                    None => return Err(e),
                },
            }
        }
        Ok((sorted(out), to))
    }

    /// One `eth_getLogs` request (retried on transient errors, but not on
    /// size errors, which the caller answers by shrinking).
    async fn logs_once(&self, from: u64, to: u64, filter: &LogFilter) -> Result<Vec<RawLog>, ChainError> {
        const METHOD: &str = "eth_getLogs";
        let params = json!([{
            "fromBlock": format!("{from:#x}"),
            "toBlock": format!("{to:#x}"),
            "address": filter.addresses.iter().map(Address::to_string).collect::<Vec<_>>(),
            "topics": [filter.topic0s.iter().map(Hash32::to_string).collect::<Vec<_>>()],
        }]);
        let retry_unless_size = |e: &ChainError| e.is_retryable() && too_large(&e.kind, from, to).is_none();
        let logs: Vec<Log> = self.call_with(METHOD, params, retry_unless_size).await?;
        let mut out = Vec::with_capacity(logs.len());
        for log in logs {
            let raw = to_raw(log).map_err(|r| self.error(METHOD, ChainErrorKind::Malformed(r)))?;
            if let Some(reason) = contradiction(&raw, from, to, filter) {
                return Err(self.error(METHOD, ChainErrorKind::Malformed(reason)));
            }
            out.push(raw);
        }
        Ok(out)
    }

    async fn call<R: DeserializeOwned>(&self, method: &'static str, params: Value) -> Result<R, ChainError> {
        self.call_with(method, params, ChainError::is_retryable).await
    }

    /// One call with up to `attempts` tries while `retry` says so.
    async fn call_with<R: DeserializeOwned>(
        &self,
        method: &'static str,
        params: Value,
        retry: impl Fn(&ChainError) -> bool,
    ) -> Result<R, ChainError> {
        let mut attempt = 1;
        loop {
            let body = json!({"jsonrpc": "2.0", "id": self.client.next_id.fetch_add(1, Ordering::Relaxed), "method": method, "params": params});
            let started = Instant::now();
            let result = match self.post(method, &body).await {
                Ok(bytes) => parse_envelope(&bytes).map_err(|k| self.error(method, k)),
                Err(e) => Err(e),
            };
            self.observe(method, result.as_ref().map(|_| ()), started);
            match result {
                Err(e) if attempt < self.client.opts.attempts && retry(&e) => {
                    let delay = retry_delay(attempt);
                    tracing::debug!(endpoint = %self.ep.display, method, error = %e, attempt, retry_in = ?delay, "retrying RPC request");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// A batch of calls of one method; answers are matched to requests by id.
    async fn call_batch<R: DeserializeOwned>(
        &self,
        method: &'static str,
        params: Vec<Value>,
    ) -> Result<Vec<R>, ChainError> {
        let mut attempt = 1;
        loop {
            let first_id = self.client.next_id.fetch_add(params.len() as u64, Ordering::Relaxed);
            let body: Vec<Value> = params
                .iter()
                .enumerate()
                .map(|(i, p)| json!({"jsonrpc": "2.0", "id": first_id + i as u64, "method": method, "params": p}))
                .collect();
            let started = Instant::now();
            let result = match self.post(method, &Value::Array(body)).await {
                Ok(bytes) => parse_batch(&bytes, first_id, params.len()).map_err(|k| self.error(method, k)),
                Err(e) => Err(e),
            };
            self.observe(method, result.as_ref().map(|_| ()), started);
            match result {
                Err(e) if attempt < self.client.opts.attempts && e.is_retryable() => {
                    tokio::time::sleep(retry_delay(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn observe(&self, method: &'static str, result: Result<(), &ChainError>, started: Instant) {
        if let Some(o) = &self.client.observer {
            o.observe(&self.ep.display, method, result.map_err(|e| &e.kind), started.elapsed());
        }
    }

    /// POSTs `body`; a non-2xx status is an `Http` error.
    async fn post(&self, method: &'static str, body: &Value) -> Result<bytes::Bytes, ChainError> {
        if let Some(l) = &self.ep.limiter {
            l.acquire().await;
        }
        let err = |kind| self.error(method, kind);
        let response = self
            .client
            .http
            .post(self.ep.url.expose())
            .json(body)
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
        Ok(bytes)
    }
}

fn parse_envelope<R: DeserializeOwned>(bytes: &[u8]) -> Result<R, ChainErrorKind> {
    let envelope: Envelope<R> = serde_json::from_slice(bytes)
        .map_err(|e| ChainErrorKind::Malformed(format!("{e} (in {} bytes)", bytes.len())))?;
    envelope_result(envelope)
}

fn envelope_result<R: DeserializeOwned>(envelope: Envelope<R>) -> Result<R, ChainErrorKind> {
    if let Some(e) = envelope.error {
        return Err(ChainErrorKind::Rpc {
            code: e.code,
            message: e.message,
            data: e.data,
        });
    }
    match envelope.result {
        Some(r) => Ok(r),
        // `null` is a valid answer for some methods (an unknown block): let R decide.
        None => serde_json::from_value(Value::Null)
            .map_err(|_| ChainErrorKind::Malformed("result is missing or null".into())),
    }
}

fn parse_batch<R: DeserializeOwned>(bytes: &[u8], first_id: u64, n: usize) -> Result<Vec<R>, ChainErrorKind> {
    let envelopes: Vec<Envelope<R>> = serde_json::from_slice(bytes)
        .map_err(|e| ChainErrorKind::Malformed(format!("batch answer: {e} (in {} bytes)", bytes.len())))?;
    if envelopes.len() != n {
        return Err(ChainErrorKind::Malformed(format!(
            "batch of {n} got {} answers",
            envelopes.len()
        )));
    }
    let mut slots: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for env in envelopes {
        let idx = env
            .id
            .as_u64()
            .and_then(|id| id.checked_sub(first_id))
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < n)
            .ok_or_else(|| ChainErrorKind::Malformed(format!("batch answer with unknown id {}", env.id)))?;
        slots[idx] = Some(envelope_result(env)?);
    }
    slots
        .into_iter()
        .map(|s| s.ok_or_else(|| ChainErrorKind::Malformed("batch answer missing an id".into())))
        .collect()
}

/// 100 ms, 200 ms, 400 ms… (capped at 2 s), jittered to [d/2, d].
fn retry_delay(attempt: u32) -> Duration {
    let d = Duration::from_millis(100)
        .saturating_mul(1 << attempt.saturating_sub(1).min(5))
        .min(Duration::from_secs(2));
    d / 2 + (d / 2).mul_f64(rand::thread_rng().gen::<f64>())
}

fn sorted(mut logs: Vec<RawLog>) -> Vec<RawLog> {
    logs.sort_by_key(|l| (l.block_number, l.log_index));
    logs
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
