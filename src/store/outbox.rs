//! `outbox`: webhook deliveries written in the transaction that stores their
//! events (I7: a downstream delivery happens at least once with a unique
//! idempotency key; dead only after the configured attempts).
//!
//! A crash can lose neither an event nor its delivery: the row commits with
//! the events ([`enqueue`], called by the write seam) and leaves only when a
//! worker saw a 2xx ([`delivered`]) or gave up ([`failed`] → dead). A worker
//! claims a row with a lease on the database clock ([`claim`]); a crash
//! between the POST and [`delivered`] means one redelivery with the same
//! `delivery_id` (the Idempotency-Key) and the same body, fixed at the first
//! claim. Only the claimant records an outcome.
//!
//! Order: per webhook, rows are delivered in commit-safe order
//! (`created_xid`, `id`), read below the oldest running transaction, so a
//! delivery committed later never overtakes one committed earlier. An
//! ordered webhook has one delivery in flight at a time (a transaction-scoped
//! advisory lock per webhook serializes the claims of every replica), and a
//! failing one holds back the rest until it succeeds or dies.
//!
//! A revert never overtakes what it undoes: it is not claimable while a
//! delivery that carried any of its events is still pending (being retried,
//! or in flight), on an unordered webhook too. It goes once that delivery is
//! delivered or dead (the rule is in [`claim`] and [`next_due`] alike).

use std::time::Duration;

use tokio_postgres::types::Type;

use super::{GenericClient, Result, StoreError};

/// A claimed delivery, body fixed.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: i64,
    pub delivery_id: String,
    pub stream: String,
    pub webhook: String,
    /// The exact bytes to POST (and sign).
    pub body: String,
    /// Attempts before this one.
    pub attempts: i32,
    /// Events in it.
    pub events: usize,
}

/// A row, as `outbox list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: i64,
    pub delivery_id: String,
    pub stream: String,
    pub webhook: String,
    pub kind: String,
    pub events: i32,
    pub status: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
}

/// Writes one delivery per `batch_size` of `event_ids` (new events, in
/// order) for `webhook`, in the caller's transaction.
pub async fn enqueue<C: GenericClient>(
    c: &C,
    stream: &str,
    webhook: &str,
    event_ids: &[i64],
    batch_size: usize,
) -> Result<()> {
    let size = i32::try_from(batch_size.max(1)).unwrap_or(i32::MAX);
    c.execute_typed(
        "INSERT INTO outbox (stream, webhook, kind, event_ids)
         SELECT $1, $2, 'events', ($3::int8[])[i:i + $4 - 1]
           FROM generate_series(1, cardinality($3::int8[]), $4) AS i",
        &[
            (&stream, Type::TEXT),
            (&webhook, Type::TEXT),
            (&event_ids, Type::INT8_ARRAY),
            (&size, Type::INT4),
        ],
    )
    .await
    .map_err(StoreError::db("enqueue deliveries"))?;
    Ok(())
}

/// The JSON of one event `e` in a delivery body (and in a revert's).
macro_rules! event_json {
    () => {
        "jsonb_build_object(
            'chain_id', e.chain_id, 'block_number', e.block_number,
            'block_hash', '0x' || encode(e.block_hash, 'hex'), 'block_timestamp', e.block_timestamp,
            'tx_hash', '0x' || encode(e.tx_hash, 'hex'), 'log_index', e.log_index,
            'address', '0x' || encode(e.address, 'hex'), 'event', e.event_name, 'params', e.params)"
    };
}

/// Fixes a claimed delivery's body (at its first claim; later claims keep it).
const FIX_BODY: &str = concat!(
    "UPDATE outbox o SET body = coalesce(o.body, jsonb_build_object(
        'stream', o.stream, 'webhook', o.webhook, 'delivery_id', o.delivery_id::text, 'type', o.kind,
        'events', coalesce((SELECT jsonb_agg(",
    event_json!(),
    " ORDER BY e.block_number, e.log_index)
                              FROM events e WHERE e.id = ANY(o.event_ids)), '[]'::jsonb)))
      WHERE o.id = $1
     RETURNING o.delivery_id::text, o.body::text, o.attempts, jsonb_array_length(o.body->'events')"
);

