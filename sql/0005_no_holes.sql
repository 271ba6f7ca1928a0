-- Exactly once, with no holes (see src/poller/tick.rs, src/write/ and
-- src/store/filters.rs).

-- I9: a cursor means "every log its filter selects, up to here", so the
-- filter that advances it is recorded with it: a replica with another filter
-- never advances it.
ALTER TABLE block_cursors
    ADD COLUMN chain_id           bigint,
    ADD COLUMN filter_fingerprint bytea CHECK (octet_length(filter_fingerprint) = 32);

-- Every filter a stream's cursor has advanced under. A replica whose filter
-- is listed here but is not the cursor's was replaced (an old replica during
-- a rolling update) and backs off; a filter not listed yet is adopted, and
-- what it adds below the cursor is backfilled.
CREATE TABLE stream_filters (
    stream      text        NOT NULL,
    fingerprint bytea       NOT NULL CHECK (octet_length(fingerprint) = 32),
    chain_id    bigint      NOT NULL,
    addresses   bytea[]     NOT NULL,
    topic0s     bytea[]     NOT NULL,
    adopted_at  timestamptz NOT NULL DEFAULT now(),
    adopted_by  text        NOT NULL,
    PRIMARY KEY (stream, fingerprint)
);

-- Block time on every row, from the headers the tick fetches (NULL for rows
-- stored before this version: filling them would need the chain).
ALTER TABLE events ADD COLUMN block_timestamp timestamptz;

-- Why a log was parked: it does not decode, PostgreSQL refused its row, or a
-- handler failed on it.
ALTER TABLE dead_letters
    ADD COLUMN kind text NOT NULL DEFAULT 'decode' CHECK (kind IN ('decode', 'data', 'handler'));

-- Backfills of what a changed filter adds below the cursor ride the gap-fill
-- machinery: a row per change, leased, resumable (done_to).
ALTER TABLE failed_ranges
    ADD COLUMN kind      text    NOT NULL DEFAULT 'skipped' CHECK (kind IN ('skipped', 'backfill')),
    ADD COLUMN addresses bytea[],   -- backfill: the added part of the filter
    ADD COLUMN topic0s   bytea[],
    ADD COLUMN done_to   bigint;    -- blocks up to here are stored (NULL: none yet)
ALTER TABLE failed_ranges DROP CONSTRAINT failed_ranges_stream_from_block_to_block_key;
CREATE UNIQUE INDEX failed_ranges_skipped_key ON failed_ranges (stream, from_block, to_block)
    WHERE kind = 'skipped';
CREATE UNIQUE INDEX failed_ranges_backfill_key ON failed_ranges (stream, from_block, to_block, addresses, topic0s)
    WHERE kind = 'backfill';
