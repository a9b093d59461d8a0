//! The edge response cache end to end: RFC 9111 directives, validators, Vary, coalescing,
//! stale serving, size limits, purge, metrics — through real sockets, with the origins counting.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use meridian_config::{Config, HumanDuration, RouteCache};
use meridian_testkit::origin::pattern_body;
use meridian_tests::{local_config, metric_value, source_for, Client, Protocol, Reply, World};

const HOST: &str = "static.example.test";
const TOKEN: &str = "purge-secret";

/// The demo world with caching on for route `static` (us-east for US clients), an admin token,
/// and health checks off so a test decides alone when regions fail.
fn cache_config(edit: impl FnOnce(&mut Config)) -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    let mut config = local_config();
    config.edge.https = None;
    config.edge.h3 = false;
    config.edge.admin.token_file = Some(token_file.display().to_string());
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
    edit(&mut config);
    (config, dir)
}

fn start(edit: impl FnOnce(&mut Config)) -> (World, tempfile::TempDir) {
    let (config, dir) = cache_config(edit);
    (World::start(config), dir)
}

fn get(world: &World, path: &str, headers: &[(&str, &str)]) -> Reply {
    world.request(Protocol::Http1, source_for("US"), HOST, path, headers)
}

fn cache_header(reply: &Reply) -> &str {
    reply.header("x-meridian-cache").unwrap_or("-")
}

/// `lookups` once it reaches `at_least` (bounded poll: some results are counted when the response
/// completes, which can be a moment after the client has read it).
fn lookups_reach(world: &World, result: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = lookups(world, result);
        if value >= at_least || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn lookups(world: &World, result: &str) -> f64 {
    metric_value(
        &world.metrics(),
        &format!("meridian_cache_lookups_total{{result=\"{result}\",route=\"static\"}}"),
    )
    .unwrap_or(0.0)
}

/// Repeats `get` until `x-meridian-cache` says `wanted` (bounded); returns that reply.
fn until_cache_says(world: &World, path: &str, wanted: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get(world, path, &[]);
        if cache_header(&reply) == wanted || Instant::now() > deadline {
            return reply;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn purge(world: &World, body: &str, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a), ("content-type", "application/json")])
        .unwrap_or_default();
    world
        .runtime
        .block_on(Client::new(world.edge.admin_addr).request(
            Protocol::Http1,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "POST",
            "localhost",
            "/admin/cache/purge",
            &headers,
            body.as_bytes().to_vec(),
        ))
        .expect("purge request")
}

#[test]
fn a_miss_is_stored_and_the_next_request_is_a_hit_that_never_reaches_the_origin() {
    let (world, _dir) = start(|_| {});
    let path = "/logo?cc=max-age%3D60";
    let first = get(&world, path, &[]);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(cache_header(&first), "miss");
    assert_eq!(first.region(), Some("us-east"));
    assert_eq!(world.origin_requests(), 1);

    let second = get(&world, path, &[]);
    assert_eq!(second.status, 200);
    assert_eq!(cache_header(&second), "hit");
    assert_eq!(second.body, first.body, "the stored body is served");
    assert_eq!(
        second.region(),
        Some("us-east"),
        "the region that produced it"
    );
    assert_eq!(second.header("x-meridian-pop"), Some("local-1"));
    let age: u64 = second
        .header("age")
        .and_then(|a| a.parse().ok())
        .expect("Age on a hit");
    assert!(age <= 60, "age {age}");
    assert_eq!(
        world.origin_requests(),
        1,
        "a hit does not reach the origin"
    );

    // HEAD is answered from the entry too (headers only).
    let head = world.runtime.block_on(world.client.request(
        Protocol::Http1,
        source_for("US"),
        "HEAD",
        HOST,
        path,
        &[],
        Vec::new(),
    ));
    let head = head.expect("HEAD");
    assert_eq!((head.status, cache_header(&head)), (200, "hit"));
    assert!(head.body.is_empty());

    // Other routes do not cache and carry no cache header.
    let api = world.get_from("US", "api.example.test", "/x?cc=max-age%3D60");
    assert_eq!(api.header("x-meridian-cache"), None);

    assert_eq!(
        world.metric_eventually(
            "meridian_cache_lookups_total{result=\"hit\",route=\"static\"}",
            2.0
        ),
        Some(2.0)
    );
    assert_eq!(lookups_reach(&world, "miss", 1.0), 1.0);
    assert_eq!(
        metric_value(&world.metrics(), "meridian_cache_entries"),
        Some(1.0)
    );
    assert!(metric_value(&world.metrics(), "meridian_cache_bytes").unwrap_or(0.0) > 0.0);
}

