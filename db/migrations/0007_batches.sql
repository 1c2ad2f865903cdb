-- Batches: a bulk job its owner follows, steers and is told about. Its counters are kept by
-- triggers on `images`, so every path that inserts, changes the status of or deletes an image
-- keeps them (claim, commit, give-up, the dead-letter reaper, `ops dlq`, cancel, retry, delete),
-- and reading a batch costs the same at 100,000 images as at 10.
CREATE TABLE batches (
    id             uuid        PRIMARY KEY,
    owner          text        NOT NULL,
    name           text,
    status         text        NOT NULL DEFAULT 'open'
                   CHECK (status IN ('open', 'closed', 'finished', 'cancelled')),
    callback_url   text,
    events         text[]      NOT NULL DEFAULT '{batch}',
    -- The webhook signing secret, encrypted with WEBHOOK_ENCRYPTION_KEY.
    webhook_secret text,
    pending        bigint      NOT NULL DEFAULT 0,
    processing     bigint      NOT NULL DEFAULT 0,
    completed      bigint      NOT NULL DEFAULT 0,
    failed         bigint      NOT NULL DEFAULT 0,
    cancelled      bigint      NOT NULL DEFAULT 0,
    bytes_in       bigint      NOT NULL DEFAULT 0,
    bytes_out      bigint      NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    closed_at      timestamptz,
    finished_at    timestamptz
);
CREATE INDEX batches_owner_created_idx ON batches (owner, created_at DESC, id DESC);
CREATE INDEX batches_created_idx ON batches (created_at DESC, id DESC);

-- `cancelled`: a terminal status for an image whose batch was cancelled before it started.
ALTER TABLE images DROP CONSTRAINT images_status_check;
ALTER TABLE images ADD CONSTRAINT images_status_check
    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled'));
ALTER TABLE images ADD COLUMN batch_id uuid REFERENCES batches (id);
-- The size of the result object, summed into its batch's `bytes_out`.
ALTER TABLE images ADD COLUMN result_size_bytes bigint;
-- A batch's images by status, newest first (`GET /batches/{id}/images?status=failed`), and the
-- retry and cancel statements.
CREATE INDEX images_batch_status_idx ON images (batch_id, status, created_at DESC, id DESC)
    WHERE batch_id IS NOT NULL;
CREATE INDEX images_batch_created_idx ON images (batch_id, created_at DESC, id DESC)
    WHERE batch_id IS NOT NULL;

