//! Facade, store and coalescing tests: real moka, real tokio concurrency, no sleeps, no timing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use meridian_config::{EdgeCache, HumanDuration, RouteCache};
use prometheus::Registry;

use super::*;

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

fn cache_with(
    max_bytes: u64,
    max_object_bytes: u64,
    timeout: Duration,
) -> (ResponseCache, Registry) {
    let registry = Registry::new();
    let config = EdgeCache {
        enabled: true,
        max_bytes,
        max_object_bytes,
        coalesce_timeout: HumanDuration(timeout),
        ..EdgeCache::default()
    };
    (
        ResponseCache::new(&config, &registry).expect("metrics"),
        registry,
    )
}

fn cache() -> (ResponseCache, Registry) {
    cache_with(1 << 20, 1 << 16, Duration::from_secs(60))
}

fn route() -> RouteCache {
    RouteCache {
        enabled: true,
        ..RouteCache::default()
    }
}

fn req<'a>(pq: &'a str, h: &'a HeaderMap) -> CacheRequest<'a> {
    CacheRequest {
        method: &Method::GET,
        scheme: "http",
        host: "api.test",
        path_and_query: pq,
        headers: h,
    }
}

fn counter(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| (m.get_counter().get_value() + m.get_gauge().get_value()) as u64)
        .sum()
}

/// Fetches as a front would: lookup, and on Fetch admit `response` with `body`.
async fn fetch(
    cache: &ResponseCache,
    policy: &RoutePolicy,
    pq: &str,
    req_headers: &HeaderMap,
    resp: &[(&str, &str)],
    body: &[&str],
    now: SystemTime,
) -> CacheStatus {
    match cache.lookup(&req(pq, req_headers), policy, now).await {
        Lookup::Hit(s) => s.status,
        Lookup::Stale { served, .. } => served.status,
        Lookup::Bypass(_) => CacheStatus::Bypass,
        Lookup::Fetch(ticket) => {
            let status = ticket.status();
            match cache.admit(ticket, 200, &headers(resp), now).await {
                Admission::Store(mut w) => {
                    for chunk in body {
                        w.push(&Bytes::copy_from_slice(chunk.as_bytes()));
                    }
                    w.finish().await;
                    status
                }
                Admission::Revalidated(s) => s.status,
                Admission::Pass(_) => status,
            }
        }
    }
}

#[tokio::test]
async fn miss_then_hit_with_age_and_shared_body() {
    let (cache, registry) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let cc = [
        ("cache-control", "max-age=60"),
        ("content-type", "text/plain"),
    ];
    assert_eq!(
        fetch(&cache, &policy, "/a", &h, &cc, &["he", "llo"], t(0)).await,
        CacheStatus::Miss
    );
    let Lookup::Hit(served) = cache.lookup(&req("/a", &h), &policy, t(7)).await else {
        panic!("expected a hit");
    };
    assert_eq!(served.status_code(), 200);
    assert_eq!(served.age, Duration::from_secs(7));
    let out = served.headers();
    assert_eq!(out.get("age").and_then(|v| v.to_str().ok()), Some("7"));
    assert_eq!(
        out.get(HEADER_CACHE).and_then(|v| v.to_str().ok()),
        Some("hit")
    );
    assert_eq!(
        served.body(),
        &[Bytes::from_static(b"he"), Bytes::from_static(b"llo")]
    );
    // No copy per hit: the stored chunk and the served chunk share memory.
    let Lookup::Hit(again) = cache.lookup(&req("/a", &h), &policy, t(8)).await else {
        panic!("expected a hit");
    };
    assert_eq!(again.body()[0].as_ptr(), served.body()[0].as_ptr());
    // Query order does not matter.
    assert_eq!(
        fetch(&cache, &policy, "/a?", &h, &cc, &[], t(9)).await,
        CacheStatus::Hit
    );
    // After max-age: no validators, no stale window → fetch again as expired.
    assert_eq!(
        fetch(&cache, &policy, "/a", &h, &cc, &["x"], t(61)).await,
        CacheStatus::Expired
    );
    assert_eq!(
        counter(
            &registry,
            "meridian_cache_lookups_total",
            &[("route", "api"), ("result", "hit")]
        ),
        3
    );
    assert_eq!(
        counter(
            &registry,
            "meridian_cache_lookups_total",
            &[("route", "api"), ("result", "miss")]
        ),
        1
    );
    assert_eq!(
        counter(
            &registry,
            "meridian_cache_lookups_total",
            &[("route", "api"), ("result", "expired")]
        ),
        1
    );
    cache.sync().await;
    assert_eq!(counter(&registry, "meridian_cache_entries", &[]), 1);
    assert!(counter(&registry, "meridian_cache_bytes", &[]) > 0);
}

