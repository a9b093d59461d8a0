//! The operator status page: `GET /` on the admin listener, rendered by a real headless
//! Chromium. The test keeps a screenshot (`status.png`) in `target/status-page/` as an artefact.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meridian_tests::{local_config, World};

/// The Chromium binary (Debian's `chromium`), or a failure that says how to install it.
fn chromium() -> PathBuf {
    for candidate in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("which").arg(candidate).output() {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !path.is_empty() {
                return PathBuf::from(path);
            }
        }
    }
    panic!(
        "the status page test needs a headless Chromium: `apt-get install -y chromium` \
         (./test.sh installs it through scripts/ensure-packages.sh)"
    );
}

/// Runs Chromium headless on `url` with `extra` arguments; returns stdout. Bounded to 30 s.
fn run_chromium(binary: &Path, profile: &Path, url: &str, extra: &[&str]) -> String {
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("wait for chromium").is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 30 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("chromium output");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn status_page_renders_regions_and_config_version_in_a_browser() {
    let binary = chromium();
    let world = World::start(local_config());
    // Some traffic, so shares and latencies have values.
    for country in ["MX", "US", "DE", "SG"] {
        assert_eq!(world.get_from(country, "api.example.test", "/").status, 200);
    }
    // The edge records a request's metrics just after writing the response: wait (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = world.admin_get("/admin/status.json").json();
        let counted = status["requests"].as_f64().is_some_and(|n| n >= 4.0);
        if counted || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let version = status["version"].as_u64().expect("version");
    assert_eq!(
        status["regions"].as_array().map(Vec::len),
        Some(world.config.regions.len())
    );
    assert!(
        status["requests"].as_f64().is_some_and(|n| n >= 4.0),
        "{status}"
    );

    let page = world.admin_get("/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    let html = page.text();
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no external assets"
    );

    let url = format!("http://{}/", world.edge.admin_addr);
    let profile = tempfile::tempdir().expect("profile dir");
    let dom = run_chromium(&binary, profile.path(), &url, &["--dump-dom"]);
    for region in &world.config.regions {
        assert!(
            dom.contains(&region.name),
            "rendered page lacks {}:\n{dom}",
            region.name
        );
    }
    assert!(
        dom.contains(&format!("<b id=\"version\">{version}</b>")),
        "rendered page lacks config version {version}:\n{dom}"
    );
    assert!(
        dom.contains("live, updated"),
        "the page never polled status.json:\n{dom}"
    );

    // The screenshot artefact: in the test's temp dir, then copied under target/ to keep it.
    let shot = world.path("status.png");
    let _ = run_chromium(
        &binary,
        profile.path(),
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,900",
        ],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "screenshot is a PNG");
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    let _ = std::fs::create_dir_all(&keep);
    let _ = std::fs::write(keep.join("status.png"), &png);
}
