//! The generator against its own origin, through the real binary: counts, status and geo
//! distributions are exact for a fixed request count; no timing assertions.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

mod common;

use common::{run_load, u, BIN};

/// A running `meridian-loadtest origin`, killed on drop.
struct Origin {
    child: Child,
    addr: String,
}

impl Origin {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["origin", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start origin");
        let stdout = child.stdout.take().expect("origin stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read origin address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { child, addr }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn closed_loop_counts_status_and_geo_are_exact() {
    let origin = Origin::start(&[]);
    let url = format!("http://{}/hello", origin.addr);
    let (output, report) = run_load(&[
        &url,
        "--requests",
        "200",
        "--connections",
        "8",
        "--geo-mix",
        "MX=30,SG=20,KR=10",
        "--host",
        "api.example.test",
    ]);
    for field in [
        "tool",
        "version",
        "target",
        "method",
        "host",
        "path",
        "protocol",
        "tls",
        "scenario",
        "mode",
        "connections",
        "streams",
        "rate",
        "duration_s",
        "requests_limit",
        "scheduled",
        "geo_mix",
        "elapsed_s",
        "requests",
        "throughput_rps",
        "bytes_received",
        "connects",
        "connections_opened",
        "reconnect",
        "latency_ms",
        "status",
        "status_codes",
        "errors",
        "geo",
        "regions",
        "cache",
        "sse",
    ] {
        assert!(report.get(field).is_some(), "report lacks {field}");
    }
    for q in ["count", "min", "mean", "p50", "p90", "p99", "p99_9", "max"] {
        assert!(
            report["latency_ms"].get(q).is_some(),
            "latency_ms lacks {q}"
        );
    }
    // The generator's own CPU, for the side-by-side script's whole-machine budget: it sent 200
    // requests, so some of it was spent.
    let cpu = &report["process_cpu_s"];
    let (user, system) = (cpu["user"].as_f64(), cpu["system"].as_f64());
    assert!(
        user.zip(system)
            .is_some_and(|(u, s)| u >= 0.0 && s >= 0.0 && u + s > 0.0),
        "process_cpu_s: {cpu}"
    );
    assert_eq!(report["mode"], "closed");
    assert_eq!(report["protocol"], "h1");
    assert_eq!(u(&report, "/requests/issued"), 200);
    assert_eq!(u(&report, "/requests/responses"), 200);
    assert_eq!(u(&report, "/requests/ok"), 200);
    assert_eq!(u(&report, "/requests/failed"), 0);
    assert_eq!(u(&report, "/latency_ms/count"), 200);
    assert_eq!(u(&report, "/status/2xx"), 200);
    assert_eq!(u(&report, "/status/5xx"), 0);
    assert_eq!(u(&report, "/status_codes/200"), 200);
    for kind in [
        "connect",
        "timeout",
        "io",
        "status_4xx",
        "status_5xx",
        "total",
    ] {
        assert_eq!(u(&report, &format!("/errors/{kind}")), 0, "errors.{kind}");
    }
    // 200 requests split 30:20:10.
    assert_eq!(u(&report, "/geo/MX"), 100);
    assert_eq!(u(&report, "/geo/SG"), 67);
    assert_eq!(u(&report, "/geo/KR"), 33);
    assert_eq!(u(&report, "/bytes_received"), 200 * 1024);
    assert_eq!(u(&report, "/connects"), 8);
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("p99.9"), "summary table: {summary}");
    assert!(summary.contains("MX=100"), "summary table: {summary}");
}

#[test]
fn injected_failures_are_counted_as_5xx() {
    let origin = Origin::start(&["--fail-rate", "0.5"]);
    let url = format!("http://{}/", origin.addr);
    let (_, report) = run_load(&[&url, "-n", "200", "-c", "4"]);
    let ok = u(&report, "/status/2xx");
    let failed = u(&report, "/status/5xx");
    assert_eq!(ok + failed, 200);
    assert!(
        failed > 0 && ok > 0,
        "fail-rate 0.5 gave {ok} ok / {failed} 5xx"
    );
    assert_eq!(u(&report, "/status_codes/503"), failed);
    assert_eq!(u(&report, "/errors/status_5xx"), failed);
    assert_eq!(u(&report, "/requests/failed"), failed);
    assert_eq!(u(&report, "/errors/connect") + u(&report, "/errors/io"), 0);
}

#[test]
fn open_loop_issues_exactly_the_scheduled_requests() {
    let origin = Origin::start(&[]);
    let url = format!("http://{}/", origin.addr);
    let (_, report) = run_load(&[
        &url,
        "--rate",
        "400",
        "-n",
        "100",
        "-c",
        "4",
        "--geo-mix",
        "DE=1,MX=3",
    ]);
    assert_eq!(report["mode"], "open");
    assert_eq!(u(&report, "/scheduled"), 100);
    assert_eq!(u(&report, "/requests/issued"), 100);
    assert_eq!(u(&report, "/requests/responses"), 100);
    assert_eq!(u(&report, "/status/2xx"), 100);
    assert_eq!(u(&report, "/geo/DE"), 25);
    assert_eq!(u(&report, "/geo/MX"), 75);
}

#[test]
fn open_loop_schedule_from_rate_and_duration() {
    let origin = Origin::start(&[]);
    let url = format!("http://{}/", origin.addr);
    let (_, report) = run_load(&[&url, "--rate", "100", "--duration", "500ms", "-c", "2"]);
    assert_eq!(u(&report, "/scheduled"), 50);
    assert_eq!(u(&report, "/requests/issued"), 50);
    assert_eq!(u(&report, "/requests/responses"), 50);
}

#[test]
fn sse_streams_count_events_and_first_bytes() {
    let origin = Origin::start(&["--sse-events", "5", "--sse-interval", "1ms"]);
    let url = format!("http://{}/", origin.addr);
    let (_, report) = run_load(&[&url, "--scenario", "sse", "-n", "10", "-c", "2"]);
    assert_eq!(report["method"], "POST");
    assert_eq!(report["path"], "/v1/chat/completions");
    assert_eq!(u(&report, "/sse/streams"), 10);
    // 5 token events and the closing `data: [DONE]` per stream.
    assert_eq!(u(&report, "/sse/events"), 60);
    assert_eq!(u(&report, "/sse/ttfb_ms/count"), 10);
    assert_eq!(u(&report, "/sse/ttlb_ms/count"), 10);
}

#[test]
fn h2c_streams_share_connections() {
    let origin = Origin::start(&[]);
    let url = format!("http://{}/", origin.addr);
    let (_, report) = run_load(&[&url, "-p", "h2", "--streams", "3", "-c", "2", "-n", "60"]);
    assert_eq!(report["protocol"], "h2");
    assert_eq!(u(&report, "/requests/responses"), 60);
    assert_eq!(u(&report, "/status/2xx"), 60);
    assert_eq!(u(&report, "/connects"), 2);
}

#[test]
fn body_file_is_sent_with_post() {
    let origin = Origin::start(&["--body-bytes", "10"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let body = dir.path().join("body.bin");
    std::fs::write(&body, vec![b'a'; 16 * 1024]).expect("write body");
    let url = format!("http://{}/upload?bytes=3", origin.addr);
    let body_arg = body.to_string_lossy().to_string();
    let (_, report) = run_load(&[
        &url,
        "-m",
        "POST",
        "--body-file",
        &body_arg,
        "-n",
        "20",
        "-c",
        "2",
        "-H",
        "x-test: 1",
    ]);
    assert_eq!(report["method"], "POST");
    assert_eq!(u(&report, "/status/2xx"), 20);
    assert_eq!(u(&report, "/bytes_received"), 20 * 3);
}

#[test]
fn refused_connections_are_connect_errors() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}/");
    let (_, report) = run_load(&[&url, "-n", "5", "-c", "1"]);
    assert_eq!(u(&report, "/errors/connect"), 5);
    assert_eq!(u(&report, "/requests/responses"), 0);
    assert_eq!(u(&report, "/requests/failed"), 5);
}

#[test]
fn tls_h2_with_cacert() {
    use meridian_testkit::devcerts::{self, DevCa};
    let dir = tempfile::tempdir().expect("tempdir");
    let authority = DevCa::new("loadtest CA").expect("ca");
    let ca = dir.path().join("ca.pem");
    devcerts::write(&ca, &authority.pem).expect("write ca");
    let (cert, key) = authority
        .leaf(&["localhost"])
        .expect("leaf cert")
        .write(dir.path(), "localhost")
        .expect("write leaf");
    let path = |p: &Path| p.to_string_lossy().to_string();
    let origin = Origin::start(&["--tls-cert", &path(&cert), "--tls-key", &path(&key)]);
    let url = format!("https://{}/", origin.addr);
    for protocol in ["h2", "h1"] {
        let (_, report) = run_load(&[
            &url,
            "-p",
            protocol,
            "--cacert",
            &path(&ca),
            "--sni",
            "localhost",
            "-n",
            "20",
            "-c",
            "2",
        ]);
        assert_eq!(report["tls"], true);
        assert_eq!(u(&report, "/status/2xx"), 20, "{protocol}: {report:#}");
    }
}

#[test]
fn h3_needs_an_https_url() {
    let output = Command::new(BIN)
        .args(["http://127.0.0.1:9/", "-p", "h3", "-n", "1"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("https://"));
}

#[test]
fn reconnect_opens_a_connection_per_request() {
    let origin = Origin::start(&[]);
    let url = format!("http://{}/", origin.addr);
    for protocol in ["h1", "h2"] {
        let (_, report) = run_load(&[&url, "-p", protocol, "-n", "30", "-c", "3", "--reconnect"]);
        assert_eq!(report["reconnect"], true);
        assert_eq!(u(&report, "/status/2xx"), 30, "{protocol}: {report:#}");
        assert_eq!(
            u(&report, "/connections_opened"),
            30,
            "{protocol}: {report:#}"
        );
    }
    let (_, report) = run_load(&[&url, "-n", "30", "-c", "3"]);
    assert_eq!(report["reconnect"], false);
    assert_eq!(u(&report, "/connections_opened"), 3);
}

#[test]
fn idle_mode_holds_answered_connections() {
    let origin = Origin::start(&[]);
    let url = format!("http://{}/hello", origin.addr);
    let (output, report) = run_load(&[&url, "--idle", "30", "--idle-for", "0s"]);
    assert_eq!(report["mode"], "idle");
    assert_eq!(u(&report, "/opened"), 30, "{report:#}");
    assert_eq!(u(&report, "/connect_failed"), 0, "{report:#}");
    assert_eq!(u(&report, "/request_failed"), 0, "{report:#}");
    assert_eq!(u(&report, "/status_codes/200"), 30, "{report:#}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("ready: 30 idle connections open"),
        "the ready line comes first: {stdout}"
    );
}
