-- Zaps are matched by name (`zapflow apply`), so a name is unique among an
-- owner's live zaps. Names already repeated keep working: every live zap
-- but the oldest of a name (ids are time-ordered) gets its id appended,
-- " (0190...)", which is deterministic and cannot collide. Deleted zaps
-- keep their names and do not count.
UPDATE zaps SET name = zaps.name || ' (' || zaps.id::text || ')'
FROM (
    SELECT id, row_number() OVER (PARTITION BY owner_id, name ORDER BY id) AS rank
    FROM zaps WHERE deleted_at IS NULL
) AS ranked
WHERE zaps.id = ranked.id AND ranked.rank > 1;
CREATE UNIQUE INDEX zaps_owner_name ON zaps (owner_id, name) WHERE deleted_at IS NULL;

-- WatchRuns reads an owner's runs by when they last changed: every step
-- that starts a run or ends an attempt sets the run's updated_at.
CREATE INDEX zap_runs_changes ON zap_runs (owner_id, updated_at);
