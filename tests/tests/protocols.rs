//! One conformance suite, run over HTTP/1.1 and HTTP/2 on TLS and over HTTP/3 (QUIC): every
//! protocol goes through the same routing core and must behave the same.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use meridian_config::{Config, HumanDuration};
use meridian_tests::{local_config, metric_value, source_for, Reply, Secure, World, PLACES};

/// Any request (method, body) over `protocol` on a fresh connection from `source`.
#[allow(clippy::too_many_arguments)]
fn send(
    world: &World,
    protocol: Secure,
    source: IpAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let tls = world.tls.as_ref().expect("tls");
    let target = world.edge.https_addr.expect("https");
    world
        .runtime
        .block_on(meridian_tests::secure::request(
            protocol,
            tls.roots(),
            target,
            source,
            method,
            host,
            path,
            headers,
            body,
        ))
        .unwrap_or_else(|e| panic!("{protocol:?} {method} {host}{path}: {e:#}"))
}

/// Polls `check` until it holds or 15 s pass (a readiness check, not a timing assertion).
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

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

fn requests_to(world: &World, region: &str) -> u64 {
    world.origins_of(region).iter().map(|o| o.requests()).sum()
}

fn routing_by_country(protocol: Secure) {
    let world = World::start(local_config());
    for place in PLACES {
        let reply = world.secure_request(
            protocol,
            place.client_addr(5),
            "api.example.test",
            "/hello",
            &[],
        );
        reply.assert_routed_for(place, &protocol);
        let body = reply.json();
        assert_eq!(body["x_forwarded_proto"], "https");
        assert_eq!(body["host"], "api.example.test");
    }
    let expected_version = match protocol {
        Secure::H1 => http::Version::HTTP_11,
        Secure::H2 => http::Version::HTTP_2,
        Secure::H3 => http::Version::HTTP_3,
    };
    let reply = world.secure_request(protocol, source_for("TH"), "v2.api.example.test", "/x", &[]);
    assert_eq!(reply.version, expected_version);
    assert_eq!(
        reply.region(),
        Some("ap-southeast-7"),
        "wildcard host and certificate"
    );
    // The request counter carries the protocol label.
    let label = match protocol {
        Secure::H1 => "h1",
        Secure::H2 => "h2",
        Secure::H3 => "h3",
    };
    let series = format!(
        r#"meridian_requests_total{{protocol="{label}",region="ap-southeast-7",route="api",status_class="2xx"}}"#
    );
    let seen = world.metric_eventually(&series, 2.0);
    assert_eq!(seen, Some(2.0), "{series}: {}", world.metrics());
    let handshakes: f64 = world
        .metrics()
        .lines()
        .filter(|l| l.starts_with("meridian_tls_handshakes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        handshakes >= PLACES.len() as f64,
        "one handshake per connection: {handshakes}"
    );
}

fn unknown_host_is_refused(protocol: Secure) {
    let world = World::start(local_config());
    for host in ["nobody.test", "example.test"] {
        let reply = world.secure_request(protocol, source_for("MX"), host, "/", &[]);
        assert_eq!(reply.status, 421, "{host} over {protocol:?}");
        assert_eq!(reply.json()["error"], "no route claims this host");
        assert_eq!(reply.header("x-meridian-pop"), Some("local-1"));
        assert_eq!(reply.region(), None);
    }
    assert_eq!(world.origin_requests(), 0, "no origin sees refused traffic");
}

fn forwarding_headers(protocol: Secure) {
    let world = World::start(local_config());
    let reply = world.secure_request(
        protocol,
        source_for("SG"),
        "api.example.test",
        "/h?q=1",
        &[("x-request-id", "abc-123")],
    );
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["x_request_id"], "abc-123");
    assert_eq!(body["x_forwarded_proto"], "https");
    assert_eq!(body["x_forwarded_for"], source_for("SG").to_string());
    assert_eq!(body["path"], "/h?q=1");
    let generated = world.secure_request(protocol, source_for("SG"), "api.example.test", "/", &[]);
    assert_eq!(
        generated.json()["x_request_id"].as_str().map(str::len),
        Some(32)
    );
    // HTTP/3 is advertised on TCP responses; an HTTP/3 response need not repeat it.
    let https = world.edge.https_addr.expect("https");
    let alt_svc = format!("h3=\":{}\"; ma=86400", https.port());
    if protocol != Secure::H3 {
        assert_eq!(reply.header("alt-svc"), Some(alt_svc.as_str()));
    }
}