/// Writes the revert deliveries of a rewind and trims what was not sent.
/// The rows are locked first (`FOR UPDATE` reads their latest version): a
/// claim that fixed a body meanwhile makes its delivery "sent", and is
/// reverted rather than trimmed.
const REVERT: &str = concat!(
    "WITH touched AS (
        SELECT id, webhook, event_ids, status, body IS NOT NULL AS sent
          FROM outbox WHERE stream = $1 AND kind = 'events' AND event_ids && $2::int8[]
           FOR UPDATE),
     reverts AS (
        INSERT INTO outbox (stream, webhook, kind, event_ids, body)
        SELECT $1, r.webhook, 'revert', r.ids, jsonb_build_object(
                 'stream', $1::text, 'webhook', r.webhook, 'delivery_id', r.delivery_id::text, 'type', 'revert',
                 'events', (SELECT jsonb_agg(",
    event_json!(),
    " ORDER BY e.block_number, e.log_index)
                              FROM events e WHERE e.id = ANY(r.ids)))
          FROM (SELECT t.webhook, gen_random_uuid() AS delivery_id, array_agg(DISTINCT x ORDER BY x) AS ids
                  FROM touched t, unnest(t.event_ids) x
                 WHERE (t.status = 'delivered' OR t.sent) AND x = ANY($2::int8[])
                 GROUP BY t.webhook) r
        RETURNING 1),
     trimmed AS (
        UPDATE outbox o SET event_ids = ARRAY(SELECT x FROM unnest(o.event_ids) x WHERE x <> ALL($2::int8[]))
          FROM touched t
         WHERE o.id = t.id AND t.status = 'pending' AND NOT t.sent
        RETURNING o.id)
     SELECT count(*) FROM reverts"
);

/// True of an outbox row `q` that may go now as far as reverts are
/// concerned: an `events` row, or a revert none of whose events is in a
/// pending `events` row (its original delivery is delivered or dead). Such
/// rows are always older than the revert (a rewind writes the revert of
/// rows that exist), so the ordered head is never held back by it.
macro_rules! not_held_back {
    () => {
        "(q.kind = 'events' OR NOT EXISTS (
            SELECT 1 FROM outbox p
             WHERE p.stream = q.stream AND p.webhook = q.webhook AND p.kind = 'events'
               AND p.status = 'pending' AND p.event_ids && q.event_ids))"
    };
}
/// Claims the next due delivery of `webhook` for `lease`. Ordered: the
/// oldest pending row only, and nothing while it is leased or waiting for
/// its retry; unordered: any due row not leased. The body is fixed here at
/// the first claim. Runs in its own short transaction (the caller's).
pub async fn claim<C: GenericClient>(
    c: &C,
    stream: &str,
    webhook: &str,
    ordered: bool,
    by: &str,
    lease: Duration,
) -> Result<Option<Delivery>> {
    let lease_ms = lease.as_secs_f64() * 1000.0;
    if ordered {
        let got: bool = c
            .query_typed_one(
                "SELECT pg_try_advisory_xact_lock(hashtext('logcursor outbox'), hashtext($1 || '/' || $2))",
                &[(&stream, Type::TEXT), (&webhook, Type::TEXT)],
            )
            .await
            .map_err(StoreError::db("serialize ordered claims"))?
            .get(0);
        if !got {
            return Ok(None);
        }
    }
    // The head (ordered) or the first due row (unordered), below the horizon.
    let sql = if ordered {
        "WITH head AS (
            SELECT id FROM outbox
             WHERE stream = $1 AND webhook = $2 AND status = 'pending'
               AND created_xid < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY created_xid, id LIMIT 1)
         UPDATE outbox o SET claimed_by = $3, claimed_until = clock_timestamp() + $4 * interval '1 millisecond'
           FROM head
          WHERE o.id = head.id AND o.next_attempt_at <= now()
            AND (o.claimed_until IS NULL OR o.claimed_until < clock_timestamp())
         RETURNING o.id"
    } else {
        concat!(
            "WITH due AS (
            SELECT id FROM outbox q
             WHERE stream = $1 AND webhook = $2 AND status = 'pending' AND next_attempt_at <= now()
               AND created_xid < pg_snapshot_xmin(pg_current_snapshot())
               AND (claimed_until IS NULL OR claimed_until < clock_timestamp())
               AND ",
            not_held_back!(),
            "
             ORDER BY created_xid, id LIMIT 1 FOR UPDATE SKIP LOCKED)
         UPDATE outbox o SET claimed_by = $3, claimed_until = clock_timestamp() + $4 * interval '1 millisecond'
           FROM due
          WHERE o.id = due.id
         RETURNING o.id"
        )
    };
    let Some(row) = c
        .query_typed_opt(
            sql,
            &[
                (&stream, Type::TEXT),
                (&webhook, Type::TEXT),
                (&by, Type::TEXT),
                (&lease_ms, Type::FLOAT8),
            ],
        )
        .await
        .map_err(StoreError::db("claim delivery"))?
    else {
        return Ok(None);
    };
    let id: i64 = row.get(0);
    let row = c
        .query_typed_one(FIX_BODY, &[(&id, Type::INT8)])
        .await
        .map_err(StoreError::db("fix delivery body"))?;
    Ok(Some(Delivery {
        id,
        delivery_id: row.get(0),
        stream: stream.to_string(),
        webhook: webhook.to_string(),
        body: row.get(1),
        attempts: row.get(2),
        events: usize::try_from(row.get::<_, i32>(3)).unwrap_or(0),
    }))
}

