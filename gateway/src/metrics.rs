//! Edge metrics, registered into an explicit registry (never the global default). Label values are
//! resolved when a snapshot is compiled, so the request path only bumps pre-resolved counters.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::core::Snapshot;

pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// The client-side protocol of a request (the `protocol` label of `meridian_requests_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x, cleartext or TLS.
    H1 = 0,
    /// HTTP/2, h2c or TLS (ALPN `h2`).
    H2 = 1,
    /// HTTP/3 over QUIC.
    H3 = 2,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::H1, Protocol::H2, Protocol::H3];

    pub fn label(self) -> &'static str {
        match self {
            Protocol::H1 => "h1",
            Protocol::H2 => "h2",
            Protocol::H3 => "h3",
        }
    }
}

/// Region label for requests answered before any region was chosen (refusals, bad requests).
pub const NO_REGION: &str = "none";
/// Route label for requests no route claimed.
pub const NO_ROUTE: &str = "none";

pub struct EdgeMetrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    pub upstream_attempts: IntCounterVec,
    pub config: ConfigMetrics,
    pub health: HealthMetrics,
    pub tls: TlsMetrics,
    pub front: crate::front::FrontMetrics,
}

/// TLS and QUIC termination.
pub struct TlsMetrics {
    /// `meridian_tls_handshakes_total{version,alpn}`: completed handshakes, TCP and QUIC.
    pub handshakes: IntCounterVec,
    /// `meridian_quic_connections`: QUIC connections open now.
    pub quic_connections: IntGauge,
    /// `meridian_tls_certificate_reloads_total{result}`: certificate table rebuilds (ok, error).
    pub reloads: IntCounterVec,
    /// `meridian_tls_certificate_expiry_timestamp_seconds{certificate}`: leaf notAfter of each
    /// certificate serving now, labelled by the first host of its `[[tls.certificates]]` entry.
    pub certificate_expiry: GaugeVec,
}

