//! `GET /users/{userId}/requests/stream`: a user's requests as they settle, as server-sent
//! events, read with a streaming HTTP client against the api and real workers: each event
//! is the request as `GET /requests/{id}` answers it; `Last-Event-ID` replays exactly what
//! was missed, in order, then live ones follow; another user's stream is refused; a stream
//! counts as one of the user's waits; a revoked token's stream ends; an idle stream outlives
//! the connection timeouts on its keep-alive comments; a lost notice, and a transaction that
//! commits after a later one, lose no event.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use testkit::{Answer, System, TestApp};

/// Long enough for a busy two-core machine; a healthy stream answers in milliseconds.
const PATIENCE: Duration = Duration::from_secs(30);

/// One block of a server-sent event stream: an event (maybe with no data: a position only),
/// or a comment.
#[derive(Debug, Default, Clone)]
struct Block {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    comment: bool,
}

impl Block {
    fn request(&self) -> Value {
        assert_eq!(self.event.as_deref(), Some("request"), "{self:?}");
        serde_json::from_str(self.data.as_deref().unwrap()).unwrap()
    }
}

/// A stream of server-sent events read as it comes.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    /// Opens `user`'s stream with `token`, or returns the refusal.
    async fn open(
        app: &TestApp,
        user: i64,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Result<Self, Answer> {
        let mut request = app
            .client
            .get(app.url(&format!("/users/{user}/requests/stream")))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        if response.status() != StatusCode::OK {
            return Err(testkit::read(response).await);
        }
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Ok(Self {
            response,
            buffer: String::new(),
        })
    }

    /// `user`'s stream with their token; it must open.
    async fn of(app: &TestApp, user: i64, last_event_id: Option<&str>) -> Self {
        let token = app.token_of(user).unwrap();
        Self::open(app, user, &token, last_event_id).await.unwrap()
    }

    /// The next block, `None` if the stream ended; fails the test after `within`.
    async fn next_block(&mut self, within: Duration) -> Option<Block> {
        tokio::time::timeout(within, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let raw: String = self.buffer.drain(..end + 2).collect();
                    return Some(parse_block(&raw));
                }
                match self.response.chunk().await {
                    Ok(Some(chunk)) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                    Ok(None) | Err(_) => return None,
                }
            }
        })
        .await
        .expect("the stream said something in time")
    }

    /// The next `request` event, past comments and positions.
    async fn next_event(&mut self) -> Block {
        loop {
            let block = self.next_block(PATIENCE).await.expect("the stream is open");
            if block.data.is_some() {
                return block;
            }
        }
    }

    /// Asserts that no `request` event comes within `quiet`.
    async fn assert_quiet(&mut self, quiet: Duration) {
        let until = tokio::time::Instant::now() + quiet;
        while let Ok(block) = tokio::time::timeout_at(until, self.next_block(PATIENCE)).await {
            let block = block.expect("the stream is open");
            assert!(block.data.is_none(), "nothing was to be sent yet: {block:?}");
        }
    }
}

