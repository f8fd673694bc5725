//! Rate limits that keep one caller from starving the rest: per user on what writes
//! (commands, charges, cancellations, new tokens), and per client address on registrations
//! and on invalid tokens (customers' and the admin's). Each is a GCRA limiter of the `governor` crate, keyed by user or
//! address; a refusal is `429 ERR_RATE_LIMITED` with `Retry-After`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use shared::domain::ids::UserId;
use tokio_util::sync::CancellationToken;

use crate::config::RateLimitSettings;
use crate::error::ApiError;

/// How often limiters forget keys that are back to a full allowance, so that their memory
/// follows the active callers rather than every caller ever seen.
const FORGET_EVERY: Duration = Duration::from_secs(60);

pub struct RateLimits {
    /// One user's commands, charges, cancellations and new tokens.
    user_writes: Option<DefaultKeyedRateLimiter<i64>>,
    /// Registrations from one client address.
    signups: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Invalid tokens presented from one client address.
    auth_failures: Option<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
    /// The header trusted proxies put the client's address in.
    client_ip_header: axum::http::HeaderName,
    /// The proxies whose forwarded header is believed (none: the peer is the client).
    trusted_proxies: Vec<ipnet::IpNet>,
}

/// An IPv6 client counts by its /64: one subscriber usually holds a whole /64 and could
/// otherwise pick a fresh address for every request, both to dodge the limits and to grow
/// their tables. IPv4 (and IPv4-mapped) addresses count one by one.
pub(crate) fn per_network(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let [a, b, c, d, ..] = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl RateLimits {
    pub fn new(settings: &RateLimitSettings) -> Self {
        let per_second = |rate: u32, burst: u32| {
            NonZeroU32::new(rate).map(|rate| {
                let quota = Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate));
                RateLimiter::keyed(quota)
            })
        };
        let per_minute = |rate: u32, burst: u32| {
            NonZeroU32::new(rate).map(|rate| {
                let quota = Quota::per_minute(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate));
                RateLimiter::keyed(quota)
            })
        };
        Self {
            user_writes: per_second(settings.user_writes_per_sec, settings.user_writes_burst),
            signups: per_minute(settings.signups_per_min, settings.signups_burst),
            auth_failures: per_minute(settings.auth_failures_per_min, settings.auth_failures_burst),
            clock: DefaultClock::default(),
            client_ip_header: settings
                .trusted_client_ip_header
                .clone()
                .unwrap_or(axum::http::HeaderName::from_static("x-forwarded-for")),
            trusted_proxies: settings.trusted_proxies.clone(),
        }
    }

    /// Counts one write of `user`: a command, a charge, a cancellation or a new token.
    pub fn user_write(&self, user: UserId) -> Result<(), ApiError> {
        self.take(self.user_writes.as_ref(), &user.get())
    }

    /// Counts one registration from `client`.
    pub fn signup(&self, client: IpAddr) -> Result<(), ApiError> {
        self.take(self.signups.as_ref(), &client)
    }

    /// Counts one invalid token from `client`: `Err` once it presented too many.
    pub fn auth_failure(&self, client: IpAddr) -> Result<(), ApiError> {
        self.take(self.auth_failures.as_ref(), &client)
    }

    fn take<K>(&self, limiter: Option<&DefaultKeyedRateLimiter<K>>, key: &K) -> Result<(), ApiError>
    where
        K: Clone + Eq + std::hash::Hash,
    {
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            metrics::counter!("api_rate_limited_total").increment(1);
            ApiError::RateLimited(wait)
        })
    }

    /// The address of the client that sent `parts`, as the limits count it.
    pub fn client_address(&self, parts: &Parts) -> IpAddr {
        per_network(self.peer_or_proxied(parts))
    }

    /// The peer, or behind trusted proxies the client they forwarded
    /// ([`crate::http::forwarded`]).
    fn peer_or_proxied(&self, parts: &Parts) -> IpAddr {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ConnectInfo(peer)| peer.ip());
        if self.trusted_proxies.is_empty() {
            return peer;
        }
        let entries: Vec<&str> = parts
            .headers
            .get_all(&self.client_ip_header)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .collect();
        crate::http::forwarded::client_behind(peer, entries.into_iter(), &self.trusted_proxies)
    }

    /// Whether `peer` is one of the trusted proxies (whose connections carry many clients).
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// Forgets idle keys every minute until `stop`.
    pub fn start_forgetting(
        self: &std::sync::Arc<Self>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let limits = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(FORGET_EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = stop.cancelled() => return,
                }
                if let Some(l) = &limits.user_writes {
                    l.retain_recent();
                    l.shrink_to_fit();
                }
                for l in [&limits.signups, &limits.auth_failures].into_iter().flatten() {
                    l.retain_recent();
                    l.shrink_to_fit();
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64_and_ipv4_one_by_one() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1"
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let same_network: IpAddr = "2001:db8:1:2:bbbb::9"
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let other_network: IpAddr = "2001:db8:1:3::1"
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(per_network(one), per_network(same_network));
        assert_ne!(per_network(one), per_network(other_network));
        let v4: IpAddr = "203.0.113.7".parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let mapped: IpAddr = "::ffff:203.0.113.7"
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(per_network(v4), v4);
        assert_eq!(per_network(mapped), v4);
        let neighbour: IpAddr = "203.0.113.8".parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_ne!(per_network(v4), per_network(neighbour));
    }
}
