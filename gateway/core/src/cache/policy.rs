//! RFC 9111 subset, as pure functions of headers, route rules and `now`: may a request use the
//! cache, may a response be stored, how long is it fresh, how old is it, may it be served stale,
//! and the conditional-request (304) logic both towards clients and towards the origin.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use meridian_config::RouteCache;

use super::key::{parse_vary, KeyOptions, Vary};

/// Entries with validators are kept this long past their stale windows (at least), so an expired
/// entry can still be revalidated with a cheap conditional request.
const REVALIDATION_GRACE: Duration = Duration::from_secs(60);
/// Upper bound on how long anything stays in the store, whatever the origin says.
const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// A route's cache rules, compiled once per snapshot from its `cache = { ... }`.
#[derive(Clone, Debug, Default)]
pub struct RouteRules {
    pub enabled: bool,
    pub default_ttl: Option<Duration>,
    pub allow_authorization: bool,
    pub allow_set_cookie: bool,
    pub key: KeyOptions,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
}

impl RouteRules {
    pub fn from_config(config: &RouteCache) -> Self {
        Self {
            enabled: config.enabled,
            default_ttl: config.default_ttl.map(|d| d.as_duration()),
            allow_authorization: config.allow_authorization,
            allow_set_cookie: config.allow_set_cookie,
            key: KeyOptions::from_config(&config.key),
            stale_while_revalidate: config.stale_while_revalidate.map(|d| d.as_duration()),
            stale_if_error: config.stale_if_error.map(|d| d.as_duration()),
        }
    }
}

/// The `Cache-Control` directives this cache understands (others are ignored, as RFC 9111 says).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    pub only_if_cached: bool,
}

impl CacheControl {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut cc = Self::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive, None),
                };
                let seconds = || arg.and_then(parse_delta_seconds);
                match name.to_ascii_lowercase().as_str() {
                    // A malformed max-age makes the response stale (RFC 9111 §4.2.1): 0.
                    "max-age" => cc.max_age = Some(seconds().unwrap_or(0)),
                    "s-maxage" => cc.s_maxage = Some(seconds().unwrap_or(0)),
                    "no-store" => cc.no_store = true,
                    // Field-qualified forms (`no-cache="Set-Cookie"`) are treated unqualified:
                    // the conservative reading.
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "stale-while-revalidate" => cc.stale_while_revalidate = seconds(),
                    "stale-if-error" => cc.stale_if_error = seconds(),
                    "only-if-cached" => cc.only_if_cached = true,
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Delta-seconds; values too large saturate (RFC 9111 §1.2.2), garbage is `None`.
fn parse_delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse::<u64>().unwrap_or(u64::from(u32::MAX)))
}

pub fn http_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let text = headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(text.trim()).ok()
}

/// Why a request or response does not use the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// The route (or the edge) has caching off.
    Disabled,
    /// Only GET and HEAD are served from the cache.
    Method,
    /// Request `Cache-Control: no-store`.
    NoStore,
    /// `Authorization` on a route that does not allow caching it.
    Authorization,
    /// Range requests go to the origin.
    Range,
    /// A keyed header cannot be captured (too long, not text).
    Unkeyable,
}

/// How a request may use the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRules {
    pub head: bool,
    /// `Cache-Control: no-cache` (or `max-age=0`): do not serve a stored response without
    /// validating it; a fresh response from the origin may still be stored.
    pub no_cache: bool,
    /// `Cache-Control: max-age=N`: stored responses older than this are not acceptable.
    pub max_age: Option<u64>,
    pub authorization: bool,
}

