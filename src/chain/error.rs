//! What can go wrong with a JSON-RPC request, by kind. Callers decide what
//! to do from the variant ([`ChainError::is_retryable`],
//! [`ChainError::is_endpoint_fault`], [`ChainError::refuses_the_range`]),
//! never from message text; provider prose is parsed once, in
//! [`super::range`].

use std::fmt;

use serde_json::Value;

use crate::redact::Scrubber;

/// What went wrong with a request, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainErrorKind {
    /// No answer within the deadline.
    Timeout,
    /// Could not connect, or the connection broke.
    Connect(String),
    /// The HTTP status was not 2xx.
    Http { status: u16, message: String },
    /// The node answered with a JSON-RPC error object.
    Rpc {
        code: i64,
        message: String,
        data: Option<Value>,
    },
    /// The answer is not what the protocol promises (truncated JSON, a log
    /// outside the range, a removed log, a missing field, a block hash that
    /// disagrees with the header…): never stored, retried.
    Malformed(String),
    /// The endpoint serves another chain than the stream is configured for.
    WrongChain { expected: u64, actual: u64 },
    /// The endpoint is behind: its head is below a block the tick needs.
    Lagging { head: u64, needed: u64 },
    /// One block's logs exceed what the provider serves: an alarm, since no
    /// smaller request exists. Nothing is skipped unless the stream's
    /// `on_unfetchable_range` says so.
    BlockTooLarge { block: u64, provider_message: String },
}

/// A failed request, naming method and (redacted) endpoint.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{method} to {endpoint}: {kind}")]
pub struct ChainError {
    pub method: &'static str,
    /// Redacted endpoint URL.
    pub endpoint: String,
    pub kind: ChainErrorKind,
}

impl fmt::Display for ChainErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => write!(f, "timed out"),
            Self::Connect(r) => write!(f, "connection failed: {r}"),
            Self::Http { status, message } => write!(f, "HTTP {status}: {message}"),
            Self::Rpc { code, message, .. } => write!(f, "JSON-RPC error {code}: {message}"),
            Self::Malformed(r) => write!(f, "malformed response: {r}"),
            Self::WrongChain { expected, actual } => {
                write!(
                    f,
                    "endpoint serves chain id {actual}, but the stream is configured for chain id {expected}"
                )
            }
            Self::Lagging { head, needed } => write!(f, "endpoint is behind: its head {head} is below block {needed}"),
            Self::BlockTooLarge {
                block,
                provider_message,
            } => write!(
                f,
                "the logs of the single block {block} exceed what the provider serves ({provider_message})"
            ),
        }
    }
}

impl ChainErrorKind {
    /// This error with the provider's text passed through `s`: messages,
    /// reasons and data may quote the request, API key and all (messages
    /// are cut to [`MAX_MESSAGE_CHARS`](crate::redact::MAX_MESSAGE_CHARS)).
    pub fn scrubbed(self, s: &Scrubber) -> ChainErrorKind {
        match self {
            Self::Connect(r) => Self::Connect(s.message(&r)),
            Self::Http { status, message } => Self::Http {
                status,
                message: s.message(&message),
            },
            Self::Rpc { code, message, data } => Self::Rpc {
                code,
                message: s.message(&message),
                data: data.map(|d| s.scrub_json(d)),
            },
            Self::Malformed(r) => Self::Malformed(s.message(&r)),
            Self::BlockTooLarge {
                block,
                provider_message,
            } => Self::BlockTooLarge {
                block,
                provider_message: s.message(&provider_message),
            },
            other @ (Self::Timeout | Self::WrongChain { .. } | Self::Lagging { .. }) => other,
        }
    }
}

/// JSON-RPC codes that providers use for rate limiting and overload.
pub const RATE_LIMIT_CODES: [i64; 3] = [-32005, -32016, 429];
/// Phrases of rate limiting, for providers that say it under a generic
/// code (-32000, -32007, …), some of which they also use for "too many
/// results": a message is read for these first.
pub const RATE_LIMIT_PHRASES: [&str; 5] = [
    "rate limit",
    "too many requests",
    "rate exceeded",
    "exceeded the quota",
    "capacity",
];
/// Whether a provider's message says "rate limited" in one of its ways.
pub fn says_rate_limit(message: &str) -> bool {
    let lower = message.to_lowercase();
    RATE_LIMIT_PHRASES.iter().any(|p| lower.contains(p))
}

/// "Internal error": a node's transient failure, not an answer about the request.
const INTERNAL_ERROR: i64 = -32603;