#[test]
fn no_store_private_set_cookie_and_authorization_are_never_shared() {
    let (world, _dir) = start(|_| {});
    for path in [
        "/ns?cc=no-store",
        "/pv?cc=private%2C%20max-age%3D60",
        "/ck?cc=max-age%3D60&cookie=1",
        "/none",
    ] {
        let before = world.origin_requests();
        let a = get(&world, path, &[]);
        let b = get(&world, path, &[]);
        assert_eq!((a.status, b.status), (200, 200), "{path}");
        assert_eq!(cache_header(&a), "miss", "{path}");
        assert_eq!(cache_header(&b), "miss", "{path}: not stored");
        assert_eq!(world.origin_requests(), before + 2, "{path}");
    }
    let auth = [("authorization", "Bearer user-1")];
    let a = get(&world, "/auth?cc=max-age%3D60", &auth);
    assert_eq!(cache_header(&a), "bypass");
    let b = get(&world, "/auth?cc=max-age%3D60", &[]);
    assert_eq!(
        cache_header(&b),
        "miss",
        "the authorized response was not stored"
    );
    assert_eq!(lookups(&world, "hit"), 0.0);
    assert!(lookups_reach(&world, "bypass", 1.0) >= 1.0);
}

#[test]
fn s_maxage_wins_over_max_age_and_default_ttl_applies_only_when_the_route_says() {
    let (world, _dir) = start(|config| {
        let route = config
            .routes
            .iter_mut()
            .find(|r| r.name == "static")
            .expect("static");
        route.cache.default_ttl = Some(HumanDuration::secs(60));
    });
    let path = "/shared?cc=max-age%3D0%2C%20s-maxage%3D60";
    assert_eq!(cache_header(&get(&world, path, &[])), "miss");
    assert_eq!(cache_header(&get(&world, path, &[])), "hit");
    // No freshness information at all: the route's default_ttl makes it storable.
    assert_eq!(cache_header(&get(&world, "/plain", &[])), "miss");
    assert_eq!(cache_header(&get(&world, "/plain", &[])), "hit");
    assert_eq!(world.origin_requests(), 2);
}

#[test]
fn max_age_expires_and_the_next_request_refetches_as_expired() {
    let (world, _dir) = start(|_| {});
    // A validator keeps the stale entry for revalidation; the origin ignores If-Modified-Since
    // and sends a full response, so the entry is replaced: `expired`. (Without a validator an
    // expired entry is simply dropped and the refetch is a plain miss.)
    let path = "/short?cc=max-age%3D1&lm=Mon%2C%2001%20Jan%202024%2000%3A00%3A00%20GMT";
    assert_eq!(cache_header(&get(&world, path, &[])), "miss");
    let expired = until_cache_says(&world, path, "expired");
    assert_eq!(cache_header(&expired), "expired");
    assert_eq!(expired.status, 200);
    assert_eq!(
        world.origin_requests(),
        2,
        "hits in between never reached it"
    );
    assert!(lookups_reach(&world, "expired", 1.0) >= 1.0);
}

#[test]
fn no_cache_revalidates_with_the_etag_and_a_304_refreshes_the_entry() {
    let (world, _dir) = start(|_| {});
    let path = "/rv?cc=no-cache&etag=v1";
    let first = get(&world, path, &[]);
    assert_eq!((first.status, cache_header(&first)), (200, "miss"));
    assert_eq!(first.header("etag"), Some("\"v1\""));
    let second = get(&world, path, &[]);
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(cache_header(&second), "revalidated");
    assert_eq!(
        second.body, first.body,
        "the stored body, not the origin's 304"
    );
    assert_eq!(world.origin_requests(), 2, "one conditional request");
    assert_eq!(
        world.metric_eventually(
            "meridian_cache_lookups_total{result=\"revalidated\",route=\"static\"}",
            1.0
        ),
        Some(1.0)
    );
    // The client's own conditional is answered from the refreshed entry.
    let third = get(&world, path, &[("if-none-match", "\"v1\"")]);
    assert_eq!(third.status, 304);
    assert!(third.body.is_empty());
}

#[test]
fn a_client_if_none_match_is_answered_304_from_the_cache() {
    let (world, _dir) = start(|_| {});
    let path = "/inm?cc=max-age%3D60&etag=abc";
    assert_eq!(get(&world, path, &[]).status, 200);
    let not_modified = get(&world, path, &[("if-none-match", "\"abc\"")]);
    assert_eq!(not_modified.status, 304);
    assert_eq!(cache_header(&not_modified), "hit");
    assert_eq!(not_modified.header("etag"), Some("\"abc\""));
    let other = get(&world, path, &[("if-none-match", "\"zzz\"")]);
    assert_eq!((other.status, cache_header(&other)), (200, "hit"));
    assert_eq!(world.origin_requests(), 1);
}

