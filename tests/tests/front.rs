//! The TCP front's own HTTP/1.1 loop and HTTP/2 driver, over raw sockets: request smuggling and
//! malformed heads are answered as RFC 9112 says with nothing forwarded upstream, and every
//! connection is bounded in time (head, idle, body) and count.
//!
//! Clients here write bytes by hand: no HTTP client library would send these requests. Socket reads
//! have a generous safety timeout so a regression fails the test instead of hanging it; no test
//! asserts on elapsed time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use meridian_config::HumanDuration;
use meridian_tests::{local_config, metric_value, Protocol, World, PLACES};

/// Long enough never to fire on a healthy run; only a hang reaches it.
const SAFETY: Duration = Duration::from_secs(30);

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the edge");
    stream.set_read_timeout(Some(SAFETY)).expect("timeout");
    stream
}

/// One response read off `stream`: status, lower-cased head text, body (by Content-Length or
/// chunked).
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Reads one response (skipping `100 Continue`), or `None` if the edge closed first.
fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Option<Raw> {
    loop {
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
        pending.drain(..end);
        let status: u16 = head.get(9..12)?.parse().ok()?;
        if status == 100 {
            continue;
        }
        let mut raw = Raw {
            status,
            head,
            body: Vec::new(),
        };
        if let Some(length) = raw.header("content-length") {
            let length: usize = length.parse().ok()?;
            fill(stream, pending, length)?;
            raw.body = pending.drain(..length).collect();
        } else if raw.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    fill(stream, pending, pending.len() + 1)?;
                };
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&pending[..line_end]).trim(), 16)
                        .ok()?;
                pending.drain(..line_end + 2);
                fill(stream, pending, size + 2)?;
                raw.body.extend(pending.drain(..size));
                pending.drain(..2);
                if size == 0 {
                    break;
                }
            }
        }
        return Some(raw);
    }
}

