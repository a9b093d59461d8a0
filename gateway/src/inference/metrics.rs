//! Inference metrics, registered into the edge's own registry.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub struct InferenceMetrics {
    /// `meridian_inference_requests_total{model,region,status_class}`
    pub requests: IntCounterVec,
    /// `meridian_inference_tokens_total{model,region,kind="prompt|completion"}`
    pub tokens: IntCounterVec,
    /// `meridian_inference_time_to_first_byte_seconds{model,region}`
    pub ttfb: HistogramVec,
    /// `meridian_ratelimited_total{route,limit}`
    pub ratelimited: IntCounterVec,
    /// `meridian_inference_picks_total{route,region,reason}`
    pub picks: IntCounterVec,
    /// `meridian_inference_shed_total{route,criticality,reason}`
    pub shed: IntCounterVec,
}

impl InferenceMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "meridian_inference_requests_total",
                "Inference requests by model, serving region (none: answered by the edge) and status class.",
            ),
            &["model", "region", "status_class"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "meridian_inference_tokens_total",
                "Tokens reported in response usage, by model, region and kind (prompt, completion).",
            ),
            &["model", "region", "kind"],
        )?;
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "meridian_inference_time_to_first_byte_seconds",
                "Time from request start to the first response body byte from the model server.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["model", "region"],
        )?;
        let ratelimited = IntCounterVec::new(
            Opts::new(
                "meridian_ratelimited_total",
                "Requests refused with 429 by the edge's per-key limits, by route and limit (requests, tokens).",
            ),
            &["route", "limit"],
        )?;
        let picks = IntCounterVec::new(
            Opts::new(
                "meridian_inference_picks_total",
                "Model server picks for model calls by route, region and reason (score, affinity, spill, fallback, least_outstanding).",
            ),
            &["route", "region", "reason"],
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "meridian_inference_shed_total",
                "Model calls refused because model servers are saturated, by route, criticality and reason (saturated, residency).",
            ),
            &["route", "criticality", "reason"],
        )?;
        registry.register(Box::new(picks.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(ttfb.clone()))?;
        registry.register(Box::new(ratelimited.clone()))?;
        Ok(Self {
            requests,
            tokens,
            ttfb,
            ratelimited,
            picks,
            shed,
        })
    }
}
