//! `--slow` (slowloris) against a real edge, started in-process on ephemeral ports with a 1 s
//! `client_header_timeout`: every trickling connection is answered 408 and closed by the edge.
//! Only counts are asserted; the cap (`--slow-for`) just bounds the run if the edge never closes.

use meridian_gateway::core::SnapshotMeta;
use meridian_gateway::edge::{EdgeOptions, RunningEdge};

mod common;

use common::u;

/// One route to an upstream that is never reached: a head that never completes is never routed.
const CONFIG: &str = r#"
schema = 1

[edge]
pop = "slowloris-test"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"
threads = 1
shutdown_grace = "0s"
shutdown_timeout = "1s"

[edge.limits]
client_header_timeout = "1s"

[[regions]]
name = "only"
location = { lat = 50.1, lon = 8.68 }
upstreams = [{ address = "127.0.0.1:9", weight = 1 }]

[[routes]]
name = "all"
hosts = ["slow.example.test"]
path_prefix = "/"
kind = "api"
regions = ["only"]
default_region = "only"
"#;

#[test]
fn slow_heads_are_closed_by_the_edge_with_408() {
    let config = meridian_config::Config::from_toml_str(CONFIG).expect("test config is valid");
    // Listening when start returns; dropping it stops the edge.
    let edge = RunningEdge::start(EdgeOptions {
        config,
        meta: SnapshotMeta {
            version: 0,
            hash: meridian_config::content_hash(CONFIG),
        },
        handle_signals: false,
        watch_file: None,
        base_dir: None,
    })
    .expect("start the edge");
    let url = format!("http://{}/", edge.http_addr);
    let (output, report) = common::run_load(&[
        &url,
        "--host",
        "slow.example.test",
        "--slow",
        "20",
        "--slow-interval",
        "200ms",
        "--slow-for",
        "60s",
    ]);
    assert_eq!(report["mode"], "slow");
    assert_eq!(u(&report, "/connections"), 20, "{report:#}");
    assert_eq!(u(&report, "/opened"), 20, "{report:#}");
    assert_eq!(u(&report, "/connect_failed"), 0, "{report:#}");
    assert_eq!(u(&report, "/closed_by_server"), 20, "{report:#}");
    assert_eq!(u(&report, "/still_open_at_cap"), 0, "{report:#}");
    assert_eq!(u(&report, "/answers/408"), 20, "{report:#}");
    assert_eq!(u(&report, "/time_to_close_ms/count"), 20, "{report:#}");
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("408=20"), "summary: {summary}");
    drop(edge);
}
