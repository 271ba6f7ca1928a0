//! `eth_getLogs` as a tick needs it: a range covered exactly, in spans that
//! adapt to what the endpoint serves ([`super::range`]), each request sent
//! in one JSON-RPC batch with the header of its last block, so that one
//! backend answers both: a backend behind the one that answered
//! `eth_blockNumber` says so (it lacks the header: `Lagging`) instead of
//! silently returning the logs up to its own head. Endpoints that refuse
//! batches get the header first, then the logs.
//!
//! Filters with more addresses than an endpoint takes (geth: 1,000) are
//! split into several requests of the same batch; an HTTP 413 for a single
//! block means the request body is too large, and halves the addresses per
//! request rather than the range.

use ethers::types::{Log, U256};
use serde_json::{json, Value};

use super::client::Rpc;
use super::error::{ChainError, ChainErrorKind};
use super::range::too_large;
use crate::backoff::RPC;
use crate::types::{Address, Hash32, Header, LogFilter, RawLog};

const METHOD: &str = "eth_getLogs";

/// The logs of `[from, covered]` and what the answering backend said of
/// the blocks that end its requests.
#[derive(Debug, Clone)]
pub struct Logs {
    /// In (block, log index) order.
    pub logs: Vec<RawLog>,
    /// `to`, unless a single block overflows what the provider serves right
    /// after `covered`.
    pub covered: u64,
    /// The header of the last block of every request, as the backend that
    /// served the request's logs had it; the last one is `covered`'s.
    pub ends: Vec<Header>,
    /// With [`Rpc::get_logs_with`] `every_header`: the headers of the other
    /// blocks of each request, from the same answer.
    pub headers: Vec<Header>,
}

/// Requests spanning at most this many blocks may carry every block's
/// header in their batch ([`Rpc::get_logs_with`]).
pub const EVERY_HEADER_MAX_SPAN: u64 = 8;