#[tokio::test]
async fn bypass_cases_are_counted() {
    let (cache, registry) = cache();
    let policy = cache.route_policy("api", &route());
    let off = cache.route_policy("off", &RouteCache::default());
    let h = HeaderMap::new();
    assert!(matches!(
        cache.lookup(&req("/", &h), &off, t(0)).await,
        Lookup::Bypass(Bypass::Disabled)
    ));
    let post = CacheRequest {
        method: &Method::POST,
        ..req("/", &h)
    };
    // Unsafe methods and authorized requests reach the origin (counted as bypass when dropped).
    assert!(matches!(
        cache.lookup(&post, &policy, t(0)).await,
        Lookup::Fetch(_)
    ));
    let auth = headers(&[("authorization", "Bearer x")]);
    assert!(matches!(
        cache.lookup(&req("/", &auth), &policy, t(0)).await,
        Lookup::Fetch(_)
    ));
    let options = CacheRequest {
        method: &Method::OPTIONS,
        ..req("/", &h)
    };
    assert!(matches!(
        cache.lookup(&options, &policy, t(0)).await,
        Lookup::Bypass(Bypass::Method)
    ));
    let cookie = headers(&[("cookie", "sid=1")]);
    assert!(matches!(
        cache.lookup(&req("/", &cookie), &policy, t(0)).await,
        Lookup::Bypass(Bypass::Cookie)
    ));
    assert_eq!(
        counter(
            &registry,
            "meridian_cache_lookups_total",
            &[("result", "bypass")]
        ),
        5
    );
}

#[tokio::test]
async fn uncacheable_responses_are_not_stored() {
    let (cache, _r) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    for resp in [
        &[("cache-control", "no-store")][..],
        &[("cache-control", "private, max-age=60")],
        &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
        &[("cache-control", "max-age=60"), ("vary", "*")],
        &[],
    ] {
        assert_eq!(
            fetch(&cache, &policy, "/u", &h, resp, &["x"], t(0)).await,
            CacheStatus::Miss
        );
        assert_eq!(
            fetch(&cache, &policy, "/u", &h, resp, &["x"], t(1)).await,
            CacheStatus::Miss,
            "{resp:?}"
        );
    }
}

#[tokio::test]
async fn vary_selects_variants_and_unkeyed_headers_do_not() {
    let (cache, _r) = cache();
    let policy = cache.route_policy("api", &route());
    let resp = [("cache-control", "max-age=60"), ("vary", "Accept-Encoding")];
    let gzip = headers(&[("accept-encoding", "gzip")]);
    let br = headers(&[("accept-encoding", "br")]);
    assert_eq!(
        fetch(&cache, &policy, "/v", &gzip, &resp, &["gz"], t(0)).await,
        CacheStatus::Miss
    );
    assert_eq!(
        fetch(&cache, &policy, "/v", &br, &resp, &["br"], t(0)).await,
        CacheStatus::Miss
    );
    let Lookup::Hit(g) = cache.lookup(&req("/v", &gzip), &policy, t(1)).await else {
        panic!("gzip hit")
    };
    assert_eq!(g.body(), &[Bytes::from_static(b"gz")]);
    let Lookup::Hit(b) = cache.lookup(&req("/v", &br), &policy, t(1)).await else {
        panic!("br hit")
    };
    assert_eq!(b.body(), &[Bytes::from_static(b"br")]);
    // Poisoning attempt: an unkeyed header cannot select or create another variant.
    let evil = headers(&[
        ("accept-encoding", "gzip"),
        ("x-forwarded-host", "evil.test"),
    ]);
    let Lookup::Hit(e) = cache.lookup(&req("/v", &evil), &policy, t(1)).await else {
        panic!("hit")
    };
    assert_eq!(e.body(), &[Bytes::from_static(b"gz")]);
}

