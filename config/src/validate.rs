//! Semantic validation: runs every check and returns every error, each with the path of its value.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use crate::error::ValidationError;
use crate::schema::*;

struct Errors(Vec<ValidationError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ValidationError::new(path, message));
    }
}

impl Config {
    /// Checks everything the type system cannot. `Err` holds all problems found, in document order.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut errors = Errors(Vec::new());
        if self.schema != SCHEMA_VERSION {
            errors.push(
                "schema",
                format!(
                    "unsupported schema version {} (this build reads {SCHEMA_VERSION})",
                    self.schema
                ),
            );
        }
        validate_edge(&self.edge, &mut errors);
        validate_tls(&self.edge, &self.tls, &mut errors);
        validate_cache(&self.edge, &self.routes, &mut errors);
        validate_geoip(&self.geoip, &mut errors);
        let regions = validate_regions(&self.regions, &mut errors);
        validate_routes(&self.routes, &regions, &mut errors);
        validate_residency(&self.residency, &regions, &mut errors);
        validate_dns(&self.pops, self.dns.as_ref(), &mut errors);
        for (path, message) in crate::inference::validate(self) {
            errors.push(path, message);
        }
        if let Some(control) = &self.control {
            validate_control(control, &mut errors);
        }
        validate_limits(&self.limits, &mut errors);
        if errors.0.is_empty() {
            Ok(())
        } else {
            Err(errors.0)
        }
    }
}

fn validate_edge(edge: &Edge, errors: &mut Errors) {
    if !is_name(&edge.pop) {
        errors.push("edge.pop", name_rule(&edge.pop));
    }
    check_socket_addr("edge.http", &edge.http, errors);
    if let Some(addr) = check_socket_addr("edge.admin", &edge.admin, errors) {
        if !addr.ip().is_loopback() {
            errors.push(
                "edge.admin",
                format!("admin listener {addr} must be a loopback address (127.0.0.0/8 or ::1)"),
            );
        }
    }
    if edge.threads == 0 || edge.threads > 256 {
        errors.push("edge.threads", "must be between 1 and 256");
    }
    if !(0.0..=1.0).contains(&edge.access_log.sample) {
        errors.push("edge.access_log.sample", "must be between 0.0 and 1.0");
    }
    let limits = &edge.limits;
    if !(1024..=1024 * 1024).contains(&limits.max_header_bytes) {
        errors.push(
            "edge.limits.max_header_bytes",
            "must be between 1024 and 1048576",
        );
    }
    if !(1..=1000).contains(&limits.max_headers) {
        errors.push("edge.limits.max_headers", "must be between 1 and 1000");
    }
    if limits.max_body_bytes == 0 {
        errors.push("edge.limits.max_body_bytes", "must be greater than 0");
    }
    for (path, timeout) in [
        (
            "edge.limits.client_header_timeout",
            &limits.client_header_timeout,
        ),
        ("edge.limits.keepalive_timeout", &limits.keepalive_timeout),
        (
            "edge.limits.client_body_timeout",
            &limits.client_body_timeout,
        ),
        ("edge.limits.send_timeout", &limits.send_timeout),
    ] {
        if timeout.as_duration().is_zero() {
            errors.push(path, "must be greater than 0");
        }
    }
    // Within the head, so never more than max_header_bytes in effect.
    if !(256..=1024 * 1024).contains(&limits.max_uri_bytes) {
        errors.push(
            "edge.limits.max_uri_bytes",
            "must be between 256 and 1048576",
        );
    }
    if !(1..=10_000_000).contains(&limits.max_connections) {
        errors.push(
            "edge.limits.max_connections",
            "must be between 1 and 10000000",
        );
    }
    if limits.max_requests_per_connection == 0 {
        errors.push(
            "edge.limits.max_requests_per_connection",
            "must be greater than 0",
        );
    }
    if !(1..=10_000).contains(&limits.h2_max_streams) {
        errors.push("edge.limits.h2_max_streams", "must be between 1 and 10000");
    }
}

