//! Secrets that must never be printed, and the redacted forms that may be.
//!
//! The database password and API keys inside RPC URLs reach logs, spans and
//! error messages only through [`redact_url`] or [`Secret`]'s `Debug`/`Display`,
//! both of which drop the secret parts.
//!
//! What a server answers is not ours, and may repeat what it was sent: a
//! provider's error that quotes the request path, a webhook receiver's 404
//! page that shows its own URL. Every answer text that can reach a log, a span,
//! an error or a stored row (RPC error messages and data, HTTP error bodies,
//! webhook refusals) passes through that server's [`Scrubber`] first.

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

/// Parts of a URL's path and query shorter than this are not looked for in
/// answers: blanking every `v2` or `rpc` in a message would only hide what
/// it says. Passwords and signing secrets are looked for whatever their
/// length.
pub const MIN_SECRET_LEN: usize = 6;

/// A server's message is cut to this many characters.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// At most this much of an answer body is read for an excerpt.
const EXCERPT_WINDOW: usize = 64 * 1024;

/// Blanks, in a server's answer, everything its URL may carry as a
/// credential: the password (also as the `Authorization: Basic` value
/// sent for it) and any other secret given with [`Scrubber::with`] (a
/// webhook's signing secret), whatever their length; the user name, each
/// path segment and each query value (as written, percent-decoded, and
/// with either case of hex digits) of at least [`MIN_SECRET_LEN`]
/// characters.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// Longest first, so a secret that contains another is blanked whole.
    needles: Vec<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} parts)", self.needles.len())
    }
}

impl Scrubber {
    /// The credential-like parts of `raw`. An unparseable URL is looked for whole.
    pub fn for_url(raw: &str) -> Scrubber {
        let Ok(u) = url::Url::parse(raw) else {
            return Scrubber::default().add(vec![raw.to_string()], 1);
        };
        let mut parts = vec![raw.to_string(), u.username().to_string(), u.path().to_string()];
        parts.extend(u.query().map(str::to_string));
        parts.extend(u.path_segments().into_iter().flatten().map(str::to_string));
        let mut parts: Vec<String> = parts.into_iter().flat_map(|p| spellings(&p, false)).collect();
        for (k, v) in u.query_pairs() {
            parts.push(k.into_owned());
            parts.push(v.into_owned());
        }
        // The raw forms, as a server that echoes undecoded text shows them.
        for piece in u.query().unwrap_or_default().split('&') {
            if let Some((_, v)) = piece.split_once('=') {
                parts.extend(spellings(v, true));
            }
        }
        let mut secrets = Vec::new();
        if let Some(password) = u.password() {
            secrets.extend(spellings(password, false));
            // What the HTTP client sends for user info: Basic base64(user:password).
            let user = percent_decode(u.username(), false).unwrap_or_else(|| u.username().to_string());
            let pass = percent_decode(password, false).unwrap_or_else(|| password.to_string());
            secrets.push(base64(format!("{user}:{pass}").as_bytes()));
        }
        Scrubber::default().add(parts, MIN_SECRET_LEN).add(secrets, 1)
    }

    /// This scrubber, also blanking `secret` (whatever its length).
    pub fn with(self, secret: &Secret) -> Scrubber {
        self.add(vec![secret.expose().to_string()], 1)
    }

    fn add(mut self, parts: Vec<String>, min_len: usize) -> Scrubber {
        self.needles
            .extend(parts.into_iter().filter(|p| p.chars().count() >= min_len));
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        self.needles.dedup();
        self
    }

    /// `text` with every secret part replaced by `<redacted>`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), "<redacted>");
            }
        }
        out
    }

    /// A server's message, scrubbed and cut to [`MAX_MESSAGE_CHARS`]
    /// characters (what a log line or an error column should carry).
    pub fn message(&self, text: &str) -> String {
        let scrubbed = self.scrub(text);
        if scrubbed.chars().count() <= MAX_MESSAGE_CHARS {
            return scrubbed;
        }
        let mut cut: String = scrubbed.chars().take(MAX_MESSAGE_CHARS).collect();
        cut.push('…');
        cut
    }

    /// Every string inside a JSON value, scrubbed.
    pub fn scrub_json(&self, value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::String(s) => Value::String(self.scrub(&s)),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| self.scrub_json(v)).collect()),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (self.scrub(&k), self.scrub_json(v)))
                    .collect(),
            ),
            other => other,
        }
    }

    /// The start of an answer body on one line, at most `max_chars`
    /// characters, scrubbed before it is cut (so no secret is left half
    /// shown at the cut).
    pub fn excerpt(&self, bytes: &[u8], max_chars: usize) -> String {
        let window = &bytes[..bytes.len().min(EXCERPT_WINDOW)];
        let mut text = String::from_utf8_lossy(window).into_owned();
        if window.len() < bytes.len() {
            // A secret may straddle the window's end: drop what could be its start.
            let longest = self.needles.iter().map(|n| n.chars().count()).max().unwrap_or(0);
            let keep = text.chars().count().saturating_sub(longest);
            text = text.chars().take(keep).collect();
        }
        let scrubbed = self.scrub(&text);
        let one_line = scrubbed.split_whitespace().collect::<Vec<_>>().join(" ");
        one_line.chars().take(max_chars).collect()
    }
}

