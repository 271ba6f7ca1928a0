//! Domain primitives that the chain layer and the store both speak: plain
//! bytes and numbers, no ethers type and no SQL. A leaf: it imports nothing
//! of this crate.
//!
//! Parse, don't validate: a [`StreamName`], an [`Address`] or a
//! [`BlockNumber`] that exists is valid, so the code that holds one never
//! checks it again. The cursor's "before block 0" is `Option::None`
//! ([`Processed`]), not a `-1` sentinel; `-1` exists only in the database
//! column, and only [`Processed::to_db`] / [`Processed::from_db`] know it.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A 20-byte account or contract address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 20]);

/// A 32-byte hash (block, transaction, topic).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash32(pub [u8; 32]);

/// A block height. Heights above `i64::MAX` do not exist on any chain and
/// are refused where they enter (config, RPC answers), so converting one to
/// the database's `bigint` never truncates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlockNumber(u64);

/// Why a number is not a block height.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("block number {0} is out of range (at most {max})", max = i64::MAX)]
pub struct BlockOutOfRange(pub u64);

impl BlockNumber {
    /// The largest height: what fits a PostgreSQL `bigint`.
    pub const MAX: BlockNumber = BlockNumber(i64::MAX as u64);

    pub fn new(n: u64) -> Result<BlockNumber, BlockOutOfRange> {
        if n > Self::MAX.0 {
            Err(BlockOutOfRange(n))
        } else {
            Ok(BlockNumber(n))
        }
    }

    /// `n`, capped at [`BlockNumber::MAX`]: for heights a node reported,
    /// which cannot exceed it in practice.
    pub fn saturating(n: u64) -> BlockNumber {
        BlockNumber(n.min(Self::MAX.0))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// The `bigint` column value.
    pub fn to_db(self) -> i64 {
        // In range by construction.
        self.0 as i64
    }

    /// A `bigint` column value; a negative one is not a block.
    pub fn from_db(v: i64) -> Option<BlockNumber> {
        u64::try_from(v).ok().map(BlockNumber)
    }
}

impl fmt::Display for BlockNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for BlockNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How far a cursor has processed: every log in blocks up to the held block
/// is stored; `None` before block 0.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Debug)]
pub struct Processed(pub Option<BlockNumber>);

impl Processed {
    /// The cursor of a stream that starts at `start` (nothing before it is wanted).
    pub fn before(start: BlockNumber) -> Processed {
        Processed(start.get().checked_sub(1).map(BlockNumber))
    }

    /// The first block not yet processed.
    pub fn next(self) -> u64 {
        self.0.map_or(0, |b| b.get() + 1)
    }

    /// The last processed block, if any.
    pub fn block(self) -> Option<u64> {
        self.0.map(BlockNumber::get)
    }

    /// The `block_cursors.last_processed_block` value (`-1` before block 0).
    pub fn to_db(self) -> i64 {
        self.0.map_or(-1, BlockNumber::to_db)
    }

    /// From the column; anything below `-1` is refused by a CHECK constraint.
    pub fn from_db(v: i64) -> Processed {
        Processed(BlockNumber::from_db(v))
    }
}

impl fmt::Display for Processed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(b) => write!(f, "{b}"),
            None => f.write_str("(before block 0)"),
        }
    }
}

/// A stream's name: its `block_cursors.id`, a label in metrics, part of its
/// notification channel and view names. 1–63 characters of `[A-Za-z0-9_.:-]`
/// (63: PostgreSQL's identifier length, so derived names stay whole).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(String);

impl StreamName {
    pub const MAX_LEN: usize = 63;

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The stream's notification channel in `schema`: `<schema>.<stream>`
    /// (`LISTEN "public.burns"`). Each commit that stores rows of the
    /// stream sends `{"stream", "from", "to", "rows"}` on it.
    pub fn channel(&self, schema: &str) -> String {
        format!("{schema}.{}", self.0)
    }
}

impl FromStr for StreamName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c));
        if ok {
            Ok(StreamName(s.to_string()))
        } else {
            Err(format!(
                "must be 1-{} characters of [A-Za-z0-9_.:-], got {s:?}",
                Self::MAX_LEN
            ))
        }
    }
}

