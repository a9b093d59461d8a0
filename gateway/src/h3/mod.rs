//! The HTTP/3 front: quinn + h3 on UDP at the HTTPS address, beside Pingora (which has no HTTP/3
//! server). It is a thin adapter like `proxy/`: each request goes through the same routing core
//! (`client_ip`, `decide`, `pick_upstream`), the same snapshot store, limits, edge error bodies
//! and headers, and records the same request metrics; the upstream hop uses the shared HTTP/1.1
//! [`UpstreamClient`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use meridian_config::H3Limits;
use meridian_geoip::GeoIp;
use tokio::sync::watch;

use crate::clock;
use crate::core::client::client_ip;
use crate::core::select::{pick_upstream, region_verdict, RegionVerdict};
use crate::core::snapshot::InflightGuard;
use crate::core::{decide, Refusal, RequestView};
use crate::metrics::Protocol;
use crate::proxy::forward::{set_forwarding_headers, HEADER_POP, HEADER_REGION};
use crate::proxy::reply;
use crate::reload::{Loaded, SnapshotStore};
use crate::tls::{CertResolver, TlsError};
use crate::upstream_client::{Timeouts, UpstreamClient, UpstreamError};

type RequestStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Upper bound on tries per request, as in the TCP proxy.
const MAX_TRIES: usize = 10;

/// Hop-by-hop headers (RFC 9110 §7.6.1) are never forwarded, in either direction; HTTP/3 forbids
/// them on its side anyway.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
];

/// What every connection task shares.
struct Shared {
    store: Arc<SnapshotStore>,
    geoip: Arc<GeoIp>,
    upstream: UpstreamClient,
    rotation: AtomicUsize,
}

/// A running HTTP/3 front. `shutdown` sends GOAWAY on every connection and waits for in-flight
/// requests (bounded), then closes the endpoint.
pub struct H3Front {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    done: Option<std::sync::mpsc::Receiver<()>>,
}

/// Binds the UDP socket now (so the caller knows it listens) and serves on `runtime`.
pub fn start(
    runtime: &tokio::runtime::Handle,
    addr: SocketAddr,
    resolver: Arc<CertResolver>,
    limits: &H3Limits,
    store: Arc<SnapshotStore>,
    geoip: Arc<GeoIp>,
    drain: Duration,
) -> Result<H3Front, std::io::Error> {
    let tls = crate::tls::quic_server_config(resolver).map_err(io_error)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| io_error(TlsError::Setup(e.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(limits.max_streams.into());
    // HTTP/3 control and QPACK streams (three per side), plus room for extensions we ignore.
    transport.max_concurrent_uni_streams(16u32.into());
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(limits.idle_timeout.as_duration())
            .map_err(|e| io_error(TlsError::Setup(e.to_string())))?,
    ));
    config.transport_config(Arc::new(transport));
    let socket = std::net::UdpSocket::bind(addr)?;
    let endpoint = {
        let _guard = runtime.enter();
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?
    };
    let addr = endpoint.local_addr()?;
    let shared = Arc::new(Shared {
        store,
        geoip,
        upstream: UpstreamClient::default(),
        rotation: AtomicUsize::new(0),
    });
    let (stop, stop_rx) = watch::channel(false);
    let (done_tx, done) = std::sync::mpsc::channel();
    let max_connections = limits.max_connections;
    runtime.spawn(async move {
        serve(endpoint, shared, max_connections, stop_rx, drain).await;
        let _ = done_tx.send(());
    });
    Ok(H3Front {
        addr,
        stop,
        done: Some(done),
    })
}

impl H3Front {
    /// GOAWAY to every client, then wait (at most `drain` plus a little) for in-flight requests.
    pub fn shutdown(&mut self, wait: bool) {
        self.stop.send_replace(true);
        if let (true, Some(done)) = (wait, self.done.take()) {
            let _ = done.recv_timeout(Duration::from_secs(30));
        }
    }
}

