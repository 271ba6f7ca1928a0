-- Rewinds reach SQL consumers too: the events a rewind removes after a
-- consumer claimed them are kept here for that consumer, written in the
-- rewind's transaction (see src/store/consumers.rs), and claimed back by
-- logcursor_claim_reverts in the consumer's own transaction, which undoes
-- their effects: a removed event's effect is undone exactly once, like it
-- was applied.
CREATE TABLE consumer_reverts (
    id         bigserial   PRIMARY KEY,
    consumer   text        NOT NULL REFERENCES consumers (name) ON DELETE CASCADE,
    -- The removed row as it was (jsonb, not the events row type: a column
    -- of that type would forbid later ALTER TABLE events).
    event      jsonb       NOT NULL,
    removed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX consumer_reverts_consumer_idx ON consumer_reverts (consumer, id);

-- The next events whose effects `consumer` must undo, oldest removal first,
-- in the shape logcursor_claim returns; deleted in the caller's
-- transaction, so claim + undo + COMMIT is exactly once. Used as
--   BEGIN; SELECT * FROM logcursor_claim_reverts('billing', 100); <undo>; COMMIT;
-- before claiming new events. Another process claiming for the same
-- consumer meanwhile gets other rows (SKIP LOCKED).
CREATE FUNCTION logcursor_claim_reverts(consumer_name text, max_rows integer)
RETURNS SETOF events
LANGUAGE sql AS $$
    WITH taken AS (
        DELETE FROM consumer_reverts r
         WHERE r.id IN (SELECT q.id FROM consumer_reverts q
                         WHERE q.consumer = consumer_name
                         ORDER BY q.id LIMIT max_rows
                           FOR UPDATE SKIP LOCKED)
     RETURNING r.id, r.event)
    SELECT (jsonb_populate_record(NULL::events, t.event)).* FROM taken t ORDER BY t.id;
$$;
ALTER FUNCTION logcursor_claim_reverts(text, integer) SET search_path FROM CURRENT;