pub fn classify_request(
    method: &Method,
    headers: &HeaderMap,
    rules: &RouteRules,
) -> Result<RequestRules, Bypass> {
    if !rules.enabled {
        return Err(Bypass::Disabled);
    }
    let head = match *method {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Err(Bypass::Method),
    };
    let cc = CacheControl::parse(headers);
    if cc.no_store {
        return Err(Bypass::NoStore);
    }
    let authorization = headers.contains_key(header::AUTHORIZATION);
    if authorization && !rules.allow_authorization {
        return Err(Bypass::Authorization);
    }
    if headers.contains_key(header::RANGE) {
        return Err(Bypass::Range);
    }
    let pragma_no_cache = !headers.contains_key(header::CACHE_CONTROL)
        && headers
            .get(header::PRAGMA)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("no-cache"));
    Ok(RequestRules {
        head,
        no_cache: cc.no_cache || cc.max_age == Some(0) || pragma_no_cache,
        max_age: cc.max_age,
        authorization,
    })
}

/// Why a response was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStorable {
    Status,
    NoStore,
    Private,
    SetCookie,
    Authorization,
    /// `Vary: *` or a `Vary` the key cannot capture (cache poisoning guard).
    Vary,
    /// No explicit freshness, no route `default_ttl`, no validator to revalidate with.
    NoFreshness,
    /// Declared or streamed body over `max_object_bytes`.
    TooLarge,
    /// HEAD responses carry no body to store.
    Head,
}

/// Statuses cacheable by default (RFC 9110 §15.1), minus 206 (no range support).
pub fn cacheable_status(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Freshness of one stored response, in the terms of RFC 9111 §4.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    /// When the response (or the 304 that last refreshed it) arrived.
    pub response_time: SystemTime,
    /// `corrected_initial_age`: how old the response already was when it arrived.
    pub initial_age: Duration,
    /// Freshness lifetime (s-maxage > max-age > Expires - Date > route default_ttl).
    pub lifetime: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// `must-revalidate` / `proxy-revalidate` / `s-maxage`: never served stale.
    pub must_revalidate: bool,
    /// `no-cache` response: stored, but validated before every use.
    pub no_cache: bool,
}

/// What a stored response may be used for at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usability {
    Fresh,
    /// Stale, inside the stale-while-revalidate window: serve, refresh in the background.
    StaleWhileRevalidate,
    /// Must be validated with the origin first (stale-if-error may still serve it on failure).
    Stale,
}

impl Freshness {
    /// `current_age` (RFC 9111 §4.2.3).
    pub fn age(&self, now: SystemTime) -> Duration {
        let resident = now.duration_since(self.response_time).unwrap_or_default();
        self.initial_age.saturating_add(resident)
    }

    pub fn usability(&self, now: SystemTime, request: &RequestRules) -> Usability {
        let age = self.age(now);
        let too_old_for_client = request.max_age.is_some_and(|m| age.as_secs() > m);
        if self.no_cache || request.no_cache || too_old_for_client {
            return Usability::Stale;
        }
        if age < self.lifetime {
            return Usability::Fresh;
        }
        let staleness = age - self.lifetime;
        if !self.must_revalidate && staleness < self.stale_while_revalidate {
            Usability::StaleWhileRevalidate
        } else {
            Usability::Stale
        }
    }

    /// May this entry be served because the origin failed (RFC 5861 stale-if-error)?
    pub fn serves_on_error(&self, now: SystemTime) -> bool {
        if self.must_revalidate {
            return false;
        }
        let age = self.age(now);
        age < self.lifetime || age - self.lifetime < self.stale_if_error
    }

    /// How long, from arrival, the store should keep the entry at all.
    pub fn keep_for(&self, has_validators: bool) -> Duration {
        let remaining = self.lifetime.saturating_sub(self.initial_age);
        let mut keep =
            remaining.saturating_add(self.stale_while_revalidate.max(self.stale_if_error));
        if has_validators {
            keep = keep.saturating_add(self.lifetime.max(REVALIDATION_GRACE));
        }
        keep.min(MAX_LIFETIME)
    }
}

/// Decides whether a response may be stored and with what freshness.
pub struct ResponseFacts<'a> {
    pub status: u16,
    pub headers: &'a HeaderMap,
    /// When the request went to the origin, and when the response head arrived.
    pub request_time: SystemTime,
    pub response_time: SystemTime,
}

/// What admission learned: freshness and the `Vary` names that select the variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Storable {
    pub freshness: Freshness,
    pub vary: Vec<HeaderName>,
}

