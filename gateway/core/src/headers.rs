//! Which headers a proxy forwards. Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection,
//! not the message: they are never forwarded, in either direction, on any protocol — and neither
//! are the headers a `Connection` header names, which are hop-by-hop for that one message.

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION};

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
    is_hop_by_hop_name(name.as_str().as_bytes())
}

/// [`is_hop_by_hop`] for a lower-case name still in bytes (a head being read, before any
/// `HeaderName` is made of it).
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    // A match on the text compiles to a switch on its length and one comparison; a search of
    // `HOP_BY_HOP` compared up to nine strings, for every field of every message.
    matches!(
        name,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"proxy-authenticate"
            | b"proxy-authorization"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
            | b"upgrade"
    )
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

/// The header section a request takes upstream: the client's fields a proxy may forward, with
/// the edge's own edits on top. The client's map is borrowed, not copied: a proxied request's
/// fields go from the client's head straight into the upstream one (a copy of the map cost a
/// table, a hashed insert and a value clone per field), and only what the edge sets or removes
/// is owned.
#[derive(Clone, Debug, Default)]
pub struct UpstreamHeaders<'a> {
    client: Option<&'a HeaderMap>,
    /// The client's message has a `Connection` field (only then can it nominate fields).
    client_nominates: bool,
    /// What the edge set (`Some`) or removed (`None`), one entry per name: a client field with
    /// an edited name is not sent.
    edits: Vec<(HeaderName, Option<HeaderValue>)>,
}

impl<'a> UpstreamHeaders<'a> {
    /// The client's forwardable fields, unedited.
    pub fn from_client(client: &'a HeaderMap) -> Self {
        Self {
            client: Some(client),
            client_nominates: client.contains_key(CONNECTION),
            // Room for the usual edits (forwarding fields, request id, trace context, Host).
            edits: Vec::with_capacity(6),
        }
    }

    /// No client fields: a request the edge makes on its own.
    pub fn new() -> Self {
        Self::default()
    }

    fn edit(&self, name: &HeaderName) -> Option<&Option<HeaderValue>> {
        self.edits.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Whether the client's field `name` goes upstream: not hop-by-hop, not named by the
    /// client's `Connection`, not replaced or removed by the edge.
    fn passes(&self, client: &HeaderMap, name: &HeaderName) -> bool {
        let nominated = self.client_nominates && is_connection_nominated(client, name);
        !is_hop_by_hop(name) && !nominated && self.edit(name).is_none()
    }

    /// The first value sent under `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&HeaderValue> {
        match self.edit(name) {
            Some(edited) => edited.as_ref(),
            None => {
                // Looked up first: the edge mostly asks for fields the client did not send,
                // and then whether they would pass needs no answer.
                let client = self.client?;
                let value = client.get(name)?;
                self.passes(client, name).then_some(value)
            }
        }
    }

    /// For each of `names`, whether a field of that name may be sent (`false`: [`Self::get`]
    /// would say `None`). One pass over the client's names answers for all of them: the edge
    /// asks about fields a client seldom sends (`X-Request-Id`, `traceparent`, …), and a miss
    /// in the map still hashed the name.
    pub fn may_send<const N: usize>(&self, names: [&HeaderName; N]) -> [bool; N] {
        let mut found = self
            .client
            .map_or([false; N], |client| present(client, names));
        for (found, name) in found.iter_mut().zip(names) {
            *found |= self.edit(name).is_some();
        }
        found
    }

