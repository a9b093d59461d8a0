//! Config service → edges: pushes propagate to every edge, bad versions never land, edges keep
//! serving (and restart) without the service, and no request fails while versions change.

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
