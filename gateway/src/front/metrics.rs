//! Counters of the TCP front: open client connections, connections refused at the cap, and
//! connections closed by a time bound.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use super::Timeout;

pub struct FrontMetrics {
    /// `meridian_client_connections{listener}`: client TCP connections open now.
    pub open: IntGaugeVec,
    /// `meridian_client_connections_refused_total{listener}`: closed at accept (max_connections).
    pub refused: IntCounterVec,
    /// `meridian_client_timeouts_total{kind}`: connections or requests ended by a time bound.
    timeouts: IntCounterVec,
}

impl FrontMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let open = IntGaugeVec::new(
            Opts::new(
                "meridian_client_connections",
                "Client TCP connections open now, by listener (http, https).",
            ),
            &["listener"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "meridian_client_connections_refused_total",
                "Client connections closed at accept because the listener was at edge.limits.max_connections.",
            ),
            &["listener"],
        )?;
        let timeouts = IntCounterVec::new(
            Opts::new(
                "meridian_client_timeouts_total",
                "Client connections ended by a time bound: header (head not complete in time), keepalive (idle), h2_idle.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(timeouts.clone()))?;
        for listener in ["http", "https"] {
            open.with_label_values(&[listener]);
            refused.with_label_values(&[listener]);
        }
        for kind in Timeout::ALL {
            timeouts.with_label_values(&[kind.label()]);
        }
        Ok(Self {
            open,
            refused,
            timeouts,
        })
    }

    pub fn timeout(&self, kind: Timeout) {
        self.timeouts.with_label_values(&[kind.label()]).inc();
    }
}
