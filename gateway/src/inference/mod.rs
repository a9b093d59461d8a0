//! Inference traffic: the OpenAI-compatible surface of `kind = "inference"` routes.
//!
//! - `GET /v1/models` is answered by the edge from the snapshot (models and the regions serving them).
//! - `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: the pipeline reads the body
//!   (at most `inference.max_body_bytes`, ≤ 64 KiB) before any region is chosen, because the model
//!   is in it, and holds it to send upstream unchanged (and again on a retry). The candidates
//!   become the regions serving the model.
//! - `429`/`503` from a model server before any byte reached the client: the request goes to the
//!   next candidate even though POST is not idempotent (the server refused the work), and a
//!   `Retry-After` keeps new requests away from that region for that long (see
//!   `core::exchange::model_server_refused`).
//! - Responses stream through untouched; only their last 16 KiB are kept to find `usage`, which is
//!   charged to the caller's token limit and counted in metrics when the request ends.
//!
//! Other paths on an inference route are proxied like any route (no model, route-level regions).

pub mod limiter;
mod metrics;
pub mod ratelimit;

pub use crate::core::inference::{
    body_too_large, entry, model_name, model_served, openai, usage, Entry,
};

use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_geoip::GeoIp;
use sha2::{Digest, Sha256};

use crate::core::models::ModelId;
use crate::core::{decide_for_model, Refusal, RequestView, RouteDecision, Snapshot};
use crate::metrics::STATUS_CLASSES;

use limiter::{LimitBackend, LimiterMetrics, RedisLimiter};
use meridian_config::{LimitsBackend, LimitsSection};
pub use metrics::InferenceMetrics;
use openai::ApiError;
use ratelimit::{KeyHash, RateLimiter};
use usage::UsageScanner;

/// Per-edge inference state: rate-limit windows and metrics (outlive snapshots).
pub struct InferenceState {
    limiter: RateLimiter,
    /// The shared limiter of `[limits] backend = "redis"`, rebuilt when the settings change.
    global: std::sync::Mutex<Option<std::sync::Arc<RedisLimiter>>>,
    registry: prometheus::Registry,
    /// Registered with the first Redis limiter, so that an edge counting locally exports none.
    limiter_metrics: std::sync::OnceLock<Option<LimiterMetrics>>,
    metrics: Option<InferenceMetrics>,
}

/// The rate-limit key of an anonymous caller: a hash of its address (never all zeros, the
/// marker of "no API key").
fn anonymous_key(client: std::net::IpAddr) -> KeyHash {
    let mut hasher = Sha256::new();
    hasher.update(b"meridian anonymous caller ");
    hasher.update(client.to_string().as_bytes());
    hasher.finalize().into()
}

/// The limit store of one decision: this edge's counters or the shared Redis limiter.
enum BackendRef<'a> {
    Local(&'a RateLimiter),
    Shared(std::sync::Arc<RedisLimiter>),
}

impl BackendRef<'_> {
    fn get(&self) -> &dyn LimitBackend {
        match self {
            BackendRef::Local(local) => *local,
            BackendRef::Shared(shared) => shared.as_ref(),
        }
    }
}