impl std::ops::Deref for StreamName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl PartialEq<str> for StreamName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for StreamName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A log as the node returned it, before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLog {
    pub block_number: u64,
    pub block_hash: Hash32,
    pub tx_hash: Hash32,
    /// Position of the log in its block.
    pub log_index: u64,
    pub address: Address,
    pub topics: Vec<Hash32>,
    pub data: Vec<u8>,
    /// `true` when the node reports the log as reorged out: a signal, not an event.
    pub removed: bool,
}

/// The parts of a block header the poller uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub number: u64,
    pub hash: Hash32,
    pub parent_hash: Hash32,
    /// Seconds since the epoch.
    pub timestamp: u64,
}

/// What `eth_getLogs` is asked for: any of `addresses`, with any of `topic0s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter {
    pub addresses: Vec<Address>,
    pub topic0s: Vec<Hash32>,
}

impl LogFilter {
    /// What a cursor's meaning depends on: the chain, and the sorted sets
    /// of addresses and topic0s, hashed (SHA-256). Two filters that select
    /// the same logs on the same chain have the same fingerprint, whatever
    /// the order they were configured in.
    pub fn fingerprint(&self, chain_id: u64) -> Hash32 {
        let mut h = sha2::Sha256::new();
        h.update(b"logcursor filter v1");
        h.update(chain_id.to_be_bytes());
        let mut addresses = self.addresses.clone();
        addresses.sort();
        addresses.dedup();
        h.update((addresses.len() as u64).to_be_bytes());
        for a in &addresses {
            h.update(a.0);
        }
        let mut topics = self.topic0s.clone();
        topics.sort();
        topics.dedup();
        h.update((topics.len() as u64).to_be_bytes());
        for t in &topics {
            h.update(t.0);
        }
        Hash32(h.finalize().into())
    }

    /// The logs `self` selects that `old` does not, as at most two
    /// filters (a filter is a product addresses × topic0s, and so is each
    /// part of the difference): new addresses with every topic0, and old
    /// addresses with the new topic0s. Empty when nothing was added.
    pub fn added_since(&self, old: &LogFilter) -> Vec<LogFilter> {
        let new_addresses: Vec<Address> = self
            .addresses
            .iter()
            .filter(|a| !old.addresses.contains(a))
            .copied()
            .collect();
        let kept_addresses: Vec<Address> = self
            .addresses
            .iter()
            .filter(|a| old.addresses.contains(a))
            .copied()
            .collect();
        let new_topics: Vec<Hash32> = self
            .topic0s
            .iter()
            .filter(|t| !old.topic0s.contains(t))
            .copied()
            .collect();
        let mut out = Vec::new();
        if !new_addresses.is_empty() && !self.topic0s.is_empty() {
            out.push(LogFilter {
                addresses: new_addresses,
                topic0s: self.topic0s.clone(),
            });
        }
        if !kept_addresses.is_empty() && !new_topics.is_empty() {
            out.push(LogFilter {
                addresses: kept_addresses,
                topic0s: new_topics,
            });
        }
        out
    }

    /// Whether a log with this address and topic0 is selected.
    pub fn selects(&self, address: &Address, topic0: Option<&Hash32>) -> bool {
        self.addresses.contains(address) && topic0.is_some_and(|t| self.topic0s.contains(t))
    }
}

/// Why a string is not an address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("not an address: expected 0x followed by 40 hex digits, got {0:?}")]
    Format(String),
    #[error("{0} fails its EIP-55 mixed-case checksum (a typo?); write it in lowercase to skip the check")]
    Checksum(String),
}

