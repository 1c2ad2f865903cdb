-- Settled webhook events (delivered or abandoned), by when they settled: the worker nodes'
-- retention chore deletes those older than WEBHOOK_RETENTION_HOURS in small batches, and this
-- index lets each batch read only old settled rows, not the whole table. Undelivered rows are
-- not in it (the due index has them).
CREATE INDEX webhook_deliveries_settled_idx
    ON webhook_deliveries ((coalesce(delivered_at, abandoned_at)))
    WHERE coalesce(delivered_at, abandoned_at) IS NOT NULL;
