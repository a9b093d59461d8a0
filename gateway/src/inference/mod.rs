//! Inference traffic: the OpenAI-compatible surface of `kind = "inference"` routes.
//!
//! - Every request on the route passes the gate first: its caller is authenticated (with
//!   `[[api_keys]]`) or, anonymous, known by its address, and counted against the route's limits,
//!   whatever the path (paths are compared normalised, so `/v1/chat/completions/` is a model call).
//! - `GET /v1/models` is answered by the edge from the snapshot (models and the regions serving them).
//! - `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`: the pipeline
//!   reads the body (at most `inference.max_body_bytes`, 16 MiB by default) through a streaming
//!   scan that keeps only `model`, `stream`, `max_tokens` and `user`, before any region is chosen,
//!   and holds it to send upstream byte for byte (and again on a fallback). The candidates become
//!   the regions serving the model.
//! - `429`/`503` from a model server before any byte reached the client: the request goes to the
//!   next candidate even though POST is not idempotent (the server refused the work), and a
//!   `Retry-After` keeps new requests away from that region for that long (see
//!   `core::exchange::model_server_refused`).
//! - Responses stream through untouched; only their last 16 KiB are kept to find `usage`. The
//!   caller's token limit holds a reservation from admission, settled to that `usage` when the
//!   request ends — or kept whole when the client left before any usage arrived.
//!
//! Other paths on an inference route are proxied like any route (no model, route-level regions).

pub mod limiter;
mod metrics;
pub mod ratelimit;
pub mod scrape;

pub use crate::core::inference::{
    body_too_large, call_error, entry, model_name, model_served, openai, sniff, usage, Entry,
};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_geoip::GeoIp;
use sha2::{Digest, Sha256};

use crate::core::models::ModelId;
use crate::core::{decide_for_model, Refusal, RequestView, RouteDecision, Snapshot};
use crate::metrics::STATUS_CLASSES;

use crate::core::inference::pick::{PickParams, PickReason};
use crate::core::inference::prefixes::PrefixMemory;
use crate::core::inference::replicas::{CallPick, ReplicaTable};
use limiter::{LimitBackend, LimiterMetrics, RedisLimiter};
use meridian_config::inference::{Criticality, Picking, RateLimit};
use meridian_config::{LimitsBackend, LimitsSection};
pub use metrics::InferenceMetrics;
use openai::ApiError;
use ratelimit::{KeyHash, RateLimiter, Reservation};
use sniff::CallFields;
use usage::UsageScanner;

/// Per-edge inference state: rate-limit windows and metrics (outlive snapshots).
pub struct InferenceState {
    limiter: Arc<RateLimiter>,
    /// The shared limiter of `[limits] backend = "redis"`, rebuilt when the settings change.
    global: std::sync::Mutex<Option<Arc<RedisLimiter>>>,
    registry: prometheus::Registry,
    /// Registered with the first Redis limiter, so that an edge counting locally exports none.
    limiter_metrics: std::sync::OnceLock<Option<LimiterMetrics>>,
    metrics: Option<InferenceMetrics>,
    scraper: scrape::Scraper,
    /// Where prompt prefixes went, so they keep finding the replicas that hold them (shared by
    /// every call of this edge; bounded).
    prefixes: Arc<Mutex<PrefixMemory>>,
    scrape_metrics: Option<Arc<scrape::ScrapeMetrics>>,
}

/// The rate-limit key of an anonymous caller: a hash of its address — of its /64 for IPv6, which
/// one host usually holds whole — never all zeros (the marker of "no API key").
fn anonymous_key(client: std::net::IpAddr) -> KeyHash {
    let mut hasher = Sha256::new();
    hasher.update(b"meridian anonymous caller ");
    match client {
        std::net::IpAddr::V4(v4) => hasher.update(v4.octets()),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hasher.update(v4.octets()),
            None => hasher.update(&v6.octets()[..8]),
        },
    }
    hasher.finalize().into()
}

/// The limit store of one decision: this edge's counters or the shared Redis limiter.
#[derive(Clone)]
enum Backend {
    Local(Arc<RateLimiter>),
    Shared(Arc<RedisLimiter>),
}

impl Backend {
    fn get(&self) -> &dyn LimitBackend {
        match self {
            Backend::Local(local) => local.as_ref(),
            Backend::Shared(shared) => shared.as_ref(),
        }
    }
}

