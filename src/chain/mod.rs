//! Chain access: the only module that imports `ethers` (archived upstream;
//! its successor is alloy), so that moving off it is this module's work.
//!
//! | module        | owns                                                              |
//! |---------------|-------------------------------------------------------------------|
//! | [`error`]     | errors typed by kind: callers decide from the variant, never from text |
//! | [`endpoint`]  | one endpoint shared by every stream that names its URL: rate limit, cool-down, learned span |
//! | [`transport`] | JSON-RPC over HTTP: deadlines, retries, batches                   |
//! | [`client`]    | a stream's endpoints in order, one pinned per tick; headers, heads, tags |
//! | [`logs`]      | `eth_getLogs`: adaptive spans, the end header in the same batch, address chunks |
//! | [`range`]     | providers' "range too large" prose, parsed once                   |
//! | [`abi`]       | event signatures → topic0 filter and the `events.params` decoder  |
//! | [`heads`]     | one head per endpoint, shared by the streams on it (poll or push) |
//! | [`ws`]        | the `newHeads` subscription over WebSocket                        |
//!
//! Its types are plain bytes ([`crate::types`]), so nothing outside this
//! module ever sees an ethers type.

pub mod abi;
pub mod client;
pub mod endpoint;
pub mod error;
pub mod heads;
pub mod logs;
pub mod range;
mod transport;
pub mod ws;

pub use client::{ChainClient, ClientOptions, Rpc, RpcObserver};
pub use endpoint::{EndpointConfig, Endpoints};
pub use error::{ChainError, ChainErrorKind};
