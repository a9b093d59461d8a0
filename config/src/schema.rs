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
    /// Certificates for the HTTPS (and HTTP/3) listener, chosen by SNI.
    #[serde(default, skip_serializing_if = "TlsSection::is_empty")]
    pub tls: TlsSection,
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
    /// Inference: model aliases shared by every inference route.
    #[serde(
        default,
        skip_serializing_if = "crate::inference::InferenceSection::is_empty"
    )]
    pub inference: crate::inference::InferenceSection,
    /// Inference: API keys, stored as the hex sha256 of the bearer token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<crate::inference::ApiKey>,
    /// Where rate-limit counters live: this edge (default) or Redis, shared by the fleet.
    #[serde(default, skip_serializing_if = "LimitsSection::is_default")]
    pub limits: LimitsSection,
}

/// `[limits]`: the backend of the inference routes' `rate_limit`s.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub backend: LimitsBackend,
    /// Redis servers (`redis://host:port`); keys are spread over them by hash.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redis: Vec<String>,
    /// What a request gets while Redis cannot be asked.
    pub on_backend_error: OnBackendError,
    /// Requests an edge takes from a key's shared budget per Redis round trip; 0 picks 1 % of
    /// the limit (at least 1). 1 is a round trip per request.
    #[serde(skip_serializing_if = "is_zero")]
    pub lease: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl LimitsSection {
    pub fn is_default(&self) -> bool {
        *self == LimitsSection::default()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    /// Counters per edge: a key gets its quota at every edge.
    #[default]
    Local,
    /// Counters in Redis: a key's quota holds across every edge using the same servers.
    Redis,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendError {
    /// Admit (and count it): an outage of Redis does not become an outage of the API.
    #[default]
    Allow,
    /// Refuse with 429: the quota is never exceeded, at the price of availability.
    Deny,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// Base URL of the config service, e.g. `http://127.0.0.1:7070` or `https://…`. Empty when
    /// the edge follows etcd directly (`etcd`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// Bearer token file: the config service's read token (it guards `/v1/config`).
    #[serde(default)]
    pub token_file: Option<String>,
    /// Where the last good version is kept, so the edge can start while the service is down.
    pub cache_dir: String,
    /// Long-poll wait per request to the service.
    #[serde(default = "default_control_wait")]
    pub wait: HumanDuration,
    /// Follow the versions on this etcd cluster directly (client URLs) instead of a config
    /// server; exclusive with `url`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<String>,
    /// Key prefix of the versions on etcd (the config server's `--etcd-prefix`).
    #[serde(default = "default_etcd_prefix")]
    pub etcd_prefix: String,
    /// PEM file of the CA that signed an `https://` config service's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            url: String::new(),
            token_file: None,
            cache_dir: String::new(),
            wait: default_control_wait(),
            etcd: Vec::new(),
            etcd_prefix: default_etcd_prefix(),
            ca_file: None,
        }
    }
}

fn default_etcd_prefix() -> String {
    "/meridian".into()
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
    /// Either `admin = "127.0.0.1:9901"` or a `[edge.admin]` table with `listen` and `token_file`.
    pub admin: AdminListener,
    /// TLS listener (HTTP/1.1 and HTTP/2 by ALPN), e.g. `127.0.0.1:8443`; needs `[[tls.certificates]]`.
    /// Absent: no HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https: Option<String>,
    /// HTTP/3 (QUIC) on UDP at the `https` address, with the same certificates.
    pub h3: bool,
    /// QUIC/HTTP/3 limits (request header and body limits come from `limits`).
    pub h3_limits: H3Limits,
    /// Worker threads for the proxy service.
    pub threads: usize,
    pub limits: Limits,
    /// How long a stopping edge keeps accepting, then how long in-flight requests get to finish.
    pub shutdown_grace: HumanDuration,
    pub shutdown_timeout: HumanDuration,
    /// The response cache shared by every front; routes opt in with `cache.enabled`.
    pub cache: EdgeCache,
    /// `[edge.access_log]`: one JSON line per request, off by default.
    pub access_log: AccessLog,
    /// Also send RFC 7239 `Forwarded` upstream (`X-Forwarded-For`/`-Proto` are always sent).
    pub forwarded: bool,
}

impl Default for Edge {
    fn default() -> Self {
        Self {
            pop: "edge-1".into(),
            http: "127.0.0.1:8080".into(),
            admin: "127.0.0.1:9901".into(),
            https: None,
            h3: false,
            h3_limits: H3Limits::default(),
            threads: 2,
            limits: Limits::default(),
            shutdown_grace: HumanDuration::secs(1),
            shutdown_timeout: HumanDuration::secs(5),
            cache: EdgeCache::default(),
            access_log: AccessLog::default(),
            forwarded: false,
        }
    }
}

