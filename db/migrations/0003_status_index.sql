-- Operators' questions ("completed in the last minute", "failures by reason") and the outbox
-- sweeper look at recent rows by status.
CREATE INDEX images_status_updated_idx ON images (status, updated_at DESC);
