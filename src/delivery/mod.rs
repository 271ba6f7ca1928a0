//! Webhook delivery: workers on every replica take deliveries from the
//! outbox (written in the transaction that stored their events, see
//! [`crate::store::outbox`]) and POST them.
//!
//! ```text
//! claim (short transaction: lease on the database clock, body fixed at the first claim)
//! POST url  {"stream","webhook","delivery_id","type","events":[…]}
//!      Idempotency-Key: <delivery_id>            (the same on every retry)
//!      X-Logcursor-Signature: sha256=<HMAC-SHA256(secret, body)>   (with a secret)
//! 2xx                 → delivered (the record, without its body, is kept for
//!                       keep_delivered: a later rewind reverts its events)
//! 429, 5xx, timeout,
//! connection refused  → retried after the webhook's backoff (or Retry-After, if longer)
//! other status        → dead at once (status and body excerpt kept)
//! max_attempts spent  → dead
//! ```
//!
//! I7 (a delivery happens at least once with a unique idempotency key;
//! dead only after the configured attempts): a worker that dies between the
//! POST and recording it leaves the lease to expire; the next claim sends
//! the same body with the same key. Only the claimant records an outcome.
//!
//! Secrets — the URL (its path or query may hold a key) and the HMAC key —
//! never reach a log line, a span or an error: the URL is shown redacted,
//! transport errors are stripped of it.

mod post;

/// One webhook of one stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, crate::metrics::EncodeLabelSet)]
pub struct WebhookLabels {
    pub stream: String,
    pub webhook: String,
}

crate::series! {
    /// What this replica's workers did for one webhook.
    pub struct DeliveryMetrics for WebhookLabels {
        /// Delivery attempts by outcome: delivered, retry, dead, lost_claim.
        pub webhook_attempts: Labelled<WebhookLabels, Outcome, Counter>,
        /// From the POST to its answer (or its failure).
        pub webhook_attempt_seconds: Histogram,
        /// Events in deliveries that were delivered.
        pub webhook_events_delivered: Counter,
    }
}

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::{Failures, TICK};
use crate::config::webhook::WebhookConfig;
use crate::metrics::{Counter, Histogram, Labelled, Registry};
use crate::poller::metrics::Outcome;
use crate::poller::Stream;
use crate::redact::redact_url;
use crate::store::outbox::{self, Delivery, Failure};
use crate::store::pool::{Database, TxLimits};
use crate::store::StoreError;

pub use post::{sign, Answer};

/// How often a worker looks for due deliveries when nothing woke it.
const POLL: Duration = Duration::from_millis(500);
/// Unordered webhooks: deliveries in flight at once per replica.
const UNORDERED_CONCURRENCY: usize = 4;

/// One webhook of one stream.
struct Target {
    stream: Arc<Stream>,
    hook: WebhookConfig,
    /// The redacted URL, for logs and spans.
    shown: String,
    metrics: DeliveryMetrics,
}

/// What one attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempted {
    /// Nothing was due; the next pending delivery is due after this long
    /// (`None`: none is pending).
    Idle(Option<Duration>),
    Delivered {
        id: i64,
        status: u16,
        events: usize,
    },
    /// Failed; retried later.
    Retry {
        id: i64,
        status: Option<u16>,
        error: String,
    },
    /// Failed for good (refused, or the last attempt).
    Dead {
        id: i64,
        status: Option<u16>,
        error: String,
    },
    /// Another worker holds the delivery now (this one's lease ran out).
    LostClaim {
        id: i64,
    },
}

/// The delivery workers of one replica.
pub struct Deliverer {
    db: Database,
    /// Written to `outbox.claimed_by`.
    replica_id: String,
    http: reqwest::Client,
    targets: Vec<Target>,
}

