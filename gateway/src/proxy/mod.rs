//! The Pingora adapter for HTTP/1.1 and h2c: a thin `ProxyHttp` whose phases call the routing core.
//! Per-request state lives in [`RequestCtx`]; the snapshot is loaded once, in `request_filter`.

pub(crate) mod cached;
pub(crate) mod forward;
pub(crate) mod reply;
pub(crate) mod retry;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora_error::{ErrorSource, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::clock;
use crate::core::client::client_ip;
use crate::core::snapshot::InflightGuard;
use crate::core::state::RegionGuard;
use crate::core::{decide, Refusal, RequestView, RouteDecision};
use crate::reload::{Loaded, SnapshotStore};

pub use forward::{HEADER_POP, HEADER_REGION};

use retry::MAX_TRIES;

pub struct EdgeProxy {
    store: Arc<SnapshotStore>,
    /// Rotates the starting point of upstream selection so equal upstreams share load.
    rotation: AtomicUsize,
    /// `h3=":PORT"; ma=86400` on TLS responses when HTTP/3 is on.
    alt_svc: Option<http::HeaderValue>,
    /// The edge's response cache (issue 6), shared with the admin listener.
    cache: Option<Arc<cached::EdgeCache>>,
    /// Inference rate limits and metrics (issue 8), shared with the HTTP/3 front.
    inference: Arc<crate::inference::InferenceState>,
}

impl EdgeProxy {
    pub fn new(store: Arc<SnapshotStore>) -> Self {
        Self {
            inference: Arc::new(crate::inference::InferenceState::new(
                store.metrics().registry(),
            )),
            store,
            rotation: AtomicUsize::new(0),
            alt_svc: None,
            cache: None,
        }
    }

    /// Serve cache-enabled routes through `cache` (issue 6).
    pub fn with_cache(mut self, cache: Option<crate::cache::ResponseCache>) -> Self {
        self.cache = cache.map(|c| Arc::new(cached::EdgeCache::new(c)));
        self
    }

    /// The response cache this front uses, for the HTTP/3 front to share (same entries,
    /// coalescing and policies on every protocol).
    pub(crate) fn edge_cache(&self) -> Option<Arc<cached::EdgeCache>> {
        self.cache.clone()
    }

    /// Inference rate-limit windows and metrics, for the HTTP/3 front to share.
    pub fn inference_state(&self) -> Arc<crate::inference::InferenceState> {
        Arc::clone(&self.inference)
    }

    /// Advertise HTTP/3 (`Alt-Svc`) on responses to TLS clients.
    pub fn with_alt_svc(mut self, alt_svc: Option<http::HeaderValue>) -> Self {
        self.alt_svc = alt_svc;
        self
    }
}

pub struct RequestCtx {
    started: Instant,
    loaded: Option<Arc<Loaded>>,
    decision: Option<RouteDecision>,
    client: IpAddr,
    /// Position in `decision.candidates` of the region being tried.
    region_pos: usize,
    /// (region, upstream) pairs already tried, so a retry goes elsewhere.
    tried: [(u16, u16); MAX_TRIES],
    tries: usize,
    /// Region of the current (or last) upstream attempt.
    region: Option<usize>,
    /// Upstream (index in its region) of the current attempt.
    upstream: Option<usize>,
    inflight: Option<InflightGuard>,
    region_inflight: Option<RegionGuard>,
    /// Why the last try was retried (for `meridian_failovers_total`).
    retry_reason: Option<&'static str>,
    body_bytes: u64,
    /// TLS or not, h1 or h2 (issue 5: `x-forwarded-proto`, alt-svc, the `protocol` label).
    downstream: crate::tls::Downstream,
    /// Response cache state (issue 6; see `cached.rs`).
    cache: cached::CacheState,
    /// Model, caller and usage of an inference request (issue 8).
    inference: Option<Box<crate::inference::InferenceCtx>>,
    /// Access-log facts (issue 11); `None` unless this request is logged.
    access: Option<Box<crate::access_log::UpstreamSide>>,
}

impl EdgeProxy {
    /// Passive outlier detection: one more failure for the upstream of the current try.
    fn record_upstream_failure(&self, loaded: &Loaded, ctx: &RequestCtx) {
        let (Some(region_index), Some(upstream)) =
            (ctx.region, current_upstream(&loaded.snapshot, ctx))
        else {
            return;
        };
        let region = &loaded.snapshot.regions[region_index];
        if upstream
            .state
            .record_failure(clock::now_ms(), &region.outlier)
        {
            tracing::warn!(region = %region.name, upstream = %upstream.address, "upstream ejected after consecutive failures");
            self.store
                .metrics()
                .health
                .ejections
                .with_label_values(&[&region.name])
                .inc();
        }
    }
}

fn current_upstream<'a>(
    snapshot: &'a crate::core::Snapshot,
    ctx: &RequestCtx,
) -> Option<&'a crate::core::snapshot::CompiledUpstream> {
    snapshot
        .regions
        .get(ctx.region?)?
        .upstreams
        .get(ctx.upstream?)
}

