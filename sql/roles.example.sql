-- Least privilege for logcursor: an owner role that runs migrations (DDL) and
-- a runtime role that replicas use (`logcursor run --no-migrate`), which can
-- only read and write logcursor's own tables. Everything lives in the schema
-- of `database.schema` (default public): pass the same name to psql with
-- `-v schema=NAME`. Names and passwords are examples; replace `logcursor`
-- (the database) as needed.
--
-- Part 1, as a superuser (or a role with CREATEROLE), before migrating:
--   psql "$ADMIN_URL" -v schema=app -v ON_ERROR_STOP=1 -f <(sed '/^-- PART 2$/,$d' sql/roles.example.sql)
\if :{?schema}
\else
\set schema public
\endif

CREATE ROLE logcursor_owner LOGIN PASSWORD 'change-me-owner';
CREATE ROLE logcursor_app LOGIN PASSWORD 'change-me-app';
GRANT CONNECT ON DATABASE logcursor TO logcursor_owner, logcursor_app;
CREATE SCHEMA IF NOT EXISTS :"schema" AUTHORIZATION logcursor_owner;
GRANT USAGE, CREATE ON SCHEMA :"schema" TO logcursor_owner;
GRANT USAGE ON SCHEMA :"schema" TO logcursor_app;

-- Then migrate as the owner:  DATABASE_URL=postgres://logcursor_owner:…@host/logcursor logcursor migrate --config …

-- PART 2
-- As logcursor_owner, after `logcursor migrate`: exactly what the runtime
-- uses (src/store/privileges.rs checks this list at start):
--   psql "$OWNER_URL" -v schema=app -v ON_ERROR_STOP=1 -f <(sed -n '/^-- PART 2$/,$p' sql/roles.example.sql)
SET search_path TO :"schema";
GRANT SELECT                         ON logcursor_migrations TO logcursor_app;
GRANT SELECT, INSERT, UPDATE         ON block_cursors        TO logcursor_app;
GRANT SELECT, INSERT, DELETE         ON events               TO logcursor_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON block_hashes         TO logcursor_app;
GRANT INSERT                         ON cursor_rewinds       TO logcursor_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON dead_letters         TO logcursor_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON failed_ranges        TO logcursor_app;
GRANT SELECT, INSERT, UPDATE         ON stream_filters       TO logcursor_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox               TO logcursor_app;
GRANT SELECT                         ON consumers            TO logcursor_app;
GRANT SELECT, INSERT, DELETE         ON removed_events       TO logcursor_app;
GRANT USAGE ON SEQUENCE events_id_seq, cursor_rewinds_id_seq, dead_letters_id_seq, failed_ranges_id_seq,
                        outbox_id_seq, removed_events_id_seq TO logcursor_app;
