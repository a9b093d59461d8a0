//! Kept-alive upstream connections that an origin closes before answering: the request goes out
//! once more on a fresh connection when that is safe, and whatever happens is never charged to
//! the upstream's health (closing idle connections is what origins do). Real sockets, loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use meridian_config::Config;
use meridian_tests::{metric_value, Client, Protocol, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What one origin listener saw: per method, requests answered and requests read then dropped.
#[derive(Default)]
struct Seen {
    answered: HashMap<String, u64>,
    dropped: HashMap<String, u64>,
}

impl Seen {
    fn answered(&self, method: &str) -> u64 {
        self.answered.get(method).copied().unwrap_or(0)
    }
    fn dropped(&self, method: &str) -> u64 {
        self.dropped.get(method).copied().unwrap_or(0)
    }
}

/// How the origin treats the kept-alive connections it answered on.
#[derive(Clone, Copy)]
enum Close {
    /// Reads the next request whole, then closes without a byte of response: what an origin
    /// whose idle timeout fires as a request arrives looks like from the edge.
    OnNextRequest,
    /// Closes right after answering (while the edge holds the connection idle).
    WhileIdle,
}

/// An origin that answers the first request on each connection (as keep-alive) and then closes
/// the connection as `close` says. The first answers wait until `hold` connections have a
/// request in flight, so that many end up pooled.
struct ClosingOrigin {
    address: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

fn closing_origin(runtime: &tokio::runtime::Runtime, hold: usize, close: Close) -> ClosingOrigin {
    let listener = runtime
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind the origin");
    let address = listener.local_addr().expect("address");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let barrier = Arc::new(tokio::sync::Barrier::new(hold.max(1)));
    let counted = Arc::clone(&seen);
    runtime.spawn(async move {
        let mut connections = 0usize;
        while let Ok((stream, _)) = listener.accept().await {
            connections += 1;
            // Only the first `hold` connections take part in the rendezvous.
            let barrier = (connections <= hold).then(|| Arc::clone(&barrier));
            tokio::spawn(serve(stream, Arc::clone(&counted), barrier, close));
        }
    });
    ClosingOrigin { address, seen }
}

async fn serve(
    mut stream: TcpStream,
    seen: Arc<Mutex<Seen>>,
    barrier: Option<Arc<tokio::sync::Barrier>>,
    close: Close,
) {
    let mut buf = Vec::new();
    let mut first = true;
    while let Some(method) = read_request(&mut stream, &mut buf).await {
        if !first {
            *seen
                .lock()
                .expect("seen")
                .dropped
                .entry(method)
                .or_default() += 1;
            return;
        }
        first = false;
        if let Some(barrier) = &barrier {
            barrier.wait().await;
        }
        *seen
            .lock()
            .expect("seen")
            .answered
            .entry(method)
            .or_default() += 1;
        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";
        if stream.write_all(reply).await.is_err() || matches!(close, Close::WhileIdle) {
            return;
        }
    }
}

/// Reads one whole request (head and `Content-Length` body) and returns its method; `None` when
/// the connection ends first.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let method = head.split(' ').next()?.to_string();
    let length: usize = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..head_end + length);
    Some(method)
}

/// One edge thread (so one upstream pool): route `solo` to a region with one upstream, route
/// `pair` to a region with two, where one failure is enough to eject (the ejection cap leaves
/// one of the two in).
fn edge(solo: SocketAddr, pair: [SocketAddr; 2]) -> meridian_gateway::edge::RunningEdge {
    let text = format!(
        r#"
schema = 1
[edge]
pop = "attack"
http = "{http}"
admin = "127.0.0.1:0"
threads = 1

[[regions]]
name = "solo"
location = {{ lat = 38.9, lon = -77.0 }}
upstreams = [{{ address = "{solo}" }}]
health = {{ enabled = false }}

[[regions]]
name = "pair"
location = {{ lat = 38.9, lon = -77.0 }}
upstreams = [{{ address = "{a}" }}, {{ address = "{b}" }}]
health = {{ enabled = false }}
outlier = {{ consecutive_failures = 1, max_ejection_percent = 50 }}

[[routes]]
name = "solo"
hosts = ["solo.example.test"]
regions = ["solo"]
default_region = "solo"

[[routes]]
name = "pair"
hosts = ["pair.example.test"]
regions = ["pair"]
default_region = "pair"
"#,
        http = meridian_tests::free_local_addr(),
        a = pair[0],
        b = pair[1],
    );
    let config = Config::from_toml_str(&text).expect("pool attack config");
    meridian_tests::start_edge_from(config)
}

async fn send(edge: SocketAddr, method: &str, host: &str, body: &[u8]) -> Reply {
    Client::new(edge)
        .request(
            Protocol::Http1,
            meridian_tests::source_for("US"),
            method,
            host,
            "/pool",
            &[],
            body.to_vec(),
        )
        .await
        .expect("request completes")
}

