//! The response cache in the Pingora adapter: each `ProxyHttp` phase calls one function here, so
//! `mod.rs` stays a list of phases. The cache itself (`crate::cache`) is transport-free; see its
//! `INTEGRATION.md` for the contract followed here.
//!
//! Pingora quirks handled here:
//! - an upstream `304` arrives as a header-only task (no body phase runs), so a revalidated entry
//!   that must be served with its body is written by the edge itself in `response_filter`, and
//!   Pingora's own (now redundant) write of the upstream response is ignored by the session;
//! - the same for stale-if-error on a `5xx` response: the upstream body is dropped chunk by chunk.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora_http::{RequestHeader, ResponseHeader};

use super::forward::{self, HEADER_POP};
use super::RequestCtx;
use crate::cache::{
    Admission, CacheRequest, CacheStatus, CacheWriter, Lookup, ResponseCache, Served, Ticket,
    HEADER_CACHE,
};
use crate::clock;
use crate::core::select::{pick_upstream, region_verdict, RegionVerdict};
use crate::core::{RouteDecision, Snapshot};
use crate::reload::Loaded;
use crate::upstream_client::{Timeouts, UpstreamBody, UpstreamClient};

/// Per-request cache state (a field of [`RequestCtx`]).
#[derive(Default)]
pub struct CacheState {
    /// What `x-meridian-cache` says on a proxied response.
    status: Option<CacheStatus>,
    /// This request fetches from the origin on the cache's behalf.
    ticket: Option<Ticket>,
    /// The response is being stored as it streams to the client.
    writer: Option<Box<CacheWriter>>,
    /// The edge already wrote the whole response itself: drop what the upstream sends.
    answered: bool,
}

/// The edge's cache as the Pingora front uses it: one per process, kept across reloads.
pub struct EdgeCache {
    cache: ResponseCache,
    /// Background refreshes (stale-while-revalidate) go around Pingora with this client.
    client: Arc<UpstreamClient>,
    rotation: AtomicUsize,
}

impl EdgeCache {
    pub fn new(cache: ResponseCache) -> Self {
        Self {
            cache,
            client: Arc::new(UpstreamClient::default()),
            rotation: AtomicUsize::new(0),
        }
    }

    /// Looks the request up; `None` when the route does not cache. The `String`s are the host and
    /// path a background refresh needs (built only for that rare case).
    async fn lookup(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        loaded: &Arc<Loaded>,
        route: usize,
    ) -> Option<(Lookup, Option<(String, String)>)> {
        let req = session.req_header();
        let host = forward::host(req)?;
        let view = CacheRequest {
            method: &req.method,
            scheme: ctx.downstream.scheme(),
            host,
            path_and_query: req.uri.path_and_query().map_or("/", |p| p.as_str()),
            headers: &req.headers,
        };
        self.lookup_request(loaded, route, &view).await
    }

    /// The transport-free lookup every front calls: `None` when route `route` does not cache.
    /// The `String`s are the host and path a background refresh needs (built only for that case).
    pub(crate) async fn lookup_request(
        &self,
        loaded: &Arc<Loaded>,
        route: usize,
        view: &CacheRequest<'_>,
    ) -> Option<(Lookup, Option<(String, String)>)> {
        let policy = loaded.cache_policy(route)?;
        let lookup = self.cache.lookup(view, policy, SystemTime::now()).await;
        let target = match &lookup {
            Lookup::Stale {
                refresh: Some(_), ..
            } => Some((view.host.to_string(), view.path_and_query.to_string())),
            _ => None,
        };
        Some((lookup, target))
    }

