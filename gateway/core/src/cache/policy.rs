//! RFC 9111 (HTTP caching) and RFC 9213 (targeted cache control) as pure functions of headers,
//! route rules and `now`: may a request use the cache, may a response be stored, how long is it
//! fresh, how old is it, may it be served stale, which stored responses an unsafe request
//! invalidates, and the conditional-request (304) logic both towards clients and towards the origin.

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
/// Default cap on a heuristic freshness lifetime.
pub const DEFAULT_HEURISTIC_MAX: Duration = Duration::from_secs(24 * 3600);

/// Targeted cache-control fields obeyed unless the edge lists its own (RFC 9213 §2.1): as a CDN,
/// the edge is a target of `CDN-Cache-Control`.
pub const DEFAULT_TARGETED: [&str; 1] = ["cdn-cache-control"];

/// A route's cache rules, compiled once per snapshot from its `cache = { ... }`.
#[derive(Clone, Debug)]
pub struct RouteRules {
    pub enabled: bool,
    pub default_ttl: Option<Duration>,
    pub allow_authorization: bool,
    pub allow_set_cookie: bool,
    /// Requests carrying `Cookie` may use the cache.
    pub allow_cookie: bool,
    /// Heuristic freshness cap; `None`: heuristic freshness is off.
    pub heuristic: Option<Duration>,
    /// A `Range` miss fetches the whole response to store it and answers the range from it.
    pub fill_ranges: bool,
    /// Response fields removed before anything reaches a client: the targeted fields when the
    /// edge consumes them (`[edge.cache] forward_targeted = false`).
    pub hidden: Vec<HeaderName>,
    pub key: KeyOptions,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    /// Targeted cache-control fields, in order of precedence (the edge's `[edge.cache] targeted`).
    pub targeted: Vec<HeaderName>,
    /// The most byte ranges a request may list and get them (the edge's
    /// `[edge.cache] max_ranges`).
    pub max_ranges: usize,
}

impl Default for RouteRules {
    fn default() -> Self {
        // The rules of a route whose `cache` table is all defaults.
        Self::from_config(&RouteCache::default())
    }
}

/// Field names as `HeaderName`s (lowercased); names that do not parse were refused by the config.
pub fn targeted_names<S: AsRef<str>>(names: &[S]) -> Vec<HeaderName> {
    names
        .iter()
        .filter_map(|n| HeaderName::from_bytes(n.as_ref().to_ascii_lowercase().as_bytes()).ok())
        .collect()
}

impl RouteRules {
    pub fn from_config(config: &RouteCache) -> Self {
        Self {
            enabled: config.enabled,
            default_ttl: config.default_ttl.map(|d| d.as_duration()),
            allow_authorization: config.allow_authorization,
            allow_set_cookie: config.allow_set_cookie,
            allow_cookie: config.allow_cookie,
            heuristic: config.heuristic.then(|| {
                config
                    .heuristic_max
                    .map_or(DEFAULT_HEURISTIC_MAX, |d| d.as_duration())
            }),
            fill_ranges: config.fill_ranges,
            hidden: Vec::new(),
            key: KeyOptions::from_config(&config.key),
            stale_while_revalidate: config.stale_while_revalidate.map(|d| d.as_duration()),
            stale_if_error: config.stale_if_error.map(|d| d.as_duration()),
            targeted: targeted_names(&DEFAULT_TARGETED),
            max_ranges: super::range::DEFAULT_MAX_RANGES,
        }
    }
}

/// The cache directives this cache understands (others are ignored, as RFC 9111 says), from
/// `Cache-Control` or from a targeted field that replaces it.
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
    pub must_understand: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    pub only_if_cached: bool,
}

impl CacheControl {
    pub fn parse(headers: &HeaderMap) -> Self {
        Self::parse_field(headers, &header::CACHE_CONTROL).0
    }

    /// Directives of every `name` field line, and whether any directive was seen at all.
    fn parse_field(headers: &HeaderMap, name: &HeaderName) -> (Self, bool) {
        let mut cc = Self::default();
        let mut seen = false;
        for value in headers.get_all(name) {
            let Ok(text) = value.to_str() else { continue };
            for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                seen = true;
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
                    "must-understand" => cc.must_understand = true,
                    "stale-while-revalidate" => cc.stale_while_revalidate = seconds(),
                    "stale-if-error" => cc.stale_if_error = seconds(),
                    "only-if-cached" => cc.only_if_cached = true,
                    _ => {}
                }
            }
        }
        (cc, seen)
    }
}

/// The caching policy of a response: the first targeted field (RFC 9213) with a valid, non-empty
/// value replaces `Cache-Control` and `Expires` entirely; otherwise `Cache-Control`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub cc: CacheControl,
    /// The directives came from a targeted field (`Expires` is then ignored too).
    pub targeted: bool,
}

