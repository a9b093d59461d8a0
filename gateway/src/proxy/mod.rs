//! The Pingora adapter for HTTP/1.1 and h2c: a thin `ProxyHttp` whose phases call the routing core.
//! Per-request state lives in [`RequestCtx`]; the snapshot is loaded once, in `request_filter`.

mod forward;
mod reply;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use meridian_geoip::GeoIp;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora_error::{ErrorSource, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::core::client::client_ip;
use crate::core::select::pick_upstream;
use crate::core::snapshot::InflightGuard;
use crate::core::{decide, Refusal, RequestView, RouteDecision};
use crate::reload::{Loaded, SnapshotStore};

pub use forward::{HEADER_POP, HEADER_REGION};

/// Upper bound on tries per request, whatever a route asks for (config caps it at 10).
const MAX_TRIES: usize = 10;

pub struct EdgeProxy {
    store: Arc<SnapshotStore>,
    geoip: Arc<GeoIp>,
    /// Rotates the starting point of upstream selection so equal upstreams share load.
    rotation: AtomicUsize,
}

impl EdgeProxy {
    pub fn new(store: Arc<SnapshotStore>, geoip: Arc<GeoIp>) -> Self {
        Self {
            store,
            geoip,
            rotation: AtomicUsize::new(0),
        }
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
    inflight: Option<InflightGuard>,
    body_bytes: u64,
}

impl RequestCtx {
    fn was_tried(&self, region: usize, upstream: usize) -> bool {
        self.tried[..self.tries]
            .iter()
            .any(|&(r, u)| usize::from(r) == region && usize::from(u) == upstream)
    }
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
            inflight: None,
            body_bytes: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let loaded = self.store.load();
        ctx.loaded = Some(Arc::clone(&loaded));
        let snapshot = &loaded.snapshot;
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
            .get_all(forward::X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok());
        ctx.client = client_ip(peer, forwarded, &snapshot.trusted_proxies);
        let view = RequestView {
            host,
            path: req.uri.path(),
            client: ctx.client,
        };
        match decide(snapshot, &view, |ip| self.geoip.lookup(ip)) {
            Ok(decision) => {
                ctx.decision = Some(decision);
                Ok(false)
            }
            Err(refusal) => {
                let message = reply::refusal_message(snapshot, &refusal);
                if let Refusal::Residency { route, .. } = refusal {
                    ctx.decision = Some(RouteDecision {
                        route,
                        country: None,
                        located: true,
                        candidates: Default::default(),
                    });
                }
                reply::send(session, snapshot, None, refusal.status(), &message).await?;
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
        while let Some(region_index) = decision.candidates.get(ctx.region_pos) {
            let region = &snapshot.regions[region_index];
            let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
            let picked = pick_upstream(region, rotation, |u| ctx.was_tried(region_index, u));
            let Some(upstream_index) = picked.filter(|_| ctx.tries < MAX_TRIES) else {
                ctx.region_pos += 1;
                continue;
            };
            let upstream = &region.upstreams[upstream_index];
            ctx.tried[ctx.tries] = (region_index as u16, upstream_index as u16);
            ctx.tries += 1;
            ctx.region = Some(region_index);
            ctx.inflight = Some(upstream.state.begin());
            let mut peer = HttpPeer::new(upstream.address, false, String::new());
            peer.options.connection_timeout = Some(route.connect_timeout);
            peer.options.read_timeout = Some(route.read_timeout);
            peer.options.write_timeout = Some(route.write_timeout);
            return Ok(Box::new(peer));
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
        if let (Some(loaded), Some(decision)) = (ctx.loaded.as_ref(), ctx.decision.as_ref()) {
            if let Some(series) = ctx.region.and_then(|r| loaded.metrics.attempts.get(r)) {
                series.connect_error.inc();
            }
            // The upstream never saw the request: retrying elsewhere is safe for any method.
            let budget = loaded.snapshot.routes[decision.route].retry_attempts as usize;
            if ctx.tries < budget {
                e.set_retry(true);
            }
        }
        e
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
        forward::add_forwarding_headers(upstream_request, ctx.client)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(loaded) = ctx.loaded.as_ref() {
            let snapshot = &loaded.snapshot;
            if let Some(region) = ctx.region.and_then(|r| snapshot.regions.get(r)) {
                upstream_response.insert_header(HEADER_REGION, region.header.clone())?;
            }
            upstream_response.insert_header(HEADER_POP, snapshot.pop_header.clone())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        ctx.inflight = None;
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
            if let Err(err) =
                reply::send(session, &loaded.snapshot, ctx.region, code, message).await
            {
                tracing::debug!("could not send error response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.inflight = None;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let loaded = ctx.loaded.clone().unwrap_or_else(|| self.store.load());
        let route = ctx.decision.map(|d| d.route);
        loaded
            .metrics
            .request(route, ctx.region)
            .observe(status, ctx.started.elapsed().as_secs_f64());
    }
}
