//! Headers between client and upstream: `X-Forwarded-*`, `X-Request-Id`, and the edge's own headers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderName, HeaderValue};

pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
/// [`X_FORWARDED_FOR`] as a `HeaderName`, for lookups (a `&str` name is parsed on every lookup).
pub(crate) const X_FORWARDED_FOR_HEADER: HeaderName = HeaderName::from_static(X_FORWARDED_FOR);
pub const HEADER_REGION: HeaderName = HeaderName::from_static("x-meridian-region");
pub const HEADER_POP: HeaderName = HeaderName::from_static("x-meridian-pop");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Sets the forwarding headers of a request going upstream: `X-Forwarded-For` (the chain from
/// trusted proxies plus the client), `X-Forwarded-Proto` (`scheme`: what the client used to reach
/// the edge), `X-Request-Id` (the client's when sane, else a new one) and `traceparent`.
pub(crate) fn set_forwarding_headers(
    headers: &mut http::HeaderMap,
    client: IpAddr,
    scheme: &'static str,
) {
    if let Ok(value) = forwarded_for_chain(headers, client) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    if let Some(id) = replacement_request_id(headers) {
        headers.insert(X_REQUEST_ID, id);
    }
    crate::access_log::propagate_traceparent(headers);
}

/// `X-Request-Id` to set, unless the client sent a sane one (kept as is).
fn replacement_request_id(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let keep = headers
        .get(&X_REQUEST_ID)
        .is_some_and(|v| is_sane_request_id(v.as_bytes()));
    (!keep).then(new_request_id)
}

/// The `X-Forwarded-For` chain the client (or trusted proxies) sent, with `client` appended:
/// `a, b, client`. Values that are not visible ASCII are skipped (as `to_str` would).
fn forwarded_for_chain(
    headers: &http::HeaderMap,
    client: IpAddr,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    use std::io::Write;
    // Room for the longest IPv6 text; usually the whole value (no incoming chain).
    let mut ip = [0u8; 48];
    let ip_len = {
        let mut cursor = std::io::Cursor::new(&mut ip[..]);
        let _ = write!(cursor, "{client}");
        cursor.position() as usize
    };
    let ip = &ip[..ip_len];
    let mut incoming = headers
        .get_all(&X_FORWARDED_FOR_HEADER)
        .iter()
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

/// Client-supplied ids are kept when they are short and printable; anything else is replaced.
fn is_sane_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= 128 && id.iter().all(|b| b.is_ascii_graphic())
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
    put_hex(&mut id[..16], high);
    put_hex(&mut id[16..], splitmix(high ^ seed));
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// Writes `x` as lowercase hex, zero-padded, into all of `out` (16 bytes for a `u64`).
pub(crate) fn put_hex(out: &mut [u8], x: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let len = out.len();
    for (i, byte) in out.iter_mut().enumerate() {
        let shift = 4 * (len - 1 - i);
        *byte = if shift < 64 {
            DIGITS[((x >> shift) & 0xf) as usize]
        } else {
            b'0'
        };
    }
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
    }

    #[test]
    fn hex_is_zero_padded_lowercase() {
        let mut out = [0u8; 16];
        put_hex(&mut out, 0xab);
        assert_eq!(&out, b"00000000000000ab");
        put_hex(&mut out, u64::MAX);
        assert_eq!(&out, b"ffffffffffffffff");
        assert_eq!(format!("{:016x}", 0x0123_4567_89ab_cdefu64).as_bytes(), {
            put_hex(&mut out, 0x0123_4567_89ab_cdef);
            &out
        });
    }

    #[test]
    fn forwarded_for_appends_the_client() {
        let client: IpAddr = "127.12.0.5".parse().expect("ip");
        let mut headers = http::HeaderMap::new();
        assert_eq!(
            forwarded_for_chain(&headers, client).expect("value"),
            "127.12.0.5"
        );
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        assert_eq!(
            forwarded_for_chain(&headers, client).expect("value"),
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.12.0.5"
        );
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(
            forwarded_for_chain(&http::HeaderMap::new(), v6).expect("value"),
            "2001:db8::1"
        );
    }
}
