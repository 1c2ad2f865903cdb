-- A batch's life after its uploads: a cancel that settles, retention, and the per-owner limit on
-- open batches.

-- `cancelling`: cancelled, but images already started are still running. The batch becomes
-- `cancelled` (and its `batch.cancelled` event is written) once none is pending or processing,
-- in the same function that finishes a closed batch, so the event never comes before the last
-- change. Batches cancelled before this migration stay `cancelled`: their event was sent.
ALTER TABLE batches DROP CONSTRAINT batches_status_check;
ALTER TABLE batches ADD CONSTRAINT batches_status_check
    CHECK (status IN ('open', 'closed', 'finished', 'cancelling', 'cancelled'));

CREATE OR REPLACE FUNCTION finish_batches_if_done(ids uuid[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    WITH settled AS (
        UPDATE batches
           SET status = CASE status WHEN 'closed' THEN 'finished' ELSE 'cancelled' END,
               finished_at = now()
         WHERE id = ANY(ids) AND status IN ('closed', 'cancelling')
           AND pending = 0 AND processing = 0
        RETURNING *
    )
    INSERT INTO webhook_deliveries (batch_id, event_type, snapshot)
    SELECT s.id, CASE s.status WHEN 'finished' THEN 'batch.finished' ELSE 'batch.cancelled' END,
           to_jsonb(s) - 'webhook_secret'
      FROM settled AS s WHERE s.callback_url IS NOT NULL;
END $$;

-- Retention (engine/retention.py): settled batches by age, and terminal images of no batch by
-- age (a batch's images go with their batch, so its counters always equal its rows).
CREATE INDEX batches_settled_idx ON batches (finished_at)
    WHERE status IN ('finished', 'cancelled');
CREATE INDEX images_unbatched_terminal_idx ON images (updated_at)
    WHERE batch_id IS NULL AND status IN ('completed', 'failed', 'cancelled');

-- The objects of expired rows, written in the transaction that deletes the rows and removed
-- once the objects are gone: a node killed in between leaves them here for the next round, so
-- no object outlives the record of it and no row outlives its objects.
CREATE TABLE expired_objects (
    bucket     text        NOT NULL CHECK (bucket IN ('originals', 'results')),
    key        text        NOT NULL,
    image_id   uuid        NOT NULL,
    expired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, key)
);

-- MAX_OPEN_BATCHES_PER_USER counts an owner's open batches at every creation.
CREATE INDEX batches_open_owner_idx ON batches (owner) WHERE status = 'open';
