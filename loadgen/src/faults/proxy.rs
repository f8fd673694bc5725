//! A TCP proxy between some processes of the system and a server (PostgreSQL or RabbitMQ),
//! for the silent-connection scenarios: a peer that dies behind a firewall, or a firewall
//! that loses its state for established connections, neither closes nor resets anything.
//! The connections simply go silent.
//!
//! [`Proxy::silence`] does that to every connection open through the proxy at that moment:
//! nothing more is forwarded either way, and nothing is read, so each end's writes fill the
//! socket buffers and then wait, while the sockets stay open. Connections opened afterwards
//! pass as before (the path to the server works; only the old connections are dead), so a
//! process that notices can recover by itself. [`Proxy::drop_silenced`] ends the silence by
//! closing those sockets, as a server that timed the dead connections out long ago answers
//! their next packet with a reset. They are not resumed: a dead connection does not come back,
//! and resuming would let a process that never noticed carry on as if nothing had happened.
//!
//! Userspace cannot silence a connection at the TCP level: the proxy's kernel still
//! acknowledges data and answers keepalive probes. So this tests what a process notices by
//! itself (timeouts on its own operations, AMQP heartbeats), not TCP keepalive.

use std::net::SocketAddr;

use anyhow::Context;
use reqwest::Url;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A proxy listening on a free loopback port, forwarding to one server.
pub struct Proxy {
    pub addr: SocketAddr,
    /// How many times connections were silenced: a connection opened when this was `n` is
    /// silenced once it passes `n`.
    silences: watch::Sender<u64>,
    /// How many silences were ended: a connection silenced at silence `n + 1` is closed
    /// once this passes `n`.
    releases: watch::Sender<u64>,
    /// Connections open now (each link counts itself in and out).
    open: watch::Sender<usize>,
    accepting: JoinHandle<()>,
}

impl Proxy {
    /// A proxy in front of the server that `url` (`postgres://…`, `amqp://…`) names.
    pub async fn start(url: &str) -> anyhow::Result<Self> {
        let upstream = server_of(url).await?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("no free port on loopback for the proxy")?;
        let addr = listener.local_addr().context("the proxy's own address")?;
        let (silences, _) = watch::channel(0);
        let (releases, _) = watch::channel(0);
        let (open, _) = watch::channel(0);
        let accepting = tokio::spawn(accept(
            listener,
            upstream,
            silences.clone(),
            releases.clone(),
            open.clone(),
        ));
        Ok(Self {
            addr,
            silences,
            releases,
            open,
            accepting,
        })
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> anyhow::Result<String> {
        let mut url = Url::parse(url).with_context(|| format!("not a URL: {url}"))?;
        url.set_ip_host(self.addr.ip())
            .map_err(|()| anyhow::anyhow!("cannot set the host of {url}"))?;
        url.set_port(Some(self.addr.port()))
            .map_err(|()| anyhow::anyhow!("cannot set the port of {url}"))?;
        Ok(url.into())
    }

    /// Silences every connection open through the proxy now; how many there were.
    pub fn silence(&self) -> usize {
        let open = *self.open.borrow();
        self.silences.send_modify(|n| *n += 1);
        open
    }

    /// Closes the connections silenced so far (those opened since go on).
    pub fn drop_silenced(&self) {
        let silenced = *self.silences.borrow();
        self.releases.send_modify(|n| *n = silenced);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        // Every link, silenced or not, ends with its sockets.
        self.releases.send_modify(|n| *n = u64::MAX);
        self.silences.send_modify(|n| *n = u64::MAX);
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    silences: watch::Sender<u64>,
    releases: watch::Sender<u64>,
    open: watch::Sender<usize>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let born = *silences.borrow();
        let silenced = silences.subscribe();
        let released = releases.subscribe();
        let open = open.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(upstream).await else {
                return;
            };
            open.send_modify(|n| *n += 1);
            link(inbound, outbound, born, silenced, released).await;
            open.send_modify(|n| *n = n.saturating_sub(1));
        });
    }
}

/// Forwards both ways until either end closes, or until silence `born + 1`; then holds both
/// sockets, unread, until that silence is ended.
async fn link(
    mut inbound: TcpStream,
    mut outbound: TcpStream,
    born: u64,
    mut silenced: watch::Receiver<u64>,
    mut released: watch::Receiver<u64>,
) {
    // Without it, Nagle's algorithm and delayed acks add 40 ms per round trip.
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
        // An error means the proxy is gone: the link goes with it.
        _ = silenced.wait_for(|n| *n > born) => {}
    }
    // Silent: what was read and not yet written is lost, as on a dead path.
    let _ = released.wait_for(|n| *n > born).await;
}

/// The socket address of the server in `url` (the first host of a list).
async fn server_of(url: &str) -> anyhow::Result<SocketAddr> {
    let parsed = Url::parse(url).with_context(|| format!("not a URL: {url}"))?;
    let host = parsed.host_str().with_context(|| format!("no host in {url}"))?;
    let port = match (parsed.port(), parsed.scheme()) {
        (Some(port), _) => port,
        (None, "amqp") => 5672,
        (None, "postgres" | "postgresql") => 5432,
        (None, scheme) => anyhow::bail!("no port in {url} and none known for {scheme}"),
    };
    let resolved = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to nothing"));
    resolved
}
