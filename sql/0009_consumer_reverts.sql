-- Rewinds reach SQL consumers too. Every event a rewind removes is kept in
-- removed_events, written in the rewind's transaction without waiting for
-- anyone. Each consumer resolves the removals of its stream in commit-safe
-- order (removed_xid, id), below the oldest running transaction like its
-- claims: a removed event at or below the consumer's position was applied,
-- and logcursor_claim_reverts gives it back to be undone, in the consumer's
-- own transaction; one above was never applied (it can no longer be) and is
-- passed over. logcursor_claim does not move a position while a removal
-- that needs undoing is unresolved (see src/store/consumers.rs).
CREATE TABLE removed_events (
    id          bigserial   PRIMARY KEY,
    stream      text        NOT NULL,
    -- The removed row as it was (jsonb, not the events row type: a column
    -- of that type would forbid later ALTER TABLE events).
    event       jsonb       NOT NULL,
    -- Its consumer position, (inserted_xid, id).
    event_xid   xid8        NOT NULL,
    event_id    bigint      NOT NULL,
    removed_xid xid8        NOT NULL DEFAULT pg_current_xact_id(),
    removed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX removed_events_position_idx ON removed_events (stream, removed_xid, id);

-- How far each consumer has resolved its stream's removals.
ALTER TABLE consumers
    ADD COLUMN removed_after_xid xid8   NOT NULL DEFAULT '0',
    ADD COLUMN removed_after_id  bigint NOT NULL DEFAULT 0;

-- Resolves the pending removals of consumer `consumer_name` (whose row the
-- caller holds FOR UPDATE) that committed below `horizon`, in order: one
-- above its position was never applied and is passed over; one at or below
-- it was applied, and is returned to be undone, up to `max_rows` of them.
-- Moves the consumer's removal position past what it resolved.
CREATE FUNCTION logcursor_resolve_removals(consumer_name text, horizon xid8, max_rows integer)
RETURNS jsonb[]
LANGUAGE plpgsql AS $$
DECLARE
    c    consumers;
    r    removed_events;
    undo jsonb[] := '{}';
BEGIN
    SELECT * INTO STRICT c FROM consumers WHERE name = consumer_name;
    FOR r IN
        SELECT * FROM removed_events
         WHERE stream = c.stream
           AND (removed_xid, id) > (c.removed_after_xid, c.removed_after_id)
           AND removed_xid < horizon
         ORDER BY removed_xid, id
    LOOP
        IF (r.event_xid, r.event_id) <= (c.after_xid, c.after_id) THEN
            EXIT WHEN cardinality(undo) >= max_rows;
            undo := undo || r.event;
        END IF;
        c.removed_after_xid := r.removed_xid;
        c.removed_after_id := r.id;
    END LOOP;
    UPDATE consumers SET removed_after_xid = c.removed_after_xid, removed_after_id = c.removed_after_id
     WHERE name = consumer_name;
    RETURN undo;
END
$$;
ALTER FUNCTION logcursor_resolve_removals(text, xid8, integer) SET search_path FROM CURRENT;

-- The next removed events whose effects `consumer_name` must undo, oldest
-- removal first, in the shape logcursor_claim returns; resolved in the
-- caller's transaction, so claim + undo + COMMIT is exactly once. Used as
--   BEGIN; SELECT * FROM logcursor_claim_reverts('billing', 100); <undo>; COMMIT;
-- before logcursor_claim (which raises while some are pending). Another
-- process holding the consumer meanwhile makes this return nothing.
CREATE FUNCTION logcursor_claim_reverts(consumer_name text, max_rows integer)
RETURNS SETOF events
LANGUAGE plpgsql AS $$
DECLARE
    horizon xid8 := pg_snapshot_xmin(pg_current_snapshot());
    undo    jsonb[];
BEGIN
    PERFORM 1 FROM consumers WHERE name = consumer_name FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    undo := logcursor_resolve_removals(consumer_name, horizon, max_rows);
    RETURN QUERY SELECT (jsonb_populate_record(NULL::events, u)).* FROM unnest(undo) WITH ORDINALITY AS t(u, n) ORDER BY n;
END
$$;
ALTER FUNCTION logcursor_claim_reverts(text, integer) SET search_path FROM CURRENT;

-- logcursor_claim, now resolving removals first: those the consumer never
-- applied are passed over; one it applied stops the claim with an error
-- until logcursor_claim_reverts gave it back; one not yet below the horizon
-- makes the claim return nothing (it comes back shortly).
CREATE OR REPLACE FUNCTION logcursor_claim(consumer text, stream_name text, max_rows integer)
RETURNS SETOF events
LANGUAGE plpgsql AS $$
DECLARE
    c       consumers;
    horizon xid8 := pg_snapshot_xmin(pg_current_snapshot());
    undo    jsonb[];
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
    undo := logcursor_resolve_removals(consumer, horizon, 1);
    IF cardinality(undo) > 0 THEN
        RAISE EXCEPTION 'consumer % applied events that a rewind removed: undo them first with logcursor_claim_reverts(%, n)', consumer, quote_literal(consumer)
            USING ERRCODE = '55000';
    END IF;
    SELECT * INTO c FROM consumers WHERE name = consumer;
    IF EXISTS (SELECT 1 FROM removed_events
                WHERE stream = c.stream
                  AND (removed_xid, id) > (c.removed_after_xid, c.removed_after_id)) THEN
        RETURN; -- a removal committed but not yet below the horizon
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
