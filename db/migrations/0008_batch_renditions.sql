-- The renditions a batch's images get when their upload does not ask for its own (`?renditions=`
-- wins): names of `RENDITIONS` in configuration order; NULL for every configured rendition.
-- Checked against the configuration when the batch is made; a name the configuration no longer
-- has by the time an image joins is left out then (see ingest/routes/upload.py).
ALTER TABLE batches ADD COLUMN renditions text[]
    CHECK (renditions IS NULL OR cardinality(renditions) > 0);
