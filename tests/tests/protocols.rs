//! One conformance suite, run over HTTP/1.1 and HTTP/2 on TLS and over HTTP/3 (QUIC): every
//! protocol goes through the same routing core and must behave the same (issue 5).

use meridian_tests::{local_config, source_for, Secure, World, PLACES};

fn routing_by_country(protocol: Secure) {
    let world = World::start(local_config());
    for place in PLACES {
        let reply = world.secure_request(
            protocol,
            place.client_addr(5),
            "api.example.test",
            "/hello",
            &[],
        );
        assert_eq!(
            reply.status,
            200,
            "{} over {protocol:?}: {}",
            place.country,
            reply.text()
        );
        assert_eq!(
            reply.region(),
            Some(place.expected_region),
            "{} over {protocol:?}",
            place.country
        );
        assert_eq!(reply.header("x-meridian-pop"), Some("local-1"));
        let body = reply.json();
        assert_eq!(body["region"], place.expected_region);
        assert_eq!(body["path"], "/hello");
        assert_eq!(body["x_forwarded_proto"], "https");
        assert_eq!(body["host"], "api.example.test");
    }
    let expected_version = match protocol {
        Secure::H1 => http::Version::HTTP_11,
        Secure::H2 => http::Version::HTTP_2,
        Secure::H3 => http::Version::HTTP_3,
    };
    let reply = world.secure_request(protocol, source_for("TH"), "v2.api.example.test", "/x", &[]);
    assert_eq!(reply.version, expected_version);
    assert_eq!(
        reply.region(),
        Some("ap-southeast-7"),
        "wildcard host and certificate"
    );
    // The request counter carries the protocol label.
    let label = match protocol {
        Secure::H1 => "h1",
        Secure::H2 => "h2",
        Secure::H3 => "h3",
    };
    let series = format!(
        r#"meridian_requests_total{{protocol="{label}",region="ap-southeast-7",route="api",status_class="2xx"}}"#
    );
    let seen = world.metric_eventually(&series, 2.0);
    assert_eq!(seen, Some(2.0), "{series}: {}", world.metrics());
    let handshakes: f64 = world
        .metrics()
        .lines()
        .filter(|l| l.starts_with("meridian_tls_handshakes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        handshakes >= PLACES.len() as f64,
        "one handshake per connection: {handshakes}"
    );
}

fn unknown_host_is_refused(protocol: Secure) {
    let world = World::start(local_config());
    for host in ["nobody.test", "example.test"] {
        let reply = world.secure_request(protocol, source_for("MX"), host, "/", &[]);
        assert_eq!(reply.status, 421, "{host} over {protocol:?}");
        assert_eq!(reply.json()["error"], "no route claims this host");
        assert_eq!(reply.header("x-meridian-pop"), Some("local-1"));
        assert_eq!(reply.region(), None);
    }
    assert_eq!(world.origin_requests(), 0, "no origin sees refused traffic");
}

fn forwarding_headers(protocol: Secure) {
    let world = World::start(local_config());
    let reply = world.secure_request(
        protocol,
        source_for("SG"),
        "api.example.test",
        "/h?q=1",
        &[("x-request-id", "abc-123")],
    );
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["x_request_id"], "abc-123");
    assert_eq!(body["x_forwarded_proto"], "https");
    assert_eq!(body["x_forwarded_for"], source_for("SG").to_string());
    assert_eq!(body["path"], "/h?q=1");
    let generated = world.secure_request(protocol, source_for("SG"), "api.example.test", "/", &[]);
    assert_eq!(
        generated.json()["x_request_id"].as_str().map(str::len),
        Some(32)
    );
    // HTTP/3 is advertised on TCP responses; an HTTP/3 response need not repeat it.
    let https = world.edge.https_addr.expect("https");
    let alt_svc = format!("h3=\":{}\"; ma=86400", https.port());
    if protocol != Secure::H3 {
        assert_eq!(reply.header("alt-svc"), Some(alt_svc.as_str()));
    }
}

