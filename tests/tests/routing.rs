//! End to end through real sockets: test-world clients → Pingora edge → simulated regional origins.

use meridian_tests::{local_config, metric_value, source_for, Protocol, World, PLACES};

#[test]
fn every_test_world_country_reaches_its_region_over_h1_and_h2c() {
    let world = World::start(local_config());
    for protocol in [Protocol::Http1, Protocol::H2c] {
        for place in PLACES {
            let source = place.client_addr(3);
            let reply = world.request(protocol, source, "api.example.test", "/hello", &[]);
            reply.assert_routed_for(place, &protocol);
            if protocol == Protocol::H2c {
                assert_eq!(reply.version, http::Version::HTTP_2);
            }
        }
    }
    // Wildcard host of the same route.
    let reply = world.get_from("TH", "v2.api.example.test", "/x");
    assert_eq!(reply.region(), Some("ap-southeast-7"));
}

#[test]
fn unknown_host_is_refused_without_contacting_any_upstream() {
    let world = World::start(local_config());
    for host in [
        "nobody.test",
        "example.test",
        "api.example.test.evil.test",
        "127.0.0.1",
    ] {
        let reply = world.get_from("MX", host, "/");
        assert_eq!(reply.status, 421, "{host}");
        assert_eq!(reply.json()["error"], "no route claims this host");
        assert_eq!(reply.region(), None);
    }
    // Host known, path not claimed by any of its routes.
    assert_eq!(
        world.get_from("DE", "eu.example.test", "/elsewhere").status,
        404
    );
    assert_eq!(
        world.origin_requests(),
        0,
        "no origin may see refused traffic"
    );
    let refused = world.metric_eventually(
        r#"meridian_requests_total{protocol="h1",region="none",route="none",status_class="4xx"}"#,
        5.0,
    );
    let metrics = world.metrics();
    assert_eq!(
        refused,
        Some(5.0),
        "421s and the 404 count under route=\"none\": {metrics}"
    );
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let world = World::start(local_config());
    // 127.0.0.1 is a trusted proxy in local.toml: its X-Forwarded-For places the client in SG.
    let trusted = world.request(
        Protocol::Http1,
        source_for("??"),
        "api.example.test",
        "/",
        &[("x-forwarded-for", "127.12.0.9")],
    );
    assert_eq!(trusted.region(), Some("ap-southeast-1"));
    // The chain names every hop: the client the proxy vouched for, then the proxy itself.
    assert_eq!(trusted.json()["x_forwarded_for"], "127.12.0.9, 127.0.0.1");
    // A German client cannot claim to be in Singapore.
    let spoofed = world.request(
        Protocol::Http1,
        source_for("DE"),
        "api.example.test",
        "/",
        &[("x-forwarded-for", "127.12.0.9")],
    );
    assert_eq!(spoofed.region(), Some("eu-central-1"));
    // ...nor make the origin believe it: an untrusted peer's chain is replaced, not extended.
    assert_eq!(spoofed.json()["x_forwarded_for"], "127.17.0.7");
    assert_eq!(spoofed.json()["x_forwarded_proto"], "http");
}

#[test]
fn strict_residency_keeps_korea_in_korea() {
    let world = World::start(local_config());
    assert_eq!(
        world.get_from("KR", "api.example.test", "/").region(),
        Some("ap-northeast-2")
    );
    // The EU-only route has no region Korea may use: refused, not served from Frankfurt.
    let refused = world.get_from("KR", "eu.example.test", "/v1/records");
    assert_eq!(refused.status, 503);
    assert!(refused.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("residency")));
    // Other countries use the EU route normally.
    assert_eq!(
        world
            .get_from("SG", "eu.example.test", "/v1/records")
            .region(),
        Some("eu-central-1")
    );
    // Seoul down: Korean traffic fails rather than leaving the country; Japan fails over.
    world.set_region_up("ap-northeast-2", false);
    let kr = world.get_from("KR", "api.example.test", "/");
    // 502 while the connect failures are fresh, 503 once health checks mark Seoul down.
    assert!(matches!(kr.status, 502 | 503), "{}", kr.text());
    assert!(
        matches!(kr.region(), None | Some("ap-northeast-2")),
        "not served from another country"
    );
    let jp = world.get_from("JP", "api.example.test", "/");
    assert_eq!(jp.status, 200);
    assert_ne!(jp.region(), Some("ap-northeast-2"));
}

#[test]
fn unknown_location_goes_to_the_default_region() {
    let world = World::start(local_config());
    let reply = world.get_from("??", "api.example.test", "/");
    assert_eq!(reply.region(), Some("us-east"));
    // (`/v1/models` is answered by the edge itself; any other path is proxied.)
    let reply = world.get_from("??", "inference.example.test", "/hello");
    assert_eq!(reply.region(), Some("ap-southeast-1"));
}

