-- PostgreSQL is the command log: a command is accepted when its request row commits, and the
-- api that stored it publishes it afterwards, from memory, until the broker confirms it.
-- Nothing is written per command to say it was published. What is written instead:
--
-- * `requests.accepted_by`: the api process that stored the request, in the same insert.
-- * `api_instances`: one row per running api process, its heartbeat. When an api dies with
--   commands it had not published yet, a worker's sweeper publishes every PENDING request
--   that api accepted (a command published twice settles once) and then deletes its row.
CREATE TABLE api_instances (
    id           UUID        PRIMARY KEY,
    name         TEXT        NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A sweeper publishing this dead api's requests holds it until then, so that two
    -- worker replicas do not publish the same requests at once.
    swept_until  TIMESTAMPTZ
);

ALTER TABLE requests ADD COLUMN accepted_by UUID;
CREATE INDEX requests_pending_by_api ON requests (accepted_by, created_at) WHERE status = 'PENDING';

-- A command's Idempotency-Key lives with its request (one insert, not two): the 202 a replay
-- gets is the request's own (id, type, order), and `key_request` is the body the key was
-- first sent with, to tell a replay from a reuse. Refusals, which store no request, keep
-- their keys in idempotency_keys.
ALTER TABLE requests
    ADD COLUMN idempotency_scope TEXT,
    ADD COLUMN idempotency_key   TEXT,
    ADD COLUMN key_request       JSONB,
    ADD CONSTRAINT request_key_whole CHECK (
        (idempotency_key IS NULL) = (idempotency_scope IS NULL)
        AND (idempotency_key IS NULL) = (key_request IS NULL));
CREATE UNIQUE INDEX requests_by_idempotency_key ON requests (idempotency_scope, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Requests that the previous version stored and never saw confirmed are handed to the
-- sweeper as the requests of an api that is gone.
INSERT INTO api_instances (id, name, started_at, heartbeat_at)
VALUES ('00000000-0000-0000-0000-000000000000', 'requests stored before the command log',
        '-infinity', '-infinity');
UPDATE requests SET accepted_by = '00000000-0000-0000-0000-000000000000'
 WHERE status = 'PENDING' AND NOT published;

-- The previous sweep (`published`, `publish_after`) is over: its index cost an entry per
-- accepted command. The columns stay for a previous worker still running during a rolling
-- upgrade (it sets `published` when it settles); `publish_after` now defaults to never, so
-- such a worker's sweep leaves this version's requests alone. A later migration drops both.
DROP INDEX requests_to_publish;
ALTER TABLE requests ALTER COLUMN publish_after SET DEFAULT 'infinity';
