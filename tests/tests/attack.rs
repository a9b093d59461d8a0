//! The edge as an attacker (or a bad day in production) tries it: real sockets, loopback only,
//! every wait bounded. One test per hardening finding owned here: ejection that empties a route,
//! forwarding headers from untrusted clients, paths that dodge their route, HTTP/3 limits.

use meridian_config::{Config, RegionSet};
use meridian_tests::{local_config, metric_value, World};

/// `route` served by `region` alone, and that region by its first upstream alone, without active
/// health checks: whatever happens is down to passive outlier detection.
fn single_upstream(mut config: Config, route: &str, region: &str) -> Config {
    let r = config
        .regions
        .iter_mut()
        .find(|r| r.name == region)
        .expect("region");
    r.upstreams.truncate(1);
    r.health.enabled = false;
    let route = config
        .routes
        .iter_mut()
        .find(|r| r.name == route)
        .expect("route");
    route.regions = RegionSet::List(vec![region.to_string()]);
    route.default_region = Some(region.to_string());
    config
}

/// A route whose only upstream answers bursts of 5xx and closes its pooled keep-alive
/// connections keeps answering: each failure is relayed as it is, and the request after the
/// burst reaches the origin again — no run of edge-made 503s without contacting anyone.
#[test]
fn a_single_upstream_route_survives_5xx_bursts_and_closed_connections() {
    let world = World::start(single_upstream(local_config(), "api", "us-east"));
    let origin = std::sync::Arc::clone(&world.origins_of("us-east")[0]);
    let get = || world.get_from("US", "api.example.test", "/hello");
    assert_eq!(get().status, 200);
    for (round, status) in [500u16, 502, 503, 504].into_iter().enumerate() {
        origin.set_status(Some(status));
        for i in 0..8 {
            let reply = get();
            assert_eq!(
                reply.status,
                status,
                "round {round}, failure {i}: the origin's answer, not the edge's: {}",
                reply.text()
            );
        }
        origin.set_status(None);
        let reply = get();
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
        assert_eq!(reply.json()["region"], "us-east");
        // The origin closes every connection (the edge's pooled one too) and refuses new ones
        // for a moment: the refused tries fail, and the first request after goes out on a fresh
        // connection instead of failing on the dead pooled one.
        world.set_region_up("us-east", false);
        for _ in 0..6 {
            assert_eq!(get().status, 502);
        }
        world.set_region_up("us-east", true);
        let reply = get();
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
        // Closed while idle in the pool, with nothing in between.
        world.set_region_up("us-east", false);
        world.set_region_up("us-east", true);
        let reply = get();
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
    }
    let ejections = metric_value(
        &world.metrics(),
        r#"meridian_upstream_ejections_total{region="us-east"}"#,
    );
    assert_eq!(ejections, None, "a region's only upstream is never ejected");
}
