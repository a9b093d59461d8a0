//! Headers between client and upstream: `X-Forwarded-*`, `X-Request-Id`, and the edge's own headers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::access_log::TRACEPARENT;
use crate::core::headers::UpstreamHeaders;
use http::{HeaderName, HeaderValue};

pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
/// [`X_FORWARDED_FOR`] as a `HeaderName`, for lookups (a `&str` name is parsed on every lookup).
pub(crate) const X_FORWARDED_FOR_HEADER: HeaderName = HeaderName::from_static(X_FORWARDED_FOR);
pub const HEADER_REGION: HeaderName = HeaderName::from_static("x-meridian-region");
pub const HEADER_POP_STR: &str = "x-meridian-pop";
pub const HEADER_POP: HeaderName = HeaderName::from_static(HEADER_POP_STR);
/// Response fields only this edge sets, in the order it writes them: an upstream's fields of
/// these names are replaced on the way out.
pub static EDGE_RESPONSE_FIELDS: [HeaderName; 4] = [
    HEADER_REGION,
    crate::cache::HEADER_CACHE_NAME,
    HEADER_POP,
    http::header::ALT_SVC,
];
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Who sent a request and how, for the forwarding headers of its upstream request.
#[derive(Clone, Copy, Debug)]
pub struct Forwarding<'a> {
    /// The connection's peer: the hop this edge adds to `X-Forwarded-For` and `Forwarded`. Each
    /// proxy on the way appends the address it received the request from, so the chain names
    /// every hop; from an untrusted peer (whose chain is dropped) it is the client itself. The
    /// client resolved through trusted proxies is for geography, not for this chain: appending
    /// it would repeat the rightmost untrusted address and lose the proxy that vouched for it.
    pub peer: IpAddr,
    /// What the client used to reach the edge (`http`/`https`).
    pub scheme: &'static str,
    /// The host the request was routed by.
    pub host: &'a str,
    /// The connection's peer is a trusted proxy (`geoip.trusted_proxies`): its forwarding
    /// headers are kept and extended. Anyone else's are replaced by the edge's own.
    pub trusted_peer: bool,
    /// Also send RFC 7239 `Forwarded` (`edge.forwarded`).
    pub rfc7239: bool,
}

/// Sets the forwarding headers of a request going upstream. From an untrusted peer, every
/// header an origin may take as the edge's word about the client — `X-Forwarded-*`,
/// `Forwarded`, `X-Real-IP` and the like — is dropped first: they are not in the cache key, so
/// one client's made-up `X-Forwarded-Host` would otherwise shape a response cached for everyone.
/// Then `X-Forwarded-For` (the chain from trusted proxies plus the peer), `X-Forwarded-Proto`,
/// optionally `Forwarded`, `X-Request-Id` (the client's when well formed, else a new one) and
/// `traceparent` (likewise).
pub fn set_forwarding_headers(headers: &mut UpstreamHeaders<'_>, forwarding: &Forwarding<'_>) {
    if !forwarding.trusted_peer {
        strip_spoofable(headers);
    }
    // Whether the client sent (and may pass on) the fields this hop extends or checks.
    let [incoming_chain, incoming_id, incoming_trace] =
        headers.may_send([&X_FORWARDED_FOR_HEADER, &X_REQUEST_ID, &TRACEPARENT]);
    if let Ok(value) = forwarded_for_chain(headers, forwarding.peer, incoming_chain) {
        headers.insert(X_FORWARDED_FOR_HEADER, value);
    }
    if !(forwarding.trusted_peer && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(forwarding.scheme),
        );
    }
    if forwarding.rfc7239 {
        if let Ok(value) = forwarded_chain(headers, forwarding) {
            headers.insert(FORWARDED, value);
        }
    }
    let request_id = if incoming_id {
        replacement_request_id(headers)
    } else {
        Some(new_request_id())
    };
    if let Some(id) = request_id {
        headers.insert(X_REQUEST_ID, id);
    }
    if incoming_trace {
        crate::access_log::propagate_traceparent(headers);
    } else {
        headers.insert(TRACEPARENT, crate::access_log::new_traceparent_value());
    }
}

/// Headers that carry a proxy's word about the client or the original request. Beyond the
/// `X-Forwarded-*` family: `Forwarded` (RFC 7239), `X-Real-IP` and the client-address and
/// original-URL headers that common origins and frameworks honour.
const SPOOFABLE: [&str; 8] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-host",
    "x-host",
];

/// Is `name` a forwarding header only a trusted proxy may set?
pub fn is_spoofable(name: &str) -> bool {
    name.starts_with("x-forwarded-") || SPOOFABLE.contains(&name)
}

