//! Who the client is behind reverse proxies: the connection's peer, unless the operator
//! names the proxy networks it trusts (`TRUSTED_PROXIES`). Only then is the forwarded header
//! (`TRUSTED_CLIENT_IP_HEADER`, `X-Forwarded-For` style) read, and only as far as those
//! proxies: each proxy appends the address of its own peer, so the header is read from the
//! right, past every trusted hop, and the first address that is not a trusted proxy is the
//! client. Whatever lies left of it was written by the client and is not believed.

use std::net::IpAddr;

use ipnet::IpNet;

/// The client behind `peer`, given the entries of the forwarded header in the order they
/// appear (all its lines, split on commas).
pub fn client_behind<'a>(
    peer: IpAddr,
    forwarded: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |address: &IpAddr| trusted.iter().any(|net| net.contains(address));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut nearest = peer;
    for entry in forwarded.rev() {
        // A trusted proxy never writes garbage: an entry that does not parse ends the walk
        // at the last address a trusted hop vouched for.
        let Some(address) = parse_entry(entry) else {
            return nearest;
        };
        if !is_trusted(&address) {
            return address;
        }
        nearest = address;
    }
    // Every hop is a proxy we trust (a client inside the proxies' own network).
    nearest
}

/// An address of a forwarded header: `203.0.113.7`, `2001:db8::1`, and with a port
/// `203.0.113.7:4711` or `[2001:db8::1]:4711`, as some proxies write them.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(address) = entry.parse() {
        return Some(address);
    }
    if let Some(bracketed) = entry.strip_prefix('[') {
        return bracketed.split_once(']')?.0.parse().ok();
    }
    let (host, _port) = entry.rsplit_once(':')?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// `TRUSTED_PROXIES`: networks (`10.0.0.0/8`) or single addresses, separated by commas.
pub fn parse_networks(raw: &str) -> Result<Vec<IpNet>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{item:?} is neither a network (10.0.0.0/8) nor an address"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    fn nets(s: &str) -> Vec<IpNet> {
        parse_networks(s).unwrap_or_default()
    }

    fn entries(header: &str) -> impl DoubleEndedIterator<Item = &str> {
        header.split(',')
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() {
        let peer = ip("198.51.100.9");
        assert_eq!(client_behind(peer, entries("203.0.113.1"), &[]), peer);
        // A peer outside the trusted networks spoofs nothing either.
        let trusted = nets("10.0.0.0/8");
        assert_eq!(client_behind(peer, entries("203.0.113.1"), &trusted), peer);
    }

    #[test]
    fn the_header_is_read_from_the_right_past_trusted_hops() {
        let trusted = nets("10.0.0.0/8, 192.0.2.10");
        // The client wrote 198.51.100.66 itself; the edge proxy (192.0.2.10) appended the
        // client's address, the inner proxy (10.0.0.2) the edge's; the peer is the inner one.
        let header = "198.51.100.66, 203.0.113.1, 192.0.2.10";
        assert_eq!(
            client_behind(ip("10.0.0.2"), entries(header), &trusted),
            ip("203.0.113.1")
        );
        // Ports and brackets, as some proxies write them.
        assert_eq!(
            client_behind(
                ip("10.0.0.2"),
                entries("[2001:db8::7]:443, 10.0.0.3:80"),
                &trusted
            ),
            ip("2001:db8::7")
        );
        // Garbage stops the walk at the last hop vouched for.
        assert_eq!(
            client_behind(
                ip("10.0.0.2"),
                entries("203.0.113.1, nonsense, 10.0.0.3"),
                &trusted
            ),
            ip("10.0.0.3")
        );
        // No header: the trusted peer itself.
        assert_eq!(
            client_behind(ip("10.0.0.2"), std::iter::empty(), &trusted),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn networks_and_single_addresses_are_read_and_nonsense_refused() {
        assert_eq!(nets("10.0.0.0/8,2001:db8::/32, 192.0.2.1").len(), 3);
        assert!(parse_networks("10.0.0.0/33").is_err());
        assert!(parse_networks("proxy.internal").is_err());
        assert_eq!(parse_networks(" ").map(|n| n.len()), Ok(0));
    }
}
