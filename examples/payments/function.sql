-- Crediting with a set-based handler function, called once per batch of
-- newly stored rows (never duplicates), in their transaction, before the
-- cursor moves. Configure it on the stream:
--
--   handler_function = "credit_burns"
--   revert_function  = "debit_burns"     # called with the rows a rewind removes
--
-- Faster than a row trigger for backfills: one UPDATE per batch. An
-- exception parks the failing event (logcursor finds it by handling halves
-- of the batch again) and the rest commits.

CREATE OR REPLACE FUNCTION credit_burns(batch events[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    unknown text;
BEGIN
    WITH burn AS (
        SELECT e.params->>'from' AS account, sum((e.params->>'amount')::numeric) AS amount
          FROM unnest(batch) AS e
         WHERE e.event_name = 'Burned'
         GROUP BY 1),
    credited AS (
        UPDATE balances b SET amount = b.amount + burn.amount
          FROM burn WHERE b.account = burn.account
        RETURNING b.account)
    SELECT account INTO unknown FROM burn
     WHERE account NOT IN (SELECT account FROM credited) LIMIT 1;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'unknown account %', unknown;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION debit_burns(batch events[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE balances b SET amount = b.amount - burn.amount
      FROM (SELECT e.params->>'from' AS account, sum((e.params->>'amount')::numeric) AS amount
              FROM unnest(batch) AS e
             WHERE e.event_name = 'Burned'
             GROUP BY 1) AS burn
     WHERE b.account = burn.account;
END
$$;
