//! The HTTP/3 front: quinn + h3 on UDP at the HTTPS address, beside Pingora (which has no HTTP/3
//! server). It is a thin adapter like `proxy/`: each request goes through the same routing core
//! (`client_ip`, `decide`, `pick_upstream`), the same snapshot store, limits, edge error bodies
//! and headers, and records the same request metrics; the upstream hop uses the shared HTTP/1.1
//! [`UpstreamClient`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use meridian_config::{H3Limits, RouteKind};
use meridian_geoip::GeoIp;
use tokio::sync::watch;

use crate::cache::{
    Admission, CacheRequest, CacheStatus, CacheWriter, Lookup, Served, Ticket, HEADER_CACHE,
};
use crate::clock;
use crate::core::client::client_ip;
use crate::core::snapshot::InflightGuard;
use crate::core::state::RegionGuard;
use crate::core::{decide, Refusal, RequestView, RouteDecision};
use crate::inference::openai::ApiError;
use crate::inference::{Entry, InferenceCtx, InferenceState};
use crate::metrics::Protocol;
use crate::proxy::cached::EdgeCache;
use crate::proxy::forward::{set_forwarding_headers, HEADER_POP, HEADER_REGION};
use crate::proxy::{reply, retry};
use crate::reload::{Loaded, SnapshotStore};
use crate::tls::{CertResolver, TlsError};
use crate::upstream_client::{BodyFeed, Timeouts, UpstreamBody, UpstreamClient, UpstreamResponse};

type RequestStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Request bodies up to this size are held whole, so a failed try can be replayed elsewhere (the
/// size of Pingora's retry buffer on the TCP front); longer ones stream to the upstream.
const REPLAY_BYTES: u64 = 64 * 1024;

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
    /// The same response cache instance as the TCP front (issue 6).
    cache: Option<Arc<EdgeCache>>,
    /// The same inference limits and metrics as the TCP front (issue 8).
    inference: Arc<InferenceState>,
}

