//! The edge response cache, shared by every front (Pingora h1/h2 today, h3 later). Fronts do not
//! touch moka or RFC 9111 directly; they call [`ResponseCache::lookup`], then either serve what it
//! returns or fetch and feed the response through [`ResponseCache::admit`] and a [`CacheWriter`].
//! See `README.md` beside this file for where the request pipeline calls it.

pub mod coalesce;
pub use meridian_core::cache::{key, policy, range};
pub mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use meridian_config::{EdgeCache, RouteCache};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use coalesce::{Coalescer, Join, LeaderGuard};
pub use key::{CacheKey, CacheRequest, PrimaryKey};
pub use policy::{Bypass, NotStorable, RouteRules};
use policy::{Invalidation, RequestRules, Usability};
use range::{BodyCut, Multipart, Ranges};
pub use store::{CachedResponse, PreparedHead};
use store::{Store, StoreGauges};

/// Response header naming what the cache did.
pub use meridian_core::cache::{HEADER_CACHE, HEADER_CACHE_NAME};

/// The values of `x-meridian-cache` (and of the `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from a fresh entry (also: a coalesced follower served from its leader's fetch).
    Hit,
    /// Fetched from the origin (stored or not).
    Miss,
    /// Served from a stale entry (stale-while-revalidate or stale-if-error).
    Stale,
    /// The cache was not consulted (route off, method, no-store, Authorization, Range, ...).
    Bypass,
    /// A stale entry existed; the origin sent a full new response.
    Expired,
    /// A stale entry existed; the origin answered `304` and the entry was refreshed and served.
    Revalidated,
}

impl CacheStatus {
    pub const ALL: [CacheStatus; 6] = [
        CacheStatus::Hit,
        CacheStatus::Miss,
        CacheStatus::Stale,
        CacheStatus::Bypass,
        CacheStatus::Expired,
        CacheStatus::Revalidated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
            CacheStatus::Expired => "expired",
            CacheStatus::Revalidated => "revalidated",
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Cache metrics, registered into the edge's registry.
#[derive(Clone)]
pub struct CacheMetrics {
    lookups: IntCounterVec,
    gauges: StoreGauges,
    pub coalesced: IntCounter,
    purges: IntCounterVec,
    /// By reason: the order of [`Invalidation::ALL`].
    invalidations: [IntCounter; 3],
}

impl CacheMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "meridian_cache_lookups_total",
                "Requests on cache-enabled routes by route and x-meridian-cache result.",
            ),
            &["route", "result"],
        )?;
        let bytes = IntGauge::new(
            "meridian_cache_bytes",
            "Bytes held by the response cache (bodies, headers, keys).",
        )?;
        let entries = IntGauge::new("meridian_cache_entries", "Responses held by the cache.")?;
        let evictions = IntCounter::new(
            "meridian_cache_evictions_total",
            "Entries evicted or refused for lack of room (edge.cache.max_bytes).",
        )?;
        let coalesced = IntCounter::new(
            "meridian_cache_coalesced_total",
            "Requests served from another request's in-flight fetch instead of their own.",
        )?;
        let purges = IntCounterVec::new(
            Opts::new(
                "meridian_cache_purges_total",
                "Purge requests by kind (url, prefix, tag).",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(entries.clone()))?;
        registry.register(Box::new(evictions.clone()))?;
        registry.register(Box::new(coalesced.clone()))?;
        registry.register(Box::new(purges.clone()))?;
        for kind in ["url", "prefix", "tag"] {
            purges.with_label_values(&[kind]);
        }
        let invalidations = IntCounterVec::new(
            Opts::new(
                "meridian_cache_invalidations_total",
                "URLs invalidated by a non-error response to an unsafe request (RFC 9111 4.4), \
                 by reason (unsafe_method: the request's URL; location, content_location).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(invalidations.clone()))?;
        Ok(Self {
            lookups,
            gauges: StoreGauges {
                bytes,
                entries,
                evictions,
            },
            coalesced,
            purges,
            invalidations: Invalidation::ALL
                .map(|r| invalidations.with_label_values(&[r.as_str()])),
        })
    }
}

/// A route's cache rules plus its pre-resolved counters; build once per snapshot compile with
/// [`ResponseCache::route_policy`].
pub struct RoutePolicy {
    rules: Arc<RouteRules>,
    counters: Arc<[IntCounter; 6]>,
}

impl RoutePolicy {
    pub fn rules(&self) -> &RouteRules {
        &self.rules
    }

    /// Counts one request. The facade counts every path it decides; fronts only call this for a
    /// [`Lookup::Bypass`] they act on.
    pub fn count(&self, status: CacheStatus) {
        self.counters[status.index()].inc();
    }
}

/// Counts the final `x-meridian-cache` result of a ticketed request once, when it is dropped.
struct Tally {
    counters: Arc<[IntCounter; 6]>,
    status: CacheStatus,
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.counters[self.status.index()].inc();
    }
}