pub fn storability(
    request: &RequestRules,
    response: &ResponseFacts<'_>,
    rules: &RouteRules,
    max_object_bytes: u64,
) -> Result<Storable, NotStorable> {
    if request.head {
        return Err(NotStorable::Head);
    }
    if !cacheable_status(response.status) {
        return Err(NotStorable::Status);
    }
    let headers = response.headers;
    let cc = CacheControl::parse(headers);
    if cc.no_store {
        return Err(NotStorable::NoStore);
    }
    if cc.private {
        return Err(NotStorable::Private);
    }
    if headers.contains_key(header::SET_COOKIE) && !rules.allow_set_cookie {
        return Err(NotStorable::SetCookie);
    }
    if request.authorization && !rules.allow_authorization {
        return Err(NotStorable::Authorization);
    }
    let vary = match parse_vary(headers) {
        Vary::Headers(names) => names,
        Vary::Uncacheable => return Err(NotStorable::Vary),
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_object_bytes) {
        return Err(NotStorable::TooLarge);
    }
    let date = http_date(headers, &header::DATE);
    let lifetime = if let Some(s) = cc.s_maxage {
        Some(Duration::from_secs(s))
    } else if let Some(m) = cc.max_age {
        Some(Duration::from_secs(m))
    } else if headers.contains_key(header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired (RFC 9111 §5.3).
        let expires = http_date(headers, &header::EXPIRES);
        let base = date.unwrap_or(response.response_time);
        Some(
            expires
                .and_then(|e| e.duration_since(base).ok())
                .unwrap_or_default(),
        )
    } else {
        rules.default_ttl
    };
    let has_validators =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    let lifetime = match lifetime {
        Some(l) => l,
        // no-cache responses with a validator are worth keeping: each use is a cheap 304.
        None if cc.no_cache && has_validators => Duration::ZERO,
        None => return Err(NotStorable::NoFreshness),
    };
    if lifetime.is_zero() && !has_validators {
        return Err(NotStorable::NoFreshness);
    }
    // RFC 9111 §4.2.3 age calculation.
    let apparent_age = date
        .and_then(|d| response.response_time.duration_since(d).ok())
        .unwrap_or_default();
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_delta_seconds(v.trim()))
        .map(Duration::from_secs)
        .unwrap_or_default();
    let response_delay = response
        .response_time
        .duration_since(response.request_time)
        .unwrap_or_default();
    let initial_age = apparent_age.max(age_value.saturating_add(response_delay));
    let seconds = |directive: Option<u64>, route: Option<Duration>| {
        directive
            .map(Duration::from_secs)
            .or(route)
            .unwrap_or_default()
    };
    Ok(Storable {
        freshness: Freshness {
            response_time: response.response_time,
            initial_age,
            lifetime,
            stale_while_revalidate: seconds(
                cc.stale_while_revalidate,
                rules.stale_while_revalidate,
            ),
            stale_if_error: seconds(cc.stale_if_error, rules.stale_if_error),
            must_revalidate: cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some(),
            no_cache: cc.no_cache,
        },
        vary,
    })
}

/// Headers stored with an entry: everything but hop-by-hop fields (the fixed ones and those a
/// `Connection` header names, RFC 9110 §7.6.1), `Age` (recomputed on every use) and the edge's own
/// cache status.
pub fn headers_to_store(headers: &HeaderMap) -> HeaderMap {
    let mut out = crate::headers::forwardable(headers);
    out.remove(header::AGE);
    out.remove(super::HEADER_CACHE);
    out
}