/// `[tls]`, `edge.https`, `edge.h3`: shape only. The files (exist, parse, key matches cert, not
/// expired) are checked by the gateway, which reads them.
fn validate_tls(edge: &Edge, tls: &TlsSection, errors: &mut Errors) {
    if let Some(https) = &edge.https {
        check_socket_addr("edge.https", https, errors);
        if tls.certificates.is_empty() {
            errors.push(
                "edge.https",
                "an HTTPS listener needs at least one [[tls.certificates]]",
            );
        }
    } else if edge.h3 {
        errors.push(
            "edge.h3",
            "HTTP/3 runs on the edge.https address: set edge.https",
        );
    }
    let h3 = &edge.h3_limits;
    if !(1..=10_000).contains(&h3.max_streams) {
        errors.push("edge.h3_limits.max_streams", "must be between 1 and 10000");
    }
    if h3.idle_timeout.as_duration().is_zero() {
        errors.push("edge.h3_limits.idle_timeout", "must be greater than 0");
    }
    if h3.max_connections == 0 {
        errors.push("edge.h3_limits.max_connections", "must be greater than 0");
    }
    if h3.max_connections_per_address == 0 {
        errors.push(
            "edge.h3_limits.max_connections_per_address",
            "must be greater than 0",
        );
    }
    if h3.stream_header_timeout.as_duration().is_zero() {
        errors.push(
            "edge.h3_limits.stream_header_timeout",
            "must be greater than 0",
        );
    }
    if h3.stream_receive_window < 1024 {
        errors.push(
            "edge.h3_limits.stream_receive_window",
            "must be at least 1024",
        );
    }
    if h3.connection_receive_window < h3.stream_receive_window {
        errors.push(
            "edge.h3_limits.connection_receive_window",
            "must be at least stream_receive_window",
        );
    }
    let mut hosts: HashMap<String, usize> = HashMap::new();
    let mut default = None;
    for (i, cert) in tls.certificates.iter().enumerate() {
        let path = format!("tls.certificates[{i}]");
        if cert.hosts.is_empty() {
            errors.push(
                format!("{path}.hosts"),
                "a certificate needs at least one host",
            );
        }
        for (j, host) in cert.hosts.iter().enumerate() {
            let hpath = format!("{path}.hosts[{j}]");
            if let Err(message) = check_host(host) {
                errors.push(hpath, message);
            } else if let Some(first) = hosts.insert(host.to_ascii_lowercase(), i) {
                errors.push(
                    hpath,
                    format!("host {host:?} already has a certificate (tls.certificates[{first}])"),
                );
            }
        }
        if cert.cert.trim().is_empty() {
            errors.push(format!("{path}.cert"), "must be a PEM file path");
        }
        if cert.key.trim().is_empty() {
            errors.push(format!("{path}.key"), "must be a PEM file path");
        }
        if cert.default {
            if let Some(first) = default {
                errors.push(
                    format!("{path}.default"),
                    format!("only one default certificate (tls.certificates[{first}] is one)"),
                );
            } else {
                default = Some(i);
            }
        }
    }
}

fn validate_geoip(geoip: &GeoIpSection, errors: &mut Errors) {
    if let Some(db) = &geoip.database {
        if db.trim().is_empty() {
            errors.push(
                "geoip.database",
                "must not be empty (omit it to run without a database)",
            );
        }
    }
    for (i, cidr) in geoip.trusted_proxies.iter().enumerate() {
        if parse_cidr(cidr).is_none() {
            errors.push(
                format!("geoip.trusted_proxies[{i}]"),
                format!("bad CIDR {cidr:?} (expected e.g. \"10.0.0.0/8\" or \"::1/128\")"),
            );
        }
    }
}

/// Parses `a.b.c.d/n`, `v6/n`, or a bare address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Returns the set of valid region names (for reference checks).
fn validate_regions<'a>(regions: &'a [Region], errors: &mut Errors) -> HashSet<&'a str> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    if regions.is_empty() {
        errors.push("regions", "at least one region is required");
    }
    for (i, region) in regions.iter().enumerate() {
        let path = format!("regions[{i}]");
        if !is_name(&region.name) {
            errors.push(format!("{path}.name"), name_rule(&region.name));
        } else if let Some(first) = names.insert(&region.name, i) {
            errors.push(
                format!("{path}.name"),
                format!(
                    "duplicate region name {:?} (first defined at regions[{first}])",
                    region.name
                ),
            );
            names.insert(&region.name, first);
        }
        check_point(&format!("{path}.location"), region.location, errors);
        validate_region_health(&path, region, errors);
        if region.upstreams.is_empty() {
            errors.push(
                format!("{path}.upstreams"),
                "a region needs at least one upstream",
            );
        }
        let mut seen = HashMap::new();
        for (j, upstream) in region.upstreams.iter().enumerate() {
            let upath = format!("{path}.upstreams[{j}]");
            if let Some(addr) =
                check_socket_addr(&format!("{upath}.address"), &upstream.address, errors)
            {
                if let Some(first) = seen.insert(addr, j) {
                    errors.push(
                        format!("{upath}.address"),
                        format!("duplicate upstream {addr} (also {path}.upstreams[{first}])"),
                    );
                }
            }
            if upstream.weight > 10_000 {
                errors.push(format!("{upath}.weight"), "must be between 0 and 10000");
            }
        }
    }
    names.into_keys().collect()
}