/// A response ready to serve from the cache.
#[derive(Clone, Debug)]
pub struct Served {
    pub entry: Arc<CachedResponse>,
    pub age: Duration,
    /// The client's conditional request matched: answer `304` without a body.
    pub not_modified: bool,
    /// HEAD: headers only.
    pub head: bool,
    pub status: CacheStatus,
    /// A byte range of the stored body instead of all of it.
    pub partial: Option<Partial>,
    /// Headers for this client only, never stored (the `Set-Cookie` of the 304 that answered its
    /// revalidation).
    pub client_only: Option<HeaderMap>,
    /// The route's rules: which stored fields never reach clients (`RouteRules::hidden`).
    rules: Arc<RouteRules>,
}

/// A `Range` answered from a stored response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Partial {
    /// `206`: bytes `start..=end`, as slices of the stored chunks (no copy).
    Bytes {
        start: u64,
        end: u64,
        chunks: Vec<Bytes>,
    },
    /// `206` `multipart/byteranges` (several ranges); boxed, as the rare case, to keep every
    /// [`Served`] small.
    Parts(Box<Parts>),
    /// `416`.
    Unsatisfiable,
}

/// A multipart answer from a stored response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parts {
    /// `multipart/byteranges; boundary=...`.
    pub content_type: HeaderValue,
    pub length: u64,
    /// The part headers and slices of the stored chunks, in the order to send.
    pub chunks: Vec<Bytes>,
}

/// A boundary for a multipart answer that no stored body can be made to contain in advance: it
/// is drawn afresh for every answer from the process's random hashing keys.
fn multipart_boundary() -> String {
    use std::hash::BuildHasher;
    let draw = std::collections::hash_map::RandomState::new().hash_one(0u8);
    format!("meridian-{draw:016x}")
}

impl Partial {
    fn of(entry: &CachedResponse, start: u64, end: u64) -> Self {
        let mut chunks = Vec::new();
        let mut offset = 0u64;
        for chunk in &entry.body {
            if let Some(within) = range::slice_of(offset, chunk.len(), start, end) {
                chunks.push(chunk.slice(within));
            }
            offset += chunk.len() as u64;
        }
        Partial::Bytes { start, end, chunks }
    }

    fn parts(entry: &CachedResponse, ranges: &[(u64, u64)]) -> Self {
        let multipart = Multipart::new(
            ranges,
            entry.body_len,
            entry.headers.get(http::header::CONTENT_TYPE),
            &multipart_boundary(),
        );
        Partial::Parts(Box::new(Parts {
            content_type: multipart.content_type(),
            length: multipart.content_length(),
            chunks: multipart.body(&entry.body),
        }))
    }
}

/// Headers a hit adds to a copy of the stored ones (`Age`, `x-meridian-cache`, `Content-Length`,
/// the edge's own, a range's): the stored map is given room for them once, when stored, because
/// a copy keeps its table's size and would otherwise be rehashed on every hit as they go in.
const SERVED_HEADROOM: usize = 8;

fn with_headroom(mut headers: HeaderMap) -> HeaderMap {
    headers.reserve(SERVED_HEADROOM);
    headers
}

impl Served {
    fn new(
        entry: Arc<CachedResponse>,
        now: SystemTime,
        request_headers: &HeaderMap,
        request: &RequestRules,
        rules: &Arc<RouteRules>,
        status: CacheStatus,
    ) -> Self {
        let mut served = Served {
            age: entry.freshness.age(now),
            not_modified: policy::client_not_modified(request_headers, &entry.headers),
            head: request.head,
            status,
            partial: None,
            client_only: None,
            rules: Arc::clone(rules),
            entry,
        };
        if request.range {
            served.cut(request_headers);
        }
        served
    }

    /// Answers the request's `Range` from the stored body (RFC 9110 §14): `206` with the bytes
    /// (one range, or a multipart body for several), `416`, or the whole response when the range
    /// is unusable, lists more than `max_ranges` ranges, or the stored status is not `200`. A
    /// matching conditional (`304`) goes first (RFC 9110 §13.2.2).
    fn cut(&mut self, request_headers: &HeaderMap) {
        if self.not_modified || self.head || self.entry.status != 200 {
            return;
        }
        let entry = &self.entry;
        self.partial = match range::ranges(
            request_headers,
            &entry.headers,
            entry.body_len,
            self.rules.max_ranges,
        ) {
            Ranges::Single { start, end } => Some(Partial::of(entry, start, end)),
            Ranges::Multiple(ranges) => Some(Partial::parts(entry, &ranges)),
            Ranges::Unsatisfiable => Some(Partial::Unsatisfiable),
            Ranges::Full => None,
        };
    }

