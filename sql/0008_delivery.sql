-- Delivery beyond the database: a commit-safe position on every row, durable
-- SQL consumers, and the webhook outbox (see src/store/consumers.rs,
-- src/store/outbox.rs and src/delivery/).

-- The transaction that stored a row (its top-level id, even inside a
-- savepoint). Positions are (inserted_xid, id), read only below the oldest
-- running transaction: every transaction with a lower id has finished, so a
-- row that commits later can never appear behind a position already passed
-- (gap fill and replays store older blocks later; events.id alone would skip
-- them). Rows stored before this version share the migration's id.
ALTER TABLE events ADD COLUMN inserted_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_stream_position_idx ON events (stream, inserted_xid, id);

-- A named consumer of one stream and the position it has applied up to.
CREATE TABLE consumers (
    name       text        PRIMARY KEY,
    stream     text        NOT NULL,
    after_xid  xid8        NOT NULL DEFAULT '0',
    after_id   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Claim the next events of a consumer, in position order, and move its
-- position past them — in the caller's transaction. Used as
--   BEGIN; SELECT * FROM logcursor_claim('billing', 'burns', 100); <apply>; COMMIT;
-- a rollback rolls the position back with the effects, so claim + apply +
-- COMMIT is exactly once for effects in this database. Another process
-- claiming for the same consumer meanwhile gets no rows (SKIP LOCKED): run
-- several side by side, each takes the next batch once the last commits.
CREATE FUNCTION logcursor_claim(consumer text, stream_name text, max_rows integer)
RETURNS SETOF events
LANGUAGE plpgsql AS $$
DECLARE
    c       consumers;
    horizon xid8 := pg_snapshot_xmin(pg_current_snapshot());
    last    events;
BEGIN
    INSERT INTO consumers (name, stream) VALUES (consumer, stream_name) ON CONFLICT (name) DO NOTHING;
    SELECT * INTO c FROM consumers WHERE name = consumer FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF c.stream <> stream_name THEN
        RAISE EXCEPTION 'consumer % reads stream %, not %', consumer, c.stream, stream_name
            USING ERRCODE = '22023';
    END IF;
    FOR last IN
        SELECT * FROM events e
         WHERE e.stream = c.stream
           AND (e.inserted_xid, e.id) > (c.after_xid, c.after_id)
           AND e.inserted_xid < horizon
         ORDER BY e.inserted_xid, e.id
         LIMIT max_rows
    LOOP
        RETURN NEXT last;
    END LOOP;
    IF last.id IS NOT NULL THEN
        UPDATE consumers SET after_xid = last.inserted_xid, after_id = last.id, updated_at = now()
         WHERE name = consumer;
    END IF;
    RETURN;
END
$$;
ALTER FUNCTION logcursor_claim(text, text, integer) SET search_path FROM CURRENT;

-- Webhook deliveries, written in the transaction that stores their events:
-- one row per (webhook, batch of new events), or a revert of events a rewind
-- removed after they were (or may have been) delivered. The body is fixed at
-- the first attempt (a revert's at once), so every retry sends the same
-- bytes under the same Idempotency-Key (delivery_id).
CREATE TABLE outbox (
    id              bigserial   PRIMARY KEY,
    delivery_id     uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    stream          text        NOT NULL,
    webhook         text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('events', 'revert')),
    event_ids       bigint[]    NOT NULL,
    body            jsonb,
    created_xid     xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_by      text,
    claimed_until   timestamptz,
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz
);
CREATE INDEX outbox_pending_idx ON outbox (stream, webhook, created_xid, id) WHERE status = 'pending';