#[tokio::test]
async fn client_conditional_gets_304_from_cache() {
    let (cache, _r) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let resp = [("cache-control", "max-age=60"), ("etag", "\"v1\"")];
    fetch(&cache, &policy, "/c", &h, &resp, &["body"], t(0)).await;
    let inm = headers(&[("if-none-match", "\"v1\"")]);
    let Lookup::Hit(s) = cache.lookup(&req("/c", &inm), &policy, t(1)).await else {
        panic!("hit")
    };
    assert_eq!(s.status_code(), 304);
    assert!(s.body().is_empty());
    assert_eq!(
        s.headers().get("etag").and_then(|v| v.to_str().ok()),
        Some("\"v1\"")
    );
}

#[tokio::test]
async fn origin_304_refreshes_the_entry() {
    let (cache, registry) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let resp = [("cache-control", "max-age=10"), ("etag", "\"v1\"")];
    fetch(&cache, &policy, "/r", &h, &resp, &["body"], t(0)).await;
    let Lookup::Fetch(ticket) = cache.lookup(&req("/r", &h), &policy, t(20)).await else {
        panic!("expected revalidation");
    };
    assert_eq!(ticket.status(), CacheStatus::Expired);
    let cond = ticket.conditional_headers();
    assert_eq!(
        cond,
        vec![(
            http::header::IF_NONE_MATCH,
            HeaderValue::from_static("\"v1\"")
        )]
    );
    let nm = headers(&[("cache-control", "max-age=100"), ("etag", "\"v1\"")]);
    let Admission::Revalidated(served) = cache.admit(ticket, 304, &nm, t(20)).await else {
        panic!("expected revalidated");
    };
    assert_eq!(served.status_code(), 200);
    assert_eq!(served.body(), &[Bytes::from_static(b"body")]);
    assert_eq!(
        served
            .headers()
            .get(HEADER_CACHE)
            .and_then(|v| v.to_str().ok()),
        Some("revalidated")
    );
    // Fresh again for 100s from the 304.
    assert_eq!(
        fetch(&cache, &policy, "/r", &h, &resp, &[], t(119)).await,
        CacheStatus::Hit
    );
    assert_eq!(
        counter(
            &registry,
            "meridian_cache_lookups_total",
            &[("result", "revalidated")]
        ),
        1
    );
}

#[tokio::test]
async fn stale_while_revalidate_refreshes_once() {
    let (cache, _r) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let resp = [("cache-control", "max-age=10, stale-while-revalidate=30")];
    fetch(&cache, &policy, "/s", &h, &resp, &["old"], t(0)).await;
    let Lookup::Stale {
        served,
        refresh: Some(ticket),
    } = cache.lookup(&req("/s", &h), &policy, t(15)).await
    else {
        panic!("first stale lookup leads the refresh");
    };
    assert_eq!(served.body(), &[Bytes::from_static(b"old")]);
    // While the refresh is in flight, other requests get stale without a second refresh.
    let Lookup::Stale { refresh: None, .. } = cache.lookup(&req("/s", &h), &policy, t(16)).await
    else {
        panic!("second stale lookup must not refresh");
    };
    let Admission::Store(mut w) = cache.admit(ticket, 200, &headers(&resp), t(16)).await else {
        panic!("store");
    };
    w.push(&Bytes::from_static(b"new"));
    w.finish().await;
    let Lookup::Hit(hit) = cache.lookup(&req("/s", &h), &policy, t(17)).await else {
        panic!("hit")
    };
    assert_eq!(hit.body(), &[Bytes::from_static(b"new")]);
}

#[tokio::test]
async fn stale_if_error_serves_within_window_only() {
    let (cache, _r) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    fetch(
        &cache,
        &policy,
        "/e",
        &h,
        &[
            ("cache-control", "max-age=10, stale-if-error=30"),
            ("etag", "\"1\""),
        ],
        &["ok"],
        t(0),
    )
    .await;
    let Lookup::Fetch(ticket) = cache.lookup(&req("/e", &h), &policy, t(20)).await else {
        panic!("fetch")
    };
    let served = ticket.stale_on_error(t(20)).expect("within stale-if-error");
    assert_eq!(served.status, CacheStatus::Stale);
    assert_eq!(served.body(), &[Bytes::from_static(b"ok")]);
    let Lookup::Fetch(ticket) = cache.lookup(&req("/e", &h), &policy, t(45)).await else {
        panic!("fetch")
    };
    assert!(ticket.stale_on_error(t(45)).is_none());
}

