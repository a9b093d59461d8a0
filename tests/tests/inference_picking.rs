//! Replica picking for model calls, end to end over real sockets against simulated model servers
//! whose `/metrics` the edge scrapes: a replica with a long queue gets no new calls while another
//! is idle; calls sharing a prompt prefix stay on one replica until its load bound moves them, and
//! then on one stable second replica; a region whose every replica is saturated spills to the next one, except for a strict-residency
//! client, who is refused instead; without model server metrics, least outstanding (counted).
//!
//! Nothing here waits on time: each test waits until the edge's own gauges show the state the
//! simulated servers report (the gauges are exported after the table the picks read).

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meridian_config::Config;
use meridian_testkit::model_server::Reported;
use meridian_testkit::origin::OriginControl;
use meridian_tests::{local_config, metric_value, source_for, Protocol, Reply, World};
use tokio::net::TcpSocket;

const HOST: &str = "inference.example.test";
const CHAT: &str = "/v1/chat/completions";
const SYSTEM: &str = "You are the tax assistant of a small bakery. Answer in one sentence.";

fn post(world: &World, country: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    world
        .runtime
        .block_on(world.client.request(
            Protocol::Http1,
            source_for(country),
            "POST",
            HOST,
            CHAT,
            headers,
            body.as_bytes().to_vec(),
        ))
        .expect("request completes")
}

fn chat(model: &str, system: &str, user: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "max_tokens": 2,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    })
    .to_string()
}

fn queue_series(region: &str, origin: &OriginControl) -> String {
    format!(
        r#"meridian_inference_replica_queue{{region="{region}",upstream="{}"}}"#,
        origin.address
    )
}

/// Makes `origins` report `waiting` queued calls and waits until the edge has seen it.
fn report_queue(
    world: &World,
    region: &str,
    origins: &[std::sync::Arc<OriginControl>],
    waiting: u64,
) {
    for origin in origins {
        origin.model.report(Some(Reported {
            waiting,
            running: 4,
            kv_cache: 0.9,
            adapters: vec![],
        }));
    }
    for origin in origins {
        let series = queue_series(region, origin);
        let seen = world.metric_eventually(&series, waiting as f64);
        assert_eq!(seen, Some(waiting as f64), "{series}");
    }
}

/// Back to the live state (an idle server: nothing waiting), seen by the edge.
fn report_live(world: &World, region: &str, origins: &[std::sync::Arc<OriginControl>]) {
    for origin in origins {
        origin.model.report(None);
    }
    for origin in origins {
        let series = queue_series(region, origin);
        assert_eq!(world.metric_eventually(&series, 0.0), Some(0.0), "{series}");
    }
}

fn picks(world: &World, region: &str, reason: &str) -> f64 {
    let series = format!(
        r#"meridian_inference_picks_total{{reason="{reason}",region="{region}",route="inference"}}"#
    );
    metric_value(&world.metrics(), &series).unwrap_or(0.0)
}

/// The first model call starts the scraping; this one also waits until a round has been seen.
fn start_scraping(world: &World, country: &str, region: &str) {
    let reply = post(
        world,
        country,
        &[],
        r#"{"model":"qwen-turbo","max_tokens":1}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    for origin in world.origins_of(region) {
        let series = queue_series(region, origin);
        assert_eq!(world.metric_eventually(&series, 0.0), Some(0.0), "{series}");
    }
}

#[test]
fn a_replica_with_a_long_queue_gets_no_new_calls_while_another_is_idle() {
    let world = World::start(local_config());
    start_scraping(&world, "SG", "ap-southeast-1");
    let origins = world.origins_of("ap-southeast-1");
    let (busy, idle) = (&origins[0], &origins[1]);
    report_queue(&world, "ap-southeast-1", std::slice::from_ref(busy), 6);
    let before = (busy.model.requests(), idle.model.requests());
    // Calls with and without a prompt (scored, or affine to a replica whose load is over its bound).
    for i in 0..6 {
        let reply = post(
            &world,
            "SG",
            &[],
            r#"{"model":"qwen-turbo","max_tokens":1}"#,
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.region(), Some("ap-southeast-1"));
        let body = chat("qwen-turbo", SYSTEM, &format!("question {i}"), false);
        assert_eq!(post(&world, "SG", &[], &body).status, 200);
    }
    assert_eq!(
        busy.model.requests(),
        before.0,
        "the long queue got nothing"
    );
    assert_eq!(idle.model.requests(), before.1 + 12);
    assert!(picks(&world, "ap-southeast-1", "score") >= 6.0);
    // The queue drains: both take calls again.
    report_live(&world, "ap-southeast-1", std::slice::from_ref(busy));
    for i in 0..12 {
        let body = chat("qwen-turbo", &format!("system {i}"), "hi", false);
        assert_eq!(post(&world, "SG", &[], &body).status, 200);
    }
    assert!(busy.model.requests() > before.0, "prefixes spread again");
}