/// `[edge.access_log]`: structured access logs through `tracing` (target `meridian::access`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLog {
    /// Off by default: with it off the request path does no access-log work at all.
    pub enabled: bool,
    /// Fraction of requests logged, `0.0..=1.0` (1.0: every request).
    pub sample: f64,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            enabled: false,
            sample: 1.0,
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
    /// Request body bytes; more is answered `413` (a model call is held to its route's
    /// `inference.max_body_bytes` instead).
    pub max_body_bytes: u64,
    /// The request target (path and query); longer is answered `414`.
    pub max_uri_bytes: usize,
    /// Total time a client may take to send a request head, from its first byte (and, for a new
    /// connection, from the accept); slower heads get `408` and the connection is closed.
    pub client_header_timeout: HumanDuration,
    /// A kept-alive connection with no new request for this long is closed.
    pub keepalive_timeout: HumanDuration,
    /// A request body that makes no progress for this long gets `408` (never an upstream failure).
    pub client_body_timeout: HumanDuration,
    /// A response the client does not read for this long is abandoned and the connection closed.
    pub send_timeout: HumanDuration,
    /// Open client connections per TCP listener; beyond it new connections are closed at accept.
    pub max_connections: usize,
    /// Requests served on one HTTP/1.1 connection before the edge closes it.
    pub max_requests_per_connection: u32,
    /// Concurrent streams on one HTTP/2 connection.
    pub h2_max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 10 * 1024 * 1024,
            max_uri_bytes: 8 * 1024,
            client_header_timeout: HumanDuration::secs(10),
            keepalive_timeout: HumanDuration::secs(60),
            client_body_timeout: HumanDuration::secs(30),
            send_timeout: HumanDuration::secs(30),
            max_connections: 20_000,
            max_requests_per_connection: 10_000,
            h2_max_streams: 128,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct H3Limits {
    /// Concurrent request streams one QUIC connection may open.
    pub max_streams: u32,
    /// A QUIC connection with no traffic for this long is closed.
    pub idle_timeout: HumanDuration,
    /// Concurrent QUIC connections; more are refused.
    pub max_connections: usize,
    /// Once this many connections are open, a new client must first prove its address with a
    /// Retry round trip (spoofed Initials then hold no slot); 0: always.
    pub retry_above: usize,
    /// Concurrent connections (handshaking or open) from one client IP address; more are refused.
    pub max_connections_per_address: usize,
    /// A request stream must have sent its headers this long after it opened, or it is reset.
    pub stream_header_timeout: HumanDuration,
    /// Bytes one request stream may have in flight towards the edge (flow-control window).
    pub stream_receive_window: u32,
    /// Bytes one connection may have in flight towards the edge, over all its streams.
    pub connection_receive_window: u32,
}

impl Default for H3Limits {
    fn default() -> Self {
        Self {
            max_streams: 100,
            idle_timeout: HumanDuration::secs(30),
            max_connections: 10_000,
            retry_above: 1_000,
            max_connections_per_address: 64,
            stream_header_timeout: HumanDuration::secs(10),
            stream_receive_window: 256 * 1024,
            connection_receive_window: 4 * 1024 * 1024,
        }
    }
}

/// `[tls]`: certificates served by the HTTPS and HTTP/3 listeners.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Chosen by SNI: exact hosts first, then `*.` wildcards (one label). A handshake whose SNI
    /// matches none is refused unless one certificate says `default = true`.
    pub certificates: Vec<TlsCertificate>,
}

