-- A replayed run points at the run it repeats; both keep their history.
ALTER TABLE zap_runs ADD COLUMN replay_of BLOB REFERENCES zap_runs (id);
CREATE INDEX zap_runs_failed ON zap_runs (zap_id, created_at) WHERE status = 'failed';
