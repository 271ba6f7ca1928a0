//! A range's logs as an ordered sequence of parts, fetched ahead of the
//! writer, so that a backfill costs about the slower of fetching and
//! writing rather than their sum, in bounded memory.
//!
//! `Parts::spawn` cuts `[from, to]` into sub-ranges ("parts") that a task
//! of their own fetches `fetch_concurrency` at a time and decodes, handing
//! them over in block order through a channel of [`QUEUED`] parts. While the
//! tick's transaction writes part k, parts k+1… are being fetched. Memory
//! holds at most `fetch_concurrency + QUEUED + 1` parts, whatever the size
//! of the range, and requests in flight are expected to hold at most
//! [`LOGS_IN_FLIGHT`] logs (one at a time where single blocks are denser).
//!
//! A part aims at [`LOGS_PER_PART`] logs: its span is the endpoint's
//! learned span (see `chain::range`), an equal share of the range, or what
//! the stream's log density says fits, whichever is smallest. Until the
//! stream has seen one part, the first request goes alone and spans at most
//! [`PROBE_BLOCKS`] blocks.
//!
//! I1 (every canonical log at or below the cursor stored exactly once), I2
//! (no row from an orphaned block) and I4 (no gaps) rest on these rules:
//! - parts cover the range exactly, each block once, and are handed over in
//!   order; a part that fails, or ends short (one block overflows the
//!   provider right after it), is the last one handed over: nothing after a
//!   gap is ever stored, so the cursor can move to the last part's end
//!   (`perf::a_later_part_that_fails_commits_the_parts_before_it…`,
//!   `perf::concurrent_sub_ranges_cover_every_tick_exactly_once`);
//! - `Stored` moves the tick's cursor only to what was stored;
//! - `verify` checks every block the logs name, and the end block, in one
//!   batch of headers fetched after the last part: logs fetched before a
//!   reorg never pass with headers fetched after it (`chain::malformed…`
//!   with a wrong block hash, `chain::a_reorg_shallower_than…`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{field, info_span, Instrument};

use super::tick::canonical_headers;
use super::{decode_log, Stream, TickError};
use crate::chain::abi::DecodeError;
use crate::chain::{ChainErrorKind, Hash32, RawLog, Rpc};
use crate::config::BadEventPolicy;
use crate::store::events::{self, NewEvent};
use crate::store::{dead_letters, GenericClient};

/// The number of logs a part aims at.
pub const LOGS_PER_PART: u64 = 2_000;
/// The span of the first request of a stream whose density is unknown.
pub const PROBE_BLOCKS: u64 = 4;
/// Parts fetched and decoded, waiting for the writer.
pub const QUEUED: usize = 2;
/// Logs expected in flight at most, by the density: where single blocks
/// hold more than a part's worth, fewer requests run at once, so memory
/// stays bounded whatever `fetch_concurrency` says.
pub const LOGS_IN_FLIGHT: u64 = 4 * LOGS_PER_PART;

/// One sub-range, fetched and decoded, not yet checked against headers.
pub(crate) struct Part {
    /// The last block covered: the asked end, or the block before a single
    /// block that overflows the provider (then `short`).
    pub to: u64,
    pub short: bool,
    /// Logs the node returned.
    pub logs: usize,
    pub rows: Vec<NewEvent>,
    /// Logs that do not decode, with why.
    pub bad: Vec<(RawLog, DecodeError)>,
    /// Every block with logs and the hash its logs name, in block order.
    pub blocks: Vec<(u64, Hash32)>,
}