#[test]
fn refused_upstreams_fail_over_then_give_502() {
    let mut config = local_config();
    // Without active checks, the only signal is the refused connection itself.
    for region in &mut config.regions {
        region.health.enabled = false;
    }
    let world = World::start(config);
    // Mexico's region down: the next-nearest region serves, within the same request.
    world.set_region_up("mx-central", false);
    let reply = world.get_from("MX", "api.example.test", "/");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.region(), Some("us-east"));
    // The only region of a route down: a clean 502 with a JSON body.
    world.set_region_up("eu-central-1", false);
    let reply = world.get_from("DE", "eu.example.test", "/v1/x");
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"], "no upstream could be reached");
    assert_eq!(reply.header("x-meridian-pop"), Some("local-1"));
    let failed = world.metric_eventually(
        r#"meridian_upstream_attempts_total{region="mx-central",result="connect_error"}"#,
        2.0,
    );
    let metrics = world.metrics();
    assert_eq!(
        failed,
        Some(2.0),
        "both Mexican upstreams were tried once: {metrics}"
    );
}

#[test]
fn request_limits_are_enforced() {
    let world = World::start(local_config());
    let big = "x".repeat(40 * 1024);
    let reply = world.request(
        Protocol::Http1,
        source_for("US"),
        "api.example.test",
        "/",
        &[("x-big", &big)],
    );
    assert_eq!(reply.status, 431);
    let many: Vec<(String, String)> = (0..120)
        .map(|i| (format!("x-h{i}"), "v".to_string()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let reply = world.request(
        Protocol::Http1,
        source_for("US"),
        "api.example.test",
        "/",
        &many,
    );
    assert_eq!(reply.status, 431);
    let reply = world.request(
        Protocol::Http1,
        source_for("US"),
        "api.example.test",
        "/",
        &[("content-length", "999999999")],
    );
    assert_eq!(reply.status, 413);
    assert_eq!(world.origin_requests(), 0);
}

#[test]
fn request_ids_are_kept_or_generated_and_bodies_stream_through() {
    let world = World::start(local_config());
    let reply = world.request(
        Protocol::Http1,
        source_for("US"),
        "api.example.test",
        "/",
        &[("x-request-id", "abc-123")],
    );
    assert_eq!(reply.json()["x_request_id"], "abc-123");
    let reply = world.get_from("US", "api.example.test", "/");
    let id = reply.json()["x_request_id"]
        .as_str()
        .map(str::to_string)
        .expect("generated id");
    assert_eq!(id.len(), 32);
    let body = vec![b'a'; 256 * 1024];
    let reply = world
        .runtime
        .block_on(world.client.request(
            Protocol::Http1,
            source_for("MY"),
            "POST",
            "api.example.test",
            "/upload",
            &[],
            body,
        ))
        .expect("post");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["body_bytes"], 256 * 1024);
    assert_eq!(reply.region(), Some("ap-southeast-3"));
}

#[test]
fn metrics_count_requests_by_route_region_and_class() {
    let world = World::start(local_config());
    for _ in 0..3 {
        assert_eq!(world.get_from("PH", "api.example.test", "/").status, 200);
    }
    assert_eq!(
        world
            .get_from("PH", "static.example.test", "/logo.png")
            .region(),
        Some("ap-southeast-1")
    );
    world.metric_eventually(
        r#"meridian_requests_total{protocol="h1",region="ap-southeast-1",route="static",status_class="2xx"}"#,
        1.0,
    );
    world.metric_eventually(
        r#"meridian_request_duration_seconds_count{region="ap-southeast-6",route="api"}"#,
        3.0,
    );
    let metrics = world.metrics();
    let value = |series: &str| metric_value(&metrics, series);
    assert_eq!(
        value(
            r#"meridian_requests_total{protocol="h1",region="ap-southeast-6",route="api",status_class="2xx"}"#
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        value(
            r#"meridian_requests_total{protocol="h1",region="ap-southeast-1",route="static",status_class="2xx"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(r#"meridian_request_duration_seconds_count{region="ap-southeast-6",route="api"}"#),
        Some(3.0)
    );
    assert_eq!(value(r#"meridian_build_info{version="0.1.0"}"#), Some(1.0));
    let snapshot = world.admin_get("/admin/snapshot").json();
    assert_eq!(snapshot["pop"], "local-1");
    assert_eq!(snapshot["routes"].as_array().map(Vec::len), Some(4));
    assert_eq!(snapshot["regions"].as_array().map(Vec::len), Some(8));
    assert_eq!(snapshot["config_hash"], "test");
    assert_eq!(world.admin_get("/healthz").status, 200);
}
