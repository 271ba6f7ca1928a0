//! The gauges that live in the database (what each stream has parked, its
//! contiguous watermark, backfill left): a collector read when scraped, in
//! one short transaction bounded by [`crate::metrics::REFRESH_WITHIN`].

use std::sync::Mutex;

use crate::metrics::{Collector, DescriptorEncoder, MetricType, Refresh};

use super::failed_ranges::{self, Backlog};
use super::pool::{Database, TxLimits};
use super::StoreError;

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
