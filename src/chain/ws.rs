//! The push wake-up: an `eth_subscribe("newHeads")` over WebSocket that
//! hands each new block's header to the endpoint's head follower
//! ([`super::heads`]) as soon as it arrives.
//!
//! A hint, never a source of truth: a head only starts a tick sooner, and
//! the tick reads everything it stores over HTTP under the cursor lock as
//! always. While the subscription is live the follower still polls every
//! `ws_poll_interval` (a safety net for a subscription that stalls
//! silently); while it is down, every `poll_interval`, as without push. A
//! dropped subscription is reconnected with the [`CONNECT`] backoff,
//! rotating through the URLs; an endpoint that never answered a
//! subscription (no WebSocket there) is said once, then retried quietly
//! every few minutes.
//!
//! A socket that goes silent is given up after [`SILENT_FOR`]: one deadline,
//! moved only by a frame received (a head, a pong), never by our own pings.
//!
//! URLs are secrets (API keys live in them): only their redacted form is
//! ever printed, and error texts are scrubbed of the raw URL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::{Backoff, CONNECT};
use crate::redact::{redact_url, Scrubber, Secret};
use crate::types::{Hash32, Header};

/// A connection attempt, or the subscription's confirmation, must come within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A ping goes out this often, so a quiet chain is told from a dead socket.
const PING_EVERY: Duration = Duration::from_secs(20);
/// No message at all (not even a pong) for this long: the socket is dead.
const SILENT_FOR: Duration = Duration::from_secs(60);

/// Told about the subscription (for metrics): chain knows no metrics.
pub trait PushObserver: Send + Sync {
    /// A new head arrived.
    fn head(&self);
    /// The subscription went live (`true`) or was lost (`false`).
    fn live(&self, live: bool);
}

/// What the subscription tells the poll loop. Owned by the stream's
/// poller; the subscription task holds a clone.
#[derive(Default)]
pub struct Push {
    wake: Notify,
    connected: AtomicBool,
    observer: Option<Arc<dyn PushObserver>>,
    /// The last header pushed, until the follower takes it. std Mutex:
    /// only swapped.
    pushed: std::sync::Mutex<Option<Header>>,
}

impl std::fmt::Debug for Push {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Push").field("connected", &self.connected()).finish()
    }
}

impl Push {
    /// A wake-up whose subscription reports to `observer`.
    pub fn observed(observer: Arc<dyn PushObserver>) -> Push {
        Push {
            observer: Some(observer),
            ..Push::default()
        }
    }

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
            if let Some(o) = &self.observer {
                o.live(live);
            }
            self.wake.notify_one();
        }
    }

    /// A new head: wakes the loop (for the loop's tests).
    #[cfg(test)]
    pub(crate) fn head(&self) {
        self.head_at(None);
    }

    /// A new head, with its header when the message carried one.
    fn head_at(&self, header: Option<Header>) {
        if let Some(o) = &self.observer {
            o.head();
        }
        if header.is_some() {
            *self.pushed.lock().unwrap_or_else(|p| p.into_inner()) = header;
        }
        self.wake.notify_one();
    }

    /// The header pushed since the last call, if any.
    pub fn take_pushed(&self) -> Option<Header> {
        self.pushed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Reconnecting to an endpoint whose subscription never went live (most
/// likely it has no WebSocket): quietly, a few times an hour.
const NEVER_LIVE: Backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(300));

/// Keeps a `newHeads` subscription on one of `urls` until `cancel`;
/// `label` names what it serves in logs.
pub async fn subscribe(label: String, urls: Vec<Secret>, push: Arc<Push>, cancel: CancellationToken) {
    if urls.is_empty() {
        return cancel.cancelled().await;
    }
    let mut failures = 0u32;
    let mut ever_live = false;
    let mut said_unavailable = false;
    for url in urls.iter().cycle() {
        let shown = redact_url(url.expose());
        let ended = tokio::select! {
            r = run_once(url, &push).instrument(tracing::info_span!("ws", follows = %label, endpoint = %shown)) => r,
            _ = cancel.cancelled() => break,
        };
        let was_live = push.connected();
        ever_live |= was_live;
        push.set_connected(false);
        let error = match ended {
            Ok(()) => "the socket closed".to_string(),
            Err(e) => Scrubber::for_url(url.expose()).scrub(&e),
        };
        if ever_live {
            tracing::warn!(follows = %label, endpoint = %shown, %error, "newHeads subscription lost; polling every poll_interval until it is back");
        } else if !said_unavailable {
            said_unavailable = true;
            tracing::info!(follows = %label, endpoint = %shown, %error, "no newHeads subscription here; following heads by polling (retried quietly)");
        } else {
            tracing::debug!(follows = %label, endpoint = %shown, %error, "newHeads subscription still unavailable");
        }
        failures = if was_live { 1 } else { failures.saturating_add(1) };
        let wait = if ever_live {
            CONNECT.delay(failures)
        } else {
            NEVER_LIVE.delay(failures)
        };
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
                tracing::info!("newHeads subscription live; a new block wakes its streams at once");
            }
            Some(id) => {
                let params = &v["params"];
                if v["method"] == "eth_subscription" && params["subscription"].as_str() == Some(id.as_str()) {
                    push.head_at(header_of(&params["result"]));
                }
            }
        }
    }
}

