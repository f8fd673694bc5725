//! A crowd of sockets from one address (idle ones, and ones that never read their answers)
//! against an api started with a soft limit of 1,024 open files, as a default system starts
//! it: everyone else is still answered.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use testkit::spawn_app;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Idle sockets the crowd opens (the api's soft limit at start is 1,024).
const IDLE: usize = 3_000;
/// Sockets that send many requests and never read an answer.
const NOT_READING: usize = 40;
/// Each client's share (the default).
const PER_CLIENT: u64 = 256;

/// A connection to `addr` from the loopback alias 127.0.0.2 (another client address).
async fn from_another_address(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind("127.0.0.2:0".parse().unwrap())?;
    socket.connect(addr).await
}

/// A counter or gauge of the replica's `/metrics` (summed over its labels).
async fn metric(client: &reqwest::Client, metrics: SocketAddr, name: &str) -> f64 {
    let Ok(response) = client.get(format!("http://{metrics}/metrics")).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_for(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_sockets_from_one_address_never_keep_the_api_from_answering_others() {
    // This test's own sockets need descriptors too.
    api::http::connections::raise_open_files_limit();
    let app = spawn_app().await;
    let metrics_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let metrics_env = metrics_addr.to_string();
    let (_replica, addr) = app
        .replica_with(
            env!("CARGO_BIN_EXE_api"),
            &[
                ("API_METRICS_ADDR", metrics_env.as_str()),
                ("HTTP_WRITE_TIMEOUT_MS", "1000"),
            ],
            Some(1_024),
        )
        .await;
    let plain = reqwest::Client::new();
    // A fresh connection per request, so that every answer below went through accept.
    let others = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let openapi_bytes = others
        .get(format!("http://{addr}/openapi.json"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();

    // Clients that ask for far more than their socket buffers hold and never read.
    let pipelined = "GET /openapi.json HTTP/1.1\r\nHost: api\r\n\r\n".repeat(200);
    let mut not_reading = Vec::new();
    for _ in 0..NOT_READING {
        let mut stream = from_another_address(addr).await.unwrap();
        stream.write_all(pipelined.as_bytes()).await.unwrap();
        not_reading.push(stream);
    }
    // The idle crowd, from the same address.
    let mut idle = Vec::with_capacity(IDLE);
    let mut not_connected = 0;
    for _ in 0..IDLE {
        match from_another_address(addr).await {
            Ok(stream) => idle.push(stream),
            Err(_) => not_connected += 1,
        }
    }

    // Everyone else, during the flood.
    let mut answered = 0;
    let mut slowest = Duration::ZERO;
    for path in ["/health/live", "/health/ready", "/products"]
        .iter()
        .cycle()
        .take(30)
    {
        let started = tokio::time::Instant::now();
        let answer = others.get(format!("http://{addr}{path}")).send().await;
        if answer.is_ok_and(|a| a.status() == StatusCode::OK) {
            answered += 1;
        }
        slowest = slowest.max(started.elapsed());
    }

    // The api refused the crowd past its share at once, and dropped the clients that do
    // not read.
    // Every socket of the crowd was accepted, and admitted or refused.
    let crowd = (IDLE + NOT_READING - not_connected) as f64;
    wait_for("every socket of the crowd admitted or refused", async || {
        let refused = metric(&plain, metrics_addr, "api_connections_refused_total").await;
        let admitted = metric(&plain, metrics_addr, "api_connections_admitted_total").await;
        eprintln!("refused {refused}, admitted {admitted}");
        refused + admitted >= crowd
    })
    .await;
    wait_for("the clients that do not read disconnected", async || {
        let timeouts = metric(&plain, metrics_addr, "api_connections_write_timeouts_total").await;
        eprintln!("write timeouts {timeouts}");
        timeouts >= NOT_READING as f64
    })
    .await;
    let refused = metric(&plain, metrics_addr, "api_connections_refused_total").await;
    let open = metric(&plain, metrics_addr, "api_connections_open").await;
    let timeouts = metric(&plain, metrics_addr, "api_connections_write_timeouts_total").await;
    eprintln!(
        "flood from 127.0.0.2: {} idle + {NOT_READING} not reading ({not_connected} not connected); \
         refused at once {refused}, open after {open}, write timeouts {timeouts}; \
         from 127.0.0.1: {answered}/30 answered, slowest {slowest:?}",
        IDLE - not_connected
    );
    assert_eq!(answered, 30, "others were not answered during the flood");
    assert!(open <= PER_CLIENT as f64 + 1.0, "{open} connections open");

    // A client that did not read got only part of what it asked for before the api hung up.
    let mut stream = not_reading.pop().unwrap();
    let mut received = 0;
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        match tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncReadExt::read(&mut stream, &mut buffer),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received += n,
            Err(_) => panic!("the connection of a client that did not read is still open"),
        }
    }
    assert!(
        received < 200 * openapi_bytes,
        "{received} bytes: every answer was sent"
    );
    drop(idle);
}
