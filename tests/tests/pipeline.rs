//! Conformance of the one request pipeline across HTTP/1.1, HTTP/2 (TLS) and HTTP/3: cases where
//! the fronts once behaved differently, each run over every protocol.
//!
//! - a model call whose request body stalls gets a `408` OpenAI error (not silence, not a 502);
//! - an upstream that stops reading the request body is cut off by `timeouts.write` (`504`);
//! - hop-by-hop headers, including those a `Connection` header names, never cross the edge;
//! - a stale-while-revalidate refresh goes upstream with the forwarding headers and is counted.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use meridian_config::{Config, HumanDuration};
use meridian_tests::secure::{sni_for, tcp_client_config, tls_connect};
use meridian_tests::{local_config, metric_value, source_for, Protocol, Secure, World};

/// A request body that sends `first` and then never ends (nor closes): a client that stalls.
struct Stalled {
    first: Option<Bytes>,
}

impl hyper::body::Body for Stalled {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(Ok(hyper::body::Frame::data(first)))),
            None => Poll::Pending,
        }
    }
}

/// Status and body of a `method` request whose body is `first` and then stalls (never finishes),
/// over `protocol` from `source`; waits at most `patience` for the answer.
#[allow(clippy::too_many_arguments)]
async fn stalled_request(
    protocol: Secure,
    world: &World,
    source: IpAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    first: Bytes,
    patience: Duration,
) -> anyhow::Result<(u16, Bytes)> {
    let tls = world.tls.as_ref().expect("tls");
    let target = world.edge.https_addr.expect("https");
    let exchange = async {
        match protocol {
            Secure::H3 => stalled_h3(tls.roots(), target, source, host, path, headers, first).await,
            Secure::H1 | Secure::H2 => {
                let alpn: &[&[u8]] = if protocol == Secure::H2 {
                    &[b"h2"]
                } else {
                    &[b"http/1.1"]
                };
                let config = tcp_client_config(tls.roots(), alpn);
                let stream = tls_connect(source, target, &sni_for(host), config).await?;
                let io = hyper_util::rt::TokioIo::new(stream);
                let mut builder = http::Request::builder().method("POST");
                builder = match protocol {
                    Secure::H1 => builder.uri(path).header("host", host),
                    _ => builder.uri(format!("https://{host}{path}")),
                };
                for (name, value) in headers {
                    builder = builder.header(*name, *value);
                }
                let request = builder.body(Stalled { first: Some(first) })?;
                let reply =
                    meridian_tests::client::exchange(io, protocol == Secure::H2, request).await?;
                Ok((reply.status, reply.body))
            }
        }
    };
    tokio::time::timeout(patience, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {patience:?}"))?
}

async fn stalled_h3(
    roots: rustls::RootCertStore,
    target: SocketAddr,
    source: IpAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    first: Bytes,
) -> anyhow::Result<(u16, Bytes)> {
    let config = meridian_tests::h3client::client_config(roots)?;
    let mut endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0))?;
    endpoint.set_default_client_config(config);
    let connection = endpoint.connect(target, &sni_for(host))?.await?;
    let (mut driver, mut send) = ::h3::client::new(h3_quinn::Connection::new(connection)).await?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(format!("https://{host}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let mut stream = send.send_request(builder.body(())?).await?;
    // No `finish()`: the body never ends. The edge may answer (and stop reading with
    // STOP_SENDING, as RFC 9114 §4.1 allows) before all of it was sent: read the answer anyway.
    let _ = stream.send_data(first).await;
    let response = stream.recv_response().await?;
    let mut body = Vec::new();
    while let Ok(Some(mut chunk)) = stream.recv_data().await {
        while chunk.has_remaining() {
            let part = chunk.chunk();
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok((response.status().as_u16(), Bytes::from(body)))
}

fn short_body_timeout(mut config: Config) -> Config {
    config.edge.limits.client_body_timeout = HumanDuration::secs(1);
    config
}

fn model_call_body_timeout_is_408(protocol: Secure) {
    let world = World::start(short_body_timeout(local_config()));
    let body = Bytes::from_static(br#"{"model":"qwen-max","messages":[{"role":"user","#);
    let (status, body) = world
        .runtime
        .block_on(stalled_request(
            protocol,
            &world,
            source_for("MX"),
            "inference.example.test",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("content-length", "4096"),
            ],
            body,
            Duration::from_secs(20),
        ))
        .unwrap_or_else(|e| panic!("{protocol:?}: {e:#}"));
    assert_eq!(
        status,
        408,
        "{protocol:?}: {}",
        String::from_utf8_lossy(&body)
    );
    let json: serde_json::Value = serde_json::from_slice(&body).expect("OpenAI error JSON");
    assert_eq!(json["error"]["code"], "body_timeout", "{json}");
    assert_eq!(world.origin_requests(), 0, "nothing went upstream");
}

fn upstream_write_timeout_is_504(protocol: Secure) {
    let mut config = local_config();
    config.edge.limits.max_body_bytes = 256 * 1024 * 1024;
    for route in config.routes.iter_mut().filter(|r| r.name == "api") {
        route.timeouts.write = HumanDuration::secs(1);
        // Longer than the client waits: only the write timeout can end this exchange in time.
        route.timeouts.read = HumanDuration::secs(600);
        route.timeouts.total = HumanDuration::secs(600);
        route.retry.attempts = 1;
    }
    let world = World::start(config);
    // A big body the stalling origin never reads: the edge's writes to it block.
    let body = Bytes::from(vec![b'x'; 64 * 1024 * 1024]);
    let (status, text) = world
        .runtime
        .block_on(stalled_request(
            protocol,
            &world,
            source_for("US"),
            "api.example.test",
            "/upload?stall=1",
            &[],
            body,
            Duration::from_secs(60),
        ))
        .unwrap_or_else(|e| panic!("{protocol:?}: {e:#}"));
    assert_eq!(
        status,
        504,
        "{protocol:?}: {}",
        String::from_utf8_lossy(&text)
    );
}

fn hop_by_hop_headers_never_cross(protocol: Secure) {
    let world = World::start(local_config());
    let reply = world.secure_request(
        protocol,
        source_for("US"),
        "api.example.test",
        "/hop?hop=1",
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.header("x-hop"),
        None,
        "{protocol:?}: a nominated header was relayed"
    );
    // The edge's own HTTP/1.1 connection management may say `keep-alive`; the origin's must not
    // come through.
    assert_ne!(
        reply.header("keep-alive"),
        Some("timeout=5"),
        "{protocol:?}"
    );
    assert!(
        !reply
            .header("connection")
            .unwrap_or_default()
            .contains("x-hop"),
        "{protocol:?}: the origin's Connection header was relayed"
    );
}

/// HTTP/1.1 only: h2 and h3 forbid connection-specific request headers outright.
#[test]
fn h1_request_headers_named_by_connection_are_not_forwarded() {
    let world = World::start(local_config());
    let reply = world.request(
        Protocol::Http1,
        source_for("US"),
        "api.example.test",
        "/echo",
        &[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "secret"),
            ("keep-alive", "timeout=5"),
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["x_hop"],
        serde_json::Value::Null,
        "{}",
        reply.text()
    );
}

fn background_refresh_forwards_and_counts(protocol: Secure) {
    let mut config = local_config();
    for route in config.routes.iter_mut().filter(|r| r.name == "static") {
        route.cache.enabled = true;
    }
    let world = World::start(config);
    let path = "/swr?cc=max-age%3D1%2C%20stale-while-revalidate%3D600";
    let get = || world.secure_request(protocol, source_for("US"), "static.example.test", path, &[]);
    let first = get();
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-meridian-cache"), Some("miss"));
    let attempts = r#"meridian_upstream_attempts_total{region="us-east",result="ok"}"#;
    let before = metric_value(&world.metrics(), attempts).unwrap_or(0.0);
    // Wait (a readiness check) until the entry is stale: that answer starts one refresh.
    let deadline = Instant::now() + Duration::from_secs(15);
    while get().header("x-meridian-cache") != Some("stale") {
        assert!(Instant::now() < deadline, "the entry never went stale");
        std::thread::sleep(Duration::from_millis(50));
    }
    let refreshed = loop {
        let reply = get();
        if reply.json()["request"].as_u64() >= Some(2) {
            break reply;
        }
        assert!(
            Instant::now() < deadline,
            "the refreshed entry never arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let json = refreshed.json();
    assert_eq!(
        json["x_forwarded_for"],
        source_for("US").to_string(),
        "{json}"
    );
    assert_eq!(json["x_forwarded_proto"], "https", "{json}");
    assert!(json["x_request_id"].is_string(), "{json}");
    let after = world.metric_eventually(attempts, before + 1.0);
    assert!(after.is_some_and(|n| n > before), "{}", world.metrics());
}

macro_rules! conformance {
    ($($proto:ident => $value:expr),* $(,)?) => {
        $(
            mod $proto {
                use super::*;

                #[test]
                fn model_call_whose_body_stalls_gets_408() {
                    model_call_body_timeout_is_408($value);
                }

                #[test]
                fn upstream_that_stops_reading_is_cut_off_by_the_write_timeout() {
                    upstream_write_timeout_is_504($value);
                }

                #[test]
                fn hop_by_hop_response_headers_are_dropped() {
                    hop_by_hop_headers_never_cross($value);
                }

                #[test]
                fn background_refresh_carries_forwarding_headers_and_is_counted() {
                    background_refresh_forwards_and_counts($value);
                }
            }
        )*
    };
}

conformance!(h1 => Secure::H1, h2 => Secure::H2, h3 => Secure::H3);
