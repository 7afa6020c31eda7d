-- When a retrying step's next attempt is due: an event for the step that
-- comes sooner (a duplicate, a reschedule) leaves it alone.
ALTER TABLE zap_run_steps ADD COLUMN retry_at timestamptz;

-- A run is replayed at most once, so that a retried or concurrent ReplayRun
-- makes one replay; to run it yet again, replay the replay. Runs replayed
-- several times before this rule become a chain: each later replay now
-- replays the one before it.
UPDATE zap_runs AS later SET replay_of = chain.previous
FROM (
    SELECT id, lag(id) OVER (PARTITION BY replay_of ORDER BY created_at, id) AS previous
    FROM zap_runs WHERE replay_of IS NOT NULL
) AS chain
WHERE later.id = chain.id AND chain.previous IS NOT NULL;
CREATE UNIQUE INDEX zap_runs_one_replay ON zap_runs (replay_of) WHERE replay_of IS NOT NULL;
