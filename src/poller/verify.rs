//! The checks that make a range safe to commit: it continues the stored
//! chain, and nothing it was read from changed while it was read.
//!
//! I2 (no stored row comes from an orphaned block) and I4 (no gaps) against
//! reorganisations *during* a tick — including blocks without logs replaced
//! by blocks with logs, which no per-log check can see:
//!
//! - before fetching, one batch of headers pins the range: the parent of
//!   its first block must be the stored cursor hash ([`Pin::check`]; else
//!   the cursor's block was reorganised away: the deep-reorg policy), and
//!   the header of its last block is kept;
//! - every request's logs come with the header of its last block from the
//!   same backend (`chain::logs`), and every block with logs with its header;
//! - after the last part, one batch of headers ([`verify`]) must agree with
//!   all of it: the first block's parent is still the cursor hash, every
//!   block with logs and every request's last block still has the hash seen
//!   with the logs, and the range's last block is still the pinned one. A
//!   block hash commits to all its ancestors, so the range is one unbroken
//!   chain from the cursor. Any mismatch is a reorg: the tick rolls back.
//!
//! When the savepoint budget stops a tick inside a block, the rows of that
//! block handled so far commit too (the cursor stays before it): the check
//! then covers that block's hash as well (`written_to`), also when nothing
//! before it completes (a partial tick).

use tracing::{info_span, Instrument};

use super::TickError;
use crate::chain::Rpc;
use crate::types::{Hash32, Header};

/// What the first batch of headers said about a planned range.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pin {
    pub from: Header,
    pub to: Header,
}

/// The first batch: the headers of `from` and `to`.
pub(crate) async fn pin(rpc: &Rpc<'_>, from: u64, to: u64) -> Result<Pin, TickError> {
    let numbers: Vec<u64> = if from == to { vec![from] } else { vec![from, to] };
    let headers = headers(rpc, &numbers).await?;
    Ok(Pin {
        from: headers[0],
        to: *headers.last().unwrap_or(&headers[0]),
    })
}

impl Pin {
    /// Whether the range continues the chain the cursor is on: `Err` with
    /// the canonical hash of the cursor's block when it does not.
    pub fn check(&self, cursor_hash: Option<Hash32>) -> Result<(), Hash32> {
        if self.from.number == 0 {
            return Ok(()); // nothing before block 0 to continue
        }
        match cursor_hash {
            Some(h) if h != self.from.parent_hash => Err(self.from.parent_hash),
            _ => Ok(()),
        }
    }
}

/// What a stored range is checked against.
pub(crate) struct Expect<'a> {
    /// The range's first block and the cursor hash its parent must have.
    pub from: u64,
    pub cursor_hash: Option<Hash32>,
    /// The last block stored whole (the range's end, or where it
    /// stopped); `None`: none (a partial tick).
    pub to: Option<u64>,
    /// The last block with rows written (`to`, or the block the savepoint
    /// budget stopped inside).
    pub written_to: u64,
    /// The pinned header of the planned end (checked when `to` is it).
    pub pinned: Header,
    /// Every block with logs and the hash the logs name.
    pub named: &'a [(u64, Hash32)],
    /// The last block of every request, as its backend had it.
    pub ends: &'a [Header],
}

/// The canonical view of a stored range, once checked.
pub(crate) struct Verified {
    /// Hashes to remember for later reorg checks: every block with logs and `to`.
    pub hashes: Vec<(u64, Hash32)>,
    pub last_hash: Hash32,
    /// Timestamp of block `to`.
    pub last_time: u64,
}

/// The final batch of headers (see the module doc).
pub(crate) async fn verify(rpc: &Rpc<'_>, e: &Expect<'_>) -> Result<Verified, TickError> {
    let written = |n: &u64| *n <= e.written_to;
    let mut numbers: Vec<u64> = e
        .named
        .iter()
        .map(|(n, _)| *n)
        .chain(e.ends.iter().map(|h| h.number))
        .filter(written)
        .chain([e.from])
        .chain(e.to)
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    let now = headers(rpc, &numbers).await?;
    let at = |n: u64| now.iter().find(|h| h.number == n);
    let reorg = |block: u64, was: Hash32, now: Hash32| TickError::Reorged { block, was, now };
    if let (Some(cursor), Some(first)) = (e.cursor_hash.filter(|_| e.from > 0), at(e.from)) {
        if first.parent_hash != cursor {
            return Err(reorg(e.from.saturating_sub(1), cursor, first.parent_hash));
        }
    }
    let seen = e
        .named
        .iter()
        .copied()
        .chain(e.ends.iter().map(|h| (h.number, h.hash)))
        .chain((e.to == Some(e.pinned.number)).then_some((e.pinned.number, e.pinned.hash)));
    for (n, was) in seen.filter(|(n, _)| written(n)) {
        if let Some(h) = at(n).filter(|h| h.hash != was) {
            return Err(reorg(n, was, h.hash));
        }
    }
    let Some(to) = e.to else {
        return Ok(Verified {
            hashes: Vec::new(),
            last_hash: e.pinned.hash,
            last_time: 0,
        });
    };
    let last = at(to).copied().unwrap_or(e.pinned);
    let mut hashes: Vec<(u64, Hash32)> = e.named.iter().filter(|(n, _)| *n <= to).copied().collect();
    if hashes.last().map(|(n, _)| *n) != Some(to) {
        hashes.push((to, last.hash));
    }
    Ok(Verified {
        hashes,
        last_hash: last.hash,
        last_time: last.timestamp,
    })
}

async fn headers(rpc: &Rpc<'_>, numbers: &[u64]) -> Result<Vec<Header>, TickError> {
    Ok(rpc
        .canonical_headers(numbers)
        .instrument(info_span!(
            "rpc.eth_getBlockByNumber",
            rpc.system = "jsonrpc",
            rpc.method = "eth_getBlockByNumber",
            server.address = rpc.endpoint(),
            blocks = numbers.len()
        ))
        .await?)
}