impl ResponseDirectives {
    /// `targeted`: the field names this cache is a target of, highest precedence first.
    pub fn of(headers: &HeaderMap, targeted: &[HeaderName]) -> Self {
        for name in targeted {
            if !headers.contains_key(name) || !targeted_field_is_valid(headers, name) {
                continue;
            }
            let (cc, seen) = CacheControl::parse_field(headers, name);
            if seen {
                return Self { cc, targeted: true };
            }
        }
        Self {
            cc: CacheControl::parse(headers),
            targeted: false,
        }
    }
}

/// A targeted field is a Structured Fields dictionary (RFC 9213 §2.1): keys are lowercase tokens
/// and values have no spaces inside. A field that fails this is ignored as a whole, so the response
/// falls back to `Cache-Control` rather than being cached on a misread policy.
fn targeted_field_is_valid(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.get_all(name).iter().all(|value| {
        let Ok(text) = value.to_str() else {
            return false;
        };
        text.split(',').map(str::trim).all(|member| {
            let (key, value) = member.split_once('=').unwrap_or((member, ""));
            let key_ok = key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b));
            let value_ok = !value.contains(char::is_whitespace)
                && (member.len() == key.len() || !value.is_empty());
            key_ok && value_ok
        })
    })
}

/// Delta-seconds; values too large saturate (RFC 9111 §1.2.2), garbage is `None`.
fn parse_delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse::<u64>().unwrap_or(u64::from(u32::MAX)))
}

/// An HTTP-date header in any of the three forms a recipient must accept (RFC 9110 §5.6.7):
/// IMF-fixdate, RFC 850 and asctime; day and month names in any case.
pub fn http_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    parse_http_date(headers.get(name)?.to_str().ok()?)
}

pub fn parse_http_date(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    if let Ok(at) = httpdate::parse_http_date(text) {
        return Some(at);
    }
    // Names in another case ("sun, 06 NOV 1994 08:49:37 gmt"): capitalise each word the way the
    // grammar spells it and try again. Only on this rare path is a copy made.
    let mut fixed = String::with_capacity(text.len());
    let mut word_start = true;
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            fixed.push(if word_start {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            });
            word_start = false;
        } else {
            fixed.push(c);
            word_start = true;
        }
    }
    let fixed = fixed.replace("Gmt", "GMT");
    httpdate::parse_http_date(&fixed).ok()
}

/// Why a request or response does not use the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// The route (or the edge) has caching off.
    Disabled,
    /// Only GET and HEAD are served from the cache (safe methods such as OPTIONS go around it).
    Method,
    /// Request `Cache-Control: no-store`.
    NoStore,
    /// `Cookie` on a route that does not allow caching it.
    Cookie,
    /// A range miss on a route that does not fill ranges (`fill_ranges = false`): the origin
    /// answers it.
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
    /// Never answered from the cache: the origin answers, and its response may still be stored
    /// (`Authorization` with `public`, ...) or invalidate stored ones (unsafe methods).
    pub origin_only: bool,
    /// An unsafe method (RFC 9110 §9.2.1): a non-error response invalidates (RFC 9111 §4.4).
    pub unsafe_method: bool,
    /// `POST`: its response is stored only under the conditions of RFC 9110 §9.3.3.
    pub post: bool,
    /// The request carries `Range` (GET only): answered from a complete stored response or not
    /// at all.
    pub range: bool,
}

impl RequestRules {
    /// A plain GET.
    pub const GET: RequestRules = RequestRules {
        head: false,
        no_cache: false,
        max_age: None,
        authorization: false,
        origin_only: false,
        unsafe_method: false,
        post: false,
        range: false,
    };
}

