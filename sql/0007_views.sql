-- Typed views per event (see src/views.rs): `<stream>_<event>` with one
-- column per parameter, typed from the ABI, so queries need no JSON casts.
-- They are (re)defined by `logcursor migrate` and by `logcursor run` when
-- it migrates, from the configuration; nothing in `events` is rewritten.

-- The views logcursor defined, so that a changed configuration replaces its own.
CREATE TABLE logcursor_views (
    view_name  text        PRIMARY KEY,
    stream     text        NOT NULL,
    event      text        NOT NULL,
    columns    jsonb       NOT NULL,
    defined_at timestamptz NOT NULL DEFAULT now()
);

-- (Re)defines view `p_view` over `p_stream`'s rows of event `p_event`
-- whose params have every key of `p_columns` (overloads of one name are told
-- apart by their keys). `columns`: [{"column", "key", "type"}] with type one
-- of numeric, address, bool, text, bytes, json. Identifiers and literals
-- are quoted by format's %I and %L, never spliced.
CREATE FUNCTION logcursor_define_view(p_view text, p_stream text, p_event text, p_columns jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c    jsonb;
    k    text;
    cols text := '';
    keys text[] := '{}';
BEGIN
    IF EXISTS (SELECT 1 FROM logcursor_views v
                WHERE v.view_name = p_view AND v.stream = p_stream AND v.event = p_event AND v.columns = p_columns) THEN
        RETURN;  -- unchanged: no DROP, no lock on the view
    END IF;
    FOR c IN SELECT value FROM jsonb_array_elements(p_columns) LOOP
        k := c->>'key';
        cols := cols || ', ' || CASE c->>'type'
            WHEN 'numeric' THEN format('(e.params->>%L)::numeric', k)
            WHEN 'address' THEN format('e.params->>%L', k)
            WHEN 'bool'    THEN format('(e.params->%L)::boolean', k)
            WHEN 'text'    THEN format('CASE WHEN jsonb_typeof(e.params->%L) = %L THEN e.params->>%L END', k, 'string', k)
            WHEN 'bytes'   THEN format('decode(substr(e.params->>%L, 3), %L)', k, 'hex')
            ELSE format('e.params->%L', k)
        END || format(' AS %I', c->>'column');
        keys := keys || k;
    END LOOP;
    EXECUTE format('DROP VIEW IF EXISTS %I', p_view);
    EXECUTE format(
        'CREATE VIEW %I AS SELECT e.id AS event_id, e.block_number, e.block_timestamp, '
        || '%L || encode(e.block_hash, %L) AS block_hash, %L || encode(e.tx_hash, %L) AS tx_hash, e.log_index, '
        || '%L || encode(e.address, %L) AS address%s '
        || 'FROM events e WHERE e.stream = %L AND e.event_name = %L AND e.params ?& %L::text[]',
        p_view, '0x', 'hex', '0x', 'hex', '0x', 'hex', cols, p_stream, p_event, keys);
    INSERT INTO logcursor_views (view_name, stream, event, columns)
    VALUES (p_view, p_stream, p_event, p_columns)
    ON CONFLICT (view_name) DO UPDATE
        SET stream = EXCLUDED.stream, event = EXCLUDED.event, columns = EXCLUDED.columns, defined_at = now();
END
$$;
ALTER FUNCTION logcursor_define_view(text, text, text, jsonb) SET search_path FROM CURRENT;

-- Drops a view logcursor defined.
CREATE FUNCTION logcursor_drop_view(p_view text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP VIEW IF EXISTS %I', p_view);
    DELETE FROM logcursor_views v WHERE v.view_name = p_view;
END
$$;
ALTER FUNCTION logcursor_drop_view(text) SET search_path FROM CURRENT;
