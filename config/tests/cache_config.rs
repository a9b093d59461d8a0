//! `[edge.cache]`, `[edge.admin]` (table form with `token_file`) and per-route `cache = { ... }`.

use std::time::Duration;

use meridian_config::{Config, ConfigError};

const BASE: &str = r#"
schema = 1
[[regions]]
name = "us-east"
location = { lat = 38.9, lon = -77.0 }
upstreams = [{ address = "127.1.2.1:7001" }]
"#;

fn parse(extra: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(&format!("{BASE}{extra}"))
}

fn errors(extra: &str) -> Vec<String> {
    match parse(extra) {
        Err(ConfigError::Invalid(errors)) => errors.iter().map(|e| e.to_string()).collect(),
        other => panic!("expected validation errors, got {other:?}"),
    }
}

#[test]
fn defaults_are_safe() {
    let config = parse("").expect("valid");
    assert!(config.edge.cache.enabled);
    assert_eq!(config.edge.cache.max_bytes, 256 * 1024 * 1024);
    assert_eq!(config.edge.cache.max_object_bytes, 8 * 1024 * 1024);
    assert_eq!(&*config.edge.admin, "127.0.0.1:9901");
    assert_eq!(config.edge.admin.token_file, None);
}

#[test]
fn full_cache_config_parses() {
    let config = parse(
        r#"
[edge]
[edge.admin]
listen = "127.0.0.1:9911"
token_file = "/etc/meridian/admin.token"
[edge.cache]
max_bytes = 1048576
max_object_bytes = 65536
coalesce_timeout = "2s"

[[routes]]
name = "static"
hosts = ["static.example.test"]
cache = { enabled = true, default_ttl = "5m", stale_while_revalidate = "30s", stale_if_error = "1h", key = { ignore_query = ["utm_source"], headers = ["X-Tenant"] } }
"#,
    )
    .expect("valid");
    assert_eq!(&*config.edge.admin, "127.0.0.1:9911");
    assert_eq!(
        config.edge.admin.token_file.as_deref(),
        Some("/etc/meridian/admin.token")
    );
    assert_eq!(
        config.edge.cache.coalesce_timeout.as_duration(),
        Duration::from_secs(2)
    );
    let cache = &config.routes[0].cache;
    assert!(cache.enabled && !cache.allow_authorization && !cache.allow_set_cookie);
    assert_eq!(
        cache.default_ttl.map(|d| d.as_duration()),
        Some(Duration::from_secs(300))
    );
    assert_eq!(cache.key.headers, vec!["X-Tenant".to_string()]);
    // Round trip through TOML keeps the table form.
    let text = toml::to_string(&config).expect("serialize");
    let again: Config = toml::from_str(&text).expect("reparse");
    assert_eq!(again, config);
}

#[test]
fn set_cookie_storage_is_opted_into_by_store_set_cookie() {
    for key in ["store_set_cookie", "allow_set_cookie"] {
        let config = parse(&format!(
            "[[routes]]\nname = \"r\"\nhosts = [\"r.example.test\"]\ncache = {{ enabled = true, {key} = true }}\n"
        ))
        .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(config.routes[0].cache.allow_set_cookie, "{key}");
    }
}

#[test]
fn unknown_fields_are_errors() {
    assert!(matches!(
        parse("[edge.cache]\nmax_byte = 1\n"),
        Err(ConfigError::Parse(_))
    ));
    assert!(matches!(
        parse("[edge.admin]\ntoken = \"x\"\n"),
        Err(ConfigError::Parse(_))
    ));
}

#[test]
fn every_cache_error_has_its_path() {
    let errs = errors(
        r#"
[edge.admin]
token_file = " "
[edge.cache]
max_bytes = 10
max_object_bytes = 100
coalesce_timeout = "0s"
max_ranges = 0

[[routes]]
name = "api"
hosts = ["api.example.test"]
cache = { enabled = true, default_ttl = "0s", stale_if_error = "30h", key = { ignore_query = ["a", "a", "b=c"], headers = ["Connection", "x-t", "X-T", "bad header"] } }
"#,
    );
    let expected = [
        "edge.cache.max_bytes: must be at least edge.cache.max_object_bytes (100)",
        "edge.cache.coalesce_timeout: must be between 1ms and 60s",
        "edge.cache.max_ranges: must be between 1 and 1024",
        "edge.admin.token_file: must not be empty",
        "routes[0].cache.default_ttl: must be between 1s and 7 days",
        "routes[0].cache.key.ignore_query[1]: \"a\" listed twice",
        "routes[0].cache.key.ignore_query[2]: bad query parameter name",
        "routes[0].cache.key.headers[0]: hop-by-hop header",
        "routes[0].cache.key.headers[2]: header \"X-T\" listed twice",
        "routes[0].cache.key.headers[3]: bad header name",
    ];
    for want in expected {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in {errs:#?}"
        );
    }
    assert!(
        !errs.iter().any(|e| e.contains("stale_if_error")),
        "30h is within 7 days"
    );
}

#[test]
fn rfc_options_parse_and_are_checked() {
    let config = parse(
        r#"
[edge.cache]
targeted = ["Meridian-Cache-Control", "CDN-Cache-Control"]

[[routes]]
name = "static"
hosts = ["static.example.test"]
cache = { enabled = true, allow_cookie = true, heuristic = true, heuristic_max = "1h" }
"#,
    )
    .expect("valid");
    assert_eq!(config.edge.cache.targeted.len(), 2);
    let cache = &config.routes[0].cache;
    assert!(cache.allow_cookie && cache.heuristic);
    assert_eq!(
        cache.heuristic_max.map(|d| d.as_duration()),
        Some(Duration::from_secs(3600))
    );
    let defaults = parse("").expect("valid");
    assert_eq!(defaults.edge.cache.targeted, vec!["CDN-Cache-Control"]);
    assert_eq!(defaults.edge.cache.max_ranges, 16);
    let errs = errors(
        r#"
[edge.cache]
targeted = ["CDN-Cache-Control", "cdn-cache-control", "Cache-Control", "bad name"]

[[routes]]
name = "static"
hosts = ["static.example.test"]
cache = { enabled = true, heuristic = true, heuristic_max = "200h" }
"#,
    );
    for want in [
        "edge.cache.targeted[1]: \"cdn-cache-control\" listed twice",
        "edge.cache.targeted[2]: \"Cache-Control\" is not a targeted",
        "edge.cache.targeted[3]: \"bad name\" is not a targeted",
        "routes[0].cache.heuristic_max: must be between 1s and 7 days",
    ] {
        assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
    }
}