impl TlsMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let handshakes = IntCounterVec::new(
            Opts::new(
                "meridian_tls_handshakes_total",
                "Completed TLS handshakes (TCP and QUIC), by protocol version and negotiated ALPN.",
            ),
            &["version", "alpn"],
        )?;
        let quic_connections = IntGauge::new(
            "meridian_quic_connections",
            "QUIC (HTTP/3) connections open now.",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "meridian_tls_certificate_reloads_total",
                "Rebuilds of the SNI certificate table by result (ok, error: the old table stays).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(quic_connections.clone()))?;
        let certificate_expiry = GaugeVec::new(
            Opts::new(
                "meridian_tls_certificate_expiry_timestamp_seconds",
                "Unix time at which each serving certificate (by the first host of its entry) expires.",
            ),
            &["certificate"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        Ok(Self {
            handshakes,
            quic_connections,
            reloads,
            certificate_expiry,
        })
    }

    /// Replaces the expiry gauges with the certificates of the table about to serve.
    pub fn record_certificates(&self, expiries: &[(String, std::time::SystemTime)]) {
        self.certificate_expiry.reset();
        for (certificate, not_after) in expiries {
            let secs = not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.certificate_expiry
                .with_label_values(&[certificate])
                .set(secs);
        }
    }
}

/// Region and upstream health, retries and failovers.
pub struct HealthMetrics {
    pub upstream_healthy: IntGaugeVec,
    pub region_healthy: IntGaugeVec,
    pub region_inflight: IntGaugeVec,
    pub retries: IntCounterVec,
    pub failovers: IntCounterVec,
    pub ejections: IntCounterVec,
    /// Picks made while a region was in outlier panic (ejections ignored).
    pub panic: IntCounterVec,
}

impl HealthMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let upstream_healthy = IntGaugeVec::new(
            Opts::new(
                "meridian_upstream_healthy",
                "1 when the upstream takes traffic (passes health checks, not ejected, not drained).",
            ),
            &["region", "upstream"],
        )?;
        let region_healthy = IntGaugeVec::new(
            Opts::new(
                "meridian_region_healthy",
                "1 when the region takes traffic (at least min_healthy upstreams available, not drained).",
            ),
            &["region"],
        )?;
        let region_inflight = IntGaugeVec::new(
            Opts::new(
                "meridian_region_inflight",
                "Requests in flight to the region's upstreams.",
            ),
            &["region"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "meridian_retries_total",
                "Tries after the first, by route and reason (connect_error, timeout, status).",
            ),
            &["route", "reason"],
        )?;
        let failovers = IntCounterVec::new(
            Opts::new(
                "meridian_failovers_total",
                "Requests served by another region than the preferred one, by route, from, to and reason.",
            ),
            &["route", "from", "to", "reason"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "meridian_upstream_ejections_total",
                "Upstreams ejected by passive outlier detection, by region.",
            ),
            &["region"],
        )?;
        registry.register(Box::new(upstream_healthy.clone()))?;
        registry.register(Box::new(region_healthy.clone()))?;
        registry.register(Box::new(region_inflight.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        let panic = IntCounterVec::new(
            Opts::new(
                "meridian_upstream_panic_total",
                "Upstream picks made while the region was below its outlier panic threshold (ejections ignored), by region.",
            ),
            &["region"],
        )?;
        registry.register(Box::new(panic.clone()))?;
        Ok(Self {
            upstream_healthy,
            region_healthy,
            region_inflight,
            retries,
            failovers,
            ejections,
            panic,
        })
    }

    /// Samples health and in-flight state into the gauges (called at scrape time, off the
    /// request path, so requests never touch these gauges).
    pub fn refresh(&self, snapshot: &Snapshot, now_ms: u64) {
        self.upstream_healthy.reset();
        self.region_healthy.reset();
        self.region_inflight.reset();
        for region in &snapshot.regions {
            for upstream in &region.upstreams {
                let address = upstream.address.to_string();
                self.upstream_healthy
                    .with_label_values(&[&region.name, &address])
                    .set(i64::from(upstream.is_available(now_ms)));
            }
            let verdict = crate::core::select::region_verdict(region, now_ms);
            let healthy = matches!(
                verdict,
                crate::core::select::RegionVerdict::Available
                    | crate::core::select::RegionVerdict::Full
            );
            self.region_healthy
                .with_label_values(&[&region.name])
                .set(i64::from(healthy));
            self.region_inflight
                .with_label_values(&[&region.name])
                .set(i64::from(region.state.inflight()));
            // Exported at 0 from the start: an alert on panic routing needs the series to exist.
            let _ = self.panic.with_label_values(&[&region.name]);
        }
    }
}

/// How this edge follows its configuration.
pub struct ConfigMetrics {
    pub version: IntGauge,
    pub reloads: IntCounterVec,
    pub last_reload: Gauge,
    pub fetch_errors: IntCounter,
}

impl ConfigMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let version = IntGauge::new(
            "meridian_config_version",
            "Config version this edge serves (0: a local file).",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "meridian_config_reloads_total",
                "Config reload attempts by result (ok, invalid, error).",
            ),
            &["result"],
        )?;
        let last_reload = Gauge::new(
            "meridian_config_last_reload_timestamp_seconds",
            "Unix time of the last successful config install.",
        )?;
        let fetch_errors = IntCounter::new(
            "meridian_config_fetch_errors_total",
            "Failed requests to the config service.",
        )?;
        registry.register(Box::new(version.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(last_reload.clone()))?;
        registry.register(Box::new(fetch_errors.clone()))?;
        for result in ["ok", "invalid", "error"] {
            reloads.with_label_values(&[result]);
        }
        Ok(Self {
            version,
            reloads,
            last_reload,
            fetch_errors,
        })
    }

    /// Records a successful install of `version`.
    pub fn installed(&self, version: u64) {
        self.version.set(i64::try_from(version).unwrap_or(i64::MAX));
        self.reloads.with_label_values(&["ok"]).inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_reload.set(now);
    }
}

