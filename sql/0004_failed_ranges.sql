-- A stream that keeps failing says so (cleared by its next committed range).
ALTER TABLE block_cursors
    ADD COLUMN failing_since timestamptz,
    ADD COLUMN last_error    text;

-- Ranges the poller could not fetch and skipped (on_unfetchable_range =
-- "skip_and_backfill"), written in the transaction that moves the cursor past
-- them. The gap-fill worker of every replica claims due rows with FOR UPDATE
-- SKIP LOCKED and a lease computed from the database clock, refetches, stores
-- and deletes them; a row that fails max_attempts times is marked dead.
CREATE TABLE failed_ranges (
    id              bigserial   PRIMARY KEY,
    stream          text        NOT NULL,
    from_block      bigint      NOT NULL,
    to_block        bigint      NOT NULL CHECK (to_block >= from_block),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text        NOT NULL,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_by      text,
    claimed_until   timestamptz,
    dead            boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, from_block, to_block)
);
CREATE INDEX failed_ranges_due_idx ON failed_ranges (next_attempt_at) WHERE NOT dead;
