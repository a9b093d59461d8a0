//! Access logs: one JSON line per request through `tracing` (target
//! `meridian::access`), with W3C `traceparent` propagated upstream or generated.

use std::io::Write;
use std::sync::{Arc, Mutex};

use meridian_gateway::access_log::{is_access_log, AccessLogLayer};
use meridian_tests::{local_config, source_for, Protocol, Secure, World};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The in-memory sink the access-log layer writes to in this test process.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer").extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn lines(&self) -> Vec<serde_json::Value> {
        let data = self.0.lock().expect("buffer").clone();
        String::from_utf8(data)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits (bounded) for `n` lines: the edge logs just after the response is written.
    fn wait_for(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let lines = self.lines();
            if lines.len() >= n || std::time::Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// The process-wide sink (one global subscriber per test process; shared when tests share one).
fn install_sink() -> Buffer {
    static SINK: std::sync::OnceLock<Buffer> = std::sync::OnceLock::new();
    SINK.get_or_init(|| {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        tracing_subscriber::registry()
            .with(
                AccessLogLayer::new(move || writer.clone())
                    .with_filter(tracing_subscriber::filter::filter_fn(is_access_log)),
            )
            .try_init()
            .expect("first subscriber of this test process");
        buffer
    })
    .clone()
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[test]
fn access_log_lines_carry_request_facts_and_trace_context() {
    let sink = install_sink();
    let mut config = local_config();
    config.edge.access_log.enabled = true;
    let world = World::start(config);

    let traceparent = format!("00-{CLIENT_TRACE}-00f067aa0ba902b7-01");
    let with_trace = world.request(
        Protocol::Http1,
        source_for("MX"),
        "api.example.test",
        "/orders?id=7",
        &[("traceparent", &traceparent), ("x-request-id", "req-mx-1")],
    );
    assert_eq!(with_trace.status, 200);
    let echoed = with_trace.json();
    assert_eq!(echoed["traceparent"], traceparent.as_str(), "{echoed}");

    let without = world.get_from("DE", "api.example.test", "/v2/items");
    assert_eq!(without.status, 200);
    let echoed_new = without.json();
    let generated = echoed_new["traceparent"]
        .as_str()
        .expect("origin saw a generated traceparent")
        .to_string();
    let generated_trace = meridian_gateway::access_log::trace_id(&generated)
        .expect("well-formed generated traceparent")
        .to_string();
    assert!(
        generated.starts_with("00-") && generated.ends_with("-01"),
        "{generated}"
    );

    let lines = sink.wait_for(2);
    let mx = lines
        .iter()
        .find(|l| l["path"] == "/orders")
        .expect("line for /orders");
    assert_eq!(mx["trace_id"], CLIENT_TRACE, "{mx}");
    assert_eq!(mx["traceparent"], traceparent.as_str());
    assert_eq!(mx["request_id"], "req-mx-1");
    assert_eq!(mx["client_country"], "MX");
    assert_eq!(mx["route"], "api");
    assert_eq!(mx["region"], "mx-central");
    assert_eq!(mx["upstream"], echoed["upstream"]);
    assert_eq!(mx["protocol"], "h1");
    assert_eq!(mx["method"], "GET");
    assert_eq!(mx["status"], 200);
    assert_eq!(
        mx["bytes_sent"].as_u64(),
        Some(with_trace.body.len() as u64)
    );
    assert!(
        mx["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{mx}"
    );
    let total = mx["duration_ms"].as_f64().expect("duration_ms");
    let first_byte = mx["first_byte_ms"].as_f64().expect("first_byte_ms");
    let connect = mx["upstream_connect_ms"]
        .as_f64()
        .expect("upstream_connect_ms");
    assert!(
        0.0 <= connect && connect <= first_byte && first_byte <= total,
        "{mx}"
    );

    let de = lines
        .iter()
        .find(|l| l["path"] == "/v2/items")
        .expect("line for /v2/items");
    assert_eq!(de["trace_id"], generated_trace.as_str(), "{de}");
    assert_eq!(de["traceparent"], generated.as_str());
    assert_eq!(de["request_id"], echoed_new["x_request_id"]);
    assert_eq!(de["client_country"], "DE");
    assert_eq!(de["region"], "eu-central-1");
    assert!(de.get("cache").is_some(), "{de}");

    // The HTTP/3 front logs through the same function and propagates the client's trace.
    let h3_trace = "0af7651916cd43dd8448eb211c80319c";
    let h3_parent = format!("00-{h3_trace}-b7ad6b7169203331-01");
    let h3 = world.secure_request(
        Secure::H3,
        source_for("SG"),
        "api.example.test",
        "/over-quic",
        &[("traceparent", &h3_parent)],
    );
    assert_eq!(h3.status, 200);
    assert_eq!(h3.json()["traceparent"], h3_parent.as_str());
    let lines = sink.wait_for(3);
    let quic = lines
        .iter()
        .find(|l| l["path"] == "/over-quic")
        .expect("line for the h3 request");
    assert_eq!(quic["protocol"], "h3", "{quic}");
    assert_eq!(quic["trace_id"], h3_trace);
    assert_eq!(quic["client_country"], "SG");
    assert_eq!(quic["region"], "ap-southeast-1");
    assert_eq!(quic["upstream"], h3.json()["upstream"]);
    assert_eq!(quic["bytes_sent"].as_u64(), Some(h3.body.len() as u64));
    assert!(quic["first_byte_ms"].as_f64().is_some(), "{quic}");

    // A refusal never reaches an upstream and is logged too (no upstream fields).
    let unknown = world.get_from("US", "nobody.example.test", "/");
    assert_eq!(unknown.status, 421);
    let lines = sink.wait_for(4);
    let refused = lines
        .iter()
        .find(|l| l["status"] == 421)
        .expect("line for the refusal");
    assert!(
        refused["upstream"].is_null() && refused["route"].is_null(),
        "{refused}"
    );
}

#[test]
fn access_log_is_off_by_default() {
    let sink = install_sink();
    let world = World::start(local_config());
    let reply = world.get_from("US", "api.example.test", "/not-logged");
    assert_eq!(reply.status, 200);
    // Trace context still propagates with logging off.
    assert!(reply.json()["traceparent"].as_str().is_some());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let lines = sink.lines();
    assert!(
        !lines.iter().any(|l| l["path"] == "/not-logged"),
        "{lines:?}"
    );
}

#[test]
fn access_log_sample_is_validated_with_its_path() {
    let mut config = local_config();
    config.edge.access_log.sample = 1.5;
    let document = toml::to_string(&config).expect("serializes");
    let error = meridian_config::Config::from_toml_str(&document)
        .expect_err("sample over 1 is rejected")
        .to_string();
    assert!(error.contains("edge.access_log.sample"), "{error}");
    let unknown = document.replace("[edge.access_log]", "[edge.access_log]\nsampel = 0.5");
    assert!(meridian_config::Config::from_toml_str(&unknown).is_err());
}
