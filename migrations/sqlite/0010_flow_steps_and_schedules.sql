-- Flow steps and schedule triggers (see the PostgreSQL migration). As in
-- 0001, a time compared in queries (next_tick_at) is integer microseconds
-- since the epoch; the others are RFC 3339 text.
ALTER TABLE zaps ADD COLUMN trigger TEXT;

CREATE TABLE zap_schedules (
    zap_id        BLOB PRIMARY KEY REFERENCES zaps (id) ON DELETE CASCADE,
    next_tick_at  INTEGER NOT NULL
);
CREATE INDEX zap_schedules_due ON zap_schedules (next_tick_at);

ALTER TABLE zap_runs ADD COLUMN scheduled_time TEXT;
ALTER TABLE zap_runs ADD COLUMN stop_reason TEXT;
ALTER TABLE zap_runs ADD COLUMN resume_at TEXT;
