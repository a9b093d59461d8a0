//! Nearest *healthy* region: active health checks, passive ejection, retries, failover, budgets.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_config::{Config, HumanDuration};
use meridian_tests::{local_config, metric_value, source_for, Protocol, World};

/// Probes every 200 ms; two in a row flip a verdict (fast enough for tests, with hysteresis).
fn fast_health(mut config: Config) -> Config {
    for region in &mut config.regions {
        region.health.interval = HumanDuration::millis(200);
        region.health.timeout = HumanDuration::millis(200);
        region.health.healthy_after = 2;
        region.health.unhealthy_after = 2;
    }
    config
}

/// Polls `check` until it holds or 15 s pass; returns whether it held.
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn region_healthy(world: &World, region: &str) -> Option<f64> {
    metric_value(
        &world.metrics(),
        &format!("meridian_region_healthy{{region=\"{region}\"}}"),
    )
}

#[test]
fn a_region_outage_under_load_costs_no_request_and_traffic_returns() {
    let world = World::start(fast_health(local_config()));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let served: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (stop, failed, served) = (Arc::clone(&stop), Arc::clone(&failed), Arc::clone(&served));
        let client = world.client.clone();
        clients.push(world.runtime.spawn(async move {
            let source = source_for("MX");
            let mut conn = client.keep_alive(source).await.expect("connect");
            while !stop.load(Ordering::Relaxed) {
                match conn.get("api.example.test", "/load").await {
                    Ok(reply) if reply.status == 200 => {
                        let region = reply.region().unwrap_or("?").to_string();
                        *served.lock().expect("lock").entry(region).or_default() += 1;
                    }
                    Ok(reply) => {
                        eprintln!("failed: {} {}", reply.status, reply.text());
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("connection error: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        conn = client.keep_alive(source).await.expect("reconnect");
                    }
                }
            }
        }));
    }
    let count = |region: &str| {
        served
            .lock()
            .expect("lock")
            .get(region)
            .copied()
            .unwrap_or(0)
    };
    assert!(
        eventually(|| count("mx-central") > 100),
        "load reaches mx-central first"
    );

    // Hard outage: every origin of mx-central refuses connections.
    world.set_region_up("mx-central", false);
    assert!(
        eventually(|| region_healthy(&world, "mx-central") == Some(0.0)),
        "health checks notice"
    );
    let before = count("us-east");
    assert!(
        eventually(|| count("us-east") > before + 100),
        "traffic moved to the next-nearest region"
    );
    let mx_during = count("mx-central");

    // Recovery: traffic comes back once the probes pass `healthy_after` times.
    world.set_region_up("mx-central", true);
    assert!(eventually(
        || region_healthy(&world, "mx-central") == Some(1.0)
    ));
    assert!(
        eventually(|| count("mx-central") > mx_during + 100),
        "traffic returned to mx-central"
    );

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        world.runtime.block_on(client).expect("client");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no client saw the outage: {:?}",
        served.lock()
    );
    let metrics = world.metrics();
    let failovers = metric_value(
        &metrics,
        r#"meridian_failovers_total{from="mx-central",reason="unhealthy",route="api",to="us-east"}"#,
    );
    assert!(failovers.is_some_and(|n| n > 0.0), "{metrics}");
    let regions = world.admin_get("/admin/regions").json();
    let mx = regions["regions"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "mx-central"))
        .expect("mx-central listed");
    assert_eq!(mx["state"], "available");
    assert!(mx["upstreams"][0]["last_check_unix_ms"]
        .as_u64()
        .is_some_and(|t| t > 0));
}

#[test]
fn a_slow_region_fails_over_on_the_per_try_timeout() {
    let mut config = local_config();
    let api = config
        .routes
        .iter_mut()
        .find(|r| r.name == "api")
        .expect("api");
    api.timeouts.read = HumanDuration::millis(300);
    let world = World::start(config);
    for origin in world.origins_of("mx-central") {
        origin.set_delay(Duration::from_secs(3));
    }
    let reply = world.get_from("MX", "api.example.test", "/slow");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.region(), Some("us-east"));
    let retries = world.metric_eventually(
        r#"meridian_retries_total{reason="timeout",route="api"}"#,
        2.0,
    );
    assert_eq!(
        retries,
        Some(2.0),
        "both mx-central upstreams timed out once"
    );
}

#[test]
fn a_region_answering_503_fails_over_but_a_post_is_not_replayed() {
    let world = World::start(local_config());
    for origin in world.origins_of("mx-central") {
        origin.set_status(Some(503));
    }
    let reply = world.get_from("MX", "api.example.test", "/get");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.region(),
        Some("us-east"),
        "GET retried elsewhere after 503s"
    );

    let us_before: u64 = world
        .origins_of("us-east")
        .iter()
        .map(|o| o.requests())
        .sum();
    let mx_before: u64 = world
        .origins_of("mx-central")
        .iter()
        .map(|o| o.requests())
        .sum();
    let reply = world
        .runtime
        .block_on(world.client.request(
            Protocol::Http1,
            source_for("MX"),
            "POST",
            "api.example.test",
            "/orders",
            &[],
            b"{\"item\":1}".to_vec(),
        ))
        .expect("post");
    assert_eq!(
        reply.status, 503,
        "the upstream saw the POST: its answer stands"
    );
    let us_after: u64 = world
        .origins_of("us-east")
        .iter()
        .map(|o| o.requests())
        .sum();
    let mx_after: u64 = world
        .origins_of("mx-central")
        .iter()
        .map(|o| o.requests())
        .sum();
    assert_eq!(mx_after - mx_before, 1, "sent once");
    assert_eq!(us_after, us_before, "never replayed elsewhere");
}