#[tokio::test]
async fn objects_over_max_object_bytes_stream_through() {
    let (cache, _r) = cache_with(1 << 20, 8, Duration::from_secs(60));
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let resp = [("cache-control", "max-age=60")];
    let Lookup::Fetch(ticket) = cache.lookup(&req("/big", &h), &policy, t(0)).await else {
        panic!("fetch")
    };
    let Admission::Store(mut w) = cache.admit(ticket, 200, &headers(&resp), t(0)).await else {
        panic!("store")
    };
    w.push(&Bytes::from_static(b"12345"));
    w.push(&Bytes::from_static(b"67890"));
    assert!(w.is_abandoned());
    assert!(w.finish().await.is_none());
    assert_eq!(
        fetch(&cache, &policy, "/big", &h, &resp, &[], t(1)).await,
        CacheStatus::Miss
    );
    // A declared Content-Length over the limit is refused at the head.
    let Lookup::Fetch(ticket) = cache.lookup(&req("/big2", &h), &policy, t(0)).await else {
        panic!("fetch")
    };
    let declared = headers(&[("cache-control", "max-age=60"), ("content-length", "9")]);
    assert!(matches!(
        cache.admit(ticket, 200, &declared, t(0)).await,
        Admission::Pass(NotStorable::TooLarge)
    ));
}

#[tokio::test]
async fn weights_bound_the_store() {
    let (cache, registry) = cache_with(20_000, 4_000, Duration::from_secs(60));
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let body = "x".repeat(3_000);
    for i in 0..40 {
        fetch(
            &cache,
            &policy,
            &format!("/w{i}"),
            &h,
            &[("cache-control", "max-age=60")],
            &[&body],
            t(0),
        )
        .await;
    }
    cache.sync().await;
    assert!(cache.weighted_size() <= 20_000, "{}", cache.weighted_size());
    assert!(counter(&registry, "meridian_cache_evictions_total", &[]) > 0);
    let bytes = counter(&registry, "meridian_cache_bytes", &[]);
    assert!(bytes <= 20_000, "{bytes}");
    assert_eq!(bytes, cache.weighted_size());
}

