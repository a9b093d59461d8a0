//! The `meridian` binary as an operator runs it.

use std::process::Command;

fn meridian(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(args)
        .env("MERIDIAN_LOG", "error")
        .output()
        .expect("run meridian")
}

#[test]
fn config_validate_prints_every_error_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"schema = 1
[[regions]]
name = "us-east"
location = { lat = 38.9, lon = -200.0 }
upstreams = [{ address = "nope" }]
[[routes]]
name = "api"
hosts = ["api.example.test"]
regions = ["ap-sout-1"]
"#,
    )
    .expect("write");
    let out = meridian(&["config", "validate", bad.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for wanted in [
        "regions[0].location.lon: longitude -200 is out of range",
        "regions[0].upstreams[0].address: bad address \"nope\"",
        "routes[0].regions[0]: unknown region \"ap-sout-1\"",
        "3 error(s)",
    ] {
        assert!(stderr.contains(wanted), "missing {wanted:?} in:\n{stderr}");
    }
}

#[test]
fn config_validate_accepts_the_demo_config_in_one_line() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/local.toml");
    let out = meridian(&["config", "validate", path]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("ok (schema 1, 8 regions, 4 routes, 1 residency rules"),
        "{stdout}"
    );
}

#[test]
fn geoip_build_and_lookup_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("world.mmdb");
    let db = db.to_str().expect("path");
    let out = meridian(&["geoip", "build-test-world", db]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = meridian(&["geoip", "lookup", "127.16.4.2", "--db", db]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["country"], "PH");
    assert_eq!(json["latitude"], 14.6);
    let out = meridian(&["geoip", "lookup", "127.0.0.1", "--db", db]);
    assert_eq!(out.status.code(), Some(3), "unknown address");
}