    pub fn status_code(&self) -> u16 {
        match (&self.partial, self.not_modified) {
            (_, true) => 304,
            (Some(Partial::Bytes { .. } | Partial::Parts(_)), false) => 206,
            (Some(Partial::Unsatisfiable), false) => 416,
            (None, false) => self.entry.status,
        }
    }

    /// Headers to send: the stored ones (or the 304 subset), `Content-Range` for a range, `Age`,
    /// and `x-meridian-cache`. The stored `Date` is kept: with `Age` it tells the client how old
    /// the response is (RFC 9111 §5.1).
    pub fn headers(&self) -> HeaderMap {
        let mut headers = if self.not_modified {
            policy::not_modified_headers(&self.entry.headers)
        } else {
            match &self.partial {
                None => self.entry.headers.clone(),
                Some(Partial::Bytes { start, end, .. }) => {
                    let mut h = self.entry.headers.clone();
                    let range = format!("bytes {start}-{end}/{}", self.entry.body_len);
                    if let Ok(v) = HeaderValue::from_str(&range) {
                        h.insert(http::header::CONTENT_RANGE, v);
                    }
                    h
                }
                Some(Partial::Parts(parts)) => {
                    // Each part carries the representation's Content-Type (RFC 9110 §14.6).
                    let mut h = self.entry.headers.clone();
                    h.insert(http::header::CONTENT_TYPE, parts.content_type.clone());
                    h
                }
                Some(Partial::Unsatisfiable) => {
                    let mut h = HeaderMap::new();
                    let range = format!("bytes */{}", self.entry.body_len);
                    if let Ok(v) = HeaderValue::from_str(&range) {
                        h.insert(http::header::CONTENT_RANGE, v);
                    }
                    for name in [http::header::DATE, http::header::ETAG] {
                        if let Some(v) = self.entry.headers.get(&name) {
                            h.insert(name, v.clone());
                        }
                    }
                    h
                }
            }
        };
        for name in &self.rules.hidden {
            headers.remove(name);
        }
        if let Some(extra) = &self.client_only {
            for (name, value) in extra {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(http::header::AGE, HeaderValue::from(self.age.as_secs()));
        headers.insert(HEADER_CACHE_NAME, self.status.header_value());
        headers
    }

    /// The answer is the stored response as it is: no `304`, no range and no field for this
    /// client only, so its head is the stored fields but the route's hidden ones, plus the
    /// per-hit ones (`Age`, `x-meridian-cache`, `Content-Length`).
    pub fn is_whole_stored_response(&self) -> bool {
        !self.not_modified && self.partial.is_none() && self.client_only.is_none()
    }

    /// Stored fields the route never lets reach clients.
    pub fn hidden(&self) -> &[HeaderName] {
        &self.rules.hidden
    }

    /// The `Content-Length` to send; `None` for a 304.
    pub fn content_length(&self) -> Option<u64> {
        if self.not_modified {
            return None;
        }
        Some(match &self.partial {
            None => self.entry.body_len,
            Some(Partial::Bytes { start, end, .. }) => end - start + 1,
            Some(Partial::Parts(parts)) => parts.length,
            Some(Partial::Unsatisfiable) => 0,
        })
    }

    /// Body chunks to send (refcounted clones; empty for HEAD and 304).
    pub fn body(&self) -> &[Bytes] {
        if self.not_modified || self.head {
            return &[];
        }
        match &self.partial {
            None => &self.entry.body,
            Some(Partial::Bytes { chunks, .. }) => chunks,
            Some(Partial::Parts(parts)) => &parts.chunks,
            Some(Partial::Unsatisfiable) => &[],
        }
    }
}

/// What a front must do with a request.
pub enum Lookup {
    /// Serve `Served` and stop.
    Hit(Served),
    /// Serve `served` now. If `refresh` is `Some`, this request won the (single) background
    /// refresh: fetch from the origin off the client's path and feed it to `admit`.
    Stale {
        served: Served,
        refresh: Option<Ticket>,
    },
    /// Fetch from the origin (adding [`Ticket::conditional_headers`] when revalidating), then
    /// [`ResponseCache::admit`] the response head.
    Fetch(Ticket),
    /// Do not use the cache; proxy as usual with `x-meridian-cache: bypass` (already counted).
    Bypass(Bypass),
}

/// A request that goes to the origin on the cache's behalf.
pub struct Ticket {
    primary: PrimaryKey,
    request: RequestRules,
    rules: Arc<RouteRules>,
    /// Request headers, for the `Vary` variant the response will select.
    request_headers: HeaderMap,
    /// The stale entry being revalidated, if any.
    stale: Option<Arc<CachedResponse>>,
    leader: Option<LeaderGuard>,
    requested_at: SystemTime,
    tally: Tally,
}

impl Ticket {
    /// `miss` or `expired` until the response says otherwise.
    pub fn status(&self) -> CacheStatus {
        self.tally.status
    }

    /// Conditional headers for the upstream request (stored `ETag` / `Last-Modified`).
    pub fn conditional_headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        self.stale
            .as_ref()
            .map(|e| policy::revalidation_headers(&e.headers))
            .unwrap_or_default()
    }

    /// Whether the front should drop the client's own `If-None-Match`/`If-Modified-Since` from the
    /// upstream request: a leader fetches the full response for everyone waiting on it.
    pub fn fetches_for_others(&self) -> bool {
        self.leader.is_some()
    }

    /// A `Range` request that fills the cache: the front asks the origin for the whole response
    /// (no `Range`, no `If-Range`), and answers the client's range from it as it streams
    /// ([`Ticket::range_fill`]).
    pub fn fetches_whole(&self) -> bool {
        self.request.range && !self.request.origin_only
    }

    /// How the client of a range miss that [`fetches_whole`](Self::fetches_whole) is answered
    /// from the origin's response (`status`, `headers`) as its body streams past: `None` for the
    /// whole response (no usable range, a status or length that cannot be cut, or several
    /// ranges not in ascending order, whose parts could only be sent once the whole body is
    /// in — RFC 9110 §14.2 lets a server answer those with the whole representation).
    pub fn range_fill(&self, status: u16, headers: &HeaderMap) -> Option<RangeFill> {
        if !self.fetches_whole() {
            return None;
        }
        let asked = &self.request_headers;
        let ranges = range::ranges_from_response(asked, status, headers, self.rules.max_ranges);
        let len = meridian_core::exchange::declared_length(headers).unwrap_or_default();
        let fill = match ranges {
            Ranges::Full => return None,
            Ranges::Single { start, end } => RangeFill::Parts {
                content_range: HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")).ok(),
                content_type: None,
                length: end - start + 1,
                cut: BodyCut::single(start, end),
            },
            Ranges::Multiple(ranges) => {
                let multipart = Multipart::new(
                    &ranges,
                    len,
                    headers.get(http::header::CONTENT_TYPE),
                    &multipart_boundary(),
                );
                RangeFill::Parts {
                    content_range: None,
                    content_type: Some(multipart.content_type()),
                    length: multipart.content_length(),
                    cut: multipart.streaming()?,
                }
            }
            Ranges::Unsatisfiable => RangeFill::Unsatisfiable { len },
        };
        Some(fill)
    }

    /// stale-if-error: the origin failed (every eligible region); serve the stale entry if its
    /// window allows. Counts the request as `stale`.
    pub fn stale_on_error(mut self, now: SystemTime) -> Option<Served> {
        let entry = self.stale.take()?;
        if !entry.freshness.serves_on_error(now) {
            return None;
        }
        self.tally.status = CacheStatus::Stale;
        let mut served = Served {
            age: entry.freshness.age(now),
            entry,
            not_modified: false,
            head: self.request.head,
            status: CacheStatus::Stale,
            partial: None,
            client_only: None,
            rules: Arc::clone(&self.rules),
        };
        if self.request.range {
            served.cut(&self.request_headers);
        }
        Some(served)
    }
}

/// A range miss answered from the whole response as it streams ([`Ticket::range_fill`]).
pub enum RangeFill {
    /// `206`: the response's head with these fields set, then the body cut by `cut`.
    Parts {
        content_range: Option<HeaderValue>,
        /// `multipart/byteranges; boundary=...` for several ranges.
        content_type: Option<HeaderValue>,
        length: u64,
        cut: BodyCut,
    },
    /// `416` for a representation of `len` bytes.
    Unsatisfiable { len: u64 },
}

/// What `admit` decided for a response head.
pub enum Admission {
    /// Stream the body through `writer.push`, then `writer.finish().await`.
    Store(Box<CacheWriter>),
    /// The origin answered `304` to our revalidation: the entry was refreshed; serve this instead
    /// of the (empty) upstream response.
    Revalidated(Served),
    /// Not stored (reason given); proxy the response as it is.
    Pass(NotStorable),
}

impl Admission {
    pub fn status(&self) -> CacheStatus {
        match self {
            Admission::Store(w) => w.tally.status,
            Admission::Revalidated(s) => s.status,
            // An unsafe method's response (stored or not, it was never a cache lookup).
            Admission::Pass(NotStorable::Method | NotStorable::Authorization) => {
                CacheStatus::Bypass
            }
            Admission::Pass(_) => CacheStatus::Miss,
        }
    }
}

/// Collects body chunks as they stream to the client; `finish` stores the entry and releases
/// coalesced followers. Dropped unfinished (error, client gone, too large): nothing is stored and
/// followers fetch on their own.
pub struct CacheWriter {
    cache: ResponseCache,
    key: CacheKey,
    status: u16,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
    len: u64,
    freshness: policy::Freshness,
    vary: Vec<HeaderName>,
    tags: Vec<String>,
    too_large: bool,
    leader: Option<LeaderGuard>,
    tally: Tally,
}

impl CacheWriter {
    /// Appends a chunk (a refcount clone). Past `max_object_bytes` the writer gives up: chunks are
    /// dropped, followers are released now, and `finish` stores nothing.
    pub fn push(&mut self, chunk: &Bytes) {
        if self.too_large {
            return;
        }
        self.len += chunk.len() as u64;
        if self.len > self.cache.inner.store.max_object_bytes() {
            self.too_large = true;
            self.chunks = Vec::new();
            if let Some(leader) = self.leader.take() {
                leader.complete(None);
            }
            return;
        }
        if !chunk.is_empty() {
            self.chunks.push(chunk.clone());
        }
    }

