-- Reorg safety (see src/store/reorg.rs).

-- A halted stream (a reorg deeper than the safe head under on_deep_reorg =
-- "halt") says why here until `logcursor rewind` or a later good tick clears it.
ALTER TABLE block_cursors
    ADD COLUMN halted_at     timestamptz,
    ADD COLUMN halted_reason text;

-- Hashes of recently processed blocks (each range's last block and every block
-- that had logs), kept for max_reorg_depth blocks below the cursor: a rewind
-- walks them back to find the newest block that is still canonical.
CREATE TABLE block_hashes (
    stream       text   NOT NULL,
    block_number bigint NOT NULL,
    block_hash   bytea  NOT NULL CHECK (octet_length(block_hash) = 32),
    PRIMARY KEY (stream, block_number)
);

-- The only way the cursor ever moves back (I3), each time audited here.
CREATE TABLE cursor_rewinds (
    id             bigserial   PRIMARY KEY,
    stream         text        NOT NULL,
    from_block     bigint      NOT NULL,   -- the cursor before
    to_block       bigint      NOT NULL,   -- the cursor after (the common ancestor)
    old_hash       bytea,                  -- stored hash at from_block
    new_hash       bytea,                  -- canonical hash at to_block
    events_deleted bigint      NOT NULL,
    reason         text        NOT NULL,
    at             timestamptz NOT NULL DEFAULT now(),
    by             text        NOT NULL
);
CREATE INDEX cursor_rewinds_stream_idx ON cursor_rewinds (stream, at);