impl TlsSection {
    pub fn is_empty(&self) -> bool {
        self.certificates.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificate {
    /// Exact host names, or `*.example.test` for any one-label subdomain.
    pub hosts: Vec<String>,
    /// PEM certificate chain, leaf first (relative paths: against the config file's directory).
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// Served when the client's SNI matches no certificate (or it sent none). At most one.
    #[serde(default)]
    pub default: bool,
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
    /// Active health checks of every upstream (on by default).
    #[serde(default)]
    pub health: HealthCheck,
    /// Passive outlier detection: upstreams failing in a row are ejected for a growing backoff.
    #[serde(default)]
    pub outlier: OutlierDetection,
    /// The region is healthy while at least this many upstreams are.
    #[serde(default = "default_min_healthy")]
    pub min_healthy: u32,
    /// In-flight request cap; when full, requests overflow to the next-nearest eligible region.
    #[serde(default)]
    pub max_inflight: Option<u32>,
    /// Stop sending new requests here; in-flight ones finish.
    #[serde(default)]
    pub drain: bool,
    /// Inference models served here. Empty: this region serves no model, so inference
    /// requests naming a model never go here (other requests on inference routes still may).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

fn default_min_healthy() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub enabled: bool,
    /// HTTP path probed with GET on each upstream.
    pub path: String,
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    /// Consecutive passing probes before a down upstream is healthy again.
    pub healthy_after: u32,
    /// Consecutive failing probes before a healthy upstream is down.
    pub unhealthy_after: u32,
    pub expect_status: u16,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/healthz".into(),
            interval: HumanDuration::secs(2),
            timeout: HumanDuration::secs(1),
            healthy_after: 2,
            unhealthy_after: 2,
            expect_status: 200,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    /// Consecutive failed requests (connect errors, timeouts, 5xx) that eject an upstream.
    pub consecutive_failures: u32,
    /// First ejection; each repeat doubles it, up to `max_ejection`.
    pub base_ejection: HumanDuration,
    pub max_ejection: HumanDuration,
    /// Most of the region's upstreams ejected at once, in percent; at least one always stays in
    /// (a single-upstream region is never emptied by ejection).
    pub max_ejection_percent: u32,
    /// Below this share (percent) of the region's healthy upstreams left un-ejected, ejections
    /// are ignored and requests spread over every healthy upstream (0: never).
    pub panic_threshold: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: HumanDuration::secs(10),
            max_ejection: HumanDuration::secs(300),
            max_ejection_percent: 50,
            panic_threshold: 50,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `ip:port` of an origin server in this region.
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Stop sending new requests to this upstream; in-flight ones finish.
    #[serde(default)]
    pub drain: bool,
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
    /// Response caching for this route (off unless `enabled = true`).
    #[serde(default)]
    pub cache: RouteCache,
    /// `kind = "inference"` only: body limit and per-API-key rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<crate::inference::RouteInference>,
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
    /// Overall deadline for a request across all tries: no new try starts after it.
    pub total: HumanDuration,
}

impl Default for RouteTimeouts {
    fn default() -> Self {
        Self {
            connect: HumanDuration::secs(2),
            read: HumanDuration::secs(30),
            write: HumanDuration::secs(30),
            total: HumanDuration::secs(60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Total tries per request (1 = no retry): the next upstream in the region, then the next region.
    pub attempts: u32,
    /// Upstream statuses that are retried elsewhere when no byte has reached the client yet.
    pub on_status: Vec<u16>,
    /// Retry non-idempotent methods (POST, PATCH) even after the upstream may have seen them.
    /// Connect failures are always retried: the upstream never saw the request.
    pub non_idempotent: bool,
    /// Retries may be at most this percentage of requests per region (over a 10 s window), so a
    /// failing fleet does not multiply its own load.
    pub budget_percent: u32,
    /// Retries always allowed per region and window, however few the requests.
    pub budget_min_per_window: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            on_status: vec![502, 503, 504],
            non_idempotent: false,
            budget_percent: 20,
            budget_min_per_window: 10,
        }
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
    /// Response rate limiting over UDP.
    #[serde(default)]
    pub rrl: DnsRrl,
    /// UDP workers (one socket and thread each). 0: one per core for `meridian dns`, one inside
    /// an edge.
    #[serde(default)]
    pub workers: usize,
    /// Run UDP worker N on the Nth CPU the process may use, and have the kernel hand each query to
    /// the worker of the CPU that received it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pin_workers: bool,
    /// Addresses of in-zone name servers (`ns1.example.test = ["192.0.2.53"]`): answered for
    /// those names and sent as glue with the apex NS records.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub glue: std::collections::BTreeMap<String, Vec<String>>,
    /// EDNS Client Subnet: at most this many bits of a client's IPv4 subnet are used to steer
    /// (and returned as the answer's scope); longer source prefixes are cut to it.
    #[serde(default = "default_ecs_max_source_v4")]
    pub ecs_max_source_v4: u8,
    /// ... and of an IPv6 subnet.
    #[serde(default = "default_ecs_max_source_v6")]
    pub ecs_max_source_v6: u8,
    /// `[dns.dnssec]`: sign answers online. Absent: the zone is unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dnssec: Option<DnsDnssec>,
}

/// `[dns.dnssec]`: the zone's signing key. Signatures are computed when the zone compiles (every
/// answer variant), never per query.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsDnssec {
    /// PKCS#8 private key (PEM or DER), e.g. written by `meridian dns keygen`: the active key,
    /// which signs every answer.
    pub key_file: String,
    /// Further keys published during a key rollover: they are in the apex DNSKEY set and sign it
    /// (so a parent DS pointing at any of them validates), but sign no answers. Empty outside a
    /// rollover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published_key_files: Vec<String>,
    /// Signing algorithm; only `ECDSAP256SHA256` (algorithm 13) is supported.
    #[serde(default = "default_dnssec_algorithm")]
    pub algorithm: String,
}

fn default_ecs_max_source_v4() -> u8 {
    24
}

fn default_ecs_max_source_v6() -> u8 {
    56
}

fn default_dnssec_algorithm() -> String {
    "ECDSAP256SHA256".into()
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
    /// Consecutive passing probes before a down PoP is back in answers.
    pub healthy_after: u32,
    /// Consecutive failing probes before a healthy PoP leaves answers.
    pub unhealthy_after: u32,
}

impl Default for DnsHealth {
    fn default() -> Self {
        Self {
            interval: HumanDuration::secs(2),
            timeout: HumanDuration::secs(1),
            healthy_after: 2,
            unhealthy_after: 2,
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
    /// TCP connections one client address may hold at once (its share of the slots above); past
    /// it, new ones from that address are closed at once.
    pub max_tcp_per_address: usize,
}

impl Default for DnsLimits {
    fn default() -> Self {
        Self {
            max_udp_payload: 1232,
            max_tcp_connections: 256,
            tcp_idle_timeout: HumanDuration::secs(10),
            max_tcp_per_address: 16,
        }
    }
}

/// `[dns.rrl]`: response rate limiting (as BIND/Knot RRL), so the server cannot be used to
/// amplify a spoofed flood. Applies to UDP only (TCP cannot be spoofed).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsRrl {
    /// Identical answers per second to one client network; 0 turns limiting off.
    pub responses_per_second: u32,
    /// Of the answers over the limit, every `slip`-th is sent empty with TC set (the client
    /// retries over TCP) and the others are dropped; 0 drops them all.
    pub slip: u32,
    /// Client networks: IPv4 addresses are grouped by this prefix length...
    pub ipv4_prefix: u8,
    /// ...and IPv6 addresses by this one.
    pub ipv6_prefix: u8,
    /// Tracked (network, answer) pairs; past this, refilled ones are forgotten first.
    pub max_entries: usize,
}

impl Default for DnsRrl {
    fn default() -> Self {
        Self {
            responses_per_second: 20,
            slip: 2,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            max_entries: 100_000,
        }
    }
}

/// `[edge.admin]`: where the admin listener binds, and the bearer token that guards its write
/// endpoints (cache purge). Also accepts the plain string form `admin = "127.0.0.1:9901"`, so it
/// reads as the address wherever a `&str` is expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminListener {
    pub listen: String,
    /// File holding the bearer token for `/admin/cache/*`. Absent: those endpoints answer 403.
    pub token_file: Option<String>,
}

impl Default for AdminListener {
    fn default() -> Self {
        Self::from("127.0.0.1:9901")
    }
}

impl From<&str> for AdminListener {
    fn from(listen: &str) -> Self {
        Self {
            listen: listen.to_string(),
            token_file: None,
        }
    }
}

impl From<String> for AdminListener {
    fn from(listen: String) -> Self {
        Self {
            listen,
            token_file: None,
        }
    }
}

impl std::ops::Deref for AdminListener {
    type Target = str;
    fn deref(&self) -> &str {
        &self.listen
    }
}

impl std::fmt::Display for AdminListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.listen)
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AdminTable {
    #[serde(default = "default_admin_listen")]
    listen: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_file: Option<String>,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9901".into()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AdminForm {
    Address(String),
    Table(AdminTable),
}

impl<'de> Deserialize<'de> for AdminListener {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match AdminForm::deserialize(deserializer)? {
            AdminForm::Address(listen) => Self::from(listen),
            AdminForm::Table(t) => Self {
                listen: t.listen,
                token_file: t.token_file,
            },
        })
    }
}