    pub fn is_abandoned(&self) -> bool {
        self.too_large
    }

    /// Stores the entry (the body is complete) and hands it to any followers.
    pub async fn finish(mut self) -> Option<Arc<CachedResponse>> {
        if self.too_large {
            return None;
        }
        let has_validators = self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED);
        let entry = Arc::new(CachedResponse {
            id: self.cache.inner.store.next_id(),
            key: self.key.clone(),
            status: self.status,
            headers: with_headroom(std::mem::take(&mut self.headers)),
            body: std::mem::take(&mut self.chunks),
            body_len: self.len,
            keep_for: self.freshness.keep_for(has_validators),
            freshness: self.freshness,
            vary: std::mem::take(&mut self.vary),
            tags: std::mem::take(&mut self.tags),
            prepared_h1: Default::default(),
        });
        let inner = &self.cache.inner;
        let stored = inner
            .store
            .insert(Arc::clone(&entry), &inner.metrics.gauges)
            .await;
        let result = stored.then_some(entry);
        if let Some(leader) = self.leader.take() {
            leader.complete(result.clone());
        }
        result
    }
}

struct Inner {
    store: Store,
    coalescer: Coalescer,
    enabled: bool,
    coalesce_timeout: Duration,
    /// `[edge.cache] targeted`, compiled.
    targeted: Vec<HeaderName>,
    /// `[edge.cache] forward_targeted`.
    forward_targeted: bool,
    /// `[edge.cache] max_ranges`.
    max_ranges: usize,
    metrics: CacheMetrics,
}

