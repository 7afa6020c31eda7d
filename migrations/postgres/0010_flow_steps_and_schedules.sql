-- Flow steps and schedule triggers.
--
-- A zap's trigger: NULL for its webhook (every zap so far), else the
-- schedule as JSON. The next tick of each scheduled zap lives in a table of
-- its own, claimed there once per tick, so that ticking never touches the
-- zap's row (whose changes invalidate the webhook's cached zap).
ALTER TABLE zaps ADD COLUMN trigger jsonb;

CREATE TABLE zap_schedules (
    zap_id        uuid PRIMARY KEY REFERENCES zaps (id) ON DELETE CASCADE,
    next_tick_at  timestamptz NOT NULL
);
CREATE INDEX zap_schedules_due ON zap_schedules (next_tick_at);

-- scheduled_time: the tick a scheduled run runs for. stop_reason: why a
-- filter ended the run early. resume_at: when a run held by a delay step
-- goes on.
ALTER TABLE zap_runs
    ADD COLUMN scheduled_time timestamptz,
    ADD COLUMN stop_reason text,
    ADD COLUMN resume_at timestamptz;