pub fn classify_request(
    method: &Method,
    headers: &HeaderMap,
    rules: &RouteRules,
) -> Result<RequestRules, Bypass> {
    if !rules.enabled {
        return Err(Bypass::Disabled);
    }
    let [authorization, cookie, cache_control, pragma, range] = crate::headers::present(
        headers,
        [
            &header::AUTHORIZATION,
            &header::COOKIE,
            &header::CACHE_CONTROL,
            &header::PRAGMA,
            &header::RANGE,
        ],
    );
    let head = match *method {
        Method::GET => false,
        Method::HEAD => true,
        Method::OPTIONS | Method::TRACE | Method::CONNECT => return Err(Bypass::Method),
        // Every other method, known or not, is unsafe: it goes to the origin, and a non-error
        // answer invalidates what the cache holds for the URL (RFC 9111 §4.4).
        _ => {
            return Ok(RequestRules {
                authorization,
                origin_only: true,
                unsafe_method: true,
                post: *method == Method::POST,
                ..RequestRules::GET
            })
        }
    };
    let cc = if cache_control {
        CacheControl::parse(headers)
    } else {
        CacheControl::default()
    };
    if cc.no_store {
        return Err(Bypass::NoStore);
    }
    if cookie && !rules.allow_cookie {
        // A response may be shaped by the caller's cookie without saying so (no `Vary: Cookie`,
        // no `private`): serving or storing it would hand one user's page to everyone.
        return Err(Bypass::Cookie);
    }
    let pragma_no_cache = !cache_control
        && pragma
        && headers
            .get(header::PRAGMA)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("no-cache"));
    Ok(RequestRules {
        head,
        no_cache: cc.no_cache || cc.max_age == Some(0) || pragma_no_cache,
        max_age: cc.max_age,
        authorization,
        // A shared cache may store a response to an authorized request when the response says
        // so (RFC 9111 §3.5), but never answers such a request from what others stored.
        origin_only: authorization && !rules.allow_authorization,
        unsafe_method: false,
        post: false,
        range: !head && range,
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
    /// The response to an unsafe method (a `POST` only when it names its own URL in
    /// `Content-Location` and states its freshness).
    Method,
}

/// Status codes defined as heuristically cacheable (RFC 9110 §15.1): stored without explicit
/// freshness (route `default_ttl`, heuristic freshness, or validators).
pub fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 451 | 501
    )
}

/// Final status codes whose caching requirements this cache implements, for `must-understand`
/// (RFC 9111 §5.2.2.3). 206 is absent: partial responses are not stored.
fn understood_status(status: u16) -> bool {
    matches!(
        status,
        200..=205 | 300..=305 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 451 | 500..=505
    )
}