/// Drops every [`is_spoofable`] header. Nothing is allocated when there is none (the usual case).
fn strip_spoofable(headers: &mut UpstreamHeaders<'_>) {
    if !headers.iter().any(|(name, _)| is_spoofable(name.as_str())) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .iter()
        .map(|(name, _)| name)
        .filter(|name| is_spoofable(name.as_str()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// The RFC 7239 `Forwarded` value: what a trusted peer sent, plus this hop's element
/// `for=…;proto=…;host=…` (IPv6 and hosts with a port quoted, as the grammar asks). A host that
/// is not a plain `name[:port]` is left out rather than escaped.
fn forwarded_chain(
    headers: &UpstreamHeaders<'_>,
    forwarding: &Forwarding<'_>,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let mut out = String::with_capacity(96);
    for value in headers.get_all(&FORWARDED) {
        if let Ok(text) = value.to_str() {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(text);
        }
    }
    if !out.is_empty() {
        out.push_str(", ");
    }
    out.push_str(&forwarded_element(forwarding));
    HeaderValue::from_str(&out)
}

/// This hop's `Forwarded` element.
pub fn forwarded_element(forwarding: &Forwarding<'_>) -> String {
    let for_ = match forwarding.peer {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={for_};proto={}", forwarding.scheme);
    let host = forwarding.host;
    let plain = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if plain {
        if host.bytes().any(|b| matches!(b, b':' | b'[' | b']')) {
            element.push_str(&format!(";host=\"{host}\""));
        } else {
            element.push_str(";host=");
            element.push_str(host);
        }
    }
    element
}

/// `X-Request-Id` to set, unless the client sent a well-formed one (kept as is).
fn replacement_request_id(headers: &UpstreamHeaders<'_>) -> Option<HeaderValue> {
    let keep = headers
        .get(&X_REQUEST_ID)
        .is_some_and(|v| is_sane_request_id(v.as_bytes()));
    (!keep).then(new_request_id)
}

/// Writes `ip` as text into `out` (at least 48 bytes), returning the length. IPv4, the common
/// case, is written digit by digit: `Display` for addresses goes through the formatter's padding
/// machinery and cost about a thousand instructions per request here.
fn ip_text(ip: IpAddr, out: &mut [u8; 48]) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    out[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    out[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                out[len] = b'0' + octet % 10;
                len += 1;
            }
            len
        }
        IpAddr::V6(_) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut out[..]);
            let _ = write!(cursor, "{ip}");
            usize::try_from(cursor.position()).unwrap_or(0)
        }
    }
}

/// The `X-Forwarded-For` chain the client (or trusted proxies) sent, with `hop` appended:
/// `a, b, hop`. Values that are not visible ASCII are skipped (as `to_str` would). `sent`:
/// whether the client may have sent a chain ([`UpstreamHeaders::may_send`]); when not, the chain
/// is `hop` alone and nothing is looked up.
pub fn forwarded_for_chain(
    headers: &UpstreamHeaders<'_>,
    hop: IpAddr,
    sent: bool,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    // Room for the longest IPv6 text; usually the whole value (no incoming chain).
    let mut ip = [0u8; 48];
    let ip_len = ip_text(hop, &mut ip);
    let ip = &ip[..ip_len];
    let mut incoming = sent
        .then(|| headers.get_all(&X_FORWARDED_FOR_HEADER))
        .into_iter()
        .flatten()
        .filter(|v| v.to_str().is_ok())
        .peekable();
    if incoming.peek().is_none() {
        return HeaderValue::from_bytes(ip);
    }
    let mut chain = Vec::with_capacity(128);
    for value in incoming {
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(value.as_bytes());
    }
    if !chain.is_empty() {
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(ip);
    HeaderValue::from_bytes(&chain)
}

/// Client-supplied ids are kept when they are short and made of the characters ids are made of
/// (UUIDs, ULIDs, base64, `svc:123`); anything else — quotes, angle brackets, separators that
/// end up in logs and dashboards — is replaced.
pub fn is_sane_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b))
}

/// 128-bit ids: a per-process random seed mixed with a counter (unique, unpredictable enough for
/// logs), as 32 lowercase hex digits.
fn new_request_id() -> HeaderValue {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        splitmix(t ^ u64::from(std::process::id()).rotate_left(32))
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let high = splitmix(seed ^ n);
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(&hex16(high));
    id[16..].copy_from_slice(&hex16(splitmix(high ^ seed)));
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// `x` as 16 lowercase hex digits, zero-padded. Every request carries two or three fresh ids, so
/// the digits are made eight at a time in a word (each nibble spread into its own byte, then
/// offset to `0`–`9` or `a`–`f`) rather than by a lookup per digit.
pub(crate) fn hex16(x: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hex8((x >> 32) as u32));
    out[8..].copy_from_slice(&hex8(x as u32));
    out
}

