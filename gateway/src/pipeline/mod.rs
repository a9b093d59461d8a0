//! The one request pipeline every HTTP front drives. A driver (TCP h1/h2 in `proxy/`, HTTP/3 in
//! `h3/`) reads a request head, wraps its stream in a [`Downstream`] and calls
//! [`Pipeline::serve`]; everything after that is here, once:
//!
//! 1. one snapshot load; limits, host, client address (X-Forwarded-For from trusted proxies only),
//!    the routing decision — or the edge's own answer ([`EdgeReply`]);
//! 2. the inference entry (model calls read their body to pick regions by model) or the cache
//!    lookup (hit, stale, fetch, bypass);
//! 3. tries through the one [`Connector`], in the order the exchange ([`Tries`]) names, with its
//!    retry rules, budget and outlier verdicts;
//! 4. the response relayed with the edge's headers, stored in the cache as it streams when admitted,
//!    inference usage scanned chunk by chunk;
//! 5. one finish record: request metrics, failover and inference counters, the access log.
//!
//! The decisions themselves live in `meridian-core` ([`crate::core::exchange`]); this module moves
//! bytes between the driver, the cache and the connector.

pub(crate) mod body;
mod cached;
pub(crate) mod downstream;
/// Boxes the future `make` builds, constructed in its heap slot instead of on the stack and then
/// copied: a request's future is several KiB, most of it room for states it has not reached yet,
/// and `Box::pin(future)` (or spawning it) copies all of it once per request. Used where each
/// request starts one: the HTTP/1.1 loop and the HTTP/2 and HTTP/3 stream tasks. Smaller futures awaited once are pinned where they are built (`std::pin::pin!(call(..))`) for
/// the same reason, without the allocation.
#[inline(always)]
pub(crate) fn boxed_in_place<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

pub mod forward;
mod respond;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method};
use meridian_config::RouteKind;

use crate::access_log::UpstreamSide;
use crate::cache::{CacheRequest, CacheStatus, Lookup, ResponseCache, Ticket};
use crate::clock;
use crate::connector::{Connector, InterimSink, OutboundHead, Timeouts, UpstreamResponse};
use crate::core::client::client_ip;
use crate::core::exchange::{
    check_declared_length, check_head_limits, declared_length, request_host, EdgeReply, Effects,
    Replay, Tries, TryVerdict,
};
use crate::core::headers::UpstreamHeaders;
use crate::core::inference::replicas::CallPick;
use crate::core::route_match::{normalize_path, PathError};
use crate::core::snapshot::InflightGuard;
use crate::core::state::RegionGuard;
use crate::core::{decide, Refusal, RequestView, RouteDecision};
use crate::inference::{Entry, InferenceCtx, InferenceState};
use crate::reload::{Loaded, SnapshotStore};

use body::{BodyError, RequestBody, REPLAY_BYTES};
pub(crate) use cached::EdgeCache;
pub(crate) use downstream::{Arrival, ClientBodyError, Downstream, Head};

/// Bytes of a model call's prompt hashed for prefix affinity.
const PREFIX_BYTES: usize = 1024;

/// What every request of every front shares: one instance per edge.
pub struct Pipeline {
    pub(crate) store: Arc<SnapshotStore>,
    pub(crate) cache: Option<Arc<EdgeCache>>,
    pub(crate) inference: Arc<InferenceState>,
    connector: Connector,
    /// Rotates the starting point of upstream selection so equal upstreams share load.
    rotation: AtomicUsize,
    /// `h3=":PORT"; ma=86400` on responses to TLS clients over TCP when HTTP/3 is on.
    alt_svc: Option<HeaderValue>,
}

