//! Shared by the observability tests (`metrics_catalog.rs`, `prometheus.rs`): a World with every
//! subsystem on and traffic that makes every metric family (and every dashboard panel) have data.

#![allow(dead_code)] // each test target uses a different part

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use meridian_config::inference::{ApiKey, RateLimit, RouteInference};
use meridian_config::Config;
use meridian_tests::{local_config, source_for, Protocol, Secure, World};

/// The API key the traffic uses, and its sha256 (as `[[api_keys]]` stores it).
pub const API_KEY: &str = "sk-alpha";
const API_KEY_SHA256: &str = "2179e632e89277f18aa600491b68ad55121fd6caa045e047fdeb426088a5a5f1";
/// Requests per minute per key on the inference route: low, so the traffic hits the limit.
const REQUESTS_PER_MINUTE: u32 = 4;

/// The repository root (`dashboards/`, `docs/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// `examples/local.toml` (DNS, TLS + HTTP/3, cache, inference) with a per-key rate limit low enough
/// to be hit.
pub fn full_config() -> Config {
    let mut config = local_config();
    let route = config
        .routes
        .iter_mut()
        .find(|r| r.name == "inference")
        .expect("inference route");
    route.inference = Some(RouteInference {
        max_body_bytes: 65536,
        rate_limit: Some(RateLimit {
            requests_per_minute: Some(REQUESTS_PER_MINUTE),
            tokens_per_minute: None,
        }),
    });
    config.api_keys = vec![ApiKey {
        name: "alpha".into(),
        sha256: API_KEY_SHA256.into(),
    }];
    config
}

/// Every subsystem on, following a config service (so config version and reload metrics move).
pub fn start_world() -> World {
    World::start_following(full_config())
}

const COUNTRIES: [&str; 10] = ["MX", "US", "SG", "MY", "TH", "KR", "PH", "DE", "JP", "??"];

/// Drives traffic that touches every metric family: requests from every test-world country over
/// h1, h2 (TLS) and h3, cache misses and hits, a refused (5xx) and an unrouted (4xx) request,
/// inference with tokens and a rate-limited request, GeoDNS queries (answered and refused), a
/// region outage (retries, failover, ejection) and a config push. Returns the requests sent to the
/// HTTP fronts.
pub fn drive(world: &World) -> u64 {
    let mut sent = 0;
    for country in COUNTRIES {
        let reply = world.get_from(country, "api.example.test", "/hello");
        assert_eq!(reply.status, 200, "{country}: {}", reply.text());
        sent += 1;
    }
    for protocol in [Secure::H1, Secure::H2, Secure::H3] {
        let reply = world.secure_request(
            protocol,
            source_for("SG"),
            "api.example.test",
            "/hello",
            &[],
        );
        assert_eq!(reply.status, 200, "{protocol:?}");
        sent += 1;
    }
    // Cache: a miss, then hits.
    for _ in 0..3 {
        let reply = world.get_from("US", "static.example.test", "/app.css");
        assert_eq!(reply.status, 200);
        sent += 1;
    }
    // KR residency is strict and eu-records only runs in Frankfurt: 503 from the edge.
    assert_eq!(
        world
            .get_from("KR", "eu.example.test", "/v1/records")
            .status,
        503
    );
    // No route claims the host: 421.
    assert_eq!(world.get_from("US", "nobody.test", "/").status, 421);
    sent += 2;
    // Inference saturation: Korea's only allowed region reports a long queue while the others are
    // idle, so a Korean call is refused (strict residency) and counted as shed. The first call
    // starts the scraping; both count against the per-key limit below.
    assert_eq!(chat(world, "SG", "qwen-turbo"), 200);
    let seoul = world.origins_of("ap-northeast-2");
    for origin in seoul {
        origin
            .model
            .report(Some(meridian_testkit::model_server::Reported {
                waiting: 12,
                running: 4,
                kv_cache: 0.9,
                adapters: vec![],
            }));
    }
    for origin in seoul {
        let series = format!(
            r#"meridian_inference_replica_queue{{region="ap-northeast-2",upstream="{}"}}"#,
            origin.address
        );
        assert_eq!(
            world.metric_eventually(&series, 12.0),
            Some(12.0),
            "{series}"
        );
    }
    assert_eq!(
        chat(world, "KR", "qwen-turbo"),
        503,
        "saturated, not sent abroad"
    );
    for origin in seoul {
        origin.model.report(None);
    }
    sent += 2;
    // Inference: tokens and time to first byte, then the per-key limit answers 429.
    let mut limited = 0;
    for (i, model) in ["qwen-turbo", "qwen-max", "qwen-plus"]
        .iter()
        .cycle()
        .take(REQUESTS_PER_MINUTE as usize - 1)
        .enumerate()
    {
        let status = chat(world, if i % 2 == 0 { "SG" } else { "DE" }, model);
        sent += 1;
        match status {
            200 => {}
            429 => limited += 1,
            other => panic!("inference answered {other}"),
        }
    }
    assert_eq!(limited, 1, "the per-key limit refuses the request over it");
    // GeoDNS: an answered query and a refused one (outside the zone).
    assert_eq!(dns(world, "api.example.test", "MX"), "NOERROR");
    assert_eq!(dns(world, "static.example.test", "DE"), "NOERROR");
    assert_eq!(dns(world, "elsewhere.invalid", "US"), "REFUSED");
    // A region outage: Mexico's clients fail over to us-east; retries and ejections are counted.
    world.set_region_up("mx-central", false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = world.get_from("MX", "api.example.test", "/hello");
        assert_eq!(reply.status, 200, "a failed-over request still succeeds");
        sent += 1;
        let text = world.metrics();
        if text.contains("meridian_failovers_total{")
            && text.contains("meridian_upstream_ejections_total{")
            && text.contains("meridian_retries_total{")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outage shows up as retries, failovers and ejections:\n{text}"
        );
    }
    world.set_region_up("mx-central", true);
    // A config push: the edge follows it (version 2, a reload, a DNS zone rebuild).
    let mut next = world.config.clone();
    if let Some(dns) = next.dns.as_mut() {
        dns.ttl += 1;
    }
    let version = world.push(&next, "observability test");
    assert_eq!(world.wait_for_version(&world.edge, version), version);
    sent
}