/// What the HTTP/3 front shares with the TCP front: snapshot store, GeoIP, the response cache
/// and the inference state — one instance of each per edge, so both fronts behave the same.
pub struct Services {
    pub(crate) store: Arc<SnapshotStore>,
    pub(crate) geoip: Arc<GeoIp>,
    pub(crate) cache: Option<Arc<EdgeCache>>,
    pub(crate) inference: Arc<InferenceState>,
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
    services: Services,
    drain: Duration,
) -> Result<H3Front, std::io::Error> {
    let Services {
        store,
        geoip,
        cache,
        inference,
    } = services;
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
        cache,
        inference,
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

/// Per-request state, like the TCP front's `RequestCtx`: what the metrics, the failover counter
/// and the inference usage need once the request ends.
#[derive(Default)]
struct RequestState {
    route: Option<usize>,
    /// Region of the current (or last) upstream try.
    region: Option<usize>,
    decision: Option<RouteDecision>,
    /// Why the last try was retried (for `meridian_failovers_total`).
    retry_reason: Option<&'static str>,
    /// Counts the request in its region's in-flight total (`max_inflight`) while it runs.
    region_inflight: Option<RegionGuard>,
    inference: Option<Box<InferenceCtx>>,
    /// Access-log facts (issue 11); `None` unless this request is logged.
    access: Option<Box<crate::access_log::UpstreamSide>>,
    /// Body bytes relayed from an upstream (counted only when the request is logged).
    bytes_sent: u64,
    /// `x-meridian-cache` of a relayed upstream response.
    cache: Option<CacheStatus>,
}

/// The response-cache side of a request that goes upstream.
#[derive(Default)]
struct CacheFetch {
    status: Option<CacheStatus>,
    ticket: Option<Ticket>,
}

/// One request, start to end; records its metrics whatever happens.
async fn handle(req: Request<()>, mut stream: RequestStream, shared: &Shared, peer: IpAddr) {
    let started = Instant::now();
    let loaded = shared.store.load();
    let mut state = RequestState::default();
    if crate::access_log::sampled(&loaded.snapshot.config.edge.access_log) {
        state.access = Some(Box::default());
    }
    let status = match route_and_forward(
        &req,
        &mut stream,
        shared,
        &loaded,
        peer,
        &mut state,
        started,
    )
    .await
    {
        Ok(status) => status,
        Err(status) => status,
    };
    let _ = stream.finish().await;
    state.region_inflight = None;
    let snapshot = &loaded.snapshot;
    if let Some(inference) = state.inference.take() {
        shared
            .inference
            .finish(snapshot, state.region, status, &inference);
    }
    if let (Some(decision), Some(served)) = (state.decision, state.region) {
        retry::count_failover(
            snapshot,
            &shared.store.metrics().health,
            &decision,
            served,
            state.retry_reason,
        );
    }
    loaded.metrics.request(state.route, state.region).observe(
        Protocol::H3,
        status,
        started.elapsed().as_secs_f64(),
    );
    if let Some(mut side) = state.access.take() {
        side.fill_from_client(req.headers());
        let country = state.decision.and_then(|d| d.country);
        // Bytes are counted where the h3 front relays an upstream body; the edge's own answers
        // and cache hits are not measured here (`bytes_sent: null`).
        let relayed = side.first_byte.is_some() && state.cache != Some(CacheStatus::Hit);
        crate::access_log::emit(&crate::access_log::Entry {
            protocol: Protocol::H3,
            method: req.method().as_str(),
            host: request_host(&req),
            path: req.uri().path(),
            status,
            country: country.as_ref().map(|c| c.as_str()),
            route: state
                .route
                .and_then(|r| snapshot.routes.get(r))
                .map(|r| r.name.as_str()),
            region: state
                .region
                .and_then(|r| snapshot.regions.get(r))
                .map(|r| r.name.as_str()),
            bytes_sent: relayed.then_some(state.bytes_sent),
            cache: state.cache.map(|c| c.as_str()),
            total: started.elapsed(),
            side: &side,
        });
    }
}

/// Returns the status sent (0: the client went away before a response).
async fn route_and_forward(
    req: &Request<()>,
    stream: &mut RequestStream,
    shared: &Shared,
    loaded: &Arc<Loaded>,
    peer: IpAddr,
    state: &mut RequestState,
    started: Instant,
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
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let cache_view = CacheRequest {
        method: req.method(),
        scheme: "https",
        host,
        path_and_query,
        headers: req.headers(),
    };
    let mut decision = match decide(
        snapshot,
        &view,
        |ip| shared.geoip.lookup(ip),
        clock::now_ms(),
    ) {
        Ok(decision) => decision,
        Err(refusal) => {
            let message = reply::refusal_message(snapshot, &refusal);
            state.route = match refusal {
                Refusal::Residency { route, .. } | Refusal::Unavailable { route, .. } => {
                    Some(route)
                }
                _ => None,
            };
            if let (Refusal::Unavailable { route, .. }, Some(cache)) = (refusal, &shared.cache) {
                // stale-if-error when no region can even be tried (issue 6).
                if let Some(served) =
                    stale_when_unavailable(cache, loaded, route, &cache_view).await
                {
                    return write_served(stream, loaded, &served).await;
                }
            }
            let retry_after = matches!(refusal, Refusal::Unavailable { .. });
            return send_error_with(
                stream,
                loaded,
                None,
                refusal.status(),
                &message,
                retry_after,
            )
            .await;
        }
    };
    state.route = Some(decision.route);
    state.decision = Some(decision);
    let route = &snapshot.routes[decision.route];

    // Issue 8: model calls pick regions by the model in their body and are never cached; other
    // requests on cache-enabled routes go through the response cache (issue 6).
    let mut body = None;
    let mut cache = CacheFetch::default();
    let inference_entry = (route.kind == RouteKind::Inference).then(|| {
        crate::inference::entry(
            snapshot,
            decision.route,
            req.method(),
            req.uri().path(),
            req.headers().get(http::header::AUTHORIZATION),
        )
    });
    match inference_entry {
        Some(Entry::Refused(error)) => return send_api_error(stream, loaded, &error).await,
        Some(Entry::Models(json)) => {
            return send_json(stream, loaded, 200, None, json).await;
        }
        Some(Entry::ModelCall {
            key,
            max_body_bytes,
        }) => {
            let declared = declared_length(req.headers());
            let read = match declared {
                Some(len) if len > max_body_bytes => Err(BodyError::TooLarge),
                _ => read_body(stream, max_body_bytes, route.read_timeout).await,
            };
            let call_body = match read {
                Ok(b) => b,
                Err(BodyError::TooLarge) => {
                    let error = crate::inference::body_too_large(max_body_bytes);
                    return send_api_error(stream, loaded, &error).await;
                }
                Err(BodyError::Client) => return Err(0),
            };
            match shared.inference.route_call(
                snapshot,
                decision,
                key,
                &view,
                &shared.geoip,
                started,
                &call_body,
            ) {
                Ok((model_decision, ctx)) => {
                    decision = model_decision;
                    state.decision = Some(decision);
                    state.inference = Some(ctx);
                }
                Err((error, ctx)) => {
                    state.inference = ctx;
                    return send_api_error(stream, loaded, &error).await;
                }
            }
            body = Some(call_body);
        }
        Some(Entry::Pass) | None => {
            let lookup = match &shared.cache {
                Some(edge_cache) => {
                    edge_cache
                        .lookup_request(loaded, decision.route, &cache_view)
                        .await
                }
                None => None,
            };
            match lookup {
                Some((Lookup::Hit(served), _)) => {
                    return write_served(stream, loaded, &served).await;
                }
                Some((Lookup::Stale { served, refresh }, target)) => {
                    if let (Some(ticket), Some((host, path)), Some(edge_cache)) =
                        (refresh, target, &shared.cache)
                    {
                        edge_cache.spawn_refresh(ticket, Arc::clone(loaded), decision, host, path);
                    }
                    return write_served(stream, loaded, &served).await;
                }
                Some((Lookup::Fetch(ticket), _)) => {
                    cache.status = Some(ticket.status());
                    cache.ticket = Some(ticket);
                }
                Some((Lookup::Bypass(_), _)) => cache.status = Some(CacheStatus::Bypass),
                None => {}
            }
        }
    }

    // Bodies up to REPLAY_BYTES are read whole, so a failed try can be replayed on another
    // upstream; a longer body streams to the upstream as the client sends it (as on TCP).
    let limit = snapshot.limits.max_body_bytes;
    let (body, streamed_rest) = match body {
        Some(body) => (RequestBody::Whole(body), None),
        None => {
            if declared_length(req.headers()).is_some_and(|len| len > limit) {
                return send_error(stream, loaded, None, 413, reply::error_message(413)).await;
            }
            match read_head(stream, REPLAY_BYTES.min(limit), limit, route.read_timeout).await {
                Ok((head, false)) => (RequestBody::Whole(head), None),
                Ok((head, true)) => {
                    let (feed, tx) = BodyFeed::channel();
                    let read = head.len() as u64;
                    let too_large = Arc::new(AtomicBool::new(false));
                    let streamed = RequestBody::Streamed {
                        head,
                        feed,
                        too_large: Arc::clone(&too_large),
                    };
                    (streamed, Some((tx, read, too_large)))
                }
                Err(BodyError::TooLarge) => {
                    return send_error(stream, loaded, None, 413, reply::error_message(413)).await;
                }
                Err(BodyError::Client) => return Err(0),
            }
        }
    };

    let mut headers = forwardable(req.headers());
    if let Ok(value) = HeaderValue::from_str(host) {
        headers.insert(http::header::HOST, value);
    }
    set_forwarding_headers(&mut headers, client, "https");
    if let Some(access) = state.access.as_deref_mut() {
        access.note_upstream_headers(&headers);
    }
    if let Some(ticket) = cache.ticket.as_ref() {
        // A leader fetches the full response for everyone; a revalidation asks with the stored
        // validators.
        if ticket.fetches_for_others() {
            headers.remove(http::header::IF_NONE_MATCH);
            headers.remove(http::header::IF_MODIFIED_SINCE);
        }
        for (name, value) in ticket.conditional_headers() {
            headers.insert(name, value);
        }
    }

    let forward = Forward {
        method: req.method(),
        path_and_query,
        headers: &headers,
        body: &body,
        decision: &decision,
        started,
    };
    let tries = try_upstreams(&forward, shared, loaded, state);
    let outcome = match streamed_rest {
        None => tries.await,
        Some((tx, read, too_large)) => {
            // The client's remaining body is read while the tries run, in this task: the pump
            // borrows the stream until the upstream answered (or gave up), then it is dropped.
            let pump = pump_body(stream, tx, read, limit, route.read_timeout, &too_large);
            tokio::pin!(tries);
            tokio::pin!(pump);
            let mut pumping = true;
            loop {
                tokio::select! {
                    outcome = &mut tries => break outcome,
                    () = &mut pump, if pumping => pumping = false,
                }
            }
        }
    };
    let failure = match outcome {
        Ok((response, inflight)) => {
            let edge_cache = shared.cache.as_deref();
            return relay(stream, loaded, state, edge_cache, cache, response, inflight).await;
        }
        Err(status) => status,
    };
    // stale-if-error: every region failed; a stale entry may answer instead.
    if let Some(served) = cache
        .ticket
        .take()
        .and_then(|t| t.stale_on_error(SystemTime::now()))
    {
        return write_served(stream, loaded, &served).await;
    }
    let region = state.region.filter(|_| failure != 503);
    send_error_with(
        stream,
        loaded,
        region,
        failure,
        reply::error_message(failure),
        failure == 503,
    )
    .await
}

/// The request as every upstream try sends it.
struct Forward<'a> {
    method: &'a http::Method,
    path_and_query: &'a str,
    headers: &'a HeaderMap,
    body: &'a RequestBody,
    decision: &'a RouteDecision,
    started: Instant,
}

