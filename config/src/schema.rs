//! The typed shape of a Meridian config document. Every struct denies unknown fields so that a typo
//! is an error, not a silently ignored setting. Every limit has an explicit, safe default.

use serde::{Deserialize, Serialize};

use crate::HumanDuration;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub schema: u32,
    #[serde(default)]
    pub edge: Edge,
    #[serde(default)]
    pub geoip: GeoIpSection,
    #[serde(default)]
    pub regions: Vec<Region>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub residency: Vec<Residency>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Edge {
    /// Name of this point of presence, returned in `x-meridian-pop`.
    pub pop: String,
    /// Plain-text listener (HTTP/1.1 and h2c).
    pub http: String,
    /// Admin listener (`/metrics`, `/healthz`, `/admin/snapshot`); must be a loopback address.
    pub admin: String,
    /// Worker threads for the proxy service.
    pub threads: usize,
    pub limits: Limits,
    /// How long a stopping edge keeps accepting, then how long in-flight requests get to finish.
    pub shutdown_grace: HumanDuration,
    pub shutdown_timeout: HumanDuration,
}

impl Default for Edge {
    fn default() -> Self {
        Self {
            pop: "edge-1".into(),
            http: "127.0.0.1:8080".into(),
            admin: "127.0.0.1:9901".into(),
            threads: 2,
            limits: Limits::default(),
            shutdown_grace: HumanDuration::secs(1),
            shutdown_timeout: HumanDuration::secs(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Total bytes of request header names and values; more is answered `431`.
    pub max_header_bytes: usize,
    /// Number of request headers; more is answered `431`.
    pub max_headers: usize,
    /// Request body bytes; more is answered `413`.
    pub max_body_bytes: u64,
    /// How long a client may take to send its request headers (and idle between keep-alive requests).
    pub client_header_timeout: HumanDuration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 10 * 1024 * 1024,
            client_header_timeout: HumanDuration::secs(60),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoIpSection {
    /// MaxMind-format database (GeoLite2-City or -Country). Without one every client is "unknown".
    pub database: Option<String>,
    /// CIDRs of proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GeoPoint {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    pub location: GeoPoint,
    pub upstreams: Vec<Upstream>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `ip:port` of an origin server in this region.
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    Api,
    Inference,
    Static,
}

/// The regions a route may use: every region (`"*"`) or a list of names.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RegionSet {
    /// Must be the string `"*"` (checked by `validate()`).
    All(String),
    List(Vec<String>),
}

impl Default for RegionSet {
    fn default() -> Self {
        RegionSet::All("*".into())
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    /// Exact host names, or `*.example.test` for any subdomain (not the apex itself).
    pub hosts: Vec<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    #[serde(default = "default_kind")]
    pub kind: RouteKind,
    #[serde(default)]
    pub regions: RegionSet,
    /// Region for clients whose location is unknown. Defaults to the first eligible region.
    #[serde(default)]
    pub default_region: Option<String>,
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    #[serde(default)]
    pub retry: RetryPolicy,
}

fn default_path_prefix() -> String {
    "/".into()
}

fn default_kind() -> RouteKind {
    RouteKind::Api
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteTimeouts {
    /// TCP connect to one upstream.
    pub connect: HumanDuration,
    /// Longest wait for the next bytes from an upstream (headers or body).
    pub read: HumanDuration,
    /// Longest wait for an upstream to accept bytes we send.
    pub write: HumanDuration,
}

impl Default for RouteTimeouts {
    fn default() -> Self {
        Self {
            connect: HumanDuration::secs(2),
            read: HumanDuration::secs(30),
            write: HumanDuration::secs(30),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Total tries per request (1 = no retry). A connect failure moves to the next upstream or region.
    pub attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 3 }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Residency {
    /// ISO 3166-1 alpha-2 codes of the countries this rule covers.
    pub countries: Vec<String>,
    /// Regions that may serve these countries.
    pub regions: Vec<String>,
    /// `true`: never serve from elsewhere (503 when none is usable). `false`: prefer these regions.
    #[serde(default = "default_strict")]
    pub strict: bool,
}

fn default_strict() -> bool {
    true
}
