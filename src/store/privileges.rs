//! Start-up checks for a least-privilege runtime role (`run --no-migrate`):
//! the schema is at this binary's version, and the role holds every
//! privilege the runtime uses — and an error names each one missing, as
//! "INSERT on events", rather than failing later inside a tick.
//! `sql/roles.example.sql` grants exactly this list.

use tokio_postgres::types::Type;

use super::migrate::MIGRATIONS;
use super::{GenericClient, Result, StoreError};

/// (kind, object, privileges) the runtime needs.
pub const NEEDED: &[(&str, &str, &[&str])] = &[
    ("table", "logcursor_migrations", &["SELECT"]),
    ("table", "block_cursors", &["SELECT", "INSERT", "UPDATE"]),
    ("table", "events", &["SELECT", "INSERT", "DELETE"]),
    ("table", "block_hashes", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    ("table", "cursor_rewinds", &["INSERT"]),
    ("table", "dead_letters", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    ("table", "failed_ranges", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    ("table", "stream_filters", &["SELECT", "INSERT", "UPDATE"]),
    ("table", "outbox", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    ("table", "consumers", &["SELECT"]),
    ("table", "removed_events", &["SELECT", "INSERT", "DELETE"]),
    ("sequence", "events_id_seq", &["USAGE"]),
    ("sequence", "cursor_rewinds_id_seq", &["USAGE"]),
    ("sequence", "dead_letters_id_seq", &["USAGE"]),
    ("sequence", "failed_ranges_id_seq", &["USAGE"]),
    ("sequence", "outbox_id_seq", &["USAGE"]),
    ("sequence", "removed_events_id_seq", &["USAGE"]),
    ("function", "logcursor_handle(text, bigint[])", &["EXECUTE"]),
];

/// Fails unless `schema` is migrated to this binary's version and the
/// current role holds every privilege in [`NEEDED`]. `c` must have the
/// schema on its `search_path` (a transaction from `Database::begin`).
pub async fn check<C: GenericClient>(c: &C, schema: &str) -> Result<()> {
    let need = MIGRATIONS.last().map_or(0, |m| m.version);
    let usage: Option<bool> = c
        .query_typed_one(
            "SELECT CASE WHEN to_regnamespace(quote_ident($1::text)) IS NOT NULL
                         THEN has_schema_privilege($1::text, 'USAGE') END",
            &[(&schema, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("look for the schema"))?
        .get(0);
    if usage == Some(false) {
        let role: String = c
            .query_typed_one("SELECT current_user::text", &[])
            .await
            .map_err(StoreError::db("read role"))?
            .get(0);
        return Err(StoreError::Privileges {
            role,
            missing: vec![format!("USAGE on schema {schema}")],
        });
    }
    let migrated: bool = c
        .query_typed_one("SELECT to_regclass('logcursor_migrations') IS NOT NULL", &[])
        .await
        .map_err(StoreError::db("look for the schema"))?
        .get(0);
    let have: Option<i32> = if migrated {
        c.query_typed_one("SELECT max(version) FROM logcursor_migrations", &[])
            .await
            .map_err(StoreError::db("read schema version"))?
            .get(0)
    } else {
        None
    };
    if have.unwrap_or(0) < need {
        return Err(StoreError::SchemaBehind {
            schema: schema.to_string(),
            have,
            need,
        });
    }
    let (mut kinds, mut objects, mut privileges) = (Vec::new(), Vec::new(), Vec::new());
    for (kind, object, privs) in NEEDED {
        for p in *privs {
            kinds.push(*kind);
            objects.push(*object);
            privileges.push(*p);
        }
    }
    let rows = c
        .query_typed(
            "SELECT current_user::text, u.p || ' on ' || CASE u.k WHEN 'table' THEN '' ELSE u.k || ' ' END || u.o
               FROM unnest($1::text[], $2::text[], $3::text[]) AS u(k, o, p)
              WHERE NOT CASE u.k WHEN 'table' THEN has_table_privilege(u.o, u.p)
                                 WHEN 'function' THEN has_function_privilege(u.o, u.p)
                                 ELSE has_sequence_privilege(u.o, u.p) END",
            &[
                (&kinds, Type::TEXT_ARRAY),
                (&objects, Type::TEXT_ARRAY),
                (&privileges, Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(StoreError::db("check privileges"))?;
    if let Some(first) = rows.first() {
        return Err(StoreError::Privileges {
            role: first.get(0),
            missing: rows.iter().map(|r| r.get(1)).collect(),
        });
    }
    Ok(())
}
