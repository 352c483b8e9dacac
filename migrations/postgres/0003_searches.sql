-- See migrations/sqlite/0003_searches.sql.
-- Hybrid PEFT searches (MambaPEFT's two-step TPE search): the search's state machine lives
-- here, so any process (the API's driver loop, a worker that finished a trial) can advance
-- it and a restart loses nothing. `version` is the optimistic lock every advance checks.
CREATE TABLE searches (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT    NOT NULL UNIQUE,
    tenant_id         TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    model             TEXT    NOT NULL,
    training_file     TEXT    NOT NULL,
    validation_file   TEXT    NOT NULL,
    objective         TEXT    NOT NULL CHECK (objective IN ('validation_loss', 'validation_accuracy')),
    -- trainer::search::hybrid::SearchSettings, resolved (methods listed, defaults filled).
    settings          JSONB   NOT NULL,
    -- The trial jobs' shared hyperparameters, resolved as a job stores them.
    hyperparameters   JSONB   NOT NULL,
    -- A vision model's class count (the head's size), NULL for language models.
    num_classes       BIGINT,
    total_steps       BIGINT,
    suffix            TEXT,
    train_best        BOOLEAN NOT NULL DEFAULT FALSE,
    status            TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    step              BIGINT  NOT NULL DEFAULT 1,
    version           BIGINT  NOT NULL DEFAULT 0,
    best              JSONB,
    error             JSONB,
    result_job_id     TEXT,
    event_count       BIGINT  NOT NULL DEFAULT 0,
    idempotency_key   TEXT,
    created_at        BIGINT  NOT NULL,
    updated_at        BIGINT  NOT NULL,
    started_at        BIGINT,
    finished_at       BIGINT,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX searches_tenant_seq ON searches (tenant_id, seq);
CREATE INDEX searches_status ON searches (status);

-- One row per trial: `pending` (recorded, job not yet created), `running`, `complete`,
-- `pruned`, `skipped` (not trained: over budget or no method), `failed`, `cancelled`.
CREATE TABLE search_trials (
    search_id        TEXT    NOT NULL REFERENCES searches (id) ON DELETE CASCADE,
    number           BIGINT  NOT NULL,
    step             BIGINT  NOT NULL,
    params           JSONB   NOT NULL,
    configuration    JSONB   NOT NULL,
    method           JSONB,
    trainable_params BIGINT,
    job_id           TEXT,
    state            TEXT    NOT NULL CHECK (state IN ('pending', 'running', 'complete', 'pruned',
                                                       'skipped', 'failed', 'cancelled')),
    value            DOUBLE PRECISION,
    pruned_step      BIGINT,
    message          TEXT,
    created_at       BIGINT  NOT NULL,
    finished_at      BIGINT,
    PRIMARY KEY (search_id, number)
);

CREATE TABLE search_events (
    search_id  TEXT    NOT NULL REFERENCES searches (id) ON DELETE CASCADE,
    seq        BIGINT  NOT NULL,
    id         TEXT    NOT NULL UNIQUE,
    level      TEXT    NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    event_type TEXT    NOT NULL DEFAULT 'message',
    message    TEXT    NOT NULL,
    data       JSONB,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (search_id, seq)
);

-- A trial job names its search and trial number.
ALTER TABLE jobs ADD COLUMN search_id TEXT;
ALTER TABLE jobs ADD COLUMN trial_number BIGINT;
CREATE INDEX jobs_search ON jobs (search_id);