impl EdgeMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "meridian_requests_total",
                "Requests answered by the edge, by route, serving region, status class and client protocol.",
            ),
            &["route", "region", "status_class", "protocol"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "meridian_request_duration_seconds",
                "Time from request start to the end of the response, by route and serving region.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["route", "region"],
        )?;
        let upstream_attempts = IntCounterVec::new(
            Opts::new(
                "meridian_upstream_attempts_total",
                "Connection attempts to upstreams, by region and result (ok, connect_error).",
            ),
            &["region", "result"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "meridian_build_info",
                "Always 1; the version label says which build runs.",
            ),
            &["version"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(upstream_attempts.clone()))?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let config = ConfigMetrics::new(&registry)?;
        let health = HealthMetrics::new(&registry)?;
        let tls = TlsMetrics::new(&registry)?;
        let front = crate::front::FrontMetrics::new(&registry)?;
        Ok(Self {
            front,
            config,
            health,
            tls,
            registry,
            requests,
            duration,
            upstream_attempts,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!("metrics encoding failed: {e}");
        }
        out
    }

    fn series(&self, route: &str, region: &str) -> RequestSeries {
        RequestSeries {
            by_class: Protocol::ALL.map(|protocol| {
                STATUS_CLASSES.map(|class| {
                    self.requests
                        .with_label_values(&[route, region, class, protocol.label()])
                })
            }),
            duration: self.duration.with_label_values(&[route, region]),
        }
    }

    /// Resolves every (route, region) series a snapshot can produce.
    pub fn compile(&self, snapshot: &Snapshot) -> SnapshotMetrics {
        let routes = snapshot
            .routes
            .iter()
            .map(|route| RouteSeries {
                by_region: snapshot
                    .regions
                    .iter()
                    .map(|r| self.series(&route.name, &r.name))
                    .collect(),
                no_region: self.series(&route.name, NO_REGION),
            })
            .collect();
        let attempts = snapshot
            .regions
            .iter()
            .map(|r| AttemptSeries {
                ok: self.upstream_attempts.with_label_values(&[&r.name, "ok"]),
                connect_error: self
                    .upstream_attempts
                    .with_label_values(&[&r.name, "connect_error"]),
            })
            .collect();
        SnapshotMetrics {
            routes,
            unmatched: self.series(NO_ROUTE, NO_REGION),
            attempts,
        }
    }
}

/// The counters one request touches, already labelled.
pub struct RequestSeries {
    /// Indexed by `Protocol as usize`, then status class.
    by_class: [[IntCounter; 6]; 3],
    duration: Histogram,
}

impl RequestSeries {
    pub fn observe(&self, protocol: Protocol, status: u16, seconds: f64) {
        let class = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => 5,
        };
        self.by_class[protocol as usize][class].inc();
        self.duration.observe(seconds);
    }
}

pub struct RouteSeries {
    by_region: Vec<RequestSeries>,
    no_region: RequestSeries,
}

pub struct AttemptSeries {
    pub ok: IntCounter,
    pub connect_error: IntCounter,
}

/// Pre-resolved series for one snapshot, indexed like the snapshot's routes and regions.
pub struct SnapshotMetrics {
    routes: Vec<RouteSeries>,
    unmatched: RequestSeries,
    pub attempts: Vec<AttemptSeries>,
}

impl SnapshotMetrics {
    pub fn request(&self, route: Option<usize>, region: Option<usize>) -> &RequestSeries {
        let Some(series) = route.and_then(|r| self.routes.get(r)) else {
            return &self.unmatched;
        };
        region
            .and_then(|r| series.by_region.get(r))
            .unwrap_or(&series.no_region)
    }
}
