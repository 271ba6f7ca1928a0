//! One `[[streams]]` table (with `[defaults]` already merged into it) →
//! [`StreamConfig`]: the event signatures parsed once into the decoder
//! the stream keeps, names and blocks as their types.

use super::fields::{read_secret, Fields};
use super::webhook::WebhookConfig;
use super::{DeepReorgPolicy, Finality, GapFillConfig, Problem, StreamConfig, UnfetchablePolicy};
use crate::chain::abi::EventSet;
use crate::chain::EndpointConfig;
use crate::redact::Secret;
use crate::types::{Address, BlockNumber, StreamName};
use crate::write::OnFailure;

/// The keys a stream table may have (and so may `[defaults]`).
pub(super) const KEYS: &[&str] = &[
    "name",
    "chain_id",
    "rpc_urls",
    "addresses",
    "events",
    "start_block",
    "confirmations",
    "max_block_range",
    "max_logs_per_tick",
    "poll_interval",
    "ws_urls",
    "ws_poll_interval",
    "rpc_timeout",
    "rpc_attempts",
    "rpc_budget",
    "fetch_concurrency",
    "pipeline",
    "rpc_cooldown",
    "finality",
    "on_deep_reorg",
    "max_reorg_depth",
    "on_unfetchable_range",
    "range_attempts",
    "stuck_after",
    "gapfill_max_attempts",
    "gapfill_lease",
    "gapfill_backoff",
    "gapfill_backoff_max",
    "on_bad_event",
    "on_handler_error",
    "handler_function",
    "revert_function",
    "webhooks",
];

