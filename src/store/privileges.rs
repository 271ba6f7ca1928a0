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
    ("sequence", "events_id_seq", &["USAGE"]),
    ("sequence", "cursor_rewinds_id_seq", &["USAGE"]),
    ("sequence", "dead_letters_id_seq", &["USAGE"]),
    ("sequence", "failed_ranges_id_seq", &["USAGE"]),
];

/// Fails unless the schema is migrated to this binary's version and the
/// current role holds every privilege in [`NEEDED`].
pub async fn check<C: GenericClient>(c: &C) -> Result<()> {
    let need = MIGRATIONS.last().map_or(0, |m| m.version);
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
        return Err(StoreError::SchemaBehind { have, need });
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
            "SELECT current_user::text, u.p || ' on ' || CASE u.k WHEN 'sequence' THEN 'sequence ' ELSE '' END || u.o
               FROM unnest($1::text[], $2::text[], $3::text[]) AS u(k, o, p)
              WHERE NOT CASE u.k WHEN 'table' THEN has_table_privilege(u.o, u.p)
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