/// A call's token reservation, settled exactly once: by [`InferenceState::finish`], or when the
/// request is dropped before that (its client went away) — then the reservation is kept whole.
struct Settlement {
    backend: Backend,
    route: String,
    key: KeyHash,
    reservation: Reservation,
    settled: bool,
}

impl Settlement {
    fn settle(&mut self, used: u64) {
        if !std::mem::replace(&mut self.settled, true) {
            self.backend.get().settle(
                &self.route,
                &self.key,
                &self.reservation,
                used,
                crate::clock::now_ms(),
            );
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle(self.reservation.tokens);
    }
}

/// Per-request inference state, kept in the proxy's request context.
pub struct InferenceCtx {
    model: ModelId,
    /// The model as the call named it (an alias, or a LoRA adapter's name).
    sent: String,
    /// Hash of the session header's value, else of the prompt's prefix: calls sharing it go to
    /// the same replica while its load allows.
    affinity: Option<u64>,
    /// The edge's prefix memory, for the pick.
    prefixes: Arc<Mutex<PrefixMemory>>,
    /// The tokens held against the caller's limit while the call runs (routes limiting tokens).
    settlement: Option<Settlement>,
    started: Instant,
    first_byte: Option<Duration>,
    usage: UsageScanner,
}

impl InferenceCtx {
    /// A response body chunk on its way to the client (never held back).
    pub fn on_body(&mut self, chunk: Option<&Bytes>) {
        let Some(chunk) = chunk.filter(|c| !c.is_empty()) else {
            return;
        };
        if self.first_byte.is_none() {
            self.first_byte = Some(self.started.elapsed());
        }
        self.usage.push(chunk);
    }
}

/// A refused model call: the error to answer with, and the request's inference state when the
/// refusal still counts in the inference metrics.
pub type Refused = (ApiError, Option<Box<InferenceCtx>>);

/// The answer to a model call whose body could not be read: over `max` bytes (`413`), too slow
/// (`408`), or broken off (`400`) — the same on every front.
pub fn body_error(error: crate::pipeline::body::BodyError, max: u64) -> ApiError {
    use crate::pipeline::body::BodyError;
    match error {
        BodyError::TooLarge => body_too_large(max),
        BodyError::Timeout => ApiError::new(
            408,
            "invalid_request_error",
            "body_timeout",
            "the request body did not arrive in time".into(),
        ),
        BodyError::Client => ApiError::new(
            400,
            "invalid_request_error",
            "bad_body",
            "could not read the request body".into(),
        ),
    }
}

impl InferenceState {
    pub fn new(registry: &prometheus::Registry) -> Self {
        let metrics = match InferenceMetrics::new(registry) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("inference metrics not registered: {e}");
                None
            }
        };
        Self {
            limiter: Arc::new(RateLimiter::default()),
            global: std::sync::Mutex::new(None),
            registry: registry.clone(),
            limiter_metrics: std::sync::OnceLock::new(),
            metrics,
            scraper: scrape::Scraper::default(),
            prefixes: Arc::default(),
            scrape_metrics: match scrape::ScrapeMetrics::new(registry) {
                Ok(m) => Some(Arc::new(m)),
                Err(e) => {
                    tracing::warn!("model server metrics not registered: {e}");
                    None
                }
            },
        }
    }

    /// Starts scraping the model servers (once; later calls do nothing).
    pub fn start_scraper(&self, store: &Arc<crate::reload::SnapshotStore>) {
        self.scraper.start(store, self.scrape_metrics.clone());
    }

    /// The limit store that `settings` asks for. A Redis set-up that cannot even be built (a URL
    /// the client refuses) falls back to this edge's counters, loudly.
    fn backend(&self, settings: &LimitsSection) -> Backend {
        if settings.backend == LimitsBackend::Local {
            return Backend::Local(Arc::clone(&self.limiter));
        }
        let mut global = self.global.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(redis) = global.as_ref().filter(|r| r.settings() == settings) {
            return Backend::Shared(redis.clone());
        }
        let metrics = self
            .limiter_metrics
            .get_or_init(|| match LimiterMetrics::new(&self.registry) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("rate-limit backend metrics not registered: {e}");
                    None
                }
            })
            .clone();
        match RedisLimiter::new(settings.clone(), metrics) {
            Ok(redis) => {
                let redis = Arc::new(redis);
                *global = Some(redis.clone());
                Backend::Shared(redis)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the Redis limiter; counting per edge");
                *global = None;
                Backend::Local(Arc::clone(&self.limiter))
            }
        }
    }

    /// The caller of a request on an inference route as its limits know it: its API key, or its
    /// address when nobody is authenticated.
    fn caller(key: KeyHash, client: std::net::IpAddr) -> KeyHash {
        if key == [0; 32] {
            anonymous_key(client)
        } else {
            key
        }
    }

    /// Counts one request of `key` against the route's limits, reserving `reserve` tokens; the
    /// `429` when a limit is reached.
    async fn admit(
        &self,
        snapshot: &Snapshot,
        route: usize,
        key: &KeyHash,
        limit: &RateLimit,
        reserve: u64,
    ) -> Result<(Backend, Reservation), ApiError> {
        let name = snapshot.routes.get(route).map_or("", |r| r.name.as_str());
        let backend = self.backend(&snapshot.config.limits);
        match backend
            .get()
            .admit(name, key, limit, reserve, crate::clock::now_ms())
            .await
        {
            Ok(reservation) => Ok((backend, reservation)),
            Err((which, retry_after)) => {
                if let Some(m) = &self.metrics {
                    m.ratelimited
                        .with_label_values(&[name, which.label()])
                        .inc();
                }
                let mut error = ApiError::new(
                    429,
                    which.label(),
                    "rate_limit_exceeded",
                    format!(
                        "rate limit reached for {} per minute on route {name:?}; retry in {retry_after}s",
                        which.label(),
                    ),
                );
                error.retry_after = Some(retry_after);
                Err(error)
            }
        }
    }

    /// A request on an inference route that is not a model call: counted against the route's
    /// request limit like any call (no tokens), so no path gets past the gate.
    pub async fn admit_other(
        &self,
        snapshot: &Snapshot,
        route: usize,
        key: KeyHash,
        client: std::net::IpAddr,
    ) -> Result<(), ApiError> {
        let Some(limit) = snapshot
            .config
            .routes
            .get(route)
            .and_then(|r| r.inference.as_ref())
            .and_then(|i| i.rate_limit.as_ref())
        else {
            return Ok(());
        };
        let key = Self::caller(key, client);
        self.admit(snapshot, route, &key, limit, 0).await.map(drop)
    }

    /// The model call, once its body is scanned (transport-free: every front calls this): finds
    /// the model, applies the caller's rate limit (reserving the call's tokens), and picks the
    /// regions serving that model. On a refusal, the error to answer with (and the request's
    /// inference state when it counts in the inference metrics). `session`: the value of the
    /// `[inference] session_header`, when the call carries one.
    #[allow(clippy::too_many_arguments)]
    pub async fn route_call(
        &self,
        snapshot: &Snapshot,
        decision: RouteDecision,
        key: KeyHash,
        view: &RequestView<'_>,
        geoip: &GeoIp,
        started: Instant,
        fields: &CallFields,
        session: Option<&http::HeaderValue>,
    ) -> std::result::Result<(RouteDecision, Box<InferenceCtx>), Refused> {
        let route = &snapshot.routes[decision.route];
        let settings = snapshot
            .config
            .routes
            .get(decision.route)
            .and_then(|r| r.inference.clone())
            .unwrap_or_default();
        let name = model_name(fields).map_err(|error| (error, None))?;
        let model = model_served(snapshot, route, name).map_err(|error| (error, None))?;
        let authenticated = key;
        let key = Self::caller(key, view.client);
        let affinity = session
            .filter(|v| !v.is_empty())
            .map(|v| crate::core::inference::pick::stable_hash(v.as_bytes()))
            .or(fields.prefix);
        let mut ctx = Box::new(InferenceCtx {
            model,
            sent: name.to_string(),
            affinity,
            prefixes: Arc::clone(&self.prefixes),
            settlement: None,
            started,
            first_byte: None,
            usage: UsageScanner::default(),
        });

        if let Some(limit) = &settings.rate_limit {
            // The call's estimate: prompt bytes / 4 (what the simulated and most real tokenizers
            // average) plus the completion it may ask for.
            let reserve = if limit.tokens_per_minute.is_some() {
                fields.body_bytes.div_ceil(4).saturating_add(
                    fields
                        .max_tokens
                        .unwrap_or(snapshot.config.inference.default_max_tokens),
                )
            } else {
                0
            };
            match self
                .admit(snapshot, decision.route, &key, limit, reserve)
                .await
            {
                Ok((backend, reservation)) => {
                    if limit.tokens_per_minute.is_some() {
                        ctx.settlement = Some(Settlement {
                            backend,
                            route: route.name.clone(),
                            key,
                            reservation,
                            settled: false,
                        });
                    }
                }
                Err(error) => return Err((error, Some(ctx))),
            }
        }

        let now_ms = crate::clock::now_ms();
        match decide_for_model(snapshot, view, |ip| geoip.lookup(ip), now_ms, model) {
            Ok(decision) => {
                let criticality =
                    crate::core::inference::criticality(snapshot, &authenticated, name, model);
                // Shedding looks at the model servers whatever the picking mode.
                let table = self.scraper.replicas();
                let saturation = CallPick {
                    model_aware: true,
                    ..call_pick(snapshot, &ctx, &table)
                };
                let saturated = |r: usize| {
                    snapshot
                        .regions
                        .get(r)
                        .is_some_and(|region| saturation.region_saturated(region, now_ms))
                };
                if criticality == Criticality::Sheddable
                    && decision.candidates.get(0).is_some_and(saturated)
                {
                    self.count_shed(snapshot, decision.route, criticality, "saturated");
                    let mut error = ApiError::new(
                        429,
                        "server_error",
                        "overloaded",
                        format!(
                            "the model servers for `{name}` are saturated; sheddable calls are refused first, retry shortly"
                        ),
                    );
                    error.retry_after = Some(1);
                    return Err((error, Some(ctx)));
                }
                if let Some(abroad) =
                    residency_keeps_from_spilling(snapshot, &decision, model, now_ms, &saturated)
                {
                    self.count_shed(snapshot, decision.route, criticality, "residency");
                    let country = decision.country.as_ref().map_or("", |c| c.as_str());
                    let mut error = ApiError::new(
                        503,
                        "server_error",
                        "overloaded",
                        format!(
                            "every model server for `{name}` in the regions allowed for clients in {country} is saturated; \
                             strict data residency keeps the call from {abroad}, retry shortly"
                        ),
                    );
                    error.retry_after = Some(1);
                    return Err((error, Some(ctx)));
                }
                Ok((decision, ctx))
            }
            Err(refusal) => {
                let reason = match refusal {
                    Refusal::Residency { country, .. } => format!(
                        "model `{name}` is not served in any region allowed for clients in {country}"
                    ),
                    _ => format!(
                        "every region serving model `{name}` is unavailable right now; retry shortly"
                    ),
                };
                let mut error = ApiError::new(
                    refusal.status(),
                    "server_error",
                    "model_unavailable",
                    reason,
                );
                if matches!(refusal, Refusal::Unavailable { .. }) {
                    error.retry_after = Some(1);
                }
                Err((error, Some(ctx)))
            }
        }
    }

    fn count_shed(
        &self,
        snapshot: &Snapshot,
        route: usize,
        criticality: Criticality,
        reason: &str,
    ) {
        let (Some(metrics), Some(route)) = (&self.metrics, snapshot.routes.get(route)) else {
            return;
        };
        let criticality = match criticality {
            Criticality::Critical => "critical",
            Criticality::Standard => "standard",
            Criticality::Sheddable => "sheddable",
        };
        metrics
            .shed
            .with_label_values(&[&route.name, criticality, reason])
            .inc();
    }

    /// What the last scrape round found of the model servers (for [`call_pick`]).
    pub fn replica_table(&self) -> Arc<ReplicaTable> {
        self.scraper.replicas()
    }

    /// One pick of a model call, by `reason`, in `meridian_inference_picks_total`.
    pub fn count_pick(&self, snapshot: &Snapshot, route: usize, region: usize, reason: PickReason) {
        let (Some(metrics), Some(route), Some(region)) = (
            &self.metrics,
            snapshot.routes.get(route),
            snapshot.regions.get(region),
        ) else {
            return;
        };
        metrics
            .picks
            .with_label_values(&[&route.name, &region.name, reason.label()])
            .inc();
    }

    /// At the end of the request: metrics, and the tokens charged to the caller.
    pub fn finish(
        &self,
        snapshot: &Snapshot,
        region: Option<usize>,
        status: u16,
        ctx: &mut InferenceCtx,
    ) {
        let usage = ctx.usage.usage();
        if let Some(settlement) = ctx.settlement.as_mut() {
            let used = match usage {
                Some(usage) => usage.total(),
                // The model server worked (or the client left while it did) but reported no
                // usage: the reservation stands.
                None if status == 0 || (200..300).contains(&status) => {
                    settlement.reservation.tokens
                }
                // Refused before any work (by the edge or the model server).
                None => 0,
            };
            settlement.settle(used);
        }
        let Some(metrics) = &self.metrics else {
            return;
        };
        let Some(model) = snapshot.models.get(ctx.model) else {
            return;
        };
        let region = region
            .and_then(|r| snapshot.regions.get(r))
            .map_or(crate::metrics::NO_REGION, |r| r.name.as_str());
        let class = match status {
            100..=599 => STATUS_CLASSES[usize::from(status / 100 - 1)],
            _ => STATUS_CLASSES[5],
        };
        metrics
            .requests
            .with_label_values(&[&model.name, region, class])
            .inc();
        if let Some(ttfb) = ctx.first_byte {
            metrics
                .ttfb
                .with_label_values(&[&model.name, region])
                .observe(ttfb.as_secs_f64());
        }
        if let Some(usage) = usage {
            metrics
                .tokens
                .with_label_values(&[&model.name, region, "prompt"])
                .inc_by(usage.prompt_tokens);
            metrics
                .tokens
                .with_label_values(&[&model.name, region, "completion"])
                .inc_by(usage.completion_tokens);
        }
    }
}

