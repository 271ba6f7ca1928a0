-- Test and demo instrumentation, never part of the product schema: records
-- every move of every cursor, in commit order, so that a test can prove the
-- moves form one forward chain (no range processed twice, none skipped, never
-- backward) and the demo can show which replica processed which ranges.
SET client_min_messages = warning;

CREATE TABLE IF NOT EXISTS cursor_history (
    seq       bigserial   PRIMARY KEY,
    stream    text        NOT NULL,
    old_block bigint      NOT NULL,
    new_block bigint      NOT NULL,
    moved_by  text        NOT NULL,
    moved_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE OR REPLACE FUNCTION record_cursor_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cursor_history (stream, old_block, new_block, moved_by)
    VALUES (NEW.id, OLD.last_processed_block, NEW.last_processed_block, coalesce(NEW.updated_by, '?'));
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS cursor_history ON block_cursors;
-- Only moves: other updates (halt and failure bookkeeping) leave the cursor as it is.
CREATE TRIGGER cursor_history AFTER UPDATE ON block_cursors
    FOR EACH ROW WHEN (OLD.last_processed_block IS DISTINCT FROM NEW.last_processed_block)
    EXECUTE FUNCTION record_cursor_move();
