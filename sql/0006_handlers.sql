-- Set-based SQL handlers (see src/write/). A stream's `handler_function` is
-- called through this once per batch of newly stored rows, and its
-- `revert_function` with the rows a rewind removes, each as
-- fn(batch events[]) with the rows in block and log order, inside the
-- transaction (and savepoint) that stores or removes them.
--
-- `fn` is resolved by the server (a regproc cast: it must exist, and may be
-- schema-qualified); it is never spliced into SQL by the client. The call
-- runs with this schema first on the search_path: a handler that uses
-- other schemas names them, or sets its own search_path.
CREATE FUNCTION logcursor_handle(fn text, ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    batch events[];
BEGIN
    SELECT array_agg(e ORDER BY e.block_number, e.log_index) INTO batch
      FROM events e WHERE e.id = ANY(ids);
    EXECUTE format('SELECT %s($1)', fn::regproc) USING batch;
END
$$;
ALTER FUNCTION logcursor_handle(text, bigint[]) SET search_path FROM CURRENT;
