-- Token lifecycle: tokens expire, a user can list and revoke them, and the api records when
-- each was last used.

-- When the token stops being accepted (NULL: never). Set by the api from TOKEN_TTL_DAYS when
-- it issues a token; tokens issued before this migration, which had no end, get the default
-- 90 days from their creation, so that a token stolen long ago does not live forever.
ALTER TABLE user_tokens ADD COLUMN expires_at TIMESTAMPTZ;
-- When the token was last seen, to the minute: the api keeps uses in memory and writes
-- them in bulk about once a minute, never one write per request.
ALTER TABLE user_tokens ADD COLUMN last_used_at TIMESTAMPTZ;
UPDATE user_tokens SET expires_at = created_at + interval '90 days' WHERE expires_at IS NULL;

-- A user's live tokens, listed and counted against MAX_TOKENS_PER_USER at every new token:
-- only the unrevoked rows, so neither walks a user's revoked history.
CREATE INDEX user_tokens_live_by_user ON user_tokens (user_id) WHERE revoked_at IS NULL;
