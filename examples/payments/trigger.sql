-- Crediting with row triggers on `events` (no Rust needed; run the stock
-- `logcursor` binary, or `payments` with PAYMENTS_CREDIT=sql).
--
-- AFTER INSERT fires once per newly stored row, in the transaction that
-- stores it, on every write path (INSERT … ON CONFLICT and COPY alike), and
-- never for a duplicate. A BEFORE trigger would also fire for duplicates
-- (before ON CONFLICT discards them): never put effects there.
-- AFTER DELETE fires for each row a rewind removes, in the rewind's
-- transaction: the debit that undoes the credit.
--
-- An exception (here: an unknown account) parks that one event in
-- dead_letters (kind 'handler') and the rest of the batch commits;
-- `dlq replay` stores it again, firing the trigger again.
--
-- Cost: one function call and one UPDATE per burn. When many burns credit
-- the same few accounts, every UPDATE of a row also walks the versions of
-- it that the same transaction made before (PostgreSQL cannot prune them
-- yet), so the cost grows with the square of the burns per tick: keep
-- ticks small (max_logs_per_tick) or use function.sql / the Rust handler,
-- which update each account once per batch. See README "Performance".

CREATE OR REPLACE FUNCTION credit_burn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE balances SET amount = amount + (NEW.params->>'amount')::numeric
     WHERE account = NEW.params->>'from';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown account %', NEW.params->>'from';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION debit_burn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE balances SET amount = amount - (OLD.params->>'amount')::numeric
     WHERE account = OLD.params->>'from';
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS credit_burn ON events;
CREATE TRIGGER credit_burn AFTER INSERT ON events FOR EACH ROW
    WHEN (NEW.stream = 'burns' AND NEW.event_name = 'Burned')
    EXECUTE FUNCTION credit_burn();

DROP TRIGGER IF EXISTS debit_burn ON events;
CREATE TRIGGER debit_burn AFTER DELETE ON events FOR EACH ROW
    WHEN (OLD.stream = 'burns' AND OLD.event_name = 'Burned')
    EXECUTE FUNCTION debit_burn();