    /// The cache itself, for `admit` on a fetched response.
    pub(crate) fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// `request_filter`, after routing: serve from the cache (`Ok(true)`), or note what the
    /// upstream fetch must do (`Ok(false)`).
    pub(super) async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        loaded: &Arc<Loaded>,
        decision: RouteDecision,
        alt_svc: Option<&http::HeaderValue>,
    ) -> Result<bool> {
        let Some((lookup, target)) = self.lookup(session, ctx, loaded, decision.route).await else {
            return Ok(false);
        };
        let alt_svc = alt_svc.filter(|_| ctx.downstream.tls);
        match lookup {
            Lookup::Hit(served) => {
                write_served(session, &served, &loaded.snapshot, alt_svc).await?;
                Ok(true)
            }
            Lookup::Stale { served, refresh } => {
                if let (Some(ticket), Some((host, path))) = (refresh, target) {
                    self.spawn_refresh(ticket, Arc::clone(loaded), decision, host, path);
                }
                write_served(session, &served, &loaded.snapshot, alt_svc).await?;
                Ok(true)
            }
            Lookup::Fetch(ticket) => {
                ctx.cache.status = Some(ticket.status());
                ctx.cache.ticket = Some(ticket);
                Ok(false)
            }
            Lookup::Bypass(_) => {
                ctx.cache.status = Some(CacheStatus::Bypass);
                Ok(false)
            }
        }
    }

    /// Routing found no region able to serve now (all down, drained or full): a stored entry
    /// answers instead of the 503 — fresh as a hit, stale within its stale-if-error (or
    /// stale-while-revalidate) window. `Ok(true)` when it did.
    pub(super) async fn unavailable(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        loaded: &Arc<Loaded>,
        route: usize,
        alt_svc: Option<&http::HeaderValue>,
    ) -> Result<bool> {
        let Some((lookup, _)) = self.lookup(session, ctx, loaded, route).await else {
            return Ok(false);
        };
        let served = match lookup {
            Lookup::Hit(served) | Lookup::Stale { served, .. } => served,
            Lookup::Fetch(ticket) => match ticket.stale_on_error(SystemTime::now()) {
                Some(served) => served,
                None => return Ok(false),
            },
            Lookup::Bypass(_) => return Ok(false),
        };
        let alt_svc = alt_svc.filter(|_| ctx.downstream.tls);
        write_served(session, &served, &loaded.snapshot, alt_svc).await?;
        Ok(true)
    }

    /// `response_filter`, after `x-meridian-region` is set (so the stored entry remembers the
    /// region that produced it) and before the per-client headers (pop, alt-svc).
    pub(super) async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
        snapshot: &Snapshot,
        alt_svc: Option<&http::HeaderValue>,
    ) -> Result<()> {
        if let Some(ticket) = ctx.cache.ticket.take() {
            let now = SystemTime::now();
            let status = response.status.as_u16();
            let had_stale = ticket.status() == CacheStatus::Expired;
            if status >= 500 && had_stale {
                // stale-if-error on an error response (the stale entry must survive it).
                if let Some(served) = ticket.stale_on_error(now) {
                    let alt_svc = alt_svc.filter(|_| ctx.downstream.tls);
                    write_served(session, &served, snapshot, alt_svc).await?;
                    ctx.cache.answered = true;
                    return Ok(());
                }
                ctx.cache.status = Some(CacheStatus::Expired);
            } else {
                let admission = self
                    .cache
                    .admit(ticket, status, &response.headers, now)
                    .await;
                let result = admission.status();
                ctx.cache.status = Some(if result == CacheStatus::Miss && had_stale {
                    CacheStatus::Expired
                } else {
                    result
                });
                match admission {
                    Admission::Store(writer) => ctx.cache.writer = Some(writer),
                    Admission::Pass(_) => {}
                    Admission::Revalidated(served) => {
                        if served.body().is_empty() {
                            // 304 to the client, or HEAD: the upstream head becomes the entry's.
                            *response = served_header(&served, snapshot)?;
                        } else {
                            let alt_svc = alt_svc.filter(|_| ctx.downstream.tls);
                            write_served(session, &served, snapshot, alt_svc).await?;
                            ctx.cache.answered = true;
                            return Ok(());
                        }
                    }
                }
            }
        }
        if let Some(status) = ctx.cache.status {
            response.insert_header(HEADER_CACHE, status.header_value())?;
        }
        Ok(())
    }

    /// `fail_to_proxy`: every candidate region failed. Serves the stale entry when its
    /// stale-if-error window allows; returns the status written.
    pub(super) async fn fail_to_proxy(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snapshot: &Snapshot,
    ) -> Option<u16> {
        let ticket = ctx.cache.ticket.take()?;
        if session.response_written().is_some() {
            return None;
        }
        let served = ticket.stale_on_error(SystemTime::now())?;
        match write_served(session, &served, snapshot, None).await {
            Ok(()) => Some(served.status_code()),
            Err(e) => {
                tracing::debug!("could not serve the stale entry: {e}");
                None
            }
        }
    }

    /// stale-while-revalidate: one fetch off the client's path, fed to the cache like a miss.
    pub(crate) fn spawn_refresh(
        &self,
        ticket: Ticket,
        loaded: Arc<Loaded>,
        decision: RouteDecision,
        host: String,
        path: String,
    ) {
        let now = clock::now_ms();
        let snapshot = &loaded.snapshot;
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        let mut target = None;
        let mut pos = 0;
        while let Some(region_index) = decision.candidates.get(pos) {
            pos += 1;
            let region = &snapshot.regions[region_index];
            if region_verdict(region, now) != RegionVerdict::Available {
                continue;
            }
            if let Some(u) = pick_upstream(region, now, rotation, |_| false) {
                target = Some(region.upstreams[u].address);
                break;
            }
        }
        let (Some(address), Some(route)) = (target, snapshot.routes.get(decision.route)) else {
            return; // dropping the ticket: the next request revalidates in line
        };
        let timeouts = Timeouts {
            connect: route.connect_timeout,
            read: route.read_timeout,
        };
        let mut builder = http::Request::get(path).header(http::header::HOST, host);
        for (name, value) in ticket.conditional_headers() {
            builder = builder.header(name, value);
        }
        let Ok(request) = builder.body(UpstreamBody::full(Bytes::new())) else {
            return;
        };
        let (cache, client) = (self.cache.clone(), Arc::clone(&self.client));
        tokio::spawn(async move {
            let mut response = match client.send(address, request, timeouts).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("background refresh: {e}");
                    return;
                }
            };
            let status = response.head.status.as_u16();
            let admission = cache
                .admit(ticket, status, &response.head.headers, SystemTime::now())
                .await;
            if let Admission::Store(mut writer) = admission {
                loop {
                    match response.next_chunk().await {
                        Ok(Some(chunk)) => writer.push(&chunk),
                        Ok(None) => {
                            writer.finish().await;
                            return;
                        }
                        Err(e) => {
                            tracing::debug!("background refresh body: {e}");
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// `upstream_request_filter`: a leader fetches the full response for everyone (the client's own
/// conditionals go), and a revalidation asks with the stored validators.
pub(super) fn upstream_request_filter(
    state: &CacheState,
    request: &mut RequestHeader,
) -> Result<()> {
    let Some(ticket) = state.ticket.as_ref() else {
        return Ok(());
    };
    if ticket.fetches_for_others() {
        request.remove_header(&http::header::IF_NONE_MATCH);
        request.remove_header(&http::header::IF_MODIFIED_SINCE);
    }
    for (name, value) in ticket.conditional_headers() {
        request.insert_header(name, value)?;
    }
    Ok(())
}

/// `response_body_filter`: feed the writer (refcount clones); at the end, store the entry and
/// release coalesced followers without waiting for `logging`.
pub(super) fn response_body_filter(
    state: &mut CacheState,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
) {
    if state.answered {
        *body = None;
        return;
    }
    if let (Some(writer), Some(chunk)) = (state.writer.as_mut(), body.as_ref()) {
        writer.push(chunk);
    }
    if end_of_stream {
        if let Some(writer) = state.writer.take() {
            if !writer.is_abandoned() {
                tokio::spawn(async move {
                    writer.finish().await;
                });
            }
        }
    }
}

/// `logging`: an error abandons the fetch (nothing stored, followers fetch on their own).
pub(super) async fn logging(state: &mut CacheState, failed: bool) {
    state.ticket = None;
    match state.writer.take() {
        Some(writer) if !failed => {
            writer.finish().await;
        }
        _ => {}
    }
}

/// The response head for a cached entry: stored headers (with `Age`, `x-meridian-cache`, and the
/// `x-meridian-region` that produced it), this edge's pop, the body length.
fn served_header(served: &Served, snapshot: &Snapshot) -> Result<ResponseHeader> {
    let headers = served.headers();
    let mut resp = ResponseHeader::build(served.status_code(), Some(headers.len() + 2))?;
    for (name, value) in &headers {
        resp.append_header(name.clone(), value.clone())?;
    }
    resp.insert_header(HEADER_POP, snapshot.pop_header.clone())?;
    if !served.not_modified {
        resp.insert_header(http::header::CONTENT_LENGTH, served.entry.body_len)?;
    }
    Ok(resp)
}

async fn write_served(
    session: &mut Session,
    served: &Served,
    snapshot: &Snapshot,
    alt_svc: Option<&http::HeaderValue>,
) -> Result<()> {
    let mut resp = served_header(served, snapshot)?;
    if let Some(alt_svc) = alt_svc {
        resp.insert_header(http::header::ALT_SVC, alt_svc.clone())?;
    }
    let body = served.body();
    session
        .write_response_header(Box::new(resp), body.is_empty())
        .await?;
    for (i, chunk) in body.iter().enumerate() {
        session
            .write_response_body(Some(chunk.clone()), i + 1 == body.len())
            .await?;
    }
    Ok(())
}