/// A streamed chat over HTTP/1.1 that stays open (the servers hold their streams' ends); returns
/// once its head arrived, with what keeps it open.
async fn open_stream(
    target: SocketAddr,
    source: IpAddr,
    body: String,
    headers: &[(&str, &str)],
) -> (hyper::body::Incoming, tokio::task::JoinHandle<()>) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source, 0)).expect("bind");
    let stream = socket.connect(target).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = hyper::Request::builder()
        .method("POST")
        .uri(CHAT)
        .header("host", HOST);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    (response.into_body(), conn)
}

/// ap-southeast-1 with four model servers.
fn four_replicas() -> Config {
    let mut config = local_config();
    let region = config
        .regions
        .iter_mut()
        .find(|r| r.name == "ap-southeast-1")
        .expect("region");
    let mut extra = region.upstreams[0].clone();
    for host in ["127.1.3.3:7001", "127.1.3.4:7001"] {
        extra.address = host.into();
        region.upstreams.push(extra.clone());
    }
    config
}

/// Requests each origin received since `before`.
fn placed(origins: &[std::sync::Arc<OriginControl>], before: &[u64]) -> Vec<u64> {
    origins
        .iter()
        .zip(before)
        .map(|(o, b)| o.model.requests() - b)
        .collect()
}