pub(super) fn parse_stream(table: &toml::Table, i: usize, problems: &mut Vec<Problem>) -> Option<StreamConfig> {
    let mut f = Fields::new(table, &format!("streams[{i}]"), problems);
    let name: Option<String> = f.required("name");
    let name = name.and_then(|n| match n.parse::<StreamName>() {
        Ok(n) => Some(n),
        Err(e) => {
            f.problem("name", e);
            None
        }
    });
    let chain_id = f.int_in("chain_id", None, 1..=i64::MAX);
    let rpc = f.list("rpc_urls", "at least one endpoint", endpoint);
    let addresses = f.list("addresses", "at least one contract address", |a: String| {
        a.parse::<Address>().map_err(|e| e.to_string())
    });
    if let Some(list) = &addresses {
        for (j, a) in list.iter().enumerate() {
            if list[..j].contains(a) {
                f.problem(&format!("addresses[{j}]"), format!("{a} is listed twice"));
            }
        }
    }
    let signatures: Option<Vec<String>> = f.list("events", "at least one event signature", Ok);
    let events = signatures.as_ref().and_then(|evs| match EventSet::parse(evs) {
        Ok(set) => Some(set),
        Err(errs) => {
            for (j, e) in errs {
                f.problem(&format!("events[{j}]"), e);
            }
            None
        }
    });
    let start_block = f
        .int_in("start_block", Some(0), 0..=i64::MAX - 1)
        .and_then(|b| BlockNumber::new(b).ok());
    let confirmations = f.int_in("confirmations", Some(2), 0..=100_000);
    let max_block_range = f.int_in("max_block_range", Some(2000), 1..=1_000_000);
    let max_logs_per_tick = f.int_in("max_logs_per_tick", Some(50_000), 1..=10_000_000);
    let poll_interval = f.positive_duration("poll_interval", "1s");
    let ws = ws_urls(&mut f, rpc.as_deref());
    let ws_poll_interval = f.positive_duration("ws_poll_interval", "30s");
    let rpc_timeout = f.positive_duration("rpc_timeout", "10s");
    let rpc_attempts = f.int_in("rpc_attempts", Some(3), 1..=20);
    let rpc_budget = f.positive_duration("rpc_budget", "60s");
    let fetch_concurrency = f.int_in("fetch_concurrency", Some(4), 1..=64);
    let pipeline = f.optional::<bool>("pipeline").unwrap_or(true);
    let rpc_cooldown = f.duration("rpc_cooldown", "30s");
    let finality = f.choice(
        "finality",
        "latest",
        &[
            ("latest", Finality::Latest),
            ("safe", Finality::Safe),
            ("finalized", Finality::Finalized),
        ],
    );
    let on_deep_reorg = f.choice(
        "on_deep_reorg",
        "halt",
        &[("halt", DeepReorgPolicy::Halt), ("rewind", DeepReorgPolicy::Rewind)],
    );
    let max_reorg_depth = f.int_in("max_reorg_depth", Some(128), 1..=100_000);
    let on_unfetchable_range = f.choice(
        "on_unfetchable_range",
        "retry",
        &[
            ("retry", UnfetchablePolicy::Retry),
            ("skip_and_backfill", UnfetchablePolicy::SkipAndBackfill),
        ],
    );
    let range_attempts = f.int_in("range_attempts", Some(5), 1..=1000);
    let stuck_after = f.positive_duration("stuck_after", "2m");
    let gapfill_max_attempts = f.int_in("gapfill_max_attempts", Some(10), 1..=1000);
    let gapfill_lease = f.positive_duration("gapfill_lease", "60s");
    let gapfill_backoff = f.positive_duration("gapfill_backoff", "5s");
    let gapfill_backoff_max = f.positive_duration("gapfill_backoff_max", "10m");
    let policies = [("dead_letter", OnFailure::DeadLetter), ("halt", OnFailure::Halt)];
    let on_bad_event = f.choice("on_bad_event", "dead_letter", &policies);
    let on_handler_error = f.choice("on_handler_error", "dead_letter", &policies);
    let handler_function = sql_function(&mut f, "handler_function");
    let revert_function = sql_function(&mut f, "revert_function");
    let webhook_tables: Vec<toml::Table> = f.optional("webhooks").unwrap_or_default();
    let prefix = f.key("webhooks");
    f.finish();
    let webhooks: Option<Vec<WebhookConfig>> = {
        let mut out = Vec::new();
        let mut ok = true;
        for (j, t) in webhook_tables.iter().enumerate() {
            match super::webhook::parse(t, &format!("{prefix}[{j}]"), problems) {
                Some(w) if out.iter().any(|o: &WebhookConfig| o.name == w.name) => {
                    problems.push(Problem {
                        key: format!("{prefix}[{j}].name"),
                        message: format!("{:?} is used by an earlier webhook of this stream", w.name),
                    });
                    ok = false;
                }
                Some(w) => out.push(w),
                None => ok = false,
            }
        }
        ok.then_some(out)
    };
    Some(StreamConfig {
        name: name?,
        chain_id: chain_id?,
        rpc: rpc?,
        addresses: addresses?,
        events: events?,
        event_signatures: signatures?,
        start_block: start_block?,
        confirmations: confirmations?,
        max_block_range: max_block_range?,
        max_logs_per_tick: max_logs_per_tick?,
        poll_interval: poll_interval?,
        ws: ws?,
        ws_poll_interval: ws_poll_interval?,
        rpc_timeout: rpc_timeout?,
        rpc_attempts: u32::try_from(rpc_attempts?).ok()?,
        rpc_budget: rpc_budget?,
        fetch_concurrency: usize::try_from(fetch_concurrency?).ok()?,
        pipeline,
        rpc_cooldown: rpc_cooldown?,
        finality: finality?,
        on_deep_reorg: on_deep_reorg?,
        max_reorg_depth: max_reorg_depth?,
        on_bad_event: on_bad_event?,
        on_handler_error: on_handler_error?,
        handler_function: handler_function.ok()?,
        revert_function: revert_function.ok()?,
        webhooks: webhooks?,
        on_unfetchable_range: on_unfetchable_range?,
        range_attempts: u32::try_from(range_attempts?).ok()?,
        stuck_after: stuck_after?,
        gapfill: GapFillConfig {
            max_attempts: u32::try_from(gapfill_max_attempts?).ok()?,
            lease: gapfill_lease?,
            backoff: gapfill_backoff?,
            backoff_max: gapfill_backoff_max?,
        },
    })
}

/// An optional SQL function name, `name` or `schema.name` (letters, digits,
/// `_`, `$`): resolved by the server at start; `Err(())` after a problem.
fn sql_function(f: &mut Fields<'_>, key: &'static str) -> Result<Option<String>, ()> {
    let Some(name) = f.optional::<String>(key) else {
        return Ok(None);
    };
    let ident = |s: &str| {
        let mut c = s.chars();
        c.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    };
    let ok = match name.split_once('.') {
        Some((schema, function)) => ident(schema) && ident(function),
        None => ident(&name),
    };
    if ok {
        Ok(Some(name))
    } else {
        f.problem(
            key,
            format!("must be a SQL function name such as \"credit_burns\" or \"app.credit_burns\", got {name:?}"),
        );
        Err(())
    }
}

