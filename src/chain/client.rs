//! A stream's view of the chain: its endpoints in preferred order
//! ([`ChainClient`]), and one of them pinned for a tick ([`Rpc`]) so that
//! the answers a tick combines (head, headers, logs) come from one node and
//! can be checked against each other.
//!
//! Requests go through [`super::transport`] (deadline, retries, batches);
//! `eth_getLogs` through [`super::logs`]. URLs are printed only in redacted
//! form, so an API key in the path or query never reaches an error, a log
//! line or a span.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ethers::types::{H256, U256, U64};
use serde::Deserialize;
use serde_json::json;

use super::endpoint::{Endpoint, EndpointConfig, Endpoints};
use super::error::{ChainError, ChainErrorKind};
use crate::types::{Hash32, Header};

/// Most requests in one JSON-RPC batch (providers cap batches at 100-1000).
pub(super) const MAX_BATCH: usize = 100;

/// How the client treats every endpoint of one stream.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Deadline of one HTTP request.
    pub timeout: Duration,
    /// Tries per call (1 = no retry) on retryable errors, on one endpoint.
    pub attempts: u32,
    /// How long an endpoint that failed a call is passed over.
    pub cooldown: Duration,
    /// The largest `eth_getLogs` span this stream asks for.
    pub max_block_range: u64,
}

/// Told about every request attempt (for metrics).
pub trait RpcObserver: Send + Sync {
    /// `endpoint` is the redacted URL.
    fn observe(&self, endpoint: &str, method: &'static str, result: Result<(), &ChainErrorKind>, latency: Duration);
}

/// A stream's endpoints.
pub struct ChainClient {
    pub(super) shared: Endpoints,
    endpoints: Vec<Arc<Endpoint>>,
    pub(super) opts: ClientOptions,
    pub(super) observer: Option<Arc<dyn RpcObserver>>,
    /// The chain every endpoint must serve.
    chain_id: u64,
}

/// A block header as JSON-RPC returns it (only the fields used).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct HeaderJson {
    number: Option<U64>,
    hash: Option<H256>,
    parent_hash: H256,
    timestamp: U256,
}

impl ChainClient {
    /// The client for `endpoints` (taken from, or added to, the process's
    /// shared `registry`), serving `chain_id`.
    pub fn new(registry: &Endpoints, endpoints: &[EndpointConfig], chain_id: u64, opts: ClientOptions) -> ChainClient {
        ChainClient {
            shared: registry.clone(),
            endpoints: endpoints.iter().map(|e| registry.get(e)).collect(),
            opts,
            observer: None,
            chain_id,
        }
    }

