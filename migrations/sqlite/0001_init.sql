-- The embedded deployment's schema: the same tables as on PostgreSQL.
-- Ids are 16-byte blobs; times written by zapflow as text (RFC 3339), except
-- the two that are compared in queries (available_at, lease_until), which are
-- integer microseconds since the epoch.

CREATE TABLE users (
    id          BLOB PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL
);

CREATE TABLE api_keys (
    id           BLOB PRIMARY KEY,
    user_id      BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    secret_hash  BLOB NOT NULL,
    created_at   TEXT NOT NULL
);

CREATE TABLE zaps (
    id          BLOB PRIMARY KEY,
    owner_id    BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    actions     TEXT NOT NULL,
    token_hash  BLOB NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('active', 'paused')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    deleted_at  TEXT
);
CREATE INDEX zaps_owner ON zaps (owner_id, id) WHERE deleted_at IS NULL;

CREATE TABLE zap_runs (
    id               BLOB PRIMARY KEY,
    zap_id           BLOB NOT NULL REFERENCES zaps (id),
    owner_id         BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    trigger          TEXT NOT NULL,
    headers          TEXT NOT NULL,
    query            TEXT NOT NULL,
    actions          TEXT NOT NULL,
    idempotency_key  TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    finished_at      TEXT,
    UNIQUE (zap_id, idempotency_key)
);
CREATE INDEX zap_runs_owner ON zap_runs (owner_id, id DESC);
CREATE INDEX zap_runs_zap ON zap_runs (zap_id, id DESC);

CREATE TABLE zap_run_steps (
    run_id       BLOB NOT NULL REFERENCES zap_runs (id) ON DELETE CASCADE,
    step         INTEGER NOT NULL,
    action_type  TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'running', 'retrying', 'succeeded', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_until  INTEGER,
    output       TEXT,
    error        TEXT,
    started_at   TEXT,
    finished_at  TEXT,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE zap_run_outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      BLOB NOT NULL,
    run_id        BLOB NOT NULL,
    zap_id        BLOB NOT NULL,
    stage         INTEGER NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('step', 'dead_letter')),
    reason        TEXT,
    available_at  INTEGER NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE INDEX zap_run_outbox_due ON zap_run_outbox (kind, available_at, id);
