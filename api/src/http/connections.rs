//! What a connection may hold of the api: file descriptors are the resource a crowd of
//! sockets exhausts first, and once `accept` fails for want of them nobody is served.
//!
//! - At start the soft `RLIMIT_NOFILE` is raised to the hard limit ([`raise_open_files_limit`]):
//!   the soft default (often 1,024) is far below what one api can serve.
//! - [`ConnectionGate`]: connections are bounded per client address and in total; one over
//!   either bound is closed at once, before hyper sees it, and counted
//!   (`api_connections_refused_total`). The total default leaves room under the raised
//!   limit for the database pool, the broker and the process's own files, so `accept` never
//!   runs out. A trusted proxy's connections carry many clients and count only in the total.
//! - [`WriteDeadline`]: a connection whose answer makes no progress (the client does not
//!   read it) for `HTTP_WRITE_TIMEOUT_MS` is closed.
//! - TCP keepalive on accepted sockets, so that a peer that vanished without a FIN (a
//!   dropped mobile client, a crashed NAT) does not hold a slot until the kernel gives up.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Descriptors kept out of the connections' share: the database pool, the broker, the
/// metrics listener, log files and what libraries open.
const RESERVED_DESCRIPTORS: u64 = 256;

/// The fewest connections the automatic total allows, however low the descriptor limit.
const MIN_AUTO_CONNECTIONS: u64 = 64;

/// Raises the soft limit on open files to the hard limit, and logs both: `(soft, hard)` as
/// they are afterwards.
pub fn raise_open_files_limit() -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-files limit");
            return None;
        }
    };
    let raised = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
                soft
            }
        }
    } else {
        soft
    };
    tracing::info!(soft_at_start = soft, soft = raised, hard, "open-files limit");
    Some((raised, hard))
}

/// The connection bounds (`0` in the settings: chosen from the open-files limit).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSettings {
    /// `MAX_CONNECTIONS`: connections open at once (0: the open-files limit less 256).
    pub max_total: u64,
    /// `MAX_CONNECTIONS_PER_CLIENT`: connections one client address (an IPv6 /64) may hold
    /// at once (0: no bound but the total). Connections from `TRUSTED_PROXIES` count only
    /// in the total.
    pub max_per_client: u64,
    /// `TCP_KEEPALIVE_SECS`: idle time before the first keepalive probe (0: off).
    pub keepalive: Duration,
}

impl ConnectionSettings {
    /// The total bound: as configured, or what fits under `open_files`.
    pub fn total_for(&self, open_files: Option<u64>) -> u64 {
        if self.max_total > 0 {
            return self.max_total;
        }
        open_files.map_or(1_024, |limit| {
            limit
                .saturating_sub(RESERVED_DESCRIPTORS)
                .max(MIN_AUTO_CONNECTIONS)
        })
    }
}

/// Admits connections within the bounds; an [`Admission`] holds a connection's place.
pub struct ConnectionGate {
    max_total: u64,
    max_per_client: u64,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: u64,
    by_client: HashMap<IpAddr, u64>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its client address already holds its share.
    PerClient,
    /// The api holds as many connections as it may.
    Total,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerClient => "per_client",
            Self::Total => "total",
        }
    }
}

impl ConnectionGate {
    pub fn new(max_total: u64, max_per_client: u64) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_client,
            open: Mutex::default(),
        })
    }

    /// A place for a connection of `client` (`None`: counted only in the total, a trusted
    /// proxy), or why there is none.
    pub fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Result<Admission, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max_total {
            return Err(Refusal::Total);
        }
        if let Some(client) = client.filter(|_| self.max_per_client > 0) {
            let held = open.by_client.entry(client).or_default();
            if *held >= self.max_per_client {
                return Err(Refusal::PerClient);
            }
            *held += 1;
        }
        open.total += 1;
        metrics::gauge!("api_connections_open").set(open.total as f64);
        metrics::counter!("api_connections_admitted_total").increment(1);
        Ok(Admission {
            gate: Arc::clone(self),
            client: client.filter(|_| self.max_per_client > 0),
        })
    }
}

/// A connection's place, given back when it is dropped (the connection ended).
pub struct Admission {
    gate: Arc<ConnectionGate>,
    client: Option<IpAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(client) = self.client {
            if let Some(held) = open.by_client.get_mut(&client) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    open.by_client.remove(&client);
                }
            }
        }
        metrics::gauge!("api_connections_open").set(open.total as f64);
    }
}

/// Turns on TCP keepalive on `stream`: the first probe after `idle`, then every 10 s, and
/// the connection is dropped after 3 unanswered.
pub fn keep_alive(stream: &TcpStream, idle: Duration) {
    if idle.is_zero() {
        return;
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot turn on TCP keepalive");
    }
}

/// A stream whose writes fail with `TimedOut` once one has made no progress for `limit`:
/// the client stopped reading, its receive window is shut, and it would otherwise hold the
/// connection (and its descriptor and buffers) for as long as it likes.
pub struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Running while a write is stalled; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// `Ready(Err)` when the stall has lasted `limit`, else `Pending` (the timer registered).
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics::counter!("api_connections_write_timeouts_total").increment(1);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client has not read its answer in time",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<T>(&mut self, result: io::Result<T>) -> Poll<io::Result<T>> {
        self.stalled = None;
        Poll::Ready(result)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(result) => this.progressed(result),
            Poll::Pending => this.stall(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => this.progressed(result),
            Poll::Pending => this.stall(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(result) => this.progressed(result),
            Poll::Pending => this.stall(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Ready(result) => this.progressed(result),
            Poll::Pending => this.stall(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn connections_are_bounded_per_client_and_in_total_and_given_back() {
        let gate = ConnectionGate::new(3, 2);
        let (a, b) = (ip("198.51.100.1"), ip("198.51.100.2"));
        let first = gate.admit(Some(a));
        let _second = gate.admit(Some(a));
        assert!(first.is_ok());
        assert_eq!(gate.admit(Some(a)).err(), Some(Refusal::PerClient));
        let _third = gate.admit(Some(b));
        assert_eq!(gate.admit(None).err(), Some(Refusal::Total));
        drop(first);
        assert!(gate.admit(Some(a)).is_ok());
    }

    #[test]
    fn the_automatic_total_leaves_room_under_the_open_files_limit() {
        let auto = ConnectionSettings {
            max_total: 0,
            max_per_client: 256,
            keepalive: Duration::ZERO,
        };
        assert_eq!(auto.total_for(Some(1_024)), 768);
        assert_eq!(auto.total_for(Some(100)), MIN_AUTO_CONNECTIONS);
        let fixed = ConnectionSettings {
            max_total: 500,
            ..auto
        };
        assert_eq!(fixed.total_for(Some(1_024)), 500);
    }

    #[tokio::test]
    async fn a_write_that_makes_no_progress_fails_after_the_limit() {
        // A pipe whose reader never reads: its buffer fills, then writes stall. (Without
        // the deadline this test never ends.)
        let (writer, _reader) = tokio::io::duplex(16);
        let mut stream = WriteDeadline::new(writer, Duration::from_millis(50));
        let written = tokio::io::AsyncWriteExt::write_all(&mut stream, &[0_u8; 64]).await;
        assert_eq!(written.err().map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
    }
}