fn decision_route(ctx: &RequestCtx) -> usize {
    ctx.decision.map_or(usize::MAX, |d| d.route)
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            loaded: None,
            decision: None,
            client: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            region_pos: 0,
            tried: [(0, 0); MAX_TRIES],
            tries: 0,
            region: None,
            upstream: None,
            inflight: None,
            region_inflight: None,
            retry_reason: None,
            body_bytes: 0,
            downstream: crate::tls::Downstream::default(),
            cache: cached::CacheState::default(),
            inference: None,
            access: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let loaded = self.store.load();
        ctx.downstream = crate::tls::Downstream::of(session, self.store.metrics());
        ctx.loaded = Some(Arc::clone(&loaded));
        let snapshot = &loaded.snapshot;
        if crate::access_log::roll(snapshot.access_log_sample) {
            ctx.access = Some(Box::default());
        }
        let req = session.req_header();

        if let Some(refusal) = reply::check_limits(req, &snapshot.limits) {
            reply::send(session, snapshot, None, refusal.status, refusal.message).await?;
            return Ok(true);
        }
        let Some(host) = forward::host(req) else {
            reply::send(session, snapshot, None, 400, "request has no Host").await?;
            return Ok(true);
        };
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let forwarded = req
            .headers
            .get_all(&forward::X_FORWARDED_FOR_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok());
        ctx.client = client_ip(peer, forwarded, &snapshot.trusted_proxies);
        let view = RequestView {
            host,
            path: req.uri.path(),
            client: ctx.client,
        };
        match decide(
            snapshot,
            &view,
            |ip| loaded.geoip.lookup(ip),
            clock::now_ms(),
        ) {
            Ok(decision) => {
                ctx.decision = Some(decision);
                // Issue 8: model calls pick regions by the model in their body; never cached.
                if snapshot.routes[decision.route].kind == meridian_config::RouteKind::Inference {
                    let outcome = self
                        .inference
                        .on_request(
                            session,
                            &loaded,
                            decision,
                            ctx.client,
                            &loaded.geoip,
                            ctx.started,
                        )
                        .await?;
                    ctx.inference = outcome.ctx;
                    if let Some(decision) = outcome.decision {
                        ctx.decision = Some(decision);
                    }
                    if outcome.answered || ctx.inference.is_some() {
                        return Ok(outcome.answered);
                    }
                }
                match self.cache.as_deref() {
                    Some(cache) => {
                        let alt_svc = self.alt_svc.as_ref();
                        cache
                            .request_filter(session, ctx, &loaded, decision, alt_svc)
                            .await
                    }
                    None => Ok(false),
                }
            }
            Err(refusal) => {
                if let (Refusal::Unavailable { route, .. }, Some(cache)) =
                    (refusal, self.cache.clone())
                {
                    // stale-if-error when no region can even be tried (issue 6).
                    let alt_svc = self.alt_svc.as_ref();
                    if cache
                        .unavailable(session, ctx, &loaded, route, alt_svc)
                        .await?
                    {
                        ctx.decision = Some(RouteDecision {
                            route,
                            country: None,
                            located: true,
                            candidates: Default::default(),
                        });
                        return Ok(true);
                    }
                }
                let snapshot = &loaded.snapshot;
                let message = reply::refusal_message(snapshot, &refusal);
                if let Refusal::Residency { route, .. } | Refusal::Unavailable { route, .. } =
                    refusal
                {
                    ctx.decision = Some(RouteDecision {
                        route,
                        country: None,
                        located: true,
                        candidates: Default::default(),
                    });
                }
                let retry_after = matches!(refusal, Refusal::Unavailable { .. });
                reply::send_with(
                    session,
                    snapshot,
                    None,
                    refusal.status(),
                    &message,
                    retry_after,
                )
                .await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(chunk), Some(loaded)) = (body.as_ref(), ctx.loaded.as_ref()) {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > loaded.snapshot.limits.max_body_bytes {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "request body over edge.limits.max_body_bytes",
                );
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let (Some(loaded), Some(decision)) = (ctx.loaded.clone(), ctx.decision) else {
            return Error::e_explain(
                ErrorType::InternalError,
                "upstream_peer without a routing decision",
            );
        };
        let snapshot = &loaded.snapshot;
        let route = &snapshot.routes[decision.route];
        let now = clock::now_ms();
        if ctx.tries > 0 && ctx.started.elapsed() >= route.total_timeout {
            return Error::e_explain(
                ErrorType::HTTPStatus(504),
                "overall deadline (timeouts.total) passed; no new try",
            );
        }
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        if let Some((region_index, upstream_index)) = retry::next_upstream(
            snapshot,
            &decision,
            &mut ctx.region_pos,
            &ctx.tried[..ctx.tries],
            rotation,
            now,
            &mut ctx.retry_reason,
        ) {
            let region = &snapshot.regions[region_index];
            let upstream = &region.upstreams[upstream_index];
            ctx.tried[ctx.tries] = (region_index as u16, upstream_index as u16);
            ctx.tries += 1;
            if ctx.region != Some(region_index) {
                region.state.budget.note_request(now);
                ctx.region_inflight = Some(region.state.begin());
            }
            ctx.region = Some(region_index);
            ctx.upstream = Some(upstream_index);
            ctx.inflight = Some(upstream.state.begin());
            if let Some(access) = ctx.access.as_deref_mut() {
                access.upstream = Some(upstream.address);
                access.connect_started = Some(Instant::now());
            }
            let mut peer = HttpPeer::new(upstream.address, false, String::new());
            peer.options.connection_timeout = Some(route.connect_timeout);
            peer.options.read_timeout = Some(route.read_timeout);
            peer.options.write_timeout = Some(route.write_timeout);
            return Ok(Box::new(peer));
        }
        if ctx.tries == 0 {
            // Nothing was even tried: every region went down or filled up since the decision.
            return Error::e_explain(
                ErrorType::HTTPStatus(503),
                "no region can take this request now",
            );
        }
        Error::e_explain(
            ErrorType::ConnectNoRoute,
            "every candidate upstream has been tried",
        )
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.inflight = None;
        if let Some(loaded) = ctx.loaded.clone() {
            if let Some(series) = ctx.region.and_then(|r| loaded.metrics.attempts.get(r)) {
                series.connect_error.inc();
            }
            let reason = if matches!(e.etype(), ErrorType::ConnectTimedout) {
                "timeout"
            } else {
                "connect_error"
            };
            self.record_upstream_failure(&loaded, ctx);
            // The upstream never saw the request: retrying elsewhere is safe for any method.
            let refused = matches!(e.etype(), ErrorType::ConnectRefused);
            if retry::allowed(&loaded.snapshot, ctx, refused) {
                retry::count(&loaded.snapshot, &self.store.metrics().health, ctx, reason);
                e.set_retry(true);
            }
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // A retryable status we turned into an error in upstream_response_filter: already decided.
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) && e.retry() {
            return e;
        }
        ctx.inflight = None;
        let replayable =
            session.response_written().is_none() && !session.as_ref().retry_buffer_truncated();
        let idempotent = session.req_header().method.is_idempotent();
        let Some(loaded) = ctx.loaded.clone() else {
            e.set_retry(false);
            return e;
        };
        let failed_upstream = matches!(
            e.etype(),
            ErrorType::ReadTimedout
                | ErrorType::WriteTimedout
                | ErrorType::ConnectionClosed
                | ErrorType::ReadError
                | ErrorType::WriteError
                | ErrorType::InvalidHTTPHeader
        ) && e.esource() == &ErrorSource::Upstream;
        if failed_upstream {
            self.record_upstream_failure(&loaded, ctx);
        }
        // Pingora's rule for stale pooled connections (retry only if the connection was reused),
        // widened to upstream timeouts and resets, within the route's tries and retry budget.
        e.retry.decide_reuse(client_reused);
        let wanted = e.retry() || failed_upstream;
        let may_replay = idempotent
            || loaded
                .snapshot
                .routes
                .get(decision_route(ctx))
                .is_some_and(|r| r.retry_non_idempotent);
        if wanted && replayable && may_replay && retry::allowed(&loaded.snapshot, ctx, false) {
            let reason = if matches!(
                e.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout
            ) {
                "timeout"
            } else {
                "upstream_error"
            };
            retry::count(&loaded.snapshot, &self.store.metrics().health, ctx, reason);
            e.set_retry(true);
        } else {
            e.set_retry(false);
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(access) = ctx.access.as_deref_mut() {
            access.first_byte = Some(ctx.started.elapsed());
        }
        let Some(loaded) = ctx.loaded.clone() else {
            return Ok(());
        };
        let status = upstream_response.status.as_u16();
        if status >= 500 {
            self.record_upstream_failure(&loaded, ctx);
        } else if let Some(upstream) = current_upstream(&loaded.snapshot, ctx) {
            upstream.state.record_success();
        }
        let Some(route) = loaded.snapshot.routes.get(decision_route(ctx)) else {
            return Ok(());
        };
        // Issue 8: a model server's 429/503 refuses the work, so even a POST may go elsewhere.
        let inference_refused = ctx.inference.is_some()
            && crate::inference::refused(
                &loaded.snapshot,
                ctx.region,
                upstream_response,
                clock::now_ms(),
            );
        if !route.retry_on_status.contains(&status) && !inference_refused {
            return Ok(());
        }
        let may_replay = session.req_header().method.is_idempotent()
            || route.retry_non_idempotent
            || inference_refused;
        if may_replay
            && !session.as_ref().retry_buffer_truncated()
            && retry::allowed(&loaded.snapshot, ctx, false)
        {
            retry::count(
                &loaded.snapshot,
                &self.store.metrics().health,
                ctx,
                "status",
            );
            ctx.inflight = None;
            let mut e = Error::explain(ErrorType::HTTPStatus(status), "retryable upstream status");
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(loaded), Some(region)) = (ctx.loaded.as_ref(), ctx.region) {
            if let Some(series) = loaded.metrics.attempts.get(region) {
                series.ok.inc();
            }
        }
        cached::upstream_request_filter(&ctx.cache, upstream_request)?;
        forward::add_forwarding_headers(upstream_request, ctx.client, ctx.downstream.scheme())?;
        if let Some(access) = ctx.access.as_deref_mut() {
            access.note_upstream_headers(&upstream_request.headers);
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(access) = ctx.access.as_deref_mut() {
            // Pingora's own measurement of the TCP connect when it has one; else our clock.
            let measured = digest
                .and_then(|d| d.timing_digest.first())
                .and_then(|t| t.as_ref())
                .and_then(|t| t.establishment_duration);
            access.connect = if reused {
                Some(std::time::Duration::ZERO)
            } else {
                measured.or_else(|| access.connect_started.map(|t| t.elapsed()))
            };
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(loaded) = ctx.loaded.clone() {
            let snapshot = &loaded.snapshot;
            if let Some(region) = ctx.region.and_then(|r| snapshot.regions.get(r)) {
                upstream_response
                    .insert_header(forward::HEADER_REGION_NAME, region.header.clone())?;
            }
            if let Some(cache) = self.cache.clone() {
                let alt_svc = self.alt_svc.as_ref();
                cache
                    .response_filter(session, upstream_response, ctx, snapshot, alt_svc)
                    .await?;
            }
            upstream_response
                .insert_header(forward::HEADER_POP_NAME, snapshot.pop_header.clone())?;
            if let Some(alt_svc) = self.alt_svc.as_ref().filter(|_| ctx.downstream.tls) {
                upstream_response.insert_header(http::header::ALT_SVC, alt_svc.clone())?;
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        cached::response_body_filter(&mut ctx.cache, body, end_of_stream);
        if let Some(inference) = ctx.inference.as_deref_mut() {
            inference.on_body(body.as_ref());
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        ctx.inflight = None;
        if let (Some(cache), Some(loaded)) = (self.cache.clone(), ctx.loaded.clone()) {
            // stale-if-error: every region failed, a stale entry may answer instead.
            if let Some(code) = cache.fail_to_proxy(session, ctx, &loaded.snapshot).await {
                return FailToProxy {
                    error_code: code,
                    can_reuse_downstream: false,
                };
            }
        }
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => match e.etype() {
                    ErrorType::ConnectNoRoute => 502,
                    _ => 500,
                },
            },
        };
        if code > 0 && session.response_written().is_none() {
            let loaded = ctx.loaded.clone().unwrap_or_else(|| self.store.load());
            let message = reply::error_message(code);
            let region = ctx.region.filter(|_| code != 503);
            if let Err(err) = reply::send_with(
                session,
                &loaded.snapshot,
                region,
                code,
                message,
                code == 503,
            )
            .await
            {
                tracing::debug!("could not send error response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.inflight = None;
        cached::logging(&mut ctx.cache, e.is_some()).await;
        ctx.region_inflight = None;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let loaded = ctx.loaded.clone().unwrap_or_else(|| self.store.load());
        let route = ctx.decision.map(|d| d.route);
        if let Some(inference) = ctx.inference.take() {
            self.inference
                .finish(&loaded.snapshot, ctx.region, status, &inference);
        }
        if let (Some(decision), Some(served)) = (ctx.decision, ctx.region) {
            retry::count_failover(
                &loaded.snapshot,
                &self.store.metrics().health,
                &decision,
                served,
                ctx.retry_reason,
            );
        }
        loaded.metrics.request(route, ctx.region).observe(
            ctx.downstream.protocol,
            status,
            ctx.started.elapsed().as_secs_f64(),
        );
        if let Some(mut side) = ctx.access.take() {
            let req = session.req_header();
            side.fill_from_client(&req.headers);
            let snapshot = &loaded.snapshot;
            let country = ctx.decision.and_then(|d| d.country);
            crate::access_log::emit(&crate::access_log::Entry {
                protocol: ctx.downstream.protocol,
                method: req.method.as_str(),
                host: forward::host(req),
                path: req.uri.path(),
                status,
                country: country.as_ref().map(|c| c.as_str()),
                route: route
                    .and_then(|r| snapshot.routes.get(r))
                    .map(|r| r.name.as_str()),
                region: ctx
                    .region
                    .and_then(|r| snapshot.regions.get(r))
                    .map(|r| r.name.as_str()),
                bytes_sent: Some(session.as_ref().body_bytes_sent() as u64),
                cache: session
                    .response_written()
                    .and_then(|r| crate::access_log::cache_result(&r.headers)),
                total: ctx.started.elapsed(),
                side: &side,
            });
        }
    }
}