fn fill(stream: &mut TcpStream, pending: &mut Vec<u8>, want: usize) -> Option<()> {
    while pending.len() < want {
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
    Some(())
}

/// True when the edge closed the connection (EOF or reset) rather than leaving it open.
fn closed_by_edge(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

/// Sends `raw` on a new connection; the response, and whether the edge then closed.
fn exchange(addr: SocketAddr, raw: &[u8]) -> (Option<Raw>, bool) {
    let mut stream = connect(addr);
    stream.write_all(raw).expect("send");
    let mut pending = Vec::new();
    let response = read_response(&mut stream, &mut pending);
    let closed = closed_by_edge(&mut stream);
    (response, closed)
}

#[test]
fn smuggling_and_malformed_heads_are_refused_and_never_forwarded() {
    let world = World::start(local_config());
    let addr = world.edge.http_addr;
    let h = "Host: api.example.test\r\n";
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "CL + TE",
            format!("POST /a HTTP/1.1\r\n{h}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            400,
        ),
        (
            "conflicting Content-Length",
            format!("POST /a HTTP/1.1\r\n{h}Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"),
            400,
        ),
        (
            "Content-Length list",
            format!("POST /a HTTP/1.1\r\n{h}Content-Length: 4, 5\r\n\r\nabcde"),
            400,
        ),
        (
            "TE other than chunked",
            format!("POST /a HTTP/1.1\r\n{h}Transfer-Encoding: gzip\r\n\r\nxx"),
            501,
        ),
        (
            "TE chunked not last",
            format!("POST /a HTTP/1.1\r\n{h}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
            501,
        ),
        (
            "TE in HTTP/1.0",
            format!("POST /a HTTP/1.0\r\n{h}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            400,
        ),
        ("obs-fold", format!("GET /a HTTP/1.1\r\n{h}X-A: 1\r\n  2\r\n\r\n"), 400),
        (
            "bad chunk size",
            format!("POST /a HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk without CRLF",
            format!("POST /a HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"),
            400,
        ),
        (
            "duplicate Host",
            format!("GET /a HTTP/1.1\r\n{h}Host: other.test\r\n\r\n"),
            400,
        ),
        ("no Host", "GET /a HTTP/1.1\r\n\r\n".to_string(), 400),
        ("NUL in a value", format!("GET /a HTTP/1.1\r\n{h}X-A: a\0b\r\n\r\n"), 400),
        ("CR in a value", format!("GET /a HTTP/1.1\r\n{h}X-A: a\rb\r\n\r\n"), 400),
        (
            "request line too long",
            format!("GET /{} HTTP/1.1\r\n{h}\r\n", "a".repeat(40_000)),
            414,
        ),
        (
            "head too large",
            format!("GET /a HTTP/1.1\r\n{h}X-A: {}\r\n\r\n", "b".repeat(40_000)),
            431,
        ),
        ("HTTP/2.0 text", format!("GET /a HTTP/2.0\r\n{h}\r\n"), 505),
        ("CONNECT", format!("CONNECT a.test:443 HTTP/1.1\r\n{h}\r\n"), 405),
        (
            "unknown expectation",
            format!("GET /a HTTP/1.1\r\n{h}Expect: 200-ok\r\n\r\n"),
            417,
        ),
    ];
    for (name, raw, want) in &cases {
        let (response, closed) = exchange(addr, raw.as_bytes());
        let response = response.unwrap_or_else(|| panic!("{name}: no response"));
        assert_eq!(response.status, *want, "{name}: {}", response.head);
        assert!(
            closed,
            "{name}: the connection must close after a refused head"
        );
    }
    assert_eq!(
        world.origin_requests(),
        0,
        "nothing the edge refused may reach an upstream"
    );
}

#[test]
fn absolute_form_pipelining_http10_and_expect_continue() {
    let world = World::start(local_config());
    let addr = world.edge.http_addr;

    // Absolute form: the target's authority is the host, whatever Host says (RFC 9112 §3.2.2).
    let (response, _) = exchange(
        addr,
        b"GET http://api.example.test/abs HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    );
    let response = response.expect("absolute-form answer");
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(response.json()["host"], "api.example.test");

    // Two pipelined requests in one write: two answers, in order, on one connection.
    let mut stream = connect(addr);
    stream
        .write_all(
            b"GET /one HTTP/1.1\r\nHost: api.example.test\r\n\r\n\
              GET /two HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
        )
        .expect("send");
    let mut pending = Vec::new();
    let first = read_response(&mut stream, &mut pending).expect("first answer");
    let second = read_response(&mut stream, &mut pending).expect("second answer");
    assert_eq!(first.json()["path"], "/one");
    assert_eq!(second.json()["path"], "/two");

    // HTTP/1.0: closed after the answer unless the client asked for keep-alive.
    let (response, closed) = exchange(addr, b"GET /old HTTP/1.0\r\nHost: api.example.test\r\n\r\n");
    assert_eq!(response.expect("1.0 answer").status, 200);
    assert!(
        closed,
        "HTTP/1.0 without keep-alive is closed after the answer"
    );
    let mut stream = connect(addr);
    let mut pending = Vec::new();
    for path in ["/ka1", "/ka2"] {
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: api.example.test\r\nConnection: keep-alive\r\n\r\n"
        )
        .expect("send");
        let response = read_response(&mut stream, &mut pending).expect("1.0 keep-alive answer");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("connection"), Some("keep-alive"));
    }

    // Expect: 100-continue: the edge asks for the body, and the body arrives whole.
    let mut stream = connect(addr);
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 5\r\n\
              Expect: 100-continue\r\n\r\n",
        )
        .expect("send head");
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).expect("100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").expect("send body");
    let mut pending = Vec::new();
    let response = read_response(&mut stream, &mut pending).expect("upload answer");
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["body_bytes"], 5);
    // The edge answered the expectation itself: the origin never saw it.
    assert_eq!(world.origin_requests(), 7);
}

#[test]
fn slow_heads_idle_connections_and_request_counts_are_bounded() {
    let mut config = local_config();
    config.edge.limits.client_header_timeout = HumanDuration::secs(1);
    config.edge.limits.keepalive_timeout = HumanDuration::secs(1);
    config.edge.limits.max_requests_per_connection = 2;
    let world = World::start(config);
    let addr = world.edge.http_addr;

    // Slowloris: a head that never completes gets 408 and the connection closes.
    let mut slow = connect(addr);
    slow.write_all(b"GET / HTTP/1.1\r\nHost: api.example.test\r\nX-a: ")
        .expect("send part of a head");
    let mut pending = Vec::new();
    let response = read_response(&mut slow, &mut pending).expect("408 for a slow head");
    assert_eq!(response.status, 408);
    assert!(closed_by_edge(&mut slow));

    // A connection that never sends anything is closed too (no answer owed).
    let mut silent = connect(addr);
    assert!(closed_by_edge(&mut silent), "a silent connection is closed");

    // Idle after a request: closed at the keep-alive timeout.
    let mut idle = connect(addr);
    idle.write_all(b"GET /a HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
        .expect("send");
    let mut pending = Vec::new();
    assert_eq!(
        read_response(&mut idle, &mut pending)
            .expect("answer")
            .status,
        200
    );
    assert!(
        closed_by_edge(&mut idle),
        "an idle keep-alive connection is closed"
    );

    // The second request of a connection is its last: `Connection: close`, then EOF.
    let mut counted = connect(addr);
    let mut pending = Vec::new();
    for (i, path) in ["/1", "/2"].iter().enumerate() {
        write!(
            counted,
            "GET {path} HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
        )
        .expect("send");
        let response = read_response(&mut counted, &mut pending).expect("answer");
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header("connection") == Some("close"),
            i == 1,
            "{}",
            response.head
        );
    }
    assert!(closed_by_edge(&mut counted));

    assert_timeouts_counted(&world.metrics(), 2.0, 1.0);
}