fn failover_and_502(protocol: Secure) {
    let world = World::start(local_config());
    world.set_region_up("mx-central", false);
    let reply = world.secure_request(protocol, source_for("MX"), "api.example.test", "/", &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.region(),
        Some("us-east"),
        "failed over to the next region"
    );
    world.set_region_up("eu-central-1", false);
    let reply = world.secure_request(protocol, source_for("DE"), "eu.example.test", "/v1/x", &[]);
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"], "no upstream could be reached");
    assert_eq!(reply.header("x-meridian-pop"), Some("local-1"));
    let failed = world.metric_eventually(
        r#"meridian_upstream_attempts_total{region="mx-central",result="connect_error"}"#,
        2.0,
    );
    assert_eq!(failed, Some(2.0), "{}", world.metrics());
}

fn oversized_headers(protocol: Secure) {
    let world = World::start(local_config());
    let big = "x".repeat(40 * 1024);
    let reply = world.secure_request(
        protocol,
        source_for("US"),
        "api.example.test",
        "/",
        &[("x-big", &big)],
    );
    assert_eq!(reply.status, 431, "{}", reply.text());
    let many: Vec<(String, String)> = (0..120).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let reply = world.secure_request(protocol, source_for("US"), "api.example.test", "/", &many);
    assert_eq!(reply.status, 431);
    assert_eq!(world.origin_requests(), 0);
}

fn retries_a_503_region_elsewhere(protocol: Secure) {
    let world = World::start(local_config());
    for origin in world.origins_of("mx-central") {
        origin.set_status(Some(503));
    }
    let reply = world.secure_request(protocol, source_for("MX"), "api.example.test", "/get", &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.region(), Some("us-east"), "GET retried elsewhere");
    assert!(
        requests_to(&world, "mx-central") >= 1,
        "mx-central was tried"
    );
    let metrics = world.metrics();
    let retries = metric_value(
        &metrics,
        r#"meridian_retries_total{reason="status",route="api"}"#,
    );
    assert!(retries.is_some_and(|n| n >= 1.0), "{metrics}");
    let failover =
        r#"meridian_failovers_total{from="mx-central",reason="status",route="api",to="us-east"}"#;
    assert_eq!(world.metric_eventually(failover, 1.0), Some(1.0));

    // A POST the upstream saw is not replayed: its 503 stands.
    let us_before = requests_to(&world, "us-east");
    let reply = send(
        &world,
        protocol,
        source_for("MX"),
        "POST",
        "api.example.test",
        "/orders",
        &[],
        b"{\"item\":1}".to_vec(),
    );
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(requests_to(&world, "us-east"), us_before, "never replayed");
}

fn slow_region_fails_over_on_the_per_try_timeout(protocol: Secure) {
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
    let reply = world.secure_request(protocol, source_for("MX"), "api.example.test", "/slow", &[]);
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

/// Probes every 200 ms; two in a row flip a verdict.
fn fast_health(mut config: Config) -> Config {
    for region in &mut config.regions {
        region.health.interval = HumanDuration::millis(200);
        region.health.timeout = HumanDuration::millis(200);
        region.health.healthy_after = 2;
        region.health.unhealthy_after = 2;
    }
    config
}

fn all_down_is_503_with_retry_after(protocol: Secure) {
    let world = World::start(fast_health(local_config()));
    world.set_region_up("eu-central-1", false);
    assert!(eventually(|| metric_value(
        &world.metrics(),
        r#"meridian_region_healthy{region="eu-central-1"}"#
    ) == Some(0.0)));
    let reply = world.secure_request(protocol, source_for("DE"), "eu.example.test", "/v1/x", &[]);
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.header("x-meridian-pop"), Some("local-1"));
    assert!(reply.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("unhealthy")));
    assert_eq!(requests_to(&world, "eu-central-1"), 0, "no upstream tried");
}

