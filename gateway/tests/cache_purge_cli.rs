//! `meridian cache purge` (the binary) against an in-process edge with a caching route.

use std::net::SocketAddr;
use std::process::Command;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meridian_gateway::core::SnapshotMeta;
use meridian_gateway::edge::{EdgeOptions, RunningEdge};

const TOKEN: &str = "cli-secret";

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// `GET http://shop.test{path}` through the edge; returns (status, x-meridian-cache).
async fn get(edge: SocketAddr, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(edge).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header("host", "shop.test")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let cache = response
        .headers()
        .get("x-meridian-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    response.into_body().collect().await.expect("body");
    (status, cache)
}

fn purge(admin: SocketAddr, args: &[&str], token_env: Option<&str>) -> std::process::Output {
    let admin = format!("http://{admin}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_meridian"));
    command
        .args(["cache", "purge", "--admin", &admin])
        .args(args)
        .env("MERIDIAN_LOG", "error")
        .env_remove("MERIDIAN_ADMIN_TOKEN");
    if let Some(token) = token_env {
        command.env("MERIDIAN_ADMIN_TOKEN", token);
    }
    command.output().expect("run meridian")
}

#[test]
fn cache_purge_cli_removes_entries_by_url_and_tag_with_the_admin_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, TOKEN).expect("token");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let origin = runtime
        .block_on(meridian_testkit::origin::spawn(
            "r1",
            "127.0.0.1:0".parse().expect("addr"),
            stop_rx,
        ))
        .expect("origin");
    let http = free_port();
    let config = format!(
        r#"schema = 1
[edge]
pop = "cli-1"
http = "{http}"
admin = {{ listen = "127.0.0.1:0", token_file = "{}" }}
threads = 1
[[regions]]
name = "r1"
location = {{ lat = 0.0, lon = 0.0 }}
upstreams = [{{ address = "{}" }}]
[[routes]]
name = "shop"
hosts = ["shop.test"]
regions = ["r1"]
default_region = "r1"
cache = {{ enabled = true }}
"#,
        token_file.display(),
        origin.address
    );
    let config = meridian_config::Config::from_toml_str(&config).expect("config");
    let edge = RunningEdge::start(EdgeOptions {
        config,
        meta: SnapshotMeta {
            version: 0,
            hash: "cli".into(),
        },
        handle_signals: false,
        watch_file: None,
        base_dir: None,
    })
    .expect("edge");
    let path = "/a?cc=max-age%3D60&tag=t1";
    assert_eq!(runtime.block_on(get(http, path)), (200, "miss".into()));
    assert_eq!(runtime.block_on(get(http, path)), (200, "hit".into()));

    let url = format!("http://shop.test{path}");
    let token_path = token_file.display().to_string();
    let out = purge(
        edge.admin_addr,
        &["--url", &url, "--token-file", &token_path],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "purged 1");
    assert_eq!(runtime.block_on(get(http, path)), (200, "miss".into()));

    // The token from the environment; purge by tag.
    let out = purge(edge.admin_addr, &["--tag", "t1"], Some(TOKEN));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "purged 1");

    // A wrong token: refused, non-zero exit, the server's reason on stderr.
    let out = purge(
        edge.admin_addr,
        &["--prefix", "http://shop.test/"],
        Some("nope"),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    // Exactly one of --url/--prefix/--tag.
    let out = purge(edge.admin_addr, &[], Some(TOKEN));
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    edge.stop(false);
}