/// The cache facade. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct ResponseCache {
    inner: Arc<Inner>,
}

/// Purge by exact URL, URL prefix, or tag (the admin API's JSON body).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Purge {
    Url(String),
    Prefix(String),
    Tag(String),
}

impl Purge {
    /// Parses `{"url": ...}`, `{"prefix": ...}` or `{"tag": ...}`.
    pub fn from_json(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| {
            format!("expected {{\"url\": ...}}, {{\"prefix\": ...}} or {{\"tag\": ...}}: {e}")
        })
    }
}

/// Constant-time bearer token check for the admin write endpoints (`Authorization: Bearer <t>`).
pub fn bearer_matches(authorization: Option<&HeaderValue>, token: &str) -> bool {
    let Some(given) = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.trim().as_bytes());
    if a.len() != b.len() || b.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ResponseCache {
    pub fn new(config: &EdgeCache, registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = CacheMetrics::new(registry)?;
        Ok(Self {
            inner: Arc::new(Inner {
                store: Store::new(
                    config.max_bytes,
                    config.max_object_bytes,
                    metrics.gauges.clone(),
                ),
                coalescer: Coalescer::default(),
                enabled: config.enabled,
                coalesce_timeout: config.coalesce_timeout.as_duration(),
                targeted: policy::targeted_names(&config.targeted),
                forward_targeted: config.forward_targeted,
                max_ranges: usize::try_from(config.max_ranges).unwrap_or(range::DEFAULT_MAX_RANGES),
                metrics,
            }),
        })
    }

    /// Compiles a route's rules and resolves its counters (once per snapshot, not per request).
    pub fn route_policy(&self, route: &str, config: &RouteCache) -> RoutePolicy {
        let mut rules = RouteRules::from_config(config);
        rules.enabled &= self.inner.enabled;
        rules.targeted = self.inner.targeted.clone();
        rules.max_ranges = self.inner.max_ranges;
        if !self.inner.forward_targeted {
            rules.hidden = self.inner.targeted.clone();
        }
        let counter = |s: CacheStatus| {
            self.inner
                .metrics
                .lookups
                .with_label_values(&[route, s.as_str()])
        };
        RoutePolicy {
            rules: Arc::new(rules),
            counters: Arc::new(CacheStatus::ALL.map(counter)),
        }
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.inner.metrics
    }

    /// Decides how a request uses the cache. May wait (up to `coalesce_timeout`) behind an
    /// identical in-flight miss.
    pub async fn lookup(
        &self,
        req: &CacheRequest<'_>,
        policy: &RoutePolicy,
        now: SystemTime,
    ) -> Lookup {
        let bypass = |reason| {
            policy.count(CacheStatus::Bypass);
            Lookup::Bypass(reason)
        };
        let request = match policy::classify_request(req.method, req.headers, &policy.rules) {
            Ok(r) => r,
            Err(reason) => return bypass(reason),
        };
        let Ok(primary) = PrimaryKey::build(req, &policy.rules.key) else {
            return bypass(Bypass::Unkeyable);
        };
        let inner = &self.inner;
        let served = |entry: Arc<CachedResponse>, status| {
            Served::new(entry, now, req.headers, &request, &policy.rules, status)
        };
        let ticket = |primary: &PrimaryKey,
                      stale: Option<Arc<CachedResponse>>,
                      leader: Option<LeaderGuard>| Ticket {
            primary: primary.clone(),
            request,
            rules: Arc::clone(&policy.rules),
            request_headers: req.headers.clone(),
            tally: Tally {
                counters: Arc::clone(&policy.counters),
                status: if request.origin_only {
                    CacheStatus::Bypass
                } else if stale.is_some() {
                    CacheStatus::Expired
                } else {
                    CacheStatus::Miss
                },
            },
            stale,
            leader,
            requested_at: now,
        };
        if request.origin_only {
            // The origin answers (unsafe method, or an authorized request on a route that does not
            // share those); `admit` invalidates or stores what its answer allows.
            return Lookup::Fetch(ticket(&primary, None, None));
        }
        // The primary key moves into the variant's key for the lookup and back out of it: a hit
        // copies no key.
        let (stored, primary) = match inner.store.vary_of(&primary) {
            Some(vary) => match CacheKey::with_vary(primary, &vary, req.headers, &policy.rules.key)
            {
                Ok(key) => (inner.store.get(&key).await, key.primary),
                Err(_) => return bypass(Bypass::Unkeyable),
            },
            None => (None, primary),
        };
        // A coding the client does not accept is never served (an origin that encodes without
        // `Vary: Accept-Encoding`): such an entry is treated as absent and replaced.
        let stored = stored.filter(|e| key::encoding_acceptable(req.headers, &e.headers));
        if request.range {
            // Ranges, one or several, are cut from a stored response; with nothing fresh stored
            // they are either filled (the whole response is fetched, stored, and the ranges
            // answered from it as it streams) or, with `fill_ranges` off, sent to the origin as
            // they are.
            let fresh = stored
                .as_ref()
                .is_some_and(|e| entry_is_fresh(e, now, &request));
            if !fresh && !policy.rules.fill_ranges {
                return bypass(Bypass::Range);
            }
        }
        if let Some(entry) = stored {
            match entry.freshness.usability(now, &request) {
                Usability::Fresh => {
                    policy.count(CacheStatus::Hit);
                    return Lookup::Hit(served(entry, CacheStatus::Hit));
                }
                Usability::StaleWhileRevalidate => {
                    policy.count(CacheStatus::Stale);
                    let refresh = inner
                        .coalescer
                        .try_lead(&primary)
                        .map(|leader| ticket(&primary, Some(Arc::clone(&entry)), Some(leader)));
                    return Lookup::Stale {
                        served: served(entry, CacheStatus::Stale),
                        refresh,
                    };
                }
                Usability::Stale => {
                    // Revalidate; concurrent revalidations coalesce like misses.
                    return match inner.coalescer.join(&primary) {
                        Join::Leader(leader) => {
                            Lookup::Fetch(ticket(&primary, Some(entry), Some(leader)))
                        }
                        Join::Follower(rx) => {
                            match self
                                .follow(rx, &primary, req.headers, now, &request, &policy.rules.key)
                                .await
                            {
                                Some(fresh) => {
                                    policy.count(CacheStatus::Hit);
                                    Lookup::Hit(served(fresh, CacheStatus::Hit))
                                }
                                None => Lookup::Fetch(ticket(&primary, Some(entry), None)),
                            }
                        }
                    };
                }
            }
        }
        if request.head || request.no_cache {
            // Nothing to share: HEAD stores nothing, no-cache wants its own origin answer.
            return Lookup::Fetch(ticket(&primary, None, None));
        }
        match inner.coalescer.join(&primary) {
            Join::Leader(leader) => Lookup::Fetch(ticket(&primary, None, Some(leader))),
            Join::Follower(rx) => match self
                .follow(rx, &primary, req.headers, now, &request, &policy.rules.key)
                .await
            {
                Some(entry) => {
                    policy.count(CacheStatus::Hit);
                    Lookup::Hit(served(entry, CacheStatus::Hit))
                }
                None => Lookup::Fetch(ticket(&primary, None, None)),
            },
        }
    }

    /// Invalidates `url` (and its twin under the other scheme: one origin behind both) for
    /// `reason`, counted.
    async fn invalidate(&self, reason: Invalidation, url: &str) {
        self.inner.metrics.invalidations[reason as usize].inc();
        self.inner.store.purge_url(url).await;
        let twin = if let Some(rest) = url.strip_prefix("http://") {
            format!("https://{rest}")
        } else if let Some(rest) = url.strip_prefix("https://") {
            format!("http://{rest}")
        } else {
            return;
        };
        self.inner.store.purge_url(&twin).await;
    }

    /// Waits for a leader; the entry it stored serves us only if it is the variant we would select.
    async fn follow(
        &self,
        rx: tokio::sync::watch::Receiver<coalesce::Outcome>,
        primary: &PrimaryKey,
        headers: &HeaderMap,
        now: SystemTime,
        request: &RequestRules,
        options: &key::KeyOptions,
    ) -> Option<Arc<CachedResponse>> {
        let entry = coalesce::follow(rx, self.inner.coalesce_timeout).await?;
        let ours = CacheKey::with_vary(primary.clone(), &entry.vary, headers, options).ok()?;
        if ours != entry.key
            || entry.freshness.usability(now, request) != Usability::Fresh
            || !key::encoding_acceptable(headers, &entry.headers)
        {
            return None;
        }
        self.inner.metrics.coalesced.inc();
        Some(entry)
    }

    /// Decides what to do with the origin's response head for a ticketed request.
    pub async fn admit(
        &self,
        mut ticket: Ticket,
        status: u16,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Admission {
        let inner = &self.inner;
        if status == 304 {
            if let Some(stale) = ticket.stale.take() {
                return self.refresh(ticket, stale, headers, now).await;
            }
        }
        if ticket.request.unsafe_method {
            for (reason, url) in policy::invalidations(status, headers, &ticket.primary.url) {
                self.invalidate(reason, &url).await;
            }
            // A POST answer may serve later GETs only when it names its own URL (RFC 9110
            // §9.3.3); nothing else an unsafe method returns is stored.
            let names_itself = ticket.request.post
                && headers
                    .get(http::header::CONTENT_LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|l| policy::names_same_url(l, &ticket.primary.url));
            if !names_itself {
                return Admission::Pass(NotStorable::Method);
            }
        }
        let facts = policy::ResponseFacts {
            status,
            headers,
            request_time: ticket.requested_at,
            response_time: now,
        };
        let storable = match policy::storability(
            &ticket.request,
            &facts,
            &ticket.rules,
            inner.store.max_object_bytes(),
        ) {
            Ok(s) => s,
            Err(reason) => {
                if let Some(stale) = ticket.stale.take() {
                    // The origin now says "do not store": the old entry must not serve anyone.
                    inner.store.remove(&stale.key).await;
                }
                let pass = Admission::Pass(reason);
                ticket.tally.status = pass.status();
                return pass;
            }
        };
        let Ok(key) = CacheKey::with_vary(
            ticket.primary.clone(),
            &storable.vary,
            &ticket.request_headers,
            &ticket.rules.key,
        ) else {
            return Admission::Pass(NotStorable::Vary);
        };
        let Ticket {
            leader, mut tally, ..
        } = ticket;
        if tally.status == CacheStatus::Bypass {
            // An origin-only request whose answer the origin allowed to be shared.
            tally.status = CacheStatus::Miss;
        }
        let mut stored_headers = policy::headers_to_store(headers);
        if !stored_headers.contains_key(http::header::DATE) {
            // RFC 9110 §6.6.1: a cache records when a response without Date arrived, so it can be
            // served later with a Date that its Age is counted from.
            if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
                stored_headers.insert(http::header::DATE, date);
            }
        }
        Admission::Store(Box::new(CacheWriter {
            cache: self.clone(),
            key,
            status,
            headers: stored_headers,
            chunks: Vec::new(),
            len: 0,
            freshness: storable.freshness,
            vary: storable.vary,
            tags: store::tags_of(headers),
            too_large: false,
            leader,
            tally,
        }))
    }

    /// A `304` answered our revalidation: merge headers, recompute freshness, store, serve.
    async fn refresh(
        &self,
        mut ticket: Ticket,
        stale: Arc<CachedResponse>,
        not_modified: &HeaderMap,
        now: SystemTime,
    ) -> Admission {
        let mut merged = policy::merge_not_modified(&stale.headers, not_modified, &ticket.rules);
        if !not_modified.contains_key(http::header::DATE) {
            // A 304 without Date was generated now (RFC 9110 §6.6.1); keeping the old Date would
            // age the refreshed entry by its whole previous life.
            if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
                merged.insert(http::header::DATE, date);
            }
        }
        // The 304's cookie is for the client that asked, never for the stored entry.
        let client_only = (!ticket.rules.allow_set_cookie
            && not_modified.contains_key(http::header::SET_COOKIE))
        .then(|| {
            let mut h = HeaderMap::new();
            for v in not_modified.get_all(http::header::SET_COOKIE) {
                h.append(http::header::SET_COOKIE, v.clone());
            }
            h
        });
        let facts = policy::ResponseFacts {
            status: stale.status,
            headers: &merged,
            request_time: ticket.requested_at,
            response_time: now,
        };
        let inner = &self.inner;
        let storable = policy::storability(&ticket.request, &facts, &ticket.rules, u64::MAX);
        ticket.tally.status = CacheStatus::Revalidated;
        let head = ticket.request.head;
        let Ok(storable) = storable else {
            // The refreshed headers make the response unstorable (now `no-store`, `private`,
            // ...): the entry goes, and only this client gets the merged response.
            inner.store.remove(&stale.key).await;
            if let Some(leader) = ticket.leader.take() {
                leader.complete(None);
            }
            let entry = Arc::new(CachedResponse {
                id: stale.id,
                key: stale.key.clone(),
                status: stale.status,
                headers: merged,
                body: stale.body.clone(),
                body_len: stale.body_len,
                keep_for: Duration::ZERO,
                freshness: stale.freshness,
                vary: stale.vary.clone(),
                tags: Vec::new(),
                prepared_h1: Default::default(),
            });
            let mut served = Served {
                age: Duration::ZERO,
                entry,
                not_modified: false,
                head,
                status: CacheStatus::Revalidated,
                partial: None,
                client_only,
                rules: Arc::clone(&ticket.rules),
            };
            if ticket.request.range {
                served.cut(&ticket.request_headers);
            }
            return Admission::Revalidated(served);
        };
        let freshness = storable.freshness;
        let entry = Arc::new(CachedResponse {
            id: inner.store.next_id(),
            key: stale.key.clone(),
            status: stale.status,
            keep_for: freshness.keep_for(true),
            tags: store::tags_of(&merged),
            headers: with_headroom(merged),
            body: stale.body.clone(),
            body_len: stale.body_len,
            freshness,
            vary: stale.vary.clone(),
            prepared_h1: Default::default(),
        });
        inner
            .store
            .insert(Arc::clone(&entry), &inner.metrics.gauges)
            .await;
        if let Some(leader) = ticket.leader.take() {
            leader.complete(Some(Arc::clone(&entry)));
        }
        // The client's own conditional is answered from the refreshed entry.
        let mut served = Served::new(
            entry,
            now,
            &ticket.request_headers,
            &ticket.request,
            &ticket.rules,
            CacheStatus::Revalidated,
        );
        served.client_only = client_only;
        Admission::Revalidated(served)
    }

    /// Removes every variant stored for the absolute URL (normalised: host case, port, query order).
    pub async fn purge_url(&self, url: &str) -> usize {
        self.inner.metrics.purges.with_label_values(&["url"]).inc();
        let Some(url) = key::normalise_url(url) else {
            return 0;
        };
        self.inner.store.purge_url(&url).await
    }

    /// Removes every entry whose URL starts with `prefix` (`https://host/path-prefix`).
    pub async fn purge_prefix(&self, prefix: &str) -> usize {
        self.inner
            .metrics
            .purges
            .with_label_values(&["prefix"])
            .inc();
        // Normalise scheme and host; the path part stays a plain string prefix.
        let normalised = key::normalise_url(prefix).unwrap_or_else(|| prefix.to_string());
        self.inner.store.purge_prefix(&normalised).await
    }

    pub async fn purge_tag(&self, tag: &str) -> usize {
        self.inner.metrics.purges.with_label_values(&["tag"]).inc();
        self.inner.store.purge_tag(tag.trim()).await
    }

    pub async fn purge(&self, purge: &Purge) -> usize {
        match purge {
            Purge::Url(u) => self.purge_url(u).await,
            Purge::Prefix(p) => self.purge_prefix(p).await,
            Purge::Tag(t) => self.purge_tag(t).await,
        }
    }

    /// Applies moka's pending maintenance (evictions, listener calls). Tests and admin only.
    pub async fn sync(&self) {
        self.inner.store.sync().await;
    }

    pub fn weighted_size(&self) -> u64 {
        self.inner.store.weighted_size()
    }

    /// Requests currently leading a coalesced fetch (tests and admin).
    pub fn in_flight(&self) -> usize {
        self.inner.coalescer.in_flight()
    }
}

#[cfg(test)]
mod tests;

/// Fresh for this request (ranges are cut only from fresh entries).
fn entry_is_fresh(entry: &CachedResponse, now: SystemTime, request: &RequestRules) -> bool {
    entry.freshness.usability(now, request) == Usability::Fresh
}