#[tokio::test]
async fn purge_by_url_prefix_and_tag() {
    let (cache, registry) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let tagged = |tag: &'static str| [("cache-control", "max-age=60"), ("cache-tag", tag)];
    fetch(
        &cache,
        &policy,
        "/p/one?b=1&a=2",
        &h,
        &tagged("red, blue"),
        &["1"],
        t(0),
    )
    .await;
    fetch(&cache, &policy, "/p/two", &h, &tagged("blue"), &["2"], t(0)).await;
    fetch(
        &cache,
        &policy,
        "/q/three",
        &h,
        &[
            ("cache-control", "max-age=60"),
            ("surrogate-key", "green red"),
        ],
        &["3"],
        t(0),
    )
    .await;
    fetch(
        &cache,
        &policy,
        "/q/four",
        &h,
        &[("cache-control", "max-age=60")],
        &["4"],
        t(0),
    )
    .await;
    let hit = |pq: &'static str| {
        let cache = cache.clone();
        let policy = &policy;
        let h = &h;
        async move {
            matches!(
                cache.lookup(&req(pq, h), policy, t(1)).await,
                Lookup::Hit(_)
            )
        }
    };
    assert!(hit("/p/one?a=2&b=1").await);
    assert_eq!(cache.purge_url("HTTP://API.test:80/p/one?a=2&b=1").await, 1);
    assert!(!hit("/p/one?a=2&b=1").await);
    assert_eq!(cache.purge_tag("blue").await, 1);
    assert!(!hit("/p/two").await);
    assert_eq!(cache.purge(&Purge::Tag("red".into())).await, 1);
    assert!(!hit("/q/three").await);
    assert!(hit("/q/four").await);
    assert_eq!(cache.purge_prefix("http://api.test/q/").await, 1);
    assert!(!hit("/q/four").await);
    assert_eq!(cache.purge_tag("nothing").await, 0);
    assert_eq!(
        counter(&registry, "meridian_cache_purges_total", &[("kind", "tag")]),
        3
    );
    cache.sync().await;
    assert_eq!(counter(&registry, "meridian_cache_entries", &[]), 0);
    assert_eq!(counter(&registry, "meridian_cache_bytes", &[]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_coalesce_into_one_fetch() {
    let (cache, registry) = cache();
    let policy = Arc::new(cache.route_policy("api", &route()));
    let h = HeaderMap::new();
    // The leader: holds its ticket until every follower is waiting.
    let Lookup::Fetch(leader) = cache.lookup(&req("/co", &h), &policy, t(0)).await else {
        panic!("leader")
    };
    assert_eq!(cache.in_flight(), 1);
    let followers: Vec<_> = (0..50)
        .map(|_| {
            let (cache, policy) = (cache.clone(), Arc::clone(&policy));
            tokio::spawn(async move {
                let h = HeaderMap::new();
                match cache.lookup(&req("/co", &h), &policy, t(0)).await {
                    Lookup::Hit(s) => Some(s.body().to_vec()),
                    _ => None,
                }
            })
        })
        .collect();
    // Let the followers reach their wait (they either wait or, if late, find the stored entry).
    tokio::task::yield_now().await;
    let Admission::Store(mut w) = cache
        .admit(
            leader,
            200,
            &headers(&[("cache-control", "max-age=60")]),
            t(0),
        )
        .await
    else {
        panic!("store")
    };
    w.push(&Bytes::from_static(b"one"));
    w.finish().await;
    for f in followers {
        assert_eq!(
            f.await.expect("join"),
            Some(vec![Bytes::from_static(b"one")])
        );
    }
    assert_eq!(cache.in_flight(), 0);
    assert_eq!(
        counter(
            &registry,
            "meridian_cache_lookups_total",
            &[("result", "miss")]
        ),
        1
    );
    assert_eq!(
        counter(
            &registry,
            "meridian_cache_lookups_total",
            &[("result", "hit")]
        ),
        50
    );
}

#[tokio::test]
async fn followers_fetch_themselves_when_the_leader_cannot_store() {
    let (cache, _r) = cache();
    let policy = Arc::new(cache.route_policy("api", &route()));
    let h = HeaderMap::new();
    let Lookup::Fetch(leader) = cache.lookup(&req("/nf", &h), &policy, t(0)).await else {
        panic!("leader")
    };
    let follower = {
        let (cache, policy) = (cache.clone(), Arc::clone(&policy));
        tokio::spawn(async move {
            let h = HeaderMap::new();
            matches!(
                cache.lookup(&req("/nf", &h), &policy, t(0)).await,
                Lookup::Fetch(_)
            )
        })
    };
    tokio::task::yield_now().await;
    // Not storable: followers are released to fetch on their own.
    assert!(matches!(
        cache
            .admit(
                leader,
                200,
                &headers(&[("cache-control", "no-store")]),
                t(0)
            )
            .await,
        Admission::Pass(NotStorable::NoStore)
    ));
    assert!(follower.await.expect("join"));
    // Leader dropped without a response (upstream error): same.
    let Lookup::Fetch(leader) = cache.lookup(&req("/nf2", &h), &policy, t(0)).await else {
        panic!("leader")
    };
    let follower = {
        let (cache, policy) = (cache.clone(), Arc::clone(&policy));
        tokio::spawn(async move {
            let h = HeaderMap::new();
            matches!(
                cache.lookup(&req("/nf2", &h), &policy, t(0)).await,
                Lookup::Fetch(_)
            )
        })
    };
    tokio::task::yield_now().await;
    drop(leader);
    assert!(follower.await.expect("join"));
    assert_eq!(cache.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn follower_times_out_and_fetches_itself() {
    let (cache, _r) = cache_with(1 << 20, 1 << 16, Duration::from_millis(50));
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let Lookup::Fetch(_leader) = cache.lookup(&req("/slow", &h), &policy, t(0)).await else {
        panic!("leader")
    };
    // Paused clock: the timeout elapses by auto-advance, no real waiting.
    let Lookup::Fetch(own) = cache.lookup(&req("/slow", &h), &policy, t(0)).await else {
        panic!("follower must fall back to its own fetch");
    };
    assert!(!own.fetches_for_others());
}

#[test]
fn purge_json_and_bearer() {
    assert_eq!(
        Purge::from_json(br#"{"url":"https://a/b"}"#),
        Ok(Purge::Url("https://a/b".into()))
    );
    assert_eq!(
        Purge::from_json(br#"{"prefix":"https://a/"}"#),
        Ok(Purge::Prefix("https://a/".into()))
    );
    assert_eq!(
        Purge::from_json(br#"{"tag":"t"}"#),
        Ok(Purge::Tag("t".into()))
    );
    assert!(Purge::from_json(br#"{"tag":"t","url":"u"}"#).is_err());
    assert!(Purge::from_json(br#"{"host":"x"}"#).is_err());
    let good = HeaderValue::from_static("Bearer s3cret");
    assert!(bearer_matches(Some(&good), "s3cret\n"));
    assert!(!bearer_matches(Some(&good), "s3cre"));
    assert!(!bearer_matches(
        Some(&HeaderValue::from_static("s3cret")),
        "s3cret"
    ));
    assert!(!bearer_matches(None, "s3cret"));
    assert!(!bearer_matches(
        Some(&HeaderValue::from_static("Bearer ")),
        ""
    ));
}

/// RFC 9111 §4.3.4 with shared-cache safety: a 304's `Set-Cookie` reaches the client whose
/// request revalidated, and nobody after it; a 304 that makes the response unstorable removes it.
#[tokio::test]
async fn revalidation_never_stores_set_cookie_and_drops_unstorable_entries() {
    let (cache, _r) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let resp = [("cache-control", "max-age=10"), ("etag", "\"v1\"")];
    fetch(&cache, &policy, "/sc", &h, &resp, &["body"], t(0)).await;
    let Lookup::Fetch(ticket) = cache.lookup(&req("/sc", &h), &policy, t(20)).await else {
        panic!("expected revalidation");
    };
    let nm = headers(&[
        ("cache-control", "max-age=100"),
        ("set-cookie", "sid=attacker"),
    ]);
    let Admission::Revalidated(served) = cache.admit(ticket, 304, &nm, t(20)).await else {
        panic!("expected revalidated");
    };
    assert_eq!(
        served
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok()),
        Some("sid=attacker"),
        "the revalidating client gets its cookie"
    );
    let Lookup::Hit(next) = cache.lookup(&req("/sc", &h), &policy, t(21)).await else {
        panic!("expected a hit");
    };
    assert!(!next.headers().contains_key("set-cookie"));
    assert!(!next.entry.headers.contains_key("set-cookie"));

    // Now the origin's 304 says no-store: the entry goes.
    let Lookup::Fetch(ticket) = cache.lookup(&req("/sc", &h), &policy, t(200)).await else {
        panic!("expected revalidation");
    };
    let nm = headers(&[("cache-control", "no-store")]);
    let Admission::Revalidated(served) = cache.admit(ticket, 304, &nm, t(200)).await else {
        panic!("expected revalidated");
    };
    assert_eq!(served.body(), &[Bytes::from_static(b"body")]);
    let Lookup::Fetch(ticket) = cache.lookup(&req("/sc", &h), &policy, t(201)).await else {
        panic!("expected a miss");
    };
    assert_eq!(
        ticket.status(),
        CacheStatus::Miss,
        "nothing stored any more"
    );
}

/// RFC 9111 §4.4: a non-error answer to an unsafe method invalidates the URL and same-origin
/// Location / Content-Location; an error answer does not. Counted by reason.
#[tokio::test]
async fn unsafe_methods_invalidate() {
    let (cache, registry) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let resp = [("cache-control", "max-age=60")];
    for path in ["/item", "/list", "/other"] {
        fetch(&cache, &policy, path, &h, &resp, &["x"], t(0)).await;
    }
    let post = |m: &'static Method| CacheRequest {
        method: m,
        ..req("/item", &h)
    };
    let unsafe_fetch = |method: &'static Method, status: u16, resp: HeaderMap| {
        let cache = cache.clone();
        let policy = &policy;
        async move {
            let Lookup::Fetch(ticket) = cache.lookup(&post(method), policy, t(1)).await else {
                panic!("unsafe methods fetch");
            };
            let admission = cache.admit(ticket, status, &resp, t(1)).await;
            assert_eq!(admission.status(), CacheStatus::Bypass);
        }
    };
    unsafe_fetch(&Method::DELETE, 500, HeaderMap::new()).await;
    assert_eq!(
        fetch(&cache, &policy, "/item", &h, &resp, &[], t(2)).await,
        CacheStatus::Hit
    );
    unsafe_fetch(
        &Method::PUT,
        204,
        headers(&[
            ("location", "/list"),
            ("content-location", "http://elsewhere.test/other"),
        ]),
    )
    .await;
    assert_eq!(
        fetch(&cache, &policy, "/item", &h, &resp, &[], t(3)).await,
        CacheStatus::Miss
    );
    assert_eq!(
        fetch(&cache, &policy, "/list", &h, &resp, &[], t(3)).await,
        CacheStatus::Miss
    );
    assert_eq!(
        fetch(&cache, &policy, "/other", &h, &resp, &[], t(3)).await,
        CacheStatus::Hit
    );
    let invalidated = |reason| {
        counter(
            &registry,
            "meridian_cache_invalidations_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(invalidated("unsafe_method"), 1);
    assert_eq!(invalidated("location"), 1);
    assert_eq!(invalidated("content_location"), 0);
}

/// RFC 9110 §9.3.3: a POST answer that names its own URL in Content-Location and states its
/// freshness serves later GETs.
#[tokio::test]
async fn post_with_own_content_location_is_stored() {
    let (cache, _r) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let post = CacheRequest {
        method: &Method::POST,
        ..req("/form", &h)
    };
    let Lookup::Fetch(ticket) = cache.lookup(&post, &policy, t(0)).await else {
        panic!("fetch");
    };
    let resp = headers(&[
        ("cache-control", "max-age=60"),
        ("content-location", "/form"),
    ]);
    let Admission::Store(mut w) = cache.admit(ticket, 200, &resp, t(0)).await else {
        panic!("stored");
    };
    w.push(&Bytes::from_static(b"posted"));
    w.finish().await;
    let Lookup::Hit(s) = cache.lookup(&req("/form", &h), &policy, t(1)).await else {
        panic!("a GET is answered from the POST's response");
    };
    assert_eq!(s.body(), &[Bytes::from_static(b"posted")]);
}

/// RFC 9110 §14: ranges cut from a fresh complete entry (slices of the stored chunks), several
/// as a multipart body; 416 when unsatisfiable; a miss fetches the whole response.
#[tokio::test]
async fn ranges_are_served_from_complete_entries() {
    let (cache, _r) = cache();
    let policy = cache.route_policy("api", &route());
    let h = HeaderMap::new();
    let range = |spec: &str| headers(&[("range", spec)]);
    // A range miss fills the entry: the ticket fetches the whole response.
    let Lookup::Fetch(ticket) = cache
        .lookup(&req("/r", &range("bytes=0-1")), &policy, t(0))
        .await
    else {
        panic!("range miss fills");
    };
    assert!(ticket.fetches_whole() && ticket.fetches_for_others());
    drop(ticket);
    let resp = [("cache-control", "max-age=60"), ("etag", "\"r1\"")];
    fetch(
        &cache,
        &policy,
        "/r",
        &range("bytes=0-1"),
        &resp,
        &["0123", "4567", "89"],
        t(0),
    )
    .await;
    let Lookup::Hit(s) = cache
        .lookup(&req("/r", &range("bytes=3-8")), &policy, t(1))
        .await
    else {
        panic!("range hit");
    };
    assert_eq!(s.status_code(), 206);
    assert_eq!(s.content_length(), Some(6));
    let body: Vec<u8> = s.body().iter().flat_map(|b| b.to_vec()).collect();
    assert_eq!(body, b"345678");
    assert_eq!(
        s.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some("bytes 3-8/10")
    );
    let Lookup::Hit(s) = cache
        .lookup(&req("/r", &range("bytes=-3")), &policy, t(1))
        .await
    else {
        panic!("suffix hit");
    };
    assert_eq!(s.body().concat(), b"789");
    let Lookup::Hit(s) = cache
        .lookup(&req("/r", &range("bytes=10-")), &policy, t(1))
        .await
    else {
        panic!("416 hit");
    };
    assert_eq!((s.status_code(), s.content_length()), (416, Some(0)));
    assert_eq!(
        s.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some("bytes */10")
    );
    // Several ranges: one multipart body whose ranges are slices of the stored chunks.
    let Lookup::Hit(s) = cache
        .lookup(&req("/r", &range("bytes=0-1,3-4")), &policy, t(1))
        .await
    else {
        panic!("multipart hit");
    };
    assert_eq!(s.status_code(), 206);
    let content_type = s.headers().get("content-type").cloned();
    let boundary = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("multipart/byteranges; boundary="))
        .unwrap_or_default()
        .to_string();
    assert!(!boundary.is_empty(), "{content_type:?}");
    let want = format!(
        "--{boundary}\r\nContent-Range: bytes 0-1/10\r\n\r\n01\
         \r\n--{boundary}\r\nContent-Range: bytes 3-4/10\r\n\r\n34\r\n--{boundary}--\r\n"
    );
    assert_eq!(s.body().concat(), want.as_bytes());
    assert_eq!(s.content_length(), Some(want.len() as u64));
    assert!(s.headers().get("content-range").is_none());
    // If-Range with another validator: the whole response.
    let stale_validator = headers(&[("range", "bytes=0-1"), ("if-range", "\"old\"")]);
    let Lookup::Hit(s) = cache
        .lookup(&req("/r", &stale_validator), &policy, t(1))
        .await
    else {
        panic!("full hit");
    };
    assert_eq!((s.status_code(), s.content_length()), (200, Some(10)));
    let _ = h;
}

/// With `fill_ranges = false` a range with nothing stored goes to the origin untouched.
#[tokio::test]
async fn range_misses_pass_when_filling_is_off() {
    let (cache, _r) = cache();
    let policy = cache.route_policy(
        "api",
        &RouteCache {
            fill_ranges: false,
            ..route()
        },
    );
    let range = headers(&[("range", "bytes=0-1")]);
    assert!(matches!(
        cache.lookup(&req("/r", &range), &policy, t(0)).await,
        Lookup::Bypass(Bypass::Range)
    ));
    let resp = [("cache-control", "max-age=60")];
    fetch(
        &cache,
        &policy,
        "/r",
        &HeaderMap::new(),
        &resp,
        &["0123"],
        t(0),
    )
    .await;
    let Lookup::Hit(s) = cache.lookup(&req("/r", &range), &policy, t(1)).await else {
        panic!("a stored response still answers ranges");
    };
    assert_eq!(s.body().concat(), b"01");
}

/// RFC 9213 §2.1: the targeted fields the edge obeys are kept in the entry (its revalidations
/// need them) but do not reach clients, unless `forward_targeted` is set.
#[tokio::test]
async fn targeted_fields_are_consumed_unless_forwarded() {
    let resp = [
        ("cache-control", "no-store"),
        ("cdn-cache-control", "max-age=60"),
    ];
    for forward in [false, true] {
        let registry = Registry::new();
        let cache = ResponseCache::new(
            &EdgeCache {
                forward_targeted: forward,
                ..EdgeCache::default()
            },
            &registry,
        )
        .expect("metrics");
        let policy = cache.route_policy("api", &route());
        let h = HeaderMap::new();
        fetch(&cache, &policy, "/t", &h, &resp, &["x"], t(0)).await;
        let Lookup::Hit(s) = cache.lookup(&req("/t", &h), &policy, t(1)).await else {
            panic!("hit");
        };
        assert!(s.entry.headers.contains_key("cdn-cache-control"));
        assert_eq!(s.headers().contains_key("cdn-cache-control"), forward);
        assert!(s.headers().contains_key("cache-control"));
    }
}

/// RFC 9110 §12.5.4: Accept-Language variants match whatever the order, case and spacing.
#[tokio::test]
async fn accept_language_variants_are_normalised() {
    let (cache, _r) = cache();
    let policy = cache.route_policy("api", &route());
    let resp = [("cache-control", "max-age=60"), ("vary", "Accept-Language")];
    let a = headers(&[("accept-language", "en-US, de;q=0.5")]);
    fetch(&cache, &policy, "/l", &a, &resp, &["en"], t(0)).await;
    let b = headers(&[("accept-language", "DE; q=0.5,en-us")]);
    assert!(matches!(
        cache.lookup(&req("/l", &b), &policy, t(1)).await,
        Lookup::Hit(_)
    ));
}
