//! RPC faults between the replicas and anvil, decided from the seed: per
//! HTTP request, 503s and requests never answered; per eth_getLogs call,
//! bodies cut short, a backend behind the head (the header of a request's
//! end missing, its last block's logs too), and reorganisations made while
//! a replica's logs request is held, most of them deeper than the stream's
//! confirmations.
//!
//! The proxy hands its rule the calls of a batch one after the other, and
//! a replica numbers the calls of a batch consecutively: a call whose id
//! follows the last one belongs to the same request and shares its fate,
//! so a batch of 128 headers fails as often as a single call does.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::time::Instant;

use super::world::Sender;
use super::Tally;
use crate::support::hex_i64;
use crate::support::proxy::{log_range, method_of, Action, Proxy};

/// Reorgs at most this often: each one costs every replica a tick or a rewind.
const REORG_EVERY: Duration = Duration::from_secs(4);

/// Installs the fault rule on `proxy`; faults are injected while `on` is set.
pub fn install(
    proxy: &Proxy,
    seed: u64,
    sender: Arc<Sender>,
    emitter: String,
    confirmations: u64,
    tally: Tally,
    on: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17);
    let lagging: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut last_reorg = Instant::now();
    let mut reorg_base = 1_000_000u64;
    let (mut last_id, mut request_fault) = (0u64, 0u32);
    proxy.set(move |r| {
        if !on.load(Ordering::Relaxed) {
            return Action::Forward;
        }
        let id = r["id"].as_u64().unwrap_or(0);
        if id != last_id.wrapping_add(1) {
            // A new HTTP request.
            request_fault = rng.gen_range(0..1000);
            match request_fault {
                0..20 => tally.add("fault: HTTP 503", 1),
                20..25 => tally.add("fault: hang (client deadline)", 1),
                _ => {}
            }
        }
        last_id = id;
        match request_fault {
            0..20 => return Action::Reply(503, "upstream unavailable".into()),
            20..25 => return Action::Hang,
            _ => {}
        }
        let roll: u32 = rng.gen_range(0..1000);
        if let Some((_, to)) = log_range(r) {
            if roll < 20 {
                tally.add("fault: truncated body", 1);
                return Action::Reply(200, r#"[{"jsonrpc":"2.0","id":1,"result":[{"address":"0x"#.into());
            }
            if roll < 40 {
                // The header travels first in the same batch (id - 1).
                tally.add("fault: lagging backend", 1);
                lagging.lock().unwrap().insert(id.saturating_sub(1));
                return Action::Rewrite(Box::new(move |mut v: Value| {
                    if let Some(logs) = v["result"].as_array_mut() {
                        logs.retain(|l| (hex_i64(&l["blockNumber"]) as u64) < to);
                    }
                    v
                }));
            }
            if roll < 100 && last_reorg.elapsed() >= REORG_EVERY {
                last_reorg = Instant::now();
                let depth = rng.gen_range(1..=2 * confirmations + 2);
                let count = rng.gen_range(1..=4u64);
                reorg_base += 100;
                let (sender, emitter, tally, base) = (Arc::clone(&sender), emitter.clone(), tally.clone(), reorg_base);
                return Action::After(Box::pin(async move {
                    if sender.reorg(&emitter, depth, count, base).await {
                        tally.add("fault: reorg during a tick", 1);
                        if depth > confirmations {
                            tally.add("fault: reorg deeper than confirmations", 1);
                        }
                    }
                }));
            }
        }
        if method_of(r) == "eth_getBlockByNumber" {
            let lagging = Arc::clone(&lagging);
            return Action::Rewrite(Box::new(move |mut v: Value| {
                if lagging.lock().unwrap().remove(&id) {
                    v["result"] = Value::Null;
                }
                v
            }));
        }
        Action::Forward
    });
}