#[test]
fn vary_on_accept_encoding_stores_one_variant_per_encoding() {
    let (world, _dir) = start(|_| {});
    let path = "/v?cc=max-age%3D60&vary=accept-encoding";
    let gzip = [("accept-encoding", "gzip")];
    let br = [("accept-encoding", "br")];
    assert_eq!(cache_header(&get(&world, path, &gzip)), "miss");
    assert_eq!(cache_header(&get(&world, path, &br)), "miss");
    let g = get(&world, path, &gzip);
    let b = get(&world, path, &br);
    assert_eq!((cache_header(&g), cache_header(&b)), ("hit", "hit"));
    assert_eq!(g.json()["accept_encoding"], "gzip");
    assert_eq!(b.json()["accept_encoding"], "br");
    assert_eq!(world.origin_requests(), 2);
}

#[test]
fn a_hundred_concurrent_misses_make_exactly_one_origin_request() {
    let (world, _dir) = start(|_| {});
    for origin in world.origins_of("us-east") {
        origin.set_delay(Duration::from_millis(300));
    }
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let client = world.client.clone();
        tasks.push(world.runtime.spawn(async move {
            client
                .request(
                    Protocol::Http1,
                    source_for("US"),
                    "GET",
                    HOST,
                    "/burst?cc=max-age%3D60",
                    &[],
                    Vec::new(),
                )
                .await
        }));
    }
    let mut bodies = std::collections::BTreeSet::new();
    for task in tasks {
        let reply = world
            .runtime
            .block_on(task)
            .expect("task")
            .expect("request");
        assert_eq!(reply.status, 200, "{}", reply.text());
        bodies.insert(reply.body.clone());
    }
    assert_eq!(world.origin_requests(), 1, "the origin counts one request");
    assert_eq!(bodies.len(), 1, "everyone got the one response");
    let coalesced = metric_value(&world.metrics(), "meridian_cache_coalesced_total");
    assert!(coalesced.unwrap_or(0.0) >= 1.0, "{coalesced:?}");
    assert_eq!(
        world.metric_eventually(
            "meridian_cache_lookups_total{result=\"hit\",route=\"static\"}",
            99.0
        ),
        Some(99.0)
    );
}

#[test]
fn an_unkeyed_header_cannot_poison_what_other_clients_receive() {
    let (world, _dir) = start(|_| {});
    // The origin reflects X-Forwarded-Host and says so with Vary: the attacker gets its own variant.
    let path = "/p?cc=max-age%3D60&vary=x-forwarded-host";
    let evil = get(&world, path, &[("x-forwarded-host", "evil.test")]);
    // The edge drops an untrusted client's X-Forwarded-Host before the origin sees it.
    assert_eq!(evil.json()["x_forwarded_host"], serde_json::Value::Null);
    let victim = get(&world, path, &[]);
    assert_eq!(cache_header(&victim), "miss", "not the attacker's variant");
    assert_eq!(victim.json()["x_forwarded_host"], serde_json::Value::Null);
    let again = get(&world, path, &[]);
    assert_eq!(cache_header(&again), "hit");
    assert_eq!(again.json()["x_forwarded_host"], serde_json::Value::Null);
    // Without Vary, an unkeyed header never reaches the stored response's key: a client sending
    // it is served the shared entry, and the entry is not replaced by its request.
    let plain = "/q?cc=max-age%3D60";
    let first = get(&world, plain, &[]);
    let attack = get(&world, plain, &[("x-forwarded-host", "evil.test")]);
    assert_eq!(cache_header(&attack), "hit");
    assert_eq!(attack.body, first.body);
    assert_eq!(get(&world, plain, &[]).body, first.body);
}

#[test]
fn objects_over_max_object_bytes_stream_whole_and_are_not_stored() {
    let (world, _dir) = start(|config| config.edge.cache.max_object_bytes = 64 * 1024);
    let big = "/big?cc=max-age%3D60&bytes=300000";
    for _ in 0..2 {
        let reply = get(&world, big, &[]);
        assert_eq!(reply.status, 200);
        assert_eq!(cache_header(&reply), "miss");
        assert_eq!(reply.body.len(), 300_000);
        assert!(reply.body == pattern_body(300_000), "body arrives intact");
    }
    assert_eq!(world.origin_requests(), 2, "never stored");
    let small = "/small?cc=max-age%3D60&bytes=60000";
    assert_eq!(cache_header(&get(&world, small, &[])), "miss");
    let hit = get(&world, small, &[]);
    assert_eq!(cache_header(&hit), "hit");
    assert!(hit.body == pattern_body(60_000));
    assert_eq!(world.origin_requests(), 3);
}