fn chat(world: &World, country: &str, model: &str) -> u16 {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":8,"messages":[{{"role":"user","content":"hello"}}]}}"#
    );
    let auth = format!("Bearer {API_KEY}");
    world
        .runtime
        .block_on(world.client.request(
            Protocol::Http1,
            source_for(country),
            "POST",
            "inference.example.test",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            body.into_bytes(),
        ))
        .expect("inference request completes")
        .status
}

/// One UDP query (resent like a resolver until answered, bounded); returns the rcode's name.
fn dns(world: &World, name: &str, country: &str) -> String {
    let server = world.edge.dns_addr.expect("the edge runs GeoDNS");
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    let bytes = message.to_vec().expect("encodes");
    let reply = world
        .runtime
        .block_on(exchange(server, source_for(country), &bytes));
    let reply = Message::from_vec(&reply).expect("answer decodes");
    format!("{:?}", reply.metadata.response_code).to_uppercase()
}

async fn exchange(server: SocketAddr, source: IpAddr, query: &[u8]) -> Vec<u8> {
    let socket = tokio::net::UdpSocket::bind((source, 0))
        .await
        .expect("bind source");
    let mut buffer = vec![0u8; 65_535];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        socket.send_to(query, server).await.expect("send");
        if let Ok(received) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buffer)).await
        {
            let len = received.expect("recv").0;
            return buffer[..len].to_vec();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a DNS answer within the bound"
        );
    }
}

/// `# TYPE name type` lines of a Prometheus text exposition.
pub fn scrape_families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

/// Metric families of `docs/metrics.md`: rows whose first cell is `` `meridian_…` `` (recording
/// rules, `meridian:…`, are listed separately), with their type column.
pub fn catalog_families() -> BTreeMap<String, String> {
    let text =
        std::fs::read_to_string(repo_root().join("docs/metrics.md")).expect("docs/metrics.md");
    text.lines()
        .filter_map(|l| l.strip_prefix("| `meridian_"))
        .filter_map(|l| {
            let (rest, tail) = l.split_once('`')?;
            let kind = tail.split('|').nth(1)?.trim().to_string();
            Some((format!("meridian_{rest}"), kind))
        })
        .collect()
}

/// Recording rule names of `dashboards/recording.yml`.
pub fn recording_rules() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("dashboards/recording.yml"))
        .expect("dashboards/recording.yml");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- record:"))
        .map(|name| name.trim().to_string())
        .collect()
}
