//! Which headers a proxy forwards. Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection,
//! not the message: they are never forwarded, in either direction, on any protocol — and neither
//! are the headers a `Connection` header names, which are hop-by-hop for that one message.

use http::header::{HeaderMap, HeaderName, CONNECTION};

/// The fixed hop-by-hop names (lowercase, as `HeaderName`s are).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Which of `names` `headers` holds, found in one pass over its names: a request carries a
/// handful of fields, and comparing names (an enum compare for the standard ones) costs less than
/// hashing each wanted name for a lookup.
pub fn present<const N: usize>(headers: &HeaderMap, names: [&HeaderName; N]) -> [bool; N] {
    let mut found = [false; N];
    for name in headers.keys() {
        for (found, wanted) in found.iter_mut().zip(names) {
            *found |= name == wanted;
        }
    }
    found
}

pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Is `name` listed by one of the message's `Connection` headers (`Connection: close, x-foo`)?
pub fn is_connection_nominated(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Removes every hop-by-hop header from `headers` in place, nominated ones included. The common
/// case (no `Connection` header, none of the fixed names) removes nothing and allocates nothing.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (comparisons, no hashing) answers the usual case: the nine
    // lookups below each hash a name, which cost more than the whole scan of a typical head.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        let nominated: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in nominated {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

/// The protocol an HTTP/1.1 request asks the connection to switch to (RFC 9110 §7.8), such as a
/// WebSocket handshake (RFC 6455 §4.1): a `GET` whose `Connection` names `upgrade` and that
/// carries one `Upgrade`. `Upgrade` is hop-by-hop, so a proxy that passes the switch on must
/// say so again on its own hop.
pub fn requested_upgrade<'h>(
    method: &http::Method,
    headers: &'h HeaderMap,
) -> Option<&'h http::HeaderValue> {
    if method != http::Method::GET {
        return None;
    }
    let mut upgrades = headers.get_all(http::header::UPGRADE).iter();
    let protocol = upgrades.next()?;
    if upgrades.next().is_some() || protocol.is_empty() {
        return None;
    }
    let nominated = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    nominated.then_some(protocol)
}

/// A copy of `headers` without the hop-by-hop ones (for a new message built from another).
pub fn forwardable(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len() + 4);
    let has_connection = headers.contains_key(CONNECTION);
    for (name, value) in headers {
        if is_hop_by_hop(name) || (has_connection && is_connection_nominated(headers, name)) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn present_finds_each_wanted_name_once_or_more() {
        let headers = map(&[("cookie", "a=1"), ("x-a", "1"), ("cookie", "b=2")]);
        let wanted = [
            &http::header::COOKIE,
            &http::header::RANGE,
            &HeaderName::from_static("x-a"),
        ];
        assert_eq!(present(&headers, wanted), [true, false, true]);
        assert_eq!(present(&HeaderMap::new(), wanted), [false; 3]);
    }

    #[test]
    fn fixed_and_nominated_headers_are_dropped() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case<'_>] = &[
            (
                &[("x-a", "1"), ("content-type", "text/plain")],
                &["x-a", "content-type"],
            ),
            (
                &[
                    ("connection", "close, X-Secret"),
                    ("x-secret", "s"),
                    ("x-a", "1"),
                ],
                &["x-a"],
            ),
            (
                &[
                    ("connection", "x-one"),
                    ("connection", " x-two ,"),
                    ("x-one", "1"),
                    ("x-two", "2"),
                    ("x-three", "3"),
                ],
                &["x-three"],
            ),
            (
                &[
                    ("keep-alive", "5"),
                    ("te", "trailers"),
                    ("transfer-encoding", "chunked"),
                    ("upgrade", "h2c"),
                    ("proxy-authorization", "x"),
                    ("trailer", "x"),
                    ("proxy-connection", "x"),
                    ("proxy-authenticate", "x"),
                    ("x-kept", "1"),
                ],
                &["x-kept"],
            ),
        ];
        for (input, kept) in cases {
            let headers = map(input);
            assert!(requested_upgrade(&http::Method::GET, &headers).is_none());
            let copied = forwardable(&headers);
            let mut stripped = headers.clone();
            strip_hop_by_hop(&mut stripped);
            for out in [&copied, &stripped] {
                let names: Vec<&str> = out.keys().map(|n| n.as_str()).collect();
                assert_eq!(&names, kept, "{input:?}");
            }
        }
    }

    #[test]
    fn an_upgrade_needs_get_connection_upgrade_and_one_upgrade_header() {
        let get = http::Method::GET;
        let websocket = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(
            requested_upgrade(&get, &websocket).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert!(requested_upgrade(&http::Method::POST, &websocket).is_none());
        let not_nominated = map(&[("connection", "keep-alive"), ("upgrade", "websocket")]);
        assert!(requested_upgrade(&get, &not_nominated).is_none());
        let no_protocol = map(&[("connection", "upgrade")]);
        assert!(requested_upgrade(&get, &no_protocol).is_none());
        let two = map(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "h2c"),
        ]);
        assert!(requested_upgrade(&get, &two).is_none());
    }
}
