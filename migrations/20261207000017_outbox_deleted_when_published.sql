-- A published outbox event is deleted, not claimed and marked: the relay selects due events
-- under an advisory lock (one relay at a time), publishes them with confirms and deletes
-- the confirmed ones, one row write per event instead of two updates.

-- Rows a relay already published and marked have nothing left to do.
DELETE FROM outbox WHERE published_at IS NOT NULL;

-- Both columns stay for now: during a rolling upgrade a relay of the previous version may
-- still run, claiming with `claimed_until` and marking with `published_at`, and the new
-- relay skips what it claimed or marked. The new relay sets neither. A row such a relay
-- marks after this migration stays (it is not published again, nor counted as backlog)
-- until a later migration, once no previous-version relay is left, deletes those rows and
-- drops both columns.
COMMENT ON COLUMN outbox.claimed_until IS
    'Set only by a relay of the previous version (claim), kept through the rolling upgrade.';
COMMENT ON COLUMN outbox.published_at IS
    'Set only by a relay of the previous version (mark); the relay now deletes published rows.';

-- `outbox_unpublished` (created_at, WHERE published_at IS NULL) stays as it is: every row the
-- new relay has not deleted is due, and its select (WHERE published_at IS NULL ORDER BY
-- created_at LIMIT n) and the backlog count read it.
