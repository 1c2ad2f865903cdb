-- An original is stored before its row exists. Each one is announced here first, and the row's
-- transaction removes the announcement: an API process killed in between leaves it behind, and the
-- engine's abandoned-upload sweeper removes the originals that never got a row.
CREATE TABLE upload_intents (
    image_id   uuid        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX upload_intents_created_idx ON upload_intents (created_at);
