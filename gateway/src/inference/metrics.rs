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
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(ttfb.clone()))?;
        registry.register(Box::new(ratelimited.clone()))?;
        Ok(Self {
            requests,
            tokens,
            ttfb,
            ratelimited,
        })
    }
}