/// How long until the next pending delivery of `webhook` may be claimed,
/// by the claim's own rule (ordered: the oldest pending row only; both:
/// rows below the oldest running transaction): its retry time, or the end
/// of another worker's lease. Rows not below that horizon yet are looked
/// at again after [`HORIZON_WAIT`]. `None` when none is pending.
pub async fn next_due<C: GenericClient>(c: &C, stream: &str, webhook: &str, ordered: bool) -> Result<Option<Duration>> {
    let horizon_wait = HORIZON_WAIT.as_secs_f64();
    let row = c
        .query_typed_one(
            concat!(
                "WITH p AS (
                SELECT created_xid < pg_snapshot_xmin(pg_current_snapshot()) AS visible,
                       extract(epoch FROM greatest(next_attempt_at - now(),
                                                   coalesce(claimed_until - clock_timestamp(), interval '0'))) AS wait
                  FROM outbox q WHERE stream = $1 AND webhook = $2 AND status = 'pending' AND ",
                not_held_back!(),
                "
                 ORDER BY created_xid, id
                 LIMIT CASE WHEN $3 THEN 1 END)
             SELECT (CASE WHEN bool_or(visible) THEN min(wait) FILTER (WHERE visible)
                          WHEN count(*) > 0 THEN $4 END)::float8
               FROM p"
            ),
            &[
                (&stream, Type::TEXT),
                (&webhook, Type::TEXT),
                (&ordered, Type::BOOL),
                (&horizon_wait, Type::FLOAT8),
            ],
        )
        .await
        .map_err(StoreError::db("read next delivery"))?;
    Ok(row
        .get::<_, Option<f64>>(0)
        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0))))
}

/// Pending rows of transactions newer than the oldest one running are
/// looked at again after this long.
pub const HORIZON_WAIT: Duration = Duration::from_millis(50);

/// A 2xx: the delivery is done. The row stays, without its body, as the
/// record that its events were delivered (a later rewind reverts them)
/// until [`age`] removes it. Whoever claimed it last; a late duplicate is
/// harmless.
pub async fn delivered<C: GenericClient>(c: &C, id: i64, status: u16) -> Result<()> {
    let status = i32::from(status);
    c.execute_typed(
        "UPDATE outbox SET status = 'delivered', delivered_at = now(), attempts = attempts + 1, last_status = $2,
                body = NULL, claimed_by = NULL, claimed_until = NULL
          WHERE id = $1 AND status = 'pending'",
        &[(&id, Type::INT8), (&status, Type::INT4)],
    )
    .await
    .map_err(StoreError::db("record delivery"))?;
    Ok(())
}

