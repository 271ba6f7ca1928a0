//! The chain side: an anvil per test, a JSON-RPC driver for the committed
//! test contract (tests/contracts), and the ABI bits tests build calldata
//! from.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

pub const BURNED: &str = "event Burned(address indexed from, uint256 amount)";

/// An anvil of its own, on a port it picked; killed on drop.
pub struct Anvil {
    _child: Child,
    pub url: String,
}

impl Anvil {
    pub async fn start() -> Anvil {
        Self::start_with(&[]).await
    }

    pub async fn start_with(args: &[&str]) -> Anvil {
        let bin = std::env::var("LOGCURSOR_TEST_ANVIL").unwrap_or_else(|_| "anvil".into());
        let mut child = Command::new(&bin)
            .args(["--port", "0", "--host", "127.0.0.1"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start anvil ({bin}): {e}; run the tests through scripts/test"));
        let stdout = child.stdout.take().expect("anvil stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read anvil output") {
                if let Some(addr) = line.strip_prefix("Listening on ") {
                    return addr.trim().to_string();
                }
            }
            panic!("anvil exited before listening")
        })
        .await
        .expect("anvil did not start within 30s");
        // Keep draining stdout so anvil never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Anvil {
            _child: child,
            url: format!("http://{addr}"),
        }
    }
}

/// Drives the test contract over raw JSON-RPC (anvil's accounts are
/// unlocked, so eth_sendTransaction needs no signing).
#[derive(Clone)]
pub struct Chain {
    http: reqwest::Client,
    pub url: String,
    from: String,
    /// The next nonce of `from`: explicit nonces, because anvil assigning
    /// them itself under load can leave a transaction stuck in its pool.
    nonce: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// One JSON-RPC call: its `result`, or what went wrong (transport, body or
/// the node's `error`), prefixed by the method.
pub async fn rpc_call(http: &reqwest::Client, url: &str, method: &str, params: Value) -> Result<Value, String> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let failed = |e: reqwest::Error| format!("{method}: {e}");
    let resp: Value = http
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(failed)?
        .json()
        .await
        .map_err(failed)?;
    match resp.get("error") {
        Some(e) => Err(format!("{method} failed: {e}")),
        None => Ok(resp["result"].clone()),
    }
}

/// One log as the chain reports it: (tx hash, log index, block).
pub type LogKey = (String, i64, i64);

impl Chain {
    pub async fn new(url: &str) -> Chain {
        let mut c = Chain {
            http: reqwest::Client::new(),
            url: url.to_string(),
            from: String::new(),
            nonce: Default::default(),
        };
        let accounts = c.rpc("eth_accounts", json!([])).await;
        c.from = accounts[0].as_str().expect("an account").to_string();
        let next = c.rpc("eth_getTransactionCount", json!([c.from, "pending"])).await;
        c.nonce.store(hex_i64(&next) as u64, Ordering::SeqCst);
        c
    }