impl Serialize for AdminListener {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.token_file {
            None => serializer.serialize_str(&self.listen),
            Some(_) => AdminTable {
                listen: self.listen.clone(),
                token_file: self.token_file.clone(),
            }
            .serialize(serializer),
        }
    }
}

/// `[edge.cache]`: the in-memory response cache of this edge.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeCache {
    /// Master switch; with it off no route caches, whatever its own setting.
    pub enabled: bool,
    /// Total bytes of cached bodies and headers; the least valuable entries are evicted beyond it.
    pub max_bytes: u64,
    /// Larger responses stream through to the client and are not stored.
    pub max_object_bytes: u64,
    /// How long a request waits for an identical in-flight miss before fetching on its own.
    pub coalesce_timeout: HumanDuration,
    /// Targeted cache-control fields (RFC 9213) this edge obeys, in order of precedence: the first
    /// present with a valid value replaces `Cache-Control` and `Expires` for the edge. `[]`: none.
    pub targeted: Vec<String>,
    /// Pass the `targeted` fields on to clients. Off (default): the edge, their target, consumes
    /// them on cache-enabled routes, so a cache further down does not obey a policy meant for us.
    pub forward_targeted: bool,
    /// The most byte ranges one request may list and still get them (a multipart `206`); a
    /// request listing more gets the whole response, as RFC 9110 §14.2 allows against range
    /// floods. Overlapping and adjacent ranges are merged whatever this says.
    pub max_ranges: u32,
}