/// Freshness of one stored response, in the terms of RFC 9111 §4.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    /// When the response (or the 304 that last refreshed it) arrived.
    pub response_time: SystemTime,
    /// `corrected_initial_age`: how old the response already was when it arrived.
    pub initial_age: Duration,
    /// Freshness lifetime (s-maxage > max-age > Expires - Date > heuristic > route default_ttl).
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
    let status = response.status;
    // Only final responses (interim 1xx never), and neither 206 (no range combining) nor 304.
    if !(200..=999).contains(&status) || status == 206 || status == 304 {
        return Err(NotStorable::Status);
    }
    if request.unsafe_method && !request.post {
        return Err(NotStorable::Method);
    }
    let headers = response.headers;
    let ResponseDirectives { cc, targeted } = ResponseDirectives::of(headers, &rules.targeted);
    let shared_by_origin = cc.public || cc.s_maxage.is_some() || cc.must_revalidate;
    if request.authorization && !rules.allow_authorization && !shared_by_origin {
        // RFC 9111 §3.5: only these three directives let a shared cache store such a response.
        return Err(NotStorable::Authorization);
    }
    if cc.must_understand {
        // must-understand overrides no-store, but only for status codes whose rules we implement
        // (RFC 9111 §5.2.2.3).
        if !understood_status(status) {
            return Err(NotStorable::Status);
        }
    } else if cc.no_store {
        return Err(NotStorable::NoStore);
    }
    if cc.private {
        return Err(NotStorable::Private);
    }
    if headers.contains_key(header::SET_COOKIE) && !rules.allow_set_cookie {
        return Err(NotStorable::SetCookie);
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
    let explicit = if let Some(s) = cc.s_maxage {
        Some(Duration::from_secs(s))
    } else if let Some(m) = cc.max_age {
        Some(Duration::from_secs(m))
    } else if !targeted && headers.contains_key(header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired (RFC 9111 §5.3).
        let expires = http_date(headers, &header::EXPIRES);
        let base = date.unwrap_or(response.response_time);
        Some(
            expires
                .and_then(|e| e.duration_since(base).ok())
                .unwrap_or_default(),
        )
    } else {
        None
    };
    if request.post {
        // RFC 9110 §9.3.3 / RFC 9111 §4: a POST response can answer a later GET only when it
        // states its freshness and names the request's own URL in Content-Location; whether it
        // does is the caller's check (it knows the URL).
        if explicit.is_none() {
            return Err(NotStorable::Method);
        }
    }
    let has_validators =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    let lifetime = match explicit {
        Some(l) => l,
        // Without stated freshness only heuristically cacheable codes (or `public`) may be
        // stored (RFC 9111 §3, §4.2.2).
        None if !(heuristically_cacheable(status) || cc.public) => return Err(NotStorable::Status),
        // A heuristic never stands in for a `no-cache` response's validation (RFC 9111 §4.2.2
        // is about reuse without validation, which no-cache forbids).
        None => match (!cc.no_cache)
            .then(|| heuristic_lifetime(headers, date, response.response_time, rules))
            .flatten()
            .or(rules.default_ttl)
        {
            Some(l) => l,
            // no-cache responses with a validator are worth keeping: each use is a cheap 304.
            None if cc.no_cache && has_validators => Duration::ZERO,
            None => return Err(NotStorable::NoFreshness),
        },
    };
    // An invalid Age (`old`, or several values) makes the response stale (RFC 9111 §5.1).
    let (age_value, age_valid) = age_header(headers);
    let lifetime = if age_valid { lifetime } else { Duration::ZERO };
    if lifetime.is_zero() && !has_validators {
        return Err(NotStorable::NoFreshness);
    }
    // RFC 9111 §4.2.3 age calculation.
    let apparent_age = date
        .and_then(|d| response.response_time.duration_since(d).ok())
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

/// The `Age` value (zero when absent) and whether the field is valid: absent, or exactly one
/// delta-seconds.
fn age_header(headers: &HeaderMap) -> (Duration, bool) {
    let mut values = headers.get_all(header::AGE).iter();
    let Some(first) = values.next() else {
        return (Duration::ZERO, true);
    };
    let parsed = first
        .to_str()
        .ok()
        .and_then(|v| parse_delta_seconds(v.trim()));
    match (parsed, values.next()) {
        (Some(secs), None) => (Duration::from_secs(secs), true),
        (secs, _) => (Duration::from_secs(secs.unwrap_or(0)), false),
    }
}

/// RFC 9111 §4.2.2: a tenth of the time since `Last-Modified` (as of `Date`), capped by the
/// route's `heuristic_max`; `None` when the route has it off or the response cannot support it.
/// No `Warning` is added to responses served this way: RFC 9111 obsoleted the field.
fn heuristic_lifetime(
    headers: &HeaderMap,
    date: Option<SystemTime>,
    response_time: SystemTime,
    rules: &RouteRules,
) -> Option<Duration> {
    let cap = rules.heuristic?;
    let modified = http_date(headers, &header::LAST_MODIFIED)?;
    let since = date
        .unwrap_or(response_time)
        .duration_since(modified)
        .ok()?;
    let lifetime = (since / 10).min(cap);
    (!lifetime.is_zero()).then_some(lifetime)
}

/// Does `location` (a `Location` or `Content-Location` value) name `request_url` (a normalised
/// `scheme://host/path?query`)? Used to let a `POST` response answer later GETs.
pub fn names_same_url(location: &str, request_url: &str) -> bool {
    resolve_same_origin(location, request_url).is_some_and(|u| u == request_url)
}

/// Resolves a `Location` / `Content-Location` value against the normalised request URL; `None`
/// for another origin (RFC 9111 §4.4: only same-origin URIs are invalidated) or a value that is
/// not a URI reference we can resolve.
pub fn resolve_same_origin(location: &str, request_url: &str) -> Option<String> {
    let location = location.trim();
    let (scheme, rest) = request_url.split_once("://")?;
    let origin_end = rest
        .find('/')
        .map_or(request_url.len(), |i| scheme.len() + 3 + i);
    let origin = &request_url[..origin_end];
    let absolute = if location.contains("://") {
        super::key::normalise_url(location)?
    } else if let Some(path) = location.strip_prefix("//") {
        super::key::normalise_url(&format!("{scheme}://{path}"))?
    } else if location.starts_with('/') {
        super::key::normalise_url(&format!("{origin}{location}"))?
    } else if location.is_empty() || location.contains(char::is_whitespace) {
        return None;
    } else {
        // Relative path: against the request path's directory.
        let path = &request_url[origin_end..];
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
        super::key::normalise_url(&format!("{origin}{dir}/{location}"))?
    };
    let same = absolute
        .strip_prefix(origin)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    same.then_some(absolute)
}

/// The URLs a non-error response to an unsafe request invalidates (RFC 9111 §4.4): the target
/// URI, and `Location` / `Content-Location` when they are on the same origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    TargetUri,
    Location,
    ContentLocation,
}

impl Invalidation {
    pub const ALL: [Invalidation; 3] = [
        Invalidation::TargetUri,
        Invalidation::Location,
        Invalidation::ContentLocation,
    ];

    /// The `reason` label of `meridian_cache_invalidations_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Invalidation::TargetUri => "unsafe_method",
            Invalidation::Location => "location",
            Invalidation::ContentLocation => "content_location",
        }
    }
}

