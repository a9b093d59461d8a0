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
        validate_geoip(&self.geoip, &mut errors);
        let regions = validate_regions(&self.regions, &mut errors);
        validate_routes(&self.routes, &regions, &mut errors);
        validate_residency(&self.residency, &regions, &mut errors);
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
    if limits.client_header_timeout.as_duration().is_zero() {
        errors.push(
            "edge.limits.client_header_timeout",
            "must be greater than 0",
        );
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
