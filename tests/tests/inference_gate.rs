//! Long prompts and the inference gate, end to end over real sockets:
//!
//! - multi-MiB model calls route by their model over HTTP/1.1, HTTP/2 and HTTP/3, reach the model
//!   server byte for byte, stream back, and are replayed whole on a fallback; `413` beyond the
//!   route's limit and `400` for malformed JSON, OpenAI-style;
//! - the gate: every path of an inference route is authenticated and limited (normalised paths
//!   cannot slip past), callers without API keys are limited per address whatever token they
//!   show, and a client that leaves mid-stream is still charged for its call.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meridian_config::inference::{ApiKey, RateLimit, RouteInference};
use meridian_config::Config;
use meridian_tests::{local_config, source_for, Protocol, Reply, Secure, World};
use tokio::net::TcpSocket;

const HOST: &str = "inference.example.test";
const CHAT: &str = "/v1/chat/completions";
/// sha256("sk-alpha").
const ALPHA_SHA256: &str = "2179e632e89277f18aa600491b68ad55121fd6caa045e047fdeb426088a5a5f1";
const MIB: usize = 1024 * 1024;

fn with_inference(limit: u64, rate_limit: Option<RateLimit>) -> Config {
    let mut config = local_config();
    let route = config
        .routes
        .iter_mut()
        .find(|r| r.name == "inference")
        .expect("inference route");
    route.inference = Some(RouteInference {
        max_body_bytes: limit,
        rate_limit,
    });
    config
}

