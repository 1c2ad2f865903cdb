-- The lane an image's job travels in, and for bulk work the shard (its owner's queue), so that
-- whoever publishes the job again (outbox sweeper, `ops dlq requeue`) sends it where it belongs.
-- Rows from before lanes read as bulk work of shard 0.
ALTER TABLE images
    ADD COLUMN lane  text    NOT NULL DEFAULT 'bulk' CHECK (lane IN ('interactive', 'bulk')),
    ADD COLUMN shard integer NOT NULL DEFAULT 0 CHECK (shard >= 0);
