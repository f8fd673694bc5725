-- Why a worker gave up on a command (its last settlement error), beside the broker's
-- reason: `rejected` alone does not tell an operator what to fix.
ALTER TABLE dead_letters ADD COLUMN detail TEXT;
-- A replay that would change nothing now leaves its letter open rather than recording
-- 'no-op', so that it can still be discarded; the value stays allowed for old rows.