/// One `rpc_urls` entry: a URL, or `{ url = "…" | url_file = "…",
/// max_requests_per_second = N }`.
pub(super) fn endpoint(value: toml::Value) -> Result<EndpointConfig, String> {
    const USAGE: &str =
        "must be an http(s) URL or { url = \"…\" (or url_file = \"/path\"), max_requests_per_second = N }";
    let (url, rate) = url_entry(value, &["http", "https"], USAGE)?;
    Ok(EndpointConfig {
        url,
        max_requests_per_second: rate,
    })
}

/// `ws_urls`: `"derive"` (the default: one per `rpc_urls` entry, http →
/// ws, https → wss, same host, path and query), `[]` or `"off"` (polling
/// only), or a list of `ws://`/`wss://` URLs or `{ url_file = "…" }`
/// tables, the i-th for the i-th `rpc_urls` entry.
fn ws_urls(f: &mut Fields<'_>, rpc: Option<&[EndpointConfig]>) -> Option<Vec<Secret>> {
    const USAGE: &str = "must be a ws(s) URL or { url = \"…\" (or url_file = \"/path\") }";
    let derive = |rpc: Option<&[EndpointConfig]>| rpc.map(|r| r.iter().filter_map(|e| derive_ws(&e.url)).collect());
    match f.optional::<toml::Value>("ws_urls") {
        None => derive(rpc),
        Some(toml::Value::String(s)) if s == "off" => Some(Vec::new()),
        Some(toml::Value::String(s)) if s == "derive" => derive(rpc),
        Some(toml::Value::Array(items)) => {
            let (count, mut out) = (items.len(), Vec::with_capacity(items.len()));
            for (j, item) in items.into_iter().enumerate() {
                match url_entry(item, &["ws", "wss"], USAGE) {
                    Ok((url, None)) => out.push(url),
                    Ok((_, Some(_))) => f.problem(
                        &format!("ws_urls[{j}]"),
                        "max_requests_per_second applies to rpc_urls only".into(),
                    ),
                    Err(e) => f.problem(&format!("ws_urls[{j}]"), e),
                }
            }
            (out.len() == count).then_some(out)
        }
        Some(_) => {
            f.problem(
                "ws_urls",
                "must be \"derive\", \"off\" or a list of ws:// or wss:// URLs".into(),
            );
            None
        }
    }
}

/// The WebSocket URL of an HTTP endpoint: the same URL with ws/wss.
pub(super) fn derive_ws(http: &Secret) -> Option<Secret> {
    let mut u = url::Url::parse(http.expose()).ok()?;
    let scheme = if u.scheme() == "https" { "wss" } else { "ws" };
    u.set_scheme(scheme).ok()?;
    Some(Secret::new(u.to_string()))
}

/// A URL entry: a string, or a table with `url` or `url_file` (and, where
/// allowed, `max_requests_per_second`), whose scheme is one of `schemes`.
/// Messages never repeat the URL: it may hold an API key.
fn url_entry(value: toml::Value, schemes: &[&str], usage: &str) -> Result<(Secret, Option<f64>), String> {
    let (url, rate) = match value {
        toml::Value::String(u) => (u, None),
        toml::Value::Table(mut t) => {
            let url = match (t.remove("url"), t.remove("url_file")) {
                (Some(toml::Value::String(u)), None) => u,
                (None, Some(toml::Value::String(path))) => read_secret(&path)?.expose().to_string(),
                _ => return Err(usage.into()),
            };
            let rate = match t.remove("max_requests_per_second") {
                None => None,
                Some(toml::Value::Integer(n)) if n > 0 => Some(n as f64),
                Some(toml::Value::Float(x)) if x > 0.0 => Some(x),
                Some(_) => return Err("max_requests_per_second must be a positive number".into()),
            };
            if let Some(k) = t.keys().next() {
                return Err(format!("unknown key {k:?} in endpoint table"));
            }
            (url, rate)
        }
        _ => return Err(usage.into()),
    };
    match url::Url::parse(url.trim()) {
        Ok(p) if schemes.contains(&p.scheme()) && p.host_str().is_some() => Ok((Secret::new(url.trim()), rate)),
        _ => Err(format!(
            "must be a URL with a host and the scheme {}://",
            schemes.join(":// or ")
        )),
    }
}
