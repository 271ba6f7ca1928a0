//! Human-readable event signatures, the topic0 filter they imply, and
//! decoding of raw logs into the `events.params` JSON encoding:
//!
//! | ABI type            | JSON                                   |
//! |---------------------|----------------------------------------|
//! | uintN, intN         | decimal string (no precision loss)     |
//! | address             | lowercase 0x-hex string                |
//! | bytes, bytesN       | 0x-hex string                          |
//! | bool                | true / false                           |
//! | string              | string, exactly as emitted; `{"bytes": "0x…"}` when not valid UTF-8 or holding U+0000 |
//! | T\[\], T\[N\], tuple | array                                  |
//! | indexed dynamic     | 0x-hex of the 32-byte topic (a hash)   |
//!
//! Parameters are keyed by name; an unnamed parameter is `arg{position}`.
//!
//! I8 (no input from the chain can stop a stream): anyone can emit any
//! bytes as a `string` on a watched contract, and PostgreSQL's `jsonb`
//! refuses U+0000 (SQLSTATE 22P05) while a lossy decode would alter what
//! was emitted. Strings are therefore decoded as raw bytes (same ABI
//! encoding) and stored as a JSON string only when that is lossless; any
//! other string becomes `{"bytes": "0x<hex of the exact bytes>"}`, which
//! round-trips and which no string parameter can otherwise produce (a
//! string is never an object).
//! Several signatures may share a topic0 (ERC-20 and ERC-721 `Transfer`
//! differ only in which parameters are indexed): the one whose layout
//! decodes the log wins.

use std::collections::HashMap;

use ethers::abi::{Event, EventExt, EventParam, HumanReadableParser, ParamType, RawLog as AbiRawLog, Token};
use ethers::types::{H256, I256};
use serde_json::{Map, Value};

use crate::types::{Hash32, RawLog};

/// The configured events of one stream.
#[derive(Debug, Clone)]
pub struct EventSet {
    /// Candidates per topic0, in configuration order.
    by_topic0: HashMap<Hash32, Vec<Candidate>>,
    /// Topic0s in configuration order, for a stable filter.
    order: Vec<Hash32>,
}

/// A configured event, and the layout it is decoded with: marked anonymous
/// (topic0 is matched by the map already, and ethabi would otherwise hash
/// the signature again for every log, a tenth of a backfill's CPU), with
/// every `string` read as `bytes` (the same encoding) so that no byte is
/// lost or replaced.
#[derive(Debug, Clone)]
struct Candidate {
    event: Event,
    decoder: Event,
}

/// How a parameter reads as a SQL column (for typed views).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// `uint*`, `int*`: numeric.
    Numeric,
    /// `address`: text, lowercase 0x-hex.
    Address,
    Bool,
    /// `string`: text (NULL when stored as its bytes, see the module doc).
    Text,
    /// `bytes`, `bytesN`, and every indexed dynamic value (its topic, a
    /// hash): bytea.
    Bytes,
    /// Arrays and tuples: jsonb.
    Json,
}

/// One parameter of a configured event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The key in `events.params`.
    pub name: String,
    pub column: Column,
}

/// A configured event as typed views see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub name: String,
    /// The canonical signature, e.g. `Burned(address,uint256)`.
    pub signature: String,
    pub params: Vec<Param>,
}

/// A log decoded under one of the configured events.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub event_name: String,
    /// Parameters by name, encoded as the module doc says.
    pub params: Value,
}

/// Why a log does not decode under the configured events.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("log has no topics (anonymous events are not configured)")]
    NoTopics,
    #[error("topic0 {0} matches no configured event")]
    UnknownTopic(Hash32),
    #[error("does not match {signature}: {reason}")]
    Layout { signature: String, reason: String },
}

