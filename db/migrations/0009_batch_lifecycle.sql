-- A batch's life after its uploads: a cancel that settles.

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
