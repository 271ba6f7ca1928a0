-- The payments example's own table: one row per account that may receive
-- credits. Apply it in logcursor's schema (database.schema, "public" by
-- default) after `migrate`; the handlers run with that schema first on the
-- search_path, so they name it unqualified.
--
-- An account "appears" when its row is inserted:
--   INSERT INTO balances (account) VALUES ('0x…');   -- lowercase hex, as events.params has it
CREATE TABLE IF NOT EXISTS balances (
    account text    PRIMARY KEY,
    amount  numeric NOT NULL DEFAULT 0
);