fn validate_region_health(path: &str, region: &Region, errors: &mut Errors) {
    let health = &region.health;
    if !health.path.starts_with('/') {
        errors.push(
            format!("{path}.health.path"),
            format!("{:?} must start with '/'", health.path),
        );
    }
    if health.interval.as_duration() < std::time::Duration::from_millis(10) {
        errors.push(format!("{path}.health.interval"), "must be at least 10ms");
    }
    if health.timeout.as_duration().is_zero() {
        errors.push(format!("{path}.health.timeout"), "must be greater than 0");
    } else if health.timeout > health.interval {
        errors.push(
            format!("{path}.health.timeout"),
            "must not exceed health.interval",
        );
    }
    if health.healthy_after == 0 || health.healthy_after > 100 {
        errors.push(
            format!("{path}.health.healthy_after"),
            "must be between 1 and 100",
        );
    }
    if health.unhealthy_after == 0 || health.unhealthy_after > 100 {
        errors.push(
            format!("{path}.health.unhealthy_after"),
            "must be between 1 and 100",
        );
    }
    if !(100..=599).contains(&health.expect_status) {
        errors.push(
            format!("{path}.health.expect_status"),
            "must be an HTTP status (100-599)",
        );
    }
    let outlier = &region.outlier;
    if outlier.consecutive_failures == 0 {
        errors.push(
            format!("{path}.outlier.consecutive_failures"),
            "must be at least 1",
        );
    }
    if outlier.base_ejection.as_duration().is_zero() {
        errors.push(
            format!("{path}.outlier.base_ejection"),
            "must be greater than 0",
        );
    } else if outlier.max_ejection < outlier.base_ejection {
        errors.push(
            format!("{path}.outlier.max_ejection"),
            "must be at least base_ejection",
        );
    }
    if outlier.max_ejection_percent > 100 {
        errors.push(
            format!("{path}.outlier.max_ejection_percent"),
            "must be between 0 and 100",
        );
    }
    if outlier.panic_threshold > 100 {
        errors.push(
            format!("{path}.outlier.panic_threshold"),
            "must be between 0 and 100",
        );
    }
    if region.min_healthy == 0 {
        errors.push(format!("{path}.min_healthy"), "must be at least 1");
    } else if !region.upstreams.is_empty() && region.min_healthy as usize > region.upstreams.len() {
        errors.push(
            format!("{path}.min_healthy"),
            format!(
                "{} exceeds the region's {} upstream(s)",
                region.min_healthy,
                region.upstreams.len()
            ),
        );
    }
    if region.max_inflight == Some(0) {
        errors.push(
            format!("{path}.max_inflight"),
            "must be at least 1 (omit it for no cap)",
        );
    }
}

