//! One head per endpoint: a replica follows each endpoint it uses once —
//! one `newHeads` subscription, or one `eth_getBlockByNumber("latest")`
//! poll — however many streams use it, and hands the head to all of them
//! through a watch channel. A stream wakes when its endpoint's head changes,
//! and not otherwise: idle streams cost no request.
//!
//! ```text
//! subscription live:  a pushed header at once; a poll every ws_poll_interval (a safety net)
//! subscription down:  a poll every poll_interval (the shortest of the streams')
//! each poll:          [latest, safe?, finalized?] in one batch (the tags some stream needs)
//! ```
//!
//! A tag the endpoint does not answer (a pre-merge node) is reported once
//! and left out: streams then rely on confirmations.
//!
//! Each new head also brings a hint: one `eth_getLogs` of the new blocks
//! for the union of the streams' filters, before the head is published, so
//! that a woken stream knows whether the blocks past its cursor hold any of
//! its logs ([`Follower::holds_logs`]). The hint only decides *when* a
//! stream ticks (at once, or a little later with others' blocks): a tick
//! still fetches and checks its whole range itself, so a wrong or missing
//! hint (a failed request, a reorganisation) can delay an event, never lose
//! or duplicate one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::client::ChainClient;
use super::ws::{self, Push};
use super::{ChainError, ClientOptions, EndpointConfig, Endpoints};
use crate::backoff::{Failures, CONNECT};
use crate::redact::Secret;
use crate::types::{Address, Hash32, Header, LogFilter};

/// Blocks whose hints are kept.
const HINT_KEEP: u64 = 256;
/// At most this many blocks are fetched for one new head (after a jump,
/// the newest ones; the others are unknown and their streams tick).
const HINT_FETCH: u64 = 32;
/// The hints of a new head are given up after this long (the head is then
/// published without them).
const HINT_WAIT: Duration = Duration::from_millis(500);

/// Which recent blocks hold logs some stream on the endpoint wants.
#[derive(Debug, Default)]
struct Hints {
    /// The blocks fetched, `from..=to` (`None`: none yet).
    covered: Option<(u64, u64)>,
    /// Of those, each block holding wanted logs, with their (address, topic0).
    found: BTreeMap<u64, Vec<(Address, Hash32)>>,
}

impl Hints {
    /// Whether blocks `from..=to` hold logs of `filter`: `None` unless
    /// every block of the range was fetched (an unknown block may hold
    /// anything, so it never reads as empty).
    fn holds(&self, from: u64, to: u64, filter: &LogFilter) -> Option<bool> {
        if from > to {
            return Some(false);
        }
        let (a, b) = self.covered?;
        if from < a || to > b {
            return None;
        }
        let wanted = |(address, topic): &(Address, Hash32)| {
            filter.addresses.contains(address) && (filter.topic0s.is_empty() || filter.topic0s.contains(topic))
        };
        Some(self.found.range(from..=to).any(|(_, pairs)| pairs.iter().any(wanted)))
    }

    /// The first block to fetch for a new `head`: the one after those
    /// fetched, at most [`HINT_FETCH`] back. A head at or below what was
    /// fetched is a reorganisation (or a lagging backend): what was known
    /// from it on is forgotten and fetched again.
    fn next_from(&mut self, head: u64) -> u64 {
        let next = match self.covered {
            Some((a, b)) if head <= b => {
                self.found.retain(|n, _| *n < head);
                self.covered = (head > a).then(|| (a, head - 1));
                head
            }
            Some((_, b)) => b + 1,
            None => head,
        };
        next.max(head.saturating_sub(HINT_FETCH - 1))
    }

    /// Records that `from..=covered` was fetched and held `found` (block,
    /// address, topic0); keeps the last [`HINT_KEEP`] blocks. A range that
    /// does not continue the one known replaces it.
    fn record(&mut self, from: u64, covered: u64, found: impl IntoIterator<Item = (u64, Address, Hash32)>) {
        let contiguous = self.covered.is_some_and(|(_, b)| b + 1 == from);
        if !contiguous {
            self.found.clear();
        }
        let start = self.covered.filter(|_| contiguous).map_or(from, |(a, _)| a);
        for (block, address, topic) in found.into_iter().filter(|(n, ..)| *n <= covered) {
            self.found.entry(block).or_default().push((address, topic));
        }
        let keep_from = covered.saturating_sub(HINT_KEEP - 1).max(start);
        self.found.retain(|n, _| *n >= keep_from);
        self.covered = Some((keep_from, covered));
    }
}

