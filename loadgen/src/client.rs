//! A typed client of the HTTP contract (`../shared/API.md`): one method per call the
//! scenarios make, answering the status, the error code and the JSON body.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde_json::{json, Value};
use uuid::Uuid;

/// The header that marks an answer replayed for an `Idempotency-Key`.
const REPLAYED: &str = "idempotent-replayed";

/// One answer of the API.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// `code` of an error body (`ERR_…`), if the answer is one.
    pub code: Option<String>,
    pub body: Value,
    /// `Idempotent-Replayed: true`: the first answer to this key, sent again.
    pub replayed: bool,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<Duration>,
}

impl Answer {
    /// `202`, `410 ERR_COUPON_OUT_OF_STOCK`, … : how outcomes are counted.
    pub fn outcome(&self) -> String {
        match &self.code {
            Some(code) => format!("{} {code}", self.status),
            None => self.status.to_string(),
        }
    }

    /// The `requestId` of a `202 Accepted`.
    pub fn request_id(&self) -> Option<Uuid> {
        self.uuid_field("requestId")
    }

    pub fn uuid_field(&self, name: &str) -> Option<Uuid> {
        self.body.get(name)?.as_str()?.parse().ok()
    }

    pub fn i64_field(&self, name: &str) -> Option<i64> {
        self.body.get(name)?.as_i64()
    }

    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.body.get(name)?.as_str()
    }
}

/// The API at one base URL or spread over several (replicas of one deployment, each
/// request to the next in turn), over a pool of keep-alive connections.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    bases: Arc<[String]>,
    /// The replica the next request goes to, shared by clones.
    turn: Arc<AtomicUsize>,
    admin: HeaderMap,
    /// How long a patient client keeps sending a request again (see [`Api::patient`]).
    patience: Duration,
    /// What was answered to requests that were then sent again, by outcome.
    retried: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Whom this client can act for, shared by its clones.
    identities: Arc<Identities>,
    /// Seconds a command asks to be held until it is settled (`Prefer: respond-async,
    /// wait=N`); `None`: answered `202` at once.
    wait: Option<u64>,
    /// Where the moments of `503` answers are written, when somebody asks.
    unavailable: Option<Arc<Unavailable>>,
}

/// When clients were answered `503 Service Unavailable`: the fault suite tells how long
/// clients saw them during a fault.
#[derive(Debug, Default)]
pub struct Unavailable {
    seen: Mutex<Vec<tokio::time::Instant>>,
}

impl Unavailable {
    fn record(&self) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tokio::time::Instant::now());
    }

    /// The `503`s answered at or after `since`: how many, and the first and the last of
    /// them, as time after `since`.
    pub fn since(&self, since: tokio::time::Instant) -> Option<(usize, Duration, Duration)> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let after: Vec<Duration> = seen
            .iter()
            .filter(|at| **at >= since)
            .map(|at| at.duration_since(since))
            .collect();
        let first = after.iter().min()?;
        let last = after.iter().max()?;
        Some((after.len(), *first, *last))
    }
}

/// The bearer tokens of the users a client acts for, and who sent each command it was
/// answered `202` for (so that `GET /requests/{id}` goes with its sender's token).
#[derive(Debug, Default)]
struct Identities {
    tokens: RwLock<HashMap<i64, String>>,
    owners: Mutex<HashMap<Uuid, i64>>,
}

/// First wait before a request is sent again; grows 1.5x up to [`RETRY_MAX_WAIT`].
const RETRY_FIRST_WAIT: Duration = Duration::from_millis(100);
const RETRY_MAX_WAIT: Duration = Duration::from_secs(1);

