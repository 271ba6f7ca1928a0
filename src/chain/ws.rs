//! The push wake-up: an `eth_subscribe("newHeads")` over WebSocket that
//! wakes a stream's poll loop as soon as a block arrives.
//!
//! A hint, never a source of truth: a head only starts a tick sooner, and
//! the tick reads everything it stores over HTTP under the cursor lock as
//! always. While the subscription is live the loop still polls every
//! `ws_poll_interval` (a safety net for a subscription that stalls
//! silently); while it is down, every `poll_interval`, as without push. A
//! dropped subscription is reconnected with the [`CONNECT`] backoff,
//! rotating through `ws_urls`.
//!
//! A socket that goes silent is given up after [`SILENT_FOR`]: one deadline,
//! moved only by a frame received (a head, a pong), never by our own pings.
//!
//! URLs are secrets (API keys live in them): only their redacted form is
//! ever printed, and error texts are scrubbed of the raw URL.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::CONNECT;
use crate::redact::{redact_url, Secret};

/// A connection attempt, or the subscription's confirmation, must come within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A ping goes out this often, so a quiet chain is told from a dead socket.
const PING_EVERY: Duration = Duration::from_secs(20);
/// No message at all (not even a pong) for this long: the socket is dead.
const SILENT_FOR: Duration = Duration::from_secs(60);

/// What the subscription tells the poll loop, and what metrics show of it.
#[derive(Debug, Default)]
pub struct Push {
    wake: Notify,
    connected: AtomicBool,
    /// New heads received.
    pub heads: AtomicU64,
    /// Live subscriptions that were lost.
    pub drops: AtomicU64,
}

impl Push {
    /// Whether a subscription is live now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Resolves at the next head (or at once if one came since the last
    /// call), or when the subscription drops.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Either way, the loop is woken to tick and choose its wait anew
    /// (`poll_interval` without a subscription, `ws_poll_interval` with).
    fn set_connected(&self, live: bool) {
        let was = self.connected.swap(live, Ordering::Relaxed);
        if was != live {
            if was {
                self.drops.fetch_add(1, Ordering::Relaxed);
            }
            self.wake.notify_one();
        }
    }
}

/// Keeps a `newHeads` subscription for `stream` on one of `urls` until `cancel`.
pub async fn subscribe(stream: String, urls: Vec<Secret>, push: Arc<Push>, cancel: CancellationToken) {
    if urls.is_empty() {
        return cancel.cancelled().await;
    }
    let mut failures = 0u32;
    for url in urls.iter().cycle() {
        let shown = redact_url(url.expose());
        let ended = tokio::select! {
            r = run_once(url, &push).instrument(tracing::info_span!("ws", stream = %stream, endpoint = %shown)) => r,
            _ = cancel.cancelled() => break,
        };
        let was_live = push.connected();
        push.set_connected(false);
        match ended {
            Ok(()) => {
                tracing::warn!(stream = %stream, endpoint = %shown, "newHeads subscription closed; polling every poll_interval until it is back")
            }
            Err(e) => {
                let e = e.replace(url.expose(), &shown);
                tracing::warn!(stream = %stream, endpoint = %shown, error = %e, "newHeads subscription failed; polling every poll_interval until it is back");
            }
        }
        failures = if was_live { 1 } else { failures.saturating_add(1) };
        let wait = CONNECT.delay(failures);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => break,
        }
    }
    push.set_connected(false);
}