fn shared_prefix_lands_on_one_replica_until_its_bound(
    headers: &[(&str, &str)],
    system: impl Fn(usize) -> String,
) {
    let world = World::start(four_replicas());
    start_scraping(&world, "SG", "ap-southeast-1");
    let origins = world.origins_of("ap-southeast-1");
    assert_eq!(origins.len(), 4);
    let counts = || {
        origins
            .iter()
            .map(|o| o.model.requests())
            .collect::<Vec<_>>()
    };
    // One after the other (nothing in flight): every call on the prefix's replica.
    let before = counts();
    for i in 0..8 {
        let body = chat("qwen-turbo", &system(i), &format!("question {i}"), false);
        let reply = post(&world, "SG", headers, &body);
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let sequential = placed(origins, &before);
    let home = sequential
        .iter()
        .position(|&n| n == 8)
        .unwrap_or_else(|| panic!("one replica took them all: {sequential:?}"));
    assert!(picks(&world, "ap-southeast-1", "affinity") >= 8.0);

    // Twelve at once (streams held open), twice: the prefix's replica keeps taking them while its
    // load is within its bound, max(⌈1.25 × (calls + 1) / 4 replicas⌉, 4 calls) = 4, plus 4 as
    // it reports no queue (these servers never queue); the rest go to one second replica, the
    // same one every time, which therefore holds the prefix too.
    let mut waves = Vec::new();
    for wave in 0..2 {
        // The edge has seen every server idle again (the last wave's calls ended).
        for origin in origins {
            let series = format!(
                r#"meridian_inference_replica_running{{region="ap-southeast-1",upstream="{}"}}"#,
                origin.address
            );
            assert_eq!(world.metric_eventually(&series, 0.0), Some(0.0), "{series}");
        }
        for origin in origins {
            origin.model.hold_stream_end(true);
        }
        let before = counts();
        let target = world.edge.http_addr;
        let open = world.runtime.block_on(async {
            let mut open = Vec::new();
            for i in 0..12 {
                let body = chat(
                    "qwen-turbo",
                    &system(i + 8),
                    &format!("stream {wave}.{i}"),
                    true,
                );
                open.push(open_stream(target, source_for("SG"), body, headers).await);
            }
            open
        });
        let concurrent = placed(origins, &before);
        assert_eq!(concurrent[home], 8, "load bound: {concurrent:?}");
        assert_eq!(
            concurrent.iter().filter(|&&n| n == 4).count(),
            1,
            "the rest on one second replica: {concurrent:?}"
        );
        waves.push(concurrent);
        for origin in origins {
            origin.model.hold_stream_end(false);
        }
        world.runtime.block_on(async {
            for (mut body, conn) in open {
                while let Some(Ok(_)) = body.frame().await {}
                conn.abort();
            }
        });
    }
    assert_eq!(waves[0], waves[1], "the same second replica");
}

#[test]
fn requests_sharing_a_prefix_land_on_one_replica_until_its_load_bound_moves_them() {
    // The prefix hashed is the prompt's first KiB: a system prompt longer than that is shared.
    let long_system = format!("{SYSTEM} {}", "Keep the ledger tidy. ".repeat(60));
    shared_prefix_lands_on_one_replica_until_its_bound(&[], |_| long_system.clone());
}

#[test]
fn a_session_header_keys_affinity_whatever_the_prompt() {
    // Every call has its own system prompt; the session id keeps them together.
    shared_prefix_lands_on_one_replica_until_its_bound(
        &[("x-meridian-session", "conversation-42")],
        |i| format!("{SYSTEM} (call {i})"),
    );
}

#[test]
fn a_saturated_region_spills_to_the_next_one_but_strict_residency_refuses() {
    let world = World::start(local_config());
    // Mexico: qwen-turbo is nearest in mx-central, then us-east.
    start_scraping(&world, "MX", "mx-central");
    let mexico = world.origins_of("mx-central");
    report_queue(&world, "mx-central", mexico, 12);
    let before: u64 = mexico.iter().map(|o| o.model.requests()).sum();
    let reply = post(
        &world,
        "MX",
        &[],
        &chat("qwen-turbo", SYSTEM, "hola", false),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.region(), Some("us-east"), "spilled");
    assert_eq!(
        mexico.iter().map(|o| o.model.requests()).sum::<u64>(),
        before
    );
    assert_eq!(picks(&world, "us-east", "spill"), 1.0);
    let failover = r#"meridian_failovers_total{from="mx-central",reason="saturated",route="inference",to="us-east"}"#;
    assert_eq!(metric_value(&world.metrics(), failover), Some(1.0));
    report_live(&world, "mx-central", mexico);
    let reply = post(
        &world,
        "MX",
        &[],
        &chat("qwen-turbo", SYSTEM, "hola", false),
    );
    assert_eq!(reply.region(), Some("mx-central"), "back home");

    // Korea: strict residency keeps calls in ap-northeast-2; saturated, they are refused rather
    // than queued there or sent abroad, where servers are idle.
    start_scraping(&world, "KR", "ap-northeast-2");
    let seoul = world.origins_of("ap-northeast-2");
    report_queue(&world, "ap-northeast-2", seoul, 12);
    let before: u64 = seoul.iter().map(|o| o.model.requests()).sum();
    let reply = post(
        &world,
        "KR",
        &[],
        &chat("qwen-turbo", SYSTEM, "annyeong", false),
    );
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.header("retry-after").is_some());
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "overloaded", "{}", reply.text());
    assert_eq!(error["type"], "server_error");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("residency") && message.contains("KR"),
        "{message}"
    );
    assert_eq!(
        seoul.iter().map(|o| o.model.requests()).sum::<u64>(),
        before
    );
    let total_abroad: u64 = world
        .origins
        .iter()
        .filter(|(name, _)| name.as_str() != "ap-northeast-2")
        .flat_map(|(_, o)| o.iter())
        .map(|o| o.model.requests())
        .sum();
    let shed = r#"meridian_inference_shed_total{criticality="standard",reason="residency",route="inference"}"#;
    assert_eq!(metric_value(&world.metrics(), shed), Some(1.0));
    report_live(&world, "ap-northeast-2", seoul);
    let reply = post(
        &world,
        "KR",
        &[],
        &chat("qwen-turbo", SYSTEM, "annyeong", false),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.region(), Some("ap-northeast-2"));
    let abroad_after: u64 = world
        .origins
        .iter()
        .filter(|(name, _)| name.as_str() != "ap-northeast-2")
        .flat_map(|(_, o)| o.iter())
        .map(|o| o.model.requests())
        .sum();
    assert_eq!(abroad_after, total_abroad, "nothing went abroad");
}

#[test]
fn without_model_server_metrics_calls_are_least_outstanding_and_counted() {
    let mut config = local_config();
    // Every scrape fails: nothing is known of the servers.
    config.inference.scrape_path = "/no-metrics-here".into();
    let world = World::start(config);
    let origins = world.origins_of("ap-southeast-1");
    let before: Vec<u64> = origins.iter().map(|o| o.model.requests()).collect();
    let errors = r#"meridian_inference_scrapes_total{region="ap-southeast-1",result="error"}"#;
    for i in 0..8 {
        let body = chat("qwen-turbo", SYSTEM, &format!("question {i}"), false);
        assert_eq!(post(&world, "SG", &[], &body).status, 200);
        if i == 0 {
            // A first round has failed: from here on the table is known to be empty.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            while metric_value(&world.metrics(), errors).unwrap_or(0.0) < 2.0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no scrape error counted"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
    let spread = placed(origins, &before);
    assert!(
        spread.iter().all(|&n| n >= 3),
        "least outstanding rotates: {spread:?}"
    );
    assert_eq!(picks(&world, "ap-southeast-1", "fallback"), 8.0);
}