fn validate_routes(routes: &[Route], regions: &HashSet<&str>, errors: &mut Errors) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    // (host, path_prefix) -> route index: two routes may not claim exactly the same traffic.
    let mut claims: HashMap<(String, &str), usize> = HashMap::new();
    for (i, route) in routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        if !is_name(&route.name) {
            errors.push(format!("{path}.name"), name_rule(&route.name));
        } else if let Some(first) = names.insert(&route.name, i) {
            errors.push(
                format!("{path}.name"),
                format!(
                    "duplicate route name {:?} (first defined at routes[{first}])",
                    route.name
                ),
            );
            names.insert(&route.name, first);
        }
        if route.hosts.is_empty() {
            errors.push(format!("{path}.hosts"), "a route needs at least one host");
        }
        if !route.path_prefix.starts_with('/') {
            errors.push(
                format!("{path}.path_prefix"),
                format!("{:?} must start with '/'", route.path_prefix),
            );
        }
        for (j, host) in route.hosts.iter().enumerate() {
            let hpath = format!("{path}.hosts[{j}]");
            match check_host(host) {
                Err(message) => errors.push(hpath, message),
                Ok(()) => {
                    let key = (host.to_ascii_lowercase(), route.path_prefix.as_str());
                    if let Some(first) = claims.get(&key) {
                        errors.push(
                            hpath,
                            format!(
                                "host {host:?} with path_prefix {:?} is already claimed by routes[{first}] ({:?})",
                                route.path_prefix, routes[*first].name
                            ),
                        );
                    } else {
                        claims.insert(key, i);
                    }
                }
            }
        }
        let eligible: Vec<&str> = match &route.regions {
            RegionSet::All(star) => {
                if star != "*" {
                    errors.push(
                        format!("{path}.regions"),
                        format!("expected \"*\" or a list of region names, got {star:?}"),
                    );
                }
                regions.iter().copied().collect()
            }
            RegionSet::List(list) => {
                if list.is_empty() {
                    errors.push(
                        format!("{path}.regions"),
                        "an empty region list can serve nothing",
                    );
                }
                let mut seen = HashSet::new();
                for (j, name) in list.iter().enumerate() {
                    if !regions.contains(name.as_str()) {
                        errors.push(
                            format!("{path}.regions[{j}]"),
                            format!("unknown region {name:?}"),
                        );
                    } else if !seen.insert(name.as_str()) {
                        errors.push(
                            format!("{path}.regions[{j}]"),
                            format!("region {name:?} listed twice"),
                        );
                    }
                }
                list.iter().map(String::as_str).collect()
            }
        };
        if let Some(default) = &route.default_region {
            if !regions.contains(default.as_str()) {
                errors.push(
                    format!("{path}.default_region"),
                    format!("unknown region {default:?}"),
                );
            } else if !eligible.contains(&default.as_str()) {
                errors.push(
                    format!("{path}.default_region"),
                    format!("region {default:?} is not one of this route's regions"),
                );
            }
        }
        for (field, value) in [
            ("connect", route.timeouts.connect),
            ("read", route.timeouts.read),
            ("write", route.timeouts.write),
        ] {
            if value.as_duration().is_zero() {
                errors.push(format!("{path}.timeouts.{field}"), "must be greater than 0");
            }
        }
        if !(1..=10).contains(&route.retry.attempts) {
            errors.push(format!("{path}.retry.attempts"), "must be between 1 and 10");
        }
        for (j, status) in route.retry.on_status.iter().enumerate() {
            if !(500..=599).contains(status) && *status != 429 {
                errors.push(
                    format!("{path}.retry.on_status[{j}]"),
                    format!("{status} is not a retryable status (429 or 5xx)"),
                );
            }
        }
        if route.retry.budget_percent > 100 {
            errors.push(
                format!("{path}.retry.budget_percent"),
                "must be between 0 and 100",
            );
        }
        if route.timeouts.total < route.timeouts.connect {
            errors.push(
                format!("{path}.timeouts.total"),
                "must be at least timeouts.connect",
            );
        }
    }
}

fn validate_residency(rules: &[Residency], regions: &HashSet<&str>, errors: &mut Errors) {
    let mut countries: HashMap<String, usize> = HashMap::new();
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("residency[{i}]");
        if rule.countries.is_empty() {
            errors.push(
                format!("{path}.countries"),
                "a residency rule needs at least one country",
            );
        }
        for (j, country) in rule.countries.iter().enumerate() {
            let cpath = format!("{path}.countries[{j}]");
            if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_alphabetic()) {
                errors.push(
                    cpath,
                    format!("{country:?} is not an ISO 3166-1 alpha-2 code"),
                );
            } else if let Some(first) = countries.insert(country.to_ascii_uppercase(), i) {
                errors.push(
                    cpath,
                    format!("country {country:?} already has a rule (residency[{first}])"),
                );
            }
        }
        if rule.regions.is_empty() {
            errors.push(
                format!("{path}.regions"),
                "a residency rule needs at least one region",
            );
        }
        for (j, name) in rule.regions.iter().enumerate() {
            if !regions.contains(name.as_str()) {
                errors.push(
                    format!("{path}.regions[{j}]"),
                    format!("unknown region {name:?}"),
                );
            }
        }
    }
}

fn validate_limits(limits: &LimitsSection, errors: &mut Errors) {
    for (i, url) in limits.redis.iter().enumerate() {
        let authority = url
            .strip_prefix("redis://")
            .map(|r| r.trim_end_matches('/'));
        if authority.is_none_or(|a| a.is_empty() || a.contains('/')) {
            errors.push(
                format!("limits.redis[{i}]"),
                format!("bad URL {url:?} (expected redis://host:port)"),
            );
        }
    }
    if limits.backend == LimitsBackend::Redis && limits.redis.is_empty() {
        errors.push(
            "limits.redis",
            "backend = \"redis\" needs at least one server",
        );
    }
}

