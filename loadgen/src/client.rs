//! A typed client of the HTTP contract (`../shared/API.md`): one method per call the
//! scenarios make, answering the status, the error code and the JSON body.

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

/// The API at one base URL, over a pool of keep-alive connections.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    admin: HeaderMap,
}

impl Api {
    /// `connections`: idle connections kept per host, so `connections` concurrent clients
    /// each keep theirs between requests.
    pub fn new(base: &str, admin_token: &str, connections: usize, timeout: Duration) -> anyhow::Result<Self> {
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
            base: base.trim_end_matches('/').to_owned(),
            admin,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let replayed = response
            .headers()
            .get(REPLAYED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
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
        })
    }

    fn post(&self, path: &str, body: &Value, key: Option<&str>) -> reqwest::RequestBuilder {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        match key {
            Some(key) => request.header("idempotency-key", key),
            None => request,
        }
    }

    /// `GET {path}`, e.g. `/products?limit=20`.
    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    /// `POST /coupons/{couponId}/issue`.
    pub async fn issue_coupon(&self, coupon: i64, user: i64, key: &str) -> anyhow::Result<Answer> {
        let path = format!("/coupons/{coupon}/issue");
        self.send(self.post(&path, &json!({ "userId": user }), Some(key)))
            .await
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
        self.send(self.post("/orders", &body, Some(key))).await
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
        self.send(self.post(&format!("/orders/{order}/payment"), &body, Some(key)))
            .await
    }

    /// `GET /requests/{requestId}`.
    pub async fn request_status(&self, request: Uuid) -> anyhow::Result<Answer> {
        self.get(&format!("/requests/{request}")).await
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

    /// Waits until `GET /health/ready` answers 200.
    pub async fn wait_until_ready(&self, patience: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match self.get("/health/ready").await {
                Ok(answer) if answer.status == 200 => return Ok(()),
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Ok(answer) => bail!(
                    "{}/health/ready answered {}: {}",
                    self.base,
                    answer.status,
                    answer.body
                ),
                Err(e) => return Err(e.context(format!("{} is not reachable", self.base))),
            }
        }
    }
}

fn created_id(answer: &Answer, field: &str) -> anyhow::Result<i64> {
    if answer.status != 201 {
        bail!("answered {} {}", answer.status, answer.body);
    }
    answer
        .i64_field(field)
        .with_context(|| format!("no {field} in {}", answer.body))
}
