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

/// `meridian serve --config FILE` picks up edits to FILE and SIGHUP, through the same
/// validate/compile/swap path; an invalid edit is refused and the edge keeps serving.
#[test]
fn serve_reloads_its_file_on_change_and_on_sighup() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let http = free_port();
    let admin = free_port();
    let write_config = |pop: &str, lat: &str| {
        let text = format!(
            r#"schema = 1
[edge]
pop = "{pop}"
http = "127.0.0.1:{http}"
admin = "127.0.0.1:{admin}"
threads = 1
[[regions]]
name = "only"
location = {{ lat = {lat}, lon = 0.0 }}
upstreams = [{{ address = "127.0.0.1:9" }}]
[[routes]]
name = "api"
hosts = ["api.example.test"]
"#
        );
        let path = dir.path().join("edge.toml");
        let tmp = dir.path().join("edge.toml.tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        path
    };
    let path = write_config("first", "0.0");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["serve", "--config", path.to_str().expect("path")])
        .env("MERIDIAN_LOG", "warn")
        .spawn()
        .expect("spawn meridian serve");
    let snapshot = |admin: u16| -> Option<serde_json::Value> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin)).ok()?;
        stream
            .write_all(
                b"GET /admin/snapshot HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()
    };
    let wait_for_pop = |pop: &str| -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let seen = snapshot(admin).and_then(|s| s["pop"].as_str().map(str::to_string));
            if seen.as_deref() == Some(pop) || std::time::Instant::now() > deadline {
                return seen.unwrap_or_default();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    assert_eq!(wait_for_pop("first"), "first");
    write_config("second", "0.0");
    assert_eq!(wait_for_pop("second"), "second", "file change picked up");
    // An invalid edit (latitude 99) is refused; the edge stays on "second".
    write_config("broken", "99.0");
    // SIGHUP forces a reload of a valid edit even if the change detector has not run yet.
    write_config("third", "1.0");
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    assert_eq!(wait_for_pop("third"), "third");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "SIGHUP must not stop the edge"
    );
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert!(status.success(), "SIGINT stops cleanly: {status:?}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `meridian dns --config FILE --metrics ADDR` answers queries and exposes its own `/metrics`
/// (the GeoDNS series) and `/healthz`, so a standalone GeoDNS server can be scraped too.
#[test]
fn standalone_dns_serves_metrics() {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let dns_port = free_udp_port();
    let metrics_port = free_port();
    let mut config = meridian_config::Config::from_toml_str(meridian_testkit::LOCAL_CONFIG)
        .expect("demo config");
    config.geoip.database = None; // every client gets the default PoPs
    config.dns.as_mut().expect("[dns]").listen = format!("127.0.0.1:{dns_port}");
    let path = dir.path().join("dns.toml");
    std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["dns", "--config", path.to_str().expect("path")])
        .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
        .env("MERIDIAN_LOG", "warn")
        .spawn()
        .expect("spawn meridian dns");
    let scrape = |path: &str| -> Option<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        Some(text)
    };
    // Readiness: the metrics listener binds after the DNS sockets.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while scrape("/healthz").is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let healthz = scrape("/healthz").expect("metrics listener up");
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");

    let mut query = Message::query();
    query.metadata.recursion_desired = false;
    query.add_query(Query::query(
        Name::from_ascii("api.example.test.").expect("name"),
        RecordType::A,
    ));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    socket
        .send_to(&query.to_vec().expect("encode"), ("127.0.0.1", dns_port))
        .expect("send");
    let mut buffer = [0u8; 1500];
    let len = socket.recv(&mut buffer).expect("an answer");
    let reply = Message::from_vec(&buffer[..len]).expect("decode");
    assert!(!reply.answers.is_empty(), "{reply:?}");

    // A UDP worker publishes its counts within moments of answering: scrape until it has.
    let counted = r#"meridian_dns_queries_total{qtype="A",rcode="NOERROR",transport="udp"} 1"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let metrics = loop {
        let metrics = scrape("/metrics").expect("metrics");
        if metrics.contains(counted) || std::time::Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(metrics.contains(counted), "{metrics}");
    assert!(metrics.contains("meridian_pop_healthy{"), "{metrics}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert!(status.success(), "SIGTERM stops cleanly: {status:?}");
}

/// A loopback port free for UDP and for TCP alike: the DNS server binds both on it, and a port
/// only probed for UDP may be some test's outgoing TCP connection.
fn free_udp_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
        let port = udp.local_addr().expect("local address").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