    /// Reports every request attempt to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn RpcObserver>) -> ChainClient {
        self.observer = Some(observer);
        self
    }

    /// Redacted URLs of the endpoints, in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.display.clone()).collect()
    }

    /// The number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The endpoint to use now: the first, in configured order, that is not
    /// cooling down (so a recovered primary is preferred again); if all are,
    /// the one that recovers first.
    pub fn pick(&self) -> Rpc<'_> {
        let now = Instant::now();
        let index = self
            .endpoints
            .iter()
            .position(|e| e.cooling(now).is_none())
            .or_else(|| {
                self.endpoints
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.cooling(now))
                    .map(|(i, _)| i)
            })
            .unwrap_or(0);
        self.at(index)
    }

    /// The endpoint [`Rpc::index`] named: to hand a tick's endpoint to
    /// another task, which cannot borrow the `Rpc`.
    pub fn at(&self, index: usize) -> Rpc<'_> {
        let index = index.min(self.endpoints.len().saturating_sub(1));
        Rpc {
            client: self,
            ep: &self.endpoints[index],
            index,
        }
    }

    /// Checks the chain id of every endpoint that answers. A wrong chain id
    /// anywhere is an error; endpoints that do not answer are checked on
    /// their first use instead ([`Rpc::ensure_chain`]). Fails only when no
    /// endpoint answers at all (then with the first endpoint's error).
    pub async fn verify_chain_id(&self) -> Result<(), ChainError> {
        let mut first_err = None;
        let mut any = false;
        for i in 0..self.endpoints.len() {
            match self.at(i).ensure_chain().await {
                Ok(()) => any = true,
                Err(e) if matches!(e.kind, ChainErrorKind::WrongChain { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(endpoint = %self.endpoints[i].display, error = %e, "RPC endpoint not reachable at start; it is checked on first use");
                    first_err.get_or_insert(e);
                }
            }
        }
        match (any, first_err) {
            (false, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

/// One endpoint of a stream, pinned for the length of a tick.
#[derive(Clone, Copy)]
pub struct Rpc<'a> {
    pub(super) client: &'a ChainClient,
    pub(super) ep: &'a Arc<Endpoint>,
    index: usize,
}

impl Rpc<'_> {
    /// Redacted URL of this endpoint.
    pub fn endpoint(&self) -> &str {
        &self.ep.display
    }

    /// Position of this endpoint in the stream's list (see [`ChainClient::at`]).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The learned `eth_getLogs` span of this endpoint, at most the stream's maximum.
    pub fn log_span(&self) -> u64 {
        self.ep.log_span(self.client.opts.max_block_range)
    }

    /// Passes this endpoint over for the stream's `rpc_cooldown`, e.g. after
    /// it failed a tick, answered inconsistently, or made a tick exceed its budget.
    pub fn cool_down(&self) {
        self.ep.cool_down(self.client.opts.cooldown);
    }

    /// An error of this endpoint: an answer that contradicts another of its
    /// answers, or one the caller judged from context (lagging).
    /// Provider text in `kind` is scrubbed of the URL's secrets here, the
    /// one place every error of an endpoint is made.
    pub fn error(&self, method: &'static str, kind: ChainErrorKind) -> ChainError {
        ChainError {
            method,
            endpoint: self.ep.display.clone(),
            kind: kind.scrubbed(&self.ep.scrubber),
        }
    }

    /// Asks for the chain id once per endpoint; a wrong one is an error every time.
    pub async fn ensure_chain(&self) -> Result<(), ChainError> {
        let expected = self.client.chain_id;
        let actual = match self.ep.chain_id() {
            Some(id) => id,
            None => {
                let id: U64 = self.call("eth_chainId", json!([])).await?;
                self.ep.set_chain_id(id.as_u64());
                id.as_u64()
            }
        };
        if actual != expected {
            return Err(self.error("eth_chainId", ChainErrorKind::WrongChain { expected, actual }));
        }
        Ok(())
    }

    /// The latest block number.
    pub async fn block_number(&self) -> Result<u64, ChainError> {
        self.ensure_chain().await?;
        let n: U64 = self.call("eth_blockNumber", json!([])).await?;
        Ok(n.as_u64())
    }

    /// The latest block's header (its number and hash in one request).
    pub async fn latest(&self) -> Result<Header, ChainError> {
        self.ensure_chain().await?;
        let h: Option<HeaderJson> = self.call("eth_getBlockByNumber", json!(["latest", false])).await?;
        match h {
            Some(h) => self.header_from(h, None),
            None => Err(self.error(
                "eth_getBlockByNumber",
                ChainErrorKind::Malformed("no latest block".into()),
            )),
        }
    }

    /// The number of a tagged block (`"safe"`, `"finalized"`): `Some(0)` if
    /// the node has none yet; `None` if the node does not answer the tag at
    /// all (a pre-merge or unsupported node: reported once, after which the
    /// caller relies on confirmations alone).
    pub async fn tagged_block(&self, tag: &'static str) -> Result<Option<u64>, ChainError> {
        if !self.ep.takes_tags() {
            return Ok(None);
        }
        match self
            .call::<Option<HeaderJson>>("eth_getBlockByNumber", json!([tag, false]))
            .await
        {
            Ok(h) => Ok(Some(match h {
                Some(h) => self.header_from(h, None)?.number,
                None => 0,
            })),
            Err(e) if e.refuses_the_range() => {
                self.ep.refuses_tags(tag, &e.kind.to_string());
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The headers at `numbers`, in one or a few batched requests; `None`
    /// where the node does not have the block.
    pub async fn headers(&self, numbers: &[u64]) -> Result<Vec<Option<Header>>, ChainError> {
        const METHOD: &str = "eth_getBlockByNumber";
        let mut out = Vec::with_capacity(numbers.len());
        for chunk in numbers.chunks(MAX_BATCH) {
            let calls = chunk
                .iter()
                .map(|n| (METHOD, json!([format!("{n:#x}"), false])))
                .collect();
            for (n, answer) in chunk.iter().zip(self.batch(calls).await?) {
                let answer = answer.map_err(|k| self.error(METHOD, k))?;
                out.push(self.parse_header(answer, *n)?);
            }
        }
        Ok(out)
    }

    /// The canonical headers of `blocks` (one batched request); a block the
    /// node does not have means it is lagging.
    pub async fn canonical_headers(&self, blocks: &[u64]) -> Result<Vec<Header>, ChainError> {
        let headers = self.headers(blocks).await?;
        blocks
            .iter()
            .zip(headers)
            .map(|(n, h)| {
                h.ok_or_else(|| {
                    let head = blocks.iter().copied().min().unwrap_or(0).saturating_sub(1);
                    self.error("eth_getBlockByNumber", ChainErrorKind::Lagging { head, needed: *n })
                })
            })
            .collect()
    }

    /// A header answer for block `asked` (`null`: the node lacks it).
    pub(super) fn parse_header(&self, answer: serde_json::Value, asked: u64) -> Result<Option<Header>, ChainError> {
        let h: Option<HeaderJson> = serde_json::from_value(answer).map_err(|e| {
            self.error(
                "eth_getBlockByNumber",
                ChainErrorKind::Malformed(format!("block {asked}: {e}")),
            )
        })?;
        h.map(|h| self.header_from(h, Some(asked))).transpose()
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
}