/// `meridian_client_timeouts_total` counted at least `header` head and `keepalive` idle timeouts.
fn assert_timeouts_counted(metrics: &str, header: f64, keepalive: f64) {
    assert!(
        metric_value(metrics, r#"meridian_client_timeouts_total{kind="header"}"#) >= Some(header),
        "{metrics}"
    );
    assert!(
        metric_value(
            metrics,
            r#"meridian_client_timeouts_total{kind="keepalive"}"#
        ) >= Some(keepalive),
        "{metrics}"
    );
}

#[test]
fn connections_beyond_the_cap_are_closed_at_accept() {
    let mut config = local_config();
    config.edge.limits.max_connections = 2;
    let world = World::start(config);
    let addr = world.edge.http_addr;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(addr);
        stream
            .write_all(b"GET /a HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
            .expect("send");
        let mut pending = Vec::new();
        assert_eq!(
            read_response(&mut stream, &mut pending)
                .expect("admitted")
                .status,
            200
        );
        held.push(stream);
    }
    let mut third = connect(addr);
    let _ = third.write_all(b"GET /a HTTP/1.1\r\nHost: api.example.test\r\n\r\n");
    let mut pending = Vec::new();
    assert!(
        read_response(&mut third, &mut pending).is_none(),
        "the third connection is closed without an answer"
    );
    // A slot frees when a connection closes.
    drop(held.pop());
    let admitted = world.metric_eventually(r#"meridian_client_connections{listener="http"}"#, 1.0);
    assert_eq!(admitted, Some(1.0));
    let (response, _) = exchange(
        addr,
        b"GET /a HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(response.expect("admitted again").status, 200);
    let metrics = world.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            r#"meridian_client_connections_refused_total{listener="http"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[test]
fn a_stalled_request_body_gets_408_and_ejects_nobody() {
    let mut config = local_config();
    config.edge.limits.client_body_timeout = HumanDuration::secs(1);
    let world = World::start(config);
    let addr = world.edge.http_addr;
    // Small (held whole before any try) and large (streamed to the upstream while it arrives).
    for (declared, sent) in [(100usize, 10usize), (1 << 20, 200 * 1024)] {
        let mut stream = connect(addr);
        write!(
            stream,
            "POST /upload HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: {declared}\r\n\r\n"
        )
        .expect("send head");
        stream.write_all(&vec![b'x'; sent]).expect("send some body");
        let mut pending = Vec::new();
        let response = read_response(&mut stream, &mut pending).expect("an answer, not silence");
        assert_eq!(response.status, 408, "{declared}: {}", response.head);
    }
    let metrics = world.metrics();
    let ejected: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("meridian_upstream_ejections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(ejected, 0.0, "a slow client is not an upstream failure");
}

/// Every answer carries a Date (RFC 9110 §6.6.1), the edge's own refusals included, over HTTP/1.1
/// and HTTP/2.
#[test]
fn every_answer_is_dated_over_h1_and_h2() {
    let world = World::start(local_config());
    let source = PLACES[0].client_addr(3);
    for protocol in [Protocol::Http1, Protocol::H2c] {
        for (host, status) in [("api.example.test", 200), ("nobody.test", 421)] {
            let reply = world.request(protocol, source, host, "/dated", &[]);
            assert_eq!(reply.status, status, "{protocol:?} {host}");
            let date = reply.header("date").unwrap_or_default();
            assert!(date.ends_with(" GMT"), "{protocol:?} {host}: Date {date:?}");
        }
    }
}

/// An HTTP/2 connection is bounded like an HTTP/1.1 one: a connection that opens no stream is
/// closed after the header timeout, an idle one after the keep-alive time, and one that reached
/// `max_requests_per_connection` is told (GOAWAY) to go elsewhere after its last request.
#[test]
fn http2_connections_are_bounded_in_time_and_requests() {
    let mut config = local_config();
    config.edge.limits.client_header_timeout = HumanDuration::secs(1);
    config.edge.limits.keepalive_timeout = HumanDuration::secs(1);
    config.edge.limits.max_requests_per_connection = 2;
    let world = World::start(config);
    let addr = world.edge.http_addr;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let open = || async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
            (client, tokio::spawn(connection))
        };
        let get = |path: &str| {
            http::Request::get(format!("http://api.example.test{path}"))
                .body(())
                .expect("request")
        };
        let ends = |connection: tokio::task::JoinHandle<Result<(), h2::Error>>| async move {
            // How it ends (GOAWAY, or the socket closed) does not matter; that it ends does.
            let _ = tokio::time::timeout(SAFETY, connection)
                .await
                .expect("the edge closes the connection")
                .expect("connection task");
        };

        // No stream at all: closed after the header timeout.
        let (_silent, connection) = open().await;
        ends(connection).await;

        // One request, then idle: closed after the keep-alive time.
        let (client, connection) = open().await;
        let mut client = client.ready().await.expect("ready");
        let (response, _) = client.send_request(get("/idle"), true).expect("send");
        let response = response.await.expect("response");
        assert_eq!(response.status(), 200);
        ends(connection).await;

        // Two requests are the connection's share; a third is refused by GOAWAY.
        let (client, connection) = open().await;
        let mut client = client.ready().await.expect("ready");
        for path in ["/1", "/2"] {
            let (response, _) = client.send_request(get(path), true).expect("send");
            assert_eq!(response.await.expect("response").status(), 200);
        }
        let refused = match client.ready().await {
            Ok(mut client) => match client.send_request(get("/3"), true) {
                Ok((response, _)) => response.await.is_err(),
                Err(_) => true,
            },
            Err(_) => true,
        };
        assert!(refused, "a third request on the connection is refused");
        ends(connection).await;
    });
    assert_timeouts_counted(&world.metrics(), 1.0, 1.0);
}

/// A raw upstream's read of one request head, byte by byte (so nothing behind it is consumed);
/// `None` when the connection ends first.
fn read_request_head(conn: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A world whose `api` route goes to one upstream only, `upstream` (a raw socket server of the
/// test's own), pushed as a new config version (the harness gives every configured upstream a
/// simulated origin first).
fn world_with_raw_upstream(upstream: SocketAddr) -> World {
    let mut config = local_config();
    let route = config
        .routes
        .iter_mut()
        .find(|r| r.name == "api")
        .expect("api route");
    route.regions = meridian_config::RegionSet::List(vec!["us-east".into()]);
    route.default_region = Some("us-east".into());
    let world = World::start_following(config);
    let mut pushed = world.config.clone();
    let region = pushed
        .regions
        .iter_mut()
        .find(|r| r.name == "us-east")
        .expect("us-east");
    region.upstreams.truncate(1);
    region.upstreams[0].address = upstream.to_string();
    region.health.enabled = false;
    let version = world.push(&pushed, "a raw upstream");
    assert_eq!(world.wait_for_version(&world.edge, version), version);
    world
}

/// An upstream's response head reaches an HTTP/1.1 client as its fields, whether the edge passes
/// the lines on as they are or builds a map first: hop-by-hop fields dropped, the edge's own
/// fields once and the edge's, the origin's `Date` kept (one added when it sent none).
#[test]
fn upstream_response_fields_pass_on_with_the_edges_own() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
    let upstream_addr = upstream.local_addr().expect("upstream address");
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || loop {
                let Some(head) = read_request_head(&mut conn) else {
                    return;
                };
                let mut answer = String::from("HTTP/1.1 200 OK\r\n");
                if !head.starts_with("GET /no-date ") {
                    answer.push_str("Date: Mon, 30 Nov 2026 10:00:00 GMT\r\n");
                }
                if head.starts_with("GET /edge-named ") {
                    answer.push_str("X-Meridian-Pop: fake\r\nX-Meridian-Region: fake\r\n");
                }
                answer.push_str(
                    "X-Custom: A b\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n\
                     Content-Length: 2\r\n\r\nok",
                );
                if conn.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            });
        }
    });
    let world = world_with_raw_upstream(upstream_addr);
    for path in ["/verbatim", "/edge-named", "/no-date"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: api.example.test\r\n\r\n");
        let mut client = connect(world.edge.http_addr);
        client.write_all(request.as_bytes()).expect("send");
        let mut pending = Vec::new();
        let response = read_response(&mut client, &mut pending).expect("an answer");
        assert_eq!(response.status, 200, "{path}: {}", response.head);
        assert_eq!(response.body, b"ok", "{path}");
        assert_eq!(response.header("content-length"), Some("2"), "{path}");
        assert_eq!(response.header("x-custom"), Some("a b"), "{path}");
        assert_eq!(
            response.header("keep-alive"),
            None,
            "{path}: {}",
            response.head
        );
        assert_eq!(response.header("proxy-authenticate"), None, "{path}");
        assert_eq!(
            response.header("x-meridian-region"),
            Some("us-east"),
            "{path}"
        );
        for own in ["x-meridian-pop:", "x-meridian-region:", "date:"] {
            assert_eq!(
                response.head.matches(own).count(),
                1,
                "{path}: one {own} {}",
                response.head
            );
        }
        assert_ne!(response.header("x-meridian-pop"), Some("fake"), "{path}");
        let date = response.header("date").expect("a date");
        if path == "/no-date" {
            assert_ne!(date, "mon, 30 nov 2026 10:00:00 gmt", "the edge's own date");
        } else {
            assert_eq!(
                date, "mon, 30 nov 2026 10:00:00 gmt",
                "{path}: the origin's date"
            );
        }
    }
}

