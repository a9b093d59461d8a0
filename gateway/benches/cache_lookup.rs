//! In-process cache-hit throughput: `ResponseCache::lookup` of a stored 1 KiB response, the work a
//! cache hit costs before any socket I/O. `cargo bench -p meridian-gateway --bench cache_lookup`.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, Method};
use meridian_config::{EdgeCache, HumanDuration, RouteCache};
use meridian_gateway::cache::{Admission, CacheRequest, Lookup, ResponseCache};

fn cache_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let registry = prometheus::Registry::new();
    let cache = ResponseCache::new(&EdgeCache::default(), &registry).expect("cache");
    let policy = cache.route_policy(
        "static",
        &RouteCache {
            enabled: true,
            default_ttl: Some(HumanDuration::secs(3600)),
            ..RouteCache::default()
        },
    );
    let request_headers = HeaderMap::new();
    let request = CacheRequest {
        method: &Method::GET,
        scheme: "http",
        host: "static.example.test",
        path_and_query: "/logo.png?v=3",
        headers: &request_headers,
    };
    let mut response_headers = HeaderMap::new();
    response_headers.insert("cache-control", HeaderValue::from_static("max-age=3600"));
    response_headers.insert("content-type", HeaderValue::from_static("image/png"));
    let body = Bytes::from(vec![7u8; 1024]);
    runtime.block_on(async {
        let Lookup::Fetch(ticket) = cache.lookup(&request, &policy, SystemTime::now()).await else {
            panic!("first lookup is a miss");
        };
        let Admission::Store(mut writer) = cache
            .admit(ticket, 200, &response_headers, SystemTime::now())
            .await
        else {
            panic!("a max-age response is storable");
        };
        writer.push(&body);
        writer.finish().await.expect("stored");
    });

    let mut group = c.benchmark_group("cache");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("lookup_hit_1KiB", |b| {
        b.iter(|| {
            runtime.block_on(async {
                match cache.lookup(&request, &policy, SystemTime::now()).await {
                    Lookup::Hit(served) => served.body().len(),
                    _ => panic!("expected a hit"),
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, cache_hit);
criterion_main!(benches);
