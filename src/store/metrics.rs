//! The gauges that live in the database, read when scraped in one short
//! transaction each, bounded by [`crate::metrics::REFRESH_WITHIN`]:
//! [`BacklogGauges`] (what each stream has parked, its contiguous
//! watermark, backfill left) and [`DeliveryGauges`] (webhook outboxes and
//! consumers).

use std::sync::Mutex;

use crate::metrics::{Collector, DescriptorEncoder, MetricType, Refresh};

use super::failed_ranges::{self, Backlog};
use super::pool::{Database, TxLimits};
use super::StoreError;
use super::{consumers, outbox};

/// `logcursor_failed_ranges_pending`, `…_dead`, `logcursor_dead_letters`,
/// `logcursor_contiguous_watermark_block`, `logcursor_backfill_blocks_left`.
pub struct BacklogGauges {
    db: Database,
    streams: Vec<String>,
    /// As last read; `None` after a failed read (nothing stale is shown).
    read: Mutex<Option<Vec<(String, Backlog)>>>,
}

impl std::fmt::Debug for BacklogGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BacklogGauges").field("streams", &self.streams).finish()
    }
}

type Pick = fn(&Backlog) -> i64;

/// Name, help, value.
const GAUGES: [(&str, &str, Pick); 5] = [
    (
        "failed_ranges_pending",
        "Skipped ranges waiting for the gap-fill worker.",
        |b| b.pending,
    ),
    (
        "failed_ranges_dead",
        "Skipped ranges that failed gapfill_max_attempts times.",
        |b| b.dead,
    ),
    ("dead_letters", "Logs parked in dead_letters.", |b| b.dead_letters),
    (
        "contiguous_watermark_block",
        "Highest block below which nothing is pending.",
        |b| b.watermark,
    ),
    (
        "backfill_blocks_left",
        "Blocks of filter backfills still to fetch.",
        |b| b.backfill_blocks_left,
    ),
];

impl BacklogGauges {
    pub fn new(db: Database, streams: Vec<String>) -> BacklogGauges {
        BacklogGauges {
            db,
            streams,
            read: Mutex::new(None),
        }
    }

    /// Reads every stream's backlog now.
    pub async fn read_now(&self) -> Result<(), StoreError> {
        let mut client = self.db.get().await?;
        let tx = self.db.begin(&mut client, TxLimits::SHORT).await?;
        let names: Vec<&str> = self.streams.iter().map(String::as_str).collect();
        let rows = failed_ranges::backlogs(&*tx, &names).await?;
        tx.commit().await.map_err(StoreError::db("commit backlog read"))?;
        *self.read.lock().unwrap_or_else(|p| p.into_inner()) = Some(rows);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Refresh for BacklogGauges {
    fn name(&self) -> &'static str {
        "backlog (database)"
    }

    async fn refresh(&self) {
        if let Err(e) = self.read_now().await {
            tracing::warn!(error = %e, "metrics: backlog unavailable");
            self.clear();
        }
    }

    fn clear(&self) {
        *self.read.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Collector for BacklogGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rows) = read.as_ref() else {
            return Ok(());
        };
        for (name, help, pick) in GAUGES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (stream, backlog) in rows {
                let labels = [("stream", stream.as_str())];
                family.encode_family(&labels)?.encode_gauge(&pick(backlog))?;
            }
        }
        Ok(())
    }
}

/// Lag of a consumer in `/metrics` is counted up to this many rows (a
/// scrape stays cheap; `consumers list` counts further).
pub const METRICS_LAG_CAP: i64 = 100_000;

/// What the outbox and the consumers hold, as last read.
#[derive(Debug, Default)]
struct DeliveryRead {
    /// (stream, webhook, pending, dead, oldest pending age in seconds).
    outbox: Vec<(String, String, i64, i64, f64)>,
    /// (consumer, stream, lag in rows, seconds since its last claim).
    consumers: Vec<(String, String, i64, f64)>,
}

