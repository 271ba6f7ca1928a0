//! Typed views per event: for every stream and configured event a view
//! `<stream>_<event>` with one typed column per parameter, so that a query
//! reads `SELECT "from", amount FROM burns_burned` instead of casting JSON.
//! Defined by `logcursor migrate`, and by `logcursor run` when it migrates;
//! a changed configuration replaces its views (unchanged ones are left
//! alone); nothing in `events` is rewritten.
//!
//! | ABI type                      | column                                   |
//! |-------------------------------|------------------------------------------|
//! | `uint*`, `int*`               | `numeric`                                |
//! | `address`                     | `text`, lowercase 0x-hex                 |
//! | `bool`                        | `boolean`                                |
//! | `string`                      | `text` (NULL when kept as its bytes: see `chain::abi`) |
//! | `bytes`, `bytesN`             | `bytea`                                  |
//! | indexed `string`/`bytes`/arrays | `bytea`: the topic (a hash)            |
//! | arrays, tuples                | `jsonb`                                  |
//!
//! Every view also has `event_id`, `block_number`, `block_timestamp`,
//! `block_hash`, `tx_hash`, `log_index` and `address` (the emitting
//! contract; hashes and addresses as 0x-text).
//!
//! Names: stream and event in snake_case (`Burned` of stream `burns` →
//! `burns_burned`; characters other than letters and digits become `_`);
//! parameters in snake_case too (`tokenId` → `token_id`), and a parameter
//! named like a fixed column gets the prefix `param_`. Overloads of one
//! event name, or two streams whose names meet, get `_2`, `_3`, … in
//! configuration order. A name longer than PostgreSQL's 63 bytes is cut
//! and ends with 4 hex digits of a hash of the whole name.

use crate::chain::abi::Column;
use crate::config::Config;
use crate::store::migrate::MIGRATION_LOCK_CLASS;
use crate::store::pool::{Database, TxLimits};
use crate::store::StoreError;
use tokio_postgres::types::Type;

/// One view to define.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewSpec {
    pub name: String,
    pub stream: String,
    pub event: String,
    /// (column name, params key, SQL type name of `logcursor_define_view`).
    pub columns: Vec<(String, String, &'static str)>,
}

/// Columns every view has, before the parameters.
const FIXED: [&str; 7] = [
    "event_id",
    "block_number",
    "block_timestamp",
    "block_hash",
    "tx_hash",
    "log_index",
    "address",
];

/// The views of `cfg`, named as the module doc says.
pub fn plan(cfg: &Config) -> Vec<ViewSpec> {
    let mut taken: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for s in &cfg.streams {
        for layout in s.events.layouts() {
            let name = unique(
                &identifier(&format!("{}_{}", snake(&s.name), snake(&layout.name))),
                &taken,
            );
            taken.push(name.clone());
            let mut columns: Vec<(String, String, &'static str)> = Vec::new();
            for p in &layout.params {
                let mut column = snake(&p.name);
                if FIXED.contains(&column.as_str()) {
                    column = format!("param_{column}");
                }
                let used: Vec<String> = columns.iter().map(|(c, _, _)| c.clone()).collect();
                let column = unique(&identifier(&column), &used);
                let kind = match p.column {
                    Column::Numeric => "numeric",
                    Column::Address => "address",
                    Column::Bool => "bool",
                    Column::Text => "text",
                    Column::Bytes => "bytes",
                    Column::Json => "json",
                };
                columns.push((column, p.name.clone(), kind));
            }
            out.push(ViewSpec {
                name,
                stream: s.name.to_string(),
                event: layout.name,
                columns,
            });
        }
    }
    out
}

/// Defines the views of `cfg` in `db`'s schema and drops the views of its
/// streams that the configuration no longer has, serialized with
/// migrations (one replica at a time). Returns the views (re)defined.
pub async fn define(db: &Database, cfg: &Config) -> Result<Vec<String>, StoreError> {
    let specs = plan(cfg);
    let mut client = db.get().await?;
    let tx = db.begin(&mut client, TxLimits::SHORT).await?;
    tx.execute_typed(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[(&MIGRATION_LOCK_CLASS, Type::INT4), (&db.schema(), Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("take the migration lock"))?;
    for v in &specs {
        let columns = serde_json::Value::Array(
            v.columns
                .iter()
                .map(|(column, key, kind)| serde_json::json!({"column": column, "key": key, "type": kind}))
                .collect(),
        );
        tx.execute_typed(
            "SELECT logcursor_define_view($1, $2, $3, $4)",
            &[
                (&v.name, Type::TEXT),
                (&v.stream, Type::TEXT),
                (&v.event, Type::TEXT),
                (&columns, Type::JSONB),
            ],
        )
        .await
        .map_err(StoreError::db("define a typed view"))?;
    }
    let streams: Vec<&str> = cfg.streams.iter().map(|s| s.name.as_str()).collect();
    let names: Vec<&str> = specs.iter().map(|v| v.name.as_str()).collect();
    tx.execute_typed(
        "SELECT logcursor_drop_view(view_name) FROM logcursor_views
          WHERE stream = ANY($1) AND view_name <> ALL($2)",
        &[(&streams, Type::TEXT_ARRAY), (&names, Type::TEXT_ARRAY)],
    )
    .await
    .map_err(StoreError::db("drop replaced typed views"))?;
    tx.commit().await.map_err(StoreError::db("commit typed views"))?;
    Ok(specs.into_iter().map(|v| v.name).collect())
}

/// snake_case: lowercase, `_` before a word that starts with a capital,
/// anything but letters and digits becomes `_`.
pub fn snake(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    for (i, c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1);
            let boundary = prev.is_some_and(|p| p.is_ascii_lowercase() || p.is_ascii_digit())
                || (prev.is_some_and(|p| p.is_ascii_uppercase()) && next.is_some_and(|n| n.is_ascii_lowercase()));
            if boundary && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            out.push(*c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out
}

/// At most 63 bytes: a longer name is cut and ends with a hash of the whole.
fn identifier(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_string();
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(name.as_bytes());
    format!("{}_{}", &name[..58], hex::encode(&digest[..2]))
}

/// `name`, or `name_2`, `name_3`, … if taken.
fn unique(name: &str, taken: &[String]) -> String {
    if !taken.iter().any(|t| t == name) {
        return name.to_string();
    }
    (2..)
        .map(|n| identifier(&format!("{name}_{n}")))
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or_else(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_snake_case_and_unique() {
        assert_eq!(snake("Burned"), "burned");
        assert_eq!(snake("TransferSingle"), "transfer_single");
        assert_eq!(snake("NFTTransfer"), "nft_transfer");
        assert_eq!(snake("tokenId"), "token_id");
        assert_eq!(snake("a.b:c-d"), "a_b_c_d");
        let taken = vec!["burns_burned".to_string(), "burns_burned_2".to_string()];
        assert_eq!(unique("burns_burned", &taken), "burns_burned_3");
        let long = "x".repeat(80);
        let id = identifier(&long);
        assert_eq!(id.len(), 63);
        assert_ne!(identifier(&format!("{long}a")), identifier(&format!("{long}b")));
    }
}