fn validate_control(control: &Control, errors: &mut Errors) {
    match (control.url.is_empty(), control.etcd.is_empty()) {
        (true, true) => errors.push("control", "set url (a config server) or etcd (endpoints)"),
        (false, false) => errors.push("control.etcd", "url and etcd exclude each other"),
        (false, true) => {
            let rest = control
                .url
                .strip_prefix("http://")
                .or_else(|| control.url.strip_prefix("https://"));
            let authority = rest.map(|r| r.split('/').next().unwrap_or(""));
            if authority.is_none_or(str::is_empty) {
                errors.push(
                    "control.url",
                    format!(
                        "bad URL {:?} (expected http://host:port or https://host:port)",
                        control.url
                    ),
                );
            }
        }
        (true, false) => {
            for (i, endpoint) in control.etcd.iter().enumerate() {
                let rest = endpoint.strip_prefix("http://");
                if rest.is_none_or(|r| r.trim_end_matches('/').is_empty() || r.contains('/')) {
                    errors.push(
                        format!("control.etcd[{i}]"),
                        format!("bad endpoint {endpoint:?} (expected http://host:port)"),
                    );
                }
            }
            if !control.etcd_prefix.starts_with('/') {
                errors.push("control.etcd_prefix", "must start with /");
            }
        }
    }
    if control.cache_dir.trim().is_empty() {
        errors.push("control.cache_dir", "must not be empty");
    }
    if control.wait.as_duration().is_zero() || control.wait.as_duration().as_secs() > 60 {
        errors.push("control.wait", "must be between 1ms and 60s");
    }
}