/// Four connections pooled, every one of them closed by the origin once it has read the next
/// request: a GET goes out on one of them and then once on a fresh connection — not once per
/// pooled connection — and is answered.
#[test]
fn a_request_on_a_closed_pooled_connection_goes_out_once_more_on_a_fresh_one() {
    let runtime = meridian_tests::runtime();
    let solo = closing_origin(&runtime, 4, Close::OnNextRequest);
    let pair = [
        closing_origin(&runtime, 0, Close::OnNextRequest),
        closing_origin(&runtime, 0, Close::OnNextRequest),
    ];
    let edge = edge(solo.address, [pair[0].address, pair[1].address]);
    let target = edge.http_addr;
    // Four at once: the origin answers none until all four are in, so the edge holds four.
    let warm = runtime.block_on(async {
        let calls: Vec<_> = (0..4)
            .map(|_| {
                tokio::spawn(async move { send(target, "GET", "solo.example.test", b"").await })
            })
            .collect();
        let mut statuses = Vec::new();
        for call in calls {
            statuses.push(call.await.expect("task").status);
        }
        statuses
    });
    assert_eq!(warm, [200; 4]);
    let reply = runtime.block_on(send(target, "GET", "solo.example.test", b""));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "ok");
    let seen = solo.seen.lock().expect("seen");
    assert_eq!(
        (seen.answered("GET"), seen.dropped("GET")),
        (5, 1),
        "one try on a pooled connection, then one on a fresh one"
    );
}

/// A POST whose pooled connection the origin closed after reading it cannot be sent again (the
/// origin may have acted on it): the client gets a 502, and the upstream is not charged for it —
/// where a single charged failure would eject it.
#[test]
fn a_closed_pooled_connection_is_never_charged_to_the_upstream() {
    let runtime = meridian_tests::runtime();
    let solo = closing_origin(&runtime, 0, Close::OnNextRequest);
    let pair = [
        closing_origin(&runtime, 0, Close::OnNextRequest),
        closing_origin(&runtime, 0, Close::OnNextRequest),
    ];
    let edge = edge(solo.address, [pair[0].address, pair[1].address]);
    let target = edge.http_addr;
    // GETs: whenever one lands on a pooled connection, it is dropped and resent on a fresh one.
    for i in 0..6 {
        let reply = runtime.block_on(send(target, "GET", "pair.example.test", b""));
        assert_eq!(reply.status, 200, "GET {i}: {}", reply.text());
    }
    let dropped_gets: u64 = pair
        .iter()
        .map(|o| o.seen.lock().expect("seen").dropped("GET"))
        .sum();
    assert!(dropped_gets >= 1, "some GET met a closed pooled connection");
    let mut failed = 0;
    for i in 0..6 {
        let reply = runtime.block_on(send(target, "POST", "pair.example.test", b"{\"n\":1}"));
        match reply.status {
            200 => {}
            502 => failed += 1,
            other => panic!("POST {i}: {other} {}", reply.text()),
        }
    }
    let dropped_posts: u64 = pair
        .iter()
        .map(|o| o.seen.lock().expect("seen").dropped("POST"))
        .sum();
    assert!(failed >= 1, "some POST met a closed pooled connection");
    assert_eq!(
        failed, dropped_posts,
        "each 502 is a POST the origin dropped"
    );
    let text = meridian_tests::metrics_text(&runtime, &edge);
    assert_eq!(
        metric_value(&text, r#"meridian_upstream_ejections_total{region="pair"}"#),
        None,
        "a closed kept-alive connection is not the upstream's failure"
    );
    // Both upstreams still take requests.
    for i in 0..4 {
        let reply = runtime.block_on(send(target, "GET", "pair.example.test", b""));
        assert_eq!(reply.status, 200, "GET after {i}: {}", reply.text());
    }
    let answered: Vec<u64> = pair
        .iter()
        .map(|o| o.seen.lock().expect("seen").answered("GET"))
        .collect();
    assert!(answered.iter().all(|&n| n > 0), "{answered:?}");
}

/// The common case: the origin closed a pooled connection while it sat idle. The edge notices
/// before writing anything, so even a POST goes out on a fresh connection and is answered.
#[test]
fn a_connection_closed_while_idle_is_not_used_even_for_a_post() {
    let runtime = meridian_tests::runtime();
    let solo = closing_origin(&runtime, 0, Close::WhileIdle);
    let pair = [
        closing_origin(&runtime, 0, Close::OnNextRequest),
        closing_origin(&runtime, 0, Close::OnNextRequest),
    ];
    let edge = edge(solo.address, [pair[0].address, pair[1].address]);
    for i in 0..6 {
        let reply = runtime.block_on(send(edge.http_addr, "POST", "solo.example.test", b"{}"));
        assert_eq!(reply.status, 200, "POST {i}: {}", reply.text());
    }
    let seen = solo.seen.lock().expect("seen");
    assert_eq!((seen.answered("POST"), seen.dropped("POST")), (6, 0));
}
