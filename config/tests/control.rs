//! `[control]`: a config service URL (http or https, with a CA file) or etcd endpoints, never both.

use meridian_config::{Config, ConfigError};

const BASE: &str = r#"schema = 1
[[regions]]
name = "us-east"
location = { lat = 38.9, lon = -77.0 }
upstreams = [{ address = "127.1.2.1:7001" }]
[[routes]]
name = "api"
hosts = ["api.example.test"]
regions = "*"
"#;

fn errors(control: &str) -> Vec<String> {
    match Config::from_toml_str(&format!("{BASE}[control]\n{control}")) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid(errors)) => errors.iter().map(|e| e.to_string()).collect(),
        Err(e) => vec![e.to_string()],
    }
}

#[test]
fn a_service_url_or_etcd_endpoints_but_not_both() {
    assert!(errors("url = \"http://127.0.0.1:7070\"\ncache_dir = \"c\"").is_empty());
    assert!(errors(
        "url = \"https://config.internal:7070\"\nca_file = \"ca.pem\"\ncache_dir = \"c\""
    )
    .is_empty());
    let config = Config::from_toml_str(&format!(
        "{BASE}[control]\netcd = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\ncache_dir = \"c\""
    ))
    .expect("etcd endpoints alone");
    let control = config.control.expect("[control]");
    assert_eq!(
        control.etcd_prefix, "/meridian",
        "the config server's default prefix"
    );
    assert!(control.url.is_empty());

    let both = errors(
        "url = \"http://127.0.0.1:7070\"\netcd = [\"http://10.0.0.1:2379\"]\ncache_dir = \"c\"",
    );
    assert!(
        both.iter().any(|e| e.starts_with("control.etcd")),
        "{both:?}"
    );
    let neither = errors("cache_dir = \"c\"");
    assert!(
        neither.iter().any(|e| e.starts_with("control")),
        "{neither:?}"
    );
    let bad = errors("etcd = [\"10.0.0.1:2379\", \"http://h:1/x\"]\netcd_prefix = \"meridian\"\ncache_dir = \"c\"");
    for path in ["control.etcd[0]", "control.etcd[1]", "control.etcd_prefix"] {
        assert!(bad.iter().any(|e| e.starts_with(path)), "{path}: {bad:?}");
    }
    let ftp = errors("url = \"ftp://h:1\"\ncache_dir = \"c\"");
    assert!(ftp.iter().any(|e| e.starts_with("control.url")), "{ftp:?}");
}