/// `[[pops]]` and `[dns]`: addresses, health URLs, the zone, and every PoP a record names.
fn validate_dns(pops: &[Pop], dns: Option<&DnsSection>, errors: &mut Errors) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, pop) in pops.iter().enumerate() {
        let path = format!("pops[{i}]");
        if !is_name(&pop.name) {
            errors.push(format!("{path}.name"), name_rule(&pop.name));
        } else if let Some(first) = names.insert(&pop.name, i) {
            errors.push(
                format!("{path}.name"),
                format!(
                    "duplicate pop name {:?} (first defined at pops[{first}])",
                    pop.name
                ),
            );
            names.insert(&pop.name, first);
        }
        check_point(&format!("{path}.location"), pop.location, errors);
        if pop.addresses.is_empty() {
            errors.push(
                format!("{path}.addresses"),
                "a pop needs at least one address",
            );
        }
        if pop.addresses.len() > 64 {
            errors.push(format!("{path}.addresses"), "at most 64 addresses per pop");
        }
        let mut seen = HashMap::new();
        for (j, address) in pop.addresses.iter().enumerate() {
            let apath = format!("{path}.addresses[{j}]");
            match address.parse::<IpAddr>() {
                Err(_) => errors.push(
                    apath,
                    format!("bad address {address:?} (expected an IPv4 or IPv6 address, no port)"),
                ),
                Ok(ip) => {
                    if let Some(first) = seen.insert(ip, j) {
                        errors.push(
                            apath,
                            format!("duplicate address {ip} (also {path}.addresses[{first}])"),
                        );
                    }
                }
            }
        }
        if let Some(url) = &pop.health {
            if let Err(message) = check_http_url(url) {
                errors.push(format!("{path}.health"), message);
            }
        }
    }
    let Some(dns) = dns else { return };
    if pops.is_empty() {
        errors.push(
            "pops",
            "[dns] needs at least one [[pops]] entry to answer with",
        );
    }
    if dns.listen.parse::<SocketAddr>().is_err() {
        errors.push(
            "dns.listen",
            format!(
                "bad address {:?} (expected ip:port, e.g. \"127.0.0.1:5353\")",
                dns.listen
            ),
        );
    }
    if dns.zone.starts_with("*.") || check_host(dns.zone.trim_end_matches('.')).is_err() {
        errors.push(
            "dns.zone",
            format!(
                "bad zone {:?} (expected a DNS name like \"example.com\")",
                dns.zone
            ),
        );
    }
    if dns.ttl > 86_400 {
        errors.push("dns.ttl", "must be at most 86400 seconds");
    }
    for (i, ns) in dns.ns.iter().enumerate() {
        if ns.starts_with("*.") || check_host(ns.trim_end_matches('.')).is_err() {
            errors.push(
                format!("dns.ns[{i}]"),
                format!("bad name server name {ns:?}"),
            );
        }
    }
    for (field, value) in [("mname", &dns.soa.mname), ("rname", &dns.soa.rname)] {
        if !value.is_empty()
            && (value.starts_with("*.") || check_host(value.trim_end_matches('.')).is_err())
        {
            errors.push(format!("dns.soa.{field}"), format!("bad name {value:?}"));
        }
    }
    if dns.soa.minimum > 86_400 {
        errors.push("dns.soa.minimum", "must be at most 86400 seconds");
    }
    if !(1..=16).contains(&dns.answers) {
        errors.push("dns.answers", "must be between 1 and 16");
    }
    let known = |name: &str| names.contains_key(name);
    for (i, name) in dns.default_pops.iter().enumerate() {
        if !known(name) {
            errors.push(
                format!("dns.default_pops[{i}]"),
                format!("unknown pop {name:?}"),
            );
        }
    }
    let mut records: HashMap<String, usize> = HashMap::new();
    for (i, record) in dns.records.iter().enumerate() {
        let path = format!("dns.records[{i}]");
        if record.name != "@"
            && (record.name.ends_with('.')
                || record.name.starts_with("*.")
                || check_host(&record.name).is_err())
        {
            errors.push(
                format!("{path}.name"),
                format!(
                    "bad record name {:?} (a name relative to the zone like \"api\", or \"@\" for the apex)",
                    record.name
                ),
            );
        } else if let Some(first) = records.insert(record.name.to_ascii_lowercase(), i) {
            errors.push(
                format!("{path}.name"),
                format!(
                    "duplicate record {:?} (first defined at dns.records[{first}])",
                    record.name
                ),
            );
        }
        for (j, name) in record.pops.iter().enumerate() {
            if !known(name) {
                errors.push(format!("{path}.pops[{j}]"), format!("unknown pop {name:?}"));
            }
        }
        for (name, weight) in &record.weights {
            if !known(name) {
                errors.push(
                    format!("{path}.weights.{name}"),
                    format!("unknown pop {name:?}"),
                );
            } else if !record.pops.is_empty() && !record.pops.contains(name) {
                errors.push(
                    format!("{path}.weights.{name}"),
                    format!("pop {name:?} is not one of this record's pops"),
                );
            }
            if !(1..=100).contains(weight) {
                errors.push(
                    format!("{path}.weights.{name}"),
                    "must be between 1 and 100",
                );
            }
        }
    }
    if dns.health.interval.as_duration().is_zero() {
        errors.push("dns.health.interval", "must be greater than 0");
    }
    if dns.health.timeout.as_duration().is_zero() {
        errors.push("dns.health.timeout", "must be greater than 0");
    }
    let limits = &dns.limits;
    if !(512..=4096).contains(&limits.max_udp_payload) {
        errors.push("dns.limits.max_udp_payload", "must be between 512 and 4096");
    }
    if !(1..=65_536).contains(&limits.max_tcp_connections) {
        errors.push(
            "dns.limits.max_tcp_connections",
            "must be between 1 and 65536",
        );
    }
    if limits.max_tcp_per_address == 0 || limits.max_tcp_per_address > limits.max_tcp_connections {
        errors.push(
            "dns.limits.max_tcp_per_address",
            "must be between 1 and dns.limits.max_tcp_connections",
        );
    }
    if limits.tcp_idle_timeout.as_duration().is_zero() {
        errors.push("dns.limits.tcp_idle_timeout", "must be greater than 0");
    }
    let rrl = &dns.rrl;
    if rrl.responses_per_second > 1_000_000 {
        errors.push(
            "dns.rrl.responses_per_second",
            "must be between 0 (off) and 1000000",
        );
    }
    if rrl.slip > 10 {
        errors.push("dns.rrl.slip", "must be between 0 (drop all) and 10");
    }
    if !(8..=32).contains(&rrl.ipv4_prefix) {
        errors.push("dns.rrl.ipv4_prefix", "must be between 8 and 32");
    }
    if !(16..=128).contains(&rrl.ipv6_prefix) {
        errors.push("dns.rrl.ipv6_prefix", "must be between 16 and 128");
    }
    if !(1..=10_000_000).contains(&rrl.max_entries) {
        errors.push("dns.rrl.max_entries", "must be between 1 and 10000000");
    }
    if dns.workers > 256 {
        errors.push("dns.workers", "must be between 0 (one per core) and 256");
    }
    let zone = dns.zone.trim_end_matches('.').to_ascii_lowercase();
    let ns_names: Vec<String> = if dns.ns.is_empty() {
        vec![format!("ns1.{zone}")]
    } else {
        dns.ns
            .iter()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect()
    };
    for (name, addresses) in &dns.glue {
        let path = format!("dns.glue.{name}");
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        if !ns_names.contains(&lower) {
            errors.push(
                &path,
                format!("{name:?} is not one of the zone's name servers"),
            );
        } else if !lower.ends_with(&format!(".{zone}")) {
            errors.push(&path, format!("{name:?} is not inside the zone {zone:?}"));
        } else if records.contains_key(lower.trim_end_matches(&format!(".{zone}"))) {
            errors.push(&path, format!("{name:?} is also a steered record"));
        }
        if addresses.is_empty() {
            errors.push(&path, "needs at least one address");
        }
        for (j, address) in addresses.iter().enumerate() {
            if address.parse::<IpAddr>().is_err() {
                errors.push(format!("{path}[{j}]"), format!("bad address {address:?}"));
            }
        }
    }
    for (field, value) in [
        ("dns.health.healthy_after", dns.health.healthy_after),
        ("dns.health.unhealthy_after", dns.health.unhealthy_after),
    ] {
        if !(1..=100).contains(&value) {
            errors.push(field, "must be between 1 and 100");
        }
    }
    if !(1..=32).contains(&dns.ecs_max_source_v4) {
        errors.push("dns.ecs_max_source_v4", "must be between 1 and 32");
    }
    if !(1..=128).contains(&dns.ecs_max_source_v6) {
        errors.push("dns.ecs_max_source_v6", "must be between 1 and 128");
    }
    if let Some(dnssec) = &dns.dnssec {
        if dnssec.key_file.is_empty() {
            errors.push("dns.dnssec.key_file", "must not be empty");
        }
        if !dnssec.algorithm.eq_ignore_ascii_case("ECDSAP256SHA256") {
            errors.push(
                "dns.dnssec.algorithm",
                format!(
                    "unsupported algorithm {:?} (supported: \"ECDSAP256SHA256\")",
                    dnssec.algorithm
                ),
            );
        }
        // A rollover needs two keys at a time; a few more cover an emergency roll started during
        // a planned one. Each key signs the DNSKEY set, so the list stays short.
        if dnssec.published_key_files.len() > 3 {
            errors.push(
                "dns.dnssec.published_key_files",
                "at most 3 keys besides key_file",
            );
        }
        for (i, file) in dnssec.published_key_files.iter().enumerate() {
            let path = format!("dns.dnssec.published_key_files[{i}]");
            if file.is_empty() {
                errors.push(&path, "must not be empty");
            } else if *file == dnssec.key_file || dnssec.published_key_files[..i].contains(file) {
                errors.push(&path, format!("{file:?} is listed twice"));
            }
        }
        if pops.len() > 128 {
            errors.push("dns.dnssec", "a signed zone has at most 128 pops");
        }
    }
}