    /// The same chain, sending from anvil's unlocked account `index` (so
    /// that events carry another `msg.sender`), with its own nonces.
    pub async fn as_account(&self, index: usize) -> Chain {
        let mut c = self.clone();
        let accounts = c.rpc("eth_accounts", json!([])).await;
        c.from = accounts[index].as_str().expect("an account").to_string();
        let next = c.rpc("eth_getTransactionCount", json!([c.from, "pending"])).await;
        c.nonce = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(hex_i64(&next) as u64));
        c
    }

    /// The address this driver sends from, lowercase 0x-hex.
    pub fn sender(&self) -> String {
        self.from.to_lowercase()
    }

    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        rpc_call(&self.http, &self.url, method, params)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Calls the Emitter's `signature` with `args`; waits for the receipt.
    pub async fn call(&self, emitter: &str, signature: &str, args: &[crate::abi::Arg]) -> String {
        let hash = self
            .send(Some(emitter), crate::abi::calldata(&method_id(signature), args))
            .await;
        let receipt = self.receipt(&hash).await;
        assert_eq!(receipt["status"], "0x1", "{signature} reverted");
        hash
    }

    /// The timestamp of block `n`, seconds since the epoch.
    pub async fn block_time(&self, n: i64) -> i64 {
        let b = self
            .rpc("eth_getBlockByNumber", json!([format!("{n:#x}"), false]))
            .await;
        hex_i64(&b["timestamp"])
    }

    /// Sends a transaction with calldata `data` (to `to`, or a deployment).
    pub async fn send(&self, to: Option<&str>, data: String) -> String {
        self.send_with_gas(to, data, 1_000_000).await
    }

    async fn send_with_gas(&self, to: Option<&str>, data: String, gas: u64) -> String {
        let nonce = self.nonce.fetch_add(1, Ordering::SeqCst);
        let mut tx =
            json!({"from": self.from, "data": data, "gas": format!("{gas:#x}"), "nonce": format!("{nonce:#x}")});
        if let Some(to) = to {
            tx["to"] = json!(to);
        }
        let hash = self.rpc("eth_sendTransaction", json!([tx])).await;
        hash.as_str().expect("tx hash").to_string()
    }

    /// Deploys the Emitter contract; returns its address.
    pub async fn deploy_emitter(&self) -> String {
        let bytecode = contract()["bytecode"].as_str().expect("bytecode").to_string();
        let hash = self.send(None, bytecode).await;
        let receipt = self.receipt(&hash).await;
        receipt["contractAddress"]
            .as_str()
            .expect("contract address")
            .to_string()
    }

    pub async fn receipt(&self, hash: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.rpc("eth_getTransactionReceipt", json!([hash])).await;
            if !r.is_null() {
                return r;
            }
            if Instant::now() > deadline {
                let tx = self.rpc("eth_getTransactionByHash", json!([hash])).await;
                let pool = self.rpc("txpool_status", json!([])).await;
                let head = self.block_number().await;
                panic!("no receipt for {hash} after 30s: tx {tx}, pool {pool}, head {head}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// One transaction emitting `count` Burned events (amounts base..).
    pub async fn burn(&self, emitter: &str, count: u64, base: u64) -> String {
        let data = format!("0x{}{}{}", method_id("burn(uint256,uint256)"), word(count), word(base));
        self.send(Some(emitter), data).await
    }

    /// One transaction emitting thousands of Burned events (8M gas: at most
    /// three such fit a block), waiting for its receipt.
    pub async fn burn_many(&self, emitter: &str, count: u64, base: u64) {
        let data = format!("0x{}{}{}", method_id("burn(uint256,uint256)"), word(count), word(base));
        let hash = self.send_with_gas(Some(emitter), data, 8_000_000).await;
        let receipt = self.receipt(&hash).await;
        assert_eq!(receipt["status"], "0x1", "burn of {count} events ran out of gas");
    }

    /// One transaction emitting an event that no test configures.
    pub async fn unlisted(&self, emitter: &str, value: u64) -> String {
        let data = format!("0x{}{}", method_id("unlisted(uint256)"), word(value));
        self.send(Some(emitter), data).await
    }

    /// `txs` transactions (one block each under automine), the i-th emitting
    /// `per_tx(i)` events. Returns the number of events emitted.
    pub async fn emit_burns(&self, emitter: &str, txs: u64, per_tx: impl Fn(u64) -> u64) -> u64 {
        let mut total = 0;
        let mut last = String::new();
        for i in 0..txs {
            let n = per_tx(i);
            last = self.burn(emitter, n, total).await;
            total += n;
        }
        if !last.is_empty() {
            self.receipt(&last).await;
        }
        total
    }

    /// Replaces the last `depth` blocks; each `(count, base)` becomes a burn
    /// in the first replacement block. Resyncs the nonce afterwards.
    pub async fn reorg(&self, emitter: &str, depth: u64, burns: &[(u64, u64)]) {
        let txs: Vec<Value> = burns
            .iter()
            .map(|(count, base)| {
                let data = format!(
                    "0x{}{}{}",
                    method_id("burn(uint256,uint256)"),
                    word(*count),
                    word(*base)
                );
                json!([{"from": self.from, "to": emitter, "data": data, "gas": "0xf4240"}, 0])
            })
            .collect();
        self.rpc("anvil_reorg", json!([depth, txs])).await;
        let next = self.rpc("eth_getTransactionCount", json!([self.from, "pending"])).await;
        self.nonce.store(hex_i64(&next) as u64, Ordering::SeqCst);
    }

    /// The canonical hash of block `n`.
    pub async fn block_hash(&self, n: i64) -> String {
        let b = self
            .rpc("eth_getBlockByNumber", json!([format!("{n:#x}"), false]))
            .await;
        b["hash"].as_str().expect("block hash").to_string()
    }

    pub async fn mine(&self, blocks: u64) {
        self.rpc("anvil_mine", json!([format!("{blocks:#x}")])).await;
    }

    pub async fn block_number(&self) -> i64 {
        hex_i64(&self.rpc("eth_blockNumber", json!([])).await)
    }

    /// Every Burned log of `emitter` from block 0 to `to`, as the chain has them.
    pub async fn burned_logs(&self, emitter: &str, to: i64) -> BTreeSet<LogKey> {
        if to < 0 {
            return BTreeSet::new(); // a cursor before block 0 covers nothing
        }
        let topic0 = format!("0x{}", contract_event_topic());
        let logs = self
            .rpc(
                "eth_getLogs",
                json!([{"fromBlock": "0x0", "toBlock": format!("{to:#x}"), "address": emitter, "topics": [topic0]}]),
            )
            .await;
        logs.as_array()
            .expect("logs")
            .iter()
            .map(|l| {
                (
                    l["transactionHash"].as_str().expect("tx").to_string(),
                    hex_i64(&l["logIndex"]),
                    hex_i64(&l["blockNumber"]),
                )
            })
            .collect()
    }
}

fn contract() -> Value {
    serde_json::from_str(include_str!("../../contracts/Emitter.json")).expect("Emitter.json")
}

pub fn method_id(signature: &str) -> String {
    contract()["methods"][signature]
        .as_str()
        .expect("method id")
        .to_string()
}

/// keccak256("Burned(address,uint256)"), as the chain reports it in topic0.
pub fn contract_event_topic() -> &'static str {
    "696de425f79f4a40bc6d2122ca50507f0efbeabbff86a84871b7196ab8ea8df7"
}

pub fn word(v: u64) -> String {
    format!("{v:064x}")
}

/// `bytes` as an ABI dynamic value: its length, then the bytes padded to words.
fn dynamic(bytes: &[u8]) -> String {
    let mut padded = bytes.to_vec();
    padded.resize(bytes.len().div_ceil(32) * 32, 0);
    format!("{}{}", word(bytes.len() as u64), hex::encode(padded))
}

/// Calldata of the Emitter's `rich(…)` whose `note` is exactly `note`:
/// any bytes, since the ABI does not check that a string is UTF-8.
pub fn rich_calldata(note: &[u8]) -> String {
    let blob = [0xde, 0xad];
    let (note_tail, blob_tail) = (dynamic(note), dynamic(&blob));
    let note_at = 11 * 32;
    let blob_at = note_at + note_tail.len() / 2;
    let list_at = blob_at + blob_tail.len() / 2;
    let head = [
        format!("{:0>64}", "aa"), // to
        "f".repeat(63) + "b",     // delta = -5
        word(7),                  // id
        "f".repeat(63) + "d",     // small = -3
        "ab".repeat(32),          // tag
        word(1),                  // flag
        word(note_at as u64),     // note
        word(blob_at as u64),     // blob
        word(list_at as u64),     // list
        word(9),                  // pair.a
        format!("{:0>64}", "bb"), // pair.b
    ]
    .concat();
    let list = format!("{}{}{}", word(2), word(1), word(2));
    format!(
        "0x{}{head}{note_tail}{blob_tail}{list}",
        method_id("rich(address,int256,uint256,int64,bytes32,bool,string,bytes,uint256[],(uint256,address))")
    )
}

pub fn hex_i64(v: &Value) -> i64 {
    let s = v.as_str().expect("hex quantity");
    i64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex number")
}