fn parse_block(raw: &str) -> Block {
    let mut block = Block::default();
    for line in raw.lines() {
        if line.starts_with(':') {
            block.comment = true;
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
        match field {
            "id" => block.id = Some(value),
            "event" => block.event = Some(value),
            "data" => block.data = Some(value),
            _ => {}
        }
    }
    block
}

/// A command's request id, from its 202.
fn accepted(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    answer.body["requestId"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settled_commands_arrive_as_events_and_a_reconnection_gets_exactly_the_missed_ones() {
    let system = System::start(1).await;
    system.wait_for_owners(1).await;
    let user = system.app.create_users(1).await[0];
    assert_eq!(system.app.charge(user, 1_000_000).await.status, StatusCode::OK);
    let product = system.product(10_000, 100).await;
    let coupon = system.coupon(5).await;

    // Without Last-Event-ID the stream starts now, and says where first.
    let mut stream = EventStream::of(&system.app, user, None).await;
    let start = stream.next_block(PATIENCE).await.unwrap();
    assert!(start.id.is_some() && start.data.is_none(), "{start:?}");

    let issue = accepted(&system.issue(coupon, user).await);
    let first = stream.next_event().await;
    let create = accepted(&system.order(user, &[(product, 1)]).await);
    let second = stream.next_event().await;
    for (event, request) in [(&first, &issue), (&second, &create)] {
        let data = event.request();
        assert_eq!(data["requestId"], request.as_str());
        assert_eq!(data["status"], "SUCCEEDED");
        // Exactly what GET /requests/{id} answers.
        assert_eq!(data, system.app.get(&format!("/requests/{request}")).await.body);
    }
    let order_id = second.request()["result"]["orderId"].as_str().unwrap().to_owned();
    let last_seen = second.id.clone().unwrap();
    assert_ne!(first.id, second.id);
    drop(stream);

    // Away: three more settle, in the order they were sent (one user's orders and payments
    // share a partition), one of them a refusal.
    let missed = vec![
        accepted(&system.order(user, &[(product, 2)]).await),
        accepted(&system.pay(&order_id, user, Some(coupon)).await),
        accepted(&system.order(user, &[(product, 1_000)]).await),
    ];
    for request in &missed {
        system.outcome(request).await;
    }

    let mut stream = EventStream::of(&system.app, user, Some(&last_seen)).await;
    let mut replayed = Vec::new();
    for _ in &missed {
        replayed.push(stream.next_event().await);
    }
    let replayed_ids: Vec<String> = replayed
        .iter()
        .map(|event| event.request()["requestId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(replayed_ids, missed);
    assert_eq!(replayed[2].request()["error"]["code"], "ERR_ORDER_OUT_OF_STOCK");
    stream.assert_quiet(Duration::from_millis(500)).await;

    // Then live ones, a cancellation included (it settles a request too).
    let live = accepted(&system.order(user, &[(product, 1)]).await);
    assert_eq!(stream.next_event().await.request()["requestId"], live.as_str());

    // Resuming from the middle replays from there: the events' ids are positions.
    let from_middle = replayed[0].id.clone().unwrap();
    let mut again = EventStream::of(&system.app, user, Some(&from_middle)).await;
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(
            again.next_event().await.request()["requestId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(rest, vec![missed[1].clone(), missed[2].clone(), live.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_users_stream_and_malformed_positions_are_refused() {
    let system = System::start(0).await;
    let users = system.app.create_users(2).await;
    let (ann, bob) = (users[0], users[1]);
    let ann_token = system.app.token_of(ann).unwrap();

    let refused = EventStream::open(&system.app, bob, &ann_token, None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    assert_eq!(refused.code(), "ERR_FORBIDDEN");

    let anonymous = system
        .app
        .send_without_token(Method::GET, &format!("/users/{ann}/requests/stream"), None, &[])
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.code(), "ERR_UNAUTHORIZED");

    for bad in [
        "42",
        "not-a-position",
        "0193a3c8-1b2c-7d4e-8f00-123456789abc",
        &"g".repeat(48),
    ] {
        let refused = EventStream::open(&system.app, ann, &ann_token, Some(bad))
            .await
            .err()
            .unwrap();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{bad}: {refused:?}");
        assert_eq!(refused.code(), "ERR_INVALID_REQUEST");
    }
    let refused = system.app.get_as(ann, "/users/abc/requests/stream").await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.code(), "ERR_INVALID_REQUEST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_and_waits_count_together_against_the_users_bound() {
    let system = System::start(0).await;
    let users = system.app.create_users(2).await;
    let (ann, bob) = (users[0], users[1]);
    let coupon = system.coupon(5).await;
    // Nobody settles it: waits on it last their 30 s.
    let pending = accepted(&system.issue(coupon, ann).await);

    let mut streams = Vec::new();
    for _ in 0..10 {
        streams.push(EventStream::of(&system.app, ann, None).await);
    }
    let waiting_path = format!("/requests/{pending}?wait=30");
    let wait = || {
        let request = system
            .app
            .client
            .get(system.app.url(&waiting_path))
            .bearer_auth(system.app.token_of(ann).unwrap());
        tokio::spawn(request.send())
    };
    let mut waits: Vec<_> = (0..10).map(|_| wait()).collect();
    let token = system.app.token_of(ann).unwrap();
    // The 21st: refused once the ten waits are held (they are sent concurrently). A probe
    // that got in holds a place until the api sees it closed, so a wait sent meanwhile can
    // be the one refused: such a wait is sent again, and the probing goes on.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let refused = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refused a 21st wait"
        );
        match EventStream::open(&system.app, ann, &token, None).await {
            Err(answer) => break answer,
            Ok(extra) => drop(extra),
        }
        for held in &mut waits {
            if held.is_finished() {
                let ended = (&mut *held).await.unwrap().unwrap();
                assert_eq!(
                    ended.status(),
                    StatusCode::TOO_MANY_REQUESTS,
                    "a wait ended early"
                );
                *held = wait();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
    assert_eq!(refused.code(), "ERR_RATE_LIMITED");
    assert!(refused.headers.contains_key("retry-after"));
    let one_more_wait = system.app.get(&format!("/requests/{pending}?wait=1")).await;
    assert_eq!(one_more_wait.status, StatusCode::TOO_MANY_REQUESTS);

    // Another user's bound is their own.
    EventStream::of(&system.app, bob, None).await;

    // A stream closed gives its place back (once the api sees the connection closed).
    drop(streams.pop());
    let reopened = async {
        loop {
            if let Ok(stream) = EventStream::open(&system.app, ann, &token, None).await {
                return stream;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(PATIENCE, reopened).await.unwrap();
    for wait in waits {
        wait.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_ends_when_its_token_is_revoked() {
    let system = System::start(0).await;
    let user = system.app.create_users(1).await[0];
    // A second token (a second device), streaming; the first revokes it.
    let minted = system
        .app
        .post(&format!("/users/{user}/tokens"), serde_json::json!({}))
        .await;
    assert_eq!(minted.status, StatusCode::CREATED, "{minted:?}");
    let device = minted.body["token"].as_str().unwrap().to_owned();
    let mut stream = EventStream::open(&system.app, user, &device, None).await.unwrap();
    stream.next_block(PATIENCE).await.unwrap();

    let revoked = system
        .app
        .send(
            Method::DELETE,
            &format!("/users/{user}/tokens/current"),
            None,
            &[("Authorization", &format!("Bearer {device}"))],
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{revoked:?}");
    // Ended (not merely quiet): the next read finds the end of the stream.
    loop {
        match stream.next_block(PATIENCE).await {
            None => break,
            Some(block) => assert!(block.data.is_none(), "{block:?}"),
        }
    }
    let refused = EventStream::open(&system.app, user, &device, None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_stream_outlives_the_connection_timeouts_on_its_keep_alive() {
    // Timeouts far shorter than the silence below; a comment every 2 s.
    let system = System::start_with(1, |config| {
        config.http.header = Duration::from_millis(1_000);
        config.http.write = Duration::from_millis(1_000);
        config.request_stream_keepalive = Duration::from_secs(2);
    })
    .await;
    system.wait_for_owners(1).await;
    let user = system.app.create_users(1).await[0];
    let coupon = system.coupon(5).await;
    let mut stream = EventStream::of(&system.app, user, None).await;
    stream.next_block(PATIENCE).await.unwrap();

    let idle_until = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut comments = 0;
    while tokio::time::Instant::now() < idle_until {
        let block = stream.next_block(PATIENCE).await.expect("still open");
        assert!(block.comment && block.data.is_none(), "{block:?}");
        comments += 1;
    }
    assert!(comments >= 2, "{comments} keep-alive comments");
    let issue = accepted(&system.issue(coupon, user).await);
    assert_eq!(stream.next_event().await.request()["requestId"], issue.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_settled_without_a_notice_is_sent_by_the_sweep() {
    // As a worker that dies between its commit and its notice would leave it.
    let system = System::start(0).await;
    let user = system.app.create_users(1).await[0];
    let coupon = system.coupon(5).await;
    let request = accepted(&system.issue(coupon, user).await);
    let mut stream = EventStream::of(&system.app, user, None).await;
    stream.next_block(PATIENCE).await.unwrap();
    sqlx::query(
        "UPDATE requests SET status = 'SUCCEEDED', result = '{}', completed_at = now() WHERE id = $1::uuid",
    )
    .bind(&request)
    .execute(&system.app.db)
    .await
    .unwrap();
    assert_eq!(stream.next_event().await.request()["requestId"], request.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_settlement_commits_late_is_not_passed_over() {
    // Two settlements: the first to start commits last. The stream holds back the second
    // until the first has committed, then sends both in the order they started, so that a
    // position never lies past a request not yet sent.
    let system = System::start(0).await;
    let user = system.app.create_users(1).await[0];
    let coupon = system.coupon(5).await;
    let other_coupon = system.coupon(5).await;
    let early = accepted(&system.issue(coupon, user).await);
    let late = accepted(&system.issue(other_coupon, user).await);
    let mut stream = EventStream::of(&system.app, user, None).await;
    stream.next_block(PATIENCE).await.unwrap();

    let settle =
        "UPDATE requests SET status = 'SUCCEEDED', result = '{}', completed_at = now() WHERE id = $1::uuid";
    let mut slow = system.app.db.begin().await.unwrap();
    sqlx::query(settle)
        .bind(&early)
        .execute(&mut *slow)
        .await
        .unwrap();
    sqlx::query(settle)
        .bind(&late)
        .execute(&system.app.db)
        .await
        .unwrap();
    shared::store::settlements::announce(&system.app.db, &[late.parse().unwrap()]).await;
    stream.assert_quiet(Duration::from_secs(2)).await;

    slow.commit().await.unwrap();
    shared::store::settlements::announce(&system.app.db, &[early.parse().unwrap()]).await;
    let first = stream.next_event().await;
    let second = stream.next_event().await;
    assert_eq!(first.request()["requestId"], early.as_str());
    assert_eq!(second.request()["requestId"], late.as_str());

    // Resuming after the first sends the second again, and nothing before it.
    let mut resumed = EventStream::of(&system.app, user, first.id.as_deref()).await;
    assert_eq!(resumed.next_event().await.request()["requestId"], late.as_str());
    resumed.assert_quiet(Duration::from_millis(500)).await;
}
