-- Steps that failed for good, kept where users can list them. The outbox
-- row of kind 'dead_letter' only announces one; this table is the record,
-- trimmed by the workers' retention.
CREATE TABLE zap_dead_letters (
    id          BLOB PRIMARY KEY,
    run_id      BLOB NOT NULL REFERENCES zap_runs (id) ON DELETE CASCADE,
    zap_id      BLOB NOT NULL,
    owner_id    BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    step        INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX zap_dead_letters_owner ON zap_dead_letters (owner_id, id DESC);
CREATE INDEX zap_dead_letters_age ON zap_dead_letters (created_at);

INSERT INTO zap_dead_letters (id, run_id, zap_id, owner_id, step, reason, created_at)
SELECT o.event_id, o.run_id, o.zap_id, r.owner_id, o.stage, coalesce(o.reason, ''), o.created_at
FROM zap_run_outbox o JOIN zap_runs r ON r.id = o.run_id
WHERE o.kind = 'dead_letter';
