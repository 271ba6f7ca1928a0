//! The adaptive `eth_getLogs` range: how providers say "too much", what they
//! suggest instead, and how the learned size shrinks and grows (AIMD).
//!
//! Providers cap `eth_getLogs` by blocks (2k, 10k), by results (10k), by
//! response size (150 MB) or by time, and say so in prose. The prose is the
//! protocol here, so it is parsed — once, at this boundary, into
//! [`TooLarge`]; nothing else in the crate looks at message text.
//!
//! Formats understood (a suggestion equal to the range just asked for counts
//! as none, and then the span is halved):
//! - `Try with this block range [0x…, 0x…]` (result-count caps)
//! - `this block range should work: [0x…, 0x…]` (response-size caps)
//! - `retry with the range A-B`
//! - `limited to a N range`, `up to a 2K block range`
//! - `exceed maximum block range: N`, `Max range: N`, `maximum block range of N`
//! - JSON-RPC error `data` with `from`/`to` (hex or decimal)
//! - without a suggestion: "too many results", "range too large/wide",
//!   "response size exceeded", "query timeout", HTTP 413, or our own timeout

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use super::error::ChainErrorKind;

/// An answer meaning "ask for fewer blocks".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The provider's suggested span, in blocks, when it gave a usable one.
    pub suggested_span: Option<u64>,
}

// The patterns are constants that the unit tests below exercise: a typo
// would fail them, never a user's input.
#[allow(clippy::expect_used, reason = "constant pattern, exercised by unit tests")]
static HEX_PAIR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[\s*(0x[0-9a-fA-F]+)\s*,\s*(0x[0-9a-fA-F]+)\s*\]").expect("static regex"));
#[allow(clippy::expect_used, reason = "constant pattern, exercised by unit tests")]
static DEC_PAIR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)range\s+(\d+)\s*-\s*(\d+)").expect("static regex"));
#[allow(clippy::expect_used, reason = "constant pattern, exercised by unit tests")]
static SPAN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)(?:limited to an? |up to an? |maximum block range:?\s*(?:of\s*)?|max(?:imum)? range:?\s*|block range limit(?: of)?:?\s*)(\d+)\s*(k)?",
    )
    .expect("static regex")
});

const SIZE_PHRASES: [&str; 13] = [
    "more than",
    "too many",
    "too large",
    "too big",
    "too wide",
    "range is too",
    "block range",
    "max range",
    "response size",
    "size exceeded",
    "limited to",
    "query timeout",
    "timed out",
];

/// Whether `kind`, the answer to `eth_getLogs(from, to)`, means "too much",
/// and what the provider suggested.
pub fn too_large(kind: &ChainErrorKind, from: u64, to: u64) -> Option<TooLarge> {
    let span = to - from + 1;
    let (message, data) = match kind {
        ChainErrorKind::Timeout => return (span > 1).then_some(TooLarge { suggested_span: None }),
        ChainErrorKind::Http { status: 413, .. } => return Some(TooLarge { suggested_span: None }),
        ChainErrorKind::Http { message, .. } => (message.as_str(), None),
        ChainErrorKind::Rpc { message, data, .. } => (message.as_str(), data.as_ref()),
        _ => return None,
    };
    // Rate limiting first: some providers use one code for "slow down"
    // and for "too many results" (only the words tell them apart).
    if super::error::says_rate_limit(message) {
        return None;
    }
    let lower = message.to_lowercase();
    let suggested_span = suggestion(message, data, from).filter(|s| (1..span).contains(s));
    (suggested_span.is_some() || SIZE_PHRASES.iter().any(|p| lower.contains(p))).then_some(TooLarge { suggested_span })
}

/// The suggested span, from whichever form the provider used.
fn suggestion(message: &str, data: Option<&Value>, from: u64) -> Option<u64> {
    let end_to_span = |end: u64| end.checked_sub(from).map(|d| d + 1);
    if let Some(c) = HEX_PAIR.captures(message) {
        return end_to_span(parse_hex(&c[2])?);
    }
    if let Some(c) = DEC_PAIR.captures(message) {
        return end_to_span(c[2].parse().ok()?);
    }
    if let Some(c) = SPAN.captures(message) {
        let n: u64 = c[1].parse().ok()?;
        return Some(if c.get(2).is_some() { n.saturating_mul(1000) } else { n });
    }
    let data = data?;
    let to = data.get("to")?;
    end_to_span(number(to)?)
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if s.starts_with("0x") => parse_hex(s),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The learned `eth_getLogs` span of one endpoint: multiplicative decrease
/// (or the provider's suggestion) on "too much", additive increase after
/// each success, never below one block. Shared by every stream on the
/// endpoint, each of which caps it with its own `max_block_range`; `None`
/// until the endpoint first refuses, and again once it has grown back past
/// the asker's maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdaptiveSpan {
    current: Option<u64>,
}