fn failover_and_502(protocol: Secure) {
    let world = World::start(local_config());
    world.set_region_up("mx-central", false);
    let reply = world.secure_request(protocol, source_for("MX"), "api.example.test", "/", &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.region(),
        Some("us-east"),
        "failed over to the next region"
    );
    world.set_region_up("eu-central-1", false);
    let reply = world.secure_request(protocol, source_for("DE"), "eu.example.test", "/v1/x", &[]);
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"], "no upstream could be reached");
    assert_eq!(reply.header("x-meridian-pop"), Some("local-1"));
    let failed = world.metric_eventually(
        r#"meridian_upstream_attempts_total{region="mx-central",result="connect_error"}"#,
        2.0,
    );
    assert_eq!(failed, Some(2.0), "{}", world.metrics());
}

fn oversized_headers(protocol: Secure) {
    let world = World::start(local_config());
    let big = "x".repeat(40 * 1024);
    let reply = world.secure_request(
        protocol,
        source_for("US"),
        "api.example.test",
        "/",
        &[("x-big", &big)],
    );
    assert_eq!(reply.status, 431, "{}", reply.text());
    let many: Vec<(String, String)> = (0..120).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let reply = world.secure_request(protocol, source_for("US"), "api.example.test", "/", &many);
    assert_eq!(reply.status, 431);
    assert_eq!(world.origin_requests(), 0);
}

macro_rules! conformance {
    ($($proto:ident => $value:expr),* $(,)?) => {
        $(
            mod $proto {
                use super::*;

                #[test]
                fn routes_every_country_to_its_region() {
                    routing_by_country($value);
                }

                #[test]
                fn refuses_unknown_hosts_with_421() {
                    unknown_host_is_refused($value);
                }

                #[test]
                fn forwards_proto_ids_and_advertises_h3() {
                    forwarding_headers($value);
                }

                #[test]
                fn fails_over_then_answers_502() {
                    failover_and_502($value);
                }

                #[test]
                fn rejects_oversized_headers_with_431() {
                    oversized_headers($value);
                }
            }
        )*
    };
}

conformance!(h1 => Secure::H1, h2 => Secure::H2, h3 => Secure::H3);

/// A graceful stop sends GOAWAY to HTTP/3 clients and lets the request in flight finish.
#[test]
fn h3_graceful_stop_finishes_in_flight_requests() {
    use meridian_tests::h3client::{client_config, H3Connection};
    let world = World::start(local_config());
    for origin in world.origins_of("us-east") {
        // Keeps the request in flight while the edge stops (readiness is checked below).
        origin.set_delay(std::time::Duration::from_millis(300));
    }
    let target = world.edge.https_addr.expect("https");
    let roots = world.tls.as_ref().expect("tls").roots();
    let mut conn = world
        .runtime
        .block_on(H3Connection::connect(
            source_for("??"),
            target,
            "api.example.test",
            client_config(roots.clone()).expect("config"),
        ))
        .expect("connect");
    let in_flight = world.runtime.spawn(async move {
        let reply = conn
            .request("GET", "api.example.test", "/slow", &[], Vec::new())
            .await;
        (reply, conn)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while world.origin_requests() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(world.origin_requests(), 1, "the request reached its origin");
    let edge = world.edge;
    edge.stop(true);
    let (reply, conn) = world.runtime.block_on(in_flight).expect("join");
    let reply = reply.expect("the in-flight request completes");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.region(), Some("us-east"));
    world.runtime.block_on(conn.close());
    // Nobody answers on UDP any more: the handshake gives up after the client's idle timeout.
    let mut config = client_config(roots).expect("config");
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        std::time::Duration::from_millis(500)
            .try_into()
            .expect("idle timeout"),
    ));
    config.transport_config(std::sync::Arc::new(transport));
    let after = world.runtime.block_on(H3Connection::connect(
        source_for("??"),
        target,
        "api.example.test",
        config,
    ));
    assert!(
        after.is_err(),
        "a stopped edge accepts no new QUIC connection"
    );
}