/// Per-request inference state, kept in the proxy's request context.
pub struct InferenceCtx {
    model: ModelId,
    route: usize,
    key: KeyHash,
    /// Whether the route limits tokens (so usage must be charged).
    charge_tokens: bool,
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
            limiter: RateLimiter::default(),
            global: std::sync::Mutex::new(None),
            registry: registry.clone(),
            limiter_metrics: std::sync::OnceLock::new(),
            metrics,
        }
    }

    /// The limit store that `settings` asks for. A Redis set-up that cannot even be built (a URL
    /// the client refuses) falls back to this edge's counters, loudly.
    fn backend(&self, settings: &LimitsSection) -> BackendRef<'_> {
        if settings.backend == LimitsBackend::Local {
            return BackendRef::Local(&self.limiter);
        }
        let mut global = self.global.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(redis) = global.as_ref().filter(|r| r.settings() == settings) {
            return BackendRef::Shared(redis.clone());
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
                let redis = std::sync::Arc::new(redis);
                *global = Some(redis.clone());
                BackendRef::Shared(redis)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the Redis limiter; counting per edge");
                *global = None;
                BackendRef::Local(&self.limiter)
            }
        }
    }

    /// The model call, once its body is read (transport-free: every front calls this): finds the
    /// model, applies the caller's rate limit, and picks the regions serving that model. On a
    /// refusal, the error to answer with (and the request's inference state when it counts in
    /// the inference metrics).
    #[allow(clippy::too_many_arguments)]
    pub async fn route_call(
        &self,
        snapshot: &Snapshot,
        decision: RouteDecision,
        key: KeyHash,
        view: &RequestView<'_>,
        geoip: &GeoIp,
        started: Instant,
        body: &[u8],
    ) -> std::result::Result<(RouteDecision, Box<InferenceCtx>), Refused> {
        let route = &snapshot.routes[decision.route];
        let settings = snapshot
            .config
            .routes
            .get(decision.route)
            .and_then(|r| r.inference.clone())
            .unwrap_or_default();
        let name = model_name(body).map_err(|error| (error, None))?;
        let model = model_served(snapshot, route, &name).map_err(|error| (error, None))?;
        // Without API keys every caller is anonymous: each client address gets its own quota
        // rather than all of them sharing one.
        let key = if key == [0; 32] {
            anonymous_key(view.client)
        } else {
            key
        };
        let ctx = Box::new(InferenceCtx {
            model,
            route: decision.route,
            key,
            charge_tokens: settings
                .rate_limit
                .as_ref()
                .is_some_and(|l| l.tokens_per_minute.is_some()),
            started,
            first_byte: None,
            usage: UsageScanner::default(),
        });

        if let Some(limit) = &settings.rate_limit {
            let backend = self.backend(&snapshot.config.limits);
            if let Err((which, retry_after)) = backend
                .get()
                .admit(&route.name, &key, limit, crate::clock::now_ms())
                .await
            {
                if let Some(m) = &self.metrics {
                    m.ratelimited
                        .with_label_values(&[&route.name, which.label()])
                        .inc();
                }
                let mut error = ApiError::new(
                    429,
                    which.label(),
                    "rate_limit_exceeded",
                    format!(
                        "rate limit reached for {} per minute on route {:?}; retry in {retry_after}s",
                        which.label(),
                        route.name
                    ),
                );
                error.retry_after = Some(retry_after);
                return Err((error, Some(ctx)));
            }
        }

        match decide_for_model(
            snapshot,
            view,
            |ip| geoip.lookup(ip),
            crate::clock::now_ms(),
            model,
        ) {
            Ok(decision) => Ok((decision, ctx)),
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

    /// At the end of the request: metrics, and the tokens charged to the caller.
    pub fn finish(
        &self,
        snapshot: &Snapshot,
        region: Option<usize>,
        status: u16,
        ctx: &InferenceCtx,
    ) {
        let usage = ctx.usage.usage();
        let route_name = snapshot.routes.get(ctx.route).map(|r| r.name.as_str());
        if let (Some(usage), Some(route), true) = (usage, route_name, ctx.charge_tokens) {
            self.backend(&snapshot.config.limits).get().charge(
                route,
                &ctx.key,
                usage.total(),
                crate::clock::now_ms(),
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_callers_are_limited_per_address() {
        let a = anonymous_key("127.1.0.1".parse().expect("ip"));
        let b = anonymous_key("127.1.0.2".parse().expect("ip"));
        assert_ne!(a, b);
        assert_ne!(a, [0; 32]);
        assert_eq!(a, anonymous_key("127.1.0.1".parse().expect("ip")));
    }
}
