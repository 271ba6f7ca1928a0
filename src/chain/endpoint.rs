//! One JSON-RPC endpoint and what this process has learned about it, shared
//! by every stream that uses the same URL ([`Endpoints`]): one rate limiter,
//! one cool-down, one adaptive `eth_getLogs` span, one idea of whether it
//! takes batches and block tags. A stream's [`super::ChainClient`] holds its
//! endpoints in the order it prefers them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::range::AdaptiveSpan;
use crate::redact::{redact_url, Scrubber, Secret};

/// geth refuses a filter with more than 1,000 addresses; most providers
/// take as many, few take more.
pub const MAX_ADDRESSES_PER_REQUEST: usize = 1_000;

/// One configured endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub url: Secret,
    /// Requests per second this endpoint may receive; `None`: unlimited.
    pub max_requests_per_second: Option<f64>,
}

/// An endpoint, shared by every stream of this process that names its URL.
pub struct Endpoint {
    pub(super) url: Secret,
    /// The redacted URL: the only form that is ever printed.
    pub(super) display: String,
    /// Blanks the URL's credential-like parts in what this endpoint answers.
    pub(super) scrubber: Scrubber,
    limiter: Option<RateLimiter>,
    /// std Mutex: held only for a few assignments, never across an await.
    state: Mutex<EndpointState>,
}

/// What was learned about an endpoint.
struct EndpointState {
    /// Passed over until then after a failed call.
    cooling_until: Option<Instant>,
    /// The learned `eth_getLogs` span.
    span: AdaptiveSpan,
    /// Addresses per `eth_getLogs` filter: halved when the endpoint
    /// answers HTTP 413 (request too large) for a single block.
    addresses_per_request: usize,
    /// Whether JSON-RPC batches are answered (assumed until refused).
    batches: bool,
    /// Whether the `safe`/`finalized` tags are answered (assumed until an
    /// error says otherwise, e.g. a pre-merge node).
    tags: bool,
    /// The chain id this endpoint reported, once it answered.
    chain_id: Option<u64>,
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
        tokio::time::sleep_until(slot).await;
    }
}

impl Endpoint {
    fn new(cfg: &EndpointConfig) -> Endpoint {
        Endpoint {
            display: redact_url(cfg.url.expose()),
            scrubber: Scrubber::for_url(cfg.url.expose()),
            url: cfg.url.clone(),
            limiter: cfg.max_requests_per_second.filter(|r| *r > 0.0).map(|r| RateLimiter {
                interval: Duration::from_secs_f64(1.0 / r),
                next_slot: tokio::sync::Mutex::new(Instant::now()),
            }),
            state: Mutex::new(EndpointState {
                cooling_until: None,
                span: AdaptiveSpan::default(),
                addresses_per_request: MAX_ADDRESSES_PER_REQUEST,
                batches: true,
                tags: true,
                chain_id: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EndpointState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The redacted URL.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Waits for this endpoint's next request slot (no wait without a limit).
    pub(super) async fn acquire(&self) {
        if let Some(l) = &self.limiter {
            l.acquire().await;
        }
    }

    /// Until when the endpoint is passed over, if it is now.
    pub(super) fn cooling(&self, now: Instant) -> Option<Instant> {
        self.lock().cooling_until.filter(|t| *t > now)
    }

    /// Passes the endpoint over for `cooldown` (after a failed call).
    pub(super) fn cool_down(&self, cooldown: Duration) {
        if cooldown.is_zero() {
            return;
        }
        self.lock().cooling_until = Some(Instant::now() + cooldown);
        tracing::warn!(endpoint = %self.display, cooldown = ?cooldown, "passing over RPC endpoint");
    }

    pub(super) fn log_span(&self, max: u64) -> u64 {
        self.lock().span.get(max)
    }

    pub(super) fn span_grew(&self, max: u64) {
        self.lock().span.grow(max);
    }

    pub(super) fn span_refused(&self, asked: u64, advice: super::range::TooLarge) {
        self.lock().span.shrink(asked, advice);
    }

    pub(super) fn addresses_per_request(&self) -> usize {
        self.lock().addresses_per_request
    }

    /// Halves the addresses per request; `false` when already at one.
    pub(super) fn fewer_addresses(&self) -> bool {
        let mut s = self.lock();
        if s.addresses_per_request <= 1 {
            return false;
        }
        s.addresses_per_request = (s.addresses_per_request / 2).max(1);
        tracing::warn!(endpoint = %self.display, addresses = s.addresses_per_request, "request too large (HTTP 413): fewer addresses per eth_getLogs");
        true
    }

    pub(super) fn takes_batches(&self) -> bool {
        self.lock().batches
    }

    pub(super) fn refuses_batches(&self) {
        let mut s = self.lock();
        if s.batches {
            s.batches = false;
            tracing::warn!(endpoint = %self.display, "endpoint does not answer JSON-RPC batches; sending requests one by one (the range end's header first)");
        }
    }

    pub(super) fn takes_tags(&self) -> bool {
        self.lock().tags
    }

    /// The endpoint refused a block tag: said once, then the stream runs on
    /// confirmations alone for this endpoint.
    pub(super) fn refuses_tags(&self, tag: &str, why: &str) {
        let mut s = self.lock();
        if s.tags {
            s.tags = false;
            tracing::warn!(endpoint = %self.display, tag, error = why, "endpoint does not answer the block tag (a pre-merge or unsupported node); the safe head is latest - confirmations on it");
        }
    }

    pub(super) fn chain_id(&self) -> Option<u64> {
        self.lock().chain_id
    }

    pub(super) fn set_chain_id(&self, id: u64) {
        self.lock().chain_id = Some(id);
    }
}

/// Every endpoint of this process, by URL, and the one HTTP client they share.
#[derive(Clone)]
pub struct Endpoints {
    http: reqwest::Client,
    /// std Mutex: only looked up and inserted into.
    by_url: Arc<Mutex<HashMap<String, Arc<Endpoint>>>>,
}

impl Endpoints {
    pub fn new() -> Endpoints {
        // Per-request deadlines are set on each request (streams may differ).
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Endpoints {
            http,
            by_url: Arc::default(),
        }
    }

    /// The shared endpoint for `cfg`'s URL (the first configuration's rate
    /// limit wins for a URL configured twice).
    pub fn get(&self, cfg: &EndpointConfig) -> Arc<Endpoint> {
        let mut map = self.by_url.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            map.entry(cfg.url.expose().to_string())
                .or_insert_with(|| Arc::new(Endpoint::new(cfg))),
        )
    }

    pub(super) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Distinct endpoints known.
    pub fn len(&self) -> usize {
        self.by_url.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Endpoints {
    fn default() -> Self {
        Self::new()
    }
}