/// What a follower knows of its endpoint's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub header: Header,
    /// The `safe` block's number, when a stream asked for it and the node answers.
    pub safe: Option<u64>,
    /// The `finalized` block's number, likewise.
    pub finalized: Option<u64>,
}

/// The head of one endpoint, for every stream of this replica that uses it.
pub struct Follower {
    client: ChainClient,
    /// WebSocket URLs for `newHeads` (empty: polling only).
    ws: Mutex<Vec<Secret>>,
    /// The tags some stream needs.
    tags: Mutex<Vec<&'static str>>,
    /// Poll interval without a subscription (the shortest asked for).
    interval: Mutex<Duration>,
    /// Poll interval while subscribed.
    ws_interval: Mutex<Duration>,
    head: watch::Sender<Option<Head>>,
    /// The subscription's state and pushed headers.
    pub push: Arc<Push>,
    /// The union of the filters of the streams on this endpoint.
    interest: Mutex<(BTreeSet<Address>, BTreeSet<Hash32>)>,
    hints: Mutex<Hints>,
}

/// What a stream asks of the follower of one of its endpoints.
#[derive(Debug, Clone)]
pub struct Need {
    pub ws: Option<Secret>,
    pub tag: Option<&'static str>,
    pub poll_interval: Duration,
    pub ws_poll_interval: Duration,
    /// The stream's logs, for the hints.
    pub filter: LogFilter,
}

impl Follower {
    /// The head, as it changes.
    pub fn watch(&self) -> watch::Receiver<Option<Head>> {
        self.head.subscribe()
    }

    /// The head now.
    pub fn head(&self) -> Option<Head> {
        *self.head.borrow()
    }

    /// The endpoint's redacted URL.
    pub fn endpoint(&self) -> String {
        self.client.endpoints().join(", ")
    }

    /// Whether blocks `from..=to` hold logs of `filter`, as far as the
    /// hints know: `None` when some block of the range was not fetched.
    pub fn holds_logs(&self, from: u64, to: u64, filter: &LogFilter) -> Option<bool> {
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .holds(from, to, filter)
    }

    /// Fetches the hints of the blocks up to `head` not fetched yet.
    async fn hint(&self, head: u64) {
        let filter = {
            let interest = self.interest.lock().unwrap_or_else(|p| p.into_inner());
            if interest.0.is_empty() {
                return;
            }
            LogFilter {
                addresses: interest.0.iter().copied().collect(),
                topic0s: interest.1.iter().copied().collect(),
            }
        };
        let from = self.hints.lock().unwrap_or_else(|p| p.into_inner()).next_from(head);
        // Bounded: a slow hint must not hold the head back from the streams.
        let fetched = tokio::time::timeout(HINT_WAIT, self.client.at(0).get_logs(from, head, &filter)).await;
        match fetched {
            Err(_) => {
                tracing::debug!(endpoint = %self.endpoint(), "no log hints for the new blocks within {HINT_WAIT:?}");
            }
            Ok(Ok(logs)) => {
                let found = logs
                    .logs
                    .iter()
                    .filter_map(|l| l.topics.first().map(|t| (l.block_number, l.address, *t)));
                self.hints
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(from, logs.covered, found);
            }
            Ok(Err(e)) => {
                // The streams then tick as if there were no hints.
                tracing::debug!(endpoint = %self.endpoint(), error = %e, "no log hints for the new blocks");
            }
        }
    }

    /// Whether `header` is news (the head would change).
    fn is_news(&self, header: &Header) -> bool {
        self.head.borrow().is_none_or(|h| h.header != *header)
    }

    fn need(&self, n: &Need) {
        {
            let mut interest = self.interest.lock().unwrap_or_else(|p| p.into_inner());
            interest.0.extend(n.filter.addresses.iter().copied());
            interest.1.extend(n.filter.topic0s.iter().copied());
        }
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = n.tag.filter(|t| !tags.contains(t)) {
            tags.push(t);
        }
        drop(tags);
        let mut ws = self.ws.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(url) = n.ws.clone().filter(|u| !ws.iter().any(|w| w.expose() == u.expose())) {
            ws.push(url);
        }
        drop(ws);
        let shorter = |m: &Mutex<Duration>, d: Duration| {
            let mut v = m.lock().unwrap_or_else(|p| p.into_inner());
            *v = (*v).min(d);
        };
        shorter(&self.interval, n.poll_interval);
        shorter(&self.ws_interval, n.ws_poll_interval);
    }

