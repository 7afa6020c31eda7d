-- no-transaction
-- Every table and index a commit changes costs it at least one page written
-- to the log and synced: a webhook's commit (with an earlier email's outcome)
-- wrote about fourteen. Two of those tables and indexes go, which takes
-- rebuilding their tables (SQLite changes neither a table's constraints nor
-- its rowid in place):
--
-- * zap_run_steps is keyed by (run_id, step) without a rowid: the key is the
--   table, not an index beside it;
-- * only runs with an idempotency key are in the index that keeps keys
--   unique per zap (most runs have none).
--
-- Dropping a table that others reference takes foreign keys off (with them
-- on, dropping zap_runs would delete its steps), and SQLite switches them
-- only outside a transaction: so this migration runs outside sqlx's, as one
-- transaction of its own that copies every row as it was.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;

CREATE TABLE zap_runs_rebuilt (
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
    replay_of        BLOB REFERENCES zap_runs (id),
    scheduled_time   TEXT,
    stop_reason      TEXT,
    resume_at        TEXT
);
INSERT INTO zap_runs_rebuilt (id, zap_id, owner_id, status, trigger, headers, query, actions,
                              idempotency_key, created_at, updated_at, finished_at, replay_of,
                              scheduled_time, stop_reason, resume_at)
SELECT id, zap_id, owner_id, status, trigger, headers, query, actions,
       idempotency_key, created_at, updated_at, finished_at, replay_of,
       scheduled_time, stop_reason, resume_at
FROM zap_runs ORDER BY id;
DROP TABLE zap_runs;
ALTER TABLE zap_runs_rebuilt RENAME TO zap_runs;
CREATE UNIQUE INDEX zap_runs_idempotency ON zap_runs (zap_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX zap_runs_owner ON zap_runs (owner_id, id DESC);
CREATE INDEX zap_runs_zap ON zap_runs (zap_id, id DESC);
CREATE INDEX zap_runs_failed ON zap_runs (zap_id, created_at) WHERE status = 'failed';
CREATE UNIQUE INDEX zap_runs_one_replay ON zap_runs (replay_of) WHERE replay_of IS NOT NULL;
CREATE INDEX zap_runs_changes ON zap_runs (owner_id, updated_at);

CREATE TABLE zap_run_steps_rebuilt (
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
    history      TEXT NOT NULL DEFAULT '[]',
    retry_at     INTEGER,
    PRIMARY KEY (run_id, step)
) WITHOUT ROWID;
INSERT INTO zap_run_steps_rebuilt (run_id, step, action_type, status, attempts, lease_until,
                                   output, error, started_at, finished_at, history, retry_at)
SELECT run_id, step, action_type, status, attempts, lease_until,
       output, error, started_at, finished_at, history, retry_at
FROM zap_run_steps ORDER BY run_id, step;
DROP TABLE zap_run_steps;
ALTER TABLE zap_run_steps_rebuilt RENAME TO zap_run_steps;

COMMIT;
PRAGMA foreign_keys = ON;