/// A `304` from the origin refreshes the stored headers (RFC 9111 §4.3.4): every header it carries
/// replaces the stored one, except those describing the body.
pub fn merge_not_modified(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut out = stored.clone();
    let fresh = headers_to_store(not_modified);
    for name in fresh.keys() {
        if name == header::CONTENT_LENGTH
            || name == header::CONTENT_ENCODING
            || name == header::CONTENT_RANGE
        {
            continue;
        }
        out.remove(name);
        for value in fresh.get_all(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Conditional headers for revalidating a stored response with the origin.
pub fn revalidation_headers(stored: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(2);
    if let Some(etag) = stored.get(header::ETAG) {
        out.push((header::IF_NONE_MATCH, etag.clone()));
    }
    if let Some(lm) = stored.get(header::LAST_MODIFIED) {
        out.push((header::IF_MODIFIED_SINCE, lm.clone()));
    }
    out
}

/// Does the client's conditional request match the stored response (answer `304`)?
/// `If-None-Match` (weak comparison) wins over `If-Modified-Since` (RFC 9110 §13.2.2).
pub fn client_not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if request.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let ours = weak_tag(etag);
        return request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|tag| tag == "*" || weak_tag(tag) == ours);
    }
    let (Some(since), Some(modified)) = (
        http_date(request, &header::IF_MODIFIED_SINCE),
        http_date(stored, &header::LAST_MODIFIED),
    ) else {
        return false;
    };
    modified <= since
}

fn weak_tag(tag: &str) -> &str {
    tag.trim().strip_prefix("W/").unwrap_or(tag.trim())
}

