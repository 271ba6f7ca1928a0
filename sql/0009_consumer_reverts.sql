-- Rewinds reach SQL consumers too (see src/store/consumers.rs).
--
-- A rewind copies every event it removes into removed_events, in its own
-- transaction, unless the stream has no consumer and no claim in flight.
-- Each consumer resolves its stream's removals in order (removed_xid, id),
-- only those committed below the oldest running transaction (the horizon),
-- like its claims: a removed event at or below the consumer's position was
-- applied, and logcursor_claim_reverts returns it to be undone, in the
-- consumer's own transaction; one above it was never applied, and is passed
-- over. logcursor_claim never moves a position while a removal is
-- unresolved.
--
-- Claims of a stream hold a shared advisory lock for their transaction; a
-- rewind takes it exclusively only if no claim is in flight (it never
-- waits), and only then deletes the removals every consumer has resolved:
-- a consumer whose first claim is still in flight (its row not yet
-- visible) can therefore never lose one.
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

-- Internal to the two functions below (the caller holds the consumer's row
-- FOR UPDATE). Resolves consumer `c`'s removals committed below `horizon`,
-- in order, up to (not including) its (max_rows + 1)-th applied one: moves
-- its resolved mark past them and returns the applied ones' rows, most
-- recently applied first (undo in reverse).
CREATE FUNCTION logcursor_resolve_removals(c consumers, horizon xid8, max_rows integer)
RETURNS jsonb[]
LANGUAGE plpgsql AS $$
DECLARE
    stop_xid xid8;
    stop_id  bigint;
    mark     record;
    undo     jsonb[];
BEGIN
    -- The first applied removal past the batch: resolution stops before it.
    SELECT r.removed_xid, r.id INTO stop_xid, stop_id
      FROM removed_events r
     WHERE r.stream = c.stream
       AND (r.removed_xid, r.id) > (c.removed_after_xid, c.removed_after_id)
       AND r.removed_xid < horizon
       AND (r.event_xid, r.event_id) <= (c.after_xid, c.after_id)
     ORDER BY r.removed_xid, r.id
    OFFSET max_rows LIMIT 1;
    undo := ARRAY(
        SELECT r.event FROM removed_events r
         WHERE r.stream = c.stream
           AND (r.removed_xid, r.id) > (c.removed_after_xid, c.removed_after_id)
           AND r.removed_xid < horizon
           AND (stop_xid IS NULL OR (r.removed_xid, r.id) < (stop_xid, stop_id))
           AND (r.event_xid, r.event_id) <= (c.after_xid, c.after_id)
         ORDER BY r.event_xid DESC, r.event_id DESC);
    SELECT r.removed_xid, r.id INTO mark
      FROM removed_events r
     WHERE r.stream = c.stream
       AND (r.removed_xid, r.id) > (c.removed_after_xid, c.removed_after_id)
       AND r.removed_xid < horizon
       AND (stop_xid IS NULL OR (r.removed_xid, r.id) < (stop_xid, stop_id))
     ORDER BY r.removed_xid DESC, r.id DESC
     LIMIT 1;
    IF FOUND THEN
        UPDATE consumers SET removed_after_xid = mark.removed_xid, removed_after_id = mark.id
         WHERE name = c.name;
    END IF;
    RETURN undo;
END
$$;
ALTER FUNCTION logcursor_resolve_removals(consumers, xid8, integer) SET search_path FROM CURRENT;

-- Takes the consumer's row for this transaction, creating it on first use;
-- NULL when another process holds it (or it reads another stream: raises).
-- Claims run READ COMMITTED: a snapshot older than the stream's lock could
-- read events a rewind removed without keeping them.
CREATE FUNCTION logcursor_take_consumer(consumer_name text, stream_name text, max_rows integer)
RETURNS consumers
LANGUAGE plpgsql AS $$
DECLARE
    c consumers;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'logcursor consumers claim in READ COMMITTED transactions, not %',
            current_setting('transaction_isolation') USING ERRCODE = '25000';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows must be 1 or more, not %', coalesce(max_rows::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    -- Claims of a stream in flight: a rewind prunes nothing meanwhile.
    PERFORM pg_advisory_xact_lock_shared(hashtext('logcursor consumers'),
                                         hashtext(current_schema() || '/' || stream_name));
    IF NOT EXISTS (SELECT 1 FROM consumers WHERE name = consumer_name) THEN
        INSERT INTO consumers (name, stream) VALUES (consumer_name, stream_name) ON CONFLICT (name) DO NOTHING;
    END IF;
    SELECT * INTO c FROM consumers WHERE name = consumer_name FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF c.stream <> stream_name THEN
        RAISE EXCEPTION 'consumer % reads stream %, not %', consumer_name, c.stream, stream_name
            USING ERRCODE = '22023';
    END IF;
    RETURN c;