impl Api {
    /// `base`: one base URL, or several separated by commas (replicas of the api); requests
    /// go to each in turn. `connections`: idle connections kept per host, so `connections`
    /// concurrent clients each keep theirs between requests.
    pub fn new(base: &str, admin_token: &str, connections: usize, timeout: Duration) -> anyhow::Result<Self> {
        let bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        anyhow::ensure!(!bases.is_empty(), "no api base URL in {base:?}");
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(connections.max(1))
            .timeout(timeout)
            .tcp_nodelay(true)
            .build()
            .context("cannot build the HTTP client")?;
        let mut admin = HeaderMap::new();
        admin.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {admin_token}"))
                .context("ADMIN_TOKEN is not a header value")?,
        );
        Ok(Self {
            http,
            bases: bases.into(),
            turn: Arc::default(),
            admin,
            patience: Duration::ZERO,
            retried: Arc::default(),
            identities: Arc::default(),
            wait: None,
            unavailable: None,
        })
    }

    /// A client that behaves as the contract asks of clients while the system is degraded:
    /// for up to `patience` it sends a request again, with the same `Idempotency-Key`, when
    /// there was no answer, when the answer was `429`, `502`, `503` or `504` (after its
    /// `Retry-After`), or `409 ERR_IDEMPOTENCY_KEY_IN_USE` (the first send is still being
    /// handled). The last answer is returned as it is.
    pub fn patient(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// A client whose commands wait up to `seconds` for their answer: `200` with the settled
    /// request when a worker settles it in time, else `202`.
    pub fn waiting(mut self, seconds: u64) -> Self {
        self.wait = Some(seconds);
        self
    }

    /// The same client (connections, tokens, patience, waiting) at another base URL: the
    /// synchronous peer, which answers the commands on the contract's paths.
    pub fn at(&self, base: &str) -> Self {
        Self {
            bases: vec![base.trim_end_matches('/').to_owned()].into(),
            turn: Arc::default(),
            ..self.clone()
        }
    }

    /// The same client, writing down when it is answered `503`.
    pub fn noting_unavailability(mut self, log: Arc<Unavailable>) -> Self {
        self.unavailable = Some(log);
        self
    }

    /// The base URL of the next request: the replicas in turn.
    fn base(&self) -> &str {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        &self.bases[turn % self.bases.len()]
    }

    /// Answers that made the client send a request again, by outcome.
    pub fn retried(&self) -> BTreeMap<String, u64> {
        self.retried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Remembers users' tokens: requests for them are sent with `Authorization: Bearer`.
    pub fn remember_tokens(&self, tokens: impl IntoIterator<Item = (i64, String)>) {
        self.identities
            .tokens
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(tokens);
    }

    /// Whether this client holds a token of `user`.
    pub fn knows(&self, user: i64) -> bool {
        self.identities
            .tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&user)
    }

    /// `request` sent as `user`, with their token when this client holds one.
    fn as_user(&self, request: reqwest::RequestBuilder, user: Option<i64>) -> reqwest::RequestBuilder {
        let tokens = self
            .identities
            .tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match user.and_then(|user| tokens.get(&user)) {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Remembers who sent the command an answer accepted.
    fn note_sender(&self, answer: &anyhow::Result<Answer>, user: i64) {
        if let Some(request) = answer.as_ref().ok().and_then(Answer::request_id) {
            self.identities
                .owners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(request, user);
        }
    }

    /// The user whose data `path` reads: `/users/{id}/…`, or the sender of `/requests/{id}`.
    fn reader_of(&self, path: &str) -> Option<i64> {
        let mut segments = path.split('?').next()?.trim_start_matches('/').split('/');
        match (segments.next()?, segments.next()?) {
            ("users", id) => id.parse().ok(),
            ("requests", id) => {
                let id: Uuid = id.parse().ok()?;
                let owners = self
                    .identities
                    .owners
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                owners.get(&id).copied()
            }
            _ => None,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        if self.patience.is_zero() {
            return self.send_once(request).await;
        }
        let deadline = tokio::time::Instant::now() + self.patience;
        let mut wait = RETRY_FIRST_WAIT;
        let mut request = request;
        loop {
            // Bodies here are JSON bytes, which always clone; without a copy, send once.
            let Some(again) = request.try_clone() else {
                return self.send_once(request).await;
            };
            let answer = self.send_once(request).await;
            let (outcome, asked_wait) = match &answer {
                Ok(a) => match retry_after(a) {
                    Some(asked) => (a.outcome(), asked),
                    None => return answer,
                },
                Err(e) => (transport_outcome(e), None),
            };
            let pause = asked_wait.unwrap_or(wait).min(RETRY_MAX_WAIT);
            if tokio::time::Instant::now() + pause >= deadline {
                return answer;
            }
            *self
                .retried
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(outcome)
                .or_default() += 1;
            tokio::time::sleep(pause).await;
            wait = wait.mul_f64(1.5).min(RETRY_MAX_WAIT);
            request = again;
        }
    }

    async fn send_once(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        if status == 503 {
            if let Some(log) = &self.unavailable {
                log.record();
            }
        }
        let replayed = response
            .headers()
            .get(REPLAYED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = response.bytes().await?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let code = (status >= 400)
            .then(|| body.get("code").and_then(Value::as_str).map(str::to_owned))
            .flatten();
        Ok(Answer {
            status,
            code,
            body,
            replayed,
            retry_after,
        })
    }

    fn post(&self, path: &str, body: &Value, key: Option<&str>) -> reqwest::RequestBuilder {
        let mut request = self.http.post(format!("{}{path}", self.base())).json(body);
        if let Some(seconds) = self.wait {
            request = request.header("prefer", format!("respond-async, wait={seconds}"));
        }
        match key {
            Some(key) => request.header("idempotency-key", key),
            None => request,
        }
    }

    /// `GET {path}`, e.g. `/products?limit=20`; as the user the path is about, if any.
    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        let request = self.http.get(format!("{}{path}", self.base()));
        self.send(self.as_user(request, self.reader_of(path))).await
    }

    /// `POST /users`; the new user's id (whose token this client keeps).
    pub async fn create_user(&self, name: &str) -> anyhow::Result<i64> {
        let answer = self
            .send(self.post("/users", &json!({ "name": name }), None))
            .await?;
        let user = created_id(&answer, "userId").context("POST /users")?;
        let token = answer
            .str_field("token")
            .context("POST /users answered no token")?;
        self.remember_tokens([(user, token.to_owned())]);
        Ok(user)
    }

    /// `POST /users/{userId}/balance/charge`.
    pub async fn charge(&self, user: i64, amount: i64, key: Option<&str>) -> anyhow::Result<Answer> {
        let path = format!("/users/{user}/balance/charge");
        self.send(self.as_user(self.post(&path, &json!({ "amount": amount }), key), Some(user)))
            .await
    }

    /// `POST /coupons/{couponId}/issue`.
    pub async fn issue_coupon(&self, coupon: i64, user: i64, key: &str) -> anyhow::Result<Answer> {
        let path = format!("/coupons/{coupon}/issue");
        let answer = self
            .send(self.as_user(
                self.post(&path, &json!({ "userId": user }), Some(key)),
                Some(user),
            ))
            .await;
        self.note_sender(&answer, user);
        answer
    }

    /// `POST /orders` with one line.
    pub async fn create_order(
        &self,
        user: i64,
        product: i64,
        quantity: i64,
        key: &str,
    ) -> anyhow::Result<Answer> {
        let body = json!({ "userId": user, "items": [{ "productId": product, "quantity": quantity }] });
        let answer = self
            .send(self.as_user(self.post("/orders", &body, Some(key)), Some(user)))
            .await;
        self.note_sender(&answer, user);
        answer
    }

    /// `POST /orders/{orderId}/payment`.
    pub async fn pay_order(
        &self,
        order: Uuid,
        user: i64,
        coupon: Option<i64>,
        key: &str,
    ) -> anyhow::Result<Answer> {
        let body = match coupon {
            Some(coupon) => json!({ "userId": user, "couponId": coupon }),
            None => json!({ "userId": user }),
        };
        let path = format!("/orders/{order}/payment");
        let answer = self
            .send(self.as_user(self.post(&path, &body, Some(key)), Some(user)))
            .await;
        self.note_sender(&answer, user);
        answer
    }

    /// `POST /orders/{orderId}/cancel`.
    pub async fn cancel_order(&self, order: Uuid, user: i64) -> anyhow::Result<Answer> {
        let path = format!("/orders/{order}/cancel");
        self.send(self.as_user(self.post(&path, &json!({ "userId": user }), None), Some(user)))
            .await
    }

    /// `GET /requests/{requestId}`, as the user who sent it through this client.
    pub async fn request_status(&self, request: Uuid) -> anyhow::Result<Answer> {
        self.get(&format!("/requests/{request}")).await
    }

    /// `GET /requests/{requestId}?wait={seconds}`: answered once the request is settled, or
    /// after `seconds` with it still pending.
    pub async fn request_status_waiting(&self, request: Uuid, seconds: u64) -> anyhow::Result<Answer> {
        self.get(&format!("/requests/{request}?wait={seconds}")).await
    }

    /// `GET /requests/{requestId}` of a request `user` sent.
    pub async fn request_status_of(&self, user: i64, request: Uuid) -> anyhow::Result<Answer> {
        let get = self.http.get(format!("{}/requests/{request}", self.base()));
        self.send(self.as_user(get, Some(user))).await
    }

    /// `POST /admin/products`; the new product's id.
    pub async fn create_product(&self, name: &str, price: i64, stock: i64) -> anyhow::Result<i64> {
        let body = json!({ "name": name, "price": price, "stock": stock });
        let answer = self
            .send(
                self.post("/admin/products", &body, None)
                    .headers(self.admin.clone()),
            )
            .await?;
        created_id(&answer, "productId").context("POST /admin/products")
    }

    /// `POST /admin/coupons` for every product, expiring in a day; the new coupon's id.
    pub async fn create_coupon(&self, name: &str, discount: i64, quantity: i64) -> anyhow::Result<i64> {
        let expires = chrono::Utc::now() + chrono::Duration::days(1);
        let body = json!({
            "name": name,
            "discountType": "FIXED",
            "discountValue": discount,
            "totalQuantity": quantity,
            "expiresAt": expires.to_rfc3339(),
        });
        let answer = self
            .send(
                self.post("/admin/coupons", &body, None)
                    .headers(self.admin.clone()),
            )
            .await?;
        created_id(&answer, "couponId").context("POST /admin/coupons")
    }

    /// `POST /admin/batch/consistency-audit/run`: what the audit finds now, as (check,
    /// detail) pairs; none when the stored data adds up.
    pub async fn consistency_audit(&self) -> anyhow::Result<Vec<(String, String)>> {
        let path = "/admin/batch/consistency-audit/run";
        let answer = self
            .send(self.post(path, &json!({}), None).headers(self.admin.clone()))
            .await?;
        anyhow::ensure!(
            answer.status == 200,
            "POST {path} answered {}: {}",
            answer.status,
            answer.body
        );
        let violations = answer
            .body
            .get("violations")
            .and_then(Value::as_array)
            .with_context(|| format!("POST {path} answered no violations list: {}", answer.body))?;
        Ok(violations
            .iter()
            .map(|v| {
                let field = |name: &str| v.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
                (field("check"), field("detail"))
            })
            .collect())
    }

    /// `GET /admin/partitions`: where each partition stands (`ready`, `unacked`, `pending`, …).
    pub async fn partitions(&self) -> anyhow::Result<Vec<Value>> {
        let path = "/admin/partitions";
        let request = self
            .http
            .get(format!("{}{path}", self.base()))
            .headers(self.admin.clone());
        let answer = self.send_once(request).await?;
        anyhow::ensure!(
            answer.status == 200,
            "GET {path} answered {}: {}",
            answer.status,
            answer.body
        );
        answer
            .body
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .with_context(|| format!("GET {path} answered no items: {}", answer.body))
    }

    /// Waits until `GET /health/ready` answers 200 at every replica.
    pub async fn wait_until_ready(&self, patience: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        for base in self.bases.iter() {
            loop {
                match self
                    .at(base)
                    .send_once(self.http.get(format!("{base}/health/ready")))
                    .await
                {
                    Ok(answer) if answer.status == 200 => break,
                    Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Ok(answer) => bail!("{base}/health/ready answered {}: {}", answer.status, answer.body),
                    Err(e) => return Err(e.context(format!("{base} is not reachable"))),
                }
            }
        }
        Ok(())
    }

    /// Whether every replica answers `GET /health/ready` with 200 now.
    pub async fn ready_everywhere(&self) -> bool {
        for base in self.bases.iter() {
            let answer = self
                .send_once(self.http.get(format!("{base}/health/ready")))
                .await;
            if !matches!(answer, Ok(a) if a.status == 200) {
                return false;
            }
        }
        true
    }
}

/// Whether a patient client sends this again: `Some(wait it asked for, if any)`.
fn retry_after(answer: &Answer) -> Option<Option<Duration>> {
    match (answer.status, answer.code.as_deref()) {
        (429 | 502 | 503 | 504, _) | (409, Some("ERR_IDEMPOTENCY_KEY_IN_USE")) => Some(answer.retry_after),
        _ => None,
    }
}

/// `timeout` or `transport error`: how a request without an answer is counted.
pub fn transport_outcome(e: &anyhow::Error) -> String {
    let timed_out = e
        .downcast_ref::<reqwest::Error>()
        .is_some_and(reqwest::Error::is_timeout);
    if timed_out { "timeout" } else { "transport error" }.to_owned()
}

fn created_id(answer: &Answer, field: &str) -> anyhow::Result<i64> {
    if answer.status != 201 {
        bail!("answered {} {}", answer.status, answer.body);
    }
    answer
        .i64_field(field)
        .with_context(|| format!("no {field} in {}", answer.body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;

    #[test]
    fn requests_go_to_each_api_replica_in_turn_and_clones_share_the_turn() {
        let api = Api::new(" http://a:1/, http://b:2 ,", "token", 1, Duration::from_secs(1)).unwrap();
        let clone = api.clone();
        let bases: Vec<String> = (0..4)
            .map(|n| if n % 2 == 0 { api.base() } else { clone.base() }.to_owned())
            .collect();
        assert_eq!(bases, ["http://a:1", "http://b:2", "http://a:1", "http://b:2"]);
        // `at` is one replica: the synchronous peer.
        let peer = api.at("http://peer:3/");
        assert_eq!([peer.base(), peer.base()], ["http://peer:3", "http://peer:3"]);
        assert!(Api::new(" , ", "token", 1, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn unavailability_is_told_from_a_moment_on() {
        let log = Unavailable::default();
        assert!(log.since(tokio::time::Instant::now()).is_none());
        log.record();
        let from = tokio::time::Instant::now();
        assert!(
            log.since(from).is_none(),
            "a 503 before the moment is not counted"
        );
        log.record();
        log.record();
        let (count, first, last) = log.since(from).unwrap();
        assert_eq!(count, 2);
        assert!(first <= last);
    }
}
