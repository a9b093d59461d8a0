//! Inference traffic end to end: model-aware region choice, the OpenAI-compatible surface,
//! body limits, SSE streaming, 429 fallback, per-key rate limits and the inference metrics.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meridian_config::inference::{ApiKey, RateLimit, RouteInference};
use meridian_config::Config;
use meridian_tests::{local_config, source_for, Protocol, Reply, World};
use tokio::net::TcpSocket;

const HOST: &str = "inference.example.test";
const CHAT: &str = "/v1/chat/completions";
/// sha256("sk-alpha") and sha256("sk-beta").
const ALPHA_SHA256: &str = "2179e632e89277f18aa600491b68ad55121fd6caa045e047fdeb426088a5a5f1";
const BETA_SHA256: &str = "c29d79ad08b23ba5095b823d0b2e777320983be14c1150de96d07a86da5cd78c";

fn post(world: &World, country: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    world
        .runtime
        .block_on(world.client.request(
            Protocol::Http1,
            source_for(country),
            "POST",
            HOST,
            path,
            headers,
            body.as_bytes().to_vec(),
        ))
        .expect("request completes")
}

fn chat(world: &World, country: &str, model: &str) -> Reply {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}]}}"#);
    post(
        world,
        country,
        CHAT,
        &[("content-type", "application/json")],
        &body,
    )
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

#[test]
fn each_model_is_served_by_the_nearest_region_that_has_it() {
    let world = World::start(local_config());
    // (client country, model, region expected to serve it)
    let table = [
        ("MX", "qwen-max", "eu-central-1"), // Frankfurt is nearer Mexico City than Singapore
        ("MX", "qwen-plus", "us-east"),
        ("MX", "qwen-turbo", "mx-central"),
        ("MX", "qwen", "us-east"), // alias of qwen-plus
        ("US", "qwen-max", "eu-central-1"),
        ("SG", "qwen-max", "ap-southeast-1"),
        ("TH", "qwen-plus", "ap-southeast-1"),
        ("TH", "qwen-turbo", "ap-southeast-7"),
        ("JP", "qwen-max", "ap-southeast-1"),
        ("DE", "qwen-plus", "eu-central-1"),
        ("KR", "qwen-turbo", "ap-northeast-2"),
        ("PH", "qwen-turbo", "ap-southeast-6"),
    ];
    for (country, model, region) in table {
        let reply = chat(&world, country, model);
        assert_eq!(reply.status, 200, "{country} {model}: {}", reply.text());
        assert_eq!(reply.region(), Some(region), "{country} {model}");
        assert_eq!(reply.json()["region"], region, "{country} {model}");
    }
    // Strict residency keeps Korea in ap-northeast-2, which does not serve qwen-max.
    let reply = chat(&world, "KR", "qwen-max");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(error_code(&reply), "model_unavailable");
}

#[test]
fn the_body_reaches_the_model_server_unchanged() {
    let world = World::start(local_config());
    let body = r#"{ "model" : "qwen-max", "messages": [{"role":"user","content":"ünïcode \"quoted\""}], "max_tokens": 3, "extra": {"a": [1,2,3]} }"#;
    let reply = post(&world, "DE", CHAT, &[], body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["request_body"], body);
    assert_eq!(json["usage"]["completion_tokens"], 3);
    let embeddings = post(
        &world,
        "DE",
        "/v1/embeddings",
        &[],
        r#"{"model":"qwen-turbo","input":"x"}"#,
    );
    assert_eq!(embeddings.status, 200, "{}", embeddings.text());
    assert_eq!(embeddings.region(), Some("eu-central-1"));
}

#[test]
fn unknown_model_is_an_openai_style_404() {
    let world = World::start(local_config());
    let reply = chat(&world, "MX", "gpt-secret-9");
    assert_eq!(reply.status, 404);
    assert_eq!(error_code(&reply), "model_not_found");
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    assert!(
        !reply.text().contains("127.1."),
        "no upstream addresses leak"
    );
    assert_eq!(
        world
            .origins
            .values()
            .flatten()
            .map(|o| o.model.requests())
            .sum::<u64>(),
        0
    );
}