/// How `part` of a URL may be shown back: as written, percent-decoded
/// (`+` as a space too, in a query), and with its `%XX` digits in either case.
fn spellings(part: &str, query: bool) -> Vec<String> {
    let mut out = vec![part.to_string()];
    out.extend(percent_decode(part, query));
    if part.contains('%') {
        let recased = |upper: bool| {
            let mut s = String::with_capacity(part.len());
            let mut hex_left = 0;
            for ch in part.chars() {
                if ch == '%' {
                    hex_left = 2;
                    s.push(ch);
                } else if hex_left > 0 {
                    hex_left -= 1;
                    s.push(if upper {
                        ch.to_ascii_uppercase()
                    } else {
                        ch.to_ascii_lowercase()
                    });
                } else {
                    s.push(ch);
                }
            }
            s
        };
        out.push(recased(true));
        out.push(recased(false));
    }
    out.sort();
    out.dedup();
    out
}

/// `%XX` sequences decoded (and `+` as a space when `plus`, as in a
/// query); `None` when nothing changes or the result is not UTF-8.
fn percent_decode(s: &str, plus: bool) -> Option<String> {
    let spaced = if plus { s.replace('+', " ") } else { s.to_string() };
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|d| d.into_owned())
        .filter(|d| d != s)
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
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
    fn an_answer_that_repeats_the_url_or_the_secret_is_scrubbed_before_it_is_cut() {
        let s = Scrubber::for_url("https://u:p4ssw0rd-x@hooks.example.com/v2/KEY123456/in?token=T%2BOK3N99&x=1")
            .with(&Secret::new("signing-secret"));
        let body = "404: no route /v2/KEY123456/in?token=T%2BOK3N99&x=1 (token T+OK3N99, user p4ssw0rd-x) \
                    signed with signing-secret";
        let got = s.excerpt(body.as_bytes(), 1000);
        for secret in ["KEY123456", "T%2BOK3N99", "T+OK3N99", "p4ssw0rd-x", "signing-secret"] {
            assert!(!got.contains(secret), "{secret} in {got}");
        }
        // Short parts are not secrets: the message still says what it says.
        assert!(got.starts_with("404: no route <redacted>"), "{got}");
        // Cut after scrubbing: no half secret at the cut.
        let cut = s.excerpt(format!("{} KEY123456", "a".repeat(5)).as_bytes(), 10);
        assert_eq!(cut, "aaaaa <red");
        // A body longer than the window never shows a secret's start at the window's end.
        let mut long = vec![b' '; EXCERPT_WINDOW - 4];
        long.extend_from_slice(b"KEY123456");
        assert!(!s.excerpt(&long, 300).contains("KEY1"));
        // JSON data is scrubbed string by string.
        let data = serde_json::json!({"url": "https://hooks.example.com/v2/KEY123456/in", "n": [1, "KEY123456"]});
        assert!(!s.scrub_json(data).to_string().contains("KEY123456"));
    }

    #[test]
    fn passwords_and_secrets_are_scrubbed_whatever_their_length_and_however_spelled() {
        let s = Scrubber::for_url("https://alice:pw@node.example.com/v2/abc%2fdef123").with(&Secret::new("k1"));
        // What the HTTP client sent for the user info, echoed back.
        let echoed = format!("authorization: Basic {} key=k1 pw", base64(b"alice:pw"));
        let got = s.scrub(&echoed);
        assert!(
            !got.contains("YWxpY2U6cHc=") && !got.contains("k1") && !got.contains("pw"),
            "{got}"
        );
        // Percent-encoding with the other case of hex digits, and decoded.
        for shown in ["/v2/abc%2Fdef123", "abc%2fdef123", "abc/def123"] {
            assert!(!s.scrub(shown).contains("def123"), "{shown}");
        }
        // A `+` in a path is a plus, in a query a space.
        let q = Scrubber::for_url("https://h.example/a+b+c+d?token=x+y+z+w");
        assert_eq!(q.scrub("a+b+c+d x y z w"), "<redacted> <redacted>");
    }

    #[test]
    fn base64_is_the_standard_alphabet_with_padding() {
        for (raw, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), want, "{raw}");
        }
    }

    #[test]
    fn secret_never_formats_its_value() {
        let s = Secret::new("postgres://u:hunter2@h/db");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "postgres://u:hunter2@h/db");
    }
}