/// `http://host:port/path` (what the GeoDNS health prober can fetch: plain HTTP/1.1).
fn check_http_url(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("http://");
    let authority = rest.map(|r| r.split('/').next().unwrap_or(""));
    match authority {
        Some(a) if a.parse::<SocketAddr>().is_ok() => Ok(()),
        _ => Err(format!(
            "bad health URL {url:?} (expected http://ip:port/path, e.g. \"http://10.0.0.5:8080/healthz\")"
        )),
    }
}

fn check_socket_addr(path: &str, value: &str, errors: &mut Errors) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 && !path.starts_with("edge.") => {
            errors.push(path, format!("bad address {value:?}: port 0"));
            None
        }
        Ok(addr) => Some(addr),
        Err(_) => {
            errors.push(
                path,
                format!("bad address {value:?} (expected ip:port, e.g. \"10.0.0.5:8080\")"),
            );
            None
        }
    }
}

fn check_point(path: &str, point: GeoPoint, errors: &mut Errors) {
    if !(-90.0..=90.0).contains(&point.lat) {
        errors.push(
            format!("{path}.lat"),
            format!("latitude {} is out of range [-90, 90]", point.lat),
        );
    }
    if !(-180.0..=180.0).contains(&point.lon) {
        errors.push(
            format!("{path}.lon"),
            format!("longitude {} is out of range [-180, 180]", point.lon),
        );
    }
}

/// Host names: DNS labels (letters, digits, '-') joined by dots, optionally `*.` in front. No ports.
fn check_host(host: &str) -> Result<(), String> {
    let bare = host.strip_prefix("*.").unwrap_or(host);
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "bad host {host:?} (expected a DNS name like \"api.example.com\" or \"*.example.com\", no port)"
        ))
    }
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn name_rule(name: &str) -> String {
    format!("bad name {name:?} (1-64 characters of a-z, 0-9, '-', '_')")
}

