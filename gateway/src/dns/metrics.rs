//! GeoDNS metrics, registered into the edge's explicit registry (never the global default).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

pub struct DnsMetrics {
    pub queries: IntCounterVec,
    pub answers: IntCounterVec,
    pub duration: Histogram,
    pub pop_healthy: IntGaugeVec,
    pub fail_open: IntCounter,
    pub reloads: IntCounterVec,
    pub rrl: IntCounterVec,
    pub tcp_refused: IntCounter,
}

impl DnsMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let queries = IntCounterVec::new(
            Opts::new(
                "meridian_dns_queries_total",
                "DNS queries answered (or dropped), by query type, response code and transport.",
            ),
            &["qtype", "rcode", "transport"],
        )?;
        let answers = IntCounterVec::new(
            Opts::new(
                "meridian_dns_answers_total",
                "Steered DNS answers that carried this PoP's addresses.",
            ),
            &["pop"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "meridian_dns_request_duration_seconds",
                "Time to turn one DNS query into its answer (parse, steer, serialize).",
            )
            .buckets(vec![
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005,
                0.01, 0.05,
            ]),
        )?;
        let pop_healthy = IntGaugeVec::new(
            Opts::new(
                "meridian_pop_healthy",
                "1 while the PoP is in answers: its probes passed (healthy_after in a row to come back, unhealthy_after failures to leave), or it has no health URL.",
            ),
            &["pop"],
        )?;
        let fail_open = IntCounter::new(
            "meridian_dns_fail_open_total",
            "Steered answers given while every candidate PoP was down (all of them were answered).",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "meridian_dns_zone_reloads_total",
                "Zone rebuilds after a config change, by result (ok, error).",
            ),
            &["result"],
        )?;
        let rrl = IntCounterVec::new(
            Opts::new(
                "meridian_dns_rrl_total",
                "UDP answers held back by response rate limiting, by action (slipped: sent empty with TC; dropped).",
            ),
            &["action"],
        )?;
        let tcp_refused = IntCounter::new(
            "meridian_dns_tcp_refused_total",
            "TCP connections closed at once because their client address held dns.limits.max_tcp_per_address already.",
        )?;
        registry.register(Box::new(tcp_refused.clone()))?;
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(rrl.clone()))?;
        registry.register(Box::new(answers.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(pop_healthy.clone()))?;
        registry.register(Box::new(fail_open.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        // Both results exist from the start, so `increase(...{result="error"}[..])` alerts work.
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        for action in ["slipped", "dropped"] {
            rrl.with_label_values(&[action]);
        }
        Ok(Self {
            tcp_refused,
            rrl,
            queries,
            answers,
            duration,
            pop_healthy,
            fail_open,
            reloads,
        })
    }
}
