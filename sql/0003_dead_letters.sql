-- Nothing lost, nothing stuck (see src/store/dead_letters.rs and src/store/failed_ranges.rs).

-- A log that did not decode under the stream's configured events, kept whole
-- (topics and data as the node returned them) so it can be replayed later.
CREATE TABLE dead_letters (
    id              bigserial   PRIMARY KEY,
    stream          text        NOT NULL,
    chain_id        bigint      NOT NULL,
    block_number    bigint      NOT NULL,
    block_hash      bytea       NOT NULL,
    tx_hash         bytea       NOT NULL,
    log_index       integer     NOT NULL,
    address         bytea       NOT NULL,
    topics          bytea[]     NOT NULL,
    data            bytea       NOT NULL,
    error           text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (chain_id, tx_hash, log_index)
);
CREATE INDEX dead_letters_stream_idx ON dead_letters (stream, block_number);