#[test]
fn oversized_and_malformed_bodies_are_refused_at_the_edge() {
    let mut config = local_config();
    for route in config.routes.iter_mut().filter(|r| r.name == "inference") {
        if let Some(inference) = route.inference.as_mut() {
            inference.max_body_bytes = 65_536;
        }
    }
    let world = World::start(config);
    let big = format!(
        r#"{{"model":"qwen-turbo","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(70_000)
    );
    let reply = post(&world, "MX", CHAT, &[], &big);
    assert_eq!(reply.status, 413);
    assert_eq!(error_code(&reply), "request_too_large");
    let reply = post(
        &world,
        "MX",
        CHAT,
        &[],
        r#"{"model": "qwen-turbo", "messages": ["#,
    );
    assert_eq!(reply.status, 400);
    assert_eq!(error_code(&reply), "invalid_json");
    let reply = post(&world, "MX", CHAT, &[], r#"{"messages": []}"#);
    assert_eq!(reply.status, 400);
    assert_eq!(error_code(&reply), "missing_model");
    assert_eq!(
        world
            .origins
            .values()
            .flatten()
            .map(|o| o.model.requests())
            .sum::<u64>(),
        0
    );
}

#[test]
fn models_endpoint_lists_models_with_their_regions() {
    let world = World::start(local_config());
    let reply = world.get_from("MX", HOST, "/v1/models");
    assert_eq!(reply.status, 200);
    let json = reply.json();
    assert_eq!(json["object"], "list");
    let data = json["data"].as_array().expect("data");
    let ids: Vec<&str> = data.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["qwen-max", "qwen-plus", "qwen-turbo"]);
    assert_eq!(data[0]["object"], "model");
    assert_eq!(
        data[0]["regions"],
        serde_json::json!(["ap-southeast-1", "eu-central-1"])
    );
    assert_eq!(
        data[1]["regions"],
        serde_json::json!(["us-east", "ap-southeast-1", "eu-central-1"])
    );
    assert_eq!(data[1]["aliases"], serde_json::json!(["qwen"]));
    assert_eq!(data[2]["regions"].as_array().map(Vec::len), Some(8));
    assert_eq!(world.origin_requests(), 0, "answered by the edge");
}

/// One streamed POST read frame by frame from `source`.
struct Stream {
    status: u16,
    region: Option<String>,
    body: hyper::body::Incoming,
    text: String,
}

impl Stream {
    async fn open(target: SocketAddr, source: IpAddr, body: &str) -> Stream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(source, 0)).expect("bind");
        let stream = socket.connect(target).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .method("POST")
            .uri(CHAT)
            .header("host", HOST)
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        Stream {
            status: response.status().as_u16(),
            region: response
                .headers()
                .get("x-meridian-region")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: response.into_body(),
            text: String::new(),
        }
    }

    /// Reads until `count` complete SSE events arrived (or the body ended); returns the events.
    async fn events(&mut self, count: usize) -> Vec<String> {
        loop {
            let events: Vec<String> = self
                .text
                .split("\n\n")
                .filter(|e| e.starts_with("data: "))
                .map(|e| e["data: ".len()..].to_string())
                .collect();
            let complete = self.text.ends_with("\n\n") || events.len() > count;
            if events.len() >= count && complete {
                return events;
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.text.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                _ => return events,
            }
        }
    }
}