/// What to invalidate after the response `status`/`headers` to an unsafe request for
/// `request_url`; empty for an error response (RFC 9111 §4.4 asks for a non-error status).
pub fn invalidations(
    status: u16,
    headers: &HeaderMap,
    request_url: &str,
) -> Vec<(Invalidation, String)> {
    if !(200..400).contains(&status) {
        return Vec::new();
    }
    let mut out = vec![(Invalidation::TargetUri, request_url.to_string())];
    for (reason, name) in [
        (Invalidation::Location, header::LOCATION),
        (Invalidation::ContentLocation, header::CONTENT_LOCATION),
    ] {
        let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(url) = resolve_same_origin(value, request_url) {
            if !out.iter().any(|(_, u)| *u == url) {
                out.push((reason, url));
            }
        }
    }
    out
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
/// replaces the stored one, except those describing the body — and `Set-Cookie`, which belongs to
/// the one client whose request caused the revalidation, unless the route stores cookies.
pub fn merge_not_modified(
    stored: &HeaderMap,
    not_modified: &HeaderMap,
    rules: &RouteRules,
) -> HeaderMap {
    let mut out = stored.clone();
    let fresh = headers_to_store(not_modified);
    for name in fresh.keys() {
        if name == header::CONTENT_LENGTH
            || name == header::CONTENT_ENCODING
            || name == header::CONTENT_RANGE
            || (name == header::SET_COOKIE && !rules.allow_set_cookie)
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
    let [if_none_match, if_modified_since] = crate::headers::present(
        request,
        [&header::IF_NONE_MATCH, &header::IF_MODIFIED_SINCE],
    );
    if if_none_match {
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
    // Without Last-Modified the stored Date stands in: the response was current then
    // (RFC 9110 §13.1.3, RFC 9111 §4.3.2).
    // The stored dates are parsed only when the client asked: most requests are unconditional.
    if !if_modified_since {
        return false;
    }
    let Some(since) = http_date(request, &header::IF_MODIFIED_SINCE) else {
        return false;
    };
    http_date(stored, &header::LAST_MODIFIED)
        .or_else(|| http_date(stored, &header::DATE))
        .is_some_and(|modified| modified <= since)
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
        RequestRules::GET
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
            classify_request(&Method::OPTIONS, &HeaderMap::new(), &rules),
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
        assert!(classify_request(&Method::GET, &auth, &rules)
            .is_ok_and(|r| r.authorization && r.origin_only));
        let allow = RouteRules {
            allow_authorization: true,
            ..enabled()
        };
        assert!(classify_request(&Method::GET, &auth, &allow)
            .is_ok_and(|r| r.authorization && !r.origin_only));
        assert!(
            classify_request(&Method::GET, &headers(&[("range", "bytes=0-1")]), &rules)
                .is_ok_and(|r| r.range)
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
    fn route_default_ttl_when_nothing_else_applies() {
        assert_eq!(store(200, &[], &enabled()), Err(NotStorable::NoFreshness));
        let rules = RouteRules {
            default_ttl: Some(Duration::from_secs(42)),
            ..enabled()
        };
        let s = store(200, &[], &rules).expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(42));
        // Explicit freshness wins over the route default.
        let s = store(200, &[("cache-control", "max-age=3")], &rules).expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(3));
        // So does a heuristic lifetime.
        let h = [("date", &*date(t(1000))), ("last-modified", &*date(t(0)))];
        let s = store(200, &h, &rules).expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(100));
    }

    #[test]
    fn refusals() {
        let ok = [("cache-control", "max-age=60")];
        // 500 with explicit freshness is reusable; without it, it is not heuristically cacheable.
        assert!(store(500, &ok, &enabled()).is_ok());
        let ttl = RouteRules {
            default_ttl: Some(Duration::from_secs(5)),
            ..enabled()
        };
        assert_eq!(store(500, &[], &ttl), Err(NotStorable::Status));
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
            &enabled(),
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

    fn facts_for<'a>(status: u16, h: &'a HeaderMap) -> ResponseFacts<'a> {
        ResponseFacts {
            status,
            headers: h,
            request_time: t(0),
            response_time: t(0),
        }
    }

    /// RFC 9111 §4.3.4 and shared-cache safety: a 304's `Set-Cookie` belongs to one client and is
    /// never merged into the stored response (unless the route stores cookies).
    #[test]
    fn rfc9111_4_3_4_merge_never_stores_set_cookie() {
        let stored = headers(&[("etag", "\"v1\""), ("cache-control", "max-age=1")]);
        let nm = headers(&[
            ("cache-control", "max-age=60"),
            ("set-cookie", "sid=attacker"),
        ]);
        let merged = merge_not_modified(&stored, &nm, &enabled());
        assert!(!merged.contains_key("set-cookie"));
        assert_eq!(
            merged.get("cache-control").and_then(|v| v.to_str().ok()),
            Some("max-age=60")
        );
        let cookies = RouteRules {
            allow_set_cookie: true,
            ..enabled()
        };
        assert!(merge_not_modified(&stored, &nm, &cookies).contains_key("set-cookie"));
    }

    /// Requests with `Cookie` go around the cache unless the route allows them.
    #[test]
    fn cookie_requests_bypass_unless_allowed() {
        let h = headers(&[("cookie", "sid=1")]);
        assert_eq!(
            classify_request(&Method::GET, &h, &enabled()),
            Err(Bypass::Cookie)
        );
        let allow = RouteRules {
            allow_cookie: true,
            ..enabled()
        };
        assert!(classify_request(&Method::GET, &h, &allow).is_ok());
    }

    /// RFC 9111 §4.4: unsafe methods (known or not) reach the origin and invalidate.
    #[test]
    fn rfc9111_4_4_unsafe_methods_are_origin_only() {
        for m in ["POST", "PUT", "DELETE", "PATCH", "PURGEX"] {
            let method = Method::from_bytes(m.as_bytes()).expect("method");
            let r = classify_request(&method, &HeaderMap::new(), &enabled()).expect(m);
            assert!(r.unsafe_method && r.origin_only, "{m}");
            assert_eq!(r.post, m == "POST");
        }
        for m in [Method::OPTIONS, Method::TRACE] {
            assert_eq!(
                classify_request(&m, &HeaderMap::new(), &enabled()),
                Err(Bypass::Method)
            );
        }
    }

    /// RFC 9111 §4.4: the target URI and same-origin Location / Content-Location, after a
    /// non-error response only.
    #[test]
    fn rfc9111_4_4_invalidation_targets() {
        let url = "http://a.test/dir/item?x=1";
        let h = headers(&[
            ("location", "/dir/new"),
            ("content-location", "http://other.test/dir/item"),
        ]);
        let got = invalidations(201, &h, url);
        assert_eq!(
            got,
            vec![
                (Invalidation::TargetUri, url.to_string()),
                (Invalidation::Location, "http://a.test/dir/new".to_string()),
            ]
        );
        let h = headers(&[("content-location", "sibling"), ("location", url)]);
        assert_eq!(
            invalidations(303, &h, url),
            vec![
                (Invalidation::TargetUri, url.to_string()),
                (
                    Invalidation::ContentLocation,
                    "http://a.test/dir/sibling".to_string()
                ),
            ]
        );
        assert!(invalidations(404, &h, url).is_empty());
        assert!(invalidations(500, &h, url).is_empty());
        assert_eq!(
            resolve_same_origin("HTTP://A.TEST:80/p", "http://a.test/q").as_deref(),
            Some("http://a.test/p")
        );
        assert_eq!(resolve_same_origin("//b.test/p", "http://a.test/q"), None);
        assert_eq!(
            resolve_same_origin("https://a.test/p", "http://a.test/q"),
            None
        );
    }

    /// RFC 9110 §9.3.3: a POST response is reusable only with explicit freshness and a
    /// Content-Location naming its own URL (the URL check is `names_same_url`).
    #[test]
    fn rfc9110_9_3_3_post_with_content_location() {
        let post = classify_request(&Method::POST, &HeaderMap::new(), &enabled()).expect("post");
        let fresh = headers(&[("cache-control", "max-age=60"), ("content-location", "/p")]);
        assert!(storability(&post, &facts_for(200, &fresh), &enabled(), 1000).is_ok());
        let implicit = headers(&[("last-modified", &date(t(0))), ("content-location", "/p")]);
        assert_eq!(
            storability(&post, &facts_for(200, &implicit), &enabled(), 1000),
            Err(NotStorable::Method)
        );
        let put = classify_request(&Method::PUT, &HeaderMap::new(), &enabled()).expect("put");
        assert_eq!(
            storability(&put, &facts_for(200, &fresh), &enabled(), 1000),
            Err(NotStorable::Method)
        );
        assert!(names_same_url("/p", "http://a.test/p"));
        assert!(names_same_url("http://A.test/p", "http://a.test/p"));
        assert!(!names_same_url("/q", "http://a.test/p"));
    }

    /// RFC 9111 §5.1: an invalid Age (not one delta-seconds) makes the response stale.
    #[test]
    fn rfc9111_5_1_invalid_age_is_stale() {
        let s = store(
            200,
            &[("cache-control", "max-age=60"), ("age", "old, 0")],
            &enabled(),
        );
        assert_eq!(s, Err(NotStorable::NoFreshness));
        let s = store(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("age", "5"),
                ("age", "6"),
                ("etag", "\"a\""),
            ],
            &enabled(),
        )
        .expect("storable with a validator");
        assert_eq!(s.freshness.usability(t(0), &get()), Usability::Stale);
        let s = store(
            200,
            &[("cache-control", "max-age=60"), ("age", "7")],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(s.freshness.initial_age, Duration::from_secs(7));
    }

    /// RFC 9110 §5.6.7: IMF-fixdate, RFC 850 and asctime, names in any case.
    #[test]
    fn rfc9110_5_6_7_all_three_date_forms() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        for text in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "sun, 06 nov 1994 08:49:37 gmt",
            "SUNDAY, 06-NOV-94 08:49:37 GMT",
            "SUN NOV  6 08:49:37 1994",
        ] {
            assert_eq!(parse_http_date(text), Some(at), "{text}");
        }
        assert_eq!(parse_http_date("0"), None);
        // Expires in RFC 850 form sets the lifetime.
        let s = store(
            200,
            &[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "sunday, 06-nov-94 08:50:37 GMT"),
            ],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(60));
    }

    /// RFC 9213 §2.1: CDN-Cache-Control replaces Cache-Control and Expires for this cache.
    #[test]
    fn rfc9213_cdn_cache_control_takes_precedence() {
        let s = store(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=120"),
            ],
            &enabled(),
        )
        .expect("targeted field wins");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(120));
        assert_eq!(
            store(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "no-store")
                ],
                &enabled()
            ),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            store(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "private")
                ],
                &enabled()
            ),
            Err(NotStorable::Private)
        );
        let nc = store(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-cache"),
                ("etag", "\"a\""),
            ],
            &enabled(),
        )
        .expect("storable");
        assert!(nc.freshness.no_cache);
        // Expires is ignored when the targeted field applies.
        let s = store(
            200,
            &[
                ("date", &date(t(0))),
                ("expires", &date(t(500))),
                ("cdn-cache-control", "max-age=5"),
            ],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(5));
        // The edge's own list, in order: the first valid field wins; [] turns targeting off.
        let own = RouteRules {
            targeted: targeted_names(&["Meridian-Cache-Control", "CDN-Cache-Control"]),
            ..enabled()
        };
        let both = [
            ("cache-control", "max-age=1"),
            ("cdn-cache-control", "max-age=2"),
            ("meridian-cache-control", "max-age=3"),
        ];
        let lifetime = |rules: &RouteRules| store(200, &both, rules).map(|s| s.freshness.lifetime);
        assert_eq!(lifetime(&own), Ok(Duration::from_secs(3)));
        assert_eq!(lifetime(&enabled()), Ok(Duration::from_secs(2)));
        let none = RouteRules {
            targeted: Vec::new(),
            ..enabled()
        };
        assert_eq!(lifetime(&none), Ok(Duration::from_secs(1)));
        // An invalid targeted field (not a dictionary) falls back to Cache-Control.
        let s = store(
            200,
            &[
                ("cache-control", "max-age=7"),
                ("cdn-cache-control", "Max-Age=100"),
            ],
            &enabled(),
        )
        .expect("storable");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(7));
    }

    /// RFC 9111 §5.2.2.3: must-understand overrides no-store for understood codes only.
    #[test]
    fn rfc9111_5_2_2_3_must_understand() {
        let cc = [("cache-control", "max-age=60, must-understand, no-store")];
        assert!(store(200, &cc, &enabled()).is_ok());
        assert_eq!(store(299, &cc, &enabled()), Err(NotStorable::Status));
        assert_eq!(
            store(
                299,
                &[("cache-control", "max-age=60, no-store")],
                &enabled()
            ),
            Err(NotStorable::NoStore)
        );
    }

    /// RFC 9111 §3.5: a response to an authorized request is stored only with public, s-maxage
    /// or must-revalidate.
    #[test]
    fn rfc9111_3_5_authorization_with_public_s_maxage_must_revalidate() {
        let auth = classify_request(
            &Method::GET,
            &headers(&[("authorization", "Bearer x")]),
            &enabled(),
        )
        .expect("origin only");
        for (cc, ok) in [
            ("max-age=60", false),
            ("public, max-age=60", true),
            ("s-maxage=60", true),
            ("max-age=60, must-revalidate", true),
        ] {
            let h = headers(&[("cache-control", cc)]);
            let got = storability(&auth, &facts_for(200, &h), &enabled(), 1000);
            assert_eq!(got.is_ok(), ok, "{cc}");
        }
    }

    /// RFC 9111 §3 / RFC 9110 §15.1: every final status with explicit freshness is reusable;
    /// heuristically cacheable ones without it; others not.
    #[test]
    fn rfc9111_3_status_codes() {
        let ttl = RouteRules {
            default_ttl: Some(Duration::from_secs(9)),
            ..enabled()
        };
        for code in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 451, 501] {
            assert!(store(code, &[], &ttl).is_ok(), "{code} heuristically");
        }
        for code in [
            201, 202, 302, 303, 307, 400, 403, 500, 502, 503, 504, 299, 599,
        ] {
            assert_eq!(store(code, &[], &ttl), Err(NotStorable::Status), "{code}");
            assert!(
                store(code, &[("cache-control", "max-age=9")], &enabled()).is_ok(),
                "{code} explicit"
            );
        }
        assert!(store(
            302,
            &[("expires", &date(t(30))), ("date", &date(t(0)))],
            &enabled()
        )
        .is_ok());
        // `public` makes any final status storable heuristically.
        assert!(store(302, &[("cache-control", "public")], &ttl).is_ok());
        for code in [100, 103, 101, 206, 304] {
            assert_eq!(
                store(code, &[("cache-control", "max-age=9")], &enabled()),
                Err(NotStorable::Status),
                "{code}: interim, partial and 304 are never stored"
            );
        }
    }

    /// RFC 9111 §4.2.2: heuristic freshness, on by default, is 10 % of Date − Last-Modified,
    /// capped by `heuristic_max`; only for heuristically cacheable codes (or `public`), never with
    /// explicit freshness or `no-cache`; `heuristic = false` turns it off.
    #[test]
    fn rfc9111_4_2_2_heuristic_freshness() {
        let h = [("date", &*date(t(1000))), ("last-modified", &*date(t(0)))];
        let s = store(200, &h, &enabled()).expect("heuristic by default");
        assert_eq!(s.freshness.lifetime, Duration::from_secs(100));
        let from_config = RouteRules::from_config(&RouteCache {
            enabled: true,
            ..RouteCache::default()
        });
        assert_eq!(from_config.heuristic, Some(DEFAULT_HEURISTIC_MAX));
        let off = RouteRules::from_config(&RouteCache {
            enabled: true,
            heuristic: false,
            ..RouteCache::default()
        });
        assert_eq!(off.heuristic, None);
        assert_eq!(store(200, &h, &off), Err(NotStorable::NoFreshness));
        let capped = RouteRules {
            heuristic: Some(Duration::from_secs(30)),
            ..enabled()
        };
        assert_eq!(
            store(200, &h, &capped).expect("capped").freshness.lifetime,
            Duration::from_secs(30)
        );
        // The default cap is one day: Last-Modified a year ago gives 24 h, not 36 days.
        let old = [
            ("date", &*date(t(365 * 86_400))),
            ("last-modified", &*date(t(0))),
        ];
        assert_eq!(
            store(200, &old, &enabled())
                .expect("capped")
                .freshness
                .lifetime,
            DEFAULT_HEURISTIC_MAX
        );
        // Every heuristically cacheable code; others only with `public`.
        for code in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 451, 501] {
            assert!(store(code, &h, &enabled()).is_ok(), "{code}");
        }
        assert_eq!(store(302, &h, &enabled()), Err(NotStorable::Status));
        let mut public = h.to_vec();
        public.push(("cache-control", "public"));
        assert!(store(302, &public, &enabled()).is_ok());
        // Explicit freshness (max-age or Expires) wins.
        let mut explicit = h.to_vec();
        explicit.push(("cache-control", "max-age=3"));
        assert_eq!(
            store(200, &explicit, &enabled())
                .expect("explicit")
                .freshness
                .lifetime,
            Duration::from_secs(3)
        );
        let mut expires = h.to_vec();
        let at = date(t(1005));
        expires.push(("expires", &at));
        assert_eq!(
            store(200, &expires, &enabled())
                .expect("expires")
                .freshness
                .lifetime,
            Duration::from_secs(5)
        );
        // no-cache: stored for validation, never fresh by heuristic.
        let mut no_cache = h.to_vec();
        no_cache.push(("cache-control", "no-cache"));
        let s = store(200, &no_cache, &enabled()).expect("validator kept");
        assert_eq!(s.freshness.lifetime, Duration::ZERO);
        assert_eq!(s.freshness.usability(t(0), &get()), Usability::Stale);
        // Last-Modified after Date (clock skew) or no Last-Modified: no heuristic.
        let future = [("date", &*date(t(0))), ("last-modified", &*date(t(10)))];
        assert_eq!(
            store(200, &future, &enabled()),
            Err(NotStorable::NoFreshness)
        );
        assert_eq!(
            store(200, &[("date", &*date(t(0)))], &enabled()),
            Err(NotStorable::NoFreshness)
        );
        // Served without a Warning: the stored headers are the origin's.
        let stored = headers_to_store(&headers(&h));
        assert!(!stored.contains_key("warning"));
    }

    /// RFC 9110 §13.1.3 / RFC 9111 §4.3.2: If-Modified-Since against an entry without
    /// Last-Modified compares with its Date.
    #[test]
    fn rfc9111_4_3_2_if_modified_since_uses_date() {
        let stored = headers(&[("date", &date(t(100)))]);
        assert!(client_not_modified(
            &headers(&[("if-modified-since", &date(t(100)))]),
            &stored
        ));
        assert!(!client_not_modified(
            &headers(&[("if-modified-since", &date(t(99)))]),
            &stored
        ));
    }
}