fn cache_miss_then_hit(protocol: Secure) {
    let world = World::start(local_config());
    let path = "/logo?cc=max-age%3D60";
    let host = "static.example.test";
    let first = world.secure_request(protocol, source_for("US"), host, path, &[]);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-meridian-cache"), Some("miss"));
    assert_eq!(first.region(), Some("us-east"));
    assert_eq!(world.origin_requests(), 1);
    let second = world.secure_request(protocol, source_for("US"), host, path, &[]);
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-meridian-cache"), Some("hit"));
    assert_eq!(second.body, first.body, "the stored body is served");
    assert_eq!(
        second.region(),
        Some("us-east"),
        "the region that produced it"
    );
    assert_eq!(second.header("x-meridian-pop"), Some("local-1"));
    assert!(second
        .header("age")
        .and_then(|a| a.parse::<u64>().ok())
        .is_some());
    assert_eq!(
        world.origin_requests(),
        1,
        "a hit does not reach the origin"
    );
    let hits = world.metric_eventually(
        r#"meridian_cache_lookups_total{result="hit",route="static"}"#,
        1.0,
    );
    assert_eq!(hits, Some(1.0));
}

fn inference_routes_by_model_and_streams_sse(protocol: Secure) {
    let world = World::start(local_config());
    let host = "inference.example.test";
    let json = [("content-type", "application/json")];
    let body = r#"{"model":"qwen-max","messages":[{"role":"user","content":"hello"}]}"#;
    let reply = send(
        &world,
        protocol,
        source_for("MX"),
        "POST",
        host,
        "/v1/chat/completions",
        &json,
        body.as_bytes().to_vec(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.region(),
        Some("eu-central-1"),
        "the nearest region serving qwen-max"
    );

    let models = world.secure_request(protocol, source_for("MX"), host, "/v1/models", &[]);
    assert_eq!(models.status, 200, "{}", models.text());
    let ids: Vec<String> = models.json()["data"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ids, ["qwen-max", "qwen-plus", "qwen-turbo"]);

    let malformed = send(
        &world,
        protocol,
        source_for("MX"),
        "POST",
        host,
        "/v1/chat/completions",
        &json,
        b"{not json".to_vec(),
    );
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["error"]["code"], "invalid_json");

    let tokens = r#"meridian_inference_tokens_total{kind="completion",model="qwen-max",region="eu-central-1"}"#;
    let before = metric_value(&world.metrics(), tokens).unwrap_or(0.0);
    let stream = r#"{"model":"qwen-max","stream":true,"max_tokens":5,"messages":[]}"#;
    let reply = send(
        &world,
        protocol,
        source_for("DE"),
        "POST",
        host,
        "/v1/chat/completions",
        &json,
        stream.as_bytes().to_vec(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.region(), Some("eu-central-1"));
    let text = reply.text();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.len(), 7, "5 tokens, usage, [DONE]: {events:?}");
    for (i, event) in events[..5].iter().enumerate() {
        let json: serde_json::Value = serde_json::from_str(event).expect("token event is JSON");
        assert_eq!(json["choices"][0]["delta"]["content"], format!("tok{i} "));
    }
    assert_eq!(events[6], "[DONE]");
    assert_eq!(
        world.metric_eventually(tokens, before + 5.0),
        Some(before + 5.0),
        "usage from the stream is counted"
    );
}