    /// The client's map, when it sends fields named `name` that go upstream.
    fn client_sending(&self, name: &HeaderName) -> Option<&'a HeaderMap> {
        let client = self.client?;
        (client.contains_key(name) && self.passes(client, name)).then_some(client)
    }

    /// Every value sent under `name`, in order.
    pub fn get_all<'s>(&'s self, name: &HeaderName) -> impl Iterator<Item = &'s HeaderValue> {
        let (edited, client): (Option<&'s HeaderValue>, Option<&'s HeaderMap>) =
            match self.edit(name) {
                Some(edited) => (edited.as_ref(), None),
                None => (None, self.client_sending(name)),
            };
        let client = client.map(|client| client.get_all(name).iter());
        edited.into_iter().chain(client.into_iter().flatten())
    }

    pub fn contains_key(&self, name: &HeaderName) -> bool {
        self.get(name).is_some()
    }

    /// Sends `value` as the only field named `name` (a client field of that name is dropped).
    pub fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        self.set(name, Some(value));
    }

    /// Sends no field named `name`.
    pub fn remove(&mut self, name: HeaderName) {
        self.set(name, None);
    }

    fn set(&mut self, name: HeaderName, value: Option<HeaderValue>) {
        match self.edits.iter_mut().find(|(n, _)| *n == name) {
            Some(edit) => edit.1 = value,
            None => self.edits.push((name, value)),
        }
    }

    /// The fields as they go upstream: the client's that pass, in the client's order, then the
    /// edge's.
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        let client = self.client.into_iter().flat_map(move |client| {
            client
                .iter()
                .filter(move |(name, _)| self.passes(client, name))
        });
        let edits = self
            .edits
            .iter()
            .filter_map(|(name, value)| value.as_ref().map(|value| (name, value)));
        client.chain(edits)
    }

    /// At least the number of fields sent (for sizing a buffer).
    pub fn len_hint(&self) -> usize {
        self.client.map_or(0, HeaderMap::len) + self.edits.len()
    }

    /// The fields as a map (for callers that need one; the request path writes [`Self::iter`]).
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.len_hint());
        for (name, value) in self.iter() {
            map.append(name.clone(), value.clone());
        }
        map
    }
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
    fn may_send_agrees_with_get() {
        let client = map(&[("x-a", "1"), ("connection", "x-b"), ("x-b", "2")]);
        let mut headers = UpstreamHeaders::from_client(&client);
        headers.insert(
            HeaderName::from_static("x-c"),
            HeaderValue::from_static("3"),
        );
        headers.remove(HeaderName::from_static("x-a"));
        let names = ["x-a", "x-b", "x-c", "x-d"].map(HeaderName::from_static);
        let may = headers.may_send([&names[0], &names[1], &names[2], &names[3]]);
        for (name, may) in names.iter().zip(may) {
            // `may_send` may say yes to a field `get` then refuses, never the other way.
            assert!(may || headers.get(name).is_none(), "{name}");
        }
        assert_eq!(may, [true, true, true, false]);
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
            let upstream = UpstreamHeaders::from_client(&headers).to_map();
            for out in [&copied, &stripped, &upstream] {
                let names: Vec<&str> = out.keys().map(|n| n.as_str()).collect();
                assert_eq!(&names, kept, "{input:?}");
            }
        }
    }

    #[test]
    fn hop_by_hop_names_are_exactly_the_fixed_list() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "host",
            "content-length",
            "x-connection",
            "tee",
            "upgrades",
            "cookie",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn upstream_edits_replace_and_remove_client_fields() {
        let client = map(&[
            ("host", "a.test"),
            ("x-forwarded-for", "1.1.1.1"),
            ("accept", "*/*"),
            ("x-forwarded-for", "2.2.2.2"),
            ("connection", "x-secret"),
            ("x-secret", "s"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
        ]);
        let mut up = UpstreamHeaders::from_client(&client);
        let xff = HeaderName::from_static("x-forwarded-for");
        let values = |up: &UpstreamHeaders<'_>, name: &HeaderName| -> Vec<String> {
            up.get_all(name)
                .map(|v| v.to_str().unwrap_or_default().to_string())
                .collect()
        };
        assert_eq!(values(&up, &xff), ["1.1.1.1", "2.2.2.2"]);
        assert_eq!(values(&up, &http::header::COOKIE), ["a=1", "b=2"]);
        assert!(up.get(&HeaderName::from_static("x-secret")).is_none());
        assert!(up.get(&CONNECTION).is_none());

        up.insert(xff.clone(), HeaderValue::from_static("3.3.3.3"));
        up.insert(xff.clone(), HeaderValue::from_static("4.4.4.4"));
        up.remove(http::header::COOKIE);
        up.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(values(&up, &xff), ["4.4.4.4"]);
        assert!(!up.contains_key(&http::header::COOKIE));
        up.remove(HeaderName::from_static("x-never-there"));

        let sent: Vec<(String, String)> = up
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        let expected = [
            ("host", "a.test"),
            ("accept", "*/*"),
            ("x-forwarded-for", "4.4.4.4"),
            ("upgrade", "websocket"),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()));
        assert_eq!(sent, expected);
        assert!(up.len_hint() >= sent.len());
        assert_eq!(up.to_map().len(), sent.len());

        let own = {
            let mut own = UpstreamHeaders::new();
            own.insert(http::header::HOST, HeaderValue::from_static("b.test"));
            own
        };
        assert_eq!(own.iter().count(), 1);
        assert_eq!(
            own.get(&http::header::HOST).map(|v| v.as_bytes()),
            Some(&b"b.test"[..])
        );
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
