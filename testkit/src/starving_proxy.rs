//! A proxy in front of RabbitMQ that reads the AMQP 0-9-1 frames the broker sends and can
//! drop its deliveries: to the broker the consumer stays registered and healthy (its
//! channel open, heartbeats flowing both ways), while the client receives nothing. That is
//! the consumer RabbitMQ has been seen to leave behind after a node restart, played without
//! touching the broker other tests share.
//!
//! A frame is its type (u8), channel (u16), payload size (u32, both big-endian), the payload
//! and the end octet 0xCE; a method frame's payload starts with its class and method ids
//! (u16 each). A delivery is a `basic.deliver` method frame (60, 60) followed by a content
//! header frame and body frames on the same channel; the next method frame on that channel
//! ends it. What the client sends (from the protocol header on) passes untouched.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size.
const FRAME_HEAD: usize = 7;

const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
const CHANNEL_CLOSE: (u16, u16) = (20, 40);
const CHANNEL_CLOSE_OK: (u16, u16) = (20, 41);
const BASIC_CONSUME_OK: (u16, u16) = (60, 21);
const BASIC_DELIVER: (u16, u16) = (60, 60);

/// Which deliveries are dropped.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Starving {
    Nobody = 0,
    /// Those to the channels that consumed when the proxy was told; channels opened later
    /// are fed.
    CurrentConsumers = 1,
    Everyone = 2,
}

impl Starving {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Starving::CurrentConsumers,
            2 => Starving::Everyone,
            _ => Starving::Nobody,
        }
    }
}

/// What the connections through the proxy share.
#[derive(Default)]
struct Switch {
    starving: AtomicU8,
    /// Grows each time the current consumers are to be starved, so that each connection
    /// takes its snapshot of them at its next frame.
    generation: AtomicU64,
    dropped: AtomicU64,
}

pub struct StarvingProxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    switch: Arc<Switch>,
    running: CancellationToken,
}

impl Drop for StarvingProxy {
    fn drop(&mut self) {
        self.running.cancel();
    }
}

impl StarvingProxy {
    /// Listens on a free loopback port and passes everything to `upstream` (RabbitMQ).
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            upstream,
            switch: Arc::default(),
            running: CancellationToken::new(),
        };
        let (switch, running) = (Arc::clone(&proxy.switch), proxy.running.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = running.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((inbound, _)) = accepted else { continue };
                tokio::spawn(relay(inbound, upstream, Arc::clone(&switch), running.clone()));
            }
        });
        proxy
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        url.replace(&self.upstream.to_string(), &self.addr.to_string())
    }

    /// From now on, deliveries to the channels that consume at this moment are dropped (until
    /// such a channel closes); channels opened later are fed.
    pub fn starve_current_consumers(&self) {
        self.switch.generation.fetch_add(1, Ordering::SeqCst);
        self.set(Starving::CurrentConsumers);
    }

    /// From now on, every delivery is dropped, on any channel.
    pub fn starve_everyone(&self) {
        self.set(Starving::Everyone);
    }

    /// From now on, deliveries pass again (those dropped stay unacked with the broker).
    pub fn feed(&self) {
        self.set(Starving::Nobody);
    }

    /// Deliveries dropped so far.
    pub fn deliveries_dropped(&self) -> u64 {
        self.switch.dropped.load(Ordering::SeqCst)
    }

    fn set(&self, starving: Starving) {
        self.switch.starving.store(starving as u8, Ordering::SeqCst);
    }
}

/// One client connection: the client's bytes go up as they are, the broker's frames come
/// down through [`Frames`].
async fn relay(
    inbound: tokio::net::TcpStream,
    upstream: SocketAddr,
    switch: Arc<Switch>,
    running: CancellationToken,
) {
    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    // Without it, Nagle's algorithm and delayed acks add 40 ms per round trip.
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_broker, mut to_broker) = outbound.into_split();
    let down = async {
        let mut frames = Frames::new(switch);
        let mut chunk = vec![0_u8; 64 * 1024];
        loop {
            let n = match from_broker.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let passed = frames.pass(&chunk[..n]);
            if !passed.is_empty() && to_client.write_all(&passed).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = running.cancelled() => {}
        _ = tokio::io::copy(&mut from_client, &mut to_broker) => {}
        () = down => {}
    }
}

/// The broker's side of one connection, frame by frame.
struct Frames {
    switch: Arc<Switch>,
    /// Bytes of a frame not complete yet.
    pending: Vec<u8>,
    /// Channels with a consumer (`basic.consume-ok` seen, not closed since).
    consuming: HashSet<u16>,
    /// The consumers to starve, as they were when the proxy was told.
    starved: HashSet<u16>,
    starved_generation: u64,
    /// Channels whose current delivery was dropped: its content frames go too.
    dropping_content: HashSet<u16>,
}

impl Frames {
    fn new(switch: Arc<Switch>) -> Self {
        Self {
            switch,
            pending: Vec::new(),
            consuming: HashSet::new(),
            starved: HashSet::new(),
            starved_generation: 0,
            dropping_content: HashSet::new(),
        }
    }

