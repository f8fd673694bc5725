//! Every kind of bad input answers a 4xx with the contract's `{code, message}` body, never a
//! 5xx, and stores nothing.

use reqwest::{Method, StatusCode};
use testkit::{spawn_app, ADMIN_TOKEN};

const JSON: &str = "application/json";

struct Case {
    what: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    extra_headers: Vec<(&'static str, String)>,
    status: StatusCode,
    code: &'static str,
}

fn case(
    what: &'static str,
    method: Method,
    path: impl Into<String>,
    body: &str,
    status: StatusCode,
    code: &'static str,
) -> Case {
    Case {
        what,
        method,
        path: path.into(),
        content_type: Some(JSON),
        body: body.as_bytes().to_vec(),
        extra_headers: Vec::new(),
        status,
        code,
    }
}

fn cases(user: i64, product: i64) -> Vec<Case> {
    use StatusCode as S;
    let charge = format!("/users/{user}/balance/charge");
    let patch = format!("/admin/products/{product}");
    let long_name = format!(r#"{{"name": "{}"}}"#, "x".repeat(10_000));
    let huge_body = format!(r#"{{"name": "{}"}}"#, "x".repeat(200_000));
    let mut all = vec![
        // Malformed bodies.
        case(
            "malformed JSON",
            Method::POST,
            "/users",
            r#"{"name": "#,
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "empty body",
            Method::POST,
            "/users",
            "",
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "array instead of object",
            Method::POST,
            "/users",
            r#"["a"]"#,
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "missing field",
            Method::POST,
            "/users",
            "{}",
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "wrong type",
            Method::POST,
            "/users",
            r#"{"name": 5}"#,
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "null name",
            Method::POST,
            "/users",
            r#"{"name": null}"#,
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "blank name",
            Method::POST,
            "/users",
            r#"{"name": "   "}"#,
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "extra-large field",
            Method::POST,
            "/users",
            &long_name,
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "body over the size limit",
            Method::POST,
            "/users",
            &huge_body,
            S::PAYLOAD_TOO_LARGE,
            "ERR_PAYLOAD_TOO_LARGE",
        ),
        // Amounts.
        case(
            "negative amount",
            Method::POST,
            charge.clone(),
            r#"{"amount": -100}"#,
            S::BAD_REQUEST,
            "ERR_BALANCE_INVALID_AMOUNT",
        ),
        case(
            "zero amount",
            Method::POST,
            charge.clone(),
            r#"{"amount": 0}"#,
            S::BAD_REQUEST,
            "ERR_BALANCE_INVALID_AMOUNT",
        ),
        case(
            "amount over the charge limit",
            Method::POST,
            charge.clone(),
            r#"{"amount": 10000001}"#,
            S::BAD_REQUEST,
            "ERR_BALANCE_INVALID_AMOUNT",
        ),
        case(
            "amount beyond 64 bits",
            Method::POST,
            charge.clone(),
            r#"{"amount": 99999999999999999999999}"#,
            S::BAD_REQUEST,
            "ERR_BALANCE_INVALID_AMOUNT",
        ),
        case(
            "fractional amount",
            Method::POST,
            charge.clone(),
            r#"{"amount": 10.5}"#,
            S::BAD_REQUEST,
            "ERR_BALANCE_INVALID_AMOUNT",
        ),
        case(
            "amount in exponent form",
            Method::POST,
            charge.clone(),
            r#"{"amount": 1e30}"#,
            S::BAD_REQUEST,
            "ERR_BALANCE_INVALID_AMOUNT",
        ),
        case(
            "non-numeric amount",
            Method::POST,
            charge.clone(),
            r#"{"amount": "100"}"#,
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "missing amount",
            Method::POST,
            charge.clone(),
            "{}",
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        // Ids.
        case(
            "non-numeric user id",
            Method::POST,
            "/users/abc/balance/charge",
            r#"{"amount": 1}"#,
            S::BAD_REQUEST,
            "ERR_BALANCE_INVALID_USER",
        ),
        case(
            "negative user id",
            Method::POST,
            "/users/-1/balance/charge",
            r#"{"amount": 1}"#,
            S::BAD_REQUEST,
            "ERR_BALANCE_INVALID_USER",
        ),
        case(
            "huge user id",
            Method::GET,
            "/users/99999999999999999999/balance",
            "",
            S::BAD_REQUEST,
            "ERR_BALANCE_INVALID_USER",
        ),
        case(
            "another user, here one not registered",
            Method::POST,
            "/users/987654/balance/charge",
            r#"{"amount": 1}"#,
            S::FORBIDDEN,
            "ERR_FORBIDDEN",
        ),
        case(
            "zero product id",
            Method::GET,
            "/products/0",
            "",
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "non-numeric product id",
            Method::GET,
            "/products/abc",
            "",
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        case(
            "bad page limit",
            Method::GET,
            "/products?limit=-1",
            "",
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ),
        // Routing.
        case(
            "unknown route",
            Method::GET,
            "/no/such/route",
            "",
            S::NOT_FOUND,
            "ERR_NOT_FOUND",
        ),
        case(
            "wrong method",
            Method::DELETE,
            "/users",
            "",
            S::METHOD_NOT_ALLOWED,
            "ERR_METHOD_NOT_ALLOWED",
        ),
        case(
            "wrong method on a product",
            Method::PUT,
            format!("/products/{product}"),
            "{}",
            S::METHOD_NOT_ALLOWED,
            "ERR_METHOD_NOT_ALLOWED",
        ),
    ];
    // Administration.
    let admin_cases = [
        ("zero price", r#"{"name": "P", "price": 0, "stock": 1}"#),
        ("negative price", r#"{"name": "P", "price": -5, "stock": 1}"#),
        ("huge price", r#"{"name": "P", "price": 1e40, "stock": 1}"#),
        (
            "non-numeric price",
            r#"{"name": "P", "price": "ten", "stock": 1}"#,
        ),
        ("negative stock", r#"{"name": "P", "price": 5, "stock": -1}"#),
        ("fractional stock", r#"{"name": "P", "price": 5, "stock": 0.5}"#),
        ("empty product name", r#"{"name": "", "price": 5, "stock": 1}"#),
    ];
    for (what, body) in admin_cases {
        all.push(case(
            what,
            Method::POST,
            "/admin/products",
            body,
            S::BAD_REQUEST,
            "ERR_INVALID_REQUEST",
        ));
    }
    all.push(case(
        "patch with nothing to change",
        Method::PATCH,
        patch.clone(),
        "{}",
        S::BAD_REQUEST,
        "ERR_INVALID_REQUEST",
    ));
    all.push(case(
        "patch with a negative stock",
        Method::PATCH,
        patch.clone(),
        r#"{"stock": -2}"#,
        S::BAD_REQUEST,
        "ERR_INVALID_REQUEST",
    ));
    all.push(case(
        "patch of a malformed id",
        Method::PATCH,
        "/admin/products/x",
        r#"{"price": 2}"#,
        S::BAD_REQUEST,
        "ERR_INVALID_REQUEST",
    ));

    // Headers.
    let mut no_type = case(
        "no content type",
        Method::POST,
        "/users",
        r#"{"name": "A"}"#,
        S::UNSUPPORTED_MEDIA_TYPE,
        "ERR_UNSUPPORTED_MEDIA_TYPE",
    );
    no_type.content_type = None;
    all.push(no_type);
    let mut wrong_type = case(
        "wrong content type",
        Method::POST,
        "/users",
        r#"{"name": "A"}"#,
        S::UNSUPPORTED_MEDIA_TYPE,
        "ERR_UNSUPPORTED_MEDIA_TYPE",
    );
    wrong_type.content_type = Some("text/plain");
    all.push(wrong_type);
    let mut long_key = case(
        "Idempotency-Key too long",
        Method::POST,
        "/users",
        r#"{"name": "A"}"#,
        S::BAD_REQUEST,
        "ERR_INVALID_REQUEST",
    );
    long_key.extra_headers.push(("Idempotency-Key", "k".repeat(256)));
    all.push(long_key);
    all
}

#[tokio::test]
async fn every_kind_of_bad_input_is_a_4xx_with_its_code_and_stores_nothing() {
    let app = spawn_app().await;
    let user = app.create_user("Existing").await;
    app.charge(user, 1_000).await;
    let product = app.create_product("Existing", 1_000, 5).await;
    let counts_before = app.row_counts().await;
    let values_before = app.stored_values().await;

    let admin = format!("Bearer {ADMIN_TOKEN}");
    // Each request with the credentials it needs, so that what is refused is the input.
    let customer = format!("Bearer {}", app.token_of(user).unwrap());
    for case in cases(user, product) {
        let auth = if case.path.starts_with("/admin") {
            &admin
        } else {
            &customer
        };
        let mut headers: Vec<(&str, &str)> = vec![("Authorization", auth.as_str())];
        if let Some(content_type) = case.content_type {
            headers.push(("Content-Type", content_type));
        }
        for (name, value) in &case.extra_headers {
            headers.push((name, value.as_str()));
        }
        let answer = app
            .send_raw(case.method.clone(), &case.path, case.body.clone(), &headers)
            .await;
        assert_eq!(answer.status, case.status, "{}: {answer:?}", case.what);
        assert_eq!(answer.code(), case.code, "{}: {answer:?}", case.what);
        assert!(
            answer.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: no message in {answer:?}",
            case.what
        );
        assert_eq!(app.row_counts().await, counts_before, "{} wrote rows", case.what);
        assert_eq!(
            app.stored_values().await,
            values_before,
            "{} changed stored values",
            case.what
        );
    }
}