/// A WebSocket handshake (HTTP/1.1 `Upgrade`) is passed on to the upstream, its `101` comes back,
/// and from then on bytes flow both ways as they are, including what the client sent right
/// behind its head, until one side closes.
#[test]
fn websocket_upgrades_are_relayed_both_ways() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
    let upstream_addr = upstream.local_addr().expect("upstream address");
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let Some(head) = read_request_head(&mut conn) else {
                    return;
                };
                let head = head.to_ascii_lowercase();
                if !(head.contains("\r\nupgrade: websocket\r\n")
                    && head.contains("\r\nconnection: upgrade\r\n"))
                {
                    let _ =
                        conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                    return;
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                );
                let mut echo = [0u8; 1024];
                loop {
                    match conn.read(&mut echo) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&echo[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let world = world_with_raw_upstream(upstream_addr);

    let mut client = connect(world.edge.http_addr);
    client
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: api.example.test\r\nConnection: keep-alive, Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nearly",
        )
        .expect("send the handshake and early bytes");
    let mut pending = Vec::new();
    let response = read_response(&mut client, &mut pending).expect("the 101");
    assert_eq!(response.status, 101, "{}", response.head);
    assert_eq!(response.header("upgrade"), Some("websocket"));
    assert_eq!(response.header("connection"), Some("upgrade"));
    assert!(response.header("sec-websocket-accept").is_some());
    fill(&mut client, &mut pending, 5).expect("the early bytes echoed");
    assert_eq!(&pending[..5], b"early");
    pending.clear();
    client.write_all(b"frame-two").expect("send more");
    fill(&mut client, &mut pending, 9).expect("echoed");
    assert_eq!(&pending[..9], b"frame-two");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("client done");
    assert!(
        closed_by_edge(&mut client),
        "the tunnel ends when both sides are done"
    );

    // A plain request on the same route still works (and is not upgraded).
    let (response, _) = exchange(
        world.edge.http_addr,
        b"GET /plain HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        response.expect("answer").status,
        400,
        "the raw upstream refuses non-upgrades"
    );
}

