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

/// An origin that echoes every request header it received (and the path) as JSON, cacheable for
/// a minute: whatever an attacker's request makes it say is what the cache would keep.
struct EchoOrigin {
    address: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    _stop: tokio::sync::watch::Sender<bool>,
}

fn echo_origin(runtime: &tokio::runtime::Runtime) -> EchoOrigin {
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.1.2.1:0"))
        .expect("bind the echo origin");
    let address = listener.local_addr().expect("address");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let requests = std::sync::Arc::new(AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&requests);
    runtime.spawn(meridian_gateway::httpd::serve(
        listener,
        move |req: hyper::Request<hyper::body::Incoming>| {
            let counter = std::sync::Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                let mut headers = serde_json::Map::new();
                for (name, value) in req.headers() {
                    headers.insert(
                        name.as_str().to_string(),
                        String::from_utf8_lossy(value.as_bytes()).into(),
                    );
                }
                let body = serde_json::json!({
                    "path": req.uri().path_and_query().map(|p| p.as_str()),
                    "headers": headers,
                });
                let mut response = meridian_gateway::httpd::json(hyper::StatusCode::OK, &body);
                response.headers_mut().insert(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_static("public, max-age=60"),
                );
                response
            }
        },
        stop_rx,
    ));
    EchoOrigin {
        address,
        requests,
        _stop: stop,
    }
}

/// An edge whose `static` route (cached) and `api` route (not cached) go to `origin` in
/// us-east, and whose `private` route (`/private` on the api host) goes to it in eu-central-1.
fn edge_for(origin: std::net::SocketAddr, extra: &str) -> meridian_gateway::edge::RunningEdge {
    let text = format!(
        r#"
schema = 1
[edge]
pop = "attack"
http = "{http}"
admin = "127.0.0.1:0"
threads = 1
{extra}

[[regions]]
name = "us-east"
location = {{ lat = 38.9, lon = -77.0 }}
upstreams = [{{ address = "{origin}" }}]
health = {{ enabled = false }}

[[routes]]
name = "static"
hosts = ["static.example.test"]
kind = "static"
regions = ["us-east"]
default_region = "us-east"
cache = {{ enabled = true, default_ttl = "60s" }}

[[routes]]
name = "api"
hosts = ["api.example.test"]
path_prefix = "/"
regions = ["us-east"]
default_region = "us-east"

[[regions]]
name = "eu-central-1"
location = {{ lat = 50.1, lon = 8.68 }}
upstreams = [{{ address = "{origin}" }}]
health = {{ enabled = false }}

# A path-specific route: served from its own region (x-meridian-region says which route matched).
[[routes]]
name = "private"
hosts = ["api.example.test"]
path_prefix = "/private"
regions = ["eu-central-1"]
default_region = "eu-central-1"
"#,
        http = meridian_tests::free_local_addr(),
    );
    let config = Config::from_toml_str(&text).expect("attack config");
    meridian_tests::start_edge_from(config)
}