impl Default for EdgeCache {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
            max_object_bytes: 8 * 1024 * 1024,
            coalesce_timeout: HumanDuration::secs(5),
            targeted: vec!["CDN-Cache-Control".into()],
            forward_targeted: false,
            max_ranges: 16,
        }
    }
}

/// A route's `cache = { ... }`: RFC 9111 caching of its responses, opt-in.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteCache {
    pub enabled: bool,
    /// Freshness for storable responses that carry no `max-age`/`s-maxage`/`Expires`. Absent: such
    /// responses are not stored (heuristic freshness is off).
    pub default_ttl: Option<HumanDuration>,
    /// Store responses to requests that carry `Authorization` (shared between every caller!).
    pub allow_authorization: bool,
    /// Store responses that carry `Set-Cookie` (the cookie is replayed to every caller!). Written
    /// `store_set_cookie`; `allow_set_cookie`, its earlier name, is still read.
    #[serde(rename = "store_set_cookie", alias = "allow_set_cookie")]
    pub allow_set_cookie: bool,
    pub key: CacheKeyConfig,
    /// Serve a stale entry for this long while one background fetch refreshes it, when the
    /// response does not say (`stale-while-revalidate=`).
    pub stale_while_revalidate: Option<HumanDuration>,
    /// Serve a stale entry for this long when every eligible region fails, when the response does
    /// not say (`stale-if-error=`).
    pub stale_if_error: Option<HumanDuration>,
    /// Use the cache for requests that carry `Cookie` (off: they go to the origin, so a response
    /// shaped by one caller's cookie is never stored for everyone). The cookie is not in the key.
    pub allow_cookie: bool,
    /// Heuristic freshness (RFC 9111 §4.2.2) for heuristically cacheable responses that state no
    /// freshness but carry `Last-Modified`: 10 % of their age at `Date`, capped by `heuristic_max`.
    /// On by default, as RFC 9111 expects of a cache; `false` turns it off for the route.
    pub heuristic: bool,
    /// Cap on a heuristic freshness lifetime (default 1 day).
    pub heuristic_max: Option<HumanDuration>,
    /// A `Range` request that finds nothing stored fetches the whole response (no `Range`
    /// upstream), stores it and answers the range from it. `false`: such requests go to the
    /// origin as they are and its `206` is relayed unstored.
    pub fill_ranges: bool,
}

impl Default for RouteCache {
    fn default() -> Self {
        Self {
            enabled: false,
            default_ttl: None,
            allow_authorization: false,
            allow_set_cookie: false,
            key: CacheKeyConfig::default(),
            stale_while_revalidate: None,
            stale_if_error: None,
            allow_cookie: false,
            heuristic: true,
            heuristic_max: None,
            fill_ranges: true,
        }
    }
}

/// What, besides method, scheme, host, path and query, tells two requests' responses apart.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheKeyConfig {
    /// Query parameters dropped from the key (e.g. `utm_source`).
    pub ignore_query: Vec<String>,
    /// Request headers added to the key (case-insensitive names).
    pub headers: Vec<String>,
    /// Compare `Accept-Language` and `Accept-Encoding` by meaning when a response varies on them
    /// (order, case, whitespace and for encodings non-zero q-values ignored), so equivalent
    /// requests share a variant. `false`: byte-for-byte, for origins that read those fields
    /// in ways the normalisation would blur.
    pub normalise_vary: bool,
}

impl Default for CacheKeyConfig {
    fn default() -> Self {
        Self {
            ignore_query: Vec::new(),
            headers: Vec::new(),
            normalise_vary: true,
        }
    }
}