/// `[edge.cache]`, `[edge.admin] token_file` and every route's `cache = { ... }`.
fn validate_cache(edge: &Edge, routes: &[Route], errors: &mut Errors) {
    const MAX_WINDOW_SECS: u64 = 7 * 24 * 3600;
    let cache = &edge.cache;
    if cache.max_object_bytes == 0 {
        errors.push("edge.cache.max_object_bytes", "must be greater than 0");
    }
    if cache.max_bytes < cache.max_object_bytes {
        errors.push(
            "edge.cache.max_bytes",
            format!(
                "must be at least edge.cache.max_object_bytes ({})",
                cache.max_object_bytes
            ),
        );
    }
    if cache.max_object_bytes > u64::from(u32::MAX) {
        errors.push(
            "edge.cache.max_object_bytes",
            "must be at most 4294967295 (4 GiB)",
        );
    }
    let coalesce = cache.coalesce_timeout.as_duration();
    if coalesce.is_zero() || coalesce.as_secs() > 60 {
        errors.push("edge.cache.coalesce_timeout", "must be between 1ms and 60s");
    }
    if !(1..=1024).contains(&cache.max_ranges) {
        errors.push("edge.cache.max_ranges", "must be between 1 and 1024");
    }
    let mut targeted = HashSet::new();
    for (i, name) in cache.targeted.iter().enumerate() {
        let lower = name.to_ascii_lowercase();
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token || matches!(lower.as_str(), "cache-control" | "expires" | "pragma") {
            errors.push(
                format!("edge.cache.targeted[{i}]"),
                format!("{name:?} is not a targeted cache-control field name"),
            );
        } else if !targeted.insert(lower) {
            errors.push(
                format!("edge.cache.targeted[{i}]"),
                format!("{name:?} listed twice"),
            );
        }
    }
    if let Some(file) = &edge.admin.token_file {
        if file.trim().is_empty() {
            errors.push(
                "edge.admin.token_file",
                "must not be empty (omit it to disable the admin write endpoints)",
            );
        }
    }
    for (i, route) in routes.iter().enumerate() {
        let path = format!("routes[{i}].cache");
        let rc = &route.cache;
        if let Some(ttl) = rc.default_ttl {
            if ttl.as_duration().is_zero() || ttl.as_duration().as_secs() > MAX_WINDOW_SECS {
                errors.push(
                    format!("{path}.default_ttl"),
                    "must be between 1s and 7 days",
                );
            }
        }
        if rc.heuristic_max.is_some_and(|m| {
            m.as_duration().is_zero() || m.as_duration().as_secs() > MAX_WINDOW_SECS
        }) {
            errors.push(
                format!("{path}.heuristic_max"),
                "must be between 1s and 7 days",
            );
        }
        for (field, value) in [
            ("stale_while_revalidate", rc.stale_while_revalidate),
            ("stale_if_error", rc.stale_if_error),
        ] {
            if value.is_some_and(|v| v.as_duration().as_secs() > MAX_WINDOW_SECS) {
                errors.push(format!("{path}.{field}"), "must be at most 7 days");
            }
        }
        let mut seen = HashSet::new();
        for (j, param) in rc.key.ignore_query.iter().enumerate() {
            if param.is_empty() || param.contains(['&', '=', '#', ' ']) {
                errors.push(
                    format!("{path}.key.ignore_query[{j}]"),
                    format!("bad query parameter name {param:?}"),
                );
            } else if !seen.insert(param.as_str()) {
                errors.push(
                    format!("{path}.key.ignore_query[{j}]"),
                    format!("{param:?} listed twice"),
                );
            }
        }
        let mut seen = HashSet::new();
        if rc.key.headers.len() > 8 {
            errors.push(format!("{path}.key.headers"), "at most 8 headers");
        }
        for (j, name) in rc.key.headers.iter().enumerate() {
            let lower = name.to_ascii_lowercase();
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                errors.push(
                    format!("{path}.key.headers[{j}]"),
                    format!("bad header name {name:?}"),
                );
            } else if matches!(
                lower.as_str(),
                "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
            ) {
                errors.push(
                    format!("{path}.key.headers[{j}]"),
                    format!("hop-by-hop header {name:?} cannot be part of a cache key"),
                );
            } else if !seen.insert(lower) {
                errors.push(
                    format!("{path}.key.headers[{j}]"),
                    format!("header {name:?} listed twice"),
                );
            }
        }
    }
}