#[test]
fn stale_if_error_serves_the_stale_entry_when_every_region_fails() {
    let (world, _dir) = start(|_| {});
    let path = "/sie?cc=max-age%3D1%2C%20stale-if-error%3D600";
    let first = get(&world, path, &[]);
    assert_eq!(cache_header(&first), "miss");
    // Every region of the route refuses connections.
    for region in ["us-east", "eu-central-1", "ap-southeast-1"] {
        world.set_region_up(region, false);
    }
    let stale = until_cache_says(&world, path, "stale");
    assert_eq!(cache_header(&stale), "stale", "{}", stale.text());
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body, first.body);
    // A path never cached still fails.
    let never = get(&world, "/never?cc=max-age%3D60", &[]);
    assert!(never.status >= 500, "{}", never.status);
    // Regions up but answering 503: the stale entry still wins over the error.
    for region in ["us-east", "eu-central-1", "ap-southeast-1"] {
        world.set_region_up(region, true);
        for origin in world.origins_of(region) {
            origin.set_status(Some(503));
        }
    }
    let again = get(&world, path, &[]);
    assert_eq!((again.status, cache_header(&again)), (200, "stale"));
    assert_eq!(again.body, first.body);
    assert!(lookups_reach(&world, "stale", 2.0) >= 2.0);
}

#[test]
fn stale_while_revalidate_serves_stale_and_refreshes_exactly_once_in_the_background() {
    let (world, _dir) = start(|_| {});
    let path = "/swr?cc=max-age%3D2%2C%20stale-while-revalidate%3D600";
    let first = get(&world, path, &[]);
    assert_eq!(cache_header(&first), "miss");
    let stale = until_cache_says(&world, path, "stale");
    assert_eq!((stale.status, cache_header(&stale)), (200, "stale"));
    for _ in 0..5 {
        let reply = get(&world, path, &[]);
        assert!(
            matches!(cache_header(&reply), "stale" | "hit"),
            "{:?}",
            reply.headers
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while world.origin_requests() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(world.origin_requests(), 2, "one background refresh");
    let fresh = until_cache_says(&world, path, "hit");
    assert_eq!(cache_header(&fresh), "hit");
    // The refresh may go to either us-east upstream (each counts its own requests).
    assert_ne!(fresh.body, first.body, "the refreshed entry is served");
}

#[test]
fn purge_by_url_prefix_and_tag_through_the_admin_api() {
    let (world, _dir) = start(|_| {});
    let paths = [
        "/img/a?cc=max-age%3D60&tag=product-1",
        "/img/b?cc=max-age%3D60",
        "/css/c?cc=max-age%3D60&tag=product-1%2Cbrand",
        "/js/d?cc=max-age%3D60",
    ];
    for path in paths {
        assert_eq!(cache_header(&get(&world, path, &[])), "miss");
        assert_eq!(cache_header(&get(&world, path, &[])), "hit");
    }
    // Refusals first.
    assert_eq!(purge(&world, r#"{"tag":"brand"}"#, None).status, 401);
    let wrong = purge(&world, r#"{"tag":"brand"}"#, Some("nope"));
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.header("www-authenticate"), Some("Bearer"));
    assert_eq!(purge(&world, "{not json", Some(TOKEN)).status, 400);
    assert_eq!(
        purge(&world, r#"{"everything":1}"#, Some(TOKEN)).status,
        400
    );

    let by_url = purge(
        &world,
        &format!(r#"{{"url":"http://{HOST}/js/d?cc=max-age%3D60"}}"#),
        Some(TOKEN),
    );
    assert_eq!(by_url.status, 200, "{}", by_url.text());
    assert_eq!(by_url.json()["purged"], 1);
    assert_eq!(cache_header(&get(&world, paths[3], &[])), "miss");

    let by_tag = purge(&world, r#"{"tag":"product-1"}"#, Some(TOKEN));
    assert_eq!(by_tag.json()["purged"], 2);
    assert_eq!(cache_header(&get(&world, paths[0], &[])), "miss");
    assert_eq!(cache_header(&get(&world, paths[2], &[])), "miss");
    assert_eq!(cache_header(&get(&world, paths[1], &[])), "hit");

    let by_prefix = purge(
        &world,
        &format!(r#"{{"prefix":"http://{HOST}/img/"}}"#),
        Some(TOKEN),
    );
    assert_eq!(by_prefix.json()["purged"], 2);
    assert_eq!(cache_header(&get(&world, paths[1], &[])), "miss");
    for kind in ["url", "prefix", "tag"] {
        assert_eq!(
            metric_value(
                &world.metrics(),
                &format!("meridian_cache_purges_total{{kind=\"{kind}\"}}")
            ),
            Some(1.0),
            "{kind}"
        );
    }
}

#[test]
fn purge_is_forbidden_without_a_configured_token() {
    let (world, _dir) = start(|config| config.edge.admin.token_file = None);
    let reply = purge(&world, r#"{"tag":"x"}"#, Some(TOKEN));
    assert_eq!(reply.status, 403);
    assert!(reply.text().contains("token_file"), "{}", reply.text());
}