/// The parts of `[from, to]`, being fetched by their own task (aborted
/// when this is dropped).
pub(crate) struct Parts {
    pub from: u64,
    pub to: u64,
    /// The endpoint ([`Rpc::index`]) every request goes to.
    pub endpoint: usize,
    /// The next block to hand over.
    next: u64,
    rx: mpsc::Receiver<Result<Part, TickError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Parts {
    /// Starts fetching `[from, to]` from endpoint `endpoint` of `stream`.
    /// The task's spans are children of the current span.
    pub fn spawn(stream: Arc<Stream>, endpoint: usize, from: u64, to: u64) -> Parts {
        let (tx, rx) = mpsc::channel(QUEUED);
        let task = tokio::spawn(produce(stream, endpoint, from, to, tx).in_current_span());
        Parts {
            from,
            to,
            endpoint,
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
async fn produce(stream: Arc<Stream>, endpoint: usize, from: u64, to: u64, out: mpsc::Sender<Result<Part, TickError>>) {
    let rpc = stream.chain.at(endpoint);
    let concurrency = stream.cfg.fetch_concurrency.max(1);
    let share = (to - from + 1).div_ceil(concurrency as u64);
    let mut next = from;
    let mut inflight = FuturesOrdered::new();
    let mut expected_in_flight = 0u64;
    loop {
        while next <= to && inflight.len() < concurrency {
            let density = stream.density.per_kiloblock();
            let span = part_span(rpc.log_span(), share, density);
            let end = to.min(next.saturating_add(span - 1));
            let expected = density.map_or(u64::MAX, |d| (end - next + 1).saturating_mul(d) / 1000);
            if !inflight.is_empty() && expected_in_flight.saturating_add(expected) > LOGS_IN_FLIGHT {
                break; // unknown density, or too dense: wait for the parts in flight
            }
            expected_in_flight = expected_in_flight.saturating_add(expected);
            let fetch = fetch_part(&stream, &rpc, next, end);
            inflight.push_back(async move { (expected, fetch.await) });
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

/// One part: its logs, the block hashes they name, decoded.
async fn fetch_part(stream: &Stream, rpc: &Rpc<'_>, from: u64, to: u64) -> Result<Part, TickError> {
    let span = info_span!(
        "rpc.eth_getLogs",
        rpc.system = "jsonrpc",
        rpc.method = "eth_getLogs",
        server.address = rpc.endpoint(),
        from,
        to,
        rpc.result_count = field::Empty,
    );
    let (logs, covered) = rpc.get_logs(from, to, &stream.filter).instrument(span.clone()).await?;
    span.record("rpc.result_count", logs.len());
    stream.density.observe(logs.len() as u64, covered - from + 1);
    let mut blocks: Vec<(u64, Hash32)> = Vec::new();
    for log in &logs {
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
    let count = logs.len();
    let (rows, bad) = info_span!("decode", logs = count).in_scope(|| {
        let mut rows = Vec::with_capacity(logs.len());
        let mut bad = Vec::new();
        for log in logs {
            match decode_log(&stream.events, &log) {
                Ok(e) => rows.push(e),
                Err(e) => bad.push((log, e)),
            }
        }
        (rows, bad)
    });
    Ok(Part {
        to: covered,
        short: covered < to,
        logs: count,
        rows,
        bad,
        blocks,
    })
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

/// What the parts of one range stored so far, in one transaction.
#[derive(Default)]
pub(crate) struct Stored {
    /// The last block stored; `None` before the first part.
    pub to: Option<u64>,
    /// The last part ended short: a single block overflows after `to`.
    pub short: bool,
    pub logs: usize,
    pub dead_lettered: usize,
    pub inserted: u64,
    pub duplicates: u64,
    /// Every block with logs and the hash its logs name.
    pub blocks: Vec<(u64, Hash32)>,
}

impl Stored {
    /// Stores one part: its events (idempotently), and its logs that do not
    /// decode per `on_bad_event`: parked in `dead_letters`, or (halt) a
    /// `Decode` error before anything of the part is written.
    pub async fn store<C: GenericClient>(&mut self, c: &C, stream: &Stream, part: Part) -> Result<(), TickError> {
        let cfg = &stream.cfg;
        if let Some((log, why)) = part.bad.first() {
            if cfg.on_bad_event == BadEventPolicy::Halt {
                return Err(TickError::Decode {
                    stream: cfg.name.clone(),
                    block: log.block_number,
                    tx_hash: log.tx_hash,
                    log_index: log.log_index,
                    source: why.clone(),
                });
            }
            let parked: Vec<(&RawLog, String)> = part.bad.iter().map(|(l, e)| (l, e.to_string())).collect();
            dead_letters::park(c, &cfg.name, cfg.chain_id, &parked).await?;
            tracing::warn!(stream = %cfg.name, count = parked.len(), first_tx = %log.tx_hash, first_log_index = log.log_index, error = %why, "logs that do not decode were parked in dead_letters");
        }
        let outcome = events::insert(c, &cfg.name, cfg.chain_id, &part.rows)
            .instrument(info_span!(
                "db.insert_events",
                db.system = "postgresql",
                db.operation = "INSERT",
                rows = part.rows.len()
            ))
            .await?;
        self.to = Some(part.to);
        self.short = part.short;
        self.logs += part.logs;
        self.dead_lettered += part.bad.len();
        self.inserted += outcome.inserted;
        self.duplicates += outcome.duplicates;
        self.blocks.extend(part.blocks);
        Ok(())
    }
}

/// A stored range, checked against one batch of headers.
pub(crate) struct Verified {
    /// Every block with logs, and `to`, with their canonical hashes.
    pub hashes: Vec<(u64, Hash32)>,
    pub last_hash: Hash32,
    /// Timestamp of block `to`.
    pub last_time: u64,
}

/// Checks that every block the logs named has that hash on `rpc` now, and
/// reads the header of `to`.
pub(crate) async fn verify(rpc: &Rpc<'_>, blocks: &[(u64, Hash32)], to: u64) -> Result<Verified, TickError> {
    let mut numbers: Vec<u64> = blocks.iter().map(|(n, _)| *n).collect();
    if numbers.last() != Some(&to) {
        numbers.push(to);
    }
    let headers = canonical_headers(rpc, &numbers).await?;
    for ((n, named), header) in blocks.iter().zip(&headers) {
        if *named != header.hash {
            let reason = format!("logs name block {n} as {named}, but its header says {}", header.hash);
            return Err(rpc.error("eth_getLogs", ChainErrorKind::Malformed(reason)).into());
        }
    }
    let last = headers.last().copied();
    Ok(Verified {
        hashes: numbers.into_iter().zip(headers.iter().map(|h| h.hash)).collect(),
        last_hash: last.map_or(Hash32([0; 32]), |h| h.hash),
        last_time: last.map_or(0, |h| h.timestamp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