/// Per-request state: what the finish record needs, whatever happened.
#[derive(Default)]
struct RequestState {
    route: Option<usize>,
    decision: Option<RouteDecision>,
    tries: Option<Tries>,
    /// Counts the request in its region's in-flight total (`max_inflight`) while it runs.
    region_inflight: Option<RegionGuard>,
    inference: Option<Box<InferenceCtx>>,
    /// Access-log facts; `None` unless this request is logged.
    access: Option<Box<UpstreamSide>>,
    /// Response body bytes written to the client.
    bytes_sent: u64,
    /// `x-meridian-cache` of the response.
    cache: Option<CacheStatus>,
    /// The protocol the client asked to switch to, passed on to the upstream (HTTP/1.1 only).
    upgrade: Option<HeaderValue>,
}

impl RequestState {
    fn region(&self) -> Option<usize> {
        self.tries.as_ref().and_then(Tries::region)
    }
}

/// The request as every upstream try sends it.
struct Outbound<'a> {
    method: &'a Method,
    /// Origin-form (`/path?query`), whatever form the client used.
    uri: &'a http::Uri,
    headers: &'a UpstreamHeaders<'a>,
    body: &'a RequestBody,
    replay: Replay,
    /// A model call: its replicas are picked by the model servers' state.
    call: Option<CallPick<'a>>,
    /// Where tries hand the origin's `103 Early Hints` for the client.
    interim: Option<&'a InterimSink>,
}

/// A response to relay, with the guard counting it against its upstream until it ends.
struct Relayed {
    response: Box<UpstreamResponse>,
    _inflight: InflightGuard,
}

impl Pipeline {
    pub fn new(
        store: Arc<SnapshotStore>,
        cache: Option<ResponseCache>,
        alt_svc: Option<HeaderValue>,
    ) -> Self {
        Self {
            inference: Arc::new(InferenceState::new(store.metrics().registry())),
            store,
            cache: cache.map(|c| Arc::new(EdgeCache::new(c))),
            connector: Connector::default(),
            rotation: AtomicUsize::new(0),
            alt_svc,
        }
    }

    /// One request, start to end; records its metrics and access log whatever happens.
    pub async fn serve<D: Downstream>(&self, head: Head<'_>, downstream: &mut D, arrival: Arrival) {
        let started = Instant::now();
        let loaded = self.store.load();
        let mut state = RequestState::default();
        if crate::access_log::roll(loaded.snapshot.access_log_sample) {
            state.access = Some(Box::default());
        }
        let mut out =
            respond::Writer::new(downstream, head, &loaded, arrival, self.alt_svc.as_ref());
        // Awaited inline: the driver already runs each request in a future of its own, and its
        // arguments are all references, so building it here copies a few words.
        let exchange = self.exchange(&mut out, &loaded, &arrival, &mut state, started);
        let status = match exchange.await {
            Ok(status) | Err(status) => status,
        };
        state.bytes_sent = out.bytes_sent();
        state.cache = out.cache_status().or(state.cache);
        self.finish(head, &loaded, arrival, &mut state, status, started);
    }

