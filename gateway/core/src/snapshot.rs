//! Compiling a validated [`Config`] into an immutable [`Snapshot`]: everything the request path needs,
//! pre-resolved (indices instead of names, parsed addresses, host tables), so a request does lookups only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;
use meridian_config::{Config, Limits, RegionSet, RouteKind, ValidationError};
use meridian_geoip::CountryCode;

use super::route_match::HostTable;
pub use super::state::InflightGuard;
use super::state::{OutlierSpec, RegionState, UpstreamState};

/// Where a snapshot came from: a config-service version (0 for a local file) and the document hash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub version: u64,
    pub hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("config is invalid: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<ValidationError>),
    #[error("{path}: {message}")]
    Unusable { path: String, message: String },
}

pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub pop: String,
    /// `pop` ready to put in `x-meridian-pop` (cloning a `HeaderValue` does not allocate).
    pub pop_header: HeaderValue,
    pub regions: Vec<CompiledRegion>,
    pub routes: Vec<CompiledRoute>,
    pub hosts: HostTable,
    pub residency: HashMap<CountryCode, ResidencyRule>,
    pub trusted_proxies: Vec<IpNet>,
    pub limits: Limits,
    /// Inference models and the regions serving them.
    pub models: super::models::ModelTable,
    /// Share of requests written to the access log, in [0, 1]: 0 when `[edge.access_log]` is off.
    pub access_log_sample: f64,
    /// The document this snapshot was compiled from (for `/admin/snapshot` and diffs).
    pub config: Config,
}

pub struct CompiledRegion {
    pub name: String,
    /// `name` ready to put in `x-meridian-region`.
    pub header: HeaderValue,
    /// (latitude, longitude) in degrees.
    pub location: (f64, f64),
    pub upstreams: Vec<CompiledUpstream>,
    /// Runtime state shared with earlier and later snapshots (survives reloads).
    pub state: Arc<RegionState>,
    pub min_healthy: u32,
    pub max_inflight: Option<u32>,
    pub drain: bool,
    pub health: meridian_config::HealthCheck,
    pub outlier: OutlierSpec,
}

pub struct CompiledUpstream {
    pub address: SocketAddr,
    pub weight: u32,
    pub drain: bool,
    /// Runtime state shared with earlier and later snapshots (survives reloads).
    pub state: Arc<UpstreamState>,
}

impl CompiledUpstream {
    /// Takes new requests now: weighted, not drained, healthy and not ejected.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.weight > 0 && !self.drain && self.state.is_available(now_ms)
    }
}

pub struct CompiledRoute {
    pub name: String,
    pub kind: RouteKind,
    pub path_prefix: String,
    /// Indices into `Snapshot::regions`.
    pub eligible: Vec<u16>,
    pub default_region: u16,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub total_timeout: Duration,
    pub retry_attempts: u32,
    pub retry_on_status: Vec<u16>,
    pub retry_non_idempotent: bool,
    pub retry_budget_percent: u32,
    pub retry_budget_min: u32,
}

pub struct ResidencyRule {
    /// Indexed by region index: may this region serve the country?
    pub allowed: Vec<bool>,
    pub strict: bool,
}

/// Hands out the runtime state of each (region, upstream) so that a recompiled snapshot shares it
/// with the one it replaces. Only touched at compile time, never on the request path.
#[derive(Default)]
pub struct UpstreamStates {
    states: Mutex<HashMap<(String, SocketAddr), Arc<UpstreamState>>>,
    regions: Mutex<HashMap<String, Arc<RegionState>>>,
}

impl UpstreamStates {
    fn region(&self, name: &str) -> Arc<RegionState> {
        let mut regions = self
            .regions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Arc::clone(regions.entry(name.to_string()).or_default())
    }

    fn retain_regions(&self, keep: &[&str]) {
        let mut regions = self
            .regions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        regions.retain(|name, _| keep.contains(&name.as_str()));
    }

    fn get(&self, region: &str, address: SocketAddr) -> Arc<UpstreamState> {
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Arc::clone(states.entry((region.to_string(), address)).or_default())
    }

    /// Forgets upstreams no longer in the config (their in-flight guards keep their own `Arc`).
    fn retain(&self, keep: &[(String, SocketAddr)]) {
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        states.retain(|key, _| keep.contains(key));
    }
}