#[test]
fn the_retry_budget_caps_retries_when_every_region_fails() {
    let mut config = local_config();
    for route in &mut config.routes {
        route.retry.budget_percent = 0;
        route.retry.budget_min_per_window = 3;
    }
    for region in &mut config.regions {
        // Keep the regions in rotation despite their 503s: this test is about the budget.
        region.outlier.consecutive_failures = 1000;
    }
    let world = World::start(config);
    for origins in world.origins.values() {
        for origin in origins {
            origin.set_status(Some(503));
        }
    }
    for _ in 0..10 {
        assert_eq!(world.get_from("DE", "eu.example.test", "/v1/x").status, 503);
    }
    let retries = world.metric_eventually(
        r#"meridian_retries_total{reason="status",route="eu-records"}"#,
        3.0,
    );
    assert_eq!(retries, Some(3.0), "3 retries in the window, then none");
    let seen: u64 = world
        .origins_of("eu-central-1")
        .iter()
        .map(|o| o.requests())
        .sum();
    assert_eq!(seen, 13, "10 requests + 3 budgeted retries");
}

#[test]
fn a_flapping_origin_does_not_flap_routing() {
    let world = World::start(fast_health(local_config()));
    for origin in world.origins_of("ap-southeast-3") {
        origin.set_flapping_health(true);
    }
    let probes = || -> u64 {
        world
            .origins_of("ap-southeast-3")
            .iter()
            .map(|o| o.health_probes())
            .sum()
    };
    let start = probes();
    let mut always_healthy = true;
    assert!(eventually(|| {
        always_healthy &= region_healthy(&world, "ap-southeast-3") == Some(1.0);
        probes() >= start + 16
    }));
    assert!(
        always_healthy,
        "pass/fail/pass never reaches unhealthy_after = 2"
    );
    assert_eq!(
        world.get_from("MY", "api.example.test", "/").region(),
        Some("ap-southeast-3")
    );
}

#[test]
fn everything_down_gives_503_with_retry_after_without_trying_upstreams() {
    let world = World::start(fast_health(local_config()));
    world.set_region_up("eu-central-1", false);
    assert!(eventually(
        || region_healthy(&world, "eu-central-1") == Some(0.0)
    ));
    let reply = world.get_from("DE", "eu.example.test", "/v1/x");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert!(reply.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("unhealthy")));
    let attempts = metric_value(
        &world.metrics(),
        r#"meridian_upstream_attempts_total{region="eu-central-1",result="connect_error"}"#,
    );
    assert_eq!(
        attempts,
        Some(0.0),
        "refused at decision time, no connect attempted"
    );
}

#[test]
fn drained_regions_and_upstreams_get_no_new_traffic() {
    let mut config = local_config();
    config
        .regions
        .iter_mut()
        .find(|r| r.name == "mx-central")
        .expect("mx")
        .drain = true;
    let us = config
        .regions
        .iter_mut()
        .find(|r| r.name == "us-east")
        .expect("us");
    us.upstreams[0].drain = true;
    let world = World::start(config);
    for _ in 0..6 {
        let reply = world.get_from("MX", "api.example.test", "/");
        assert_eq!(reply.region(), Some("us-east"));
    }
    let us = world.origins_of("us-east");
    assert_eq!(us[0].requests(), 0, "drained upstream untouched");
    assert_eq!(us[1].requests(), 6);
    assert_eq!(
        world
            .origins_of("mx-central")
            .iter()
            .map(|o| o.requests())
            .sum::<u64>(),
        0
    );
}

#[test]
fn a_full_region_overflows_to_the_next_nearest() {
    let mut config = local_config();
    config
        .regions
        .iter_mut()
        .find(|r| r.name == "mx-central")
        .expect("mx")
        .max_inflight = Some(1);
    let world = World::start(config);
    for origin in world.origins_of("mx-central") {
        origin.set_delay(Duration::from_millis(400));
    }
    // One slow request holds mx-central's single slot; a second one overflows.
    let client = world.client.clone();
    let first = world.runtime.spawn(async move {
        client
            .request(
                Protocol::Http1,
                source_for("MX"),
                "GET",
                "api.example.test",
                "/slow",
                &[],
                Vec::new(),
            )
            .await
    });
    assert!(eventually(|| {
        metric_value(
            &world.metrics(),
            r#"meridian_region_inflight{region="mx-central"}"#,
        ) == Some(1.0)
    }));
    let second = world.get_from("MX", "api.example.test", "/");
    assert_eq!(second.region(), Some("us-east"));
    let first = world.runtime.block_on(first).expect("join").expect("first");
    assert_eq!(first.region(), Some("mx-central"));
}
