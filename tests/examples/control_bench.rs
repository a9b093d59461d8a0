//! Benchmarks of the control plane: measurements, not tests, so they are an example the test
//! command never runs. Run each alone on a quiet machine and copy the figures to
//! docs/benchmarks.md:
//!
//! ```sh
//! cargo run --release -p meridian-tests --example control_bench -- push
//! cargo run --release -p meridian-tests --example control_bench -- limiter-round-trip
//! cargo run --release -p meridian-tests --example control_bench -- limiter-leases
//! ```
//!
//! * push → applied on 3 edges, p50/p99 over 100 pushes: edges following the embedded file
//!   store's config service vs edges following etcd directly;
//! * the cost of a global rate-limit decision on Redis: leases vs a round trip per request.

use std::time::{Duration, Instant};

use meridian_config::inference::{ApiKey, RateLimit, RouteInference};
use meridian_config::{Config, Control, LimitsBackend, LimitsSection, OnBackendError};
use meridian_gateway::edge::RunningEdge;
use meridian_tests::engines::{start_edge_with_control, EtcdCluster, EtcdConfigService, Redis};
use meridian_tests::{local_config, source_for, Protocol, World};

const PUSHES: usize = 100;

fn variant(config: &Config, n: usize) -> String {
    let mut config = config.clone();
    config.edge.pop = format!("pop-{n}");
    toml::to_string(&config).expect("config serializes")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Pushes `PUSHES` versions one after another; each is timed from the push until every edge
/// has installed it (the edges' stores are read in-process, so no admin request is timed).
fn push_to_applied(
    world: &World,
    client: &meridian_config_service::ConfigClient,
    edges: &[&RunningEdge],
) -> (Vec<Duration>, Vec<Duration>) {
    let mut samples = Vec::with_capacity(PUSHES);
    let mut acks = Vec::with_capacity(PUSHES);
    for n in 0..PUSHES {
        let document = variant(&world.config, 1000 + n);
        let started = Instant::now();
        let version = world
            .runtime
            .block_on(client.push(&document, "bench", &format!("bench {n}"), None))
            .expect("push")
            .version;
        acks.push(started.elapsed());
        for edge in edges {
            while edge.store.load().snapshot.meta.version < version {
                assert!(started.elapsed() < Duration::from_secs(10), "never applied");
                std::thread::yield_now();
            }
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    acks.sort();
    (samples, acks)
}

fn report(what: &str, (samples, acks): &(Vec<Duration>, Vec<Duration>)) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "{what}: push -> applied on 3 edges over {} pushes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (push acknowledged: p50 {:.2} ms, p99 {:.2} ms)",
        samples.len(),
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 0.99)),
        ms(samples[samples.len() - 1]),
        ms(percentile(acks, 0.5)),
        ms(percentile(acks, 0.99)),
    );
}

fn push_to_applied_file_store_vs_etcd() {
    // The embedded file store: edges long-poll one config service.
    let world = World::start_following(local_config());
    let more = [world.start_edge("b1"), world.start_edge("b2")];
    let edges = [&world.edge, &more[0], &more[1]];
    let file = push_to_applied(&world, &world.service().client(), &edges);
    report("file store, edges long-poll the config service", &file);

    // etcd: edges watch the cluster directly; pushes go through one config server replica.
    let etcd = EtcdCluster::start();
    let replica = EtcdConfigService::start(&world.runtime, &etcd.endpoints(), "/bench");
    let client = replica.client();
    world
        .runtime
        .block_on(client.push(&variant(&world.config, 0), "bench", "start", None))
        .expect("first push");
    let direct: Vec<_> = (0..3)
        .map(|i| {
            start_edge_with_control(
                &world,
                Control {
                    etcd: etcd.endpoints(),
                    etcd_prefix: "/bench".into(),
                    cache_dir: world.path(&format!("etcd-{i}")).display().to_string(),
                    ..Control::default()
                },
            )
        })
        .collect();
    let edges: Vec<&RunningEdge> = direct.iter().collect();
    let samples = push_to_applied(&world, &client, &edges);
    report("etcd (3 members), edges watch etcd directly", &samples);
}

const ALPHA_SHA256: &str = "2179e632e89277f18aa600491b68ad55121fd6caa045e047fdeb426088a5a5f1";

fn limited(redis: &Redis, lease: u32) -> Config {
    let mut config = local_config();
    let route = config
        .routes
        .iter_mut()
        .find(|r| r.name == "inference")
        .expect("inference route");
    route.inference = Some(RouteInference {
        max_body_bytes: 65536,
        rate_limit: Some(RateLimit {
            requests_per_minute: Some(1_000_000),
            tokens_per_minute: None,
        }),
    });
    config.api_keys = vec![ApiKey {
        name: "alpha".into(),
        sha256: ALPHA_SHA256.into(),
    }];
    config.limits = LimitsSection {
        backend: LimitsBackend::Redis,
        redis: vec![redis.url()],
        on_backend_error: OnBackendError::Deny,
        lease,
    };
    config
}

/// Mean time per admitted model call over `n` sequential calls on one keep-alive connection.
fn per_call(world: &World, n: usize) -> Duration {
    world.runtime.block_on(async {
        let client = meridian_tests::Client::new(world.edge.http_addr);
        let call = || {
            client.request(
                Protocol::Http1,
                source_for("SG"),
                "POST",
                "inference.example.test",
                "/v1/chat/completions",
                &[("authorization", "Bearer sk-alpha")],
                br#"{"model":"qwen-turbo","max_tokens":1}"#.to_vec(),
            )
        };
        for _ in 0..50 {
            call().await.expect("warm-up");
        }
        let started = Instant::now();
        for _ in 0..n {
            let reply = call().await.expect("call");
            assert_eq!(reply.status, 200);
        }
        started.elapsed() / n as u32
    })
}

fn limiter_cost(what: &str, lease: u32) {
    let redis = Redis::start();
    let world = World::start(limited(&redis, lease));
    let mean = per_call(&world, 2000);
    let metrics = world.metrics();
    let refills = meridian_tests::metric_value(&metrics, "meridian_limits_lease_refills_total")
        .unwrap_or(0.0);
    eprintln!(
        "{what}: {:.1} µs per admitted call (whole request through the edge), {refills} Redis lease refills for 2050 calls",
        mean.as_secs_f64() * 1e6
    );
}

// One process per variant: a second edge in the same process after the first stopped does not
// become ready (Pingora keeps process-wide state).
fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("push") => push_to_applied_file_store_vs_etcd(),
        Some("limiter-round-trip") => limiter_cost("round trip per request (lease = 1)", 1),
        Some("limiter-leases") => limiter_cost("leases (default: 1 % of the limit)", 0),
        _ => {
            eprintln!("usage: control_bench push | limiter-round-trip | limiter-leases");
            std::process::exit(2);
        }
    }
}
