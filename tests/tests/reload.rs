//! Config service → edges: pushes propagate to every edge, bad versions never land (not even in
//! part: routing, certificates, DNS zone and GeoIP database move together), edges keep serving
//! (and restart) without the service, and no request fails while versions change.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use meridian_config::{Config, RegionSet};
use meridian_tests::{local_config, source_for, World};

/// The `api` route's default region (where clients of unknown location go) set to `region`.
fn with_default_region(base: &Config, region: &str) -> Config {
    let mut config = base.clone();
    let api = config
        .routes
        .iter_mut()
        .find(|r| r.name == "api")
        .expect("api route");
    api.default_region = Some(region.to_string());
    config
}

#[test]
fn three_edges_follow_one_config_service() {
    let world = World::start_following(local_config());
    let second = world.start_edge("edge-1-cache");
    let third = world.start_edge("edge-2-cache");
    let edges = [&world.edge, &second, &third];
    for edge in edges {
        assert_eq!(world.wait_for_version(edge, 1), 1);
        assert_eq!(
            world
                .request_to(edge, "??", "api.example.test", "/")
                .region(),
            Some("us-east")
        );
    }
    let version = world.push(
        &with_default_region(&world.config, "eu-central-1"),
        "unknown → Frankfurt",
    );
    assert_eq!(version, 2);
    for edge in edges {
        assert_eq!(world.wait_for_version(edge, 2), 2);
        let reply = world.request_to(edge, "??", "api.example.test", "/");
        assert_eq!(reply.region(), Some("eu-central-1"));
    }
    let metrics = world.metrics();
    assert!(metrics.contains("meridian_config_version 2"), "{metrics}");
    assert!(
        metrics.contains("meridian_config_reloads_total{result=\"ok\"} 2"),
        "{metrics}"
    );
}

#[test]
fn an_invalid_push_is_refused_and_edges_stay_on_their_version() {
    let world = World::start_following(local_config());
    let mut broken = world.config.clone();
    broken.routes[0].regions = RegionSet::List(vec!["ap-sout-1".into()]);
    broken.regions[1].location.lat = 123.0;
    let document = toml::to_string(&broken).expect("serializes");
    let err = world
        .runtime
        .block_on(
            world
                .service()
                .client()
                .push(&document, "test", "typo", None),
        )
        .expect_err("must be refused");
    let errors: Vec<String> = err
        .validation_errors()
        .expect("422 with validation errors")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e == "routes[0].regions[0]: unknown region \"ap-sout-1\""),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("regions[1].location.lat")),
        "{errors:?}"
    );
    assert_eq!(world.admin_get("/admin/snapshot").json()["version"], 1);
    assert_eq!(world.get_from("MX", "api.example.test", "/").status, 200);
}

#[test]
fn rollback_and_concurrent_pushes_with_if_match() {
    let world = World::start_following(local_config());
    world.push(&with_default_region(&world.config, "eu-central-1"), "v2");
    assert_eq!(world.wait_for_version(&world.edge, 2), 2);
    let client = world.service().client();
    let rolled = world
        .runtime
        .block_on(client.rollback(1))
        .expect("rollback");
    assert_eq!(rolled.version, 3);
    assert_eq!(world.wait_for_version(&world.edge, 3), 3);
    assert_eq!(
        world.get_from("??", "api.example.test", "/").region(),
        Some("us-east")
    );

    // Two operators edit version 3 at once: exactly one wins, the other gets 409.
    let a = toml::to_string(&with_default_region(&world.config, "mx-central")).expect("toml");
    let b = toml::to_string(&with_default_region(&world.config, "ap-southeast-1")).expect("toml");
    let (ra, rb) = world.runtime.block_on(async {
        tokio::join!(
            client.push(&a, "alice", "a", Some(3)),
            client.push(&b, "bob", "b", Some(3))
        )
    });
    let outcomes = [ra.is_ok(), rb.is_ok()];
    assert_eq!(
        outcomes.iter().filter(|ok| **ok).count(),
        1,
        "{ra:?} {rb:?}"
    );
    let loser = if ra.is_ok() { rb } else { ra };
    match loser {
        Err(meridian_config_service::ClientError::Rejected { status, .. }) => {
            assert_eq!(status, 409)
        }
        other => panic!("expected a 409, got {other:?}"),
    }
}

