-- Customer identity: bearer tokens, and the user each asynchronous request acts for.

-- A token is shown to its user once; only its SHA-256 is kept. Tokens are 256 random bits,
-- so a fast unsalted hash is enough: nobody can enumerate the space to reverse one.
CREATE TABLE user_tokens (
    id         BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    BIGINT      NOT NULL REFERENCES users (id),
    token_hash BYTEA       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ,
    CONSTRAINT user_token_hash_unique UNIQUE (token_hash),
    CONSTRAINT user_token_hash_is_sha256 CHECK (octet_length(token_hash) = 32)
);
CREATE INDEX user_tokens_by_user ON user_tokens (user_id);

-- Who sent a command: GET /requests/{id} answers only that user (anyone else gets 404).
-- The API always writes it; rows from before this column take it from their payload, which
-- names the user. NULL would be a request nobody can read, which only hand-made rows (tests
-- of unreadable commands) have. Not a foreign key: like the payload, it records who asked.
ALTER TABLE requests ADD COLUMN user_id BIGINT;
UPDATE requests SET user_id = (payload->>'userId')::bigint
 WHERE user_id IS NULL AND jsonb_typeof(payload->'userId') = 'number';

-- The unpaid orders of a user, counted at every order creation against
-- MAX_RESERVED_ORDERS_PER_USER: an index of only those rows, so the count never walks a
-- user's paid history.
CREATE INDEX orders_unpaid_by_user ON orders (user_id) WHERE status IN ('PENDING', 'RESERVED');
