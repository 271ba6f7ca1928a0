//! Secrets that must never be printed, and the redacted forms that may be.
//!
//! The database password and API keys inside RPC URLs reach logs, spans and
//! error messages only through [`redact_url`] or [`Secret`]'s `Debug`/`Display`,
//! both of which drop the secret parts.

use std::fmt;

/// A string whose value is a credential or contains one (a database URL, an
/// RPC URL with an API key). `Debug` and `Display` print `[redacted]`; the
/// value is reachable only through [`Secret::expose`], so a stray `{:?}` in a
/// log line cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value, for the one place that needs it (a connector).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A URL safe to print: scheme, host and port are kept; user info is dropped;
/// a non-empty path and a query are replaced by `<redacted>`, because
/// providers put API keys in either (`/v2/KEY`, `?apikey=KEY`).
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(u) => {
            let mut out = format!("{}://{}", u.scheme(), u.host_str().unwrap_or("?"));
            if let Some(port) = u.port() {
                out.push_str(&format!(":{port}"));
            }
            if !(u.path().is_empty() || u.path() == "/") {
                out.push_str("/<redacted>");
            }
            if u.query().is_some() {
                out.push_str("?<redacted>");
            }
            out
        }
        // Unparseable: nothing of it is known to be safe.
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// A `reqwest` error and its causes on one line, without the URL (its path
/// or query may carry an API key or a webhook token).
pub fn describe_http_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_in_path_query_and_userinfo_are_dropped() {
        let cases = [
            (
                "https://eth-mainnet.example.com/v2/SECRETKEY",
                "https://eth-mainnet.example.com/<redacted>",
            ),
            (
                "https://node.example.com:8443/?apikey=SECRETKEY",
                "https://node.example.com:8443?<redacted>",
            ),
            ("https://user:SECRETKEY@node.example.com", "https://node.example.com"),
            ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
            ("not a url SECRETKEY", "<unparseable url>"),
        ];
        for (raw, want) in cases {
            let got = redact_url(raw);
            assert_eq!(got, want, "{raw}");
            assert!(!got.contains("SECRETKEY"));
        }
    }

    #[test]
    fn secret_never_formats_its_value() {
        let s = Secret::new("postgres://u:hunter2@h/db");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "postgres://u:hunter2@h/db");
    }
}