#[test]
fn edges_keep_serving_without_the_service_and_restart_from_their_cache() {
    let mut world = World::start_following(local_config());
    world.push(&with_default_region(&world.config, "ap-southeast-1"), "v2");
    assert_eq!(world.wait_for_version(&world.edge, 2), 2);
    let mut service = world.config_service.take().expect("service");
    service.stop(&world.runtime);
    // Service gone: the edge serves on its last snapshot.
    assert_eq!(
        world.get_from("??", "api.example.test", "/").region(),
        Some("ap-southeast-1")
    );
    assert_eq!(
        world.get_from("KR", "api.example.test", "/").region(),
        Some("ap-northeast-2")
    );
    // A restarted edge (same cache dir, service still down) starts from the cached version 2.
    let restarted = {
        let mut config = world.config.clone();
        config.edge.http = meridian_tests::free_local_addr().to_string();
        config.edge.admin = "127.0.0.1:0".into();
        config.control = Some(meridian_config::Control {
            url: service.url(),
            token_file: None,
            cache_dir: world.path("edge-0-cache").display().to_string(),
            wait: meridian_config::HumanDuration::secs(30),
            ..Default::default()
        });
        meridian_gateway::edge::RunningEdge::start(meridian_gateway::edge::EdgeOptions {
            config,
            meta: Default::default(),
            handle_signals: false,
            watch_file: None,
            base_dir: None,
        })
        .expect("edge starts without its config service")
    };
    assert_eq!(world.wait_for_version(&restarted, 2), 2);
    let reply = world.request_to(&restarted, "??", "api.example.test", "/");
    assert_eq!(reply.region(), Some("ap-southeast-1"));
    let fetch_errors = world.metric_eventually("meridian_config_fetch_errors_total", 1.0);
    assert!(
        fetch_errors.is_some_and(|n| n >= 1.0),
        "the follower noticed the outage"
    );
}

#[test]
fn no_request_fails_while_twenty_versions_are_pushed() {
    let world = World::start_following(local_config());
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for (i, country) in ["MX", "SG", "DE", "KR", "??", "US"].into_iter().enumerate() {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let client = world.client.clone();
        let source = source_for(country);
        clients.push(world.runtime.spawn(async move {
            let mut conn = client.keep_alive(source).await.expect("connect");
            while !stop.load(Ordering::Relaxed) {
                match conn.get("api.example.test", &format!("/load/{i}")).await {
                    Ok(reply) if reply.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(reply) => {
                        eprintln!("status {}: {}", reply.status, reply.text());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("connection error: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        conn = client.keep_alive(source).await.expect("reconnect");
                        0
                    }
                };
            }
        }));
    }
    let regions = ["eu-central-1", "us-east", "mx-central", "ap-southeast-1"];
    for n in 0..20u64 {
        let version = world.push(
            &with_default_region(&world.config, regions[n as usize % 4]),
            "churn",
        );
        assert_eq!(world.wait_for_version(&world.edge, version), version);
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        world.runtime.block_on(client).expect("client task");
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) >= 6, "the clients were running");
    assert_eq!(world.admin_get("/admin/snapshot").json()["version"], 21);
}

/// `examples/local.toml` with PoP health checks off, so every PoP answers DNS.
fn dns_config() -> Config {
    let mut config = local_config();
    for pop in &mut config.pops {
        pop.health = None;
    }
    config
}

/// The region that serves `static.example.test` to a US client (a fresh path each time: the
/// route caches).
fn static_region(world: &World, path: &str) -> String {
    let reply = world.get_from("US", "static.example.test", path);
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
        .header("x-meridian-region")
        .unwrap_or_default()
        .to_string()
}

/// The A records GeoDNS answers for `name` to a resolver in Seoul.
fn seoul_answer(world: &World, name: &str) -> Vec<String> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let server = world.edge.dns_addr.expect("the edge runs GeoDNS");
    let mut query = Message::query();
    query.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    let bytes = query.to_vec().expect("encodes");
    let reply = world.runtime.block_on(async {
        let socket = tokio::net::UdpSocket::bind(("127.15.0.53", 0))
            .await
            .expect("bind");
        let mut buffer = vec![0u8; 65_535];
        // Resend like a resolver (UDP may drop a datagram); bounded overall.
        for _ in 0..20 {
            socket.send_to(&bytes, server).await.expect("send");
            let wait = std::time::Duration::from_millis(500);
            if let Ok(received) = tokio::time::timeout(wait, socket.recv_from(&mut buffer)).await {
                let len = received.expect("recv").0;
                return Message::from_vec(&buffer[..len]).expect("answer decodes");
            }
        }
        panic!("no DNS answer from {server}");
    });
    reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// The leaf certificate (DER) the edge presents for `api.example.test`.
fn api_certificate(world: &World) -> Vec<u8> {
    let tls = world.tls.as_ref().expect("tls");
    let config = meridian_tests::secure::tcp_client_config(tls.roots(), &[b"http/1.1"]);
    let target = world.edge.https_addr.expect("https");
    world.runtime.block_on(async {
        let stream = meridian_tests::secure::tls_connect(
            source_for("US"),
            target,
            "api.example.test",
            config,
        )
        .await
        .expect("handshake");
        let (_, session) = stream.get_ref();
        session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default()
    })
}

fn file_der(path: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .expect("cert file")
        .as_ref()
        .to_vec()
}

