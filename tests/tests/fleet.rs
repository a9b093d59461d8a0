//! The fleet on real engines: etcd behind the config service (stateless replicas), edges that
//! keep serving through etcd failures, Redis behind global rate limits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use meridian_config::inference::{ApiKey, RateLimit, RouteInference};
use meridian_config::{
    Config, Control, HumanDuration, LimitsBackend, LimitsSection, OnBackendError,
};
use meridian_config_service::{ClientError, ConfigClient};
use meridian_tests::engines::{start_edge_with_control, EtcdCluster, EtcdConfigService, Redis};
use meridian_tests::{local_config, source_for, Protocol, World};

/// `config` with a different `pop` name: a distinct, valid document per push.
fn variant(config: &Config, n: u64) -> String {
    let mut config = config.clone();
    config.edge.pop = format!("pop-{n}");
    toml::to_string(&config).expect("config serializes")
}

#[test]
fn engines_start_stop_and_survive_a_leader_kill() {
    let mut etcd = EtcdCluster::start();
    assert_eq!(etcd.endpoints().len(), 3);
    let leader = etcd.leader();
    etcd.kill(leader);
    let next = etcd.leader();
    assert_ne!(next, leader, "a new leader is elected among the survivors");
    etcd.restart(leader);

    let mut redis = Redis::start();
    assert!(redis.url().starts_with("redis://127."));
    redis.kill();
    redis.restart();
}

