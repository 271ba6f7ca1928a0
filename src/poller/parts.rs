//! A range's logs as an ordered sequence of parts, fetched and decoded
//! ahead of the writer, so that a backfill costs about the slower of
//! fetching and writing rather than their sum, in bounded memory. This
//! module only fetches and decodes; writing goes through [`crate::write`],
//! checking through [`super::verify`].
//!
//! `Parts::spawn` cuts `[from, to]` into sub-ranges ("parts") that a task
//! of their own fetches `fetch_concurrency` at a time and decodes, handing
//! them over in block order through a channel of [`QUEUED`] parts. Memory
//! holds at most `fetch_concurrency + QUEUED + 1` parts, whatever the size
//! of the range, and requests in flight are expected to hold at most
//! [`logs_in_flight`] logs (one at a time where single blocks are denser).
//!
//! A part aims at [`LOGS_PER_PART`] logs: its span is the endpoint's
//! learned span (see `chain::range`), an equal share of the range, or what
//! the stream's log density says fits, whichever is smallest. Until the
//! stream has seen one part, the first request goes alone and spans at most
//! [`PROBE_BLOCKS`] blocks.
//!
//! Every part carries, from the backend that served its logs, the header
//! of its last block (same JSON-RPC batch) and the headers of its blocks
//! with logs (asked right after; in the same batch for a dense part of at
//! most [`EVERY_HEADER_MAX_SPAN`](crate::chain::logs::EVERY_HEADER_MAX_SPAN)
//! blocks on an endpoint that takes batches): each log's block hash must
//! equal its header's, and each row gets its block's timestamp.
//!
//! The replica's logs budget is waited for only when none of the task's
//! requests is in flight; otherwise the task takes what is free and polls
//! its requests, which may be what frees the budget.
//!
//! I1, I2 and I4 rest on these rules: parts cover the range exactly, each
//! block once, and are handed over in order; a part that fails, or ends
//! short (one block overflows the provider right after it), is the last
//! one handed over, so nothing after a gap is ever stored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{field, info_span, Instrument};

use super::{Stream, TickError};
use crate::chain::{ChainErrorKind, Rpc};
use crate::types::{Hash32, Header, LogFilter, RawLog};
use crate::write::{Batch, Row};

/// The number of logs a part aims at.
pub const LOGS_PER_PART: u64 = 2_000;
/// The span of the first request of a stream whose density is unknown.
pub const PROBE_BLOCKS: u64 = 4;
/// Parts fetched and decoded, waiting for the writer.
pub const QUEUED: usize = 2;
/// Logs expected in flight at most at the default `fetch_concurrency`
/// (4), by the density: where single blocks hold more than a part's worth,
/// fewer requests run at once, so memory stays bounded.
pub const LOGS_IN_FLIGHT: u64 = 4 * LOGS_PER_PART;

/// Logs a tick's requests are expected to hold at most: a part's worth per
/// request of `fetch_concurrency` (a stream asking for more requests at once,
/// for a distant provider, gets them), [`LOGS_IN_FLIGHT`] at least, and a
/// quarter of the replica's budget at most.
pub fn logs_in_flight(fetch_concurrency: usize) -> u64 {
    LOGS_IN_FLIGHT
        .max(LOGS_PER_PART.saturating_mul(fetch_concurrency as u64))
        .min(LOGS_IN_FLIGHT_PER_REPLICA as u64 / 4)
}
/// Logs fetched and not yet written by all the ticks of a replica together
/// (permits of `Stream::in_flight`, taken before each request by its
/// expected size and given back when its part is written or dropped): many
/// streams backfilling at once share one bound.
pub const LOGS_IN_FLIGHT_PER_REPLICA: usize = 8 * LOGS_IN_FLIGHT as usize;