/// One HTTP/2 frame, written by hand (RFC 9113 §4.1).
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

const H2_DATA_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_HEADERS: u8 = 0x1;
const H2_RST_STREAM: u8 = 0x3;
const H2_SETTINGS: u8 = 0x4;
const H2_GOAWAY: u8 = 0x7;
const H2_CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The HPACK block of `GET http://api.example.test/` (RFC 7541: static-table entries 2, 6 and
/// 4, then `:authority` as a literal with an indexed name).
fn h2_get_block() -> Vec<u8> {
    let host = b"api.example.test";
    let mut block = vec![
        0x82,
        0x86,
        0x84,
        0x41,
        u8::try_from(host.len()).expect("short"),
    ];
    block.extend_from_slice(host);
    block
}

/// Reads frames until the edge sends GOAWAY (its error code) or closes (`None`). Panics when the
/// edge holds the connection open past the safety timeout instead.
fn h2_goaway(stream: &mut TcpStream) -> Option<u32> {
    let mut pending = Vec::new();
    let fill = |stream: &mut TcpStream, pending: &mut Vec<u8>, want: usize| -> Option<()> {
        while pending.len() < want {
            let mut chunk = [0u8; 16384];
            match stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the edge held the connection open: {e}")
                }
                Err(_) => return None,
            }
        }
        Some(())
    };
    loop {
        fill(stream, &mut pending, 9)?;
        let len =
            usize::from(pending[0]) << 16 | usize::from(pending[1]) << 8 | usize::from(pending[2]);
        fill(stream, &mut pending, 9 + len)?;
        if pending[3] == H2_GOAWAY && len >= 8 {
            return Some(u32::from_be_bytes(
                pending[13..17].try_into().expect("4 bytes"),
            ));
        }
        pending.drain(..9 + len);
    }
}

