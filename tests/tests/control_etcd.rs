//! Edges that follow etcd directly (`[control] etcd`), without a config server in between:
//! they resume their watch after a member dies or the whole cluster is down, re-read after a
//! compaction, start from their last good copy when nothing answers, and take fleet-wide
//! cache purges from the same watch.

use std::time::{Duration, Instant};

use meridian_config::{Config, Control, RouteCache};
use meridian_config_service::{Change, ConfigClient, EtcdFollower};
use meridian_gateway::edge::RunningEdge;
use meridian_tests::engines::{start_edge_with_control, EtcdCluster, EtcdConfigService};
use meridian_tests::{local_config, metric_value, source_for, Client, Protocol, World};

const PREFIX: &str = "/direct";

/// `config` with a different `pop` name: a distinct, valid document per push.
fn variant(config: &Config, n: u64) -> String {
    let mut config = config.clone();
    config.edge.pop = format!("pop-{n}");
    toml::to_string(&config).expect("config serializes")
}

fn etcd_control(etcd: &EtcdCluster, world: &World, cache: &str) -> Control {
    Control {
        etcd: etcd.endpoints(),
        etcd_prefix: PREFIX.into(),
        cache_dir: world.path(cache).display().to_string(),
        ..Control::default()
    }
}

/// Pushes through the replica, trying again while etcd elects a leader; a try that may have
/// committed before its answer was lost is found in the history by its message.
fn push(world: &World, client: &ConfigClient, document: &str, message: &str) -> u64 {
    for _ in 0..200 {
        match world
            .runtime
            .block_on(client.push(document, "pusher", message, None))
        {
            Ok(meta) => return meta.version,
            Err(e) => {
                eprintln!("push {message:?}: {e}");
                if let Ok(history) = world.runtime.block_on(client.history()) {
                    if let Some(meta) = history.iter().find(|m| m.message == message) {
                        return meta.version;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    panic!("push {message:?} never acknowledged");
}

fn installs(edge: &RunningEdge) -> f64 {
    let metrics = String::from_utf8_lossy(&edge.store.metrics().render()).into_owned();
    metric_value(&metrics, r#"meridian_config_reloads_total{result="ok"}"#).unwrap_or(0.0)
}

#[test]
fn edges_follow_etcd_through_a_member_kill_and_a_full_outage() {
    let mut etcd = EtcdCluster::start();
    let world = World::start(local_config());
    let mut replica = EtcdConfigService::start(&world.runtime, &etcd.endpoints(), PREFIX);
    let pusher = replica.client();
    let first = push(&world, &pusher, &variant(&world.config, 0), "push 0");
    let edges: Vec<_> = (0..2)
        .map(|i| start_edge_with_control(&world, etcd_control(&etcd, &world, &format!("e{i}"))))
        .collect();
    for edge in &edges {
        assert_eq!(
            world.wait_for_version(edge, first),
            first,
            "started from etcd"
        );
    }

    // The leader dies mid-way through 20 pushes: the watches resume on the survivors.
    let mut last = first;
    for n in 1..=20 {
        if n == 10 {
            let leader = etcd.leader();
            etcd.kill(leader);
        }
        last = push(
            &world,
            &pusher,
            &variant(&world.config, n),
            &format!("push {n}"),
        );
    }
    for edge in &edges {
        assert_eq!(world.wait_for_version(edge, last), last);
        // Every install is a new version (the first at start, then at most one per push):
        // none was applied twice after the resume.
        assert!(installs(edge) <= 21.0, "{} installs", installs(edge));
    }
    etcd.restart_all();

    // Everything down: the edges keep serving, and a restarted edge starts from its last good
    // copy on disk (one file, the version inside).
    replica.stop(&world.runtime);
    etcd.kill_all();
    for edge in &edges {
        let reply = world.request_to(edge, "DE", "api.example.test", "/outage");
        assert_eq!(reply.status, 200);
    }
    let restarted = start_edge_with_control(&world, etcd_control(&etcd, &world, "e0"));
    assert_eq!(world.wait_for_version_once(&restarted), last);
    let reply = world.request_to(&restarted, "US", "api.example.test", "/cached");
    assert_eq!(reply.status, 200);

    // Back up: the next push reaches every edge, none restarted.
    etcd.restart_all();
    let replica = EtcdConfigService::start(&world.runtime, &etcd.endpoints(), PREFIX);
    let after = push(
        &world,
        &replica.client(),
        &variant(&world.config, 99),
        "after",
    );
    for edge in edges.iter().chain([&restarted]) {
        assert_eq!(world.wait_for_version(edge, after), after);
    }
}

#[test]
fn a_follower_resumes_after_its_revision_and_re_reads_after_a_compaction() {
    let etcd = EtcdCluster::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let replica = EtcdConfigService::start(&rt, &etcd.endpoints(), PREFIX);
    let pusher = replica.client();
    let base = local_config();
    rt.block_on(async {
        let v1 = pusher
            .push(&variant(&base, 1), "a", "1", None)
            .await
            .expect("push");
        let mut follower = EtcdFollower::new(&etcd.endpoints(), PREFIX, 0);
        let current = follower.current().await.expect("read").expect("version 1");
        assert_eq!(current.meta, v1);

        // Changes after the read arrive in order, each once: a purge, then the version.
        pusher
            .purge(&serde_json::json!({ "tag": "t1" }))
            .await
            .expect("purge");
        let v2 = pusher
            .push(&variant(&base, 2), "a", "2", None)
            .await
            .expect("push");
        let mut seen = Vec::new();
        while !seen.iter().any(|c| matches!(c, Change::Version(_))) {
            seen.extend(follower.next().await.expect("changes"));
        }
        match seen.as_slice() {
            [Change::Purge(purge), Change::Version(version)] => {
                assert_eq!(purge["tag"], "t1");
                assert_eq!(version.meta, v2);
            }
            other => panic!("unexpected changes {other:?}"),
        }

        // A new connection resumes right after the revision the last one saw: the versions
        // pushed meanwhile arrive in order and each at most once (superseded ones skipped).
        let mut revision = follower.revision();
        drop(follower);
        let mut newest = v2.version;
        for n in 3..=4 {
            newest = pusher
                .push(&variant(&base, n), "a", &n.to_string(), None)
                .await
                .expect("push")
                .version;
        }
        let mut follower = EtcdFollower::resume(&etcd.endpoints(), PREFIX, v2.version, revision);
        let mut versions = Vec::new();
        while versions.last() != Some(&newest) {
            for change in follower.next().await.expect("changes") {
                match change {
                    Change::Version(v) => versions.push(v.meta.version),
                    other => panic!("unexpected change {other:?}"),
                }
            }
        }
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert!(versions.iter().all(|&v| v > v2.version), "{versions:?}");

        // Pushes while nobody listens, then the history is compacted: the revision after the
        // last one seen is gone, so the follower says purges may be lost and reads the pointer
        // afresh, ending on the newest version.
        revision = follower.revision();
        let seen = newest;
        drop(follower);
        for n in 5..=6 {
            newest = pusher
                .push(&variant(&base, n), "a", &n.to_string(), None)
                .await
                .expect("push")
                .version;
        }
        let compacted = etcd.compact();
        assert!(compacted > revision);
        let mut follower = EtcdFollower::resume(&etcd.endpoints(), PREFIX, seen, revision);
        let lost = follower.next().await.expect("compaction is reported");
        assert!(matches!(lost.as_slice(), [Change::PurgesLost]), "{lost:?}");
        let fresh = follower.next().await.expect("re-read");
        match fresh.as_slice() {
            [Change::Version(version)] => assert_eq!(version.meta.version, newest),
            other => panic!("unexpected changes {other:?}"),
        }
    });
}

/// The demo world with caching on for route `static`.
fn caching_config() -> Config {
    let mut config = local_config();
    config.edge.https = None;
    config.edge.h3 = false;
    for region in &mut config.regions {
        region.health.enabled = false;
    }
    let route = config
        .routes
        .iter_mut()
        .find(|r| r.name == "static")
        .expect("route static");
    route.cache = RouteCache {
        enabled: true,
        ..RouteCache::default()
    };
    config
}

const TAGGED: &str = "/img/a?cc=max-age%3D60&tag=product-1";

fn cache_state(world: &World, edge: &RunningEdge) -> String {
    let reply = world.runtime.block_on(Client::new(edge.http_addr).request(
        Protocol::Http1,
        source_for("US"),
        "GET",
        "static.example.test",
        TAGGED,
        &[],
        Vec::new(),
    ));
    let reply = reply.expect("request");
    assert_eq!(reply.status, 200);
    reply.header("x-meridian-cache").unwrap_or("-").to_string()
}

/// Fills every edge's cache with the tagged object, runs `purge`, and waits until every edge
/// counted a tag purge; then the object is a miss everywhere. Returns how long the purge took
/// to reach the last edge (printed: a figure, not an assertion).
fn purge_reaches_every_edge(
    world: &World,
    edges: &[&RunningEdge],
    purge: impl FnOnce(),
) -> Duration {
    for edge in edges {
        cache_state(world, edge);
        assert_eq!(cache_state(world, edge), "hit");
    }
    let purges = |edge: &RunningEdge| {
        metric_value(
            &String::from_utf8_lossy(&edge.store.metrics().render()),
            r#"meridian_cache_purges_total{kind="tag"}"#,
        )
        .unwrap_or(0.0)
    };
    let started = Instant::now();
    purge();
    for edge in edges {
        let deadline = Instant::now() + Duration::from_secs(10);
        while purges(edge) < 1.0 {
            assert!(Instant::now() < deadline, "the purge never reached an edge");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let took = started.elapsed();
    for edge in edges {
        assert_eq!(cache_state(world, edge), "miss", "purged everywhere");
    }
    took
}

#[test]
fn a_purge_through_the_config_service_reaches_every_edge() {
    let world = World::start_following(caching_config());
    let second = world.start_edge("edge-1-cache");
    let third = world.start_edge("edge-2-cache");
    let client = world.service().client();
    let took = purge_reaches_every_edge(&world, &[&world.edge, &second, &third], || {
        let seq = world
            .runtime
            .block_on(client.purge(&serde_json::json!({ "tag": "product-1" })))
            .expect("purge accepted");
        assert!(seq >= 1);
    });
    eprintln!("purge through the config service reached 3 edges in {took:?}");
    // Per-edge purges through the admin listener keep working (tests/tests/cache.rs covers
    // them); a purge needs the write token.
    let anonymous = ConfigClient::new(&world.service().url(), None).expect("client");
    let refused = world
        .runtime
        .block_on(anonymous.purge(&serde_json::json!({ "tag": "x" })));
    assert!(matches!(
        refused,
        Err(meridian_config_service::ClientError::Rejected { status: 401, .. })
    ));
}

#[test]
fn a_purge_on_etcd_reaches_every_edge_following_it() {
    let etcd = EtcdCluster::start();
    let world = World::start(caching_config());
    let replica = EtcdConfigService::start(&world.runtime, &etcd.endpoints(), PREFIX);
    let document = toml::to_string(&world.config).expect("serializes");
    push(&world, &replica.client(), &document, "cached world");
    let edges: Vec<_> = (0..3)
        .map(|i| start_edge_with_control(&world, etcd_control(&etcd, &world, &format!("p{i}"))))
        .collect();
    let refs: Vec<&RunningEdge> = edges.iter().collect();
    let took = purge_reaches_every_edge(&world, &refs, || {
        world
            .runtime
            .block_on(meridian_config_service::etcd_follow::publish_purge(
                &etcd.endpoints(),
                PREFIX,
                &serde_json::json!({ "tag": "product-1" }),
            ))
            .expect("purge published");
    });
    eprintln!("purge on etcd reached 3 edges in {took:?}");
}
