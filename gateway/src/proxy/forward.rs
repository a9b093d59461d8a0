//! Headers between client and upstream: `X-Forwarded-*`, `X-Request-Id`, and the edge's own headers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::HOST;
use http::HeaderName;
use pingora::prelude::*;
use pingora_http::RequestHeader;

pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const HEADER_REGION: HeaderName = HeaderName::from_static("x-meridian-region");
pub const HEADER_POP: HeaderName = HeaderName::from_static("x-meridian-pop");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The host the client asked for: `Host` (HTTP/1.1) or the URI authority (HTTP/2).
pub fn host(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .filter(|h| !h.is_empty())
}

/// `scheme` is what the client used to reach the edge (`http` or `https`).
pub fn add_forwarding_headers(
    req: &mut RequestHeader,
    client: IpAddr,
    scheme: &'static str,
) -> Result<()> {
    let chain = forwarded_for_chain(&req.headers, client);
    req.insert_header(X_FORWARDED_FOR, chain)?;
    req.insert_header(X_FORWARDED_PROTO, scheme)?;
    if let Some(id) = replacement_request_id(&req.headers) {
        req.insert_header(X_REQUEST_ID, id)?;
    }
    if crate::access_log::needs_traceparent(&req.headers) {
        req.insert_header(
            crate::access_log::TRACEPARENT,
            crate::access_log::new_traceparent(),
        )?;
    }
    Ok(())
}

/// The same forwarding headers on a plain header map (the HTTP/3 front's upstream requests).
pub(crate) fn set_forwarding_headers(
    headers: &mut http::HeaderMap,
    client: IpAddr,
    scheme: &'static str,
) {
    let chain = forwarded_for_chain(headers, client);
    if let Ok(value) = http::HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, http::HeaderValue::from_static(scheme));
    if let Some(id) = replacement_request_id(headers) {
        if let Ok(value) = http::HeaderValue::from_str(&id) {
            headers.insert(X_REQUEST_ID, value);
        }
    }
    crate::access_log::propagate_traceparent(headers);
}

/// `X-Request-Id` to set, unless the client sent a sane one (kept as is).
fn replacement_request_id(headers: &http::HeaderMap) -> Option<String> {
    let keep = headers
        .get(&X_REQUEST_ID)
        .is_some_and(|v| is_sane_request_id(v.as_bytes()));
    (!keep).then(new_request_id)
}

/// The `X-Forwarded-For` chain the client (or trusted proxies) sent, with `client` appended.
fn forwarded_for_chain(headers: &http::HeaderMap, client: IpAddr) -> String {
    let mut chain = String::with_capacity(64);
    for value in headers.get_all(X_FORWARDED_FOR).iter() {
        if let Ok(v) = value.to_str() {
            if !chain.is_empty() {
                chain.push_str(", ");
            }
            chain.push_str(v);
        }
    }
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    use std::fmt::Write;
    let _ = write!(chain, "{client}");
    chain
}

/// Client-supplied ids are kept when they are short and printable; anything else is replaced.
fn is_sane_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= 128 && id.iter().all(|b| b.is_ascii_graphic())
}

/// 128-bit ids: a per-process random seed mixed with a counter (unique, unpredictable enough for logs).
fn new_request_id() -> String {
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
    format!("{high:016x}{:016x}", splitmix(high ^ seed))
}

fn splitmix(mut x: u64) -> u64 {
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
        assert!(is_sane_request_id(b"abc-123"));
        assert!(!is_sane_request_id(b""));
        assert!(!is_sane_request_id(b"has space"));
        assert!(!is_sane_request_id(&[b'a'; 129]));
    }
}