impl Rpc<'_> {
    /// Every log in `[from, covered]` matching `filter` (see [`Logs`]).
    /// Fetched in spans that adapt to the endpoint; the spans cover
    /// `[from, covered]` exactly, each block once. When the first block
    /// alone overflows, `BlockTooLarge` names it. A response that
    /// contradicts its request is rejected whole as `Malformed`.
    pub async fn get_logs(&self, from: u64, to: u64, filter: &LogFilter) -> Result<Logs, ChainError> {
        self.get_logs_with(from, to, filter, false).await
    }

    /// [`Rpc::get_logs`]; with `every_header`, each request of at most
    /// [`EVERY_HEADER_MAX_SPAN`] blocks also asks, in the same batch, for
    /// the header of every block it spans ([`Logs::headers`]): a dense
    /// range's parts then need no second round trip for their timestamps.
    pub async fn get_logs_with(
        &self,
        from: u64,
        to: u64,
        filter: &LogFilter,
        every_header: bool,
    ) -> Result<Logs, ChainError> {
        let max = self.client.opts.max_block_range;
        let mut logs = Vec::new();
        let mut ends = Vec::new();
        let mut headers = Vec::new();
        let mut at = from;
        while at <= to {
            let end = to.min(at.saturating_add(self.log_span() - 1));
            // Only in a batch: one by one, they would each be a round trip.
            let others = every_header && end - at < EVERY_HEADER_MAX_SPAN && self.ep.takes_batches();
            match self.logs_request(at, end, filter, others).await {
                Ok((found, header, more)) => {
                    logs.extend(found);
                    ends.push(header);
                    headers.extend(more);
                    self.ep.span_grew(max);
                    at = end + 1;
                }
                Err(e) => {
                    if at == end
                        && matches!(e.kind, ChainErrorKind::Http { status: 413, .. })
                        && filter.addresses.len() > 1
                        && self.ep.fewer_addresses()
                    {
                        continue; // the request body, not the block, was too large
                    }
                    match too_large(&e.kind, at, end) {
                        Some(_) if at == end && at > from => {
                            tracing::warn!(endpoint = %self.endpoint(), block = at, "a single block overflows eth_getLogs; keeping the blocks before it");
                            return Ok(Logs {
                                logs: sorted(logs),
                                covered: at - 1,
                                ends,
                                headers,
                            });
                        }
                        Some(_) if at == end => {
                            return Err(self.error(
                                METHOD,
                                ChainErrorKind::BlockTooLarge {
                                    block: at,
                                    provider_message: e.kind.to_string(),
                                },
                            ));
                        }
                        Some(advice) => {
                            self.ep.span_refused(end - at + 1, advice);
                            tracing::debug!(endpoint = %self.endpoint(), from = at, to = end, next_span = self.log_span(), "eth_getLogs range too large; shrinking");
                        }
                        None => return Err(e),
                    }
                }
            }
        }
        Ok(Logs {
            logs: sorted(logs),
            covered: to,
            ends,
            headers,
        })
    }

    /// One request: the logs of `[from, to]` (one call per chunk of
    /// addresses) and the header of `to` (with `others`, of every block of
    /// the span), in one batch; retried on transient errors but not on size
    /// errors, which the caller answers by shrinking.
    async fn logs_request(
        &self,
        from: u64,
        to: u64,
        filter: &LogFilter,
        others: bool,
    ) -> Result<(Vec<RawLog>, Header, Vec<Header>), ChainError> {
        let chunk = self.ep.addresses_per_request().max(1);
        let chunks: Vec<&[Address]> = filter.addresses.chunks(chunk).collect();
        let topics: Vec<String> = filter.topic0s.iter().map(Hash32::to_string).collect();
        let mut attempt = 1;
        loop {
            // The headers go first: without batches they are asked before the logs.
            let mut calls = vec![("eth_getBlockByNumber", json!([format!("{to:#x}"), false]))];
            let other_blocks: Vec<u64> = if others { (from..to).collect() } else { Vec::new() };
            for n in &other_blocks {
                calls.push(("eth_getBlockByNumber", json!([format!("{n:#x}"), false])));
            }
            for addresses in &chunks {
                calls.push((
                    METHOD,
                    json!([{
                        "fromBlock": format!("{from:#x}"),
                        "toBlock": format!("{to:#x}"),
                        "address": addresses.iter().map(Address::to_string).collect::<Vec<_>>(),
                        "topics": [topics],
                    }]),
                ));
            }
            let result = self
                .batch(calls)
                .await
                .and_then(|answers| self.read(answers, &other_blocks, &chunks, from, to, &filter.topic0s));
            match result {
                Err(e)
                    if attempt < self.client.opts.attempts
                        && e.is_retryable()
                        && too_large(&e.kind, from, to).is_none() =>
                {
                    tokio::time::sleep(RPC.delay(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// The headers and the logs of one request's answers.
    fn read(
        &self,
        mut answers: Vec<Result<Value, ChainErrorKind>>,
        other_blocks: &[u64],
        chunks: &[&[Address]],
        from: u64,
        to: u64,
        topic0s: &[Hash32],
    ) -> Result<(Vec<RawLog>, Header, Vec<Header>), ChainError> {
        // `batch` answers every call, in order.
        let header_answer = answers.remove(0);
        let other_answers: Vec<_> = answers.drain(..other_blocks.len()).collect();
        let mut out = Vec::new();
        for (answer, addresses) in answers.into_iter().zip(chunks) {
            let value = answer.map_err(|k| self.error(METHOD, k))?;
            let logs: Vec<Log> = serde_json::from_value(value)
                .map_err(|e| self.error(METHOD, ChainErrorKind::Malformed(format!("logs: {e}"))))?;
            for log in logs {
                let raw = to_raw(log).map_err(|r| self.error(METHOD, ChainErrorKind::Malformed(r)))?;
                if let Some(reason) = contradiction(&raw, from, to, addresses, topic0s) {
                    return Err(self.error(METHOD, ChainErrorKind::Malformed(reason)));
                }
                out.push(raw);
            }
        }
        let header = header_answer.map_err(|k| self.error("eth_getBlockByNumber", k))?;
        let header = self.parse_header(header, to)?.ok_or_else(|| {
            self.error(
                METHOD,
                ChainErrorKind::Lagging {
                    head: to.saturating_sub(1),
                    needed: to,
                },
            )
        })?;
        // A backend that lacks a block a log names is not the one whose
        // header we hold: the logs and the header disagree.
        if let Some(l) = out.iter().find(|l| l.block_number == to && l.block_hash != header.hash) {
            return Err(self.error(
                METHOD,
                ChainErrorKind::Malformed(format!(
                    "log {} of tx {} names block {to} as {}, its header in the same answer says {}",
                    l.log_index, l.tx_hash, l.block_hash, header.hash
                )),
            ));
        }
        // After the logs: a range the provider refuses is answered by
        // shrinking it, whatever its headers said.
        let mut others = Vec::with_capacity(other_blocks.len());
        for (n, answer) in other_blocks.iter().zip(other_answers) {
            let value = answer.map_err(|k| self.error("eth_getBlockByNumber", k))?;
            let header = self.parse_header(value, *n)?.ok_or_else(|| {
                self.error(
                    "eth_getBlockByNumber",
                    ChainErrorKind::Lagging {
                        head: n.saturating_sub(1),
                        needed: *n,
                    },
                )
            })?;
            others.push(header);
        }
        Ok((out, header, others))
    }
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
fn contradiction(log: &RawLog, from: u64, to: u64, addresses: &[Address], topic0s: &[Hash32]) -> Option<String> {
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
    if !addresses.contains(&log.address) {
        return Some(format!("{} comes from {}, which was not asked for", at(), log.address));
    }
    match log.topics.first() {
        Some(t) if topic0s.contains(t) => None,
        _ => Some(format!("{} has a topic0 that was not asked for", at())),
    }
}