/// One connection: subscribe, then wake the loop on every head until the
/// socket ends (`Ok`) or fails (`Err`, a message without the URL's secret
/// parts once scrubbed by the caller).
async fn run_once(url: &Secret, push: &Push) -> Result<(), String> {
    let (mut socket, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url.expose()))
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe", "params": ["newHeads"]});
    socket
        .send(Message::Text(request.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let mut subscription: Option<String> = None;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await; // the first tick is immediate
                       // One deadline for the socket's silence, moved only when a frame arrives.
    let silence = tokio::time::sleep(CONNECT_TIMEOUT);
    tokio::pin!(silence);
    loop {
        let message = tokio::select! {
            m = socket.next() => m,
            _ = ping.tick() => {
                socket.send(Message::Ping(Vec::new())).await.map_err(|e| e.to_string())?;
                continue;
            }
            _ = &mut silence => {
                return Err(match subscription {
                    None => "eth_subscribe was not answered".into(),
                    Some(_) => format!("nothing received for {SILENT_FOR:?}"),
                });
            }
        };
        let message = match message {
            None => return Ok(()),
            Some(m) => m.map_err(|e| e.to_string())?,
        };
        if subscription.is_some() {
            silence.as_mut().reset(tokio::time::Instant::now() + SILENT_FOR);
        }
        let text = match message {
            Message::Text(t) => t,
            Message::Close(_) => return Ok(()),
            _ => continue, // pings are answered by the library; pongs just prove life
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return Err("a message that is not JSON".into());
        };
        match &subscription {
            None => {
                if let Some(err) = v.get("error") {
                    return Err(format!("eth_subscribe refused: {err}"));
                }
                let id = v
                    .get("result")
                    .and_then(Value::as_str)
                    .ok_or("eth_subscribe answered without an id")?;
                subscription = Some(id.to_string());
                silence.as_mut().reset(tokio::time::Instant::now() + SILENT_FOR);
                push.set_connected(true);
                tracing::info!("newHeads subscription live; a new block starts a tick at once");
            }
            Some(id) => {
                let params = &v["params"];
                if v["method"] == "eth_subscription" && params["subscription"].as_str() == Some(id.as_str()) {
                    push.heads.fetch_add(1, Ordering::Relaxed);
                    push.wake.notify_one();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drop_wakes_the_loop_and_is_counted_once() {
        let push = Push::default();
        push.set_connected(true);
        push.set_connected(false);
        push.set_connected(false);
        assert_eq!(push.drops.load(Ordering::Relaxed), 1);
        tokio::time::timeout(Duration::from_secs(1), push.woken())
            .await
            .expect("the drop woke the loop");
    }

    /// A WebSocket server on a free port that confirms the subscription,
    /// sends `heads` heads `every` apart, then falls silent: it holds the
    /// socket but reads nothing, so it answers no ping either.
    async fn server(heads: u32, every: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("handshake");
            let _subscribe = ws.next().await;
            let confirm = json!({"jsonrpc": "2.0", "id": 1, "result": "0xabc"});
            ws.send(Message::Text(confirm.to_string())).await.expect("send");
            for n in 0..heads {
                tokio::time::sleep(every).await;
                let head = json!({"jsonrpc": "2.0", "method": "eth_subscription",
                                  "params": {"subscription": "0xabc", "result": {"number": n}}});
                ws.send(Message::Text(head.to_string())).await.expect("send");
            }
            std::future::pending::<()>().await;
            drop(ws);
        });
        url
    }

    /// Runs one connection to `url` on paused time; how long until it
    /// gave up, and why.
    async fn until_given_up(url: &str, push: &Push) -> (Duration, String) {
        let started = tokio::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(3600), run_once(&Secret::new(url), push))
            .await
            .expect("the silence detector never fired");
        (started.elapsed(), ended.expect_err("a silent socket is an error"))
    }

    /// Checked by moving the deadline in the ping arm too (as one timeout
    /// per wait did): our own pings then keep a dead socket alive forever.
    #[tokio::test(start_paused = true)]
    async fn a_socket_that_falls_silent_is_given_up_after_silent_for_whatever_we_send() {
        let push = Push::default();
        let (took, why) = until_given_up(&server(0, Duration::ZERO).await, &push).await;
        assert!(why.contains("nothing received"), "{why}");
        assert!(push.connected(), "the subscription was live until then");
        assert!(
            took >= SILENT_FOR && took < SILENT_FOR + Duration::from_secs(1),
            "{took:?}: one deadline of {SILENT_FOR:?}, though pings went out every {PING_EVERY:?}"
        );
    }

    /// Checked by not moving the deadline on a frame: the socket is then
    /// given up while heads still arrive.
    #[tokio::test(start_paused = true)]
    async fn each_frame_received_moves_the_deadline_and_nothing_else_does() {
        let push = Push::default();
        let every = SILENT_FOR * 3 / 4;
        let (took, why) = until_given_up(&server(3, every).await, &push).await;
        assert!(why.contains("nothing received"), "{why}");
        assert_eq!(push.heads.load(Ordering::Relaxed), 3);
        let expected = every * 3 + SILENT_FOR;
        assert!(
            took >= expected && took < expected + Duration::from_secs(1),
            "{took:?}: silent for {SILENT_FOR:?} after the last of three heads {every:?} apart"
        );
    }
}
