//! The shipped monitoring is proven against a real Prometheus (Debian `prometheus`, which
//! `test.sh` installs): `promtool` accepts the config and rules and its unit tests fire every
//! alert; every dashboard is well formed and uses catalogued names only; and a real Prometheus
//! scraping a live edge answers every dashboard panel expression and recording rule with data.
//! Nothing here is skipped: without `promtool`/`prometheus` the tests fail and say why.

mod observability;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_tests::{Client, Protocol, World};
use observability::{catalog_families, drive, recording_rules, repo_root, start_world};

const DASHBOARDS: [&str; 5] = [
    "overview.json",
    "regions.json",
    "inference.json",
    "dns.json",
    "config.json",
];

/// `name` on PATH, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: install the Debian `prometheus` package \
                 (`apt-get install prometheus`; `bash test.sh` does it)"
            )
        })
}

fn dashboards_dir() -> PathBuf {
    repo_root().join("dashboards")
}

fn run(program: &Path, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .current_dir(dashboards_dir())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed:\n{}\n{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_accepts_the_example_config_and_both_rule_files() {
    let promtool = tool("promtool");
    run(&promtool, &["check", "config", "prometheus.yml"]);
    run(
        &promtool,
        &["check", "rules", "recording.yml", "alerts.yml"],
    );
}

/// `alert:` names of alerts.yml.
fn alerts() -> Vec<String> {
    std::fs::read_to_string(dashboards_dir().join("alerts.yml"))
        .expect("alerts.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn promtool_unit_tests_fire_every_alert_and_every_alert_has_a_runbook_section() {
    let promtool = tool("promtool");
    let alerts = alerts();
    assert!(alerts.len() >= 9, "{alerts:?}");
    let tests =
        std::fs::read_to_string(dashboards_dir().join("tests/alerts_test.yml")).expect("tests");
    let runbook = std::fs::read_to_string(repo_root().join("docs/runbook.md")).expect("runbook");
    let rules = std::fs::read_to_string(dashboards_dir().join("alerts.yml")).expect("alerts.yml");
    for alert in &alerts {
        // A test case expecting the alert firing: `alertname: X` followed by a non-empty list.
        let fires = tests.split("alertname: ").skip(1).any(|case| {
            case.starts_with(&format!("{alert}\n"))
                && case
                    .lines()
                    .nth(1)
                    .is_some_and(|l| l.trim() == "exp_alerts:")
        });
        assert!(fires, "no test case in alerts_test.yml fires {alert}");
        let anchor = alert.to_ascii_lowercase();
        assert!(
            rules.contains(&format!("runbook_url: \"docs/runbook.md#{anchor}\"")),
            "{alert} has no runbook_url into docs/runbook.md"
        );
        assert!(
            runbook.contains(&format!("\n## {alert}\n")),
            "docs/runbook.md has no `## {alert}` section"
        );
    }
    run(&promtool, &["test", "rules", "tests/alerts_test.yml"]);
}

fn dashboard(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dashboards_dir().join(name)).expect("dashboard file");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
}

/// Every PromQL expression of every panel of `dashboard`, with Grafana's `$__rate_interval`
/// replaced by what Prometheus would get for a short dashboard range.
fn panel_exprs(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push((title.clone(), expr.replace("$__rate_interval", "1m")));
            }
        }
    }
    exprs
}

/// `meridian_…` and `meridian:…` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("meridian") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboards_parse_use_the_datasource_variable_and_catalogued_names_only() {
    let catalog = catalog_families();
    let recorded: BTreeSet<String> = recording_rules().into_iter().collect();
    assert!(recorded.len() >= 8, "{recorded:?}");
    let known = |name: &str| {
        if recorded.contains(name) || catalog.contains_key(name) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| catalog.get(base).map(String::as_str) == Some("histogram"))
        })
    };
    for name in DASHBOARDS {
        let board = dashboard(name);
        assert!(
            board["schemaVersion"].as_u64() >= Some(36),
            "{name}: schemaVersion"
        );
        assert!(board["title"].as_str().is_some(), "{name}: title");
        let variables = board["templating"]["list"].as_array().expect("templating");
        assert!(
            variables.iter().any(|v| v["name"] == "datasource"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
            "{name}: no ${{datasource}} variable of type datasource/prometheus"
        );
        let panels = board["panels"].as_array().expect("panels");
        assert!(panels.len() >= 5, "{name}: {} panels", panels.len());
        for panel in panels {
            let title = &panel["title"];
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{name}: {title}"
            );
            for target in panel["targets"].as_array().expect("targets") {
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "{name}: {title}"
                );
            }
        }
        // No hard-coded data source UIDs anywhere in the panels.
        let text = serde_json::to_string(&board["panels"]).expect("serializes");
        for (at, _) in text.match_indices("\"uid\":") {
            assert!(
                text[at..].starts_with("\"uid\":\"${datasource}\""),
                "{name}: hard-coded uid near {}",
                &text[at..(at + 40).min(text.len())]
            );
        }
        let exprs = panel_exprs(&board);
        assert!(!exprs.is_empty(), "{name}: no expressions");
        for (title, expr) in exprs {
            let names = metric_names(&expr);
            assert!(
                !names.is_empty(),
                "{name}: {title}: no Meridian metric in {expr}"
            );
            for metric in names {
                assert!(
                    known(&metric),
                    "{name}: {title}: `{metric}` is neither in docs/metrics.md nor a recording rule"
                );
            }
        }
    }
}