impl EventSet {
    /// Parses every signature; on failure returns each bad one's index and why.
    pub fn parse(signatures: &[String]) -> Result<EventSet, Vec<(usize, String)>> {
        let mut errors = Vec::new();
        let mut set = EventSet {
            by_topic0: HashMap::new(),
            order: Vec::new(),
        };
        let mut seen = Vec::new();
        for (i, sig) in signatures.iter().enumerate() {
            let event = match HumanReadableParser::parse_event(sig.trim()) {
                Ok(e) => e,
                Err(e) => {
                    errors.push((i, format!("not a valid event signature ({e}); expected e.g. \"event Transfer(address indexed from, address indexed to, uint256 value)\"")));
                    continue;
                }
            };
            if event.anonymous {
                errors.push((
                    i,
                    "anonymous events have no topic0 to filter on and are not supported".into(),
                ));
                continue;
            }
            let event = name_unnamed(event);
            let layout = (event.name.clone(), event.inputs.clone());
            if seen.contains(&layout) {
                errors.push((i, format!("event {} is listed twice", event.name)));
                continue;
            }
            seen.push(layout);
            let topic0 = Hash32(event.signature().0);
            if !set.by_topic0.contains_key(&topic0) {
                set.order.push(topic0);
            }
            let decoder = Event {
                anonymous: true,
                inputs: event
                    .inputs
                    .iter()
                    .map(|p| EventParam {
                        kind: strings_as_bytes(&p.kind),
                        ..p.clone()
                    })
                    .collect(),
                ..event.clone()
            };
            set.by_topic0
                .entry(topic0)
                .or_default()
                .push(Candidate { event, decoder });
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }

    /// Every configured event, in configuration order within each topic0.
    pub fn layouts(&self) -> Vec<Layout> {
        self.order
            .iter()
            .flat_map(|t| self.by_topic0.get(t).into_iter().flatten())
            .map(|c| Layout {
                name: c.event.name.clone(),
                signature: c.event.abi_signature(),
                params: c
                    .event
                    .inputs
                    .iter()
                    .map(|p| Param {
                        name: p.name.clone(),
                        column: column(&p.kind, p.indexed),
                    })
                    .collect(),
            })
            .collect()
    }

    /// The topic0 values to ask `eth_getLogs` for.
    pub fn topic0s(&self) -> Vec<Hash32> {
        self.order.clone()
    }

    /// Decodes a log: topic0 must be configured, the topic count must match
    /// the indexed parameters, and the data must hold every other parameter.
    pub fn decode(&self, log: &RawLog) -> Result<Decoded, DecodeError> {
        let topic0 = log.topics.first().ok_or(DecodeError::NoTopics)?;
        let candidates = self.by_topic0.get(topic0).ok_or(DecodeError::UnknownTopic(*topic0))?;
        let mut last_err = None;
        for Candidate { event, decoder } in candidates {
            let raw = AbiRawLog {
                topics: log.topics[1..].iter().map(|t| H256(t.0)).collect(),
                data: log.data.clone(),
            };
            match decoder.parse_log(raw) {
                Ok(parsed) => {
                    let mut params = Map::new();
                    for (p, input) in parsed.params.into_iter().zip(&event.inputs) {
                        params.insert(p.name, typed_json(&input.kind, &p.value));
                    }
                    return Ok(Decoded {
                        event_name: event.name.clone(),
                        params: Value::Object(params),
                    });
                }
                Err(e) => {
                    last_err = Some(DecodeError::Layout {
                        signature: event.abi_signature(),
                        reason: describe(log, event, &e),
                    })
                }
            }
        }
        Err(last_err.unwrap_or(DecodeError::UnknownTopic(*topic0)))
    }
}

/// Gives unnamed parameters a positional name, so that two unnamed
/// parameters cannot collide in the decoded map.
fn name_unnamed(mut event: Event) -> Event {
    for (i, p) in event.inputs.iter_mut().enumerate() {
        if p.name.is_empty() {
            p.name = format!("arg{i}");
        }
    }
    event
}

/// A reason that an operator can act on; ethabi's own errors are terse.
fn describe(log: &RawLog, event: &Event, err: &ethers::abi::Error) -> String {
    let indexed = event.inputs.iter().filter(|p| p.indexed).count();
    if log.topics.len() != indexed + 1 {
        format!("expected {} topics, log has {}", indexed + 1, log.topics.len())
    } else {
        format!("data ({} bytes) does not decode: {err}", log.data.len())
    }
}

/// The SQL column of a parameter of type `kind`.
fn column(kind: &ParamType, indexed: bool) -> Column {
    match kind {
        ParamType::Uint(_) | ParamType::Int(_) => Column::Numeric,
        ParamType::Address => Column::Address,
        ParamType::Bool => Column::Bool,
        ParamType::FixedBytes(_) => Column::Bytes,
        // Indexed dynamic values are stored as their topic: a hash.
        _ if indexed => Column::Bytes,
        ParamType::String => Column::Text,
        ParamType::Bytes => Column::Bytes,
        ParamType::Array(_) | ParamType::FixedArray(..) | ParamType::Tuple(_) => Column::Json,
    }
}

/// `kind` with every `string` (at any depth) read as `bytes`.
fn strings_as_bytes(kind: &ParamType) -> ParamType {
    match kind {
        ParamType::String => ParamType::Bytes,
        ParamType::Array(k) => ParamType::Array(Box::new(strings_as_bytes(k))),
        ParamType::FixedArray(k, n) => ParamType::FixedArray(Box::new(strings_as_bytes(k)), *n),
        ParamType::Tuple(ks) => ParamType::Tuple(ks.iter().map(strings_as_bytes).collect()),
        other => other.clone(),
    }
}

/// The JSON of a token decoded under [`strings_as_bytes`]`(kind)`.
fn typed_json(kind: &ParamType, token: &Token) -> Value {
    match (kind, token) {
        (ParamType::String, Token::Bytes(b)) => string_json(b),
        (ParamType::Array(k) | ParamType::FixedArray(k, _), Token::Array(items) | Token::FixedArray(items)) => {
            Value::Array(items.iter().map(|t| typed_json(k, t)).collect())
        }
        (ParamType::Tuple(ks), Token::Tuple(items)) => {
            Value::Array(ks.iter().zip(items).map(|(k, t)| typed_json(k, t)).collect())
        }
        // Indexed dynamic values arrive as their topic (a hash).
        _ => token_to_json(token),
    }
}

/// A string's JSON: itself when `jsonb` holds it exactly, else its bytes.
pub fn string_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Value::String(s.to_string()),
        _ => serde_json::json!({ "bytes": hex0x_string(bytes) }),
    }
}

fn hex0x_string(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn hex0x(bytes: &[u8]) -> Value {
    Value::String(format!("0x{}", hex::encode(bytes)))
}

fn token_to_json(token: &Token) -> Value {
    match token {
        Token::Address(a) => hex0x(a.as_bytes()),
        Token::FixedBytes(b) | Token::Bytes(b) => hex0x(b),
        Token::Uint(u) => Value::String(u.to_string()),
        Token::Int(i) => Value::String(I256::from_raw(*i).to_string()),
        Token::Bool(b) => Value::Bool(*b),
        Token::String(s) => Value::String(s.clone()),
        Token::Array(items) | Token::FixedArray(items) | Token::Tuple(items) => {
            Value::Array(items.iter().map(token_to_json).collect())
        }
    }
}

#[cfg(test)]
#[path = "abi_tests.rs"]
mod tests;