impl Address {
    /// The EIP-55 mixed-case form.
    pub fn checksummed(&self) -> String {
        let lower = hex::encode(self.0);
        let hash = sha3::Keccak256::digest(lower.as_bytes());
        let mut out = String::from("0x");
        for (i, c) in lower.chars().enumerate() {
            let nibble = (hash[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 0x0f;
            out.push(if c.is_ascii_alphabetic() && nibble >= 8 {
                c.to_ascii_uppercase()
            } else {
                c
            });
        }
        out
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s
            .strip_prefix("0x")
            .filter(|h| h.len() == 40)
            .ok_or_else(|| AddressError::Format(s.to_string()))?;
        let mut out = [0u8; 20];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| AddressError::Format(s.to_string()))?;
        let address = Address(out);
        let mixed =
            hex_part.chars().any(|c| c.is_ascii_uppercase()) && hex_part.chars().any(|c| c.is_ascii_lowercase());
        if mixed && address.checksummed() != s {
            return Err(AddressError::Checksum(s.to_string()));
        }
        Ok(address)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Hash32 {
    /// From a 32-byte column value; anything else is `None`.
    pub fn from_slice(bytes: &[u8]) -> Option<Hash32> {
        <[u8; 32]>::try_from(bytes).ok().map(Hash32)
    }
}

impl Address {
    /// From a 20-byte column value; anything else is `None`.
    pub fn from_slice(bytes: &[u8]) -> Option<Address> {
        <[u8; 20]>::try_from(bytes).ok().map(Address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_lowercase_and_valid_checksums_only() {
        let lower = "0x5fbdb2315678afecb367f032d93f642f64180aa3";
        let checksummed = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
        assert_eq!(lower.parse::<Address>(), checksummed.parse::<Address>());
        assert_eq!(lower.parse::<Address>().map(|a| a.to_string()), Ok(lower.to_string()));
        assert_eq!(
            lower.parse::<Address>().map(|a| a.checksummed()),
            Ok(checksummed.to_string())
        );
        let typo = "0x5FbDB2315678afecb367f032d93F642f64180aA3";
        assert_eq!(typo.parse::<Address>(), Err(AddressError::Checksum(typo.into())));
        assert!(matches!("0x1234".parse::<Address>(), Err(AddressError::Format(_))));
        assert!(matches!(
            "5fbdb2315678afecb367f032d93f642f64180aa3".parse::<Address>(),
            Err(AddressError::Format(_))
        ));
    }

    #[test]
    fn the_cursor_before_block_0_is_none_and_minus_one_only_in_the_database() {
        assert_eq!(Processed::before(BlockNumber::saturating(0)), Processed(None));
        assert_eq!(Processed(None).to_db(), -1);
        assert_eq!(Processed::from_db(-1), Processed(None));
        assert_eq!(Processed(None).next(), 0);
        let p = Processed::before(BlockNumber::saturating(100));
        assert_eq!((p.block(), p.next(), p.to_db()), (Some(99), 100, 99));
        assert!(BlockNumber::new(u64::MAX).is_err());
    }

    #[test]
    fn stream_names_are_checked_once() {
        assert!("burns".parse::<StreamName>().is_ok());
        assert!("a.b:c-d_e".parse::<StreamName>().is_ok());
        assert!("".parse::<StreamName>().is_err());
        assert!("has space".parse::<StreamName>().is_err());
        assert!("x".repeat(64).parse::<StreamName>().is_err());
    }

    fn a(n: u8) -> Address {
        Address([n; 20])
    }
    fn t(n: u8) -> Hash32 {
        Hash32([n; 32])
    }

    #[test]
    fn a_fingerprint_ignores_order_and_changes_with_any_member() {
        let f = LogFilter {
            addresses: vec![a(1), a(2)],
            topic0s: vec![t(1)],
        };
        let reordered = LogFilter {
            addresses: vec![a(2), a(1)],
            topic0s: vec![t(1)],
        };
        assert_eq!(f.fingerprint(1), reordered.fingerprint(1));
        assert_ne!(f.fingerprint(1), f.fingerprint(2), "the chain is part of it");
        let more = LogFilter {
            addresses: vec![a(1), a(2)],
            topic0s: vec![t(1), t(2)],
        };
        assert_ne!(f.fingerprint(1), more.fingerprint(1));
    }

    #[test]
    fn what_a_changed_filter_adds_is_covered_once_by_at_most_two_filters() {
        let old = LogFilter {
            addresses: vec![a(1), a(2)],
            topic0s: vec![t(1)],
        };
        let new = LogFilter {
            addresses: vec![a(2), a(3)],
            topic0s: vec![t(1), t(2)],
        };
        let added = new.added_since(&old);
        // Every (address, topic) of new that old lacks is in exactly one
        // added filter; nothing old selects is in any.
        for addr in [a(1), a(2), a(3)] {
            for topic in [t(1), t(2)] {
                let in_added = added.iter().filter(|f| f.selects(&addr, Some(&topic))).count();
                let want = usize::from(new.selects(&addr, Some(&topic)) && !old.selects(&addr, Some(&topic)));
                assert_eq!(in_added, want, "{addr} {topic}");
            }
        }
        assert!(old.added_since(&old).is_empty());
        assert!(
            LogFilter {
                addresses: vec![a(1)],
                topic0s: vec![t(1)]
            }
            .added_since(&old)
            .is_empty(),
            "a removal adds nothing"
        );
    }
}
