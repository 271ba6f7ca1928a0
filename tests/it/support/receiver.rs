//! A real HTTP receiver for webhook tests: it records every request it gets
//! (headers and body, and what it answered) and answers by a rule the test
//! can change while it runs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use serde_json::Value;

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// Never answers (the sender's deadline fires).
    Hang,
    /// 303 See Other to `/landing`, which answers 200 to anything and
    /// counts what reaches it.
    Redirect,
    /// This status, with a body that repeats the request line and headers,
    /// as a debugging receiver's error page does (token and all).
    Echo(u16),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub idempotency_key: String,
    pub signature: Option<String>,
    pub body: String,
    pub json: Value,
    /// What the receiver answered (`None`: it hung).
    pub answered: Option<u16>,
}

type Rule = Box<dyn FnMut(&Value) -> Reply + Send>;

struct Inner {
    rule: Mutex<Rule>,
    seen: Mutex<Vec<Received>>,
    landed: std::sync::atomic::AtomicUsize,
}

/// A receiver on 127.0.0.1; stopped on drop.
pub struct Receiver {
    pub url: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let inner = Arc::new(Inner {
            rule: Mutex::new(Box::new(|_| Reply::Status(200))),
            seen: Mutex::new(Vec::new()),
            landed: Default::default(),
        });
        let app = Router::new()
            .route("/hook", post(receive))
            .route("/landing", any(land))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook?token=RECEIVER-SECRET-TOKEN"),
            inner,
            task,
        }
    }

    /// Replaces the rule (given each request's JSON body).
    pub fn set(&self, rule: impl FnMut(&Value) -> Reply + Send + 'static) {
        *self.inner.rule.lock().expect("rule") = Box::new(rule);
    }

    /// Requests that followed a redirect to `/landing`.
    pub fn landed(&self) -> usize {
        self.inner.landed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Received> {
        self.inner.seen.lock().expect("seen").clone()
    }
}

async fn land(State(inner): State<Arc<Inner>>) -> StatusCode {
    inner.landed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    StatusCode::OK
}

async fn receive(State(inner): State<Arc<Inner>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let reply = (inner.rule.lock().expect("rule"))(&json);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut record = Received {
        idempotency_key: header("idempotency-key").unwrap_or_default(),
        signature: header("x-logcursor-signature"),
        body: text,
        json,
        answered: None,
    };
    match reply {
        Reply::Hang => {
            inner.seen.lock().expect("seen").push(record);
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Reply::Status(code) => {
            record.answered = Some(code);
            inner.seen.lock().expect("seen").push(record);
            StatusCode::from_u16(code).unwrap_or(StatusCode::OK).into_response()
        }
        Reply::Echo(code) => {
            record.answered = Some(code);
            inner.seen.lock().expect("seen").push(record);
            let echoed = format!("no hook at POST {uri}\n{headers:?}");
            (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), echoed).into_response()
        }
        Reply::Redirect => {
            record.answered = Some(303);
            inner.seen.lock().expect("seen").push(record);
            (StatusCode::SEE_OTHER, [(header::LOCATION, "/landing")]).into_response()
        }
    }
}