    /// Returns the status sent (0: the client went away before a response).
    async fn exchange<D: Downstream>(
        &self,
        out: &mut respond::Writer<'_, D>,
        loaded: &Arc<Loaded>,
        // By reference, as every argument here: an argument the body copies into a local of its
        // own keeps a slot in the future's first state, and that slot was laid out behind the
        // biggest later state, so building the future copied ~3 KiB instead of a few words.
        arrival: &Arrival,
        state: &mut RequestState,
        started: Instant,
    ) -> Result<u16, u16> {
        let snapshot = &loaded.snapshot;
        let started_ms = clock::now_ms();
        // --- head accepted: limits, host, client, decision ---
        let head = out.head();
        if let Some(reply) = check_head_limits(head.headers, &snapshot.limits) {
            return out.reply(&reply).await;
        }
        let Some(host) = request_host(head.uri, head.headers) else {
            return out.reply(&EdgeReply::new(400, "request has no Host")).await;
        };
        let forwarded = head
            .headers
            .get_all(&forward::X_FORWARDED_FOR_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let client = client_ip(arrival.peer, forwarded, &snapshot.trusted_proxies);
        // Routes match, the cache keys and the upstream gets one normalised path.
        let normalized = match normalized_target(head.uri) {
            Ok(normalized) => normalized,
            Err(e) => return out.reply(&EdgeReply::new(400, e.to_string())).await,
        };
        let target = normalized.as_ref().unwrap_or(head.uri);
        let view = RequestView {
            host,
            path: target.path(),
            client,
        };
        let path_and_query = target.path_and_query().map_or("/", |p| p.as_str());
        let cache_view = CacheRequest {
            method: head.method,
            scheme: arrival.scheme(),
            host,
            path_and_query,
            headers: head.headers,
        };
        let decision = match decide(snapshot, &view, |ip| loaded.geoip.lookup(ip), started_ms) {
            Ok(decision) => decision,
            Err(refusal) => {
                if let Refusal::Residency { route, .. } | Refusal::Unavailable { route, .. } =
                    refusal
                {
                    state.route = Some(route);
                }
                if let (Refusal::Unavailable { route, .. }, Some(cache)) = (refusal, &self.cache) {
                    // stale-if-error when no region can even be tried.
                    // Boxed, as every rarely taken await here: the request's future is as big as its
                    // biggest await, and it is moved whole as the request starts.
                    let unavailable = Box::pin(cache.when_unavailable(loaded, route, &cache_view));
                    if let Some(served) = unavailable.await {
                        return out.served(&served).await;
                    }
                }
                return out.reply(&EdgeReply::refusal(snapshot, &refusal)).await;
            }
        };
        state.route = Some(decision.route);
        state.decision = Some(decision);
        let route = &snapshot.routes[decision.route];

        // --- model calls pick regions by the model in their body and are never cached; other
        // requests on cache-enabled routes go through the response cache ---
        // Boxed: a ticket is ~300 bytes, and the request's future moves it into the relay's
        // state; most requests have none, and `None` of the unboxed type was copied whole too.
        let mut ticket: Option<Box<Ticket>> = None;
        let mut model_call_body = None;
        let entry = (route.kind == RouteKind::Inference).then(|| {
            crate::inference::entry(
                snapshot,
                decision.route,
                head.method,
                target.path(),
                head.headers.get(http::header::AUTHORIZATION),
            )
        });
        // A model call is held to its route's `inference.max_body_bytes` below; everything
        // else to the edge's limit.
        let declared = declared_length(head.headers);
        if !matches!(entry, Some(Entry::ModelCall { .. })) {
            if let Some(reply) = check_declared_length(declared, &snapshot.limits) {
                return out.reply(&reply).await;
            }
        }
        if let Some(Entry::Pass { key }) = entry {
            // Every path of an inference route is gated; other requests are proxied as is.
            if let Err(error) =
                Box::pin(
                    self.inference
                        .admit_other(snapshot, decision.route, key, client),
                )
                .await
            {
                return out.api_error(&error).await;
            }
        }
        match entry {
            Some(Entry::Refused(error)) => return out.api_error(&error).await,
            Some(Entry::Models(json)) => return out.json(200, json).await,
            Some(Entry::ModelCall {
                key,
                max_body_bytes,
            }) => {
                self.inference.start_scraper(&self.store);
                let mut sniffer = crate::inference::sniff::Sniffer::new(PREFIX_BYTES);
                let read = match declared {
                    Some(len) if len > max_body_bytes => Err(BodyError::TooLarge),
                    _ => {
                        Box::pin(body::read_inspected(
                            out.downstream(),
                            max_body_bytes,
                            body_timeout(snapshot),
                            |chunk| sniffer.push(chunk),
                        ))
                        .await
                    }
                };
                let scanned = match read {
                    Ok(Ok(body)) => sniffer.finish().map(|fields| (body, fields)),
                    Ok(Err(e)) => Err(e),
                    Err(e) => {
                        let error = crate::inference::body_error(e, max_body_bytes);
                        return out.api_error(&error).await;
                    }
                };
                let (call_body, fields) = match scanned {
                    Ok(scanned) => scanned,
                    Err(e) => return out.api_error(&crate::inference::call_error(&e)).await,
                };
                let head = out.head();
                let view = RequestView {
                    host,
                    path: normalized.as_ref().unwrap_or(head.uri).path(),
                    client,
                };
                let session_header = &snapshot.config.inference.session_header;
                let session = (!session_header.is_empty())
                    .then(|| head.headers.get(session_header.as_str()))
                    .flatten();
                match Box::pin(self.inference.route_call(
                    snapshot,
                    decision,
                    key,
                    &view,
                    &loaded.geoip,
                    started,
                    &fields,
                    session,
                ))
                .await
                {
                    Ok((model_decision, ctx)) => {
                        state.decision = Some(model_decision);
                        state.inference = Some(ctx);
                    }
                    Err((error, ctx)) => {
                        state.inference = ctx;
                        return out.api_error(&error).await;
                    }
                }
                model_call_body = Some(call_body);
            }
            Some(Entry::Pass { .. }) | None => {
                let lookup = match self
                    .cache
                    .as_ref()
                    .and_then(|cache| cache.lookup(loaded, decision.route, &cache_view))
                {
                    Some(lookup) => Some(std::pin::pin!(lookup).await),
                    None => None,
                };
                match lookup {
                    Some(Lookup::Hit(served)) => return out.served(&served).await,
                    Some(Lookup::Stale { served, refresh }) => {
                        if let Some(ticket) = refresh {
                            self.spawn_refresh(ticket, loaded, decision, &cache_view, *arrival);
                        }
                        return out.served(&served).await;
                    }
                    Some(Lookup::Fetch(t)) => {
                        state.cache = Some(t.status());
                        ticket = Some(Box::new(t));
                    }
                    Some(Lookup::Bypass(_)) => state.cache = Some(CacheStatus::Bypass),
                    None => {}
                }
            }
        }
        let decision = state.decision.unwrap_or(decision);

        // --- the request as the tries send it ---
        let can_upgrade = out.can_upgrade();
        let head = out.head();
        let mut headers = UpstreamHeaders::from_client(head.headers);
        if can_upgrade {
            if let Some(protocol) =
                crate::core::headers::requested_upgrade(head.method, head.headers)
            {
                // `Upgrade` is hop-by-hop: the switch is asked for again on the upstream hop.
                headers.insert(http::header::UPGRADE, protocol.clone());
                headers.insert(
                    http::header::CONNECTION,
                    HeaderValue::from_static("upgrade"),
                );
                state.upgrade = Some(protocol.clone());
            }
        }
        // Over HTTP/1.1 the client's `Host` is already the request's host (the head parser puts
        // an absolute-form target's authority there); HTTP/2 and HTTP/3 carry it as `:authority`.
        if headers.get(&http::header::HOST).map(HeaderValue::as_bytes) != Some(host.as_bytes()) {
            if let Ok(value) = HeaderValue::from_str(host) {
                headers.insert(http::header::HOST, value);
            }
        }
        forward::set_forwarding_headers(
            &mut headers,
            &forward::Forwarding {
                peer: arrival.peer,
                scheme: arrival.scheme(),
                host,
                trusted_peer: is_trusted(snapshot, arrival.peer),
                rfc7239: snapshot.config.edge.forwarded,
            },
        );
        if let Some(access) = state.access.as_deref_mut() {
            access.note_upstream_headers(&headers);
        }
        if let Some(ticket) = ticket.as_ref() {
            // A leader fetches the full response for everyone; a revalidation asks with the
            // stored validators.
            if ticket.fetches_for_others() {
                headers.remove(http::header::IF_NONE_MATCH);
                headers.remove(http::header::IF_MODIFIED_SINCE);
            }
            if ticket.fetches_whole() {
                // A range miss fills the cache with the whole response; the client's range is
                // cut from it on the way back.
                headers.remove(http::header::RANGE);
                headers.remove(http::header::IF_RANGE);
            }
            for (name, value) in ticket.conditional_headers() {
                headers.insert(name, value);
            }
        }
        let method = head.method.clone();
        let uri = origin_form(normalized.as_ref().unwrap_or(head.uri));

        let limit = snapshot.limits.max_body_bytes;
        let (body, pump) = match model_call_body {
            Some(body) => (RequestBody::Whole(body), None),
            None if declared == Some(0) => (RequestBody::Whole(Bytes::new()), None),
            None => {
                let read = body::read_head(
                    out.downstream(),
                    REPLAY_BYTES.min(limit),
                    limit,
                    body_timeout(snapshot),
                )
                .await;
                match read {
                    Ok((head, false)) => (RequestBody::Whole(head), None),
                    Ok((head, true)) => {
                        let (body, pump) = body::stream(head);
                        (body, Some(pump))
                    }
                    Err(e) => return out.reply(&EdgeReply::failure(e.status(), None)).await,
                }
            }
        };
        let replicas = state
            .inference
            .as_ref()
            .map(|_| self.inference.replica_table());
        let call = match (state.inference.as_deref(), replicas.as_deref()) {
            (Some(ctx), Some(table)) => Some(crate::inference::call_pick(snapshot, ctx, table)),
            _ => None,
        };
        // Early hints reach the client while the tries run, unless the client's body is still
        // being pumped (the downstream is busy then) — hints are optional.
        let hints = InterimSink::default();
        let interim = pump.is_none().then_some(&hints);
        let outbound = Outbound {
            method: &method,
            uri: &uri,
            headers: &headers,
            body: &body,
            replay: Replay {
                idempotent: method.is_idempotent() || route.retry_non_idempotent,
                body_replayable: true,
                model_call: state.inference.is_some(),
            },
            call,
            interim,
        };
        let tries = state.tries.insert(Tries::new(decision, started_ms));
        let outcome = std::pin::pin!(self.forward_beside(
            out,
            loaded,
            tries,
            &outbound,
            &mut state.region_inflight,
            state.access.as_deref_mut(),
            started,
            pump,
        ))
        .await;
        match outcome {
            Ok(relayed) => {
                std::pin::pin!(out.relay(self.cache.as_deref(), ticket, relayed, state)).await
            }
            Err(status) => {
                // stale-if-error: every region failed; a stale entry may answer instead.
                if let Some(served) = ticket.and_then(|t| t.stale_on_error(SystemTime::now())) {
                    return out.served(&served).await;
                }
                out.reply(&EdgeReply::failure(status, state.region())).await
            }
        }
    }

    /// The tries, with the client's remaining body pumped (or the origin's early hints relayed)
    /// beside them. A function of its own so that the tries' future is one awaited value of the
    /// exchange's: awaited across the several awaits of this loop, it took a slot of its own in
    /// the exchange's future, which then grew by its whole size (and is copied once per request).
    #[allow(clippy::too_many_arguments)]
    async fn forward_beside<D: Downstream>(
        &self,
        out: &mut respond::Writer<'_, D>,
        loaded: &Loaded,
        tries: &mut Tries,
        outbound: &Outbound<'_>,
        region_inflight: &mut Option<RegionGuard>,
        access: Option<&mut UpstreamSide>,
        started: Instant,
        pump: Option<body::Pump>,
    ) -> Result<Relayed, u16> {
        // Pinned where it is built (several KiB: built first and pinned after, it was copied).
        let mut forward = std::pin::pin!(self.forward(
            loaded,
            tries,
            outbound,
            region_inflight,
            access,
            started,
        ));
        let snapshot = &loaded.snapshot;
        let limit = snapshot.limits.max_body_bytes;
        match (pump, outbound.interim) {
            (None, Some(hints)) => {
                let outcome = loop {
                    tokio::select! {
                        biased;
                        () = hints.arrived() => {
                            for hint in hints.take() {
                                out.interim(hint).await;
                            }
                        }
                        outcome = &mut forward => break outcome,
                    }
                };
                // A hint read in the same poll as the final head still goes first.
                for hint in hints.take() {
                    out.interim(hint).await;
                }
                outcome
            }
            (None, None) => forward.await,
            (Some(pump), _) => {
                // The client's remaining body is read while the tries run, in this task: the pump
                // borrows the downstream until the upstream answered (or gave up).
                let mut pump = Box::pin(pump.run(out.downstream(), limit, body_timeout(snapshot)));
                let mut pumping = true;
                loop {
                    tokio::select! {
                        outcome = &mut forward => break outcome,
                        () = &mut pump, if pumping => pumping = false,
                    }
                }
            }
        }
    }

    /// Tries upstreams in the order the exchange names until one answers with a response to
    /// relay; else the status of the edge's own answer.
    async fn forward(
        &self,
        loaded: &Loaded,
        tries: &mut Tries,
        outbound: &Outbound<'_>,
        region_inflight: &mut Option<RegionGuard>,
        mut access: Option<&mut UpstreamSide>,
        started: Instant,
    ) -> Result<Relayed, u16> {
        let snapshot = &loaded.snapshot;
        let route = &snapshot.routes[tries.decision().route];
        let timeouts = Timeouts::of(route);
        loop {
            let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
            let pick = match outbound.call.as_ref() {
                None => tries.next(snapshot, clock::now_ms(), rotation)?,
                Some(call) => {
                    let (pick, reason) =
                        tries.next_call(snapshot, clock::now_ms(), rotation, call)?;
                    let route = tries.decision().route;
                    self.inference
                        .count_pick(snapshot, route, pick.region, reason);
                    pick
                }
            };
            let region = &snapshot.regions[pick.region];
            let upstream = &region.upstreams[pick.upstream];
            if pick.new_region {
                *region_inflight = Some(region.state.begin());
            }
            if pick.panic {
                self.store
                    .metrics()
                    .health
                    .panic
                    .with_label_values(&[&region.name])
                    .inc();
            }
            let inflight = upstream.state.begin();
            let Some(body) = outbound.body.for_try() else {
                // A streamed body already went (partly) to an upstream: it cannot be replayed.
                return Err(502);
            };
            let request = OutboundHead {
                method: outbound.method,
                uri: outbound.uri,
                headers: outbound.headers,
            };
            if let Some(access) = access.as_deref_mut() {
                access.upstream = Some(pick.address);
            }
            let attempts = loaded.metrics.attempts.get(pick.region);
            let mut result = self
                .connector
                .send(pick.address, request, body, timeouts, outbound.interim)
                .await;
            let replay = Replay {
                body_replayable: outbound.body.replayable(),
                ..outbound.replay
            };
            let now = clock::now_ms();
            let (verdict, effects) = match &mut result {
                Ok(response) => {
                    if let Some(access) = access.as_deref_mut() {
                        access.first_byte = Some(started.elapsed());
                        access.connect = Some(response.connect);
                    }
                    if let Some(series) = attempts {
                        series.ok.inc();
                    }
                    let status = response.status().as_u16();
                    // Only a refused model call reads the fields (its `Retry-After`): the map
                    // is not built for the others.
                    let no_fields = http::HeaderMap::new();
                    let headers = if replay.model_call && matches!(status, 429 | 503) {
                        response.headers()
                    } else {
                        &no_fields
                    };
                    tries.on_response(snapshot, status, headers, replay, now)
                }
                Err(e) if e.is_connect() => {
                    if let Some(series) = attempts {
                        series.connect_error.inc();
                    }
                    tries.on_connect_error(snapshot, e.is_timeout(), e.is_refused(), replay, now)
                }
                Err(_) if outbound.body.client_error().is_some() => {
                    // The client's body broke off (or outgrew the limit): not the upstream's fault.
                    let status = outbound.body.client_error().map_or(400, BodyError::status);
                    return Err(status);
                }
                Err(e) if e.is_stale() => {
                    if let Some(series) = attempts {
                        series.ok.inc();
                    }
                    tries.on_stale_connection(snapshot, replay, now)
                }
                Err(e) => {
                    if let Some(series) = attempts {
                        series.ok.inc();
                    }
                    tries.on_upstream_error(snapshot, e.is_timeout(), replay, now)
                }
            };
            self.count_effects(loaded, tries, pick.region, effects, verdict);
            match (verdict, result) {
                (TryVerdict::Relay, Ok(response)) => {
                    return Ok(Relayed {
                        response,
                        _inflight: inflight,
                    })
                }
                (TryVerdict::Retry(_), result) => {
                    if let Err(e) = result {
                        tracing::debug!("{e}; trying the next upstream");
                    }
                }
                (TryVerdict::Fail(status), result) => {
                    if let Err(e) = result {
                        tracing::debug!("{e}; giving up");
                    }
                    return Err(status);
                }
                (TryVerdict::Relay, Err(_)) => return Err(502),
            }
        }
    }

    /// Ejections and retries in metrics (labels resolved here: both are rare by design).
    fn count_effects(
        &self,
        loaded: &Loaded,
        tries: &Tries,
        region: usize,
        effects: Effects,
        verdict: TryVerdict,
    ) {
        let snapshot = &loaded.snapshot;
        let health = &self.store.metrics().health;
        if effects.ejected {
            if let Some(region) = snapshot.regions.get(region) {
                tracing::warn!(region = %region.name, "upstream ejected after consecutive failures");
                health.ejections.with_label_values(&[&region.name]).inc();
            }
        }
        if let (TryVerdict::Retry(reason), Some(route)) =
            (verdict, snapshot.routes.get(tries.decision().route))
        {
            health
                .retries
                .with_label_values(&[&route.name, reason.label()])
                .inc();
        }
    }

    /// stale-while-revalidate: one fetch off the client's path, through the same tries, connector,
    /// forwarding headers, in-flight accounting and outlier verdicts as a request, fed to the cache
    /// like a miss.
    fn spawn_refresh(
        &self,
        ticket: Ticket,
        loaded: &Arc<Loaded>,
        decision: RouteDecision,
        request: &CacheRequest<'_>,
        arrival: Arrival,
    ) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        let mut headers = UpstreamHeaders::new();
        if let Ok(host) = HeaderValue::from_str(request.host) {
            headers.insert(http::header::HOST, host);
        }
        forward::set_forwarding_headers(
            &mut headers,
            &forward::Forwarding {
                peer: arrival.peer,
                scheme: arrival.scheme(),
                host: request.host,
                trusted_peer: is_trusted(&loaded.snapshot, arrival.peer),
                rfc7239: loaded.snapshot.config.edge.forwarded,
            },
        );
        for (name, value) in ticket.conditional_headers() {
            headers.insert(name, value);
        }
        let uri = request
            .path_and_query
            .parse::<http::uri::PathAndQuery>()
            .map(http::Uri::from)
            .unwrap_or_default();
        let loaded = Arc::clone(loaded);
        let pipeline = self.background();
        tokio::spawn(async move {
            let body = RequestBody::Whole(Bytes::new());
            let outbound = Outbound {
                method: &Method::GET,
                uri: &uri,
                headers: &headers,
                body: &body,
                replay: Replay {
                    idempotent: true,
                    body_replayable: true,
                    model_call: false,
                },
                call: None,
                interim: None,
            };
            let mut tries = Tries::new(decision, clock::now_ms());
            let mut region_inflight = None;
            let started = Instant::now();
            let forwarded = pipeline
                .forward(
                    &loaded,
                    &mut tries,
                    &outbound,
                    &mut region_inflight,
                    None,
                    started,
                )
                .await;
            let Ok(mut relayed) = forwarded else {
                return; // dropping the ticket: the next request revalidates in line
            };
            let status = relayed.response.status().as_u16();
            let admission = cache
                .cache()
                .admit(
                    ticket,
                    status,
                    relayed.response.headers(),
                    SystemTime::now(),
                )
                .await;
            if let crate::cache::Admission::Store(mut writer) = admission {
                loop {
                    match relayed.response.next_chunk().await {
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

    /// A handle for background work: the same store, connector and counters, no cache or
    /// inference state (a refresh needs neither).
    fn background(&self) -> Arc<Pipeline> {
        Arc::new(Pipeline {
            store: Arc::clone(&self.store),
            cache: None,
            inference: Arc::clone(&self.inference),
            connector: self.connector,
            rotation: AtomicUsize::new(self.rotation.load(Ordering::Relaxed)),
            alt_svc: None,
        })
    }

    /// The finish record: request metrics, failover and inference counters, the access log.
    fn finish(
        &self,
        head: Head<'_>,
        loaded: &Loaded,
        arrival: Arrival,
        // Borrowed: the state is a few hundred bytes, and moving it here copied all of it.
        state: &mut RequestState,
        status: u16,
        started: Instant,
    ) {
        state.region_inflight = None;
        let snapshot = &loaded.snapshot;
        let region = state.region();
        if let Some(mut inference) = state.inference.take() {
            self.inference
                .finish(snapshot, region, status, &mut inference);
        }
        if let Some((from, to, reason)) = state.tries.as_ref().and_then(Tries::failover) {
            if let (Some(route), Some(from), Some(to)) = (
                state.route.and_then(|r| snapshot.routes.get(r)),
                snapshot.regions.get(from),
                snapshot.regions.get(to),
            ) {
                self.store
                    .metrics()
                    .health
                    .failovers
                    .with_label_values(&[&route.name, &from.name, &to.name, reason])
                    .inc();
            }
        }
        let elapsed = started.elapsed();
        loaded.metrics.request(state.route, region).observe(
            arrival.protocol,
            status,
            elapsed.as_secs_f64(),
        );
        if let Some(mut side) = state.access.take() {
            side.fill_from_client(head.headers);
            let country = state.decision.and_then(|d| d.country);
            crate::access_log::emit(&crate::access_log::Entry {
                protocol: arrival.protocol,
                method: head.method.as_str(),
                host: request_host(head.uri, head.headers),
                path: head.uri.path(),
                status,
                country: country.as_ref().map(|c| c.as_str()),
                route: state
                    .route
                    .and_then(|r| snapshot.routes.get(r))
                    .map(|r| r.name.as_str()),
                region: region
                    .and_then(|r| snapshot.regions.get(r))
                    .map(|r| r.name.as_str()),
                bytes_sent: Some(state.bytes_sent),
                cache: state.cache.map(|c| c.as_str()),
                total: elapsed,
                side: &side,
            });
        }
    }
}

/// The request target with its path normalised (see [`normalize_path`]), when that changed it;
/// the query is kept as it came.
fn normalized_target(uri: &http::Uri) -> Result<Option<http::Uri>, PathError> {
    let normalized = match normalize_path(uri.path())? {
        std::borrow::Cow::Borrowed(_) => return Ok(None),
        std::borrow::Cow::Owned(path) => path,
    };
    let target = match uri.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized,
    };
    // Normalising only removes characters or decodes unreserved ones: still a valid target.
    Ok(target
        .parse::<http::uri::PathAndQuery>()
        .ok()
        .map(http::Uri::from))
}

/// Is the connection's peer one of `geoip.trusted_proxies`?
fn is_trusted(snapshot: &crate::core::Snapshot, peer: IpAddr) -> bool {
    snapshot
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&peer))
}

/// The request target as an upstream gets it: origin-form (`/path?query`). HTTP/2 and HTTP/3
/// requests (and absolute-form HTTP/1.1 ones) carry scheme and authority in their URI; the upstream
/// learns the host from `Host`. Cloning a `PathAndQuery` shares its bytes.
fn origin_form(uri: &http::Uri) -> http::Uri {
    match uri.path_and_query() {
        Some(_) if uri.scheme().is_none() && uri.authority().is_none() => uri.clone(),
        Some(pq) => http::Uri::from(pq.clone()),
        None => http::Uri::from_static("/"),
    }
}

/// How long a request body may make no progress before the client gets `408`: the edge's
/// `client_body_timeout`, whatever the route's upstream timeouts are.
fn body_timeout(snapshot: &crate::core::Snapshot) -> std::time::Duration {
    snapshot.limits.client_body_timeout.as_duration()
}