fn ten_mib_upload_and_download_intact(protocol: Secure) {
    let world = World::start(local_config());
    const TEN_MIB: usize = 10 * 1024 * 1024;
    let upload: Vec<u8> = (0..TEN_MIB).map(|i| (i * 7 % 253) as u8).collect();
    let expected = sha256_hex(&upload);
    let reply = send(
        &world,
        protocol,
        source_for("SG"),
        "POST",
        "api.example.test",
        "/upload",
        &[],
        upload,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["body_bytes"], TEN_MIB);
    assert_eq!(json["body_sha256"], expected, "the upload arrived intact");

    let path = format!("/download?bytes={TEN_MIB}");
    let reply = world.secure_request(protocol, source_for("SG"), "api.example.test", &path, &[]);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), TEN_MIB);
    assert_eq!(
        sha256_hex(&reply.body),
        sha256_hex(&meridian_testkit::origin::pattern_body(TEN_MIB)),
        "the download arrived intact"
    );
}

macro_rules! conformance {
    ($($proto:ident => $value:expr),* $(,)?) => {
        $(
            mod $proto {
                use super::*;

                #[test]
                fn routes_every_country_to_its_region() {
                    routing_by_country($value);
                }

                #[test]
                fn refuses_unknown_hosts_with_421() {
                    unknown_host_is_refused($value);
                }

                #[test]
                fn forwards_proto_ids_and_advertises_h3() {
                    forwarding_headers($value);
                }

                #[test]
                fn fails_over_then_answers_502() {
                    failover_and_502($value);
                }

                #[test]
                fn rejects_oversized_headers_with_431() {
                    oversized_headers($value);
                }

                #[test]
                fn retries_a_503_region_on_the_next_one() {
                    retries_a_503_region_elsewhere($value);
                }

                #[test]
                fn fails_over_a_slow_region_on_the_per_try_timeout() {
                    slow_region_fails_over_on_the_per_try_timeout($value);
                }

                #[test]
                fn answers_503_with_retry_after_when_every_region_is_down() {
                    all_down_is_503_with_retry_after($value);
                }

                #[test]
                fn serves_a_cache_miss_then_a_hit() {
                    cache_miss_then_hit($value);
                }

                #[test]
                fn routes_inference_by_model_and_streams_sse() {
                    inference_routes_by_model_and_streams_sse($value);
                }

                #[test]
                fn streams_10_mib_up_and_down_intact() {
                    ten_mib_upload_and_download_intact($value);
                }
            }
        )*
    };
}

conformance!(h1 => Secure::H1, h2 => Secure::H2, h3 => Secure::H3);

/// A graceful stop sends GOAWAY to HTTP/3 clients and lets the request in flight finish.
#[test]
fn h3_graceful_stop_finishes_in_flight_requests() {
    use meridian_tests::h3client::{client_config, H3Connection};
    let world = World::start(local_config());
    for origin in world.origins_of("us-east") {
        // Keeps the request in flight while the edge stops (readiness is checked below).
        origin.set_delay(std::time::Duration::from_millis(300));
    }
    let target = world.edge.https_addr.expect("https");
    let roots = world.tls.as_ref().expect("tls").roots();
    let mut conn = world
        .runtime
        .block_on(H3Connection::connect(
            source_for("??"),
            target,
            "api.example.test",
            client_config(roots.clone()).expect("config"),
        ))
        .expect("connect");
    let in_flight = world.runtime.spawn(async move {
        let reply = conn
            .request("GET", "api.example.test", "/slow", &[], Vec::new())
            .await;
        (reply, conn)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while world.origin_requests() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(world.origin_requests(), 1, "the request reached its origin");
    let edge = world.edge;
    edge.stop(true);
    let (reply, conn) = world.runtime.block_on(in_flight).expect("join");
    let reply = reply.expect("the in-flight request completes");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.region(), Some("us-east"));
    world.runtime.block_on(conn.close());
    // Nobody answers on UDP any more: the handshake gives up after the client's idle timeout.
    let mut config = client_config(roots).expect("config");
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        std::time::Duration::from_millis(500)
            .try_into()
            .expect("idle timeout"),
    ));
    config.transport_config(std::sync::Arc::new(transport));
    let after = world.runtime.block_on(H3Connection::connect(
        source_for("??"),
        target,
        "api.example.test",
        config,
    ));
    assert!(
        after.is_err(),
        "a stopped edge accepts no new QUIC connection"
    );
}

