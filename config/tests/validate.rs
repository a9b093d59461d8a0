//! Every class of validation error is reported, together, each with the path of its value.

use meridian_config::{Config, ConfigError};

const BROKEN: &str = r#"
schema = 2

[edge]
pop = "Local 1"
http = "127.0.0.1"
admin = "0.0.0.0:9901"
threads = 0

[edge.limits]
max_header_bytes = 10
max_headers = 0

[geoip]
trusted_proxies = ["10.0.0.0/8", "not-a-cidr"]

[[regions]]
name = "us-east"
location = { lat = 95.0, lon = -77.0 }
upstreams = [{ address = "127.1.2.1:7001" }, { address = "127.1.2.1:7001" }]

[[regions]]
name = "us-east"
location = { lat = 38.9, lon = -181.0 }
upstreams = []

[[regions]]
name = "eu-central-1"
location = { lat = 50.1, lon = 8.68 }
upstreams = [{ address = "localhost" }, { address = "127.1.8.1:0", weight = 20000 }]

[[routes]]
name = "api"
hosts = ["api.example.test"]
regions = "*"

[[routes]]
name = "api"
hosts = ["api.example.test", "bad host!", "*.ok.test"]
path_prefix = "v1"
regions = ["ap-sout-1", "eu-central-1", "eu-central-1"]
default_region = "nowhere"
retry = { attempts = 0 }

[[routes]]
name = "eu"
hosts = ["eu.example.test"]
regions = ["eu-central-1"]
default_region = "us-east"

[[routes]]
name = "star"
hosts = ["star.example.test"]
regions = "all"

[[residency]]
countries = ["KR", "KOR"]
regions = ["ap-northeast-2"]

[[residency]]
countries = ["kr"]
regions = ["eu-central-1"]
"#;

fn errors_of(text: &str) -> Vec<String> {
    match Config::from_toml_str(text) {
        Err(ConfigError::Invalid(errors)) => errors.iter().map(ToString::to_string).collect(),
        other => panic!("expected validation errors, got {other:?}"),
    }
}

#[test]
fn every_error_is_reported_with_its_path() {
    let errors = errors_of(BROKEN);
    let expect = [
        "schema: unsupported schema version 2",
        "edge.pop: bad name \"Local 1\"",
        "edge.http: bad address \"127.0.0.1\"",
        "edge.admin: admin listener 0.0.0.0:9901 must be a loopback address",
        "edge.threads: must be between 1 and 256",
        "edge.limits.max_header_bytes: must be between",
        "edge.limits.max_headers: must be between",
        "geoip.trusted_proxies[1]: bad CIDR \"not-a-cidr\"",
        "regions[0].location.lat: latitude 95 is out of range",
        "regions[0].upstreams[1].address: duplicate upstream 127.1.2.1:7001",
        "regions[1].name: duplicate region name \"us-east\" (first defined at regions[0])",
        "regions[1].location.lon: longitude -181 is out of range",
        "regions[1].upstreams: a region needs at least one upstream",
        "regions[2].upstreams[0].address: bad address \"localhost\"",
        "regions[2].upstreams[1].address: bad address \"127.1.8.1:0\": port 0",
        "regions[2].upstreams[1].weight: must be between 0 and 10000",
        "routes[1].name: duplicate route name \"api\"",
        "routes[1].path_prefix: \"v1\" must start with '/'",
        "routes[1].hosts[1]: bad host \"bad host!\"",
        "routes[1].regions[0]: unknown region \"ap-sout-1\"",
        "routes[1].regions[2]: region \"eu-central-1\" listed twice",
        "routes[1].default_region: unknown region \"nowhere\"",
        "routes[1].retry.attempts: must be between 1 and 10",
        "routes[2].default_region: region \"us-east\" is not one of this route's regions",
        "routes[3].regions: expected \"*\" or a list of region names, got \"all\"",
        "residency[0].countries[1]: \"KOR\" is not an ISO 3166-1 alpha-2 code",
        "residency[0].regions[0]: unknown region \"ap-northeast-2\"",
        "residency[1].countries[0]: country \"kr\" already has a rule (residency[0])",
    ];
    for wanted in expect {
        assert!(
            errors.iter().any(|e| e.starts_with(wanted)),
            "missing {wanted:?} in:\n{}",
            errors.join("\n")
        );
    }
    assert_eq!(
        errors.len(),
        expect.len(),
        "unexpected extra errors:\n{}",
        errors.join("\n")
    );
}

