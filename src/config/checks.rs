//! Rules of the configuration that involve more than one section or
//! stream: names and watched (contract, event) pairs unique across streams,
//! one rate per endpoint URL, and the database timeouts against each other
//! and against the streams' RPC bounds.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use super::{DatabaseConfig, Problem, StreamConfig};
use crate::types::Address;

/// A rate as written, or "unset".
fn show_rate(rate: Option<f64>) -> String {
    rate.map_or_else(|| "unset".to_string(), |r| r.to_string())
}

/// Rules that involve more than one stream.
pub(super) fn check_streams_together(streams: &[StreamConfig], problems: &mut Vec<Problem>) {
    let mut names = HashSet::new();
    for (i, s) in streams.iter().enumerate() {
        if !names.insert(s.name.clone()) {
            problems.push(Problem {
                key: format!("streams[{i}].name"),
                message: format!(
                    "{:?} is used by an earlier stream; names are cursor ids and must be unique",
                    s.name
                ),
            });
        }
    }
    // An endpoint is shared by every stream naming its URL (one client, one
    // rate limit): two different limits for one URL cannot both hold.
    let mut limits: Vec<(&str, usize, Option<f64>)> = Vec::new();
    for (i, s) in streams.iter().enumerate() {
        for e in &s.rpc {
            let url = e.url.expose();
            match limits.iter().find(|(u, ..)| *u == url) {
                Some((_, j, rate)) if *rate != e.max_requests_per_second => problems.push(Problem {
                    key: format!("streams[{i}].rpc_urls"),
                    message: format!(
                        "{} has max_requests_per_second {} here but {} in streams[{j}]; streams share an endpoint's rate limit, so give it one value (in [defaults])",
                        crate::redact::redact_url(url),
                        show_rate(e.max_requests_per_second),
                        show_rate(*rate)
                    ),
                }),
                Some(_) => {}
                None => limits.push((url, i, e.max_requests_per_second)),
            }
        }
    }
    // Events are keyed by (chain_id, tx_hash, log_index) across streams, so
    // two streams watching the same event of the same contract would each
    // see the other's rows as duplicates; refuse the ambiguity.
    let mut watched: Vec<(usize, u64, Address, BTreeSet<[u8; 32]>)> = Vec::new();
    for (i, s) in streams.iter().enumerate() {
        let topics: BTreeSet<[u8; 32]> = s.events.topic0s().into_iter().map(|t| t.0).collect();
        for a in &s.addresses {
            if let Some((j, ..)) = watched
                .iter()
                .find(|(j, c, wa, wt)| *j != i && *c == s.chain_id && wa == a && !wt.is_disjoint(&topics))
            {
                problems.push(Problem {
                    key: format!("streams[{i}].addresses"),
                    message: format!(
                        "{a} on chain {} with an overlapping event is already watched by streams[{j}]; an event is stored once, so two streams cannot share it",
                        s.chain_id
                    ),
                });
            }
            watched.push((i, s.chain_id, *a, topics.clone()));
        }
    }
}

/// Timeout combinations that would break a bound.
///
/// I6 (no session idle in transaction past its bound) no longer depends on
/// the RPC settings: a tick that waits on the chain keeps its session busy
/// (a heartbeat statement every third of the bound), so only a frozen
/// replica goes idle, and the server ends it.
pub(super) fn check_timeouts(db: &DatabaseConfig, streams: &[StreamConfig], problems: &mut Vec<Problem>) {
    let limits = &db.limits;
    if limits.lock_timeout >= limits.statement_timeout {
        problems.push(Problem {
            key: "database.lock_timeout".into(),
            message: format!(
                "({}) must be shorter than database.statement_timeout ({}): the lock wait is part of a statement",
                humantime::format_duration(limits.lock_timeout),
                humantime::format_duration(limits.statement_timeout)
            ),
        });
    }
    if limits.idle_in_transaction_timeout < Duration::from_millis(300) {
        problems.push(Problem {
            key: "database.idle_in_transaction_timeout".into(),
            message: "must be at least 300ms: a tick's heartbeat runs every third of it".into(),
        });
    }
    for (i, s) in streams.iter().enumerate() {
        if s.rpc_budget < s.rpc_timeout {
            problems.push(Problem {
                key: format!("streams[{i}].rpc_budget"),
                message: format!(
                    "({}) must be at least rpc_timeout ({}): a tick must have time for one request",
                    humantime::format_duration(s.rpc_budget),
                    humantime::format_duration(s.rpc_timeout)
                ),
            });
        }
    }
}