impl Drop for H3Front {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn io_error(e: TlsError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(incoming) = incoming else { break };
        if endpoint.open_connections() >= max_connections {
            incoming.refuse();
            continue;
        }
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        connections.spawn(async move {
            match incoming.await {
                Ok(conn) => serve_connection(conn, shared, stop).await,
                Err(e) => tracing::debug!("QUIC handshake failed: {e}"),
            }
        });
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    // Shutting down: connections have sent GOAWAY and finish their requests, within `drain`.
    let _ = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    endpoint.close(quinn::VarInt::from_u32(0x100), b"shutting down"); // H3_NO_ERROR
    endpoint.wait_idle().await;
}

async fn serve_connection(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = shared.store.metrics();
    metrics.tls.quic_connections.inc();
    let _open = GaugeGuard(metrics.tls.quic_connections.clone());
    metrics
        .tls
        .handshakes
        .with_label_values(&["TLSv1.3", "h3"])
        .inc();
    let peer = conn.remote_address().ip();
    // Advertise room above the edge limit (RFC 9114 counts 32 bytes per field on top of names and
    // values) so that an oversized request reaches our own check and gets the same 431 as h1/h2,
    // instead of being refused by the client library; QPACK decoding stays bounded by this.
    let limits = shared.store.load().snapshot.limits.clone();
    let max_field_section_size =
        (limits.max_header_bytes as u64 + 32 * limits.max_headers as u64).saturating_mul(2);
    let mut h3conn = match h3::server::builder()
        .max_field_section_size(max_field_section_size)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("HTTP/3 setup with {peer}: {e}");
            return;
        }
    };
    let mut requests = tokio::task::JoinSet::new();
    let mut closing = false;
    loop {
        let next = tokio::select! {
            next = h3conn.accept() => next,
            changed = stop.changed(), if !closing => {
                let stopping = changed.is_err() || *stop.borrow();
                if !stopping {
                    continue;
                }
                closing = true;
                // GOAWAY: no new requests; those accepted so far complete.
                if let Err(e) = h3conn.shutdown(0).await {
                    tracing::debug!("GOAWAY to {peer}: {e}");
                }
                continue;
            }
        };
        match next {
            Ok(Some(resolver)) => {
                let shared = Arc::clone(&shared);
                requests.spawn(async move {
                    match resolver.resolve_request().await {
                        Ok((req, stream)) => handle(req, stream, &shared, peer).await,
                        Err(e) => tracing::debug!("HTTP/3 request from {peer}: {e}"),
                    }
                });
                while requests.try_join_next().is_some() {}
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("HTTP/3 connection with {peer}: {e}");
                break;
            }
        }
    }
    while requests.join_next().await.is_some() {}
}

struct GaugeGuard(prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One request, start to end; records its metrics whatever happens.
async fn handle(req: Request<()>, mut stream: RequestStream, shared: &Shared, peer: IpAddr) {
    let started = Instant::now();
    let loaded = shared.store.load();
    let mut outcome = Outcome::default();
    let status =
        match route_and_forward(&req, &mut stream, shared, &loaded, peer, &mut outcome).await {
            Ok(status) => status,
            Err(status) => status,
        };
    let _ = stream.finish().await;
    loaded
        .metrics
        .request(outcome.route, outcome.region)
        .observe(Protocol::H3, status, started.elapsed().as_secs_f64());
}

/// What the metrics need to know about a finished request.
#[derive(Default)]
struct Outcome {
    route: Option<usize>,
    region: Option<usize>,
}

/// Returns the status sent (0: the client went away before a response).
async fn route_and_forward(
    req: &Request<()>,
    stream: &mut RequestStream,
    shared: &Shared,
    loaded: &Loaded,
    peer: IpAddr,
    outcome: &mut Outcome,
) -> Result<u16, u16> {
    let snapshot = &loaded.snapshot;
    if let Some(refusal) = reply::check_header_limits(req.headers(), &snapshot.limits) {
        return send_error(stream, loaded, None, refusal.status, refusal.message).await;
    }
    let Some(host) = request_host(req) else {
        return send_error(stream, loaded, None, 400, "request has no Host").await;
    };
    let forwarded = req
        .headers()
        .get_all(crate::proxy::forward::X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let client = client_ip(peer, forwarded, &snapshot.trusted_proxies);
    let view = RequestView {
        host,
        path: req.uri().path(),
        client,
    };
    let decision = match decide(
        snapshot,
        &view,
        |ip| shared.geoip.lookup(ip),
        clock::now_ms(),
    ) {
        Ok(decision) => decision,
        Err(refusal) => {
            let message = reply::refusal_message(snapshot, &refusal);
            outcome.route = match refusal {
                Refusal::Residency { route, .. } => Some(route),
                _ => None,
            };
            return send_error(stream, loaded, None, refusal.status(), &message).await;
        }
    };
    outcome.route = Some(decision.route);
    let route = &snapshot.routes[decision.route];

    // The body is read whole (bounded by the edge limit) so that a connect failure can be retried
    // on another upstream with the same bytes.
    let body = match read_body(stream, snapshot.limits.max_body_bytes).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            return send_error(stream, loaded, None, 413, reply::error_message(413)).await;
        }
        Err(BodyError::Client) => return Err(0),
    };

    let mut headers = forwardable(req.headers());
    if let Ok(value) = HeaderValue::from_str(host) {
        headers.insert(http::header::HOST, value);
    }
    set_forwarding_headers(&mut headers, client, "https");
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();

    let timeouts = Timeouts {
        connect: route.connect_timeout,
        read: route.read_timeout,
    };
    let budget = (route.retry_attempts as usize).clamp(1, MAX_TRIES);
    let mut tried: Vec<(usize, usize)> = Vec::with_capacity(budget);
    let mut region_pos = 0;
    while let Some(region_index) = decision.candidates.get(region_pos) {
        let region = &snapshot.regions[region_index];
        let now = clock::now_ms();
        let picked = (region_verdict(region, now) == RegionVerdict::Available
            && tried.len() < budget)
            .then(|| {
                let rotation = shared.rotation.fetch_add(1, Ordering::Relaxed);
                pick_upstream(region, now, rotation, |u| {
                    tried.contains(&(region_index, u))
                })
            })
            .flatten();
        let Some(upstream_index) = picked else {
            if tried.len() >= budget {
                break;
            }
            region_pos += 1;
            continue;
        };
        tried.push((region_index, upstream_index));
        outcome.region = Some(region_index);
        let upstream = &region.upstreams[upstream_index];
        let _region_inflight = region.state.begin();
        let _inflight: InflightGuard = upstream.state.begin();
        let mut builder = Request::builder()
            .method(req.method().clone())
            .uri(path_and_query.as_str());
        if let Some(h) = builder.headers_mut() {
            *h = headers.clone();
        }
        let Ok(request) = builder.body(Full::new(body.clone())) else {
            return send_error(stream, loaded, None, 400, "bad request").await;
        };
        let attempts = loaded.metrics.attempts.get(region_index);
        match shared
            .upstream
            .send(upstream.address, request, timeouts)
            .await
        {
            Ok(response) => {
                if let Some(series) = attempts {
                    series.ok.inc();
                }
                upstream.state.record_success();
                return relay(stream, loaded, region_index, response).await;
            }
            Err(e) if e.is_connect() => {
                if let Some(series) = attempts {
                    series.connect_error.inc();
                }
                upstream.state.record_failure(now, &region.outlier);
                tracing::debug!("HTTP/3 request: {e}; trying the next upstream");
            }
            Err(e) => {
                if let Some(series) = attempts {
                    series.ok.inc();
                }
                let status = if matches!(e, UpstreamError::Timeout { .. }) {
                    504
                } else {
                    502
                };
                return send_error(
                    stream,
                    loaded,
                    Some(region_index),
                    status,
                    reply::error_message(status),
                )
                .await;
            }
        }
    }
    let status = if tried.is_empty() { 503 } else { 502 };
    send_error(
        stream,
        loaded,
        outcome.region,
        status,
        reply::error_message(status),
    )
    .await
}