/// A failed attempt.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    pub error: &'a str,
    /// When to try again (if not dead).
    pub retry_in: Duration,
    /// A refusal: dead now, whatever the attempts.
    pub refused: bool,
    /// Dead once this many attempts were made.
    pub max_attempts: u32,
}

/// Records a failed attempt by the claimant `by`: retried after `retry_in`,
/// or dead (a refusal, or the last attempt). Returns whether it is dead
/// now; `None` when `by` no longer holds the claim (nothing changed).
pub async fn failed<C: GenericClient>(c: &C, id: i64, by: &str, f: Failure<'_>) -> Result<Option<bool>> {
    let (status, error, dead) = (f.status.map(i32::from), f.error, f.refused);
    let max = i32::try_from(f.max_attempts).unwrap_or(i32::MAX);
    let retry_ms = f.retry_in.as_secs_f64() * 1000.0;
    let row = c
        .query_typed_opt(
            "UPDATE outbox
                SET attempts = attempts + 1, last_status = $3, last_error = $4,
                    claimed_by = NULL, claimed_until = NULL,
                    next_attempt_at = now() + $5 * interval '1 millisecond',
                    status = CASE WHEN $6 OR attempts + 1 >= $7 THEN 'dead' ELSE 'pending' END
              WHERE id = $1 AND claimed_by = $2 AND status = 'pending'
          RETURNING status = 'dead'",
            &[
                (&id, Type::INT8),
                (&by, Type::TEXT),
                (&status, Type::INT4),
                (&error, Type::TEXT),
                (&retry_ms, Type::FLOAT8),
                (&dead, Type::BOOL),
                (&max, Type::INT4),
            ],
        )
        .await
        .map_err(StoreError::db("record delivery failure"))?;
    Ok(row.map(|r| r.get(0)))
}

