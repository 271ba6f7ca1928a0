//! One POST of a delivery, and what its answer means.

use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::config::webhook::WebhookConfig;
use crate::redact::Scrubber;
use crate::store::outbox::Delivery;

/// What the receiver's answer means for the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 2xx: delivered.
    Ok(u16),
    /// 429, 5xx, a timeout or a transport error: try again (not before
    /// `retry_after` when the receiver said so).
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    /// Any other status: the receiver refuses this delivery.
    Refused { status: u16, error: String },
}

impl Answer {
    pub fn status(&self) -> Option<u16> {
        match self {
            Answer::Ok(s) | Answer::Refused { status: s, .. } => Some(*s),
            Answer::Retry { status, .. } => *status,
        }
    }
}

/// `sha256=<hex>`: the HMAC-SHA256 (RFC 2104) of `body` under `key`, as
/// sent in `X-Logcursor-Signature`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(body).finalize();
    let outer = Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize();
    format!("sha256={}", hex::encode(outer))
}

/// POSTs `d.body` to the webhook.
pub(super) async fn post(http: &reqwest::Client, hook: &WebhookConfig, d: &Delivery) -> Answer {
    let mut request = http
        .post(hook.url.expose())
        .timeout(hook.timeout)
        .header("content-type", "application/json")
        .header("idempotency-key", &d.delivery_id)
        .body(d.body.clone());
    if let Some(secret) = &hook.secret {
        request = request.header(
            "x-logcursor-signature",
            sign(secret.expose().as_bytes(), d.body.as_bytes()),
        );
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            return Answer::Retry {
                status: None,
                error: describe(e),
                retry_after: None,
            }
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    if (200..300).contains(&status) {
        return Answer::Ok(status);
    }
    let excerpt = match response.bytes().await {
        Ok(b) => scrubber(hook).excerpt(&b, 300),
        Err(e) => describe(e),
    };
    let error = format!("HTTP {status}: {excerpt}");
    if status == 429 || status >= 500 {
        Answer::Retry {
            status: Some(status),
            error,
            retry_after,
        }
    } else {
        Answer::Refused { status, error }
    }
}

/// `Retry-After`: seconds, or an HTTP date; a day at most either way.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(86_400)),
    )
}

/// What a receiver must not be quoted repeating: its URL's secret parts
/// and the signing secret.
fn scrubber(hook: &WebhookConfig) -> Scrubber {
    let s = Scrubber::for_url(hook.url.expose());
    match &hook.secret {
        Some(secret) => s.with(secret),
        None => s,
    }
}

/// A transport error without the URL (its path or query may hold a key).
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    format!("{kind}: {}", crate::redact::describe_http_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231, test cases 2 and 6 (a key longer than the block).
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            sign(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First"),
            "sha256=60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