impl AdaptiveSpan {
    /// The span to ask for, at most `max`.
    pub fn get(&self, max: u64) -> u64 {
        self.current.unwrap_or(max).clamp(1, max.max(1))
    }

    /// After a success: grow by a tenth of `max` (at least one block).
    pub fn grow(&mut self, max: u64) {
        if let Some(c) = self.current {
            let next = c + (max / 10).max(1);
            self.current = (next < max).then_some(next);
        }
    }

    /// After "too much" for a request of `asked` blocks.
    pub fn shrink(&mut self, asked: u64, advice: TooLarge) {
        let next = advice.suggested_span.unwrap_or(asked / 2);
        self.current = Some(next.clamp(1, asked.saturating_sub(1).max(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rpc(code: i64, message: &str, data: Option<Value>) -> ChainErrorKind {
        ChainErrorKind::Rpc {
            code,
            message: message.into(),
            data,
        }
    }

    fn span_for(kind: ChainErrorKind) -> Option<Option<u64>> {
        too_large(&kind, 1000, 2999).map(|t| t.suggested_span)
    }

    #[test]
    fn every_known_provider_format_is_understood() {
        let cases: Vec<(ChainErrorKind, Option<Option<u64>>)> = vec![
            (
                rpc(-32005, "query returned more than 10000 results. Try with this block range [0x3E8, 0x4B0].", None),
                Some(Some(201)),
            ),
            (
                rpc(-32602, "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range and no limit on the response size, or you can make eth_getLogs requests with up to a 10K block range and a 150MB limit on the response size. Based on your parameters and the response size limit, this block range should work: [0x3e8, 0x44b]", None),
                Some(Some(100)),
            ),
            (rpc(-32000, "block range too large, retry with the range 1000-1499", None), Some(Some(500))),
            (rpc(-32614, "eth_getLogs is limited to a 1000 range", None), Some(Some(1000))),
            (rpc(-32000, "exceed maximum block range: 50", None), Some(Some(50))),
            (rpc(-32000, "invalid block range. Max range: 800", None), Some(Some(800))),
            (rpc(-32000, "query exceeds limits", Some(json!({"from": "0x3e8", "to": "0x3ff"}))), Some(Some(24))),
            (rpc(-32000, "block range is too wide", None), Some(None)),
            (rpc(-32000, "response size exceeded", None), Some(None)),
            (rpc(-32000, "query timeout exceeded", None), Some(None)),
            (ChainErrorKind::Http { status: 413, message: "payload".into() }, Some(None)),
            (ChainErrorKind::Timeout, Some(None)),
            // A suggestion equal to what was asked counts as none: halve.
            (rpc(-32005, "query returned more than 10000 results. Try with this block range [0x3e8, 0xbb7].", None), Some(None)),
            // Rate limits share code -32005 with result caps; they are not size errors.
            (rpc(-32005, "daily request count exceeded, request rate limited", None), None),
            (rpc(429, "Too many requests, please slow down", None), None),
            (rpc(-32601, "method not found", None), None),
            (ChainErrorKind::Connect("refused".into()), None),
        ];
        for (kind, want) in cases {
            assert_eq!(span_for(kind.clone()), want, "{kind:?}");
        }
    }

    #[test]
    fn a_timeout_on_a_single_block_is_not_a_size_error() {
        assert_eq!(too_large(&ChainErrorKind::Timeout, 7, 7), None);
    }

    #[test]
    fn the_span_halves_or_follows_the_suggestion_and_grows_back_additively() {
        let mut s = AdaptiveSpan::default();
        assert_eq!(s.get(1000), 1000, "no refusal yet: the asker's maximum");
        s.shrink(1000, TooLarge { suggested_span: None });
        assert_eq!(s.get(1000), 500);
        s.shrink(
            500,
            TooLarge {
                suggested_span: Some(120),
            },
        );
        assert_eq!(s.get(1000), 120);
        assert_eq!(s.get(50), 50, "another stream's smaller maximum caps it");
        s.grow(1000);
        assert_eq!(s.get(1000), 220);
        for _ in 0..20 {
            s.grow(1000);
        }
        assert_eq!(s.get(1000), 1000, "never above the maximum");
        s.shrink(2, TooLarge { suggested_span: None });
        assert_eq!(s.get(1000), 1);
        s.shrink(1, TooLarge { suggested_span: None });
        assert_eq!(s.get(1000), 1, "never below one block");
        s.shrink(
            10,
            TooLarge {
                suggested_span: Some(50),
            },
        );
        assert_eq!(
            s.get(1000),
            9,
            "a suggestion never grows the span past what was refused"
        );
    }
}
