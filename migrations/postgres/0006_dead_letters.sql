-- Steps that failed for good, kept where users can list them. The outbox
-- row of kind 'dead_letter' only announces one (to zap-events-dlq, with
-- Kafka); this table is the record, trimmed by the workers' retention.
CREATE TABLE zap_dead_letters (
    id          uuid PRIMARY KEY,
    run_id      uuid NOT NULL REFERENCES zap_runs (id) ON DELETE CASCADE,
    zap_id      uuid NOT NULL,
    owner_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    step        integer NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX zap_dead_letters_owner ON zap_dead_letters (owner_id, id DESC);
CREATE INDEX zap_dead_letters_age ON zap_dead_letters (created_at);

INSERT INTO zap_dead_letters (id, run_id, zap_id, owner_id, step, reason, created_at)
SELECT o.event_id, o.run_id, o.zap_id, r.owner_id, o.stage, coalesce(o.reason, ''), o.created_at
FROM zap_run_outbox o JOIN zap_runs r ON r.id = o.run_id
WHERE o.kind = 'dead_letter';

-- Workers without a broker drop dead-letter announcements; find them
-- without reading the live outbox.
CREATE INDEX zap_run_outbox_dead_letters ON zap_run_outbox (id) WHERE kind = 'dead_letter';
