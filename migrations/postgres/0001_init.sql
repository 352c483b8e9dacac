-- molt schema, version 1 (PostgreSQL flavour; migrations/sqlite/0001_init.sql is the same schema).
--
-- Conventions
-- * `seq` is an internal monotonically increasing key: it orders rows (newest-first pages,
--   FIFO queue) and is never shown to users. `id` is the public, prefixed id (`file-…`).
-- * Timestamps are unix seconds (like OpenAI's `created_at`), except columns ending in `_ms`
--   (queue leases), which are unix milliseconds taken from the database server's clock.
-- * JSON documents are JSONB here and TEXT in SQLite.
-- * Booleans are BOOLEAN here and INTEGER 0/1 in SQLite.

CREATE TABLE tenants (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             TEXT    NOT NULL UNIQUE,
    name           TEXT    NOT NULL UNIQUE,
    created_at     BIGINT  NOT NULL,
    -- queue fairness: value of a global counter when this tenant last had a job claimed
    served_counter BIGINT  NOT NULL DEFAULT 0
);

CREATE TABLE api_keys (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    tenant_id    TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         TEXT,
    prefix       TEXT    NOT NULL,          -- first characters of the secret, for listing
    key_hash     TEXT    NOT NULL UNIQUE,   -- hex SHA-256 of the whole secret
    created_at   BIGINT  NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX api_keys_tenant_seq ON api_keys (tenant_id, seq);

CREATE TABLE files (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    tenant_id       TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    purpose         TEXT    NOT NULL,
    filename        TEXT    NOT NULL,
    bytes           BIGINT  NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('uploaded', 'processed', 'error')),
    status_details  TEXT,
    line_count      BIGINT,
    object_key      TEXT    NOT NULL,
    sha256          TEXT,
    idempotency_key TEXT,
    created_at      BIGINT  NOT NULL,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX files_tenant_seq ON files (tenant_id, seq);

CREATE TABLE base_models (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,      -- the model name users pass as `model`
    location    TEXT    NOT NULL,             -- object-store prefix/URL or local folder
    config_hash TEXT    NOT NULL,
    config      JSONB   NOT NULL DEFAULT '{}',
    created_at  BIGINT  NOT NULL
);

CREATE TABLE jobs (
    seq                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                  TEXT    NOT NULL UNIQUE,
    tenant_id           TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    model               TEXT    NOT NULL,
    training_file       TEXT    NOT NULL,
    validation_file     TEXT,
    method              JSONB   NOT NULL,
    hyperparameters     JSONB   NOT NULL,
    seed                BIGINT  NOT NULL,
    suffix              TEXT,
    status              TEXT    NOT NULL CHECK (status IN ('validating_files', 'queued', 'running',
                                    'succeeded', 'failed', 'cancelling', 'cancelled')),
    step                BIGINT  NOT NULL DEFAULT 0,
    total_steps         BIGINT,
    tokens_seen         BIGINT  NOT NULL DEFAULT 0,
    estimated_finish    BIGINT,
    metrics             JSONB,
    error               JSONB,
    result_adapter_id   TEXT,
    fine_tuned_model    TEXT,
    trainable_params    BIGINT,
    lease_owner         TEXT,
    lease_expires_at_ms BIGINT,
    attempts            BIGINT  NOT NULL DEFAULT 0,
    max_attempts        BIGINT  NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    cancel_requested    BOOLEAN NOT NULL DEFAULT FALSE,
    event_count         BIGINT  NOT NULL DEFAULT 0,
    idempotency_key     TEXT,
    created_at          BIGINT  NOT NULL,
    updated_at          BIGINT  NOT NULL,
    started_at          BIGINT,
    finished_at         BIGINT,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX jobs_tenant_seq ON jobs (tenant_id, seq);
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE INDEX jobs_tenant_status ON jobs (tenant_id, status);

CREATE TABLE job_events (
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq        BIGINT  NOT NULL,                 -- 1, 2, 3 … per job
    id         TEXT    NOT NULL UNIQUE,
    level      TEXT    NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    event_type TEXT    NOT NULL DEFAULT 'message',
    message    TEXT    NOT NULL,
    data       JSONB,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE job_metrics (
    job_id            TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step              BIGINT  NOT NULL,
    train_loss        DOUBLE PRECISION,
    learning_rate     DOUBLE PRECISION,
    tokens_per_second DOUBLE PRECISION,
    tokens_seen       BIGINT,
    valid_loss        DOUBLE PRECISION,
    valid_accuracy    DOUBLE PRECISION,
    extra             JSONB,
    created_at        BIGINT  NOT NULL,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE checkpoints (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step       BIGINT  NOT NULL,
    object_key TEXT    NOT NULL,
    metrics    JSONB,
    created_at BIGINT  NOT NULL,
    UNIQUE (job_id, step)
);

CREATE TABLE adapters (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            TEXT    NOT NULL UNIQUE,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    job_id        TEXT    REFERENCES jobs (id) ON DELETE SET NULL,
    base_model    TEXT    NOT NULL,
    name          TEXT    NOT NULL,          -- the fine-tuned model name (`ft:…`)
    object_prefix TEXT    NOT NULL,
    bytes         BIGINT  NOT NULL,
    config        JSONB   NOT NULL DEFAULT '{}',
    created_at    BIGINT  NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX adapters_tenant_seq ON adapters (tenant_id, seq);
