-- molt schema, version 1 (SQLite flavour; migrations/postgres/0001_init.sql is the same schema).
--
-- Conventions
-- * `seq` is an internal monotonically increasing key: it orders rows (newest-first pages,
--   FIFO queue) and is never shown to users. `id` is the public, prefixed id (`file-…`).
-- * Timestamps are unix seconds (like OpenAI's `created_at`), except columns ending in `_ms`
--   (queue leases), which are unix milliseconds taken from the database server's clock.
-- * JSON documents are TEXT here and JSONB in PostgreSQL.
-- * Booleans are INTEGER 0/1 here and BOOLEAN in PostgreSQL.

CREATE TABLE tenants (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    name           TEXT    NOT NULL UNIQUE,
    created_at     INTEGER NOT NULL,
    -- queue fairness: value of a global counter when this tenant last had a job claimed
    served_counter INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE api_keys (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    tenant_id    TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         TEXT,
    prefix       TEXT    NOT NULL,          -- first characters of the secret, for listing
    key_hash     TEXT    NOT NULL UNIQUE,   -- hex SHA-256 of the whole secret
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
CREATE INDEX api_keys_tenant_seq ON api_keys (tenant_id, seq);

CREATE TABLE files (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE,
    tenant_id       TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    purpose         TEXT    NOT NULL,
    filename        TEXT    NOT NULL,
    bytes           INTEGER NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('uploaded', 'processed', 'error')),
    status_details  TEXT,
    line_count      INTEGER,
    object_key      TEXT    NOT NULL,
    sha256          TEXT,
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX files_tenant_seq ON files (tenant_id, seq);

CREATE TABLE base_models (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT    NOT NULL UNIQUE,      -- the model name users pass as `model`
    location    TEXT    NOT NULL,             -- object-store prefix/URL or local folder
    config_hash TEXT    NOT NULL,
    config      TEXT    NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL
);

CREATE TABLE jobs (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT    NOT NULL UNIQUE,
    tenant_id           TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    model               TEXT    NOT NULL,
    training_file       TEXT    NOT NULL,
    validation_file     TEXT,
    method              TEXT    NOT NULL,
    hyperparameters     TEXT    NOT NULL,
    seed                INTEGER NOT NULL,
    suffix              TEXT,
    status              TEXT    NOT NULL CHECK (status IN ('validating_files', 'queued', 'running',
                                    'succeeded', 'failed', 'cancelling', 'cancelled')),
    step                INTEGER NOT NULL DEFAULT 0,
    total_steps         INTEGER,
    tokens_seen         INTEGER NOT NULL DEFAULT 0,
    estimated_finish    INTEGER,
    metrics             TEXT,
    error               TEXT,
    result_adapter_id   TEXT,
    fine_tuned_model    TEXT,
    trainable_params    INTEGER,
    lease_owner         TEXT,
    lease_expires_at_ms INTEGER,
    attempts            INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    cancel_requested    INTEGER NOT NULL DEFAULT 0,
    event_count         INTEGER NOT NULL DEFAULT 0,
    idempotency_key     TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX jobs_tenant_seq ON jobs (tenant_id, seq);
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE INDEX jobs_tenant_status ON jobs (tenant_id, status);

CREATE TABLE job_events (
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,                 -- 1, 2, 3 … per job
    id         TEXT    NOT NULL UNIQUE,
    level      TEXT    NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    event_type TEXT    NOT NULL DEFAULT 'message',
    message    TEXT    NOT NULL,
    data       TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE job_metrics (
    job_id            TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step              INTEGER NOT NULL,
    train_loss        REAL,
    learning_rate     REAL,
    tokens_per_second REAL,
    tokens_seen       INTEGER,
    valid_loss        REAL,
    valid_accuracy    REAL,
    extra             TEXT,
    created_at        INTEGER NOT NULL,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE checkpoints (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT    NOT NULL UNIQUE,
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step       INTEGER NOT NULL,
    object_key TEXT    NOT NULL,
    metrics    TEXT,
    created_at INTEGER NOT NULL,
    UNIQUE (job_id, step)
);

CREATE TABLE adapters (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL UNIQUE,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    job_id        TEXT    REFERENCES jobs (id) ON DELETE SET NULL,
    base_model    TEXT    NOT NULL,
    name          TEXT    NOT NULL,          -- the fine-tuned model name (`ft:…`)
    object_prefix TEXT    NOT NULL,
    bytes         INTEGER NOT NULL,
    config        TEXT    NOT NULL DEFAULT '{}',
    created_at    INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX adapters_tenant_seq ON adapters (tenant_id, seq);
