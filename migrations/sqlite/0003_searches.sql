-- Hybrid PEFT searches (MambaPEFT's two-step TPE search): the search's state machine lives
-- here, so any process (the API's driver loop, a worker that finished a trial) can advance
-- it and a restart loses nothing. `version` is the optimistic lock every advance checks.
CREATE TABLE searches (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    tenant_id         TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    model             TEXT    NOT NULL,
    training_file     TEXT    NOT NULL,
    validation_file   TEXT    NOT NULL,
    objective         TEXT    NOT NULL CHECK (objective IN ('validation_loss', 'validation_accuracy')),
    -- trainer::search::hybrid::SearchSettings, resolved (methods listed, defaults filled).
    settings          TEXT    NOT NULL,
    -- The trial jobs' shared hyperparameters, resolved as a job stores them.
    hyperparameters   TEXT    NOT NULL,
    -- A vision model's class count (the head's size), NULL for language models.
    num_classes       INTEGER,
    total_steps       INTEGER,
    suffix            TEXT,
    train_best        INTEGER NOT NULL DEFAULT 0,
    status            TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    step              INTEGER NOT NULL DEFAULT 1,
    version           INTEGER NOT NULL DEFAULT 0,
    best              TEXT,
    error             TEXT,
    result_job_id     TEXT,
    event_count       INTEGER NOT NULL DEFAULT 0,
    idempotency_key   TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX searches_tenant_seq ON searches (tenant_id, seq);
CREATE INDEX searches_status ON searches (status);

-- One row per trial: `pending` (recorded, job not yet created), `running`, `complete`,
-- `pruned`, `skipped` (not trained: over budget or no method), `failed`, `cancelled`.
CREATE TABLE search_trials (
    search_id        TEXT    NOT NULL REFERENCES searches (id) ON DELETE CASCADE,
    number           INTEGER NOT NULL,
    step             INTEGER NOT NULL,
    params           TEXT    NOT NULL,
    configuration    TEXT    NOT NULL,
    method           TEXT,
    trainable_params INTEGER,
    job_id           TEXT,
    state            TEXT    NOT NULL CHECK (state IN ('pending', 'running', 'complete', 'pruned',
                                                       'skipped', 'failed', 'cancelled')),
    value            REAL,
    pruned_step      INTEGER,
    message          TEXT,
    created_at       INTEGER NOT NULL,
    finished_at      INTEGER,
    PRIMARY KEY (search_id, number)
);

CREATE TABLE search_events (
    search_id  TEXT    NOT NULL REFERENCES searches (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    id         TEXT    NOT NULL UNIQUE,
    level      TEXT    NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    event_type TEXT    NOT NULL DEFAULT 'message',
    message    TEXT    NOT NULL,
    data       TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (search_id, seq)
);

-- A trial job names its search and trial number.
ALTER TABLE jobs ADD COLUMN search_id TEXT;
ALTER TABLE jobs ADD COLUMN trial_number INTEGER;
CREATE INDEX jobs_search ON jobs (search_id);
