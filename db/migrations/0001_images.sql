-- One row per uploaded image: who owns it, what was uploaded, and where processing stands.
CREATE TABLE images (
    id                  uuid PRIMARY KEY,
    owner               text        NOT NULL,
    filename            text        NOT NULL,
    content_type        text        NOT NULL,
    size_bytes          bigint      NOT NULL CHECK (size_bytes > 0),
    sha256              text        NOT NULL,
    source_width        integer     NOT NULL CHECK (source_width > 0),
    source_height       integer     NOT NULL CHECK (source_height > 0),
    status              text        NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    error               text,
    original_key        text        NOT NULL,
    result_key          text,
    result_content_type text,
    result_width        integer,
    result_height       integer,
    -- Set once the broker has confirmed the job message (transactional outbox marker).
    enqueued_at         timestamptz,
    attempts            integer     NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'completed' OR result_key IS NOT NULL),
    CHECK (status <> 'failed' OR error IS NOT NULL)
);

-- Listing a user's images, newest first, with keyset pagination.
CREATE INDEX images_owner_created_idx ON images (owner, created_at DESC, id DESC);
-- Listing everyone's images (admin), newest first.
CREATE INDEX images_created_idx ON images (created_at DESC, id DESC);
-- The outbox sweeper looks only at rows whose job message was never confirmed.
CREATE INDEX images_unenqueued_idx ON images (created_at) WHERE enqueued_at IS NULL;
