//! Issue 11, "exactly once, with no holes": one test per hole that was
//! reproduced against the release binary, each failing if its fix is
//! reverted (how each was checked is said above it).
//!
//! | module      | holes                                                          |
//! |-------------|----------------------------------------------------------------|
//! | [`data`]    | hostile strings, per-row data errors, the savepoint budget     |
//! | [`reorgs`]  | a reorg inside a tick, a lagging backend, operator commands    |
//! | [`filters`] | a filter change backfills, old replicas back off; gapfill CLI  |
//! | [`bounds`]  | skips, frozen replicas, slow providers, the RPC budget         |
//! | [`endpoints`] | readiness, address chunks, dead endpoints, finality tags     |

mod bounds;
mod data;
mod endpoints;
mod filters;
mod reorgs;

use serde_json::{json, Value};

use crate::support::{hex_i64, Chain};

/// Every log of `addresses` with one of `topic0s` up to block `to`, as the
/// chain has them: (tx hash, log index, block).
pub async fn logs_on_chain(
    chain: &Chain,
    addresses: &[&str],
    topic0s: &[&str],
    to: i64,
) -> std::collections::BTreeSet<crate::support::LogKey> {
    let logs = chain
        .rpc(
            "eth_getLogs",
            json!([{"fromBlock": "0x0", "toBlock": format!("{to:#x}"), "address": addresses, "topics": [topic0s]}]),
        )
        .await;
    logs.as_array()
        .expect("logs")
        .iter()
        .map(|l: &Value| {
            (
                l["transactionHash"].as_str().expect("tx").to_string(),
                hex_i64(&l["logIndex"]),
                hex_i64(&l["blockNumber"]),
            )
        })
        .collect()
}