/// Tries upstreams in candidate order under the shared retry rules (`proxy::retry`) until one
/// answers with a response to relay; else the status of the edge's own answer (503 when nothing
/// could be tried, 504 on a timeout, 502 otherwise).
async fn try_upstreams(
    forward: &Forward<'_>,
    shared: &Shared,
    loaded: &Loaded,
    state: &mut RequestState,
) -> Result<(UpstreamResponse, InflightGuard), u16> {
    let snapshot = &loaded.snapshot;
    let decision = forward.decision;
    let route = &snapshot.routes[decision.route];
    let health = &shared.store.metrics().health;
    let timeouts = Timeouts {
        connect: route.connect_timeout,
        read: route.read_timeout,
    };
    let idempotent = forward.method.is_idempotent();
    let mut tried: Vec<(u16, u16)> = Vec::with_capacity(retry::MAX_TRIES);
    let mut region_pos = 0;
    let mut failure = 502;
    loop {
        if !tried.is_empty() && forward.started.elapsed() >= route.total_timeout {
            return Err(504); // the overall deadline (timeouts.total) passed: no new try
        }
        let now = clock::now_ms();
        let rotation = shared.rotation.fetch_add(1, Ordering::Relaxed);
        let Some((region_index, upstream_index)) = retry::next_upstream(
            snapshot,
            decision,
            &mut region_pos,
            &tried,
            rotation,
            now,
            &mut state.retry_reason,
        ) else {
            // Nothing tried: every region went down or filled up since the decision.
            return Err(if tried.is_empty() { 503 } else { failure });
        };
        let region = &snapshot.regions[region_index];
        let upstream = &region.upstreams[upstream_index];
        tried.push((region_index as u16, upstream_index as u16));
        if state.region != Some(region_index) {
            region.state.budget.note_request(now);
            state.region_inflight = Some(region.state.begin());
        }
        state.region = Some(region_index);
        let inflight = upstream.state.begin();
        let mut builder = Request::builder()
            .method(forward.method.clone())
            .uri(forward.path_and_query);
        if let Some(h) = builder.headers_mut() {
            *h = forward.headers.clone();
        }
        let Some(body) = forward.body.for_try() else {
            return Err(failure); // a streamed body already went (partly) to an upstream
        };
        let Ok(request) = builder.body(body) else {
            return Err(400);
        };
        let attempts = loaded.metrics.attempts.get(region_index);
        if let Some(access) = state.access.as_deref_mut() {
            access.upstream = Some(upstream.address);
        }
        let result = shared
            .upstream
            .send(upstream.address, request, timeouts)
            .await;
        let may_retry = |refused: bool| {
            if !forward.body.replayable() {
                return false;
            }
            let tries = retry::Tries {
                decision,
                started: forward.started,
                tried: &tried,
                region: Some(region_index),
                region_pos,
            };
            retry::may_retry(snapshot, &tries, refused)
        };
        let record_failure = || {
            if upstream
                .state
                .record_failure(clock::now_ms(), &region.outlier)
            {
                tracing::warn!(region = %region.name, upstream = %upstream.address, "upstream ejected after consecutive failures");
                health.ejections.with_label_values(&[&region.name]).inc();
            }
        };
        match result {
            Ok(response) => {
                if let Some(access) = state.access.as_deref_mut() {
                    access.first_byte = Some(forward.started.elapsed());
                }
                if let Some(series) = attempts {
                    series.ok.inc();
                }
                let status = response.head.status.as_u16();
                if status >= 500 {
                    record_failure();
                } else {
                    upstream.state.record_success();
                }
                // Issue 8: a model server's 429/503 refuses the work, so even a POST may go on.
                let inference_refused = state.inference.is_some()
                    && crate::inference::refused_status(
                        snapshot,
                        Some(region_index),
                        status,
                        &response.head.headers,
                        clock::now_ms(),
                    );
                let retryable = route.retry_on_status.contains(&status) || inference_refused;
                let may_replay = idempotent || route.retry_non_idempotent || inference_refused;
                if retryable && may_replay && may_retry(false) {
                    retry::count_retry(snapshot, health, decision.route, "status");
                    state.retry_reason = Some("status");
                    continue;
                }
                return Ok((response, inflight));
            }
            Err(e) if e.is_connect() => {
                if let Some(series) = attempts {
                    series.connect_error.inc();
                }
                record_failure();
                failure = if e.is_timeout() { 504 } else { 502 };
                // The upstream never saw the request: retrying elsewhere is safe for any method.
                if may_retry(e.is_refused()) {
                    let reason = if e.is_timeout() {
                        "timeout"
                    } else {
                        "connect_error"
                    };
                    retry::count_retry(snapshot, health, decision.route, reason);
                    state.retry_reason = Some(reason);
                    tracing::debug!("HTTP/3 request: {e}; trying the next upstream");
                    continue;
                }
                return Err(failure);
            }
            Err(_) if forward.body.client_failed() => {
                // The client's body broke off (or outgrew the limit): not the upstream's fault.
                return Err(forward.body.client_failure_status());
            }
            Err(e) => {
                if let Some(series) = attempts {
                    series.ok.inc();
                }
                record_failure();
                failure = if e.is_timeout() { 504 } else { 502 };
                // The upstream may have seen the request: replay only what may be replayed.
                let may_replay = idempotent || route.retry_non_idempotent;
                if may_replay && may_retry(false) {
                    let reason = if e.is_timeout() {
                        "timeout"
                    } else {
                        "upstream_error"
                    };
                    retry::count_retry(snapshot, health, decision.route, reason);
                    state.retry_reason = Some(reason);
                    tracing::debug!("HTTP/3 request: {e}; trying the next upstream");
                    continue;
                }
                return Err(failure);
            }
        }
    }
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

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
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

/// The request body as the upstream tries send it.
enum RequestBody {
    /// Read whole: every try sends the same bytes.
    Whole(Bytes),
    /// The first bytes, then the rest as the client sends it; replayable until a streamed chunk
    /// went out.
    Streamed {
        head: Bytes,
        feed: Arc<BodyFeed>,
        /// The client sent more than `max_body_bytes`.
        too_large: Arc<AtomicBool>,
    },
}

impl RequestBody {
    /// The body for the next try; `None` once a streamed body cannot be sent again.
    fn for_try(&self) -> Option<UpstreamBody> {
        match self {
            RequestBody::Whole(bytes) => Some(UpstreamBody::full(bytes.clone())),
            RequestBody::Streamed { head, feed, .. } => {
                (!feed.is_consumed()).then(|| UpstreamBody::streamed(head.clone(), feed))
            }
        }
    }

    fn replayable(&self) -> bool {
        match self {
            RequestBody::Whole(_) => true,
            RequestBody::Streamed { feed, .. } => !feed.is_consumed(),
        }
    }

    /// A streamed body failed on the client's side (reset, stalled, too large).
    fn client_failed(&self) -> bool {
        matches!(self, RequestBody::Streamed { feed, .. } if feed.client_failed())
    }

    fn client_failure_status(&self) -> u16 {
        match self {
            RequestBody::Streamed { too_large, .. } if too_large.load(Ordering::Acquire) => 413,
            _ => 400,
        }
    }
}

/// Reads the body until it ends (`(body, false)`) or passes `keep` bytes (`(head, true)`: more
/// follows); at most `limit` bytes in all; `read_timeout` bounds the wait for each chunk.
async fn read_head(
    stream: &mut RequestStream,
    keep: u64,
    limit: u64,
    read_timeout: Duration,
) -> Result<(Bytes, bool), BodyError> {
    let mut body = Vec::new();
    loop {
        if body.len() as u64 > keep {
            return Ok((Bytes::from(body), true));
        }
        match next_body_chunk(stream, read_timeout).await? {
            Some(mut chunk) => {
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
            None => return Ok((Bytes::from(body), false)),
        }
    }
}

/// The whole request body, at most `limit` bytes (model calls read it to pick a region).
async fn read_body(
    stream: &mut RequestStream,
    limit: u64,
    read_timeout: Duration,
) -> Result<Bytes, BodyError> {
    match read_head(stream, limit, limit, read_timeout).await? {
        (body, false) => Ok(body),
        (_, true) => Err(BodyError::TooLarge),
    }
}

async fn next_body_chunk(
    stream: &mut RequestStream,
    read_timeout: Duration,
) -> Result<Option<impl Buf>, BodyError> {
    match tokio::time::timeout(read_timeout, stream.recv_data()).await {
        Ok(Ok(chunk)) => Ok(chunk),
        Ok(Err(e)) => {
            tracing::debug!("HTTP/3 request body: {e}");
            Err(BodyError::Client)
        }
        Err(_) => {
            tracing::debug!("HTTP/3 request body: no data within {read_timeout:?}");
            Err(BodyError::Client)
        }
    }
}

/// Forwards the rest of a streamed body (after `read` bytes) into `tx` as the client sends it;
/// more than `limit` bytes in all, a reset or a stall ends the upstream body with an error.
async fn pump_body(
    stream: &mut RequestStream,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    mut read: u64,
    limit: u64,
    read_timeout: Duration,
    too_large: &AtomicBool,
) {
    loop {
        let failure = match next_body_chunk(stream, read_timeout).await {
            Ok(Some(mut chunk)) => {
                read += chunk.remaining() as u64;
                if read > limit {
                    too_large.store(true, Ordering::Release);
                    "request body exceeds max_body_bytes"
                } else {
                    let bytes = chunk.copy_to_bytes(chunk.remaining());
                    if tx.send(Ok(bytes)).await.is_err() {
                        return; // the try ended; nobody reads the body any more
                    }
                    continue;
                }
            }
            Ok(None) => return, // dropping `tx` ends the upstream body
            Err(_) => "client request body broke off",
        };
        let _ = tx.send(Err(std::io::Error::other(failure))).await;
        return;
    }
}

/// Routing found no region able to serve now: a stored entry answers instead of the 503 — fresh
/// as a hit, stale within its stale-if-error (or stale-while-revalidate) window.
async fn stale_when_unavailable(
    cache: &EdgeCache,
    loaded: &Arc<Loaded>,
    route: usize,
    view: &CacheRequest<'_>,
) -> Option<Served> {
    match cache.lookup_request(loaded, route, view).await?.0 {
        Lookup::Hit(served) | Lookup::Stale { served, .. } => Some(served),
        Lookup::Fetch(ticket) => ticket.stale_on_error(SystemTime::now()),
        Lookup::Bypass(_) => None,
    }
}

/// Streams the upstream response to the client with the edge's headers, storing it in the cache
/// as it goes when the cache admits it, and feeding inference usage chunk by chunk.
async fn relay(
    stream: &mut RequestStream,
    loaded: &Loaded,
    state: &mut RequestState,
    edge_cache: Option<&EdgeCache>,
    mut cache: CacheFetch,
    mut upstream: UpstreamResponse,
    _inflight: InflightGuard,
) -> Result<u16, u16> {
    let snapshot = &loaded.snapshot;
    let status = upstream.head.status;
    let mut headers = forwardable(&upstream.head.headers);
    if let Some(r) = state.region.and_then(|r| snapshot.regions.get(r)) {
        headers.insert(HEADER_REGION, r.header.clone());
    }
    let mut writer: Option<Box<CacheWriter>> = None;
    if let Some(ticket) = cache.ticket.take() {
        // After `x-meridian-region` is set, so the stored entry remembers the region that made it.
        let now = SystemTime::now();
        let had_stale = ticket.status() == CacheStatus::Expired;
        if status.as_u16() >= 500 && had_stale {
            if let Some(served) = ticket.stale_on_error(now) {
                return write_served(stream, loaded, &served).await;
            }
            cache.status = Some(CacheStatus::Expired);
        } else if let Some(edge_cache) = edge_cache {
            let admission = edge_cache
                .cache()
                .admit(ticket, status.as_u16(), &headers, now)
                .await;
            let result = admission.status();
            cache.status = Some(if result == CacheStatus::Miss && had_stale {
                CacheStatus::Expired
            } else {
                result
            });
            match admission {
                Admission::Store(w) => writer = Some(w),
                Admission::Pass(_) => {}
                Admission::Revalidated(served) => {
                    return write_served(stream, loaded, &served).await;
                }
            }
        }
    }
    if let Some(cache_status) = cache.status {
        headers.insert(HEADER_CACHE, cache_status.header_value());
    }
    state.cache = cache.status;
    headers.insert(HEADER_POP, snapshot.pop_header.clone());
    let mut response = Response::builder().status(status);
    if let Some(h) = response.headers_mut() {
        *h = headers;
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
                if let Some(w) = writer.as_mut() {
                    w.push(&chunk);
                }
                if let Some(inference) = state.inference.as_deref_mut() {
                    inference.on_body(Some(&chunk));
                }
                if state.access.is_some() {
                    state.bytes_sent += chunk.len() as u64;
                }
                if stream.send_data(chunk).await.is_err() {
                    // The client went away: nothing is stored (followers fetch on their own).
                    return Err(0);
                }
            }
            Ok(None) => {
                if let Some(w) = writer.take().filter(|w| !w.is_abandoned()) {
                    w.finish().await;
                }
                return Ok(status.as_u16());
            }
            Err(e) => {
                // Headers are gone already: all we can do is cut the stream (nothing is stored).
                tracing::debug!("HTTP/3 response body: {e}");
                stream.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return Ok(status.as_u16());
            }
        }
    }
}

