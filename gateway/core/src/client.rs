//! Who is the client? The socket peer, unless the peer is a trusted proxy, in which case the
//! rightmost `X-Forwarded-For` address that is not itself a trusted proxy.

use std::net::IpAddr;

use ipnet::IpNet;

/// `forwarded_for` yields the raw `X-Forwarded-For` header values in the order they arrived.
pub fn client_ip<'a, I>(peer: IpAddr, forwarded_for: I, trusted: &[IpNet]) -> IpAddr
where
    I: DoubleEndedIterator<Item = &'a str>,
{
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    // Walk right to left: each hop was appended by the proxy nearer to us.
    for value in forwarded_for.rev() {
        for hop in value.rsplit(',') {
            let Some(ip) = parse_hop(hop) else {
                // Garbage in the chain: stop at the last address we could vouch for.
                return client;
            };
            client = ip;
            if !is_trusted(&ip) {
                return ip;
            }
        }
    }
    client
}

/// Accepts `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` and `[2001:db8::1]:5678`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(sock) = hop.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("net")).collect()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = nets(&["10.0.0.0/8"]);
        let got = client_ip(ip("127.12.0.1"), ["127.15.0.1"].into_iter(), &trusted);
        assert_eq!(got, ip("127.12.0.1"));
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted_hop() {
        let trusted = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        let got = client_ip(
            ip("127.0.0.1"),
            ["127.99.0.1, 127.15.0.7", "10.1.1.1"].into_iter(),
            &trusted,
        );
        assert_eq!(got, ip("127.15.0.7"));
    }

    #[test]
    fn all_trusted_chain_gives_leftmost_and_garbage_stops_the_walk() {
        let trusted = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        let all = client_ip(
            ip("127.0.0.1"),
            ["10.0.0.2, 10.0.0.3"].into_iter(),
            &trusted,
        );
        assert_eq!(all, ip("10.0.0.2"));
        let garbage = client_ip(ip("127.0.0.1"), ["127.15.0.1, bogus"].into_iter(), &trusted);
        assert_eq!(garbage, ip("127.0.0.1"));
        let ported = client_ip(
            ip("127.0.0.1"),
            ["[::1]:443, 127.13.0.1:1234"].into_iter(),
            &trusted,
        );
        assert_eq!(ported, ip("127.13.0.1"));
        let none = client_ip(ip("127.0.0.1"), std::iter::empty(), &trusted);
        assert_eq!(none, ip("127.0.0.1"));
    }
}