/// Headers a `304` to the client carries (RFC 9110 §15.4.5).
pub fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::LAST_MODIFIED,
        header::VARY,
    ] {
        for value in stored.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn enabled() -> RouteRules {
        RouteRules {
            enabled: true,
            ..RouteRules::default()
        }
    }

    fn get() -> RequestRules {
        RequestRules {
            head: false,
            no_cache: false,
            max_age: None,
            authorization: false,
        }
    }

    fn store(status: u16, h: &[(&str, &str)], rules: &RouteRules) -> Result<Storable, NotStorable> {
        let h = headers(h);
        storability(
            &get(),
            &ResponseFacts {
                status,
                headers: &h,
                request_time: t(0),
                response_time: t(0),
            },
            rules,
            1000,
        )
    }

    fn date(at: SystemTime) -> String {
        httpdate::fmt_http_date(at)
    }

    #[test]
    fn cache_control_parsing() {
        let cc = CacheControl::parse(&headers(&[
            ("cache-control", "public, max-age=60, S-MAXAGE=\"120\""),
            (
                "cache-control",
                "stale-while-revalidate=5, stale-if-error=9, must-revalidate",
            ),
        ]));
        assert_eq!(cc.max_age, Some(60));
        assert_eq!(cc.s_maxage, Some(120));
        assert!(cc.public && cc.must_revalidate);
        assert_eq!(cc.stale_while_revalidate, Some(5));
        assert_eq!(cc.stale_if_error, Some(9));
        // Malformed max-age means stale.
        assert_eq!(
            CacheControl::parse(&headers(&[("cache-control", "max-age=abc")])).max_age,
            Some(0)
        );
        // Huge values saturate instead of failing.
        assert_eq!(
            CacheControl::parse(&headers(&[(
                "cache-control",
                "max-age=99999999999999999999999"
            )]))
            .max_age,
            Some(u64::from(u32::MAX))
        );
    }

    #[test]
    fn request_classification() {
        let rules = enabled();
        assert_eq!(
            classify_request(&Method::GET, &HeaderMap::new(), &RouteRules::default()),
            Err(Bypass::Disabled)
        );
        assert_eq!(
            classify_request(&Method::POST, &HeaderMap::new(), &rules),
            Err(Bypass::Method)
        );
        assert_eq!(
            classify_request(
                &Method::GET,
                &headers(&[("cache-control", "no-store")]),
                &rules
            ),
            Err(Bypass::NoStore)
        );
        let auth = headers(&[("authorization", "Bearer x")]);
        assert_eq!(
            classify_request(&Method::GET, &auth, &rules),
            Err(Bypass::Authorization)
        );
        let allow = RouteRules {
            allow_authorization: true,
            ..enabled()
        };
        assert!(classify_request(&Method::GET, &auth, &allow).is_ok_and(|r| r.authorization));
        assert_eq!(
            classify_request(&Method::GET, &headers(&[("range", "bytes=0-1")]), &rules),
            Err(Bypass::Range)
        );
        let head = classify_request(&Method::HEAD, &HeaderMap::new(), &rules);
        assert!(head.is_ok_and(|r| r.head));
        let nc = classify_request(
            &Method::GET,
            &headers(&[("cache-control", "no-cache")]),
            &rules,
        );
        assert!(nc.is_ok_and(|r| r.no_cache));
        let pragma = classify_request(&Method::GET, &headers(&[("pragma", "no-cache")]), &rules);
        assert!(pragma.is_ok_and(|r| r.no_cache));
        let ma0 = classify_request(
            &Method::GET,
            &headers(&[("cache-control", "max-age=0")]),
            &rules,
        );
        assert!(ma0.is_ok_and(|r| r.no_cache));
    }

    #[test]
    fn s_maxage_beats_max_age_and_implies_must_revalidate() {
        let s = store(
            200,
            &[("cache-control", "max-age=10, s-maxage=100")],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(100));
        assert!(s.freshness.must_revalidate);
        let m = store(200, &[("cache-control", "max-age=10")], &enabled()).expect("storable");
        assert_eq!(m.freshness.lifetime, Duration::from_secs(10));
        assert!(!m.freshness.must_revalidate);
    }

    #[test]
    fn expires_relative_to_date() {
        let s = store(
            200,
            &[("date", &date(t(0))), ("expires", &date(t(30)))],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(30));
        // max-age overrides Expires.
        let s = store(
            200,
            &[
                ("date", &date(t(0))),
                ("expires", &date(t(30))),
                ("cache-control", "max-age=5"),
            ],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(5));
        // Invalid Expires = already expired; without validators, not stored.
        assert_eq!(
            store(200, &[("expires", "0")], &enabled()),
            Err(NotStorable::NoFreshness)
        );
        // Expires in the past with a validator: stored, stale at once.
        let s = store(
            200,
            &[
                ("date", &date(t(0))),
                ("expires", &date(t(0))),
                ("etag", "\"a\""),
            ],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::ZERO);
    }

    #[test]
    fn no_heuristic_freshness_but_route_default_ttl() {
        assert_eq!(store(200, &[], &enabled()), Err(NotStorable::NoFreshness));
        assert_eq!(
            store(200, &[("last-modified", &date(t(0)))], &enabled()),
            Err(NotStorable::NoFreshness)
        );
        let rules = RouteRules {
            default_ttl: Some(Duration::from_secs(42)),
            ..enabled()
        };
        let s = store(200, &[], &rules).expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(42));
        // Explicit freshness wins over the route default.
        let s = store(200, &[("cache-control", "max-age=3")], &rules).expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(3));
    }

    #[test]
    fn refusals() {
        let ok = [("cache-control", "max-age=60")];
        assert_eq!(store(500, &ok, &enabled()), Err(NotStorable::Status));
        assert_eq!(store(206, &ok, &enabled()), Err(NotStorable::Status));
        assert!(store(404, &ok, &enabled()).is_ok());
        assert!(store(301, &ok, &enabled()).is_ok());
        assert_eq!(
            store(
                200,
                &[("cache-control", "max-age=60, no-store")],
                &enabled()
            ),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            store(200, &[("cache-control", "private, max-age=60")], &enabled()),
            Err(NotStorable::Private)
        );
        assert_eq!(
            store(
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
                &enabled()
            ),
            Err(NotStorable::SetCookie)
        );
        let cookies = RouteRules {
            allow_set_cookie: true,
            ..enabled()
        };
        assert!(store(
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            &cookies
        )
        .is_ok());
        assert_eq!(
            store(
                200,
                &[("cache-control", "max-age=60"), ("vary", "*")],
                &enabled()
            ),
            Err(NotStorable::Vary)
        );
        assert_eq!(
            store(
                200,
                &[("cache-control", "max-age=60"), ("content-length", "1001")],
                &enabled()
            ),
            Err(NotStorable::TooLarge)
        );
        let vary = store(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(vary.vary, vec![header::ACCEPT_ENCODING]);
    }

    #[test]
    fn authorization_and_head_are_not_stored() {
        let h = headers(&[("cache-control", "max-age=60")]);
        let facts = ResponseFacts {
            status: 200,
            headers: &h,
            request_time: t(0),
            response_time: t(0),
        };
        let with_auth = RequestRules {
            authorization: true,
            ..get()
        };
        assert_eq!(
            storability(&with_auth, &facts, &enabled(), 1000),
            Err(NotStorable::Authorization)
        );
        let allow = RouteRules {
            allow_authorization: true,
            ..enabled()
        };
        assert!(storability(&with_auth, &facts, &allow, 1000).is_ok());
        let head = RequestRules {
            head: true,
            ..get()
        };
        assert_eq!(
            storability(&head, &facts, &enabled(), 1000),
            Err(NotStorable::Head)
        );
    }

    #[test]
    fn age_calculation() {
        // Response already 10s old per Age, took 2s to arrive, Date says 5s ago.
        let h = headers(&[
            ("cache-control", "max-age=60"),
            ("age", "10"),
            ("date", &date(t(95))),
        ]);
        let s = storability(
            &get(),
            &ResponseFacts {
                status: 200,
                headers: &h,
                request_time: t(98),
                response_time: t(100),
            },
            &enabled(),
            1000,
        )
        .expect("storable");
        // corrected_initial_age = max(apparent 5, 10 + 2) = 12
        assert_eq!(s.freshness.initial_age, Duration::from_secs(12));
        assert_eq!(s.freshness.age(t(130)), Duration::from_secs(42));
        assert_eq!(s.freshness.usability(t(147), &get()), Usability::Fresh);
        assert_eq!(s.freshness.usability(t(148), &get()), Usability::Stale);
        // A Date in the future (clock skew) gives no negative age.
        let h = headers(&[("cache-control", "max-age=60"), ("date", &date(t(500)))]);
        let s = storability(
            &get(),
            &ResponseFacts {
                status: 200,
                headers: &h,
                request_time: t(100),
                response_time: t(100),
            },
            &enabled(),
            1000,
        )
        .expect("storable");
        assert_eq!(s.freshness.initial_age, Duration::ZERO);
    }

    #[test]
    fn stale_windows() {
        let s = store(
            200,
            &[(
                "cache-control",
                "max-age=10, stale-while-revalidate=5, stale-if-error=20",
            )],
            &enabled(),
        )
        .expect("storable");
        let f = s.freshness;
        assert_eq!(f.usability(t(9), &get()), Usability::Fresh);
        assert_eq!(f.usability(t(10), &get()), Usability::StaleWhileRevalidate);
        assert_eq!(f.usability(t(14), &get()), Usability::StaleWhileRevalidate);
        assert_eq!(f.usability(t(15), &get()), Usability::Stale);
        assert!(f.serves_on_error(t(29)));
        assert!(!f.serves_on_error(t(30)));
        assert_eq!(f.keep_for(false), Duration::from_secs(30));
        assert_eq!(f.keep_for(true), Duration::from_secs(90));
        // must-revalidate disables both.
        let s = store(
            200,
            &[(
                "cache-control",
                "max-age=10, stale-while-revalidate=5, stale-if-error=20, must-revalidate",
            )],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(s.freshness.usability(t(11), &get()), Usability::Stale);
        assert!(!s.freshness.serves_on_error(t(11)));
        // Route config supplies windows the response does not state.
        let rules = RouteRules {
            stale_while_revalidate: Some(Duration::from_secs(7)),
            stale_if_error: Some(Duration::from_secs(8)),
            ..enabled()
        };
        let s = store(200, &[("cache-control", "max-age=1")], &rules).expect("storable");
        assert_eq!(s.freshness.stale_while_revalidate, Duration::from_secs(7));
        assert_eq!(s.freshness.stale_if_error, Duration::from_secs(8));
        let s = store(
            200,
            &[("cache-control", "max-age=1, stale-while-revalidate=2")],
            &rules,
        )
        .expect("storable");
        assert_eq!(s.freshness.stale_while_revalidate, Duration::from_secs(2));
    }

    #[test]
    fn no_cache_and_client_max_age_force_validation() {
        let s = store(
            200,
            &[("cache-control", "no-cache"), ("etag", "\"v1\"")],
            &enabled(),
        )
        .expect("storable");
        assert!(s.freshness.no_cache);
        assert_eq!(s.freshness.usability(t(0), &get()), Usability::Stale);
        assert_eq!(
            store(200, &[("cache-control", "no-cache")], &enabled()),
            Err(NotStorable::NoFreshness)
        );
        let f = store(200, &[("cache-control", "max-age=100")], &enabled())
            .expect("storable")
            .freshness;
        let strict = RequestRules {
            max_age: Some(5),
            ..get()
        };
        assert_eq!(f.usability(t(5), &strict), Usability::Fresh);
        assert_eq!(f.usability(t(6), &strict), Usability::Stale);
        let nc = RequestRules {
            no_cache: true,
            ..get()
        };
        assert_eq!(f.usability(t(0), &nc), Usability::Stale);
    }

    #[test]
    fn client_conditionals() {
        let stored = headers(&[("etag", "W/\"v1\""), ("last-modified", &date(t(0)))]);
        assert!(client_not_modified(
            &headers(&[("if-none-match", "\"v1\"")]),
            &stored
        ));
        assert!(client_not_modified(
            &headers(&[("if-none-match", "\"x\", W/\"v1\"")]),
            &stored
        ));
        assert!(client_not_modified(
            &headers(&[("if-none-match", "*")]),
            &stored
        ));
        assert!(!client_not_modified(
            &headers(&[("if-none-match", "\"v2\"")]),
            &stored
        ));
        // If-None-Match wins over If-Modified-Since.
        assert!(!client_not_modified(
            &headers(&[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", &date(t(10)))
            ]),
            &stored
        ));
        assert!(client_not_modified(
            &headers(&[("if-modified-since", &date(t(10)))]),
            &stored
        ));
        assert!(client_not_modified(
            &headers(&[("if-modified-since", &date(t(0)))]),
            &stored
        ));
        assert!(!client_not_modified(
            &headers(&[("if-modified-since", &date(t(0) - Duration::from_secs(1)))]),
            &stored
        ));
        assert!(!client_not_modified(&HeaderMap::new(), &stored));
        let nm = not_modified_headers(&headers(&[
            ("etag", "\"a\""),
            ("content-type", "text/plain"),
        ]));
        assert!(nm.contains_key("etag") && !nm.contains_key("content-type"));
    }

    #[test]
    fn origin_revalidation_and_304_merge() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", &date(t(0))),
            ("cache-control", "max-age=1"),
            ("content-length", "5"),
        ]);
        let cond = revalidation_headers(&stored);
        assert_eq!(cond.len(), 2);
        assert_eq!(cond[0].0, header::IF_NONE_MATCH);
        assert_eq!(cond[1].0, header::IF_MODIFIED_SINCE);
        let merged = merge_not_modified(
            &stored,
            &headers(&[
                ("cache-control", "max-age=60"),
                ("content-length", "0"),
                ("connection", "close"),
            ]),
        );
        assert_eq!(
            merged.get("cache-control").and_then(|v| v.to_str().ok()),
            Some("max-age=60")
        );
        assert_eq!(
            merged.get("content-length").and_then(|v| v.to_str().ok()),
            Some("5")
        );
        assert!(!merged.contains_key("connection"));
    }

    #[test]
    fn stored_headers_drop_hop_by_hop_and_age() {
        let h = headers(&[
            ("connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("age", "4"),
            ("x-meridian-cache", "miss"),
            ("content-type", "text/plain"),
        ]);
        let s = headers_to_store(&h);
        assert_eq!(s.len(), 1);
        assert!(s.contains_key("content-type"));
    }
}
