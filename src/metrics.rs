//! What this replica knows about its streams and endpoints, kept in atomics
//! and rendered as Prometheus text on `GET /metrics` (and exported over
//! OTLP by [`crate::telemetry`] when an endpoint is configured).
//!
//! Every replica serves its own view: the cursor it last read or moved, the
//! heads its last tick saw, its own counters. Sum counters across replicas;
//! take the max of cursor gauges.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::chain::ChainErrorKind;
use crate::chain::RpcObserver;

/// Upper bounds (seconds) of the duration histograms.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
    /// The OTLP instrument (and the stream label) every observation is
    /// also recorded to, when OTLP export is on.
    mirror: std::sync::OnceLock<(opentelemetry::metrics::Histogram<f64>, [opentelemetry::KeyValue; 1])>,
}

impl Histogram {
    /// Records every later observation to `otlp` too, labelled by `stream`.
    pub fn mirror_to(&self, otlp: opentelemetry::metrics::Histogram<f64>, stream: &str) {
        let _ = self
            .mirror
            .set((otlp, [opentelemetry::KeyValue::new("stream", stream.to_string())]));
    }

    pub fn observe(&self, d: Duration) {
        if let Some((h, labels)) = self.mirror.get() {
            h.record(d.as_secs_f64(), labels);
        }
        let secs = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// One stream, as this replica sees it.
#[derive(Debug, Default)]
pub struct StreamMetrics {
    pub chain_id: u64,
    pub cursor_block: AtomicI64,
    pub chain_head: AtomicU64,
    pub safe_head: AtomicU64,
    /// Seconds since the epoch of the cursor's block (0: unknown).
    pub cursor_block_time: AtomicU64,
    pub events_inserted: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_letters: AtomicU64,
    pub reorgs: AtomicU64,
    pub lock_timeouts: AtomicU64,
    pub ranges_skipped: AtomicU64,
    /// Times the cursor read under the lock was below what this replica had
    /// seen (an operator rewind, or a failover that lost commits).
    pub cursor_regressions: AtomicU64,
    /// Prefetched ranges used by the next tick (pipelining).
    pub prefetch_used: AtomicU64,
    /// Prefetched ranges discarded because the cursor had moved.
    pub prefetch_discarded: AtomicU64,
    /// The learned `eth_getLogs` span of the endpoint last used.
    pub block_range: AtomicU64,
    /// When this replica last committed a range of this stream (epoch seconds).
    pub last_advance: AtomicU64,
    /// The idle wait the poll loop is in now, in milliseconds (0: working,
    /// or backing off after a failure).
    pub idle_wait_ms: AtomicU64,
    /// The push wake-up, when the stream has `ws_urls` (set once at start).
    pub push: std::sync::OnceLock<std::sync::Arc<crate::chain::ws::Push>>,
    pub tick_duration: Histogram,
    pub lock_wait: Histogram,
    pub lock_hold: Histogram,
    /// Ticks by outcome (advanced, idle, error, …).
    ticks: Mutex<BTreeMap<&'static str, u64>>,
    /// The last tick's outcome and, for an error, its message.
    last: Mutex<(String, Option<String>)>,
}

impl StreamMetrics {
    pub fn new(chain_id: u64) -> Self {
        StreamMetrics {
            chain_id,
            cursor_block: AtomicI64::new(-1),
            ..Default::default()
        }
    }

    /// Records a finished tick.
    pub fn tick(&self, outcome: &'static str, error: Option<String>, took: Duration) {
        self.tick_duration.observe(took);
        *self
            .ticks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(outcome)
            .or_default() += 1;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = (outcome.to_string(), error);
    }

    /// Ticks that ended with `outcome` (`None`: all ticks).
    pub fn ticks(&self, outcome: Option<&str>) -> u64 {
        let ticks = self.ticks.lock().unwrap_or_else(|p| p.into_inner());
        ticks
            .iter()
            .filter(|(o, _)| outcome.is_none_or(|w| **o == w))
            .map(|(_, n)| n)
            .sum()
    }

    /// The last tick's outcome and error message.
    pub fn last_outcome(&self) -> (String, Option<String>) {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Blocks between the cursor and the safe head (0 when unknown or caught up).
    pub fn lag_blocks(&self) -> u64 {
        let cursor = self.cursor_block.load(Ordering::Relaxed);
        let safe = i64::try_from(self.safe_head.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        u64::try_from(safe.saturating_sub(cursor)).unwrap_or(0)
    }

    /// Seconds between now and the cursor block's timestamp (`None`: unknown).
    pub fn lag_seconds(&self) -> Option<u64> {
        let t = self.cursor_block_time.load(Ordering::Relaxed);
        (t > 0).then(|| now_secs().saturating_sub(t))
    }

    /// The heads and the cursor a tick read before doing anything else.
    pub fn saw_heads(&self, head: u64, safe_head: u64, cursor: i64) {
        self.chain_head.store(head, Ordering::Relaxed);
        self.safe_head.store(safe_head, Ordering::Relaxed);
        self.cursor_block.store(cursor, Ordering::Relaxed);
    }
}

/// Requests to one endpoint.
#[derive(Debug, Default)]
struct EndpointMetrics {
    /// (method, kind) → count; kind is "ok" or the error kind.
    requests: BTreeMap<(String, &'static str), u64>,
    latency: BTreeMap<String, Arc<Histogram>>,
}

/// Everything `/metrics` shows.
pub struct Registry {
    started: Instant,
    replica_id: String,
    streams: Mutex<BTreeMap<String, Arc<StreamMetrics>>>,
    /// Keyed by redacted endpoint URL.
    endpoints: Mutex<BTreeMap<String, EndpointMetrics>>,
}

impl Registry {
    pub fn new(replica_id: &str) -> Arc<Registry> {
        Arc::new(Registry {
            started: Instant::now(),
            replica_id: replica_id.to_string(),
            streams: Mutex::new(BTreeMap::new()),
            endpoints: Mutex::new(BTreeMap::new()),
        })
    }

    /// The metrics of `stream`, created on first use.
    pub fn stream(&self, stream: &str, chain_id: u64) -> Arc<StreamMetrics> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            streams
                .entry(stream.to_string())
                .or_insert_with(|| Arc::new(StreamMetrics::new(chain_id))),
        )
    }

    /// Every stream's metrics, by name.
    pub fn streams(&self) -> Vec<(String, Arc<StreamMetrics>)> {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let streams = self.streams();
        let gauge =
            |out: &mut String, name: &str, help: &str, kind: &str, value: &dyn Fn(&StreamMetrics) -> Option<f64>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (s, m) in &streams {
                    if let Some(v) = value(m) {
                        let _ = writeln!(
                            out,
                            "{name}{{stream=\"{}\",chain_id=\"{}\"}} {v}",
                            escape(s),
                            m.chain_id
                        );
                    }
                }
            };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        gauge(
            &mut out,
            "logcursor_cursor_block",
            "Last block whose logs are all stored, as this replica last saw it.",
            "gauge",
            &|m| Some(m.cursor_block.load(Ordering::Relaxed) as f64),
        );
        gauge(
            &mut out,
            "logcursor_chain_head_block",
            "Latest block reported by the endpoint of the last tick.",
            "gauge",
            &|m| Some(load(&m.chain_head)),
        );
        gauge(
            &mut out,
            "logcursor_safe_head_block",
            "Latest block the stream may read (latest - confirmations, finality).",
            "gauge",
            &|m| Some(load(&m.safe_head)),
        );
        gauge(
            &mut out,
            "logcursor_lag_blocks",
            "Blocks between the cursor and the safe head.",
            "gauge",
            &|m| Some(m.lag_blocks() as f64),
        );
        gauge(
            &mut out,
            "logcursor_lag_seconds",
            "Now minus the timestamp of the cursor's block.",
            "gauge",
            &|m| m.lag_seconds().map(|s| s as f64),
        );
        gauge(
            &mut out,
            "logcursor_block_range",
            "Current eth_getLogs span (blocks) of the endpoint last used.",
            "gauge",
            &|m| Some(load(&m.block_range)),
        );
        gauge(
            &mut out,
            "logcursor_last_advance_timestamp_seconds",
            "When this replica last committed a range of the stream.",
            "gauge",
            &|m| Some(load(&m.last_advance)),
        );
        gauge(
            &mut out,
            "logcursor_events_inserted_total",
            "Events this replica stored.",
            "counter",
            &|m| Some(load(&m.events_inserted)),
        );
        gauge(
            &mut out,
            "logcursor_duplicates_total",
            "Events that were already stored (skipped by ON CONFLICT).",
            "counter",
            &|m| Some(load(&m.duplicates)),
        );
        gauge(
            &mut out,
            "logcursor_dead_letters_total",
            "Logs parked in dead_letters by this replica.",
            "counter",
            &|m| Some(load(&m.dead_letters)),
        );
        gauge(
            &mut out,
            "logcursor_reorgs_total",
            "Reorgs below the safe head detected.",
            "counter",
            &|m| Some(load(&m.reorgs)),
        );
        gauge(
            &mut out,
            "logcursor_lock_timeouts_total",
            "Waits for the cursor lock that timed out (another replica was working).",
            "counter",
            &|m| Some(load(&m.lock_timeouts)),
        );
        gauge(
            &mut out,
            "logcursor_ranges_skipped_total",
            "Ranges skipped into failed_ranges.",
            "counter",
            &|m| Some(load(&m.ranges_skipped)),
        );
        gauge(
            &mut out,
            "logcursor_cursor_regressions_total",
            "Cursor found below what this replica last saw (rewind or failover).",
            "counter",
            &|m| Some(load(&m.cursor_regressions)),
        );
        gauge(
            &mut out,
            "logcursor_prefetch_used_total",
            "Ranges fetched ahead and used by the next tick.",
            "counter",
            &|m| Some(load(&m.prefetch_used)),
        );
        gauge(
            &mut out,
            "logcursor_prefetch_discarded_total",
            "Ranges fetched ahead and discarded: the cursor had moved.",
            "counter",
            &|m| Some(load(&m.prefetch_discarded)),
        );
        gauge(
            &mut out,
            "logcursor_ws_connected",
            "1 while the newHeads subscription is live (streams with ws_urls).",
            "gauge",
            &|m| m.push.get().map(|p| f64::from(u8::from(p.connected()))),
        );
        gauge(
            &mut out,
            "logcursor_ws_heads_total",
            "New heads received over WebSocket.",
            "counter",
            &|m| m.push.get().map(|p| load(&p.heads)),
        );
        gauge(
            &mut out,
            "logcursor_ws_drops_total",
            "Live newHeads subscriptions that were lost.",
            "counter",
            &|m| m.push.get().map(|p| load(&p.drops)),
        );

        let _ = writeln!(
            out,
            "# HELP logcursor_ticks_total Ticks by outcome.\n# TYPE logcursor_ticks_total counter"
        );
        for (s, m) in &streams {
            for (outcome, n) in m.ticks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = writeln!(
                    out,
                    "logcursor_ticks_total{{stream=\"{}\",outcome=\"{outcome}\"}} {n}",
                    escape(s)
                );
            }
        }
        for (name, help, pick) in [
            (
                "logcursor_tick_duration_seconds",
                "Duration of a tick, lock wait included.",
                (|m: &StreamMetrics| &m.tick_duration) as fn(&StreamMetrics) -> &Histogram,
            ),
            (
                "logcursor_lock_wait_seconds",
                "Time waiting for the cursor row lock.",
                |m| &m.lock_wait,
            ),
            (
                "logcursor_lock_hold_seconds",
                "Time holding the cursor row lock (lock to commit).",
                |m| &m.lock_hold,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (s, m) in &streams {
                pick(m).render(&mut out, name, &format!("stream=\"{}\"", escape(s)));
            }
        }

        let endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP logcursor_rpc_requests_total JSON-RPC requests by endpoint, method and result kind.\n# TYPE logcursor_rpc_requests_total counter");
        for (ep, m) in endpoints.iter() {
            for ((method, kind), n) in &m.requests {
                let _ = writeln!(
                    out,
                    "logcursor_rpc_requests_total{{endpoint=\"{}\",method=\"{method}\",kind=\"{kind}\"}} {n}",
                    escape(ep)
                );
            }
        }
        let _ = writeln!(out, "# HELP logcursor_rpc_latency_seconds JSON-RPC request latency.\n# TYPE logcursor_rpc_latency_seconds histogram");
        for (ep, m) in endpoints.iter() {
            for (method, h) in &m.latency {
                h.render(
                    &mut out,
                    "logcursor_rpc_latency_seconds",
                    &format!("endpoint=\"{}\",method=\"{method}\"", escape(ep)),
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP logcursor_uptime_seconds Seconds since this replica started.\n# TYPE logcursor_uptime_seconds gauge\nlogcursor_uptime_seconds{{replica=\"{}\"}} {}",
            escape(&self.replica_id),
            self.started.elapsed().as_secs_f64()
        );
        out
    }
}

impl RpcObserver for Registry {
    fn observe(&self, endpoint: &str, method: &'static str, result: Result<(), &ChainErrorKind>, latency: Duration) {
        let kind = match result {
            Ok(()) => "ok",
            Err(k) => k.label(),
        };
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let m = endpoints.entry(endpoint.to_string()).or_default();
        *m.requests.entry((method.to_string(), kind)).or_default() += 1;
        m.latency.entry(method.to_string()).or_default().observe(latency);
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A label value as the text format requires.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_gauges_counters_and_cumulative_histograms() {
        let r = Registry::new("r1");
        let m = r.stream("burns", 31337);
        m.cursor_block.store(90, Ordering::Relaxed);
        m.safe_head.store(100, Ordering::Relaxed);
        m.tick("advanced", None, Duration::from_millis(20));
        m.tick("advanced", None, Duration::from_secs(2));
        let text = r.render();
        assert!(
            text.contains("logcursor_lag_blocks{stream=\"burns\",chain_id=\"31337\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("logcursor_ticks_total{stream=\"burns\",outcome=\"advanced\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("logcursor_tick_duration_seconds_bucket{stream=\"burns\",le=\"0.025\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("logcursor_tick_duration_seconds_bucket{stream=\"burns\",le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("logcursor_tick_duration_seconds_count{stream=\"burns\"} 2"),
            "{text}"
        );
    }
}
