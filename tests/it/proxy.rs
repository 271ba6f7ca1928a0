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
//! [`PgTap`] sits in front of PostgreSQL instead and counts what a client
//! asks for: the most `SAVEPOINT`s any one of its transactions took.

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
        let (r, s, upstream) = (rule.clone(), seen.clone(), upstream.to_string());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (r, s, http, upstream) = (r.clone(), s.clone(), http.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, r, s, http, upstream).await;
                });
            }
        });
        Proxy { url, rule, seen, task }
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

    pub fn forget(&self) {
        self.seen.lock().expect("seen lock").clear();
    }
}

async fn serve(
    mut conn: TcpStream,
    rule: Arc<Mutex<Rule>>,
    seen: Arc<Mutex<Vec<Value>>>,
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

/// A TCP proxy that can cut every connection through it and refuse new
/// ones until restored: a WebSocket endpoint going away and coming back.
pub struct TcpProxy {
    pub port: u16,
    refusing: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (r, c) = (Arc::clone(&refusing), Arc::clone(&connections));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if r.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(task);
            }
        });
        TcpProxy {
            port,
            refusing,
            connections,
            accept,
        }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.refusing.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Connections accepted and passed on since the start (or the last cut).
    pub fn accepted(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A TCP proxy in front of PostgreSQL that reads what its clients send
/// (the frontend half of the wire protocol: simple queries and Parse
/// messages) and counts the `SAVEPOINT`s of each transaction; it keeps the
/// most that any one transaction took.
pub struct PgTap {
    pub port: u16,
    most: Arc<std::sync::atomic::AtomicU32>,
    /// The next statement containing this (upper case) closes its
    /// connection instead of reaching the server (the server going away),
    /// or reaches it only after a pause (a client that stalls).
    cut_on: Arc<Mutex<Option<(String, Trap)>>>,
    cuts: Arc<std::sync::atomic::AtomicU32>,
    accept: tokio::task::JoinHandle<()>,
}

impl PgTap {
    /// A tap in front of the server `db_url` names.
    pub async fn start(db_url: &str) -> PgTap {
        let u = url::Url::parse(db_url).expect("database url");
        let upstream = format!("{}:{}", u.host_str().expect("host"), u.port().unwrap_or(5432));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let most = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let cut_on: Arc<Mutex<Option<(String, Trap)>>> = Arc::default();
        let cuts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (m, c, n) = (Arc::clone(&most), Arc::clone(&cut_on), Arc::clone(&cuts));
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let counters = (Arc::clone(&m), Arc::clone(&c), Arc::clone(&n));
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&upstream).await {
                        let _ = tap(inbound, outbound, counters).await;
                    }
                });
            }
        });
        PgTap {
            port,
            most,
            cut_on,
            cuts,
            accept,
        }
    }

    /// The next statement containing `sql` closes its connection instead.
    pub fn cut_once_on(&self, sql: &str) {
        *self.cut_on.lock().expect("cut lock") = Some((sql.to_uppercase(), Trap::Cut));
    }

    /// The next statement containing `sql` reaches the server `after` a
    /// pause: its session sits idle meanwhile, as if its client froze.
    pub fn delay_once_on(&self, sql: &str, after: Duration) {
        *self.cut_on.lock().expect("cut lock") = Some((sql.to_uppercase(), Trap::Delay(after)));
    }

    /// Connections closed by [`PgTap::cut_once_on`].
    pub fn cuts(&self) -> u32 {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `db_url` through the tap.
    pub fn url(&self, db_url: &str) -> String {
        let mut u = url::Url::parse(db_url).expect("database url");
        u.set_port(Some(self.port)).expect("port");
        u.to_string()
    }

    /// The most `SAVEPOINT`s one transaction has taken so far.
    pub fn most_savepoints(&self) -> u32 {
        self.most.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for PgTap {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What [`PgTap`] does to a statement it was told to watch for.
#[derive(Clone, Copy)]
enum Trap {
    Cut,
    Delay(Duration),
}

type TapState = (
    Arc<std::sync::atomic::AtomicU32>,
    Arc<Mutex<Option<(String, Trap)>>>,
    Arc<std::sync::atomic::AtomicU32>,
);

/// Copies both ways; reads the client's messages on the way.
async fn tap(inbound: TcpStream, outbound: TcpStream, (most, cut_on, cuts): TapState) -> std::io::Result<()> {
    let (mut client_rx, mut client_tx) = inbound.into_split();
    let (mut server_rx, mut server_tx) = outbound.into_split();
    let down = tokio::spawn(async move { tokio::io::copy(&mut server_rx, &mut client_tx).await });
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16384];
    let (mut started, mut savepoints) = (false, 0u32);
    loop {
        let n = client_rx.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let (mut cut, mut pause) = (false, None);
        loop {
            // Before start-up completes, messages have no type byte.
            let skip = usize::from(started);
            let Some(len) = buf
                .get(skip..skip + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            else {
                break;
            };
            if buf.len() < skip + len {
                break;
            }
            let message: Vec<u8> = buf.drain(..skip + len).collect();
            if !started {
                // SSLRequest and GSSENCRequest come before the startup message.
                let code = u32::from_be_bytes([message[4], message[5], message[6], message[7]]);
                started = !matches!(code, 80_877_103 | 80_877_104);
                continue;
            }
            let sql = match message[0] {
                b'Q' => &message[5..],
                // Parse: the statement's name, then its text.
                b'P' => match message[5..].iter().position(|b| *b == 0) {
                    Some(i) => &message[5 + i + 1..],
                    None => continue,
                },
                _ => continue,
            };
            let sql = String::from_utf8_lossy(sql.split(|b| *b == 0).next().unwrap_or_default()).to_uppercase();
            let mut wanted = cut_on.lock().expect("cut lock");
            if let Some((_, trap)) = wanted.as_ref().filter(|(w, _)| sql.contains(w.as_str())) {
                match *trap {
                    Trap::Cut => {
                        cut = true;
                        cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Trap::Delay(d) => pause = Some(d),
                }
                *wanted = None;
            }
            drop(wanted);
            for statement in sql.split(';').map(str::trim) {
                if statement.starts_with("SAVEPOINT") {
                    savepoints += 1;
                    most.fetch_max(savepoints, std::sync::atomic::Ordering::SeqCst);
                } else if matches!(statement, "COMMIT" | "ROLLBACK" | "BEGIN")
                    || statement.starts_with("START TRANSACTION")
                {
                    savepoints = 0;
                }
            }
        }
        if cut {
            break; // both sockets close: the server is gone for this client
        }
        if let Some(d) = pause {
            tokio::time::sleep(d).await;
        }
        server_tx.write_all(&chunk[..n]).await?;
    }
    down.abort();
    Ok(())
}
