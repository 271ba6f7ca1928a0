//! A fault-injecting JSON-RPC proxy in front of anvil: each call goes
//! through a rule that forwards it, answers with an error, rewrites the
//! answer, sends a broken body, or never answers. Every call is recorded.
//! A JSON-RPC batch is split into its calls, each through the rule: the
//! forwarded ones go to anvil as one batch, the answers are put back in
//! order; a call that hangs, or is answered with a non-200 status or a
//! body that is not JSON, decides the fate of its whole batch (as a real
//! backend's failure would).
//! HTTP/1.1 with `Connection: close`: one request per connection keeps it
//! small, and reqwest simply opens a new connection each time.
//!
//! The TCP-level proxies (a WebSocket endpoint that goes away, PostgreSQL
//! behind a tap) are in [`super::tap`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What to do with one request.
pub enum Action {
    Forward,
    /// Answer with this HTTP status and body, without asking anvil.
    Reply(u16, String),
    /// Forward, then rewrite anvil's JSON answer.
    Rewrite(Rewriter),
    /// Never answer (the client's deadline fires).
    Hang,
    /// Forward once this is done: a delay, or a change to the chain made
    /// while the request is held (a reorg between two answers of a tick).
    After(Pending),
}

type Rule = Box<dyn FnMut(&Value) -> Action + Send>;
type Rewriter = Box<dyn FnOnce(Value) -> Value + Send>;
pub type Pending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Forwards after `d`: a slow provider.
pub fn delayed(d: Duration) -> Action {
    Action::After(Box::pin(tokio::time::sleep(d)))
}

pub struct Proxy {
    pub url: String,
    rule: Arc<Mutex<Rule>>,
    seen: Arc<Mutex<Vec<Value>>>,
    /// Every HTTP request's calls (a batch's, or the one call).
    requests: Arc<Mutex<Vec<Vec<Value>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The method of a call (of its first element, for a batch).
pub fn method_of(request: &Value) -> &str {
    let first = request.as_array().and_then(|a| a.first()).unwrap_or(request);
    first["method"].as_str().unwrap_or("")
}

/// `(from, to)` of an eth_getLogs request.
pub fn log_range(request: &Value) -> Option<(u64, u64)> {
    if method_of(request) != "eth_getLogs" {
        return None;
    }
    let filter = &request["params"][0];
    let num = |k: &str| u64::from_str_radix(filter[k].as_str()?.trim_start_matches("0x"), 16).ok();
    Some((num("fromBlock")?, num("toBlock")?))
}

/// A JSON-RPC error answer to `request`.
pub fn rpc_error(request: &Value, code: i64, message: &str, data: Option<Value>) -> Action {
    let mut error = serde_json::json!({"code": code, "message": message});
    if let Some(d) = data {
        error["data"] = d;
    }
    let body = serde_json::json!({"jsonrpc": "2.0", "id": request["id"], "error": error});
    Action::Reply(200, body.to_string())
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy addr"));
        let rule: Arc<Mutex<Rule>> = Arc::new(Mutex::new(Box::new(|_| Action::Forward)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let http = reqwest::Client::new();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (r, s, n, upstream) = (rule.clone(), seen.clone(), requests.clone(), upstream.to_string());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (r, s, n, http, upstream) = (r.clone(), s.clone(), n.clone(), http.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, r, s, n, http, upstream).await;
                });
            }
        });
        Proxy {
            url,
            rule,
            seen,
            requests,
            task,
        }
    }

    /// Replaces the rule.
    pub fn set(&self, rule: impl FnMut(&Value) -> Action + Send + 'static) {
        *self.rule.lock().expect("rule lock") = Box::new(rule);
    }

    /// Forwards everything from now on.
    pub fn pass(&self) {
        self.set(|_| Action::Forward);
    }

    /// Every call seen so far (a batch's calls one by one), in arrival order.
    pub fn seen(&self) -> Vec<Value> {
        self.seen.lock().expect("seen lock").clone()
    }

    /// Every HTTP request so far, as its calls (a batch's, or the one).
    pub fn requests(&self) -> Vec<Vec<Value>> {
        self.requests.lock().expect("requests lock").clone()
    }

    pub fn forget(&self) {
        self.seen.lock().expect("seen lock").clear();
    }
}

