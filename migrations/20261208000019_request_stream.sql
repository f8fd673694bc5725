-- A user's settled requests in the order a stream of them sends them
-- (`GET /users/{userId}/requests/stream`), with a position a client resumes from.
--
-- Not `completed_at`: it is the settling transaction's start (`now()`), and transactions
-- commit in another order than they start (a batch queued on a hot coupon's row lock commits
-- after a later one of another partition). A stream that has sent the later one would never
-- send the earlier one. Instead each settled request keeps the id of the transaction that
-- settled it (64 bits, never wraps), and a stream sends only requests settled by
-- transactions older than every transaction still running (`pg_snapshot_xmin`): whatever
-- commits afterwards has a larger id, so a position (settled_xid, id) is exact to resume from.
--
-- Set by a trigger on the one change that settles a request (PENDING to terminal), so that
-- every way a request settles (a worker's batch, a dead letter, a client's cancellation)
-- sets it, and none of them had to change. Requests settled before this migration keep NULL
-- and are never streamed (no position a client holds can precede it).
ALTER TABLE requests ADD COLUMN settled_xid BIGINT;

CREATE FUNCTION requests_settled_xid() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.settled_xid := pg_current_xact_id()::text::bigint;
    RETURN NEW;
END $$;
CREATE TRIGGER requests_settled_xid
    BEFORE UPDATE OF status ON requests
    FOR EACH ROW
    WHEN (OLD.status = 'PENDING' AND NEW.status <> 'PENDING')
    EXECUTE FUNCTION requests_settled_xid();

-- A stream's read: one user's requests settled after a position, in order. The settling
-- update is not a HOT update already (status and completed_at are indexed), so this costs
-- one more index entry per settled request, nothing more.
CREATE INDEX requests_settled_by_user ON requests (user_id, settled_xid, id) WHERE settled_xid IS NOT NULL;
