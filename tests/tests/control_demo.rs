//! The demo and the loopback listeners against a local attacker and a hostile web page: the
//! demo's secrets are random and private, its control API needs the demo token, and admin,
//! config service and control API refuse a `Host` that is not loopback (DNS rebinding).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;

use meridian_testkit::demo::{DemoOptions, DemoWorld};
use meridian_tests::{local_config, Client, Protocol, Reply, World};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

fn call(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    runtime
        .block_on(Client::new(addr).request(
            Protocol::Http1,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            method,
            host,
            path,
            headers,
            Vec::new(),
        ))
        .expect("request")
}

fn demo(dir: &std::path::Path) -> DemoWorld {
    DemoWorld::start(&DemoOptions {
        data_dir: dir.to_path_buf(),
        control: "127.0.0.1:0".parse().expect("addr"),
        config_service: "127.0.0.1:0".parse().expect("addr"),
    })
    .expect("demo world starts")
}

#[test]
fn demo_secrets_are_random_and_private() {
    let parent = tempfile::tempdir().expect("tempdir");
    let first_dir = parent.path().join("one");
    let first = demo(&first_dir);
    assert_eq!(mode(&first_dir), 0o700, "a private data directory");
    for secret in [
        "token",
        "admin.token",
        "tls/api.example.test.key",
        "tls/example.test.key",
    ] {
        assert_eq!(mode(&first_dir.join(secret)), 0o600, "{secret}");
    }
    let token = std::fs::read_to_string(first_dir.join("token")).expect("token");
    assert_eq!(token, first.token);
    let admin = std::fs::read_to_string(first_dir.join("admin.token")).expect("admin token");
    // 128 random bits each, never derived from the clock or the pid, never the same twice.
    assert_eq!(token.trim().len(), "demo-".len() + 32, "{token}");
    assert_eq!(admin.trim().len(), "admin-".len() + 32, "{admin}");
    let second = demo(&parent.path().join("two"));
    assert_ne!(first.token, second.token);
    assert_ne!(token.trim()[5..], admin.trim()[6..]);
    // Without a directory given, every run gets its own unpredictable one.
    let (a, b) = (DemoOptions::default(), DemoOptions::default());
    assert_ne!(a.data_dir, b.data_dir);
    assert!(!a.data_dir.ends_with("meridian-demo"));
}

#[test]
fn the_control_api_needs_the_demo_token_and_a_loopback_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world = demo(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bearer = format!("Bearer {}", world.token);
    let down = "/regions/mx-central/down";
    // What a cross-site form post from any web page looks like: no token.
    let forged = call(&runtime, world.control, "POST", "127.0.0.1", down, &[]);
    assert_eq!(forged.status, 401);
    let wrong = call(
        &runtime,
        world.control,
        "POST",
        "127.0.0.1",
        down,
        &[("authorization", "Bearer guess")],
    );
    assert_eq!(wrong.status, 401);
    // DNS rebinding: the right token cannot come from a page, but the Host check holds anyway.
    let rebound = call(
        &runtime,
        world.control,
        "POST",
        "evil.test:7071",
        down,
        &[("authorization", &bearer)],
    );
    assert_eq!(rebound.status, 421);
    assert!(world.regions["mx-central"].iter().all(|o| o.is_up()));
    let ok = call(
        &runtime,
        world.control,
        "POST",
        "localhost:7071",
        down,
        &[("authorization", &bearer)],
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(world.regions["mx-central"].iter().all(|o| !o.is_up()));

    // The demo's config service answers loopback names only.
    let rebound = call(
        &runtime,
        world.config_service,
        "GET",
        "evil.test",
        "/v1/config",
        &[],
    );
    assert_eq!(rebound.status, 421);
    // Reads need a token too; the demo token is the service's write token.
    let bearer = format!("Bearer {}", world.token);
    let local = call(
        &runtime,
        world.config_service,
        "GET",
        "127.0.0.1",
        "/v1/config",
        &[("authorization", &bearer)],
    );
    assert_eq!(local.status, 200);
}

#[test]
fn admin_and_config_service_refuse_a_host_that_is_not_loopback() {
    let world = World::start_following(local_config());
    for (addr, path) in [
        (world.edge.admin_addr, "/admin/snapshot"),
        (world.edge.admin_addr, "/metrics"),
        (world.service().addr, "/v1/history"),
    ] {
        let rebound = call(
            &world.runtime,
            addr,
            "GET",
            "attacker.example:80",
            path,
            &[],
        );
        assert_eq!(rebound.status, 421, "{path}");
        // Config service reads need its token (the admin listener ignores the header).
        let bearer = format!("Bearer {}", world.service().token);
        let local = call(
            &world.runtime,
            addr,
            "GET",
            "localhost",
            path,
            &[("authorization", &bearer)],
        );
        assert_eq!(local.status, 200, "{path}");
    }
}
