-- A user's requests, newest first (GET /users/{userId}/requests): request ids are UUIDv7,
-- so by id is by time, and the cursor is the last id of a page.
CREATE INDEX requests_by_user ON requests (user_id, id DESC);