type RawH3Stream = ::h3::client::RequestStream<h3_quinn::BidiStream<bytes::Bytes>, bytes::Bytes>;
type RawH3Sender = ::h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>;

/// One raw HTTP/3 request stream, so a test controls when each body part goes out (the sender
/// keeps the connection open: h3 closes it when the last one is dropped).
async fn open_h3_stream(
    world: &World,
    country: &str,
    uri: &str,
) -> (RawH3Stream, RawH3Sender, quinn::Endpoint) {
    let tls = world.tls.as_ref().expect("tls");
    let config = meridian_tests::h3client::client_config(tls.roots()).expect("h3 config");
    let mut endpoint =
        quinn::Endpoint::client(std::net::SocketAddr::new(source_for(country), 0)).expect("udp");
    endpoint.set_default_client_config(config);
    let target = world.edge.https_addr.expect("https");
    let connection = endpoint
        .connect(target, "api.example.test")
        .expect("connect")
        .await
        .expect("QUIC handshake");
    let (mut driver, mut sender) = ::h3::client::new(h3_quinn::Connection::new(connection))
        .await
        .expect("h3");
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let request = http::Request::post(uri).body(()).expect("request");
    let stream = sender.send_request(request).await.expect("request stream");
    (stream, sender, endpoint)
}

async fn h3_body(stream: &mut RawH3Stream) -> Vec<u8> {
    use bytes::Buf;
    let mut body = Vec::new();
    while let Ok(Some(mut chunk)) = stream.recv_data().await {
        while chunk.has_remaining() {
            let part = chunk.chunk();
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    body
}

/// HTTP/3 request bodies longer than the replay buffer stream to the upstream as they arrive
/// (the origin answers after 256 KiB while the client still holds the rest back: an edge that
/// buffered the whole body would never get an answer), and a body without Content-Length that
/// outgrows `max_body_bytes` mid-stream gets 413 without blaming the upstream.
#[test]
fn h3_request_bodies_stream_to_the_upstream() {
    let mut config = local_config();
    config.edge.limits.max_body_bytes = 512 * 1024;
    let world = World::start(config);
    let part = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    world.runtime.block_on(async {
        let (mut stream, _sender, endpoint) = open_h3_stream(
            &world,
            "SG",
            "https://api.example.test/stream?answer_after=262144",
        )
        .await;
        for _ in 0..4 {
            stream.send_data(part.clone()).await.expect("send 64 KiB");
        }
        // Liveness bound only: a buffering edge hangs here until its read timeout.
        let response = tokio::time::timeout(Duration::from_secs(20), stream.recv_response())
            .await
            .expect("the upstream answered before the body was complete")
            .expect("response");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response
                .headers()
                .get("x-meridian-region")
                .and_then(|v| v.to_str().ok()),
            Some("ap-southeast-1")
        );
        let json: serde_json::Value =
            serde_json::from_slice(&h3_body(&mut stream).await).expect("json");
        assert_eq!(json["received_before_answer"], 262144);
        drop(stream);
        endpoint.close(0u32.into(), b"done");

        let (mut stream, _sender, endpoint) =
            open_h3_stream(&world, "SG", "https://api.example.test/too-big").await;
        let mut status = None;
        for _ in 0..10 {
            if stream.send_data(part.clone()).await.is_err() {
                break; // the edge answered and stopped reading
            }
        }
        let _ = stream.finish().await;
        if let Ok(response) = stream.recv_response().await {
            status = Some(response.status().as_u16());
        }
        assert_eq!(status, Some(413), "640 KiB over a 512 KiB limit");
        endpoint.close(0u32.into(), b"done");
    });
    let upstream_errors: f64 = world
        .metrics()
        .lines()
        .filter(|l| l.starts_with("meridian_upstream_ejections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        upstream_errors, 0.0,
        "the client's oversize body blamed no upstream"
    );
}
