//! The poller's metrics, declared where they change (the tick and the
//! loop), and the adapters through which the chain layer, which knows no
//! metrics, reports its requests ([`RpcObserver`]) and its push
//! subscription ([`PushObserver`]).
//!
//! Adding a metric: one field below, one line where it changes.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;

use crate::chain::ws::PushObserver;
use crate::chain::{ChainErrorKind, RpcObserver};
use crate::metrics::{Age, Counter, Gauge, Histogram, Labelled, NoLabels};

/// The labels of every per-stream series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
    pub chain_id: u64,
}

/// How a tick ended (`advanced`, `idle`, `error`, `lock_timeout`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

crate::series! {
    /// One stream, as this replica sees it.
    pub struct StreamMetrics for StreamLabels {
        /// Last block whose logs are all stored, as this replica last saw it.
        pub cursor_block: Gauge,
        /// Latest block reported by the endpoint of the last tick.
        pub chain_head_block: Gauge,
        /// Latest block the stream may read (latest - confirmations, finality).
        pub safe_head_block: Gauge,
        /// Blocks between the cursor and the safe head.
        pub lag_blocks: Gauge,
        /// Now minus the timestamp of the cursor's block.
        pub lag_seconds: Age,
        /// Current eth_getLogs span (blocks) of the endpoint last used.
        pub block_range: Gauge,
        /// When this replica last committed a range of the stream.
        pub last_advance_timestamp_seconds: Gauge,
        /// Events this replica stored.
        pub events_inserted: Counter,
        /// Events that were already stored (skipped by ON CONFLICT).
        pub duplicates: Counter,
        /// Logs parked in dead_letters by this replica.
        pub dead_letters: Counter,
        /// Reorgs below the safe head detected.
        pub reorgs: Counter,
        /// Ticks put off because the new blocks hold none of the stream's logs (the head follower's hints).
        pub ticks_deferred: Counter,
        /// Waits for the cursor lock that timed out (another replica was working).
        pub lock_timeouts: Counter,
        /// Ranges skipped into failed_ranges.
        pub ranges_skipped: Counter,
        /// Cursor found below what this replica last saw (rewind or failover).
        pub cursor_regressions: Counter,
        /// Ranges fetched ahead and used by the next tick.
        pub prefetch_used: Counter,
        /// Ranges fetched ahead and discarded: the cursor had moved.
        pub prefetch_discarded: Counter,
        /// Ticks by outcome.
        pub ticks: Labelled<StreamLabels, Outcome, Counter>,
        /// Duration of a tick, lock wait included.
        pub tick_duration_seconds: Histogram,
        /// Time waiting for the cursor row lock.
        pub lock_wait_seconds: Histogram,
        /// Time holding the cursor row lock (lock to commit).
        pub lock_hold_seconds: Histogram,
    }
}

/// One endpoint (redacted), for what a replica follows once per endpoint.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

crate::series! {
    /// The newHeads subscription of an endpoint's head follower.
    pub struct PushMetrics for EndpointLabels {
        /// 1 while the endpoint's newHeads subscription is live (0: its head is followed by polling).
        pub ws_connected: Gauge,
        /// New heads received over WebSocket.
        pub ws_heads: Counter,
        /// Live newHeads subscriptions that were lost.
        pub ws_drops: Counter,
    }
}

impl PushObserver for PushMetrics {
    fn head(&self) {
        self.ws_heads.inc();
    }

    fn live(&self, live: bool) {
        self.ws_connected.set(i64::from(live));
        if !live {
            self.ws_drops.inc();
        }
    }
}

/// One request's endpoint (redacted), method and result kind (`ok` or the error's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcRequest {
    pub endpoint: String,
    pub method: &'static str,
    pub kind: &'static str,
}

/// One endpoint (redacted) and method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcCall {
    pub endpoint: String,
    pub method: &'static str,
}

crate::series! {
    /// JSON-RPC requests of every stream, by endpoint.
    pub struct RpcMetrics for NoLabels {
        /// JSON-RPC requests by endpoint, method and result kind.
        pub rpc_requests: Labelled<NoLabels, RpcRequest, Counter>,
        /// JSON-RPC request latency.
        pub rpc_latency_seconds: Labelled<NoLabels, RpcCall, Histogram>,
    }
}

impl RpcObserver for RpcMetrics {
    fn observe(&self, endpoint: &str, method: &'static str, result: Result<(), &ChainErrorKind>, latency: Duration) {
        let kind = match result {
            Ok(()) => "ok",
            Err(k) => k.label(),
        };
        let endpoint = endpoint.to_string();
        self.rpc_latency_seconds
            .with(RpcCall {
                endpoint: endpoint.clone(),
                method,
            })
            .observe(latency.as_secs_f64());
        self.rpc_requests.with(RpcRequest { endpoint, method, kind }).inc();
    }
}

/// Saturates: a block number past `i64::MAX` is not a real chain's.
pub fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Registry;

    fn labels() -> StreamLabels {
        StreamLabels {
            stream: "burns".into(),
            chain_id: 31337,
        }
    }

    #[tokio::test]
    async fn families_render_as_prometheus_text_with_the_stream_labels() {
        let mut registry = Registry::new();
        let streams = StreamMetrics::register(&mut registry);
        let m = streams.of(&labels());
        m.lag_blocks.set(10);
        m.ticks.with(Outcome { outcome: "advanced" }).inc();
        m.ticks.with(Outcome { outcome: "advanced" }).inc();
        m.tick_duration_seconds.observe(0.020);
        m.tick_duration_seconds.observe(2.0);
        m.events_inserted.inc_by(30);
        let text = registry.encode().await;
        for want in [
            "# TYPE logcursor_events_inserted_total counter\n",
            "logcursor_events_inserted_total{stream=\"burns\",chain_id=\"31337\"} 30\n",
            "logcursor_lag_blocks{stream=\"burns\",chain_id=\"31337\"} 10\n",
            "logcursor_ticks_total{stream=\"burns\",chain_id=\"31337\",outcome=\"advanced\"} 2\n",
            "logcursor_tick_duration_seconds_bucket{stream=\"burns\",chain_id=\"31337\",le=\"0.025\"} 1\n",
            "logcursor_tick_duration_seconds_bucket{stream=\"burns\",chain_id=\"31337\",le=\"+Inf\"} 2\n",
            "logcursor_tick_duration_seconds_count{stream=\"burns\",chain_id=\"31337\"} 2\n",
            "# HELP logcursor_lock_wait_seconds Time waiting for the cursor row lock.\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(
            !text.contains("logcursor_lag_seconds{"),
            "an unknown lag is not shown as 0:\n{text}"
        );
    }

    #[tokio::test]
    async fn the_rpc_observer_counts_by_endpoint_method_and_kind() {
        let mut registry = Registry::new();
        let rpc = RpcMetrics::register(&mut registry).of(&NoLabels);
        rpc.observe("http://node/", "eth_getLogs", Ok(()), Duration::from_millis(3));
        rpc.observe(
            "http://node/",
            "eth_getLogs",
            Err(&ChainErrorKind::Timeout),
            Duration::from_secs(1),
        );
        let text = registry.encode().await;
        assert!(
            text.contains(
                "logcursor_rpc_requests_total{endpoint=\"http://node/\",method=\"eth_getLogs\",kind=\"timeout\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("logcursor_rpc_latency_seconds_count{endpoint=\"http://node/\",method=\"eth_getLogs\"} 2"),
            "{text}"
        );
    }
}