/// The header a `newHeads` notification carries (`None` if it lacks a field).
fn header_of(v: &Value) -> Option<Header> {
    let quantity = |k: &str| u64::from_str_radix(v[k].as_str()?.trim_start_matches("0x"), 16).ok();
    let hash = |k: &str| {
        let mut out = [0u8; 32];
        hex::decode_to_slice(v[k].as_str()?.trim_start_matches("0x"), &mut out).ok()?;
        Some(Hash32(out))
    };
    Some(Header {
        number: quantity("number")?,
        hash: hash("hash")?,
        parent_hash: hash("parentHash")?,
        timestamp: quantity("timestamp")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pushed_head_carries_its_header() {
        let h = header_of(&json!({
            "number": "0x1b4", "hash": format!("0x{}", "ab".repeat(32)),
            "parentHash": format!("0x{}", "cd".repeat(32)), "timestamp": "0x10"
        }))
        .expect("a header");
        assert_eq!(
            (h.number, h.hash, h.parent_hash, h.timestamp),
            (436, Hash32([0xab; 32]), Hash32([0xcd; 32]), 16)
        );
        assert_eq!(header_of(&json!({"number": "0x1"})), None);
    }

    #[derive(Default)]
    struct Count {
        heads: std::sync::atomic::AtomicU32,
        drops: std::sync::atomic::AtomicU32,
    }

    impl PushObserver for Count {
        fn head(&self) {
            self.heads.fetch_add(1, Ordering::Relaxed);
        }
        fn live(&self, live: bool) {
            if !live {
                self.drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    #[tokio::test]
    async fn a_drop_wakes_the_loop_and_is_counted_once() {
        let count = Arc::new(Count::default());
        let push = Push::observed(Arc::clone(&count) as Arc<dyn PushObserver>);
        push.set_connected(true);
        push.set_connected(false);
        push.set_connected(false);
        assert_eq!(count.drops.load(Ordering::Relaxed), 1);
        tokio::time::timeout(Duration::from_secs(1), push.woken())
            .await
            .expect("the drop woke the loop");
        push.head();
        assert_eq!(count.heads.load(Ordering::Relaxed), 1);
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
        #[derive(Default)]
        struct Heads(std::sync::atomic::AtomicU64);
        impl PushObserver for Heads {
            fn head(&self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
            fn live(&self, _: bool) {}
        }
        let heads = Arc::new(Heads::default());
        let push = Push::observed(Arc::clone(&heads) as Arc<dyn PushObserver>);
        let every = SILENT_FOR * 3 / 4;
        let (took, why) = until_given_up(&server(3, every).await, &push).await;
        assert!(why.contains("nothing received"), "{why}");
        assert_eq!(heads.0.load(Ordering::Relaxed), 3);
        let expected = every * 3 + SILENT_FOR;
        assert!(
            took >= expected && took < expected + Duration::from_secs(1),
            "{took:?}: silent for {SILENT_FOR:?} after the last of three heads {every:?} apart"
        );
    }
}
