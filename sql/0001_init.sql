-- logcursor schema, version 1. Applied by `logcursor migrate` and at start of
-- `logcursor run`, inside one transaction holding a transaction-scoped
-- advisory lock (see src/store/migrate.rs). Operators and other programs query
-- these tables; the names are a public interface.

-- One row per stream: the last block whose logs are all stored (I1, I4).
-- Moved forward only, by compare-and-set, inside the tick's transaction (I3).
CREATE TABLE block_cursors (
    id                   text        PRIMARY KEY,
    last_processed_block bigint      NOT NULL CHECK (last_processed_block >= -1),
    last_block_hash      bytea       CHECK (octet_length(last_block_hash) = 32),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    updated_by           text
);

-- Every decoded log, stored exactly once per (chain_id, tx_hash, log_index):
-- a replay is a no-op (ON CONFLICT DO NOTHING), never an error.
CREATE TABLE events (
    id           bigserial   PRIMARY KEY,
    stream       text        NOT NULL,
    chain_id     bigint      NOT NULL,
    block_number bigint      NOT NULL CHECK (block_number >= 0),
    block_hash   bytea       NOT NULL CHECK (octet_length(block_hash) = 32),
    tx_hash      bytea       NOT NULL CHECK (octet_length(tx_hash) = 32),
    log_index    integer     NOT NULL CHECK (log_index >= 0),
    address      bytea       NOT NULL CHECK (octet_length(address) = 20),
    event_name   text        NOT NULL,
    params       jsonb       NOT NULL,
    inserted_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (chain_id, tx_hash, log_index)
);

-- Per-stream range scans: gap checks, reorg rewinds, "events of block N".
CREATE INDEX events_stream_block_idx ON events (stream, block_number);