/// A chat call whose one user message is `size` bytes of text (a long context).
fn long_chat(model: &str, stream: bool, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"model":"{model}","stream":{stream},"max_tokens":3,"messages":[{{"role":"system","content":"You summarise."}},{{"role":"user","content":""#
    );
    let mut body = head.into_bytes();
    // Varied text, with escapes the scan must walk through.
    let pattern = b"lorem \\\"ipsum\\\" dolor \\u00e9 sit amet, ";
    while body.len() < size {
        body.extend_from_slice(pattern);
    }
    body.extend_from_slice(br#""}]}"#);
    body
}

fn post(
    world: &World,
    source: IpAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    world
        .runtime
        .block_on(
            world
                .client
                .request(Protocol::Http1, source, "POST", HOST, path, headers, body),
        )
        .expect("request completes")
}

fn send_secure(world: &World, protocol: Secure, country: &str, body: Vec<u8>) -> Reply {
    let tls = world.tls.as_ref().expect("tls");
    let target = world.edge.https_addr.expect("https");
    world
        .runtime
        .block_on(meridian_tests::secure::request(
            protocol,
            tls.roots(),
            target,
            source_for(country),
            "POST",
            HOST,
            CHAT,
            &[("content-type", "application/json")],
            body,
        ))
        .unwrap_or_else(|e| panic!("{protocol:?}: {e:#}"))
}

fn error_code(reply: &Reply) -> String {
    let json = reply.json();
    assert!(json["error"]["message"].is_string(), "{}", reply.text());
    assert!(json["error"]["type"].is_string(), "{}", reply.text());
    json["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn model_requests(world: &World) -> u64 {
    world
        .origins
        .values()
        .flatten()
        .map(|o| o.model.requests())
        .sum()
}

#[test]
fn a_two_mebibyte_prompt_routes_by_model_and_streams_on_every_protocol() {
    let world = World::start(with_inference(16 * MIB as u64, None));
    for protocol in [Secure::H1, Secure::H2, Secure::H3] {
        let body = long_chat("qwen-max", true, 2 * MIB);
        let reply = send_secure(&world, protocol, "MX", body);
        assert_eq!(reply.status, 200, "{protocol:?}: {}", reply.text());
        assert_eq!(reply.region(), Some("eu-central-1"), "{protocol:?}");
        let text = reply.text();
        assert_eq!(
            text.matches(r#""content":"tok"#).count(),
            3,
            "{protocol:?}: {text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "{protocol:?}: {text}");
    }
    // Not streamed: the model server echoes what it received, which is what the client sent.
    let body = long_chat("qwen-plus", false, 2 * MIB);
    let reply = post(&world, source_for("MX"), CHAT, &[], body.clone());
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.region(), Some("us-east"));
    let echoed = reply.json()["request_body"]
        .as_str()
        .map(|s| s.as_bytes().to_vec());
    assert_eq!(echoed.as_deref(), Some(body.as_slice()), "byte for byte");
}

#[test]
fn a_long_prompt_is_replayed_whole_on_a_fallback() {
    let world = World::start(with_inference(16 * MIB as u64, None));
    for origin in world.origins_of("eu-central-1") {
        origin.model.set_status(Some(429));
    }
    let body = long_chat("qwen-max", false, 3 * MIB);
    let reply = post(&world, source_for("MX"), CHAT, &[], body.clone());
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.region(), Some("ap-southeast-1"));
    let echoed = reply.json()["request_body"]
        .as_str()
        .map(|s| s.len())
        .unwrap_or_default();
    assert_eq!(echoed, body.len(), "the fallback got the whole body again");
}

#[test]
fn model_calls_are_held_to_the_inference_limit_other_requests_to_the_edge_limit() {
    // An edge limit below the inference route's: the route's own limit governs its model calls.
    let mut config = with_inference(4 * MIB as u64, None);
    config.edge.limits.max_body_bytes = MIB as u64;
    let world = World::start(config);
    for protocol in [Secure::H1, Secure::H2, Secure::H3] {
        let reply = send_secure(
            &world,
            protocol,
            "MX",
            long_chat("qwen-max", false, 2 * MIB),
        );
        assert_eq!(reply.status, 200, "{protocol:?}: {}", reply.text());
    }
    let reply = post(
        &world,
        source_for("MX"),
        CHAT,
        &[],
        long_chat("qwen-max", false, 4 * MIB + 10),
    );
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(error_code(&reply), "request_too_large");
    // Any other request, on another route or on another path of the inference route, is held to
    // the edge's limit.
    let upload = vec![b'x'; 2 * MIB];
    let reply = world
        .runtime
        .block_on(world.client.request(
            Protocol::Http1,
            source_for("MX"),
            "POST",
            "api.example.test",
            "/upload",
            &[],
            upload.clone(),
        ))
        .expect("request completes");
    assert_eq!(reply.status, 413, "{}", reply.text());
    let reply = post(&world, source_for("MX"), "/v1/files", &[], upload);
    assert_eq!(reply.status, 413, "{}", reply.text());
}

#[test]
fn too_large_and_malformed_long_bodies_are_refused_openai_style() {
    let world = World::start(with_inference(MIB as u64, None));
    let reply = post(
        &world,
        source_for("MX"),
        CHAT,
        &[],
        long_chat("qwen-max", false, MIB + 10),
    );
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(error_code(&reply), "request_too_large");
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");

    // Broken deep inside a long body: the scan finds it, the model server never sees it.
    let mut broken = long_chat("qwen-max", false, MIB / 2);
    broken.truncate(broken.len() - 2);
    broken.extend_from_slice(b",]}");
    let reply = post(&world, source_for("MX"), CHAT, &[], broken);
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(error_code(&reply), "invalid_json");

    // The same answers over TLS on every protocol.
    for protocol in [Secure::H1, Secure::H2, Secure::H3] {
        let reply = send_secure(
            &world,
            protocol,
            "MX",
            long_chat("qwen-max", false, MIB + 10),
        );
        assert_eq!(reply.status, 413, "{protocol:?}: {}", reply.text());
        assert_eq!(error_code(&reply), "request_too_large", "{protocol:?}");
        let mut broken = long_chat("qwen-max", false, MIB / 2);
        broken.truncate(broken.len() - 2);
        let reply = send_secure(&world, protocol, "MX", broken);
        assert_eq!(reply.status, 400, "{protocol:?}: {}", reply.text());
        assert_eq!(error_code(&reply), "invalid_json", "{protocol:?}");
    }

    // A second `model` (escaped or not) cannot show the edge one model and the server another.
    let twice = br#"{"model":"qwen-turbo","messages":[],"m\u006fdel":"qwen-max"}"#.to_vec();
    let reply = post(&world, source_for("MX"), CHAT, &[], twice);
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(error_code(&reply), "invalid_value");
    assert_eq!(model_requests(&world), 0);
}

fn keyed(rate_limit: Option<RateLimit>) -> Config {
    let mut config = with_inference(MIB as u64, rate_limit);
    config.api_keys = vec![ApiKey {
        name: "alpha".into(),
        sha256: ALPHA_SHA256.into(),
    }];
    config
}

#[test]
fn every_path_of_an_inference_route_is_gated() {
    let world = World::start(keyed(None));
    let body = br#"{"model":"qwen-turbo","messages":[]}"#.to_vec();
    for path in [
        "/v1/chat/completions",
        "/v1/chat/completions/",
        "//v1/chat/completions",
        "/v1/./chat/%63ompletions",
        "/v1/responses",
        "/v1/anything/else",
    ] {
        let reply = post(&world, source_for("SG"), path, &[], body.clone());
        assert_eq!(reply.status, 401, "{path}: {}", reply.text());
        assert_eq!(error_code(&reply), "missing_api_key", "{path}");
    }
    let reply = world.get_from("SG", HOST, "/healthz");
    assert_eq!(reply.status, 401, "GET on the route: {}", reply.text());
    assert_eq!(model_requests(&world), 0);
    assert_eq!(world.origin_requests(), 0);

    // With the key, a trailing slash is a model call: routed by its model.
    let reply = post(
        &world,
        source_for("SG"),
        "/v1/chat/completions/",
        &[("authorization", "Bearer sk-alpha")],
        br#"{"model":"qwen-turbo","messages":[]}"#.to_vec(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.region(),
        Some("ap-southeast-1"),
        "qwen-turbo nearest Singapore"
    );
}

#[test]
fn random_tokens_buy_no_fresh_quota_without_api_keys() {
    let world = World::start(with_inference(
        MIB as u64,
        Some(RateLimit {
            requests_per_minute: Some(5),
            tokens_per_minute: None,
        }),
    ));
    let body = br#"{"model":"qwen-turbo","messages":[]}"#.to_vec();
    let source = source_for("SG");
    let mut statuses = Vec::new();
    for i in 0..8 {
        let auth = format!("Bearer sk-random-{i}-{}", i * 7919);
        let reply = post(
            &world,
            source,
            CHAT,
            &[("authorization", &auth)],
            body.clone(),
        );
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    // Other paths count against the same quota.
    let reply = world.get_from("SG", HOST, "/v1/files");
    assert_eq!(reply.status, 429, "{}", reply.text());
    // Another address has its own.
    let reply = post(&world, source_for("TH"), CHAT, &[], body);
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Opens a streamed chat over HTTP/1.1 and returns the response body once the head arrived.
async fn open_stream(
    target: SocketAddr,
    source: IpAddr,
    body: &str,
) -> (u16, hyper::body::Incoming, tokio::task::JoinHandle<()>) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source, 0)).expect("bind");
    let stream = socket.connect(target).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::builder()
        .method("POST")
        .uri(CHAT)
        .header("host", HOST)
        .header("authorization", "Bearer sk-alpha")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    (response.status().as_u16(), response.into_body(), conn)
}

#[test]
fn a_client_that_leaves_mid_stream_is_charged() {
    let world = World::start(keyed(Some(RateLimit {
        requests_per_minute: None,
        tokens_per_minute: Some(50),
    })));
    for origin in world.origins_of("ap-southeast-1") {
        origin
            .model
            .set_token_interval(std::time::Duration::from_millis(20));
    }
    // Reserves ⌈body/4⌉ + 200 tokens; the stream is far longer than what the client waits for.
    let body = r#"{"model":"qwen-plus","stream":true,"max_tokens":200,"messages":[]}"#;
    world.runtime.block_on(async {
        let (status, mut stream, conn) =
            open_stream(world.edge.http_addr, source_for("SG"), body).await;
        assert_eq!(status, 200);
        let first = stream.frame().await;
        assert!(matches!(first, Some(Ok(_))), "a first token arrives");
        // The client goes away (its connection closes), without any usage having been reported.
        conn.abort();
        let _ = conn.await;
    });
    // The edge finishes the request when its next write finds the client gone ("none": no
    // complete response reached the client).
    let finished = r#"meridian_inference_requests_total{model="qwen-plus",region="ap-southeast-1",status_class="none"}"#;
    assert_eq!(world.metric_eventually(finished, 1.0), Some(1.0));
    let reply = post(
        &world,
        source_for("SG"),
        CHAT,
        &[("authorization", "Bearer sk-alpha")],
        br#"{"model":"qwen-plus","max_tokens":1}"#.to_vec(),
    );
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "tokens");
}

#[test]
fn model_servers_are_scraped_for_queue_and_kv_cache() {
    use meridian_testkit::model_server::Reported;

    let world = World::start(local_config());
    let origin = &world.origins_of("eu-central-1")[0];
    origin.model.report(Some(Reported {
        waiting: 12,
        running: 4,
        kv_cache: 0.75,
        adapters: vec!["sql-lora".into()],
    }));
    // Scraping starts with the first model call.
    let body = br#"{"model":"qwen-turbo","messages":[]}"#.to_vec();
    assert_eq!(post(&world, source_for("DE"), CHAT, &[], body).status, 200);
    let labels = format!(r#"{{region="eu-central-1",upstream="{}"}}"#, origin.address);
    for (name, value) in [
        ("meridian_inference_replica_queue", 12.0),
        ("meridian_inference_replica_running", 4.0),
        ("meridian_inference_replica_kv_cache_ratio", 0.75),
    ] {
        let series = format!("{name}{labels}");
        assert_eq!(
            world.metric_eventually(&series, value),
            Some(value),
            "{series}"
        );
    }
    assert!(origin.model.scrapes() >= 1);
    // A replica that stops answering is counted, and its numbers go.
    world.runtime.block_on(origin.set_up_and_settle(false));
    let errors = r#"meridian_inference_scrapes_total{region="eu-central-1",result="error"}"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while meridian_tests::metric_value(&world.metrics(), errors).unwrap_or(0.0) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no scrape error counted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let queue = format!("meridian_inference_replica_queue{labels}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while meridian_tests::metric_value(&world.metrics(), &queue).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "stale queue gauge kept"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn sheddable_calls_are_shed_before_critical_ones_when_model_servers_saturate() {
    use meridian_config::inference::Criticality;
    use meridian_testkit::model_server::Reported;

    /// sha256("sk-beta").
    const BETA_SHA256: &str = "c29d79ad08b23ba5095b823d0b2e777320983be14c1150de96d07a86da5cd78c";
    let mut config = keyed(None);
    config.api_keys.push(ApiKey {
        name: "beta".into(),
        sha256: BETA_SHA256.into(),
    });
    config
        .inference
        .key_criticality
        .insert("alpha".into(), Criticality::Sheddable);
    config
        .inference
        .key_criticality
        .insert("beta".into(), Criticality::Critical);
    let world = World::start(config);
    let call = |token: &str| {
        let auth = format!("Bearer {token}");
        post(
            &world,
            source_for("MX"),
            CHAT,
            &[("authorization", &auth)],
            br#"{"model":"qwen-max","messages":[]}"#.to_vec(),
        )
    };
    // Not saturated: both are served (the first call also starts the scraping).
    assert_eq!(call("sk-alpha").status, 200);
    assert_eq!(call("sk-beta").status, 200);
    let origins = world.origins_of("eu-central-1");
    for origin in origins {
        origin.model.report(Some(Reported {
            waiting: 12,
            running: 8,
            kv_cache: 0.97,
            adapters: vec![],
        }));
    }
    for origin in origins {
        let series = format!(
            r#"meridian_inference_replica_queue{{region="eu-central-1",upstream="{}"}}"#,
            origin.address
        );
        assert_eq!(
            world.metric_eventually(&series, 12.0),
            Some(12.0),
            "{series}"
        );
    }
    let shed = call("sk-alpha");
    assert_eq!(shed.status, 429, "{}", shed.text());
    assert_eq!(error_code(&shed), "overloaded");
    assert!(shed.header("retry-after").is_some());
    let critical = call("sk-beta");
    assert_eq!(critical.status, 200, "{}", critical.text());
    // Not shed, and not queued behind the saturated servers: spilled to the next region with
    // the model.
    assert_eq!(critical.region(), Some("ap-southeast-1"));
    let shed = r#"meridian_inference_shed_total{criticality="sheddable",reason="saturated",route="inference"}"#;
    assert_eq!(
        meridian_tests::metric_value(&world.metrics(), shed),
        Some(1.0)
    );
    // Back to normal: the sheddable caller is served again.
    for origin in origins {
        origin.model.report(None);
    }
    for origin in origins {
        let series = format!(
            r#"meridian_inference_replica_queue{{region="eu-central-1",upstream="{}"}}"#,
            origin.address
        );
        assert_eq!(world.metric_eventually(&series, 0.0), Some(0.0), "{series}");
    }
    assert_eq!(call("sk-alpha").status, 200);
}