/// `logcursor_outbox_pending`, `…_dead`, `…_oldest_pending_seconds` per
/// (stream, webhook); `logcursor_consumer_lag_rows` and
/// `logcursor_consumer_idle_seconds` per consumer.
pub struct DeliveryGauges {
    db: Database,
    /// The configured (stream, webhook) pairs: shown at zero when empty.
    webhooks: Vec<(String, String)>,
    read: Mutex<Option<DeliveryRead>>,
}

impl std::fmt::Debug for DeliveryGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryGauges")
            .field("webhooks", &self.webhooks)
            .finish()
    }
}

impl DeliveryGauges {
    pub fn new(db: Database, webhooks: Vec<(String, String)>) -> DeliveryGauges {
        DeliveryGauges {
            db,
            webhooks,
            read: Mutex::new(None),
        }
    }

    /// Reads the outbox and the consumers now.
    pub async fn read_now(&self) -> Result<(), StoreError> {
        let mut client = self.db.get().await?;
        let tx = self.db.begin(&mut client, TxLimits::SHORT).await?;
        let mut read = DeliveryRead {
            outbox: outbox::backlog(&*tx).await?,
            consumers: consumers::list(&*tx, METRICS_LAG_CAP)
                .await?
                .into_iter()
                .map(|c| {
                    let idle = c.updated_at.elapsed().map_or(0.0, |d| d.as_secs_f64());
                    (c.name, c.stream, c.lag, idle)
                })
                .collect(),
        };
        tx.commit().await.map_err(StoreError::db("commit delivery read"))?;
        for (stream, webhook) in &self.webhooks {
            if !read.outbox.iter().any(|(s, w, ..)| s == stream && w == webhook) {
                read.outbox.push((stream.clone(), webhook.clone(), 0, 0, 0.0));
            }
        }
        *self.read.lock().unwrap_or_else(|p| p.into_inner()) = Some(read);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Refresh for DeliveryGauges {
    fn name(&self) -> &'static str {
        "outbox and consumers (database)"
    }

    async fn refresh(&self) {
        if let Err(e) = self.read_now().await {
            tracing::warn!(error = %e, "metrics: outbox and consumers unavailable");
            self.clear();
        }
    }

    fn clear(&self) {
        *self.read.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Collector for DeliveryGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let Some(read) = read.as_ref() else {
            return Ok(());
        };
        type OutboxPick = fn(&(String, String, i64, i64, f64)) -> f64;
        let outbox: [(&str, &str, OutboxPick); 3] = [
            ("outbox_pending", "Webhook deliveries waiting to be delivered.", |r| {
                r.2 as f64
            }),
            (
                "outbox_dead",
                "Webhook deliveries that are dead (replay with `logcursor outbox replay`).",
                |r| r.3 as f64,
            ),
            (
                "outbox_oldest_pending_seconds",
                "Age of the oldest pending webhook delivery (0: none).",
                |r| r.4,
            ),
        ];
        for (name, help, pick) in outbox {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for row in &read.outbox {
                let labels = [("stream", row.0.as_str()), ("webhook", row.1.as_str())];
                family.encode_family(&labels)?.encode_gauge(&pick(row))?;
            }
        }
        type ConsumerPick = fn(&(String, String, i64, f64)) -> f64;
        let consumers: [(&str, &str, ConsumerPick); 2] = [
            (
                "consumer_lag_rows",
                "Rows stored after the consumer's position (counted up to 100000).",
                |r| r.2 as f64,
            ),
            (
                "consumer_idle_seconds",
                "Seconds since the consumer's position last moved.",
                |r| r.3,
            ),
        ];
        for (name, help, pick) in consumers {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for row in &read.consumers {
                let labels = [("consumer", row.0.as_str()), ("stream", row.1.as_str())];
                family.encode_family(&labels)?.encode_gauge(&pick(row))?;
            }
        }
        Ok(())
    }
}