/// HTTP/2 attacks on the edge's own HTTP/2 driver: a rapid-reset flood (CVE-2023-44487: streams
/// opened and cancelled at once, so the server does work the client never waits for) is cut off
/// with GOAWAY `ENHANCE_YOUR_CALM` before its streams reach an upstream in numbers, and a
/// CONTINUATION flood (a header block that never ends) is ended without being held. The edge keeps
/// serving other clients afterwards.
#[test]
fn http2_rapid_reset_and_continuation_floods_are_cut_off() {
    let world = World::start(local_config());
    let addr = world.edge.http_addr;
    let before = world.origin_requests();

    // Rapid reset: 500 requests, each cancelled right after it was sent, in one burst.
    const FLOOD: u32 = 500;
    let mut stream = connect(addr);
    let mut burst = H2_DATA_PREFACE.to_vec();
    burst.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
    let block = h2_get_block();
    for i in 0..FLOOD {
        let id = 2 * i + 1;
        burst.extend(h2_frame(H2_HEADERS, END_STREAM | END_HEADERS, id, &block));
        burst.extend(h2_frame(H2_RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    // The edge may close before it has read the whole burst.
    let _ = stream.write_all(&burst);
    assert_eq!(
        h2_goaway(&mut stream),
        Some(ENHANCE_YOUR_CALM),
        "a rapid-reset flood gets GOAWAY ENHANCE_YOUR_CALM"
    );
    let reached = world.origin_requests() - before;
    assert!(
        reached < u64::from(FLOOD / 5),
        "{reached} of {FLOOD} cancelled streams reached an upstream"
    );

    // CONTINUATION flood: one header block of 4 MiB, far past `max_header_bytes` (32 KiB), sent
    // from another thread while this one waits for the edge to end the connection.
    let mut stream = connect(addr);
    let mut writer = stream.try_clone().expect("clone the socket");
    let flood = std::thread::spawn(move || {
        let mut start = H2_DATA_PREFACE.to_vec();
        start.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
        start.extend(h2_frame(H2_HEADERS, END_STREAM, 1, &h2_get_block()));
        writer.write_all(&start)?;
        // Literal fields without indexing (`x-a: aaa…`), 16 KiB per frame, never END_HEADERS.
        let mut field = vec![0x00, 0x03];
        field.extend_from_slice(b"x-a");
        field.push(100);
        field.extend(std::iter::repeat_n(b'a', 100));
        let payload: Vec<u8> = field.iter().copied().cycle().take(105 * 156).collect();
        let frame = h2_frame(H2_CONTINUATION, 0, 1, &payload);
        for _ in 0..256 {
            writer.write_all(&frame)?;
        }
        Ok::<(), std::io::Error>(())
    });
    let ended = h2_goaway(&mut stream);
    assert!(
        ended.is_none_or(|code| code != 0),
        "a CONTINUATION flood ends with an error, not NO_ERROR: {ended:?}"
    );
    drop(stream);
    let _ = flood.join().expect("flood thread");
    assert_eq!(
        world.origin_requests() - before,
        reached,
        "nothing of the unfinished header block reached an upstream"
    );

    // Other clients are served as before.
    let (response, _) = exchange(
        addr,
        b"GET /after HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(response.map(|r| r.status), Some(200));
}