    /// Follows the endpoint until `cancel`: subscribes when it can, polls.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let urls = self.ws.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let subscription = tokio::spawn(ws::subscribe(
            self.endpoint(),
            urls,
            Arc::clone(&self.push),
            cancel.clone(),
        ));
        let mut failures = Failures::new(CONNECT);
        while !cancel.is_cancelled() {
            let wait = match self.poll().await {
                Ok(()) => {
                    failures.reset();
                    if self.push.connected() {
                        *self.ws_interval.lock().unwrap_or_else(|p| p.into_inner())
                    } else {
                        *self.interval.lock().unwrap_or_else(|p| p.into_inner())
                    }
                }
                Err(e) => {
                    let wait = failures
                        .failed()
                        .min(*self.interval.lock().unwrap_or_else(|p| p.into_inner()) * 5);
                    tracing::warn!(endpoint = %self.endpoint(), error = %e, retry_in = ?wait, "cannot read the head");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.push.woken() => {
                    if let Some(h) = self.push.take_pushed() {
                        // Before the first poll has read the tags a stream
                        // needs (safe, finalized), a pushed header would be
                        // published without them, as if the node had none:
                        // only a poll publishes the first head then.
                        let tags_needed = !self.tags.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                        if tags_needed && self.head.borrow().is_none() {
                            continue;
                        }
                        if self.is_news(&h) {
                            self.hint(h.number).await;
                        }
                        self.publish(h, None);
                        // The tags move with the head; the pushed header lacks them.
                        if self.tags.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                            continue;
                        }
                    }
                }
                _ = cancel.cancelled() => break,
            }
        }
        subscription.abort();
    }

    /// One poll: the latest header and the tags asked for, in one batch.
    async fn poll(&self) -> Result<(), ChainError> {
        let tags = self.tags.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let rpc = self.client.at(0);
        let latest = rpc.latest().await?;
        let mut tagged = (None, None);
        for tag in tags {
            match rpc.tagged_block(tag).await {
                Ok(Some(n)) if tag == "safe" => tagged.0 = Some(n),
                Ok(Some(n)) => tagged.1 = Some(n),
                // The node does not answer the tag (said once by the client).
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        if self.head.borrow().is_none() {
            // The first head goes out at once (every stream looks at start
            // anyway); the hints start from it.
            self.publish(latest, Some(tagged));
            self.hint(latest.number).await;
            return Ok(());
        }
        if self.is_news(&latest) {
            self.hint(latest.number).await;
        }
        self.publish(latest, Some(tagged));
        Ok(())
    }

    /// Publishes `header` (and the tags, when read with it) if it is news.
    fn publish(&self, header: Header, tags: Option<(Option<u64>, Option<u64>)>) {
        self.head.send_if_modified(|current| {
            let (safe, finalized) = tags.unwrap_or_else(|| current.map_or((None, None), |c| (c.safe, c.finalized)));
            let next = Head {
                header,
                safe,
                finalized,
            };
            // A poll that lags a pushed head keeps the newer header, and
            // takes the fresh tags where they moved forward.
            if let (Some(c), Some((safe, finalized))) = (current.as_mut(), tags) {
                if c.header.number > header.number {
                    let newer = |old: Option<u64>, new: Option<u64>| match (old, new) {
                        (Some(o), Some(n)) => Some(o.max(n)),
                        (o, n) => n.or(o),
                    };
                    let moved = Head {
                        safe: newer(c.safe, safe),
                        finalized: newer(c.finalized, finalized),
                        ..*c
                    };
                    if moved == *c {
                        return false;
                    }
                    *c = moved;
                    return true;
                }
            }
            if *current == Some(next) {
                return false;
            }
            *current = Some(next);
            true
        });
    }
}

/// Makes the observer of an endpoint's subscription (from its redacted URL).
pub type ObserverOf = Box<dyn Fn(&str) -> Arc<dyn super::ws::PushObserver> + Send + Sync>;

/// Every follower of this replica, by endpoint URL.
pub struct Followers {
    endpoints: Endpoints,
    by_url: Mutex<HashMap<String, Arc<Follower>>>,
    observer: Option<ObserverOf>,
}

impl Followers {
    pub fn new(endpoints: Endpoints, observer: Option<ObserverOf>) -> Followers {
        Followers {
            endpoints,
            by_url: Mutex::default(),
            observer,
        }
    }

    /// The follower of `endpoint` (made on first use), told what `need`s.
    pub fn follow(&self, endpoint: &EndpointConfig, chain_id: u64, opts: ClientOptions, need: &Need) -> Arc<Follower> {
        let mut map = self.by_url.lock().unwrap_or_else(|p| p.into_inner());
        let f = map.entry(endpoint.url.expose().to_string()).or_insert_with(|| {
            let push = match &self.observer {
                Some(o) => Push::observed(o(&crate::redact::redact_url(endpoint.url.expose()))),
                None => Push::default(),
            };
            Arc::new(Follower {
                client: ChainClient::new(&self.endpoints, std::slice::from_ref(endpoint), chain_id, opts),
                ws: Mutex::new(Vec::new()),
                tags: Mutex::new(Vec::new()),
                interval: Mutex::new(need.poll_interval),
                ws_interval: Mutex::new(need.ws_poll_interval),
                head: watch::channel(None).0,
                push: Arc::new(push),
                interest: Mutex::default(),
                hints: Mutex::default(),
            })
        });
        f.need(need);
        Arc::clone(f)
    }

    /// Every follower, to run.
    pub fn all(&self) -> Vec<Arc<Follower>> {
        self.by_url
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(b: u8) -> Address {
        Address::from_slice(&[b; 20]).expect("20 bytes")
    }

    fn topic(b: u8) -> Hash32 {
        Hash32::from_slice(&[b; 32]).expect("32 bytes")
    }

    fn filter(a: u8, t: u8) -> LogFilter {
        LogFilter {
            addresses: vec![address(a)],
            topic0s: vec![topic(t)],
        }
    }

    /// A hint may only delay a tick: a block not fetched never reads as
    /// holding nothing, and a reorganised head forgets what it replaced.
    #[test]
    fn hints_say_empty_only_for_blocks_fetched_and_forget_a_reorganised_head() {
        let mut h = Hints::default();
        assert_eq!(h.holds(10, 10, &filter(1, 1)), None, "nothing fetched");
        let from = h.next_from(12);
        assert_eq!(from, 12);
        h.record(from, 12, [(12, address(1), topic(1))]);
        assert_eq!(h.holds(12, 12, &filter(1, 1)), Some(true));
        assert_eq!(h.holds(12, 12, &filter(2, 1)), Some(false), "another contract's");
        assert_eq!(h.holds(12, 12, &filter(1, 2)), Some(false), "another event's");
        assert_eq!(h.holds(11, 12, &filter(2, 1)), None, "block 11 was never fetched");
        assert_eq!(h.holds(12, 13, &filter(2, 1)), None, "block 13 not yet");

        let from = h.next_from(14);
        assert_eq!(from, 13, "continues after the blocks fetched");
        h.record(from, 14, []);
        assert_eq!(h.holds(12, 14, &filter(1, 1)), Some(true));
        assert_eq!(h.holds(13, 14, &filter(1, 1)), Some(false));

        // The head goes back to 12 with another block 12: what was known
        // from 12 on is forgotten until fetched again.
        let from = h.next_from(12);
        assert_eq!(from, 12);
        assert_eq!(h.holds(12, 12, &filter(1, 1)), None);
        h.record(from, 12, []);
        assert_eq!(
            h.holds(12, 12, &filter(1, 1)),
            Some(false),
            "the new block 12 holds none"
        );

        // A jump further than HINT_FETCH: the blocks skipped stay unknown.
        let far = 12 + HINT_FETCH + 10;
        let from = h.next_from(far);
        assert_eq!(from, far - HINT_FETCH + 1);
        h.record(from, far, []);
        assert_eq!(h.holds(13, far, &filter(1, 1)), None);
        assert_eq!(h.holds(from, far, &filter(1, 1)), Some(false));
        // A fetch that covered less than asked leaves the rest unknown.
        let from = h.next_from(far + 5);
        h.record(from, far + 2, []);
        assert_eq!(h.holds(far, far + 5, &filter(1, 1)), None);
    }
}