/// How the replicas of a model call are picked: `[inference]` settings, the call's model and
/// affinity, and the table of model server state.
pub fn call_pick<'a>(
    snapshot: &Snapshot,
    ctx: &'a InferenceCtx,
    table: &'a ReplicaTable,
) -> CallPick<'a> {
    let settings = &snapshot.config.inference;
    // A few missed rounds are normal under load; beyond that the numbers describe the past.
    let interval =
        u64::try_from(settings.scrape_interval.as_duration().as_millis()).unwrap_or(u64::MAX);
    CallPick {
        model_aware: settings.picking == Picking::ModelAware,
        params: PickParams {
            saturation_queue: f64::from(settings.saturation_queue),
            ..PickParams::default()
        },
        affinity: ctx.affinity,
        memory: Some(&ctx.prefixes),
        model: &ctx.sent,
        table,
        stale_after_ms: interval.saturating_mul(5).max(STALE_AFTER_MIN_MS),
    }
}

/// The scrape table is never called stale sooner than this, however short the interval.
const STALE_AFTER_MIN_MS: u64 = 1_000;

/// Strict residency is all that keeps a call in saturated regions: every candidate region (all
/// allowed for the client) is saturated while a region the route may use, serving the model,
/// available and not saturated, is not allowed. Then the call is refused rather than queued
/// behind the others or sent abroad; the name of that region comes back for the message.
fn residency_keeps_from_spilling<'s>(
    snapshot: &'s Snapshot,
    decision: &RouteDecision,
    model: ModelId,
    now_ms: u64,
    saturated: &dyn Fn(usize) -> bool,
) -> Option<&'s str> {
    let rule = decision
        .country
        .as_ref()
        .and_then(|c| snapshot.residency.get(c))
        .filter(|rule| rule.strict)?;
    let candidates = decision.candidates.as_slice();
    if candidates.is_empty() || !candidates.iter().all(|&r| saturated(usize::from(r))) {
        return None;
    }
    let served_by = &snapshot.models.get(model)?.served_by;
    let route = snapshot.routes.get(decision.route)?;
    route
        .eligible
        .iter()
        .map(|&r| usize::from(r))
        .find_map(|r| {
            let region = snapshot.regions.get(r)?;
            let open = !rule.allowed.get(r).copied().unwrap_or(false)
                && served_by.get(r).copied().unwrap_or(false)
                && crate::core::select::region_verdict(region, now_ms)
                    == crate::core::select::RegionVerdict::Available
                && !saturated(r);
            open.then_some(region.name.as_str())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_callers_are_limited_per_address() {
        let key = |ip: &str| anonymous_key(ip.parse().expect("ip"));
        let a = key("127.1.0.1");
        assert_ne!(a, key("127.1.0.2"));
        assert_ne!(a, [0; 32]);
        assert_eq!(a, key("127.1.0.1"));
        assert_eq!(a, key("::ffff:127.1.0.1"));
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:ffff::9"),
            "one /64"
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }
}