END
$$;
ALTER FUNCTION logcursor_take_consumer(text, text, integer) SET search_path FROM CURRENT;

-- The removed events whose effects `consumer_name` must undo, up to
-- `max_rows` (most recently applied first within a call, and within one
-- rewind across calls), in the shape logcursor_claim returns; resolved in the caller's transaction, so claim + undo + COMMIT
-- is exactly once. Used as
--   BEGIN;
--   SELECT * FROM logcursor_claim_reverts('billing', 'burns', 100);  -- undo each
--   SELECT * FROM logcursor_claim('billing', 'burns', 100);          -- apply each
--   COMMIT;
-- After it returned rows, logcursor_claim in the same transaction returns
-- nothing while more are to undo (the next transaction goes on). Another
-- process holding the consumer meanwhile makes both return nothing.
CREATE FUNCTION logcursor_claim_reverts(consumer_name text, stream_name text, max_rows integer)
RETURNS SETOF events
LANGUAGE plpgsql AS $$
DECLARE
    c    consumers := logcursor_take_consumer(consumer_name, stream_name, max_rows);
    undo jsonb[];
BEGIN
    IF c IS NULL THEN
        RETURN;
    END IF;
    undo := logcursor_resolve_removals(c, pg_snapshot_xmin(pg_current_snapshot()), max_rows);
    -- The consumers that claimed reverts in this transaction, as ,a,b,
    PERFORM set_config('logcursor.reverts_claimed',
                       coalesce(nullif(current_setting('logcursor.reverts_claimed', true), ''), ',')
                           || consumer_name || ',', true);
    RETURN QUERY SELECT p.*
                   FROM unnest(undo) WITH ORDINALITY AS t(u, n),
                        LATERAL jsonb_populate_record(NULL::events, t.u) AS p
                  ORDER BY t.n;
END
$$;
ALTER FUNCTION logcursor_claim_reverts(text, text, integer) SET search_path FROM CURRENT;

-- logcursor_claim, resolving removals first: those the consumer never
-- applied are passed over; one it applied stops the claim, with an error
-- naming logcursor_claim_reverts (or, after that ran in this transaction,
-- with no rows); one committed but not yet below the horizon makes it
-- return nothing (it comes back shortly). The rows are read before the
-- last check for removals, so a rewind committing meanwhile is seen.
CREATE OR REPLACE FUNCTION logcursor_claim(consumer text, stream_name text, max_rows integer)
RETURNS SETOF events
LANGUAGE plpgsql AS $$
DECLARE
    c       consumers := logcursor_take_consumer(consumer, stream_name, max_rows);
    horizon xid8 := pg_snapshot_xmin(pg_current_snapshot());
    got     events[];
    last    events;
BEGIN
    IF c IS NULL THEN
        RETURN;
    END IF;
    -- Passes over the removals it never applied, up to the first it did.
    PERFORM logcursor_resolve_removals(c, horizon, 0);
    IF EXISTS (SELECT 1 FROM removed_events r
                   WHERE r.stream = c.stream AND r.removed_xid < horizon
                     AND (r.removed_xid, r.id) > (c.removed_after_xid, c.removed_after_id)
                     AND (r.event_xid, r.event_id) <= (c.after_xid, c.after_id)) THEN
        IF position(',' || consumer || ',' IN coalesce(current_setting('logcursor.reverts_claimed', true), '')) = 0 THEN
            RAISE EXCEPTION 'consumer % applied events that a rewind removed: undo them first with logcursor_claim_reverts(%, %, n)',
                consumer, quote_literal(consumer), quote_literal(stream_name)
                USING ERRCODE = '55000';
        END IF;
        RETURN;
    END IF;
    got := ARRAY(
        SELECT e FROM events e
         WHERE e.stream = c.stream
           AND (e.inserted_xid, e.id) > (c.after_xid, c.after_id)
           AND e.inserted_xid < horizon
         ORDER BY e.inserted_xid, e.id
         LIMIT max_rows);
    -- Any removal not yet resolved (committed since, or not yet below the
    -- horizon): claim nothing this time.
    SELECT * INTO c FROM consumers WHERE name = consumer;
    IF EXISTS (SELECT 1 FROM removed_events r
                WHERE r.stream = c.stream
                  AND (r.removed_xid, r.id) > (c.removed_after_xid, c.removed_after_id)) THEN
        RETURN;
    END IF;
    IF cardinality(got) > 0 THEN
        last := got[cardinality(got)];
        UPDATE consumers SET after_xid = last.inserted_xid, after_id = last.id, updated_at = now()
         WHERE name = consumer;
    END IF;
    RETURN QUERY SELECT * FROM unnest(got);
END
$$;
ALTER FUNCTION logcursor_claim(text, text, integer) SET search_path FROM CURRENT;
