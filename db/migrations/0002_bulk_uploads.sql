-- Content de-duplication looks up an owner's images by digest.
CREATE INDEX images_owner_sha256_idx ON images (owner, sha256);

-- The first answer to a request carrying an Idempotency-Key, replayed to its retries.
CREATE TABLE idempotency_keys (
    owner        text        NOT NULL,
    key          text        NOT NULL,
    request_hash text        NOT NULL,
    status_code  integer     NOT NULL,
    response     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