impl ChainErrorKind {
    /// A rate limit or an overload: by its code, or by its words under
    /// another code. A fault of the moment, never an answer about the range.
    pub fn is_rate_limit(&self) -> bool {
        match self {
            Self::Rpc { code, message, .. } => RATE_LIMIT_CODES.contains(code) || says_rate_limit(message),
            Self::Http { status, .. } => *status == 429,
            _ => false,
        }
    }

    /// The short name used as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect(_) => "connect",
            Self::Http { .. } => "http",
            Self::Rpc { .. } => "rpc",
            Self::Malformed(_) => "malformed",
            Self::WrongChain { .. } => "wrong_chain",
            Self::Lagging { .. } => "lagging",
            Self::BlockTooLarge { .. } => "block_too_large",
        }
    }
}

impl ChainError {
    /// Worth retrying: the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            ChainErrorKind::Timeout
            | ChainErrorKind::Connect(_)
            | ChainErrorKind::Malformed(_)
            | ChainErrorKind::Lagging { .. } => true,
            ChainErrorKind::Http { status, .. } => *status == 429 || *status >= 500,
            ChainErrorKind::Rpc { code, .. } => self.kind.is_rate_limit() || *code == INTERNAL_ERROR,
            ChainErrorKind::WrongChain { .. } | ChainErrorKind::BlockTooLarge { .. } => false,
        }
    }

    /// The endpoint, not the request, is at fault: prefer another one.
    pub fn is_endpoint_fault(&self) -> bool {
        match &self.kind {
            ChainErrorKind::Timeout | ChainErrorKind::Connect(_) | ChainErrorKind::Lagging { .. } => true,
            ChainErrorKind::Http { status, .. } => *status == 429 || *status >= 500,
            ChainErrorKind::Rpc { code, .. } => self.kind.is_rate_limit() || *code == INTERNAL_ERROR,
            ChainErrorKind::Malformed(_) => true,
            ChainErrorKind::WrongChain { .. } | ChainErrorKind::BlockTooLarge { .. } => false,
        }
    }

    /// The provider refuses this range itself, and would refuse it again
    /// from anywhere: a single block too large, or a deterministic JSON-RPC
    /// error (not a rate limit, not an internal error). Rate limits, 5xx,
    /// timeouts and malformed answers are faults of the moment or of one
    /// endpoint, never a reason to skip a range.
    pub fn refuses_the_range(&self) -> bool {
        match &self.kind {
            ChainErrorKind::BlockTooLarge { .. } => true,
            ChainErrorKind::Rpc { code, .. } => !self.kind.is_rate_limit() && *code != INTERNAL_ERROR,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: ChainErrorKind) -> ChainError {
        ChainError {
            method: "eth_getLogs",
            endpoint: "-".into(),
            kind,
        }
    }

    #[test]
    fn only_range_specific_refusals_may_skip_a_range() {
        let rpc = |code| ChainErrorKind::Rpc {
            code,
            message: "x".into(),
            data: None,
        };
        assert!(err(ChainErrorKind::BlockTooLarge {
            block: 1,
            provider_message: "x".into()
        })
        .refuses_the_range());
        assert!(err(rpc(-32000)).refuses_the_range());
        for transient in [
            ChainErrorKind::Timeout,
            ChainErrorKind::Connect("refused".into()),
            ChainErrorKind::Http {
                status: 503,
                message: "x".into(),
            },
            ChainErrorKind::Http {
                status: 429,
                message: "x".into(),
            },
            rpc(-32005),
            rpc(429),
            rpc(-32603),
            ChainErrorKind::Malformed("x".into()),
            ChainErrorKind::Lagging { head: 1, needed: 2 },
        ] {
            assert!(!err(transient.clone()).refuses_the_range(), "{transient:?}");
        }
    }

    #[test]
    fn a_rate_limit_said_under_a_generic_code_is_retried_elsewhere_never_skipped() {
        for (code, message) in [
            (-32000, "Rate limit exceeded, retry later"),
            (
                -32007,
                "100/second request limit reached - reduce calls per second or upgrade your account: too many requests",
            ),
            (-32000, "Your app has exceeded the quota of compute units"),
        ] {
            let e = err(ChainErrorKind::Rpc {
                code,
                message: message.into(),
                data: None,
            });
            assert!(!e.refuses_the_range(), "{message}");
            assert!(e.is_retryable() && e.is_endpoint_fault(), "{message}");
        }
    }
}
