//! Simulated regional origins for the demo and the tests: each answers JSON describing the request it
//! saw, and can be told to go down (refuse connections), come back up, or answer slowly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use meridian_config::Config;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::httpd;

/// Shared switches and counters for one origin.
pub struct OriginControl {
    /// Whether the origin is serving right now (follows `up` once the switch has taken effect).
    serving: watch::Sender<bool>,
    pub region: String,
    pub address: SocketAddr,
    up: watch::Sender<bool>,
    delay_ms: AtomicU64,
    requests: AtomicU64,
    /// Answer every (non-health) request with this status instead of 200 (0: normal).
    forced_status: AtomicU64,
    /// `/healthz` alternates pass/fail on each probe (a flapping origin).
    flap_health: std::sync::atomic::AtomicBool,
    health_probes: AtomicU64,
    /// The OpenAI-compatible model server on this origin (`model_server.rs`).
    pub model: Arc<crate::model_server::ModelControl>,
}

impl OriginControl {
    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
    /// [`set_up`](Self::set_up), then waits until the origin really is in that state: down means
    /// its listener and every connection are closed (nothing pooled upstream can still reach it).
    pub async fn set_up_and_settle(&self, up: bool) {
        let mut serving = self.serving.subscribe();
        self.set_up(up);
        let _ = serving.wait_for(|s| *s == up).await;
    }
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
    /// Requests this origin has answered (health checks excluded).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Answer requests with `status` (e.g. 503) while staying up and healthy; `None` restores 200.
    pub fn set_status(&self, status: Option<u16>) {
        self.forced_status
            .store(status.map_or(0, u64::from), Ordering::Relaxed);
    }
    pub fn set_flapping_health(&self, flap: bool) {
        self.flap_health.store(flap, Ordering::Relaxed);
    }
    /// Health probes answered so far.
    pub fn health_probes(&self) -> u64 {
        self.health_probes.load(Ordering::Relaxed)
    }
}

/// Origins of each region, by region name.
pub type Origins = BTreeMap<String, Vec<Arc<OriginControl>>>;

/// Starts an origin for every upstream of every region of `config`. With `ephemeral_ports`, each
/// binds its upstream's IP on a port the kernel picks and `config` is rewritten to the live
/// addresses, so parallel test processes do not collide; otherwise each binds the address as
/// written (the demo, whose tour names them).
pub async fn spawn_for(
    config: &mut Config,
    ephemeral_ports: bool,
    stop: watch::Receiver<bool>,
) -> std::io::Result<Origins> {
    let mut origins = Origins::new();
    for region in &mut config.regions {
        for upstream in &mut region.upstreams {
            let wanted: SocketAddr = upstream.address.parse().map_err(|_| {
                std::io::Error::other(format!(
                    "upstream {:?} of {} is no socket address",
                    upstream.address, region.name
                ))
            })?;
            let bind = match ephemeral_ports {
                true => SocketAddr::new(wanted.ip(), 0),
                false => wanted,
            };
            let control = spawn(&region.name, bind, stop.clone()).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("origin {bind} of {}: {e}", region.name))
            })?;
            upstream.address = control.address.to_string();
            origins
                .entry(region.name.clone())
                .or_default()
                .push(control);
        }
    }
    Ok(origins)
}

/// Binds `address` now (so the caller knows it is listening) and serves until `stop`.
pub async fn spawn(
    region: &str,
    address: SocketAddr,
    stop: watch::Receiver<bool>,
) -> std::io::Result<Arc<OriginControl>> {
    let listener = bind(address)?;
    let address = listener.local_addr()?;
    let control = Arc::new(OriginControl {
        region: region.to_string(),
        address,
        up: watch::channel(true).0,
        serving: watch::channel(true).0,
        delay_ms: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        forced_status: AtomicU64::new(0),
        flap_health: std::sync::atomic::AtomicBool::new(false),
        health_probes: AtomicU64::new(0),
        model: Arc::default(),
    });
    tokio::spawn(run(Arc::clone(&control), listener, stop));
    Ok(control)
}

fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