fn hex8(v: u32) -> [u8; 8] {
    // Nibble k of `v` ends in byte k of `spread` (byte 0 the least significant).
    let mut spread = u64::from(v);
    spread = (spread | (spread << 16)) & 0x0000_ffff_0000_ffff;
    spread = (spread | (spread << 8)) & 0x00ff_00ff_00ff_00ff;
    spread = (spread | (spread << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    // A byte is a letter when it is 10 or more: adding 6 carries into its bit 4.
    let letters = ((spread + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (spread + 0x3030_3030_3030_3030 + letters * (b'a' - b'0' - 10) as u64).to_be_bytes()
}

/// SplitMix64: cheap, well-mixed ids from a seed and a counter (not cryptographic).
pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let samples = [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "192.168.1.250",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.1.2.3",
        ];
        for text in samples {
            let ip: IpAddr = text.parse().expect("sample address");
            let mut out = [0u8; 48];
            let len = ip_text(ip, &mut out);
            assert_eq!(&out[..len], ip.to_string().as_bytes(), "{text}");
        }
    }

    #[test]
    fn request_ids_are_unique_and_sanity_checked() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a
            .as_bytes()
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)));
        assert!(is_sane_request_id(b"abc-123"));
        assert!(!is_sane_request_id(b""));
        assert!(!is_sane_request_id(b"has space"));
        assert!(!is_sane_request_id(&[b'a'; 129]));
        assert!(is_sane_request_id(b"0b7c1f3e-55a1-4d2b-9c1e-3f6a2b7d9e10"));
        assert!(!is_sane_request_id(b"<script>"));
        assert!(!is_sane_request_id(b"a\"b"));
    }

    #[test]
    fn hex_is_zero_padded_lowercase() {
        assert_eq!(&hex16(0xab), b"00000000000000ab");
        assert_eq!(&hex16(u64::MAX), b"ffffffffffffffff");
        let mut x = 0x0123_4567_89ab_cdefu64;
        for _ in 0..1000 {
            assert_eq!(format!("{x:016x}").as_bytes(), &hex16(x));
            x = splitmix(x);
        }
    }

    #[test]
    fn forwarded_for_appends_the_hop() {
        let peer: IpAddr = "127.12.0.5".parse().expect("ip");
        let mut headers = http::HeaderMap::new();
        assert_eq!(
            forwarded_for_chain(&UpstreamHeaders::from_client(&headers), peer, true)
                .expect("value"),
            "127.12.0.5"
        );
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        assert_eq!(
            forwarded_for_chain(&UpstreamHeaders::from_client(&headers), peer, true)
                .expect("value"),
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.12.0.5"
        );
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(
            forwarded_for_chain(&UpstreamHeaders::new(), v6, true).expect("value"),
            "2001:db8::1"
        );
    }
}

#[cfg(test)]
mod edge_owned {
    use super::*;

    fn spoofed() -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (name, value) in [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.test"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/admin"),
            ("forwarded", "for=6.6.6.6;host=evil.test"),
            ("x-real-ip", "6.6.6.6"),
            ("x-original-url", "/admin"),
            ("x-request-id", "<img src=x>"),
            ("traceparent", "00-zz-zz-01"),
            ("accept", "*/*"),
        ] {
            h.append(name, HeaderValue::from_static(value));
        }
        h
    }

    fn forwarding(trusted_peer: bool, rfc7239: bool) -> Forwarding<'static> {
        Forwarding {
            peer: "127.12.0.5".parse().expect("ip"),
            scheme: "http",
            host: "static.example.test",
            trusted_peer,
            rfc7239,
        }
    }

    #[test]
    fn an_untrusted_peer_cannot_speak_for_the_edge() {
        let client = spoofed();
        let mut upstream = UpstreamHeaders::from_client(&client);
        set_forwarding_headers(&mut upstream, &forwarding(false, false));
        let h = upstream.to_map();
        assert_eq!(h["x-forwarded-for"], "127.12.0.5");
        assert_eq!(h["x-forwarded-proto"], "http");
        for gone in [
            "x-forwarded-host",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "forwarded",
            "x-real-ip",
            "x-original-url",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(h["accept"], "*/*");
        assert_ne!(h["x-request-id"], "<img src=x>");
        assert_ne!(h["traceparent"], "00-zz-zz-01");
    }

    #[test]
    fn a_trusted_peer_is_extended_and_rfc7239_is_optional() {
        let client = spoofed();
        let mut upstream = UpstreamHeaders::from_client(&client);
        set_forwarding_headers(&mut upstream, &forwarding(true, true));
        let h = upstream.to_map();
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.12.0.5");
        assert_eq!(
            h["x-forwarded-host"], "evil.test",
            "the proxy's word stands"
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["forwarded"],
            "for=6.6.6.6;host=evil.test, for=127.12.0.5;proto=http;host=static.example.test"
        );
        let mut upstream = UpstreamHeaders::new();
        let v6 = Forwarding {
            peer: "2001:db8::1".parse().expect("ip"),
            host: "h.test:8443",
            ..forwarding(false, true)
        };
        set_forwarding_headers(&mut upstream, &v6);
        let h = upstream.to_map();
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";proto=http;host=\"h.test:8443\""
        );
        let odd = Forwarding {
            host: "a\"b",
            ..forwarding(false, true)
        };
        assert_eq!(forwarded_element(&odd), "for=127.12.0.5;proto=http");
    }
}