/// A response from the cache: the stored headers (with `Age`, `x-meridian-cache` and the
/// `x-meridian-region` that produced it), this edge's pop, the body length — as on TCP.
async fn write_served(
    stream: &mut RequestStream,
    loaded: &Loaded,
    served: &Served,
) -> Result<u16, u16> {
    let status = served.status_code();
    let mut headers = served.headers();
    headers.insert(HEADER_POP, loaded.snapshot.pop_header.clone());
    if !served.not_modified {
        headers.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from(served.entry.body_len),
        );
    }
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    if let Some(h) = response.headers_mut() {
        *h = headers;
    }
    let Ok(response) = response.body(()) else {
        return Err(500);
    };
    if stream.send_response(response).await.is_err() {
        return Err(0);
    }
    for chunk in served.body() {
        if stream.send_data(chunk.clone()).await.is_err() {
            return Err(0);
        }
    }
    Ok(status)
}

/// The edge's own answer: same JSON body and headers as the TCP front.
async fn send_error(
    stream: &mut RequestStream,
    loaded: &Loaded,
    region: Option<usize>,
    status: u16,
    message: &str,
) -> Result<u16, u16> {
    send_error_with(stream, loaded, region, status, message, false).await
}

/// [`send_error`], with `Retry-After: 1` when the refusal is temporary (every region down or full).
async fn send_error_with(
    stream: &mut RequestStream,
    loaded: &Loaded,
    region: Option<usize>,
    status: u16,
    message: &str,
    retry_after: bool,
) -> Result<u16, u16> {
    let snapshot = &loaded.snapshot;
    let body = reply::error_body(snapshot, status, message);
    let mut extra = HeaderMap::new();
    if retry_after {
        extra.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let Some(r) = region.and_then(|r| snapshot.regions.get(r)) {
        extra.insert(HEADER_REGION, r.header.clone());
    }
    send_json(stream, loaded, status, Some(extra), body).await
}

/// An OpenAI-style error of an inference route (as `inference::openai::send_error` on TCP).
async fn send_api_error(
    stream: &mut RequestStream,
    loaded: &Loaded,
    error: &ApiError,
) -> Result<u16, u16> {
    let mut extra = HeaderMap::new();
    if let Some(seconds) = error.retry_after {
        extra.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    send_json(stream, loaded, error.status, Some(extra), error.body()).await
}

/// A complete JSON response written by the edge, with `x-meridian-pop`.
async fn send_json(
    stream: &mut RequestStream,
    loaded: &Loaded,
    status: u16,
    extra: Option<HeaderMap>,
    body: Bytes,
) -> Result<u16, u16> {
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len());
    if let Some(headers) = response.headers_mut() {
        headers.insert(HEADER_POP, loaded.snapshot.pop_header.clone());
        if let Some(extra) = extra {
            headers.extend(extra);
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