#[test]
fn overlapping_host_and_prefix_is_rejected_but_different_prefixes_are_fine() {
    let text = r#"
schema = 1
[[regions]]
name = "r"
location = { lat = 0.0, lon = 0.0 }
upstreams = [{ address = "127.0.0.1:1" }]
[[routes]]
name = "a"
hosts = ["x.test"]
[[routes]]
name = "b"
hosts = ["X.test"]
[[routes]]
name = "c"
hosts = ["x.test"]
path_prefix = "/v1"
"#;
    let errors = errors_of(text);
    assert_eq!(
        errors,
        vec!["routes[1].hosts[0]: host \"X.test\" with path_prefix \"/\" is already claimed by routes[0] (\"a\")"]
    );
}

#[test]
fn unknown_fields_and_type_errors_are_parse_errors_with_location() {
    let text = "schema = 1\n[edge]\npopp = \"x\"\n";
    match Config::from_toml_str(text) {
        Err(ConfigError::Parse(message)) => {
            assert!(message.contains("popp"), "{message}");
            assert!(message.contains("line 3"), "{message}");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    let text = "schema = 1\n[[routes]]\nname = \"a\"\nhosts = [\"a.test\"]\ntimeouts = { connect = \"5 parsecs\" }\n";
    assert!(
        matches!(Config::from_toml_str(text), Err(ConfigError::Parse(m)) if m.contains("unknown unit"))
    );
}

#[test]
fn the_demo_config_is_valid() {
    let text = include_str!("../../examples/local.toml");
    let config = Config::from_toml_str(text).expect("local.toml validates");
    assert_eq!(config.regions.len(), 8);
    assert_eq!(config.edge.limits.max_header_bytes, 32 * 1024);
}

#[test]
fn dns_and_pop_errors_are_reported_with_their_paths() {
    let text = r#"
schema = 1
[[regions]]
name = "r"
location = { lat = 0.0, lon = 0.0 }
upstreams = [{ address = "127.1.1.1:7001" }]

[dns]
listen = "127.0.0.1"
zone = "bad zone!"
answers = 0
default_pops = ["nowhere"]
limits = { max_udp_payload = 100 }
[[dns.records]]
name = "api"
pops = ["seoul", "atlantis"]
weights = { seoul = 0 }
[[dns.records]]
name = "api"

[[pops]]
name = "seoul"
location = { lat = 37.57, lon = 126.98 }
addresses = ["127.2.6.1"]
health = "https://127.1.6.1/healthz"
[[pops]]
name = "tokyo"
location = { lat = 35.68, lon = 239.69 }
addresses = ["x", "127.2.7.1", "127.2.7.1"]
[[pops]]
name = "seoul"
location = { lat = 0.0, lon = 0.0 }
addresses = []
"#;
    let errors = errors_of(text);
    let expected = [
        "pops[0].health: bad health URL \"https://127.1.6.1/healthz\" (expected http://ip:port/path, e.g. \"http://10.0.0.5:8080/healthz\")",
        "pops[1].location.lon: longitude 239.69 is out of range [-180, 180]",
        "pops[1].addresses[0]: bad address \"x\" (expected an IPv4 or IPv6 address, no port)",
        "pops[1].addresses[2]: duplicate address 127.2.7.1 (also pops[1].addresses[1])",
        "pops[2].name: duplicate pop name \"seoul\" (first defined at pops[0])",
        "pops[2].addresses: a pop needs at least one address",
        "dns.listen: bad address \"127.0.0.1\" (expected ip:port, e.g. \"127.0.0.1:5353\")",
        "dns.zone: bad zone \"bad zone!\" (expected a DNS name like \"example.com\")",
        "dns.answers: must be between 1 and 16",
        "dns.default_pops[0]: unknown pop \"nowhere\"",
        "dns.records[0].pops[1]: unknown pop \"atlantis\"",
        "dns.records[0].weights.seoul: must be between 1 and 100",
        "dns.records[1].name: duplicate record \"api\" (first defined at dns.records[0])",
        "dns.limits.max_udp_payload: must be between 512 and 4096",
    ];
    assert_eq!(errors, expected);
}

#[test]
fn dns_rate_limiting_and_workers_are_checked() {
    let text = r#"
schema = 1
[[regions]]
name = "r"
location = { lat = 0.0, lon = 0.0 }
upstreams = [{ address = "127.1.1.1:7001" }]

[dns]
zone = "example.test"
workers = 1000
rrl = { responses_per_second = 2000000, slip = 11, ipv4_prefix = 33, ipv6_prefix = 8, max_entries = 0 }

[[pops]]
name = "seoul"
location = { lat = 37.57, lon = 126.98 }
addresses = ["127.2.6.1"]
"#;
    let expected = [
        "dns.rrl.responses_per_second: must be between 0 (off) and 1000000",
        "dns.rrl.slip: must be between 0 (drop all) and 10",
        "dns.rrl.ipv4_prefix: must be between 8 and 32",
        "dns.rrl.ipv6_prefix: must be between 16 and 128",
        "dns.rrl.max_entries: must be between 1 and 10000000",
        "dns.workers: must be between 0 (one per core) and 256",
    ];
    assert_eq!(errors_of(text), expected);
    // The defaults: limiting on at 20/s, slip 2, /24 and /56; workers one per core.
    let config = meridian_config::Config::from_toml_str(&text.replace(
        "workers = 1000\nrrl = { responses_per_second = 2000000, slip = 11, ipv4_prefix = 33, ipv6_prefix = 8, max_entries = 0 }\n",
        "",
    ))
    .expect("valid");
    let dns = config.dns.expect("[dns]");
    assert_eq!(
        (
            dns.rrl.responses_per_second,
            dns.rrl.slip,
            dns.rrl.ipv4_prefix,
            dns.rrl.ipv6_prefix
        ),
        (20, 2, 24, 56)
    );
    assert_eq!(dns.workers, 0);
}

#[test]
fn dns_signing_glue_ecs_health_and_tcp_shares_are_checked() {
    let text = r#"
schema = 1
[[regions]]
name = "r"
location = { lat = 0.0, lon = 0.0 }
upstreams = [{ address = "127.1.1.1:7001" }]

[dns]
zone = "example.test"
ns = ["ns1.example.test", "ns.example.net"]
ecs_max_source_v4 = 33
ecs_max_source_v6 = 0
health = { healthy_after = 0, unhealthy_after = 101 }
limits = { max_tcp_connections = 4, max_tcp_per_address = 5 }
glue = { "ns1.example.test" = ["192.0.2.53", "nope"], "ns.example.net" = ["192.0.2.54"], "ns9.example.test" = [] }
dnssec = { key_file = "", published_key_files = ["", "a.key", "a.key"], algorithm = "RSASHA1" }

[[pops]]
name = "seoul"
location = { lat = 37.57, lon = 126.98 }
addresses = ["127.2.6.1"]
"#;
    let errors = errors_of(text);
    let expected = [
        "dns.limits.max_tcp_per_address: must be between 1 and dns.limits.max_tcp_connections",
        "dns.glue.ns.example.net: \"ns.example.net\" is not inside the zone \"example.test\"",
        "dns.glue.ns1.example.test[1]: bad address \"nope\"",
        "dns.glue.ns9.example.test: \"ns9.example.test\" is not one of the zone's name servers",
        "dns.glue.ns9.example.test: needs at least one address",
        "dns.health.healthy_after: must be between 1 and 100",
        "dns.health.unhealthy_after: must be between 1 and 100",
        "dns.ecs_max_source_v4: must be between 1 and 32",
        "dns.ecs_max_source_v6: must be between 1 and 128",
        "dns.dnssec.key_file: must not be empty",
        "dns.dnssec.algorithm: unsupported algorithm \"RSASHA1\" (supported: \"ECDSAP256SHA256\")",
        "dns.dnssec.published_key_files[0]: must not be empty",
        "dns.dnssec.published_key_files[2]: \"a.key\" is listed twice",
    ];
    assert_eq!(errors, expected);
}