impl Snapshot {
    /// Validates and compiles. Nothing here touches the network or the clock.
    pub fn compile(
        config: Config,
        meta: SnapshotMeta,
        states: &UpstreamStates,
    ) -> Result<Self, CompileError> {
        config.validate().map_err(CompileError::Invalid)?;

        let mut keep = Vec::new();
        let regions: Vec<CompiledRegion> = config
            .regions
            .iter()
            .map(|region| {
                let upstreams = region
                    .upstreams
                    .iter()
                    .filter_map(|u| {
                        let address: SocketAddr = u.address.parse().ok()?;
                        keep.push((region.name.clone(), address));
                        Some(CompiledUpstream {
                            address,
                            weight: u.weight,
                            drain: u.drain,
                            state: states.get(&region.name, address),
                        })
                    })
                    .collect();
                CompiledRegion {
                    header: header_value(&region.name),
                    name: region.name.clone(),
                    location: (region.location.lat, region.location.lon),
                    upstreams,
                    state: states.region(&region.name),
                    min_healthy: region.min_healthy,
                    max_inflight: region.max_inflight,
                    drain: region.drain,
                    health: region.health.clone(),
                    outlier: OutlierSpec {
                        consecutive_failures: region.outlier.consecutive_failures,
                        base_ejection_ms: millis(region.outlier.base_ejection.as_duration()),
                        max_ejection_ms: millis(region.outlier.max_ejection.as_duration()),
                        max_ejection_percent: region.outlier.max_ejection_percent,
                        panic_threshold: region.outlier.panic_threshold,
                    },
                }
            })
            .collect();
        states.retain(&keep);
        let names: Vec<&str> = config.regions.iter().map(|r| r.name.as_str()).collect();
        states.retain_regions(&names);
        if regions.len() > usize::from(u16::MAX) {
            return Err(CompileError::Unusable {
                path: "regions".into(),
                message: "too many regions".into(),
            });
        }
        let index_of = |name: &str| {
            regions
                .iter()
                .position(|r| r.name == name)
                .map(|i| i as u16)
        };

        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, route) in config.routes.iter().enumerate() {
            let eligible: Vec<u16> = match &route.regions {
                RegionSet::All(_) => (0..regions.len() as u16).collect(),
                RegionSet::List(names) => names.iter().filter_map(|n| index_of(n)).collect(),
            };
            let default_region = match &route.default_region {
                Some(name) => index_of(name),
                None => eligible.first().copied(),
            }
            .ok_or_else(|| CompileError::Unusable {
                path: format!("routes[{i}].regions"),
                message: "route has no usable region".into(),
            })?;
            routes.push(CompiledRoute {
                name: route.name.clone(),
                kind: route.kind,
                path_prefix: route.path_prefix.clone(),
                eligible,
                default_region,
                connect_timeout: route.timeouts.connect.as_duration(),
                read_timeout: route.timeouts.read.as_duration(),
                write_timeout: route.timeouts.write.as_duration(),
                total_timeout: route.timeouts.total.as_duration(),
                retry_attempts: route.retry.attempts,
                retry_on_status: route.retry.on_status.clone(),
                retry_non_idempotent: route.retry.non_idempotent,
                retry_budget_percent: route.retry.budget_percent,
                retry_budget_min: route.retry.budget_min_per_window,
            });
        }

        let hosts = HostTable::build(&config.routes);

        let mut residency = HashMap::new();
        for rule in &config.residency {
            let mut allowed = vec![false; regions.len()];
            for name in &rule.regions {
                if let Some(i) = index_of(name) {
                    allowed[usize::from(i)] = true;
                }
            }
            for country in &rule.countries {
                if let Some(code) = CountryCode::parse(country) {
                    residency.insert(
                        code,
                        ResidencyRule {
                            allowed: allowed.clone(),
                            strict: rule.strict,
                        },
                    );
                }
            }
        }

        let trusted_proxies = config
            .geoip
            .trusted_proxies
            .iter()
            .filter_map(|c| meridian_config::parse_cidr(c))
            .collect();

        Ok(Snapshot {
            meta,
            pop_header: header_value(&config.edge.pop),
            pop: config.edge.pop.clone(),
            regions,
            routes,
            hosts,
            residency,
            trusted_proxies,
            limits: config.edge.limits.clone(),
            models: super::models::ModelTable::compile(&config),
            access_log_sample: if config.edge.access_log.enabled {
                config.edge.access_log.sample.clamp(0.0, 1.0)
            } else {
                0.0
            },
            config,
        })
    }

    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions.iter().position(|r| r.name == name)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Names are validated to `[a-z0-9_-]`, always a valid header value.
fn header_value(name: &str) -> HeaderValue {
    HeaderValue::from_str(name).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
