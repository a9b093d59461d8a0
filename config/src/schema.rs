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
    /// Points of presence that GeoDNS steers end users to.
    #[serde(default)]
    pub pops: Vec<Pop>,
    /// The authoritative GeoDNS server; absent: no DNS listener.
    #[serde(default)]
    pub dns: Option<DnsSection>,
    /// Follow a config service instead of (only) the local file. Process-level: read from the file
    /// an edge boots with; the same section in a pushed document is ignored by running edges.
    #[serde(default)]
    pub control: Option<Control>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// Base URL of the config service, e.g. `http://127.0.0.1:7070`.
    pub url: String,
    /// Bearer token file (reads need none today; kept for services that require it).
    #[serde(default)]
    pub token_file: Option<String>,
    /// Where the last good version is kept, so the edge can start while the service is down.
    pub cache_dir: String,
    /// Long-poll wait per request to the service.
    #[serde(default = "default_control_wait")]
    pub wait: HumanDuration,
}

fn default_control_wait() -> HumanDuration {
    HumanDuration::secs(30)
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

/// A point of presence: an edge that end users reach, answered by GeoDNS.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pop {
    pub name: String,
    pub location: GeoPoint,
    /// IPv4 and IPv6 addresses GeoDNS hands out for this PoP (A and AAAA records).
    pub addresses: Vec<String>,
    /// `http://host:port/healthz`: probed by GeoDNS; absent: the PoP is always considered healthy.
    #[serde(default)]
    pub health: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// UDP and TCP listener (same address for both).
    #[serde(default = "default_dns_listen")]
    pub listen: String,
    /// The zone this server is authoritative for, e.g. `example.test`.
    pub zone: String,
    /// TTL of steered answers, seconds.
    #[serde(default = "default_dns_ttl")]
    pub ttl: u32,
    #[serde(default)]
    pub soa: Soa,
    /// Name servers of the zone (NS at the apex). Empty: `ns1.<zone>`.
    #[serde(default)]
    pub ns: Vec<String>,
    /// How many PoPs one answer carries (the N nearest healthy ones).
    #[serde(default = "default_dns_answers")]
    pub answers: usize,
    /// PoPs answered when the client's location is unknown. Empty: the first PoPs in document order.
    #[serde(default)]
    pub default_pops: Vec<String>,
    /// Names in the zone steered to PoPs.
    #[serde(default)]
    pub records: Vec<DnsRecord>,
    #[serde(default)]
    pub health: DnsHealth,
    #[serde(default)]
    pub limits: DnsLimits,
}

fn default_dns_listen() -> String {
    "127.0.0.1:5353".into()
}

fn default_dns_ttl() -> u32 {
    30
}

fn default_dns_answers() -> usize {
    1
}

/// A steered name: `api` (relative to the zone), `@` for the apex.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRecord {
    pub name: String,
    /// PoPs this name may be answered with. Empty: every PoP.
    #[serde(default)]
    pub pops: Vec<String>,
    /// Bias by PoP name: a weight of 2 makes a PoP look half as far away (default 1).
    #[serde(default)]
    pub weights: std::collections::BTreeMap<String, u32>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Soa {
    /// Primary name server. Empty: the first NS.
    pub mname: String,
    /// Responsible mailbox as a name. Empty: `hostmaster.<zone>`.
    pub rname: String,
    pub serial: u32,
    pub refresh: u32,
    pub retry: u32,
    pub expire: u32,
    /// Negative-caching TTL (RFC 2308), seconds.
    pub minimum: u32,
}

impl Default for Soa {
    fn default() -> Self {
        Self {
            mname: String::new(),
            rname: String::new(),
            serial: 1,
            refresh: 3600,
            retry: 600,
            expire: 86400,
            minimum: 60,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsHealth {
    /// Time between two probes of a PoP's health URL.
    pub interval: HumanDuration,
    /// One probe's deadline (connect + response head).
    pub timeout: HumanDuration,
}

impl Default for DnsHealth {
    fn default() -> Self {
        Self {
            interval: HumanDuration::secs(2),
            timeout: HumanDuration::secs(1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsLimits {
    /// Largest UDP response we send to an EDNS client (RFC 9715 suggests 1232).
    pub max_udp_payload: u16,
    /// Concurrent TCP connections; more wait in the kernel backlog.
    pub max_tcp_connections: usize,
    /// A TCP connection with no complete query for this long is closed.
    pub tcp_idle_timeout: HumanDuration,
}

impl Default for DnsLimits {
    fn default() -> Self {
        Self {
            max_udp_payload: 1232,
            max_tcp_connections: 256,
            tcp_idle_timeout: HumanDuration::secs(10),
        }
    }
}