impl Deliverer {
    /// Workers for every webhook of `streams` (none when there are none),
    /// their metrics in `registry`.
    pub fn new(
        streams: &[Arc<Stream>],
        db: Database,
        replica_id: String,
        registry: &mut Registry,
    ) -> Option<Deliverer> {
        if streams.iter().all(|s| s.cfg.webhooks.is_empty()) {
            return None;
        }
        let families = DeliveryMetrics::register(registry);
        let targets: Vec<Target> = streams
            .iter()
            .flat_map(|s| {
                let families = families.clone();
                s.cfg.webhooks.iter().map(move |h| Target {
                    stream: Arc::clone(s),
                    shown: redact_url(h.url.expose()),
                    hook: h.clone(),
                    metrics: families.of(&WebhookLabels {
                        stream: s.cfg.name.to_string(),
                        webhook: h.name.clone(),
                    }),
                })
            })
            .collect();
        // No redirects: a 301/302/303 would turn the POST into a bodiless
        // GET whose 2xx would mark the delivery done unreceived; a 3xx is
        // an answer like any other (refused: dead, visible, replayable).
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Some(Deliverer {
            db,
            replica_id,
            http,
            targets,
        })
    }

    /// (stream, webhook) of each target, in order: the indexes
    /// [`Deliverer::deliver_once`] takes.
    pub fn targets(&self) -> Vec<(String, String)> {
        self.targets
            .iter()
            .map(|t| (t.stream.cfg.name.to_string(), t.hook.name.clone()))
            .collect()
    }

