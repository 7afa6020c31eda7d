-- Users and their API keys. Only a SHA-256 of each key's secret is stored.
CREATE TABLE users (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    secret_hash  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- A zap: a webhook trigger (identified by id + secret token) and its actions.
-- Deleting a zap only marks it, so its runs stay readable.
CREATE TABLE zaps (
    id          uuid PRIMARY KEY,
    owner_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        text NOT NULL,
    actions     jsonb NOT NULL,
    token_hash  bytea NOT NULL,
    status      text NOT NULL CHECK (status IN ('active', 'paused')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);
CREATE INDEX zaps_owner ON zaps (owner_id, id) WHERE deleted_at IS NULL;

-- A run: one webhook delivery. It keeps the actions as they were when the
-- webhook arrived, so editing the zap never changes a run under way.
CREATE TABLE zap_runs (
    id               uuid PRIMARY KEY,
    zap_id           uuid NOT NULL REFERENCES zaps (id),
    owner_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status           text NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    trigger          jsonb NOT NULL,
    headers          jsonb NOT NULL,
    query            jsonb NOT NULL,
    actions          jsonb NOT NULL,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (zap_id, idempotency_key)
);
CREATE INDEX zap_runs_owner ON zap_runs (owner_id, id DESC);
CREATE INDEX zap_runs_zap ON zap_runs (zap_id, id DESC);

-- One row per action of a run once a worker first picks it up.
CREATE TABLE zap_run_steps (
    run_id       uuid NOT NULL REFERENCES zap_runs (id) ON DELETE CASCADE,
    step         integer NOT NULL,
    action_type  text NOT NULL,
    status       text NOT NULL CHECK (status IN ('pending', 'running', 'retrying', 'succeeded', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    -- While status is 'running', the worker holding the step; another
    -- worker may take it over once the lease has expired.
    lease_until  timestamptz,
    output       jsonb,
    error        text,
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (run_id, step)
);

-- The transactional outbox: work announced in the same transaction as the
-- state change behind it. The processor relays due rows to Kafka and
-- deletes them once the broker acknowledged. A row with a future
-- available_at is a delayed retry.
CREATE TABLE zap_run_outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL,
    run_id        uuid NOT NULL,
    zap_id        uuid NOT NULL,
    stage         integer NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('step', 'dead_letter')),
    reason        text,
    available_at  timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX zap_run_outbox_due ON zap_run_outbox (available_at, id);

-- Wake relays as soon as work is committed (they also poll, so a lost
-- notification only delays).
CREATE FUNCTION zap_run_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('zap_run_outbox', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER zap_run_outbox_notify
    AFTER INSERT ON zap_run_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION zap_run_outbox_notify();
