//! One `[[streams.webhooks]]` table: where a stream's new events are POSTed
//! through the outbox (see `crate::delivery`).

use std::time::Duration;

use super::fields::{read_secret, Fields};
use super::Problem;
use crate::redact::Secret;

/// One webhook of a stream.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Unique within its stream; part of every delivery.
    pub name: String,
    /// Where deliveries are POSTed (a secret: its query may hold a key).
    pub url: Secret,
    /// The HMAC-SHA256 key of `X-Logcursor-Signature`, when set.
    pub secret: Option<Secret>,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// Deadline of one POST.
    pub timeout: Duration,
    /// Events per delivery.
    pub batch_size: usize,
    /// Deliver in commit order, one at a time (a failing delivery holds
    /// back the later ones); `false`: independently, several at once.
    pub ordered: bool,
    /// How long the record of a delivery is kept (without its body): a
    /// rewind within this time sends a revert of the events it removes.
    pub keep_delivered: Duration,
    /// The retry schedule: `backoff` doubling up to `backoff_max` (a
    /// receiver's longer `Retry-After` wins).
    pub backoff: crate::backoff::Backoff,
}

pub(super) fn parse(table: &toml::Table, prefix: &str, problems: &mut Vec<Problem>) -> Option<WebhookConfig> {
    let mut f = Fields::new(table, prefix, problems);
    let name: Option<String> = f.required("name");
    let name = name.filter(|n| {
        let ok = !n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !ok {
            f.problem("name", format!("must be 1-63 characters of [A-Za-z0-9_.-], got {n:?}"));
        }
        ok
    });
    let url_text: Option<String> = f.optional("url");
    let url_file = f.secret_file("url_file");
    let url = match (url_text, url_file) {
        (Some(u), None) => Some(Secret::new(u)),
        (None, Some(u)) => Some(u),
        (None, None) => {
            f.problem("url", "required (or url_file)".into());
            None
        }
        (Some(_), Some(_)) => {
            f.problem("url", "give url or url_file, not both".into());
            None
        }
    };
    let url = url.filter(|u| match url::Url::parse(u.expose()) {
        Ok(p) if matches!(p.scheme(), "http" | "https") && p.host_str().is_some() => true,
        // The message never repeats the URL: its query may hold a key.
        _ => {
            f.problem("url", "must be an http:// or https:// URL with a host".into());
            false
        }
    });
    let secret = match (f.optional::<String>("secret"), f.optional::<String>("secret_file")) {
        (Some(s), None) => Some(Secret::new(s)),
        (None, Some(path)) => match read_secret(&path) {
            Ok(s) => Some(s),
            Err(e) => {
                f.problem("secret_file", e);
                None
            }
        },
        (None, None) => None,
        (Some(_), Some(_)) => {
            f.problem("secret", "give secret or secret_file, not both".into());
            None
        }
    };
    let max_attempts = f.int_in("max_attempts", Some(8), 1..=1000);
    let timeout = f.positive_duration("timeout", "5s");
    let batch_size = f.int_in("batch_size", Some(100), 1..=10_000);
    let ordered = f.optional::<bool>("ordered").unwrap_or(true);
    let keep_delivered = f.duration("keep_delivered", "24h");
    let backoff = f.positive_duration("backoff", "1s");
    let backoff_max = f.positive_duration("backoff_max", "5m");
    f.finish();
    Some(WebhookConfig {
        name: name?,
        url: url?,
        secret,
        max_attempts: u32::try_from(max_attempts?).ok()?,
        timeout: timeout?,
        batch_size: usize::try_from(batch_size?).ok()?,
        ordered,
        keep_delivered: keep_delivered?,
        backoff: crate::backoff::Backoff::new(backoff?, backoff_max?),
    })
}