/// While up: serve. When switched down: close the listener (new connections are refused) and every
/// open connection, then wait to come back up on the same address.
async fn run(control: Arc<OriginControl>, first: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut listener = Some(first);
    let mut up = control.up.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        let current = match listener.take() {
            Some(l) => l,
            None => match bind(control.address) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("origin {} cannot rebind: {e}", control.address);
                    return;
                }
            },
        };
        // One stop signal for this "up" period: fires when going down or stopping for good.
        let (period_tx, period_rx) = watch::channel(false);
        control.serving.send_replace(true);
        let handler_control = Arc::clone(&control);
        let server = httpd::serve(
            current,
            move |req| {
                let control = Arc::clone(&handler_control);
                async move {
                    // Model calls go to the simulated model server, everything else to `handle`.
                    if crate::model_server::is_model_call(&req) && control.is_up() {
                        let (model, region) = (Arc::clone(&control.model), control.region.clone());
                        crate::model_server::handle(model, region, req).await
                    } else {
                        handle(control, req).await.map(|b| b.boxed())
                    }
                }
            },
            period_rx,
        );
        tokio::pin!(server);
        tokio::select! {
            _ = server.as_mut() => return,
            _ = up.wait_for(|u| !*u) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        period_tx.send_replace(true);
        server.await;
        control.serving.send_replace(false);
        tokio::select! {
            _ = up.wait_for(|u| *u) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn handle(
    control: Arc<OriginControl>,
    req: Request<hyper::body::Incoming>,
) -> hyper::Response<httpd::Body> {
    if req.uri().path() == "/healthz" {
        let n = control.health_probes.fetch_add(1, Ordering::Relaxed);
        if control.flap_health.load(Ordering::Relaxed) && n % 2 == 1 {
            return httpd::text(StatusCode::INTERNAL_SERVER_ERROR, "flap\n");
        }
        return httpd::text(StatusCode::OK, "ok\n");
    }
    let request_number = control.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let delay = control.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let (host, xff, proto, request_id) = (
        header("host"),
        header("x-forwarded-for"),
        header("x-forwarded-proto"),
        header("x-request-id"),
    );
    let shaping = ResponseShaping::from_query(req.uri().query().unwrap_or(""));
    let (accept_encoding, if_none_match) = (header("accept-encoding"), header("if-none-match"));
    let forwarded_host = header("x-forwarded-host");
    let traceparent = header("traceparent");
    // Hop-by-hop probes: a proxy must drop `x-hop` when a `Connection` header names it.
    let hop = header("x-hop");
    // `?stall=1`: never read the body nor answer — an upstream that stops reading the request.
    if query_value(req.uri().query(), "stall") == Some(1) {
        let _request = req;
        match std::future::pending::<std::convert::Infallible>().await {}
    }
    // `?answer_after=N`: answer as soon as N body bytes arrived, without waiting for the rest —
    // a test's proof that the edge streams request bodies instead of buffering them whole.
    if let Some(wanted) = query_value(req.uri().query(), "answer_after") {
        let mut body = req.into_body();
        let mut received = 0u64;
        while received < wanted {
            match body.frame().await {
                Some(Ok(frame)) => {
                    received += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                _ => break,
            }
        }
        return httpd::json(
            StatusCode::OK,
            &serde_json::json!({ "region": control.region, "received_before_answer": received }),
        );
    }
    let (body_bytes, body_sha256) = match req.into_body().collect().await {
        Ok(body) => {
            let body = body.to_bytes();
            // So a test can check a large upload arrived intact.
            let digest = <sha2::Sha256 as sha2::Digest>::digest(&body);
            (body.len(), format!("{digest:x}"))
        }
        Err(_) => return httpd::text(StatusCode::BAD_REQUEST, "bad body\n"),
    };
    let status = match control.forced_status.load(Ordering::Relaxed) {
        0 => StatusCode::OK,
        code => StatusCode::from_u16(code as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    let mut response = match shaping.bytes {
        Some(n) => httpd::respond(status, "application/octet-stream", pattern_body(n)),
        None => httpd::json(
            status,
            &serde_json::json!({
                "region": control.region,
                "upstream": control.address.to_string(),
                "method": method,
                "path": path,
                "host": host,
                "x_forwarded_for": xff,
                "x_forwarded_proto": proto,
                "x_request_id": request_id,
                "accept_encoding": accept_encoding,
                "x_forwarded_host": forwarded_host,
                "traceparent": traceparent,
                "x_hop": hop,
                "body_bytes": body_bytes,
                "body_sha256": body_sha256,
                "request": request_number,
            }),
        ),
    };
    shaping.apply(&mut response, if_none_match.as_deref());
    response
}

fn query_value(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}

/// `n` bytes of a fixed pattern (`i % 251`), so a test can check a large body arrived intact.
pub fn pattern_body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Response headers the tests and the demo ask for in the query string (values percent-decoded):
/// `cc=max-age%3D60` → `Cache-Control`, `tag=a,b` → `Cache-Tag`, `etag=v1` → `ETag: "v1"` (and
/// `304` when `If-None-Match` matches), `vary=accept-encoding` → `Vary`, `bytes=N` → an N-byte
/// body, `cookie=1` → `Set-Cookie`, `lm=<http-date>` → `Last-Modified`, `hop=1` → hop-by-hop
/// headers (`Connection: x-hop`, `X-Hop`, `Keep-Alive`).
#[derive(Default)]
struct ResponseShaping {
    headers: Vec<(http::HeaderName, String)>,
    etag: Option<String>,
    bytes: Option<usize>,
}

impl ResponseShaping {
    fn from_query(query: &str) -> Self {
        let mut out = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            let header = match name {
                "cc" => http::header::CACHE_CONTROL,
                "tag" => http::HeaderName::from_static("cache-tag"),
                "vary" => http::header::VARY,
                "lm" => http::header::LAST_MODIFIED,
                "cookie" => {
                    out.headers
                        .push((http::header::SET_COOKIE, format!("session={value}")));
                    continue;
                }
                "etag" => {
                    let etag = format!("\"{value}\"");
                    out.headers.push((http::header::ETAG, etag.clone()));
                    out.etag = Some(etag);
                    continue;
                }
                "bytes" => {
                    out.bytes = value.parse().ok();
                    continue;
                }
                // `hop=1`: hop-by-hop headers a proxy must not forward (`Connection` names one).
                "hop" => {
                    out.headers.push((http::header::CONNECTION, "x-hop".into()));
                    out.headers
                        .push((http::HeaderName::from_static("x-hop"), "secret".into()));
                    out.headers.push((
                        http::HeaderName::from_static("keep-alive"),
                        "timeout=5".into(),
                    ));
                    continue;
                }
                _ => continue,
            };
            out.headers.push((header, value));
        }
        out
    }

    fn apply(&self, response: &mut hyper::Response<httpd::Body>, if_none_match: Option<&str>) {
        for (name, value) in &self.headers {
            if let Ok(value) = http::HeaderValue::from_str(value) {
                response.headers_mut().append(name.clone(), value);
            }
        }
        let matched = match (&self.etag, if_none_match) {
            (Some(etag), Some(given)) => given
                .split(',')
                .any(|g| g.trim() == etag || g.trim() == "*"),
            _ => false,
        };
        if matched && response.status() == StatusCode::OK {
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            *response.body_mut() = httpd::Body::default();
            response.headers_mut().remove(http::header::CONTENT_TYPE);
        }
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