#[test]
fn sse_tokens_arrive_in_order_before_the_model_server_finishes() {
    let world = World::start(local_config());
    for origin in world.origins_of("eu-central-1") {
        origin.model.hold_stream_end(true);
    }
    let target = world.edge.http_addr;
    let body = r#"{"model":"qwen-max","stream":true,"max_tokens":5,"messages":[]}"#;
    let mut stream = world
        .runtime
        .block_on(Stream::open(target, source_for("DE"), body));
    assert_eq!(stream.status, 200);
    assert_eq!(stream.region.as_deref(), Some("eu-central-1"));
    // Every token arrives while the model server is still holding its last event.
    let first = world.runtime.block_on(stream.events(5));
    assert_eq!(first.len(), 5);
    let completed: u64 = world
        .origins_of("eu-central-1")
        .iter()
        .map(|o| o.model.streams_completed())
        .sum();
    assert_eq!(completed, 0, "the origin has not finished yet");
    for origin in world.origins_of("eu-central-1") {
        origin.model.hold_stream_end(false);
    }
    let all = world.runtime.block_on(stream.events(7));
    assert_eq!(all.len(), 7, "5 tokens, usage, [DONE]: {all:?}");
    for (i, event) in all[..5].iter().enumerate() {
        let json: serde_json::Value = serde_json::from_str(event).expect("token event is JSON");
        assert_eq!(json["choices"][0]["delta"]["content"], format!("tok{i} "));
    }
    let usage: serde_json::Value = serde_json::from_str(&all[5]).expect("usage event");
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(all[6], "[DONE]");
    // Usage from the stream is counted once the request ends.
    assert_eq!(
        world.metric_eventually(
            r#"meridian_inference_tokens_total{kind="completion",model="qwen-max",region="eu-central-1"}"#,
            5.0
        ),
        Some(5.0)
    );
}

#[test]
fn a_saturated_region_429s_and_the_next_region_serves() {
    let world = World::start(local_config());
    for origin in world.origins_of("eu-central-1") {
        origin.model.set_status(Some(429));
    }
    let reply = chat(&world, "MX", "qwen-max");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.region(), Some("ap-southeast-1"));
    let refused: u64 = world
        .origins_of("eu-central-1")
        .iter()
        .map(|o| o.model.requests())
        .sum();
    assert_eq!(refused, 1, "Retry-After took the region out after one 429");
    // A stream falls back the same way (nothing had reached the client yet).
    let target = world.edge.http_addr;
    let body = r#"{"model":"qwen-max","stream":true,"max_tokens":2}"#;
    let mut stream = world
        .runtime
        .block_on(Stream::open(target, source_for("DE"), body));
    assert_eq!(stream.status, 200);
    assert_eq!(stream.region.as_deref(), Some("ap-southeast-1"));
    assert_eq!(world.runtime.block_on(stream.events(4)).len(), 4);
}