-- Webhook deliveries: a durable outbox, filled in the transaction that makes the event happen
-- and emptied by the worker nodes' deliverer (at least once, with retries).
CREATE TABLE webhook_deliveries (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    batch_id        uuid        NOT NULL REFERENCES batches (id),
    event_type      text        NOT NULL,
    image_id        uuid,
    -- The batch row as it was when the event happened (`batch.finished`: a retry may reopen
    -- the batch before the first attempt), secret left out.
    snapshot        jsonb,
    -- The event's JSON, built at the first attempt and sent unchanged on every retry.
    payload         text,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    delivered_at    timestamptz,
    abandoned_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND abandoned_at IS NULL;
-- `ops status` counts the abandoned ones.
CREATE INDEX webhook_deliveries_abandoned_idx ON webhook_deliveries (abandoned_at)
    WHERE abandoned_at IS NOT NULL;

-- Adds signed per-status deltas to the batches' counters, then finishes every closed batch whose
-- last image just became terminal. The finishing UPDATE locks the batch row, so of two
-- transactions ending a batch's last images only one sees it `closed`: it finishes exactly once.
CREATE FUNCTION apply_batch_deltas(deltas jsonb) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- Locked in id order first: two commits touching the same batches never deadlock. (NO KEY
    -- UPDATE, as the UPDATE below takes: inserts of images referencing the batch go on.)
    PERFORM 1 FROM batches
      WHERE id IN (SELECT (e ->> 'batch_id')::uuid FROM jsonb_array_elements(deltas) AS e)
      ORDER BY id FOR NO KEY UPDATE;
    UPDATE batches AS b
       SET pending = b.pending + d.pending,
           processing = b.processing + d.processing,
           completed = b.completed + d.completed,
           failed = b.failed + d.failed,
           cancelled = b.cancelled + d.cancelled,
           bytes_in = b.bytes_in + d.bytes_in,
           bytes_out = b.bytes_out + d.bytes_out
      FROM jsonb_to_recordset(deltas) AS d(batch_id uuid, pending bigint, processing bigint,
                                          completed bigint, failed bigint, cancelled bigint,
                                          bytes_in bigint, bytes_out bigint)
     WHERE b.id = d.batch_id;
    PERFORM finish_batches_if_done(ARRAY(SELECT (e ->> 'batch_id')::uuid
                                           FROM jsonb_array_elements(deltas) AS e));
END $$;

CREATE FUNCTION finish_batches_if_done(ids uuid[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    WITH finished AS (
        UPDATE batches SET status = 'finished', finished_at = now()
         WHERE id = ANY(ids) AND status = 'closed' AND pending = 0 AND processing = 0
        RETURNING *
    )
    INSERT INTO webhook_deliveries (batch_id, event_type, snapshot)
    SELECT f.id, 'batch.finished', to_jsonb(f) - 'webhook_secret'
      FROM finished AS f WHERE f.callback_url IS NOT NULL;
END $$;

-- One row per (image, sign): +1 for a row as it is now, -1 for a row as it was.
CREATE FUNCTION batch_deltas_of(rows_now jsonb, rows_before jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH signed AS (
        SELECT r.batch_id, r.status, r.size_bytes, r.result_size_bytes, 1 AS sign
          FROM jsonb_to_recordset(rows_now) AS r(batch_id uuid, status text, size_bytes bigint,
                                                 result_size_bytes bigint)
         WHERE r.batch_id IS NOT NULL
        UNION ALL
        SELECT r.batch_id, r.status, r.size_bytes, r.result_size_bytes, -1
          FROM jsonb_to_recordset(rows_before) AS r(batch_id uuid, status text, size_bytes bigint,
                                                    result_size_bytes bigint)
         WHERE r.batch_id IS NOT NULL
    )
    SELECT coalesce(jsonb_agg(d), '[]'::jsonb) FROM (
        SELECT batch_id,
               coalesce(sum(sign) FILTER (WHERE status = 'pending'), 0) AS pending,
               coalesce(sum(sign) FILTER (WHERE status = 'processing'), 0) AS processing,
               coalesce(sum(sign) FILTER (WHERE status = 'completed'), 0) AS completed,
               coalesce(sum(sign) FILTER (WHERE status = 'failed'), 0) AS failed,
               coalesce(sum(sign) FILTER (WHERE status = 'cancelled'), 0) AS cancelled,
               coalesce(sum(sign * size_bytes), 0) AS bytes_in,
               coalesce(sum(sign * result_size_bytes) FILTER (WHERE status = 'completed'), 0)
                   AS bytes_out
          FROM signed GROUP BY batch_id
    ) AS d
$$;

CREATE FUNCTION images_batch_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE batch_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    PERFORM apply_batch_deltas(batch_deltas_of(
        (SELECT coalesce(jsonb_agg(n), '[]') FROM new_rows AS n WHERE n.batch_id IS NOT NULL),
        '[]'));
    RETURN NULL;
END $$;

CREATE FUNCTION images_batch_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE batch_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    PERFORM apply_batch_deltas(batch_deltas_of(
        '[]',
        (SELECT coalesce(jsonb_agg(o), '[]') FROM old_rows AS o WHERE o.batch_id IS NOT NULL)));
    RETURN NULL;
END $$;

-- Only rows whose status changed count; a batch's images with `image` events also get one
-- webhook delivery each as they become completed or failed. Most images belong to no batch and
-- these triggers run for every claim and commit of the engine, so each returns at once for a
-- statement that touched no image of a batch.
CREATE FUNCTION images_batch_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE batch_id IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM old_rows WHERE batch_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (batch_id, event_type, image_id)
    SELECT n.batch_id, 'image.' || n.status, n.id
      FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
      JOIN batches AS b ON b.id = n.batch_id
     WHERE n.status IS DISTINCT FROM o.status AND n.status IN ('completed', 'failed')
       AND b.callback_url IS NOT NULL AND 'image' = ANY(b.events);
    PERFORM apply_batch_deltas(batch_deltas_of(
        (SELECT coalesce(jsonb_agg(n), '[]') FROM new_rows AS n JOIN old_rows AS o USING (id)
          WHERE n.batch_id IS NOT NULL AND (n.status IS DISTINCT FROM o.status
                OR n.result_size_bytes IS DISTINCT FROM o.result_size_bytes)),
        (SELECT coalesce(jsonb_agg(o), '[]') FROM old_rows AS o JOIN new_rows AS n USING (id)
          WHERE o.batch_id IS NOT NULL AND (n.status IS DISTINCT FROM o.status
                OR n.result_size_bytes IS DISTINCT FROM o.result_size_bytes))));
    RETURN NULL;
END $$;

CREATE TRIGGER images_batch_insert AFTER INSERT ON images
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION images_batch_inserted();
CREATE TRIGGER images_batch_delete AFTER DELETE ON images
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION images_batch_deleted();
CREATE TRIGGER images_batch_update AFTER UPDATE ON images
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION images_batch_updated();