/// The next version a test pushes: `static` moved to Frankfurt, the Seoul PoP renumbered, and
/// `api.example.test` served with a new certificate — every part of the edge changes.
fn next_version(world: &World) -> Config {
    let mut next = world.config.clone();
    let route = next
        .routes
        .iter_mut()
        .find(|r| r.name == "static")
        .expect("static route");
    route.regions = RegionSet::List(vec!["eu-central-1".into()]);
    route.default_region = Some("eu-central-1".into());
    for pop in &mut next.pops {
        if pop.name == "seoul" {
            pop.addresses = vec!["127.2.6.99".into()];
        }
    }
    let tls = world.tls.as_ref().expect("tls");
    let (cert, key) = tls
        .ca
        .leaf(&meridian_tests::secure::API_HOSTS)
        .expect("leaf")
        .write(&tls.dir, "api-next")
        .expect("write");
    next.tls.certificates[0].cert = cert.display().to_string();
    next.tls.certificates[0].key = key.display().to_string();
    next
}

/// Pushes `broken` (the next version plus one part that cannot compile) and checks that nothing
/// of it lands — routing, certificates, DNS zone — and that the refusal is counted once; then
/// pushes the next version without the breakage and checks that all of it lands.
fn refused_whole_then_next_lands(world: &World, next: &Config, broken: &Config) {
    let old_certificate = api_certificate(world);
    assert_eq!(static_region(world, "/v1"), "us-east");
    assert_eq!(seoul_answer(world, "api.example.test."), ["127.2.6.1"]);

    let refused = world.push(broken, "next version, one part broken");
    assert_eq!(
        world.metric_eventually(r#"meridian_config_reloads_total{result="invalid"}"#, 1.0),
        Some(1.0),
        "the edge refused version {refused}"
    );
    assert_eq!(world.wait_for_version_once(&world.edge), 1);
    assert_eq!(static_region(world, "/v2"), "us-east", "routing stayed");
    assert_eq!(
        seoul_answer(world, "api.example.test."),
        ["127.2.6.1"],
        "the zone stayed"
    );
    assert_eq!(
        api_certificate(world),
        old_certificate,
        "the certificates stayed"
    );

    let fixed = world.push(next, "next version");
    assert_eq!(world.wait_for_version(&world.edge, fixed), fixed);
    assert_eq!(static_region(world, "/v3"), "eu-central-1");
    // GeoDNS takes up each installed version's zone just after it is published.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut answer = seoul_answer(world, "api.example.test.");
    while answer != ["127.2.6.99"] && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
        answer = seoul_answer(world, "api.example.test.");
    }
    assert_eq!(answer, ["127.2.6.99"]);
    let new_certificate = file_der(&next.tls.certificates[0].cert);
    assert_ne!(new_certificate, old_certificate);
    assert_eq!(api_certificate(world), new_certificate);
    let metrics = world.metrics();
    for (series, value) in [
        (r#"meridian_config_reloads_total{result="invalid"}"#, 1.0),
        (r#"meridian_config_reloads_total{result="error"}"#, 0.0),
        (r#"meridian_config_reloads_total{result="ok"}"#, 2.0),
        (
            r#"meridian_tls_certificate_reloads_total{result="ok"}"#,
            1.0,
        ),
        (
            r#"meridian_tls_certificate_reloads_total{result="error"}"#,
            0.0,
        ),
    ] {
        assert_eq!(
            meridian_tests::metric_value(&metrics, series),
            Some(value),
            "{series}"
        );
    }
}

#[test]
fn a_version_whose_dns_zone_cannot_compile_is_refused_whole() {
    let world = World::start_following(dns_config());
    let next = next_version(&world);
    let mut broken = next.clone();
    // Valid by every rule of the document (labels of at most 63 characters, a name of at most 253),
    // but under `example.test.` the full name is longer than the 255 bytes DNS allows: only the
    // zone compiler can tell.
    let long = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(50)
    );
    broken
        .dns
        .as_mut()
        .expect("[dns]")
        .records
        .push(meridian_config::DnsRecord {
            name: long,
            pops: Vec::new(),
            weights: Default::default(),
        });
    refused_whole_then_next_lands(&world, &next, &broken);
}

#[test]
fn a_version_whose_geoip_database_cannot_open_is_refused_whole() {
    let world = World::start_following(dns_config());
    assert_eq!(
        world.get_from("KR", "api.example.test", "/").region(),
        Some("ap-northeast-2")
    );
    let next = next_version(&world);
    let mut broken = next.clone();
    broken.geoip.database = Some(world.path("no-such.mmdb").display().to_string());
    refused_whole_then_next_lands(&world, &next, &broken);
    assert_eq!(
        world.get_from("KR", "api.example.test", "/").region(),
        Some("ap-northeast-2"),
        "clients are still located"
    );
}
