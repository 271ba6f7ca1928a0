//! The chain side of the chaos run: a sender that survives reorgs (its
//! transactions may vanish with the blocks that held them), and the
//! emitter task writing burns, hostile strings and unwatched events.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::Tally;
use crate::support::{method_id, rich_calldata, rpc_call, word};

/// Notes the emitter writes as `string`s: two that jsonb cannot hold as
/// text, and some that it can.
pub const NOTES: [&[u8]; 6] = [
    b"pay\0me",
    &[0x66, 0x6f, 0xff, 0xfe, 0x00],
    &[0xc3, 0x28],
    "naïve ✓ \u{1F600}".as_bytes(),
    b"",
    b"plain",
];

/// JSON-RPC to anvil that reports errors instead of panicking: under chaos
/// a transaction may be refused (its nonce went with a reorged block).
pub struct Sender {
    http: reqwest::Client,
    url: String,
    from: String,
    /// Serialises sends and reorgs, so that nonces stay in step.
    lock: tokio::sync::Mutex<u64>,
}

impl Sender {
    pub async fn new(url: &str) -> Arc<Sender> {
        let s = Sender {
            http: reqwest::Client::new(),
            url: url.to_string(),
            from: String::new(),
            lock: tokio::sync::Mutex::new(0),
        };
        let from = s.rpc("eth_accounts", json!([])).await.expect("accounts")[0]
            .as_str()
            .expect("account")
            .to_string();
        let s = Sender { from, ..s };
        *s.lock.lock().await = s.pending_nonce().await;
        Arc::new(s)
    }

    pub async fn rpc(&self, method: &str, params: Value) -> Result<Value, String> {
        rpc_call(&self.http, &self.url, method, params).await
    }

    async fn pending_nonce(&self) -> u64 {
        let n = self
            .rpc("eth_getTransactionCount", json!([self.from, "pending"]))
            .await
            .expect("nonce");
        u64::from_str_radix(n.as_str().expect("hex").trim_start_matches("0x"), 16).expect("nonce")
    }

    /// One transaction to `to`; `false` if anvil refused it (the nonce is
    /// read again then).
    pub async fn send(&self, to: &str, data: String) -> bool {
        let mut nonce = self.lock.lock().await;
        let tx =
            json!({"from": self.from, "to": to, "data": data, "gas": "0x1e8480", "nonce": format!("{:#x}", *nonce)});
        match self.rpc("eth_sendTransaction", json!([tx])).await {
            Ok(_) => {
                *nonce += 1;
                true
            }
            Err(_) => {
                *nonce = self.pending_nonce().await;
                false
            }
        }
    }

    pub async fn mine(&self, blocks: u64) {
        let _nonce = self.lock.lock().await;
        let _ = self.rpc("anvil_mine", json!([format!("{blocks:#x}")])).await;
    }

    /// Replaces the last `depth` blocks; the first new one holds a burn of
    /// `count` events.
    pub async fn reorg(&self, emitter: &str, depth: u64, count: u64, base: u64) -> bool {
        let mut nonce = self.lock.lock().await;
        let data = format!("0x{}{}{}", method_id("burn(uint256,uint256)"), word(count), word(base));
        let tx = json!([{"from": self.from, "to": emitter, "data": data, "gas": "0x1e8480"}, 0]);
        let ok = self.rpc("anvil_reorg", json!([depth, [tx]])).await.is_ok();
        *nonce = self.pending_nonce().await;
        ok
    }

    pub async fn block_number(&self) -> i64 {
        let n = self.rpc("eth_blockNumber", json!([])).await.expect("head");
        i64::from_str_radix(n.as_str().expect("hex").trim_start_matches("0x"), 16).expect("head")
    }
}

/// Emits until `stop`: burns of 1-6 events, hostile and plain strings,
/// events no stream watches, and empty blocks, 100-400 ms apart.
pub fn start_emitter(
    sender: Arc<Sender>,
    emitter: String,
    seed: u64,
    tally: Tally,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xe417);
        let mut base = 0u64;
        while !stop.is_cancelled() {
            let roll = rng.gen_range(0..100);
            if roll < 70 {
                let count = rng.gen_range(1..=6u64);
                let data = format!("0x{}{}{}", method_id("burn(uint256,uint256)"), word(count), word(base));
                base += count;
                if sender.send(&emitter, data).await {
                    tally.add("sent: burn transactions", 1);
                    tally.add("sent: Burned events", count);
                }
            } else if roll < 85 {
                let note = NOTES[rng.gen_range(0..NOTES.len())];
                if sender.send(&emitter, rich_calldata(note)).await {
                    let hostile = note.contains(&0) || std::str::from_utf8(note).is_err();
                    tally.add(
                        if hostile {
                            "sent: hostile strings"
                        } else {
                            "sent: plain strings"
                        },
                        1,
                    );
                }
            } else if roll < 90 {
                let data = format!("0x{}{}", method_id("unlisted(uint256)"), word(base));
                if sender.send(&emitter, data).await {
                    tally.add("sent: unwatched events", 1);
                }
            } else {
                sender.mine(rng.gen_range(1..=3)).await;
            }
            let pause = Duration::from_millis(rng.gen_range(100..400));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => {}
            }
        }
    })
}