#[test]
fn two_replicas_on_one_etcd_exactly_one_if_match_push_wins() {
    let etcd = EtcdCluster::start();
    let rt = meridian_tests::runtime();
    let a = EtcdConfigService::start(&rt, &etcd.endpoints(), "/replicas");
    let b = EtcdConfigService::start(&rt, &etcd.endpoints(), "/replicas");
    let base = local_config();
    let (ca, cb) = (a.client(), b.client());

    let v1 = rt
        .block_on(ca.push(&variant(&base, 1), "ana", "first", Some(0)))
        .expect("first push");
    assert_eq!(v1.version, 1);
    // The other replica serves it at once: it keeps nothing of its own.
    let seen = rt.block_on(cb.current()).expect("read").expect("version 1");
    assert_eq!(seen.meta, v1);

    // Ten writers, half through each replica, all believing version 1 is current.
    let results = rt.block_on(async {
        let mut pushes = tokio::task::JoinSet::new();
        for n in 0..10u64 {
            let client = if n % 2 == 0 { ca.clone() } else { cb.clone() };
            let document = variant(&base, 100 + n);
            pushes.spawn(async move {
                client
                    .push(&document, "racer", &format!("racer {n}"), Some(1))
                    .await
            });
        }
        pushes.join_all().await
    });
    let won = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results
        .iter()
        .filter(|r| matches!(r, Err(ClientError::Rejected { status: 409, .. })))
        .count();
    assert_eq!((won, conflicts), (1, 9), "{results:?}");

    let history = rt.block_on(ca.history()).expect("history");
    assert_eq!(
        history.iter().map(|m| m.version).collect::<Vec<_>>(),
        [2, 1]
    );
    assert_eq!(rt.block_on(cb.history()).expect("history"), history);

    // Rollback through the other replica is a new version with version 1's document.
    let v3 = rt.block_on(cb.rollback(1)).expect("rollback");
    assert_eq!(v3.version, 3);
    let current = rt.block_on(ca.current()).expect("read").expect("current");
    assert_eq!(current.meta.version, 3);
    assert_eq!(current.document, variant(&base, 1));
    // A stale If-Match names the real current version.
    match rt.block_on(ca.push(&variant(&base, 9), "late", "late", Some(2))) {
        Err(ClientError::Rejected { status: 409, body }) => assert_eq!(body["current"], 3),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Invalid documents are refused with the same validation as the file store.
    assert!(matches!(
        rt.block_on(cb.push("schema = [", "x", "broken", None)),
        Err(ClientError::Rejected { status: 422, .. })
    ));
}

/// Pushes `document` with a unique `message` until it is acknowledged. A failed attempt may
/// still have committed (the answer was lost with the etcd member), so before trying again the
/// history is checked for the message: each push lands exactly once.
fn push_once(
    rt: &tokio::runtime::Runtime,
    clients: &[ConfigClient],
    document: &str,
    message: &str,
) -> u64 {
    for attempt in 0..200 {
        let client = &clients[attempt % clients.len()];
        match rt.block_on(client.push(document, "pusher", message, None)) {
            Ok(meta) => return meta.version,
            Err(e) => {
                eprintln!("push {message:?} attempt {attempt}: {e}");
                if let Ok(history) = rt.block_on(client.history()) {
                    if let Some(meta) = history.iter().find(|m| m.message == message) {
                        return meta.version;
                    }
                }
            }
        }
    }
    panic!("push {message:?} never acknowledged");
}

#[test]
fn edges_follow_replicas_through_an_etcd_leader_kill_and_a_full_outage() {
    let mut etcd = EtcdCluster::start();
    let world = World::start(local_config());
    let replicas = [
        EtcdConfigService::start(&world.runtime, &etcd.endpoints(), "/fleet"),
        EtcdConfigService::start(&world.runtime, &etcd.endpoints(), "/fleet"),
    ];
    let clients: Vec<ConfigClient> = replicas.iter().map(|r| r.client()).collect();
    let first = push_once(
        &world.runtime,
        &clients,
        &variant(&world.config, 0),
        "push 0",
    );
    // Reads need a token: the edges present the replicas' (shared) one.
    let token_file = world.path("fleet.token");
    std::fs::write(&token_file, &replicas[0].token).expect("token file");
    let edges: Vec<_> = (0..3)
        .map(|i| {
            start_edge_with_control(
                &world,
                Control {
                    url: replicas[i % 2].url(),
                    token_file: Some(token_file.display().to_string()),
                    cache_dir: world.path(&format!("edge-{i}-cache")).display().to_string(),
                    wait: HumanDuration::secs(30),
                    ..Default::default()
                },
            )
        })
        .collect();
    for edge in &edges {
        assert_eq!(world.wait_for_version(edge, first), first);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    let countries = ["MX", "SG", "DE", "KR", "??", "US", "BR", "JP"];
    for i in 0..32 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let client = meridian_tests::Client::new(edges[i % 3].http_addr);
        let source = source_for(countries[i % countries.len()]);
        load.push(world.runtime.spawn(async move {
            let mut conn = client.keep_alive(source).await.expect("connect");
            while !stop.load(Ordering::Relaxed) {
                match conn.get("api.example.test", &format!("/load/{i}")).await {
                    Ok(reply) if reply.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(reply) => {
                        eprintln!("status {}: {}", reply.status, reply.text());
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

    let mut acknowledged = Vec::new();
    for n in 1..=50u64 {
        if n == 25 {
            let leader = etcd.leader();
            etcd.kill(leader);
        }
        let message = format!("push {n}");
        let version = push_once(
            &world.runtime,
            &clients,
            &variant(&world.config, n),
            &message,
        );
        acknowledged.push((version, message));
    }
    let last = acknowledged.last().expect("pushed").0;
    for edge in &edges {
        assert_eq!(world.wait_for_version(edge, last), last);
    }

    // etcd entirely down: the edges keep serving what they have.
    etcd.kill_all();
    let during_outage = ok.load(Ordering::Relaxed);
    for edge in &edges {
        let reply = world.request_to(edge, "DE", "api.example.test", "/outage");
        assert_eq!(reply.status, 200);
    }
    // Back up: the next push reaches every edge without restarting anything.
    etcd.restart_all();
    let message = "after the outage".to_string();
    let version = push_once(
        &world.runtime,
        &clients,
        &variant(&world.config, 99),
        &message,
    );
    acknowledged.push((version, message));
    for edge in &edges {
        assert_eq!(world.wait_for_version(edge, version), version);
    }

    stop.store(true, Ordering::Relaxed);
    for task in load {
        world.runtime.block_on(task).expect("client task");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no client request failed"
    );
    assert!(
        ok.load(Ordering::Relaxed) > during_outage,
        "the clients ran throughout"
    );

    let history = world
        .runtime
        .block_on(clients[0].history())
        .expect("history");
    for (version, message) in &acknowledged {
        let matching: Vec<_> = history.iter().filter(|m| &m.message == message).collect();
        assert_eq!(matching.len(), 1, "{message:?} appears exactly once");
        assert_eq!(matching[0].version, *version);
    }
    assert_eq!(
        history.len(),
        acknowledged.len() + 1,
        "nothing but the pushes"
    );
}

const INFERENCE_HOST: &str = "inference.example.test";
/// sha256("sk-alpha") and sha256("sk-beta"); a third key for a repeated measurement.
const ALPHA_SHA256: &str = "2179e632e89277f18aa600491b68ad55121fd6caa045e047fdeb426088a5a5f1";
const BETA_SHA256: &str = "c29d79ad08b23ba5095b823d0b2e777320983be14c1150de96d07a86da5cd78c";
/// sha256("sk-gamma").
const GAMMA_SHA256: &str = "e7b351909073077fbbfd9bb773230c34d4f28c83f7c438c4fbcaca635ba7edb4";

/// The demo config with a per-key request limit on the inference route, counted in `redis`.
fn globally_limited(
    requests_per_minute: u32,
    redis: &Redis,
    on_backend_error: OnBackendError,
) -> Config {
    let mut config = local_config();
    let route = config
        .routes
        .iter_mut()
        .find(|r| r.name == "inference")
        .expect("inference route");
    route.inference = Some(RouteInference {
        max_body_bytes: 65536,
        rate_limit: Some(RateLimit {
            requests_per_minute: Some(requests_per_minute),
            tokens_per_minute: None,
        }),
    });
    config.api_keys = vec![
        ApiKey {
            name: "alpha".into(),
            sha256: ALPHA_SHA256.into(),
        },
        ApiKey {
            name: "beta".into(),
            sha256: BETA_SHA256.into(),
        },
        ApiKey {
            name: "gamma".into(),
            sha256: GAMMA_SHA256.into(),
        },
    ];
    config.limits = LimitsSection {
        backend: LimitsBackend::Redis,
        redis: vec![redis.url()],
        on_backend_error,
        lease: 0,
    };
    config
}

async fn model_call(target: std::net::SocketAddr, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    meridian_tests::Client::new(target)
        .request(
            Protocol::Http1,
            source_for("SG"),
            "POST",
            INFERENCE_HOST,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            br#"{"model":"qwen-turbo","max_tokens":8}"#.to_vec(),
        )
        .await
        .map_or_else(
            |e| {
                eprintln!("model call failed: {e:#}");
                0
            },
            |reply| reply.status,
        )
}

/// The wall-clock minute limits count in (the same on every edge).
fn minute_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        / 60
}

/// Three times the limit of `key`, spread evenly over the three edges, 4 connections per edge;
/// the statuses, or `None` when the calls straddled two minutes (two budgets).
fn burst(world: &World, edges: [std::net::SocketAddr; 3], key: &'static str) -> Option<Vec<u16>> {
    let minute = minute_now();
    let statuses = world.runtime.block_on(async {
        let mut calls = tokio::task::JoinSet::new();
        for worker in 0..12 {
            let target = edges[worker % 3];
            calls.spawn(async move {
                let mut seen = Vec::with_capacity(150);
                for _ in 0..150 {
                    seen.push(model_call(target, key).await);
                }
                seen
            });
        }
        calls.join_all().await.concat()
    });
    (minute_now() == minute).then_some(statuses)
}

#[test]
fn three_edges_share_a_redis_limit_within_two_percent() {
    let redis = Redis::start();
    let world = World::start(globally_limited(600, &redis, OnBackendError::Allow));
    let more = [world.start_edge("edge-1"), world.start_edge("edge-2")];
    let edges = [world.edge.http_addr, more[0].http_addr, more[1].http_addr];
    // A measurement must fit in one minute: one that straddles a boundary is repeated with a key
    // that has not been used (the next boundary is a minute away), instead of waiting for a
    // fresh minute to start.
    let started = std::time::Instant::now();
    let statuses = burst(&world, edges, "sk-alpha")
        .or_else(|| burst(&world, edges, "sk-gamma"))
        .expect("one of two bursts fits in a minute");
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    eprintln!(
        "1800 calls over 3 edges in {:?}: {admitted} admitted, {refused} refused",
        started.elapsed()
    );
    let mut by_status = std::collections::BTreeMap::new();
    for status in &statuses {
        *by_status.entry(*status).or_insert(0) += 1;
    }
    assert_eq!(
        admitted + refused,
        1800,
        "every call answered 200 or 429: {by_status:?}"
    );
    assert!(
        (588..=612).contains(&admitted),
        "admitted {admitted}, want 600 ± 2 %"
    );
    // Another key has its own budget.
    assert_eq!(world.runtime.block_on(model_call(edges[1], "sk-beta")), 200);
    let metrics = world.metrics();
    let refills = meridian_tests::metric_value(&metrics, "meridian_limits_lease_refills_total")
        .expect("lease refills counted");
    assert!(
        (1.0..600.0).contains(&refills),
        "leases save round trips: {refills}"
    );
}

#[test]
fn with_redis_killed_allow_admits_and_the_edge_stays_up() {
    redis_killed(OnBackendError::Allow, 200);
}

#[test]
fn with_redis_killed_deny_refuses_and_the_edge_stays_up() {
    redis_killed(OnBackendError::Deny, 429);
}

fn redis_killed(on_error: OnBackendError, expected: u16) {
    let mut redis = Redis::start();
    let world = World::start(globally_limited(600, &redis, on_error));
    assert_eq!(
        world
            .runtime
            .block_on(model_call(world.edge.http_addr, "sk-alpha")),
        200
    );
    redis.kill();
    for _ in 0..5 {
        assert_eq!(
            world
                .runtime
                .block_on(model_call(world.edge.http_addr, "sk-beta")),
            expected,
            "{on_error:?}"
        );
    }
    // The edge itself is fine: other routes answer.
    let reply = world.get_from("DE", "api.example.test", "/still-up");
    assert_eq!(reply.status, 200);
    let label = match on_error {
        OnBackendError::Allow => "allow",
        OnBackendError::Deny => "deny",
    };
    let decided = world.metric_eventually(
        &format!(r#"meridian_limits_backend_error_decisions_total{{decision="{label}"}}"#),
        5.0,
    );
    assert_eq!(decided, Some(5.0));
    assert!(
        meridian_tests::metric_value(&world.metrics(), "meridian_limits_backend_errors_total")
            .is_some_and(|n| n >= 1.0)
    );
}