async fn serve(
    mut conn: TcpStream,
    rule: Arc<Mutex<Rule>>,
    seen: Arc<Mutex<Vec<Value>>>,
    requests: Arc<Mutex<Vec<Vec<Value>>>>,
    http: reqwest::Client,
    upstream: String,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (header_end, length) = loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length);
        }
    };
    while buf.len() < header_end + length {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[header_end..header_end + length].to_vec();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    requests.lock().expect("requests lock").push(match &request {
        Value::Array(calls) => calls.clone(),
        single => vec![single.clone()],
    });
    let (status, text) = match request {
        Value::Array(calls) => {
            let Some(answer) = batch(calls, &rule, &seen, &http, &upstream).await else {
                return Ok(()); // hung
            };
            answer
        }
        single => {
            seen.lock().expect("seen lock").push(single.clone());
            let action = (rule.lock().expect("rule lock"))(&single);
            match action {
                Action::Forward => forward(&http, &upstream, &single).await,
                Action::Reply(status, text) => (status, text),
                Action::Rewrite(f) => {
                    let (status, text) = forward(&http, &upstream, &single).await;
                    let v: Value = serde_json::from_str(&text).expect("upstream json");
                    (status, f(v).to_string())
                }
                Action::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return Ok(());
                }
                Action::After(first) => {
                    first.await;
                    forward(&http, &upstream, &single).await
                }
            }
        }
    };
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

async fn forward(http: &reqwest::Client, upstream: &str, body: &Value) -> (u16, String) {
    let resp = http
        .post(upstream)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("upstream");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("upstream body"))
}

/// A batch: each call through the rule (see the module doc); `None` when it hangs.
async fn batch(
    calls: Vec<Value>,
    rule: &Arc<Mutex<Rule>>,
    seen: &Arc<Mutex<Vec<Value>>>,
    http: &reqwest::Client,
    upstream: &str,
) -> Option<(u16, String)> {
    seen.lock().expect("seen lock").extend(calls.iter().cloned());
    let actions: Vec<Action> = {
        let mut r = rule.lock().expect("rule lock");
        calls.iter().map(&mut *r).collect()
    };
    let mut answers: Vec<Option<Value>> = vec![None; calls.len()];
    let mut rewrites: Vec<(usize, Rewriter)> = Vec::new();
    let mut upstream_calls = Vec::new();
    for (i, action) in actions.into_iter().enumerate() {
        match action {
            Action::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return None;
            }
            Action::Reply(200, text) => match serde_json::from_str::<Value>(&text) {
                Ok(v) => answers[i] = Some(v),
                Err(_) => return Some((200, text)), // a broken body breaks the batch
            },
            Action::Reply(status, text) => return Some((status, text)),
            Action::Forward => upstream_calls.push((i, calls[i].clone())),
            Action::After(first) => {
                first.await;
                upstream_calls.push((i, calls[i].clone()));
            }
            Action::Rewrite(f) => {
                upstream_calls.push((i, calls[i].clone()));
                rewrites.push((i, f));
            }
        }
    }
    if !upstream_calls.is_empty() {
        let body = Value::Array(upstream_calls.iter().map(|(_, c)| c.clone()).collect());
        let (status, text) = forward(http, upstream, &body).await;
        if status != 200 {
            return Some((status, text));
        }
        let got: Vec<Value> = serde_json::from_str(&text).expect("upstream batch json");
        for (i, call) in &upstream_calls {
            answers[*i] = got.iter().find(|a| a["id"] == call["id"]).cloned();
        }
    }
    for (i, f) in rewrites {
        if let Some(a) = answers[i].take() {
            answers[i] = Some(f(a));
        }
    }
    let out: Vec<Value> = answers.into_iter().flatten().collect();
    Some((200, Value::Array(out).to_string()))
}
