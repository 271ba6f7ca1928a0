//! `block_cursors.rust_handlers`: the Rust handlers a stream's events have
//! been written with (the rule that uses it is in [`crate::write`]'s guard).

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};

/// The handlers recorded for `stream`, sorted; `None` when the stream has
/// no cursor row yet (nothing was written).
pub async fn recorded<C: GenericClient>(c: &C, stream: &str) -> Result<Option<Vec<String>>> {
    let row = c
        .query_typed_opt(
            "SELECT rust_handlers FROM block_cursors WHERE id = $1",
            &[(&stream, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("read the stream's Rust handlers"))?;
    Ok(row.map(|r| {
        let mut names: Vec<String> = r.get(0);
        names.sort();
        names
    }))
}

/// Adds `names` to `stream`'s record (kept sorted, each once).
pub async fn record<C: GenericClient>(c: &C, stream: &str, names: &[String]) -> Result<()> {
    c.execute_typed(
        "UPDATE block_cursors
            SET rust_handlers = ARRAY(SELECT DISTINCT x FROM unnest(rust_handlers || $2::text[]) x ORDER BY x)
          WHERE id = $1",
        &[(&stream, Type::TEXT), (&names, Type::TEXT_ARRAY)],
    )
    .await
    .map_err(StoreError::db("record the stream's Rust handlers"))?;
    Ok(())
}

/// Removes `names` from `stream`'s record.
pub async fn retire<C: GenericClient>(c: &C, stream: &str, names: &[String]) -> Result<()> {
    c.execute_typed(
        "UPDATE block_cursors
            SET rust_handlers = ARRAY(SELECT x FROM unnest(rust_handlers) x WHERE x <> ALL($2::text[]) ORDER BY x)
          WHERE id = $1",
        &[(&stream, Type::TEXT), (&names, Type::TEXT_ARRAY)],
    )
    .await
    .map_err(StoreError::db("retire Rust handlers"))?;
    Ok(())
}
