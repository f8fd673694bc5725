//! A TCP proxy a test puts in front of PostgreSQL or RabbitMQ, to play a dependency going
//! down and coming back without touching the servers other tests share.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

/// A TCP proxy in front of PostgreSQL or RabbitMQ that a test can cut and restore, to play a
/// dependency going down and coming back without touching the server other tests share.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    running: std::sync::Mutex<CancellationToken>,
    /// While set, what the upstream sends is dropped: requests get through, answers do not.
    muted: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> std::sync::Arc<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = std::sync::Arc::new(Self {
            addr: listener.local_addr().unwrap(),
            upstream,
            running: std::sync::Mutex::new(CancellationToken::new()),
            muted: std::sync::Arc::default(),
        });
        proxy.serve(listener);
        proxy
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        url.replace(&self.upstream.to_string(), &self.addr.to_string())
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let token = self.running.lock().unwrap().clone();
        let upstream = self.upstream;
        let muted = std::sync::Arc::clone(&self.muted);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    biased;
                    () = token.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let token = token.clone();
                let muted = std::sync::Arc::clone(&muted);
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    // Without it, Nagle's algorithm and delayed acks add 40 ms per round trip.
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (mut from_client, mut to_client) = inbound.split();
                    let (mut from_upstream, mut to_upstream) = tokio::io::split(outbound);
                    // Each chunk is forwarded only while the proxy is not cut, checked right
                    // before its write: once `cut` has returned, nothing more gets through
                    // either way, even on a connection whose task is busy at that moment.
                    let requests = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buffer = vec![0_u8; 16 * 1024];
                        loop {
                            let n = match from_client.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if token.is_cancelled() || to_upstream.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let answers = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buffer = vec![0_u8; 16 * 1024];
                        loop {
                            let n = match from_upstream.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if token.is_cancelled() {
                                return;
                            }
                            if !muted.load(std::sync::atomic::Ordering::SeqCst)
                                && to_client.write_all(&buffer[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        biased;
                        () = token.cancelled() => {}
                        () = requests => {}
                        () = answers => {}
                    }
                });
            }
        });
    }

    /// From now on, what the upstream sends is lost on the way (requests still arrive).
    pub fn mute(&self) {
        self.muted.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops every connection and stops listening: the dependency is down.
    pub fn cut(&self) {
        self.running.lock().unwrap().cancel();
    }

    /// Listens again on the same port, passing everything both ways: the dependency is back.
    pub async fn restore(&self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        *self.running.lock().unwrap() = CancellationToken::new();
        self.muted.store(false, std::sync::atomic::Ordering::SeqCst);
        self.serve(listener);
    }
}

/// The socket address in a `scheme://user@host:port/…` URL.
pub fn socket_of(url: &str) -> SocketAddr {
    let after_at = url.rsplit_once('@').map_or(url, |(_, rest)| rest);
    let host_port = after_at.split('/').next().unwrap();
    host_port.parse().unwrap()
}