    /// Delivers until `cancel` fires: at once after a commit of the stream,
    /// else every [`POLL`] (deliveries of other replicas' commits, retries).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut workers = tokio::task::JoinSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let n = if t.hook.ordered { 1 } else { UNORDERED_CONCURRENCY };
            for _ in 0..n {
                let (me, token) = (Arc::clone(&self), cancel.clone());
                workers.spawn(async move { me.work(i, token).await });
            }
        }
        while workers.join_next().await.is_some() {}
    }

    async fn work(&self, target: usize, cancel: CancellationToken) {
        let t = &self.targets[target];
        let mut failures = Failures::new(TICK);
        let mut last_aged = tokio::time::Instant::now();
        while !cancel.is_cancelled() {
            let woken = t.stream.committed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let wait = match self.deliver_once(target).await {
                Ok(Attempted::Idle(due)) => {
                    failures.reset();
                    due.map_or(POLL, |d| d.clamp(Duration::from_millis(5), POLL))
                }
                Ok(_) => {
                    failures.reset();
                    Duration::ZERO
                }
                Err(e) => {
                    let delay = failures.failed();
                    tracing::error!(stream = %t.stream.cfg.name, webhook = %t.hook.name, error = %e, retry_in = ?delay, "delivery worker failed");
                    delay
                }
            };
            if last_aged.elapsed() > Duration::from_secs(60) {
                last_aged = tokio::time::Instant::now();
                if let Err(e) = self.age(t).await {
                    tracing::warn!(error = %e, "outbox aging failed");
                }
            }
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut woken => {}
                    _ = cancel.cancelled() => break,
                }
            }
        }
    }

    async fn age(&self, t: &Target) -> Result<u64, StoreError> {
        let mut client = self.db.get().await?;
        let tx = self.db.begin(&mut client, TxLimits::SHORT).await?;
        let n = outbox::age(&*tx, &t.stream.cfg.name, &t.hook.name, t.hook.keep_delivered).await?;
        tx.commit().await.map_err(StoreError::db("commit outbox aging"))?;
        Ok(n)
    }

    /// Claims and attempts one delivery of target `target`.
    pub async fn deliver_once(&self, target: usize) -> Result<Attempted, StoreError> {
        let t = &self.targets[target];
        let lease = t.hook.timeout.saturating_mul(2) + Duration::from_secs(5);
        let claimed = {
            let mut client = self.db.get().await?;
            let tx = self.db.begin(&mut client, TxLimits::SHORT).await?;
            let d = outbox::claim(
                &*tx,
                &t.stream.cfg.name,
                &t.hook.name,
                t.hook.ordered,
                &self.replica_id,
                lease,
            )
            .await?;
            let due = match d {
                Some(_) => None,
                None => outbox::next_due(&*tx, &t.stream.cfg.name, &t.hook.name, t.hook.ordered).await?,
            };
            tx.commit().await.map_err(StoreError::db("commit delivery claim"))?;
            d.ok_or(due)
        };
        let d = match claimed {
            Ok(d) => d,
            Err(due) => return Ok(Attempted::Idle(due)),
        };
        let span = tracing::info_span!(
            "webhook.deliver",
            stream = %d.stream,
            webhook = %d.webhook,
            delivery_id = %d.delivery_id,
            attempt = d.attempts + 1,
            events = d.events,
            url.full = %t.shown,
            http.response.status_code = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let started = tokio::time::Instant::now();
        let answer = post::post(&self.http, &t.hook, &d).instrument(span.clone()).await;
        t.metrics
            .webhook_attempt_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(status) = answer.status() {
            span.record("http.response.status_code", status);
        }
        let outcome = self.record(t, &d, answer).await?;
        let label = match &outcome {
            Attempted::Delivered { events, .. } => {
                t.metrics.webhook_events_delivered.inc_by(*events as u64);
                "delivered"
            }
            Attempted::Retry { .. } => "retry",
            Attempted::Dead { .. } => "dead",
            _ => "lost_claim",
        };
        t.metrics.webhook_attempts.with(Outcome { outcome: label }).inc();
        span.record("outcome", label);
        match &outcome {
            Attempted::Dead { status, error, .. } => {
                tracing::error!(stream = %d.stream, webhook = %d.webhook, delivery_id = %d.delivery_id, ?status, %error, "delivery is dead; `logcursor outbox replay` sends it again")
            }
            Attempted::Retry { status, error, .. } => {
                tracing::warn!(stream = %d.stream, webhook = %d.webhook, delivery_id = %d.delivery_id, ?status, %error, "delivery failed; retrying later")
            }
            _ => {}
        }
        Ok(outcome)
    }

    /// Records `answer` for delivery `d` (a transaction of its own).
    async fn record(&self, t: &Target, d: &Delivery, answer: Answer) -> Result<Attempted, StoreError> {
        let mut client = self.db.get().await?;
        let tx = self.db.begin(&mut client, TxLimits::SHORT).await?;
        let outcome = match answer {
            Answer::Ok(status) => {
                outbox::delivered(&*tx, d.id, status).await?;
                Attempted::Delivered {
                    id: d.id,
                    status,
                    events: d.events,
                }
            }
            Answer::Retry {
                status,
                error,
                retry_after,
            } => {
                let attempt = u32::try_from(d.attempts + 1).unwrap_or(u32::MAX);
                let delay = t.hook.backoff.delay(attempt).max(retry_after.unwrap_or_default());
                let failure = Failure {
                    status,
                    error: &error,
                    retry_in: delay,
                    refused: false,
                    max_attempts: t.hook.max_attempts,
                };
                match outbox::failed(&*tx, d.id, &self.replica_id, failure).await? {
                    None => Attempted::LostClaim { id: d.id },
                    Some(true) => Attempted::Dead {
                        id: d.id,
                        status,
                        error,
                    },
                    Some(false) => Attempted::Retry {
                        id: d.id,
                        status,
                        error,
                    },
                }
            }
            Answer::Refused { status, error } => {
                let failure = Failure {
                    status: Some(status),
                    error: &error,
                    retry_in: Duration::ZERO,
                    refused: true,
                    max_attempts: t.hook.max_attempts,
                };
                match outbox::failed(&*tx, d.id, &self.replica_id, failure).await? {
                    None => Attempted::LostClaim { id: d.id },
                    Some(_) => Attempted::Dead {
                        id: d.id,
                        status: Some(status),
                        error,
                    },
                }
            }
        };
        tx.commit().await.map_err(StoreError::db("commit delivery outcome"))?;
        Ok(outcome)
    }
}