/// One sub-range, fetched and decoded.
pub(crate) struct Part {
    /// The last block covered: the asked end, or the block before a single
    /// block that overflows the provider (then `short`).
    pub to: u64,
    pub short: bool,
    /// Logs the node returned.
    pub logs: usize,
    /// Decoded rows and the logs that do not decode.
    pub batch: Batch,
    /// Every block with logs and the hash its logs name, in block order.
    pub blocks: Vec<(u64, Hash32)>,
    /// The header of the last block of every request of this part, from
    /// the backend that served its logs (the last one is `to`'s).
    pub ends: Vec<Header>,
    /// This part's share of the replica's logs in flight, given back when
    /// the part is dropped (after it is written).
    in_flight: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The parts of `[from, to]`, being fetched by their own task (aborted
/// when this is dropped).
pub(crate) struct Parts {
    pub from: u64,
    pub to: u64,
    /// The endpoint ([`Rpc::index`]) every request goes to.
    pub endpoint: usize,
    /// When the fetch started (a prefetch past its time to live is dropped).
    pub started: tokio::time::Instant,
    /// A prefetch's slot among the replica's prefetches (given back on drop).
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The next block to hand over.
    next: u64,
    rx: mpsc::Receiver<Result<Part, TickError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Parts {
    /// Starts fetching `[from, to]` of `filter` from endpoint `endpoint` of
    /// `stream`, each request within the replica's logs-in-flight budget.
    /// The task's spans are children of the current span.
    pub fn spawn(stream: Arc<Stream>, endpoint: usize, from: u64, to: u64, filter: LogFilter) -> Parts {
        let budget = Some(Arc::clone(&stream.in_flight));
        Self::start(stream, endpoint, from, to, filter, budget, None)
    }

    /// [`Parts::spawn`] for a prefetch, which holds `slot` (one of the
    /// replica's few prefetch slots) instead of budget: a prefetch waits
    /// for its tick, and must not hold what running ticks need.
    pub fn prefetch(
        stream: Arc<Stream>,
        endpoint: usize,
        from: u64,
        to: u64,
        filter: LogFilter,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Parts {
        Self::start(stream, endpoint, from, to, filter, None, Some(slot))
    }

    fn start(
        stream: Arc<Stream>,
        endpoint: usize,
        from: u64,
        to: u64,
        filter: LogFilter,
        budget: Option<Arc<tokio::sync::Semaphore>>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Parts {
        let (tx, rx) = mpsc::channel(QUEUED);
        let task = tokio::spawn(produce(stream, endpoint, from, to, filter, budget, tx).in_current_span());
        Parts {
            from,
            to,
            endpoint,
            started: tokio::time::Instant::now(),
            _slot: slot,
            next: from,
            rx,
            task,
        }
    }

    /// The next part in block order; `None` once `to` was handed over, or
    /// after a part that failed or ended short.
    pub async fn next(&mut self) -> Option<Result<Part, TickError>> {
        if self.next > self.to {
            return None;
        }
        match self.rx.recv().await {
            Some(Ok(part)) => {
                // After a short part nothing follows.
                self.next = if part.short { u64::MAX } else { part.to + 1 };
                Some(Ok(part))
            }
            Some(Err(e)) => {
                self.next = u64::MAX;
                Some(Err(e))
            }
            None => {
                let at = std::mem::replace(&mut self.next, u64::MAX);
                Some(Err(TickError::FetchEnded { at, to: self.to }))
            }
        }
    }
}

impl Drop for Parts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The fetch task: keeps up to `fetch_concurrency` requests in flight and
/// hands their parts over in order; stops after a failed or short part, or
/// when the receiver is gone.
async fn produce(
    stream: Arc<Stream>,
    endpoint: usize,
    from: u64,
    to: u64,
    filter: LogFilter,
    budget: Option<Arc<tokio::sync::Semaphore>>,
    out: mpsc::Sender<Result<Part, TickError>>,
) {
    let rpc = stream.chain.at(endpoint);
    let concurrency = stream.cfg.fetch_concurrency.max(1);
    let share = (to - from + 1).div_ceil(concurrency as u64);
    let mut next = from;
    let mut inflight = FuturesOrdered::new();
    let mut expected_in_flight = 0u64;
    // A prefetch holds no budget: it keeps to the default bound.
    let max_in_flight = match budget {
        Some(_) => logs_in_flight(concurrency),
        None => LOGS_IN_FLIGHT,
    };
    loop {
        while next <= to && inflight.len() < concurrency {
            let density = stream.density.per_kiloblock();
            let span = part_span(rpc.log_span(), share, density);
            let end = to.min(next.saturating_add(span - 1));
            let expected = density.map_or(u64::MAX, |d| (end - next + 1).saturating_mul(d) / 1000);
            if !inflight.is_empty() && expected_in_flight.saturating_add(expected) > max_in_flight {
                break; // unknown density, or too dense: wait for the parts in flight
            }
            let permit = match &budget {
                // What the request may bring back, capped so that one part
                // can always go. With requests in flight, only what is free
                // now: waiting here would stop polling them, and they may be
                // what frees the budget (the parts they bring get written).
                Some(b) => {
                    let want = expected.clamp(1, LOGS_PER_PART) as u32;
                    if inflight.is_empty() {
                        match Arc::clone(b).acquire_many_owned(want).await {
                            Ok(p) => Some(p),
                            Err(_) => return, // closed: the replica is stopping
                        }
                    } else {
                        match Arc::clone(b).try_acquire_many_owned(want) {
                            Ok(p) => Some(p),
                            Err(tokio::sync::TryAcquireError::NoPermits) => break, // poll those first
                            Err(tokio::sync::TryAcquireError::Closed) => return,
                        }
                    }
                }
                None => None,
            };
            expected_in_flight = expected_in_flight.saturating_add(expected);
            let fetch = fetch_part(&stream, rpc, next, end, &filter);
            inflight.push_back(async move {
                let part = fetch.await.map(|mut p| {
                    p.in_flight = permit;
                    p
                });
                (expected, part)
            });
            next = end + 1;
        }
        let Some((expected, part)) = inflight.next().await else {
            return;
        };
        expected_in_flight -= expected;
        let last = !matches!(&part, Ok(p) if !p.short);
        if out.send(part).await.is_err() || last {
            return; // dropping `inflight` cancels the requests after a stop
        }
    }
}

/// The span of the next part: the endpoint's span, the range's share, and
/// what the density says holds [`LOGS_PER_PART`] logs, whichever is
/// smallest; [`PROBE_BLOCKS`] while the density is unknown.
fn part_span(endpoint_span: u64, share: u64, logs_per_kiloblock: Option<u64>) -> u64 {
    let fits = match logs_per_kiloblock {
        None => PROBE_BLOCKS,
        Some(0) => u64::MAX,
        Some(d) => (LOGS_PER_PART * 1000 / d).max(1),
    };
    endpoint_span.min(share).min(fits).max(1)
}

/// One part: its logs, the headers of its blocks, decoded.
async fn fetch_part(stream: &Stream, rpc: Rpc<'_>, from: u64, to: u64, filter: &LogFilter) -> Result<Part, TickError> {
    let span = info_span!(
        "rpc.eth_getLogs",
        rpc.system = "jsonrpc",
        rpc.method = "eth_getLogs",
        server.address = rpc.endpoint(),
        from,
        to,
        rpc.result_count = field::Empty,
    );
    // Dense parts (about a log a block or more) ask for every header with
    // the logs: no second round trip for the timestamps.
    let dense = stream.density.per_kiloblock().is_some_and(|d| d >= 1000);
    let fetched = rpc
        .get_logs_with(from, to, filter, dense)
        .instrument(span.clone())
        .await?;
    span.record("rpc.result_count", fetched.logs.len());
    stream
        .density
        .observe(fetched.logs.len() as u64, fetched.covered - from + 1);
    let blocks = blocks_named(&rpc, &fetched.logs)?;
    let known: Vec<Header> = fetched.ends.iter().chain(&fetched.headers).cloned().collect();
    let times = block_times(&rpc, &blocks, &known).await?;
    let count = fetched.logs.len();
    let batch = info_span!("decode", logs = count).in_scope(|| decode(stream, fetched.logs, &times));
    Ok(Part {
        to: fetched.covered,
        short: fetched.covered < to,
        logs: count,
        batch,
        blocks,
        ends: fetched.ends,
        in_flight: None,
    })
}

/// Every block the logs name, with the hash they name it by; two hashes
/// for one block is a malformed answer.
fn blocks_named(rpc: &Rpc<'_>, logs: &[RawLog]) -> Result<Vec<(u64, Hash32)>, TickError> {
    let mut blocks: Vec<(u64, Hash32)> = Vec::new();
    for log in logs {
        match blocks.last() {
            Some((n, h)) if *n == log.block_number => {
                if *h != log.block_hash {
                    let reason = format!(
                        "logs of block {n} name two hashes: {h} and {} (log {} of tx {})",
                        log.block_hash, log.log_index, log.tx_hash
                    );
                    return Err(rpc.error("eth_getLogs", ChainErrorKind::Malformed(reason)).into());
                }
            }
            _ => blocks.push((log.block_number, log.block_hash)),
        }
    }
    Ok(blocks)
}

/// The timestamp of every block in `blocks`, from headers the same endpoint
/// serves with or right after the logs (`known`: the headers that came
/// with them); a header whose hash is not the one the logs name is a
/// malformed answer (or a reorg in between: the tick retries either way).
async fn block_times(rpc: &Rpc<'_>, blocks: &[(u64, Hash32)], ends: &[Header]) -> Result<Vec<(u64, u64)>, TickError> {
    let missing: Vec<u64> = blocks
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !ends.iter().any(|h| h.number == *n))
        .collect();
    let fetched = if missing.is_empty() {
        Vec::new()
    } else {
        rpc.canonical_headers(&missing)
            .instrument(info_span!(
                "rpc.eth_getBlockByNumber",
                rpc.system = "jsonrpc",
                rpc.method = "eth_getBlockByNumber",
                server.address = rpc.endpoint(),
                blocks = missing.len()
            ))
            .await?
    };
    let mut times = Vec::with_capacity(blocks.len());
    for (n, named) in blocks {
        let header = ends.iter().chain(&fetched).find(|h| h.number == *n).ok_or_else(|| {
            rpc.error(
                "eth_getBlockByNumber",
                ChainErrorKind::Malformed(format!("no header for block {n}")),
            )
        })?;
        if header.hash != *named {
            let reason = format!("logs name block {n} as {named}, but its header says {}", header.hash);
            return Err(rpc.error("eth_getLogs", ChainErrorKind::Malformed(reason)).into());
        }
        times.push((*n, header.timestamp));
    }
    Ok(times)
}

/// Decodes `logs` into a batch; `times` holds every block's timestamp.
fn decode(stream: &Stream, logs: Vec<RawLog>, times: &[(u64, u64)]) -> Batch {
    let times: std::collections::HashMap<u64, u64> = times.iter().copied().collect();
    let mut batch = Batch {
        rows: Vec::with_capacity(logs.len()),
        undecodable: Vec::new(),
    };
    for log in logs {
        match stream.cfg.events.decode(&log) {
            Ok(decoded) => {
                let block_timestamp = times.get(&log.block_number).copied();
                batch
                    .rows
                    .push(Row::new(log, decoded.event_name, decoded.params, block_timestamp));
            }
            Err(e) => batch.undecodable.push((log, e.to_string())),
        }
    }
    batch
}

/// Logs per 1,000 blocks the stream has seen lately: rises at once, falls
/// gently, so a dense stretch shrinks the next parts before it can fill
/// memory.
#[derive(Default)]
pub struct Density(AtomicU64);

impl Density {
    /// `None` until a part was seen (stored plus one, so that zero can mean
    /// "unknown").
    fn per_kiloblock(&self) -> Option<u64> {
        self.0.load(Ordering::Relaxed).checked_sub(1)
    }

    fn observe(&self, logs: u64, blocks: u64) {
        let sample = logs.saturating_mul(1000) / blocks.max(1);
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            let next = match old.checked_sub(1) {
                None => sample,
                Some(old) => sample.max((old.saturating_mul(3) + sample) / 4),
            };
            Some(next.saturating_add(1))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_requests_at_once_may_hold_more_logs_but_never_fewer_than_the_default() {
        assert_eq!(logs_in_flight(1), LOGS_IN_FLIGHT);
        assert_eq!(logs_in_flight(4), LOGS_IN_FLIGHT, "the default concurrency");
        assert_eq!(logs_in_flight(8), 8 * LOGS_PER_PART);
        assert_eq!(
            logs_in_flight(64),
            LOGS_IN_FLIGHT_PER_REPLICA as u64 / 4,
            "a quarter of the replica's budget at most"
        );
    }

    #[test]
    fn a_part_spans_the_smallest_of_endpoint_share_and_density() {
        assert_eq!(part_span(2000, 500, None), PROBE_BLOCKS, "unknown density: a probe");
        assert_eq!(part_span(2000, 2, None), 2, "a short range: its share");
        assert_eq!(part_span(2000, 500, Some(0)), 500, "no logs seen: the share");
        assert_eq!(part_span(40, 500, Some(0)), 40, "the endpoint's span caps");
        assert_eq!(part_span(2000, 500, Some(420_000)), 4, "420 logs a block: 4 blocks");
        assert_eq!(part_span(2000, 500, Some(u64::MAX / 2)), 1, "never below one block");
    }

    #[test]
    fn density_rises_at_once_and_falls_gently() {
        let d = Density::default();
        assert_eq!(d.per_kiloblock(), None);
        d.observe(0, 100);
        assert_eq!(d.per_kiloblock(), Some(0), "zero logs is known, not unknown");
        d.observe(4_000, 10);
        assert_eq!(d.per_kiloblock(), Some(400_000));
        d.observe(0, 10);
        assert_eq!(d.per_kiloblock(), Some(300_000));
    }
}