/// A `prometheus` server process, killed (and reaped) on drop.
struct PrometheusProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl PrometheusProcess {
    fn start(dir: &Path, target: SocketAddr) -> PrometheusProcess {
        let binary = tool("prometheus");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let rules = dashboards_dir();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files:\n  - {recording}\n  - {alerts}\n\
             scrape_configs:\n  - job_name: meridian-edge\n    static_configs:\n      - targets: [\"{target}\"]\n        labels:\n          edge: local-1\n",
            recording = rules.join("recording.yml").display(),
            alerts = rules.join("alerts.yml").display(),
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let log = dir.join("prometheus.log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("prometheus starts");
        PrometheusProcess { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/api/v1/query` for `expr`: the result vector, or Prometheus' error.
    fn query(&self, world: &World, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let reply = world
            .runtime
            .block_on(Client::new(self.addr).request(
                Protocol::Http1,
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                "GET",
                "localhost",
                &path,
                &[],
                Vec::new(),
            ))
            .map_err(|e| format!("prometheus unreachable: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_slice(&reply.body).map_err(|e| format!("{e}: {}", reply.text()))?;
        if json["status"] != "success" {
            return Err(format!("{}: {}", json["errorType"], json["error"]));
        }
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for PrometheusProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn value(result: &[serde_json::Value]) -> Option<f64> {
    result.first()?["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_scrapes_the_edge_and_every_panel_and_recording_rule_has_data() {
    let world = start_world();
    let prometheus = PrometheusProcess::start(world.dir.path(), world.edge.admin_addr);
    // Traffic starts once Prometheus has scraped the edge, so rates see it grow.
    let scraped = poll(Duration::from_secs(20), || {
        prometheus
            .query(&world, "up{job=\"meridian-edge\"} == 1")
            .is_ok_and(|r| !r.is_empty())
    });
    assert!(
        scraped,
        "Prometheus never scraped the edge:\n{}",
        prometheus.log()
    );
    let sent = drive(&world) as f64;

    // Bounded poll: the scrapes (every 1 s) reach the requests just sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    let total = loop {
        let seen = prometheus
            .query(&world, "sum(meridian_requests_total)")
            .ok()
            .and_then(|r| value(&r));
        if seen.is_some_and(|v| v >= sent) || Instant::now() > deadline {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        total.is_some_and(|v| v >= sent),
        "sum(meridian_requests_total) in Prometheus is {total:?}, {sent} requests were sent\n{}",
        prometheus.log()
    );

    // Every dashboard panel expression and every recording rule, until each returns series.
    let mut pending: Vec<(String, String)> = DASHBOARDS
        .iter()
        .flat_map(|name| {
            panel_exprs(&dashboard(name))
                .into_iter()
                .map(move |(title, expr)| (format!("{name}: {title}"), expr))
        })
        .chain(
            recording_rules()
                .into_iter()
                .map(|rule| (format!("recording rule {rule}"), rule)),
        )
        .collect();
    let count = pending.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_errors = Vec::new();
    while !pending.is_empty() && Instant::now() < deadline {
        last_errors.clear();
        pending.retain(|(what, expr)| match prometheus.query(&world, expr) {
            Ok(result) if !result.is_empty() => false,
            Ok(_) => {
                last_errors.push(format!("{what}: no series for {expr}"));
                true
            }
            Err(e) => {
                last_errors.push(format!("{what}: {e} for {expr}"));
                true
            }
        });
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    assert!(
        pending.is_empty(),
        "{} of {count} expressions have no data:\n{}\n{}",
        pending.len(),
        last_errors.join("\n"),
        prometheus.log()
    );

    // A recording rule's value reflects the traffic: requests/s per serving region.
    let mut regions = Vec::new();
    let served = poll(Duration::from_secs(10), || {
        regions = prometheus
            .query(&world, "sum by (region) (meridian:requests:rate1m) > 0")
            .unwrap_or_default();
        regions.len() >= 3
    });
    assert!(
        served,
        "meridian:requests:rate1m shows traffic in several regions: {regions:?}"
    );
}

/// Calls `check` until it holds or `bound` passes; whether it held.
fn poll(bound: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn panel_expression_helpers() {
    assert_eq!(
        metric_names("sum(rate(meridian_a_bucket[1m])) / meridian:b:rate1m"),
        BTreeSet::from([
            "meridian_a_bucket".to_string(),
            "meridian:b:rate1m".to_string()
        ])
    );
    assert_eq!(
        percent_encode("sum(x{a=\"b\"})"),
        "sum%28x%7Ba%3D%22b%22%7D%29"
    );
}
