-- A quorum queue counts every return of a message as a delivery, also one returned unread
-- (prefetched by a consumer whose partition was handed over, killed, or cut off by a
-- broker restart), so a healthy command in a long backlog can run out of deliveries
-- without any worker having tried and failed to settle it. Such a command is sent back to
-- its partition a bounded number of times before it counts as poison: `revivals` counts
-- them, and a letter that was revived is resolved `revived` (not open for operators).
ALTER TABLE dead_letters ADD COLUMN revivals INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_resolution_check;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_resolution_check
    CHECK (resolution IN ('replayed', 'discarded', 'no-op', 'revived'));