/// `:authority`, else `Host`.
fn request_host(req: &Request<()>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        })
        .filter(|h| !h.is_empty())
}

fn forwardable(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len() + 4);
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

enum BodyError {
    TooLarge,
    Client,
}

async fn read_body(stream: &mut RequestStream, limit: u64) -> Result<Bytes, BodyError> {
    let mut body = Vec::new();
    loop {
        match stream.recv_data().await {
            Ok(Some(mut chunk)) => {
                if (body.len() + chunk.remaining()) as u64 > limit {
                    return Err(BodyError::TooLarge);
                }
                while chunk.has_remaining() {
                    let part = chunk.chunk();
                    body.extend_from_slice(part);
                    let n = part.len();
                    chunk.advance(n);
                }
            }
            Ok(None) => return Ok(Bytes::from(body)),
            Err(e) => {
                tracing::debug!("HTTP/3 request body: {e}");
                return Err(BodyError::Client);
            }
        }
    }
}

/// Streams the upstream response to the client with the edge's headers.
async fn relay(
    stream: &mut RequestStream,
    loaded: &Loaded,
    region: usize,
    mut upstream: crate::upstream_client::UpstreamResponse,
) -> Result<u16, u16> {
    let snapshot = &loaded.snapshot;
    let status = upstream.head.status;
    let mut response = Response::builder().status(status);
    if let Some(headers) = response.headers_mut() {
        *headers = forwardable(&upstream.head.headers);
        if let Some(r) = snapshot.regions.get(region) {
            headers.insert(HEADER_REGION, r.header.clone());
        }
        headers.insert(HEADER_POP, snapshot.pop_header.clone());
    }
    let Ok(response) = response.body(()) else {
        return Err(502);
    };
    if stream.send_response(response).await.is_err() {
        return Err(0);
    }
    loop {
        match upstream.next_chunk().await {
            Ok(Some(chunk)) => {
                if stream.send_data(chunk).await.is_err() {
                    return Err(0);
                }
            }
            Ok(None) => return Ok(status.as_u16()),
            Err(e) => {
                // Headers are gone already: all we can do is cut the stream.
                tracing::debug!("HTTP/3 response body: {e}");
                stream.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return Ok(status.as_u16());
            }
        }
    }
}

/// The edge's own answer: same JSON body and headers as the TCP front.
async fn send_error(
    stream: &mut RequestStream,
    loaded: &Loaded,
    region: Option<usize>,
    status: u16,
    message: &str,
) -> Result<u16, u16> {
    let snapshot = &loaded.snapshot;
    let body = reply::error_body(snapshot, status, message);
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len());
    if let Some(headers) = response.headers_mut() {
        headers.insert(HEADER_POP, snapshot.pop_header.clone());
        if let Some(r) = region.and_then(|r| snapshot.regions.get(r)) {
            headers.insert(HEADER_REGION, r.header.clone());
        }
    }
    let Ok(response) = response.body(()) else {
        return Err(500);
    };
    if stream.send_response(response).await.is_err() || stream.send_data(body).await.is_err() {
        return Err(0);
    }
    Ok(status)
}