fn limited(limit: RateLimit) -> Config {
    let mut config = local_config();
    let route = config
        .routes
        .iter_mut()
        .find(|r| r.name == "inference")
        .expect("inference route");
    route.inference = Some(RouteInference {
        max_body_bytes: 65536,
        rate_limit: Some(limit),
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
    ];
    config
}

fn chat_as(world: &World, token: &str) -> Reply {
    let auth = format!("Bearer {token}");
    post(
        world,
        "SG",
        CHAT,
        &[("authorization", &auth)],
        r#"{"model":"qwen-turbo","max_tokens":8}"#,
    )
}

#[test]
fn requests_per_minute_per_key_with_retry_after() {
    let world = World::start(limited(RateLimit {
        requests_per_minute: Some(2),
        tokens_per_minute: None,
    }));
    assert_eq!(chat_as(&world, "sk-alpha").status, 200);
    assert_eq!(chat_as(&world, "sk-alpha").status, 200);
    let refused = chat_as(&world, "sk-alpha");
    assert_eq!(refused.status, 429);
    assert_eq!(error_code(&refused), "rate_limit_exceeded");
    assert_eq!(refused.json()["error"]["type"], "requests");
    let retry_after: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(chat_as(&world, "sk-beta").status, 200, "another key");
    let unknown = chat_as(&world, "sk-nobody");
    assert_eq!(unknown.status, 401);
    assert_eq!(error_code(&unknown), "invalid_api_key");
    let missing = post(&world, "SG", CHAT, &[], r#"{"model":"qwen-turbo"}"#);
    assert_eq!(missing.status, 401);
    assert_eq!(
        world.metric_eventually(
            r#"meridian_ratelimited_total{limit="requests",route="inference"}"#,
            1.0
        ),
        Some(1.0)
    );
}

#[test]
fn tokens_per_minute_charged_from_usage() {
    let world = World::start(limited(RateLimit {
        requests_per_minute: None,
        tokens_per_minute: Some(10),
    }));
    let first = chat_as(&world, "sk-alpha");
    assert_eq!(first.status, 200);
    let used = first.json()["usage"]["total_tokens"]
        .as_f64()
        .expect("usage");
    assert!(used > 10.0);
    // The charge lands when the request ends (with its metrics): wait for those, then ask again.
    let series = r#"meridian_inference_tokens_total{kind="completion",model="qwen-turbo",region="ap-southeast-1"}"#;
    assert_eq!(world.metric_eventually(series, 8.0), Some(8.0));
    let refused = chat_as(&world, "sk-alpha");
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["error"]["type"], "tokens");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(chat_as(&world, "sk-beta").status, 200, "another key");
    assert_eq!(
        world.metric_eventually(
            r#"meridian_ratelimited_total{limit="tokens",route="inference"}"#,
            1.0
        ),
        Some(1.0)
    );
}

#[test]
fn inference_metrics_count_requests_tokens_and_first_byte() {
    let world = World::start(local_config());
    let body = r#"{"model":"qwen-max","max_tokens":4}"#;
    let reply = post(&world, "MX", CHAT, &[], body);
    assert_eq!(reply.status, 200);
    let prompt = (body.len() as f64 / 4.0).ceil();
    assert_eq!(
        world.metric_eventually(
            r#"meridian_inference_requests_total{model="qwen-max",region="eu-central-1",status_class="2xx"}"#,
            1.0
        ),
        Some(1.0)
    );
    assert_eq!(
        world.metric_eventually(
            r#"meridian_inference_tokens_total{kind="prompt",model="qwen-max",region="eu-central-1"}"#,
            prompt
        ),
        Some(prompt)
    );
    assert_eq!(
        world.metric_eventually(
            r#"meridian_inference_tokens_total{kind="completion",model="qwen-max",region="eu-central-1"}"#,
            4.0
        ),
        Some(4.0)
    );
    assert_eq!(
        world.metric_eventually(
            r#"meridian_inference_time_to_first_byte_seconds_count{model="qwen-max",region="eu-central-1"}"#,
            1.0
        ),
        Some(1.0)
    );
    // Refused at the edge: counted without a region.
    assert_eq!(chat(&world, "KR", "qwen-max").status, 503);
    assert_eq!(
        world.metric_eventually(
            r#"meridian_inference_requests_total{model="qwen-max",region="none",status_class="5xx"}"#,
            1.0
        ),
        Some(1.0)
    );
}

#[test]
fn a_long_stream_survives_config_reloads() {
    let world = World::start_following(local_config());
    for origin in world.origins_of("eu-central-1") {
        origin.model.hold_stream_end(true);
    }
    let body = r#"{"model":"qwen-max","stream":true,"max_tokens":5,"messages":[]}"#;
    let mut stream =
        world
            .runtime
            .block_on(Stream::open(world.edge.http_addr, source_for("DE"), body));
    assert_eq!(stream.region.as_deref(), Some("eu-central-1"));
    assert_eq!(world.runtime.block_on(stream.events(5)).len(), 5);

    // While the stream is open, Frankfurt stops serving qwen-max (and two more versions land).
    let mut config = world.config.clone();
    let eu = config
        .regions
        .iter_mut()
        .find(|r| r.name == "eu-central-1")
        .expect("eu-central-1");
    eu.models.retain(|m| m != "qwen-max");
    let mut last = 0;
    for _ in 0..3 {
        last = world.push(&config, "move qwen-max away from Frankfurt");
    }
    assert_eq!(world.wait_for_version(&world.edge, last), last);
    // New requests follow the new version...
    assert_eq!(
        chat(&world, "DE", "qwen-max").region(),
        Some("ap-southeast-1")
    );
    // ...while the stream that started on the old one finishes where it began.
    for origin in world.origins_of("eu-central-1") {
        origin.model.hold_stream_end(false);
    }
    let all = world.runtime.block_on(stream.events(7));
    assert_eq!(all.len(), 7, "5 tokens, usage, [DONE]: {all:?}");
    assert_eq!(all[6], "[DONE]");
}