/// For a rewind that removes `removed` (ids) of `stream`: deliveries not
/// yet attempted forget those events (and go when left empty); for the
/// events that were (or may have been) delivered — in a delivered row, or in
/// a row with a fixed body — one `revert` delivery per webhook is written,
/// its body built now from the rows about to be removed. In the rewind's
/// transaction, before the rows are deleted.
pub async fn revert<C: GenericClient>(c: &C, stream: &str, removed: &[i64]) -> Result<u64> {
    if removed.is_empty() {
        return Ok(0);
    }
    let n: i64 = c
        .query_typed_one(REVERT, &[(&stream, Type::TEXT), (&removed, Type::INT8_ARRAY)])
        .await
        .map_err(StoreError::db("revert deliveries"))?
        .get(0);
    c.execute_typed(
        "DELETE FROM outbox WHERE stream = $1 AND kind = 'events' AND status = 'pending' AND body IS NULL
            AND cardinality(event_ids) = 0",
        &[(&stream, Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("drop emptied deliveries"))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Rows, newest first: of one webhook and/or status when given.
pub async fn list<C: GenericClient>(c: &C, webhook: Option<&str>, status: Option<&str>) -> Result<Vec<Row>> {
    let rows = c
        .query_typed(
            "SELECT id, delivery_id::text, stream, webhook, kind, cardinality(event_ids), status, attempts,
                    last_status, last_error
               FROM outbox
              WHERE ($1::text IS NULL OR webhook = $1) AND ($2::text IS NULL OR status = $2)
              ORDER BY id DESC LIMIT 1000",
            &[(&webhook, Type::TEXT), (&status, Type::TEXT)],
        )
        .await
        .map_err(StoreError::db("list deliveries"))?;
    Ok(rows
        .iter()
        .map(|r| Row {
            id: r.get(0),
            delivery_id: r.get(1),
            stream: r.get(2),
            webhook: r.get(3),
            kind: r.get(4),
            events: r.get(5),
            status: r.get(6),
            attempts: r.get(7),
            last_status: r.get(8),
            last_error: r.get(9),
        })
        .collect())
}

/// What [`replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Dead deliveries due again.
    pub due: u64,
    /// Dead deliveries of events a rewind removed since (which wrote a
    /// revert of them, when the webhook was configured): sending them again
    /// would apply what the receiver was told to undo, or was never
    /// canonical. Left dead.
    pub refused: Vec<i64>,
}

/// Dead deliveries (`ids`, or all when empty) become due again with their
/// attempts reset: same delivery id, same body, except those whose events a
/// rewind removed ([`Replayed::refused`]). In two statements, in the
/// caller's READ COMMITTED transaction: the rows are locked first, so the
/// check that follows sees every rewind that wrote a revert of them (it
/// locks them too, and committed before the lock was granted), and a
/// rewind that comes later waits, and writes a revert that waits for the
/// replayed delivery (see [`claim`]).
pub async fn replay<C: GenericClient>(c: &C, ids: &[i64]) -> Result<Replayed> {
    c.query_typed(
        "SELECT id FROM outbox WHERE status = 'dead' AND (cardinality($1::int8[]) = 0 OR id = ANY($1))
          ORDER BY id FOR UPDATE",
        &[(&ids, Type::INT8_ARRAY)],
    )
    .await
    .map_err(StoreError::db("lock dead deliveries"))?;
    let row = c
        .query_typed_one(
            "WITH asked AS (
                SELECT id, kind = 'events' AND EXISTS (
                         SELECT 1 FROM unnest(event_ids) x WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = x)
                       ) AS removed
                  FROM outbox
                 WHERE status = 'dead' AND (cardinality($1::int8[]) = 0 OR id = ANY($1))),
             due AS (
                UPDATE outbox o SET status = 'pending', attempts = 0, next_attempt_at = now(), claimed_by = NULL,
                       claimed_until = NULL
                  FROM asked a
                 WHERE o.id = a.id AND NOT a.removed AND o.status = 'dead'
                RETURNING o.id)
             SELECT (SELECT count(*) FROM due),
                    ARRAY(SELECT id FROM asked WHERE removed ORDER BY id)",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await
        .map_err(StoreError::db("replay deliveries"))?;
    Ok(Replayed {
        due: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        refused: row.get(1),
    })
}

/// Deletes deliveries for good (any status). Returns how many.
pub async fn discard<C: GenericClient>(c: &C, ids: &[i64]) -> Result<u64> {
    c.execute_typed("DELETE FROM outbox WHERE id = ANY($1)", &[(&ids, Type::INT8_ARRAY)])
        .await
        .map_err(StoreError::db("discard deliveries"))
}

/// Deletes the delivered rows of one webhook older than its `keep` (outbox aging).
pub async fn age<C: GenericClient>(c: &C, stream: &str, webhook: &str, keep: Duration) -> Result<u64> {
    let keep_ms = keep.as_secs_f64() * 1000.0;
    c.execute_typed(
        "DELETE FROM outbox WHERE stream = $2 AND webhook = $3 AND status = 'delivered'
            AND delivered_at < now() - $1 * interval '1 millisecond'",
        &[(&keep_ms, Type::FLOAT8), (&stream, Type::TEXT), (&webhook, Type::TEXT)],
    )
    .await
    .map_err(StoreError::db("age deliveries"))
}

/// Per (stream, webhook): pending rows, dead rows, and the age in seconds
/// of the oldest pending one.
pub async fn backlog<C: GenericClient>(c: &C) -> Result<Vec<(String, String, i64, i64, f64)>> {
    let rows = c
        .query_typed(
            "SELECT stream, webhook,
                    count(*) FILTER (WHERE status = 'pending'),
                    count(*) FILTER (WHERE status = 'dead'),
                    coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')), 0)::float8
               FROM outbox GROUP BY stream, webhook",
            &[],
        )
        .await
        .map_err(StoreError::db("read outbox backlog"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect())
}
