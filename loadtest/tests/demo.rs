//! The generator against the real demo (`meridian_gateway::demo`, started in-process): HTTP/3
//! through the shared h3 client, `--reconnect`, and SSE token streams from the demo's model
//! servers. Counts and distributions are exact; no timing assertions.
//!
//! The demo listens on fixed ports (examples/local.toml: 8080, 8443 tcp+udp, 9901, 7070, 7071,
//! 5353), so everything that needs it is in this one test function: two demos never run at once.

use std::path::Path;

use meridian_gateway::demo::{self, DemoOptions};
use serde_json::Value;

mod common;

use common::u;
const HTTPS: &str = "https://127.0.0.1:8443";

/// No transport errors, no 4xx/5xx, and every request answered.
fn assert_clean(report: &Value, n: u64) {
    assert_eq!(u(report, "/requests/issued"), n, "{report:#}");
    assert_eq!(u(report, "/requests/responses"), n, "{report:#}");
    assert_eq!(u(report, "/status/2xx"), n, "{report:#}");
    assert_eq!(u(report, "/errors/total"), 0, "{report:#}");
}

#[test]
fn h3_and_sse_scenarios_run_against_the_demo() {
    let data = tempfile::tempdir().expect("tempdir");
    // Started (and every listener ready) when start returns; dropping it stops everything.
    let demo = demo::start(DemoOptions {
        data_dir: data.path().to_path_buf(),
        ..Default::default()
    })
    .expect("start the demo (are its fixed ports 8080/8443/9901/7070/7071/5353 free?)");
    assert_eq!(
        demo.edge.https_addr.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:8443"),
        "examples/local.toml serves HTTPS and HTTP/3 on 8443"
    );
    let ca = path(&demo.world.ca_file);
    let tls = |host: &'static str| {
        ["--cacert", ca.as_str(), "--sni", host, "--host", host].map(String::from)
    };
    let api = tls("api.example.test");
    let inference = tls("inference.example.test");
    let args = |fixed: &[&str], tls: &[String]| -> Vec<String> {
        fixed
            .iter()
            .map(|s| s.to_string())
            .chain(tls.iter().cloned())
            .collect()
    };
    let run = |args: Vec<String>| {
        common::run_load(&args.iter().map(String::as_str).collect::<Vec<_>>()).1
    };

    // HTTP/3, two lanes per QUIC connection, clients in three countries.
    let url = format!("{HTTPS}/hello");
    let report = run(args(
        &[
            &url,
            "-p",
            "h3",
            "-n",
            "60",
            "-c",
            "4",
            "--streams",
            "2",
            "--geo-mix",
            "MX=2,JP=1,KR=1",
        ],
        &api,
    ));
    assert_eq!(report["protocol"], "h3");
    assert_eq!(report["tls"], true);
    assert_clean(&report, 60);
    assert_eq!(u(&report, "/geo/MX"), 30);
    assert_eq!(u(&report, "/geo/JP"), 15);
    assert_eq!(u(&report, "/geo/KR"), 15);
    // Mexico -> Querétaro; Japan has no region, its nearest is Seoul; Korea stays in Seoul.
    assert_eq!(u(&report, "/regions/mx-central"), 30, "{report:#}");
    assert_eq!(u(&report, "/regions/ap-northeast-2"), 30, "{report:#}");
    assert_eq!(report["regions"].as_object().map(|m| m.len()), Some(2));
    // Four QUIC connections, opened before the clock started, shared by their two lanes.
    assert_eq!(u(&report, "/connections"), 4);
    assert_eq!(u(&report, "/connections_opened"), 4);

    // --reconnect: a QUIC handshake per request.
    let report = run(args(
        &[
            &url,
            "-p",
            "h3",
            "-n",
            "20",
            "-c",
            "2",
            "--reconnect",
            "--geo-mix",
            "DE=1",
        ],
        &api,
    ));
    assert_eq!(report["reconnect"], true);
    assert_clean(&report, 20);
    assert_eq!(u(&report, "/connections_opened"), 20);
    assert_eq!(u(&report, "/regions/eu-central-1"), 20, "{report:#}");

    // The same over TCP + TLS (h2): a TCP and TLS handshake per request.
    let report = run(args(
        &[&url, "-p", "h2", "-n", "10", "-c", "2", "--reconnect"],
        &api,
    ));
    assert_clean(&report, 10);
    assert_eq!(u(&report, "/connections_opened"), 10);

    // SSE token streams from the demo's model servers over HTTP/3 (qwen-turbo is served in
    // Mexico, so Mexican clients stay there), few tokens so the streams are short.
    let dir = tempfile::tempdir().expect("tempdir");
    let body = dir.path().join("chat.json");
    std::fs::write(
        &body,
        r#"{"model":"qwen-turbo","stream":true,"max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .expect("write body");
    let body = path(&body);
    let sse = |base: &str, protocol: &str, tls: &[String]| {
        let url = format!("{base}/v1/chat/completions");
        let mut fixed = vec![
            url.as_str(),
            "-p",
            protocol,
            "--scenario",
            "sse",
            "-m",
            "POST",
            "--body-file",
            &body,
            "-H",
            "content-type: application/json",
            "-n",
            "4",
            "-c",
            "2",
            "--geo-mix",
            "MX=1",
        ];
        if tls.is_empty() {
            fixed.extend(["--host", "inference.example.test"]);
        }
        run(args(&fixed, tls))
    };
    for (name, report) in [
        ("h3", sse(HTTPS, "h3", &inference)),
        ("h1", sse("http://127.0.0.1:8080", "h1", &[])),
    ] {
        assert_clean(&report, 4);
        assert_eq!(u(&report, "/sse/streams"), 4, "{name}: {report:#}");
        // Per stream: 3 token events, the usage event and `data: [DONE]`.
        assert_eq!(u(&report, "/sse/events"), 4 * 5, "{name}: {report:#}");
        assert_eq!(u(&report, "/sse/ttfb_ms/count"), 4, "{name}: {report:#}");
        assert_eq!(u(&report, "/regions/mx-central"), 4, "{name}: {report:#}");
    }

    drop(demo);
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