fn send(
    runtime: &tokio::runtime::Runtime,
    edge: &meridian_gateway::edge::RunningEdge,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> meridian_tests::Reply {
    runtime
        .block_on(meridian_tests::Client::new(edge.http_addr).request(
            meridian_tests::Protocol::Http1,
            meridian_tests::source_for("US"),
            "GET",
            host,
            path,
            headers,
            Vec::new(),
        ))
        .expect("request completes")
}

/// Forwarding headers an untrusted client may try to plant, one cache entry each: the attacker
/// goes first, and neither it nor the clean client after it may see the planted value reach the
/// origin (and so the cached response).
#[test]
fn an_attacker_going_first_cannot_poison_the_cache_with_forwarding_headers() {
    let runtime = meridian_tests::runtime();
    let origin = echo_origin(&runtime);
    let edge = edge_for(origin.address, "");
    let planted: [(&str, &str); 10] = [
        ("x-forwarded-host", "evil.test"),
        ("x-forwarded-proto", "gopher"),
        ("x-forwarded-port", "6666"),
        ("x-forwarded-prefix", "/evil"),
        ("x-forwarded-for", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6;host=evil.test;proto=gopher"),
        ("x-real-ip", "6.6.6.6"),
        ("x-original-url", "/evil"),
        ("x-request-id", "<script>evil()</script>"),
        ("traceparent", "00-evil-evil-01"),
    ];
    for (i, (name, value)) in planted.into_iter().enumerate() {
        let path = format!("/p?z={i}");
        let attack = send(
            &runtime,
            &edge,
            "static.example.test",
            &path,
            &[(name, value)],
        );
        assert_eq!(attack.status, 200, "{name}: {}", attack.text());
        assert_eq!(attack.header("x-meridian-cache"), Some("miss"), "{name}");
        let clean = send(&runtime, &edge, "static.example.test", &path, &[]);
        assert_eq!(clean.header("x-meridian-cache"), Some("hit"), "{name}");
        for reply in [&attack, &clean] {
            let text = reply.text();
            assert!(
                !text.contains("evil") && !text.contains("6.6.6.6") && !text.contains("gopher"),
                "{name} reached the origin: {text}"
            );
        }
        let seen = &clean.json()["headers"];
        assert_eq!(seen["x-forwarded-for"], "127.11.0.7", "{name}: {seen}");
        assert_eq!(seen["x-forwarded-proto"], "http", "{name}");
        assert_eq!(seen["host"], "static.example.test", "{name}");
    }
    assert_eq!(
        origin.requests.load(std::sync::atomic::Ordering::Relaxed),
        10,
        "one origin fetch per entry"
    );
}

/// A path-specific route cannot be dodged with dot segments, doubled slashes or encoded
/// characters: the edge matches the normalised path and forwards exactly that; paths servers
/// read differently (encoded slashes, `..;`) are refused before any upstream is contacted.
#[test]
fn a_path_specific_route_cannot_be_left_or_dodged() {
    let runtime = meridian_tests::runtime();
    let origin = echo_origin(&runtime);
    let edge = edge_for(origin.address, "");
    let dodges = [
        "/public/../private/x",
        "/public/%2e%2e/private/x",
        "/public/.%2E/private/x",
        "//private/x",
        "/./private//x",
        "/%70rivate/x",
    ];
    for path in dodges {
        let reply = send(&runtime, &edge, "api.example.test", path, &[]);
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        assert_eq!(
            reply.region(),
            Some("eu-central-1"),
            "{path}: the private route"
        );
        assert_eq!(
            reply.json()["path"],
            "/private/x",
            "{path}: what was matched"
        );
    }
    let queried = send(&runtime, &edge, "api.example.test", "/a/../b?x=/../y", &[]);
    assert_eq!(
        queried.json()["path"],
        "/b?x=/../y",
        "the query is not a path"
    );
    let before = origin.requests.load(std::sync::atomic::Ordering::Relaxed);
    for path in [
        "/public%2f..%2fprivate/x",
        "/public/..;/private/x",
        "/public/%2e%2e;x/private/x",
        "/private%5cx",
        "/p%00",
        "/p%zz",
    ] {
        let reply = send(&runtime, &edge, "api.example.test", path, &[]);
        assert_eq!(reply.status, 400, "{path}: {}", reply.text());
    }
    assert_eq!(
        origin.requests.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "refused paths reach no upstream"
    );
}

/// HTTP/3 under a spoofing or slow client: a new client proves its address (Retry) before it
/// holds a connection slot, one address gets at most `max_connections_per_address` connections,
/// and a request stream that never sends its headers is ended by the edge.
#[test]
fn http3_validates_addresses_caps_each_address_and_ends_silent_streams() {
    use meridian_tests::h3client::{client_config, H3Connection};
    let mut config = local_config();
    config.edge.h3_limits.retry_above = 0;
    config.edge.h3_limits.max_connections_per_address = 2;
    config.edge.h3_limits.stream_header_timeout = meridian_config::HumanDuration::millis(200);
    let world = World::start(config);
    let target = world.edge.https_addr.expect("https");
    let roots = world.tls.as_ref().expect("tls").roots();
    let connect = |country: &str| {
        let config = client_config(roots.clone()).expect("client config");
        world.runtime.block_on(H3Connection::connect(
            meridian_tests::source_for(country),
            target,
            "api.example.test",
            config,
        ))
    };
    // Every connection goes through a Retry (retry_above = 0): a real client follows it.
    let mut first = connect("SG").expect("first connection, after a Retry");
    let reply = world
        .runtime
        .block_on(first.request("GET", "api.example.test", "/hello", &[], Vec::new()))
        .expect("request");
    assert_eq!(reply.status, 200);
    let second = connect("SG").expect("second connection from the same address");
    assert!(
        connect("SG").is_err(),
        "a third connection from one address is refused"
    );
    let other = connect("MY").expect("another address still gets in");
    // A stream that opens (one byte of a HEADERS frame) and then says nothing.
    let connection = second.connection.clone();
    let ended = world.runtime.block_on(async move {
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        send.write_all(&[0x01]).await.expect("write");
        // Bounded wait: without a header timeout the stream stays open until the connection's
        // 30 s idle timeout.
        tokio::time::timeout(std::time::Duration::from_secs(10), recv.read_to_end(1024)).await
    });
    assert!(
        ended.is_ok(),
        "the edge ends a stream that never sent its headers"
    );
    drop(first);
    world.runtime.block_on(other.close());
}
