//! Chain access: the only module that imports `ethers` (archived upstream;
//! its successor is alloy), so that moving off it is this module's work.
//!
//! - [`client`]: JSON-RPC over HTTP with a deadline on every request (ethers'
//!   own `Http` transport has none) and errors typed by kind, so callers
//!   decide what is retryable from the variant, never from message text.
//! - [`range`]: providers' "range too large" answers and the adaptive span.
//! - [`abi`]: human-readable event signatures → topic0 filter and decoder
//!   into the `events.params` JSON encoding.
//!
//! The types here are plain bytes, so the rest of the crate never sees an
//! ethers type.

pub mod abi;
pub mod client;
pub mod range;
pub mod ws;

use std::fmt;
use std::str::FromStr;

pub use client::{ChainClient, ChainError, ChainErrorKind, ClientOptions, EndpointConfig, Rpc};

/// A 20-byte account or contract address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 20]);

/// A 32-byte hash (block, transaction, topic).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash32(pub [u8; 32]);

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

/// Why a string is not an address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("not an address: expected 0x followed by 40 hex digits, got {0:?}")]
    Format(String),
    #[error("{0} fails its EIP-55 mixed-case checksum (a typo?); write it in lowercase to skip the check")]
    Checksum(String),
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
        let mixed =
            hex_part.chars().any(|c| c.is_ascii_uppercase()) && hex_part.chars().any(|c| c.is_ascii_lowercase());
        if mixed && ethers::utils::to_checksum(&ethers::types::H160(out), None) != s {
            return Err(AddressError::Checksum(s.to_string()));
        }
        Ok(Address(out))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_lowercase_and_valid_checksums_only() {
        let lower = "0x5fbdb2315678afecb367f032d93f642f64180aa3";
        let checksummed = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
        assert_eq!(lower.parse::<Address>(), checksummed.parse::<Address>());
        assert_eq!(lower.parse::<Address>().map(|a| a.to_string()), Ok(lower.to_string()));
        let typo = "0x5FbDB2315678afecb367f032d93F642f64180aA3";
        assert_eq!(typo.parse::<Address>(), Err(AddressError::Checksum(typo.into())));
        assert!(matches!("0x1234".parse::<Address>(), Err(AddressError::Format(_))));
        assert!(matches!(
            "5fbdb2315678afecb367f032d93f642f64180aa3".parse::<Address>(),
            Err(AddressError::Format(_))
        ));
    }
}