    /// Takes what the broker sent; returns what reaches the client.
    fn pass(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(bytes);
        let mut passed = Vec::with_capacity(pending.len());
        let mut at = 0;
        while let Some(frame) = pending.get(at..at + FRAME_HEAD) {
            let kind = frame[0];
            let channel = u16::from_be_bytes([frame[1], frame[2]]);
            let size = u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]) as usize;
            let end = at + FRAME_HEAD + size + 1;
            let Some(whole) = pending.get(at..end) else { break };
            assert_eq!(
                whole[end - at - 1],
                FRAME_END,
                "the broker's frames are out of step"
            );
            if self.keeps(kind, channel, &whole[FRAME_HEAD..FRAME_HEAD + size]) {
                passed.extend_from_slice(whole);
            }
            at = end;
        }
        pending.drain(..at);
        self.pending = pending;
        passed
    }

    /// Whether a frame reaches the client, noting what it says about channels.
    fn keeps(&mut self, kind: u8, channel: u16, payload: &[u8]) -> bool {
        let generation = self.switch.generation.load(Ordering::SeqCst);
        if generation != self.starved_generation {
            self.starved = self.consuming.clone();
            self.starved_generation = generation;
        }
        match kind {
            FRAME_METHOD if payload.len() >= 4 => {
                let method = (
                    u16::from_be_bytes([payload[0], payload[1]]),
                    u16::from_be_bytes([payload[2], payload[3]]),
                );
                self.dropping_content.remove(&channel);
                match method {
                    CHANNEL_OPEN_OK | CHANNEL_CLOSE | CHANNEL_CLOSE_OK => {
                        self.consuming.remove(&channel);
                        self.starved.remove(&channel);
                    }
                    BASIC_CONSUME_OK => {
                        self.consuming.insert(channel);
                    }
                    BASIC_DELIVER => {
                        let starving = Starving::from_u8(self.switch.starving.load(Ordering::SeqCst));
                        let drop = match starving {
                            Starving::Nobody => false,
                            Starving::CurrentConsumers => self.starved.contains(&channel),
                            Starving::Everyone => true,
                        };
                        if drop {
                            self.dropping_content.insert(channel);
                            self.switch.dropped.fetch_add(1, Ordering::SeqCst);
                            return false;
                        }
                    }
                    _ => {}
                }
                true
            }
            FRAME_HEADER | FRAME_BODY => !self.dropping_content.contains(&channel),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&channel.to_be_bytes());
        bytes.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes.push(FRAME_END);
        bytes
    }

    fn method(channel: u16, (class, id): (u16, u16)) -> Vec<u8> {
        let mut payload = class.to_be_bytes().to_vec();
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(b"arguments");
        frame(FRAME_METHOD, channel, &payload)
    }

    fn delivery(channel: u16) -> Vec<u8> {
        [
            method(channel, BASIC_DELIVER),
            frame(FRAME_HEADER, channel, b"properties"),
            frame(FRAME_BODY, channel, b"body"),
        ]
        .concat()
    }

    #[test]
    fn the_current_consumers_are_starved_and_a_new_channel_is_fed() {
        let switch = Arc::new(Switch::default());
        let mut frames = Frames::new(Arc::clone(&switch));
        let setup = [method(1, CHANNEL_OPEN_OK), method(1, BASIC_CONSUME_OK)].concat();
        assert_eq!(frames.pass(&setup), setup);
        assert_eq!(frames.pass(&delivery(1)), delivery(1));

        switch.generation.fetch_add(1, Ordering::SeqCst);
        switch
            .starving
            .store(Starving::CurrentConsumers as u8, Ordering::SeqCst);
        let heartbeat = frame(8, 0, b"");
        let bytes = [delivery(1), heartbeat.clone(), method(1, (60, 80))].concat();
        // Split anywhere, as TCP may.
        let (a, b) = bytes.split_at(9);
        let mut passed = frames.pass(a);
        passed.extend(frames.pass(b));
        assert_eq!(passed, [heartbeat, method(1, (60, 80))].concat());
        assert_eq!(switch.dropped.load(Ordering::SeqCst), 1);

        let renewed = [
            method(1, CHANNEL_CLOSE_OK),
            method(2, CHANNEL_OPEN_OK),
            method(2, BASIC_CONSUME_OK),
            delivery(2),
        ]
        .concat();
        assert_eq!(frames.pass(&renewed), renewed);
    }

    #[test]
    fn everyone_starved_drops_every_delivery_until_fed() {
        let switch = Arc::new(Switch::default());
        let mut frames = Frames::new(Arc::clone(&switch));
        switch.starving.store(Starving::Everyone as u8, Ordering::SeqCst);
        let other = method(3, (60, 11));
        assert_eq!(frames.pass(&[delivery(3), other.clone()].concat()), other);
        switch.starving.store(Starving::Nobody as u8, Ordering::SeqCst);
        assert_eq!(frames.pass(&delivery(3)), delivery(3));
    }
}
