-- Every attempt at a step, as recorded when it ended (number, outcome,
-- error, time), oldest first.
ALTER TABLE zap_run_steps ADD COLUMN history jsonb NOT NULL DEFAULT '[]';
