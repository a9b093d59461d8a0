//! One request's life as plain data, whatever the transport (as quinn-proto sits under quinn):
//!
//! 1. **head accepted** — [`check_head_limits`], [`request_host`], then `decide` (see
//!    [`crate::decide`]); a refusal becomes an [`EdgeReply`] via [`EdgeReply::refusal`];
//! 2. **tries** — [`Tries::next`] names the peer of each try (nearest available region first,
//!    weighted least-outstanding upstream inside it), under the route's attempts, deadline and the
//!    region's retry budget;
//! 3. **upstream head or error** — [`Tries::on_response`], [`Tries::on_connect_error`],
//!    [`Tries::on_upstream_error`] record the outlier verdict and say relay, retry or fail;
//!    [`cache_on_response`] says what the cache does with the head;
//! 4. **finish** — [`Tries::failover`] and the served region feed one metrics/access-log record.
//!
//! Drivers (TCP h1/h2, HTTP/3, background cache refresh) move bytes and call these functions, so a
//! rule exists once and behaves the same on every protocol. Time is a millisecond count passed in
//! (`now_ms`), so every rule is table-tested without a clock.

use std::borrow::Cow;
use std::net::SocketAddr;

use bytes::Bytes;
use http::HeaderMap;
use meridian_config::Limits;

use crate::decide::{Refusal, RouteDecision};
use crate::inference::pick::PickReason;
use crate::inference::replicas::CallPick;
use crate::select::{
    ejection_allowed, in_panic, pick_upstream, region_verdict, upstream_eligible, RegionVerdict,
};
use crate::snapshot::{CompiledRegion, Snapshot};

/// Upper bound on tries per request, whatever a route asks for (config caps it at 10).
pub const MAX_TRIES: usize = 10;

/// Longest `Retry-After` penalty honoured from a model server, in seconds.
pub const MAX_PENALTY_SECS: u64 = 300;

/// Why a try was retried elsewhere, or why a request left the region geography preferred
/// (`meridian_retries_total{reason}`, `meridian_failovers_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// The upstream answered with a status the route retries (or a model server refused the work).
    Status,
    /// Connect or response timeout.
    Timeout,
    /// No connection could be made.
    ConnectError,
    /// The connection broke after the request may have reached the upstream.
    UpstreamError,
    /// The preferred region was skipped for its verdict.
    Region(RegionVerdict),
    /// Every model server of the nearer region was saturated (a model call spilled).
    Saturated,
}

impl RetryReason {
    pub fn label(self) -> &'static str {
        match self {
            RetryReason::Status => "status",
            RetryReason::Timeout => "timeout",
            RetryReason::ConnectError => "connect_error",
            RetryReason::UpstreamError => "upstream_error",
            RetryReason::Region(verdict) => verdict.reason(),
            RetryReason::Saturated => "saturated",
        }
    }
}

/// A response the edge writes itself (refusals, limits, upstream failures): one type for every
/// front, so every front writes the same status, headers and JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeReply {
    pub status: u16,
    pub message: Cow<'static, str>,
    /// `Retry-After: 1`: the refusal is temporary (every region down or full).
    pub retry_after: bool,
    /// `x-meridian-region` of the region that failed, when one did.
    pub region: Option<usize>,
}

impl EdgeReply {
    pub fn new(status: u16, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: false,
            region: None,
        }
    }

    /// The answer to a routing refusal.
    pub fn refusal(snapshot: &Snapshot, refusal: &Refusal) -> Self {
        let route_name = |r: usize| snapshot.routes.get(r).map_or("", |r| r.name.as_str());
        let message: Cow<'static, str> = match refusal {
            Refusal::UnknownHost => "no route claims this host".into(),
            Refusal::NoRoute => "no route matches this path".into(),
            Refusal::Unavailable { route, reason } => format!(
                "no region can serve route {:?} right now ({}); retry shortly",
                route_name(*route),
                match reason {
                    RegionVerdict::Full => "all at capacity",
                    RegionVerdict::Drained => "all draining",
                    _ => "all unhealthy",
                }
            )
            .into(),
            Refusal::Residency { route, country } => format!(
                "data residency: no region allowed for clients in {country} can serve route {:?}",
                route_name(*route)
            )
            .into(),
        };
        Self {
            status: refusal.status(),
            message,
            retry_after: matches!(refusal, Refusal::Unavailable { .. }),
            region: None,
        }
    }

    /// Every try failed (or none could be made): `status` with the region of the last try, except
    /// for a 503, which names no region.
    pub fn failure(status: u16, region: Option<usize>) -> Self {
        Self {
            status,
            message: error_message(status).into(),
            retry_after: status == 503,
            region: region.filter(|_| status != 503),
        }
    }

    /// After this answer the connection must not read another request: the edge refused what it
    /// was sent and may not have read all of it.
    pub fn closes_connection(&self) -> bool {
        matches!(self.status, 400 | 408 | 413 | 421 | 431 | 503)
    }

    /// `{"error": message, "status": code, "pop": pop}`.
    pub fn body(&self, pop: &str) -> Bytes {
        Bytes::from(
            serde_json::json!({"error": self.message, "status": self.status, "pop": pop})
                .to_string()
                + "\n",
        )
    }
}

/// The message of an edge answer with no more specific reason.
pub fn error_message(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        408 => "request body did not arrive in time (edge.limits / route timeouts.read)",
        413 => "request body too large (edge.limits.max_body_bytes)",
        502 => "no upstream could be reached",
        503 => "no region can serve this request right now",
        504 => "upstream timed out",
        _ => "request failed",
    }
}

/// Header count and size, checked before any routing work (every front).
pub fn check_head_limits(headers: &HeaderMap, limits: &Limits) -> Option<EdgeReply> {
    if headers.len() > limits.max_headers {
        return Some(EdgeReply::new(
            431,
            "too many request headers (edge.limits.max_headers)",
        ));
    }
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if bytes > limits.max_header_bytes {
        return Some(EdgeReply::new(
            431,
            "request headers too large (edge.limits.max_header_bytes)",
        ));
    }
    None
}

/// A declared body over `edge.limits.max_body_bytes`: checked once the route is known, because
/// a model call is held to its inference route's own `inference.max_body_bytes` instead.
pub fn check_body_limit(headers: &HeaderMap, limits: &Limits) -> Option<EdgeReply> {
    check_declared_length(declared_length(headers), limits)
}

/// [`check_body_limit`] for a length the caller has already read from the head.
pub fn check_declared_length(declared: Option<u64>, limits: &Limits) -> Option<EdgeReply> {
    declared
        .is_some_and(|len| len > limits.max_body_bytes)
        .then(|| EdgeReply::new(413, error_message(413)))
}

/// `Content-Length` as the client declared it.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The host a request is for: the URI authority (HTTP/2, HTTP/3, absolute-form), else `Host`.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .filter(|h| !h.is_empty())
}

/// What a front knows about the request when deciding whether a failed try may be replayed.
#[derive(Clone, Copy, Debug)]
pub struct Replay {
    /// The method may be sent twice (RFC 9110 §9.2.2), or the route allows any method.
    pub idempotent: bool,
    /// The request body can still be sent again (held whole, or nothing of it streamed yet).
    pub body_replayable: bool,
    /// A model call: a model server's 429/503 refuses the work, so even a POST may go elsewhere.
    pub model_call: bool,
}

/// What to do after a try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryVerdict {
    /// Send this response to the client.
    Relay,
    /// Try again (call [`Tries::next`]); the retry has been charged.
    Retry(RetryReason),
    /// Give up with this status.
    Fail(u16),
}

/// The upstream of one try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub region: usize,
    pub upstream: usize,
    pub address: SocketAddr,
    /// The first try in this region (a front counts the request in the region's in-flight total).
    pub new_region: bool,
    /// The region was in panic (too many upstreams ejected): ejections were ignored for this
    /// pick (`meridian_upstream_panic_total`).
    pub panic: bool,
}

/// Side effects of a verdict that the front reports in metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// This failure ejected the upstream of the try (`meridian_upstream_ejections_total`).
    pub ejected: bool,
}

/// The tries of one request: where the next one goes and whether a failed one may be retried.
#[derive(Clone, Debug)]
pub struct Tries {
    decision: RouteDecision,
    started_ms: u64,
    tried: [(u16, u16); MAX_TRIES],
    count: usize,
    /// Position in `decision.candidates` of the region being tried.
    region_pos: usize,
    region: Option<usize>,
    upstream: Option<usize>,
    retry_reason: Option<RetryReason>,
    /// Status of the edge's answer if no later try succeeds.
    failure: u16,
}

impl Tries {
    pub fn new(decision: RouteDecision, started_ms: u64) -> Self {
        Self {
            decision,
            started_ms,
            tried: [(0, 0); MAX_TRIES],
            count: 0,
            region_pos: 0,
            region: None,
            upstream: None,
            retry_reason: None,
            failure: 502,
        }
    }

    pub fn decision(&self) -> &RouteDecision {
        &self.decision
    }

    /// Region of the current (or last) try.
    pub fn region(&self) -> Option<usize> {
        self.region
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Why the last retry happened (or why the preferred region was skipped).
    pub fn retry_reason(&self) -> Option<RetryReason> {
        self.retry_reason
    }

    /// The upstream of the next try, or the status to give up with: 504 when the route's overall
    /// deadline passed, 503 when nothing could be tried at all (every region went down or filled
    /// up since the decision), else the failure of the last try.
    pub fn next(&mut self, snapshot: &Snapshot, now_ms: u64, rotation: usize) -> Result<Pick, u16> {
        self.next_by(snapshot, now_ms, |region, index, tried| {
            pick_upstream(region, now_ms, rotation, |u| was_tried(tried, index, u)).map(|u| (u, ()))
        })
        .map(|(pick, ())| pick)
    }

    /// [`Tries::next`] for a model call: the replica is picked by `call` (the model servers'
    /// state, prefix affinity), and every try — a retry too — spills past a nearer region whose
    /// every replica is saturated to the nearest candidate that is not (the failover reason is
    /// then `saturated`). Also says why that replica was picked.
    pub fn next_call(
        &mut self,
        snapshot: &Snapshot,
        now_ms: u64,
        rotation: usize,
        call: &CallPick<'_>,
    ) -> Result<(Pick, PickReason), u16> {
        let spilled = self.spill(snapshot, now_ms, call);
        self.next_by(snapshot, now_ms, |region, index, tried| {
            call.pick(region, now_ms, rotation, |u| was_tried(tried, index, u))
        })
        .map(|(pick, reason)| {
            let reason = if spilled && pick.new_region {
                PickReason::Spill
            } else {
                reason
            };
            (pick, reason)
        })
    }

    /// Moves the next try past saturated regions when a later candidate is not saturated.
    fn spill(&mut self, snapshot: &Snapshot, now_ms: u64, call: &CallPick<'_>) -> bool {
        let candidates = self.decision.candidates.as_slice();
        let available = |pos: &usize| {
            region_verdict(&snapshot.regions[usize::from(candidates[*pos])], now_ms)
                == RegionVerdict::Available
        };
        let Some(nearest) = (self.region_pos..candidates.len()).find(available) else {
            return false;
        };
        let saturated = |pos: usize| {
            call.region_saturated(&snapshot.regions[usize::from(candidates[pos])], now_ms)
        };
        if !saturated(nearest) {
            return false;
        }
        match (nearest + 1..candidates.len())
            .filter(available)
            .find(|&pos| !saturated(pos))
        {
            Some(pos) => {
                self.region_pos = pos;
                self.retry_reason = Some(RetryReason::Saturated);
                true
            }
            None => false,
        }
    }

    fn next_by<T>(
        &mut self,
        snapshot: &Snapshot,
        now_ms: u64,
        pick: impl FnMut(&CompiledRegion, usize, &[(u16, u16)]) -> Option<(usize, T)>,
    ) -> Result<(Pick, T), u16> {
        let route = &snapshot.routes[self.decision.route];
        if self.count > 0 && self.elapsed(now_ms) >= route.total_timeout.as_millis() as u64 {
            return Err(504);
        }
        let Some((region_index, upstream_index, extra)) =
            self.next_upstream(snapshot, now_ms, pick)
        else {
            return Err(if self.count == 0 { 503 } else { self.failure });
        };
        let region = &snapshot.regions[region_index];
        self.tried[self.count] = (region_index as u16, upstream_index as u16);
        self.count += 1;
        let new_region = self.region != Some(region_index);
        if new_region {
            region.state.budget.note_request(now_ms);
        }
        self.region = Some(region_index);
        self.upstream = Some(upstream_index);
        Ok((
            Pick {
                region: region_index,
                upstream: upstream_index,
                address: region.upstreams[upstream_index].address,
                new_region,
                panic: in_panic(region, now_ms),
            },
            extra,
        ))
    }

    /// The upstream answered with a response head.
    pub fn on_response(
        &mut self,
        snapshot: &Snapshot,
        status: u16,
        headers: &HeaderMap,
        replay: Replay,
        now_ms: u64,
    ) -> (TryVerdict, Effects) {
        let effects = if upstream_failed(status) {
            self.record_failure(snapshot, now_ms)
        } else {
            if let Some(upstream) = self.current_upstream(snapshot) {
                upstream.state.record_success();
            }
            Effects::default()
        };
        let Some(route) = snapshot.routes.get(self.decision.route) else {
            return (TryVerdict::Relay, effects);
        };
        let refused_work = replay.model_call
            && model_server_refused(snapshot, self.region, status, headers, now_ms);
        if !route.retry_on_status.contains(&status) && !refused_work {
            return (TryVerdict::Relay, effects);
        }
        let may_replay = replay.idempotent || refused_work;
        if may_replay && replay.body_replayable && self.may_retry(snapshot, now_ms, false) {
            return (self.retry(RetryReason::Status), effects);
        }
        (TryVerdict::Relay, effects)
    }

    /// No connection could be made: the upstream never saw the request, so any method may go
    /// elsewhere. A refused connection is not charged to the retry budget (nobody did any work).
    pub fn on_connect_error(
        &mut self,
        snapshot: &Snapshot,
        timed_out: bool,
        refused: bool,
        replay: Replay,
        now_ms: u64,
    ) -> (TryVerdict, Effects) {
        let may_replay = replay.body_replayable;
        let reason = RetryReason::ConnectError;
        self.on_failure(snapshot, timed_out, may_replay, refused, reason, now_ms)
    }

    /// The exchange broke after the request may have reached the upstream (reset, timeout waiting
    /// for the head): only what may be replayed goes elsewhere.
    pub fn on_upstream_error(
        &mut self,
        snapshot: &Snapshot,
        timed_out: bool,
        replay: Replay,
        now_ms: u64,
    ) -> (TryVerdict, Effects) {
        let may_replay = replay.idempotent && replay.body_replayable;
        let reason = RetryReason::UpstreamError;
        self.on_failure(snapshot, timed_out, may_replay, false, reason, now_ms)
    }

    /// A try that failed on the upstream's side (charged to it): 504 when it timed out, else
    /// 502, and another try when the request `may_replay` and the budget allows, for `Timeout`
    /// or `reason`. `refused`: nobody did any work, so the retry budget is not charged.
    fn on_failure(
        &mut self,
        snapshot: &Snapshot,
        timed_out: bool,
        may_replay: bool,
        refused: bool,
        reason: RetryReason,
        now_ms: u64,
    ) -> (TryVerdict, Effects) {
        let effects = self.record_failure(snapshot, now_ms);
        self.failure = if timed_out { 504 } else { 502 };
        if may_replay && self.may_retry(snapshot, now_ms, refused) {
            let reason = if timed_out {
                RetryReason::Timeout
            } else {
                reason
            };
            return (self.retry(reason), effects);
        }
        (TryVerdict::Fail(self.failure), effects)
    }

    /// A kept-alive connection closed before answering, and the request could not be resent on
    /// a fresh one (the connector already did that when it could). Upstreams close idle
    /// connections as a matter of course, and this one raced the request: never charged to the
    /// upstream's health or ejection. Only what may be sent twice goes elsewhere.
    pub fn on_stale_connection(
        &mut self,
        snapshot: &Snapshot,
        replay: Replay,
        now_ms: u64,
    ) -> (TryVerdict, Effects) {
        self.failure = 502;
        if replay.idempotent && replay.body_replayable && self.may_retry(snapshot, now_ms, false) {
            return (self.retry(RetryReason::UpstreamError), Effects::default());
        }
        (TryVerdict::Fail(self.failure), Effects::default())
    }

    /// The request was served by another region than the one geography (and residency)
    /// preferred: (preferred, served, reason) for `meridian_failovers_total`.
    pub fn failover(&self) -> Option<(usize, usize, &'static str)> {
        let preferred = self.decision.candidates.preferred.map(usize::from)?;
        let served = self.region?;
        if preferred == served {
            return None;
        }
        let reason = self
            .retry_reason
            .map(RetryReason::label)
            .or(self.decision.candidates.skipped.map(|v| v.reason()))
            .unwrap_or("unhealthy");
        Some((preferred, served, reason))
    }

    fn retry(&mut self, reason: RetryReason) -> TryVerdict {
        self.retry_reason = Some(reason);
        TryVerdict::Retry(reason)
    }

    fn elapsed(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.started_ms)
    }

    fn current_upstream<'s>(
        &self,
        snapshot: &'s Snapshot,
    ) -> Option<&'s crate::snapshot::CompiledUpstream> {
        snapshot
            .regions
            .get(self.region?)?
            .upstreams
            .get(self.upstream?)
    }

    /// Passive outlier detection: one more failure for the upstream of the current try, which
    /// ejects it only while the region's ejection cap leaves room.
    fn record_failure(&self, snapshot: &Snapshot, now_ms: u64) -> Effects {
        let (Some(region), Some(upstream)) = (
            self.region.and_then(|r| snapshot.regions.get(r)),
            self.current_upstream(snapshot),
        ) else {
            return Effects::default();
        };
        let may_eject = ejection_allowed(region, now_ms);
        Effects {
            ejected: upstream
                .state
                .record_failure(now_ms, &region.outlier, may_eject),
        }
    }

    fn was_tried(&self, region: usize, upstream: usize) -> bool {
        was_tried(&self.tried[..self.count], region, upstream)
    }

    /// One more try is allowed: the route's `retry.attempts`, the overall deadline, somewhere left
    /// to go, and the retry budget of the region that just failed. A refused connection is not
    /// charged to the budget: a hard region outage is exactly when every in-flight request needs
    /// its failover try at once.
    fn may_retry(&self, snapshot: &Snapshot, now_ms: u64, refused: bool) -> bool {
        let Some(route) = snapshot.routes.get(self.decision.route) else {
            return false;
        };
        if self.count >= route.retry_attempts as usize
            || self.elapsed(now_ms) >= route.total_timeout.as_millis() as u64
        {
            return false;
        }
        let Some(region) = self.region.and_then(|r| snapshot.regions.get(r)) else {
            return false;
        };
        // A retry with nowhere to go would turn the upstream's own answer into a 502.
        if !self.has_next_candidate(snapshot, now_ms) {
            return false;
        }
        refused
            || region.state.budget.try_spend(
                now_ms,
                route.retry_budget_percent,
                route.retry_budget_min,
            )
    }

    /// Is there an untried, available upstream in the current or a later candidate region?
    fn has_next_candidate(&self, snapshot: &Snapshot, now_ms: u64) -> bool {
        let candidates = self.decision.candidates.as_slice();
        candidates[self.region_pos.min(candidates.len())..]
            .iter()
            .map(|&r| usize::from(r))
            .any(|r| {
                let region = &snapshot.regions[r];
                let panic = in_panic(region, now_ms);
                region_verdict(region, now_ms) == RegionVerdict::Available
                    && region.upstreams.iter().enumerate().any(|(u, upstream)| {
                        upstream_eligible(upstream, now_ms, panic) && !self.was_tried(r, u)
                    })
            })
    }

    /// The first candidate region (from `region_pos` on, advancing it) that is available now and
    /// has an untried upstream. Health and capacity are checked again at each try: they change
    /// under our feet. A region skipped for its verdict becomes the failover reason if none was
    /// noted yet.
    fn next_upstream<T>(
        &mut self,
        snapshot: &Snapshot,
        now_ms: u64,
        mut pick: impl FnMut(&CompiledRegion, usize, &[(u16, u16)]) -> Option<(usize, T)>,
    ) -> Option<(usize, usize, T)> {
        while let Some(region_index) = self.decision.candidates.get(self.region_pos) {
            let region = &snapshot.regions[region_index];
            let verdict = region_verdict(region, now_ms);
            let picked = if verdict == RegionVerdict::Available && self.count < MAX_TRIES {
                pick(region, region_index, &self.tried[..self.count])
            } else {
                if verdict != RegionVerdict::Available && self.retry_reason.is_none() {
                    self.retry_reason = Some(RetryReason::Region(verdict));
                }
                None
            };
            match picked {
                Some((upstream, extra)) => return Some((region_index, upstream, extra)),
                None => self.region_pos += 1,
            }
        }
        None
    }
}

/// Is (`region`, `upstream`) among the `tried` pairs?
fn was_tried(tried: &[(u16, u16)], region: usize, upstream: usize) -> bool {
    tried
        .iter()
        .any(|&(r, u)| usize::from(r) == region && usize::from(u) == upstream)
}

/// Does a response status count against the upstream's health? 5xx says the upstream failed,
/// except `501` and `505`: those answer what the client asked for (a method or version the
/// origin does not do), however healthy the upstream is.
pub fn upstream_failed(status: u16) -> bool {
    status >= 500 && status != 501 && status != 505
}

/// A model server's `429`/`503` refuses the work (so even a POST may go to the next region);
/// its `Retry-After` keeps new requests away from that region for that long (at most
/// [`MAX_PENALTY_SECS`]).
pub fn model_server_refused(
    snapshot: &Snapshot,
    region: Option<usize>,
    status: u16,
    headers: &HeaderMap,
    now_ms: u64,
) -> bool {
    if status != 429 && status != 503 {
        return false;
    }
    let retry_after = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let (Some(seconds), Some(region)) =
        (retry_after, region.and_then(|r| snapshot.regions.get(r)))
    {
        let seconds = seconds.min(MAX_PENALTY_SECS);
        region
            .state
            .penalize_until(now_ms.saturating_add(seconds * 1000));
    }
    true
}

/// What the response cache does with an upstream head, for a request that fetches for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOnResponse {
    /// An error while a stale entry exists: serve the stale entry if its stale-if-error window
    /// allows (the stale entry must survive the error).
    ServeStale,
    /// Offer the response to the cache (it decides whether to store it).
    Admit,
}

pub fn cache_on_response(status: u16, had_stale: bool) -> CacheOnResponse {
    if status >= 500 && had_stale {
        CacheOnResponse::ServeStale
    } else {
        CacheOnResponse::Admit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{decide, RequestView};
    use crate::snapshot::{SnapshotMeta, UpstreamStates};
    use meridian_config::Config;

    /// One route over two regions (one upstream each, then two), tight outlier settings.
    const TWO_REGIONS: &str = r#"
schema = 1
[edge]
pop = "test"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[[regions]]
name = "near"
location = { lat = 0.0, lon = 0.0 }
upstreams = [{ address = "127.1.1.1:80" }]
outlier = { consecutive_failures = 2, base_ejection = "10s", max_ejection = "60s" }

[[regions]]
name = "far"
location = { lat = 10.0, lon = 10.0 }
upstreams = [{ address = "127.1.2.1:80" }, { address = "127.1.2.2:80" }]

[[routes]]
name = "api"
hosts = ["api.test"]
regions = ["near", "far"]
default_region = "near"
retry = { attempts = 3, on_status = [503], budget_percent = 100, budget_min_per_window = 100 }
timeouts = { total = "5s" }
"#;

    fn snapshot() -> Snapshot {
        compile(TWO_REGIONS)
    }

    fn tries(snap: &Snapshot) -> Tries {
        let view = RequestView {
            host: "api.test",
            path: "/",
            client: "127.0.0.1".parse().expect("ip"),
        };
        let decision = decide(snap, &view, |_| None, 0).expect("decision");
        Tries::new(decision, 0)
    }

    const GET: Replay = Replay {
        idempotent: true,
        body_replayable: true,
        model_call: false,
    };
    const POST: Replay = Replay {
        idempotent: false,
        ..GET
    };

    fn region_name(snap: &Snapshot, pick: Pick) -> &str {
        &snap.regions[pick.region].name
    }

    #[test]
    fn retry_rules_by_failure_and_method() {
        struct Case {
            name: &'static str,
            replay: Replay,
            fail: fn(&mut Tries, &Snapshot, Replay) -> TryVerdict,
            expect: TryVerdict,
        }
        let headers = HeaderMap::new();
        let cases = [
            Case {
                name: "GET, retryable status",
                replay: GET,
                fail: |t, s, r| t.on_response(s, 503, &HeaderMap::new(), r, 1).0,
                expect: TryVerdict::Retry(RetryReason::Status),
            },
            Case {
                name: "POST, retryable status: relayed (the upstream did the work)",
                replay: POST,
                fail: |t, s, r| t.on_response(s, 503, &HeaderMap::new(), r, 1).0,
                expect: TryVerdict::Relay,
            },
            Case {
                name: "GET, status the route does not retry",
                replay: GET,
                fail: |t, s, r| t.on_response(s, 500, &HeaderMap::new(), r, 1).0,
                expect: TryVerdict::Relay,
            },
            Case {
                name: "POST, connect refused: nobody saw it",
                replay: POST,
                fail: |t, s, r| t.on_connect_error(s, false, true, r, 1).0,
                expect: TryVerdict::Retry(RetryReason::ConnectError),
            },
            Case {
                name: "GET, connect timeout",
                replay: GET,
                fail: |t, s, r| t.on_connect_error(s, true, false, r, 1).0,
                expect: TryVerdict::Retry(RetryReason::Timeout),
            },
            Case {
                name: "POST, reset after sending: may have been seen",
                replay: POST,
                fail: |t, s, r| t.on_upstream_error(s, false, r, 1).0,
                expect: TryVerdict::Fail(502),
            },
            Case {
                name: "GET, response timeout",
                replay: GET,
                fail: |t, s, r| t.on_upstream_error(s, true, r, 1).0,
                expect: TryVerdict::Retry(RetryReason::Timeout),
            },
            Case {
                name: "GET, body already streamed: cannot replay",
                replay: Replay {
                    body_replayable: false,
                    ..GET
                },
                fail: |t, s, r| t.on_upstream_error(s, false, r, 1).0,
                expect: TryVerdict::Fail(502),
            },
            Case {
                name: "model call, 429 from the model server: goes elsewhere even as POST",
                replay: Replay {
                    model_call: true,
                    ..POST
                },
                fail: |t, s, r| t.on_response(s, 429, &HeaderMap::new(), r, 1).0,
                expect: TryVerdict::Retry(RetryReason::Status),
            },
        ];
        drop(headers);
        for case in cases {
            let snap = snapshot();
            let mut t = tries(&snap);
            let first = t.next(&snap, 0, 0).expect("first pick");
            assert_eq!(region_name(&snap, first), "near", "{}", case.name);
            assert_eq!(
                (case.fail)(&mut t, &snap, case.replay),
                case.expect,
                "{}",
                case.name
            );
            if let TryVerdict::Retry(reason) = case.expect {
                let second = t.next(&snap, 2, 0).expect("second pick");
                assert_eq!(
                    region_name(&snap, second),
                    "far",
                    "{}: fails over",
                    case.name
                );
                assert_eq!(
                    t.failover(),
                    Some((first.region, second.region, reason.label())),
                    "{}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn a_model_call_spills_past_a_saturated_region() {
        use crate::inference::pick::{PickParams, ReplicaMetrics};
        use crate::inference::replicas::{ReplicaState, ReplicaTable};
        let snap = snapshot();
        let queue = |waiting: f64| ReplicaState {
            metrics: ReplicaMetrics {
                waiting,
                ..ReplicaMetrics::default()
            },
            adapters: None,
        };
        let table = |near: f64, far: f64| ReplicaTable {
            at_ms: 0,
            replicas: snap
                .regions
                .iter()
                .flat_map(|r| r.upstreams.iter().map(move |u| (r.name.clone(), u.address)))
                .map(|(name, a)| (a, queue(if name == "near" { near } else { far })))
                .collect(),
        };
        let call = |table| CallPick {
            model_aware: true,
            params: PickParams::default(),
            affinity: Some(7),
            memory: None,
            model: "m",
            table,
            stale_after_ms: 1_000,
        };
        let saturated_near = table(20.0, 0.0);
        let mut t = tries(&snap);
        let (pick, reason) = t
            .next_call(&snap, 0, 0, &call(&saturated_near))
            .expect("pick");
        assert_eq!(
            (region_name(&snap, pick), reason),
            ("far", PickReason::Spill)
        );
        assert_eq!(t.failover(), Some((0, 1, "saturated")));
        // Everything saturated: nowhere better to go, the nearest takes it.
        let everywhere = table(20.0, 20.0);
        let mut t = tries(&snap);
        let (pick, reason) = t.next_call(&snap, 0, 0, &call(&everywhere)).expect("pick");
        assert_eq!(region_name(&snap, pick), "near");
        assert_ne!(reason, PickReason::Spill);
        // Stale numbers never spill.
        let mut t = tries(&snap);
        let (pick, reason) = t
            .next_call(&snap, 5_000, 0, &call(&saturated_near))
            .expect("pick");
        assert_eq!(
            (region_name(&snap, pick), reason),
            ("near", PickReason::Fallback)
        );
        // A retry after the spill goes on from the region spilled to.
        let mut t = tries(&snap);
        t.next_call(&snap, 0, 0, &call(&saturated_near))
            .expect("pick");
        t.on_connect_error(&snap, false, true, POST, 0);
        let (pick, _) = t
            .next_call(&snap, 0, 0, &call(&saturated_near))
            .expect("retry");
        assert_eq!(region_name(&snap, pick), "far", "the other upstream of far");
    }

    #[test]
    fn a_retry_spills_past_a_region_that_filled_up() {
        use crate::inference::pick::{PickParams, ReplicaMetrics};
        use crate::inference::replicas::{ReplicaState, ReplicaTable};
        // Two replicas near, so a retry could stay there.
        let snap = compile(&TWO_REGIONS.replace(
            r#"upstreams = [{ address = "127.1.1.1:80" }]"#,
            r#"upstreams = [{ address = "127.1.1.1:80" }, { address = "127.1.1.3:80" }]"#,
        ));
        let table = |near: f64| ReplicaTable {
            at_ms: 0,
            replicas: snap
                .regions
                .iter()
                .flat_map(|r| r.upstreams.iter().map(move |u| (r.name.clone(), u.address)))
                .map(|(name, address)| {
                    let waiting = if name == "near" { near } else { 0.0 };
                    let metrics = ReplicaMetrics {
                        waiting,
                        ..ReplicaMetrics::default()
                    };
                    let state = ReplicaState {
                        metrics,
                        adapters: None,
                    };
                    (address, state)
                })
                .collect(),
        };
        let (quiet, full) = (table(0.0), table(20.0));
        let call = |table| CallPick {
            model_aware: true,
            params: PickParams::default(),
            affinity: None,
            memory: None,
            model: "m",
            table,
            stale_after_ms: 1_000,
        };
        let mut t = tries(&snap);
        let (pick, _) = t.next_call(&snap, 0, 0, &call(&quiet)).expect("pick");
        assert_eq!(region_name(&snap, pick), "near");
        t.on_connect_error(&snap, false, true, POST, 0);
        let (pick, reason) = t.next_call(&snap, 0, 0, &call(&full)).expect("retry");
        assert_eq!(
            (region_name(&snap, pick), reason),
            ("far", PickReason::Spill),
            "not the other replica of the saturated near"
        );
        assert_eq!(t.failover(), Some((0, 1, "saturated")));
        // Not saturated: the retry takes the other replica near.
        let mut t = tries(&snap);
        t.next_call(&snap, 0, 0, &call(&quiet)).expect("pick");
        t.on_connect_error(&snap, false, true, POST, 0);
        let (pick, reason) = t.next_call(&snap, 0, 0, &call(&quiet)).expect("retry");
        assert_eq!(
            (region_name(&snap, pick), reason),
            ("near", PickReason::Score)
        );
    }

    #[test]
    fn attempts_and_deadline_bound_the_tries() {
        let snap = snapshot();
        let mut t = tries(&snap);
        for _ in 0..2 {
            t.next(&snap, 0, 0).expect("pick");
            let (verdict, _) = t.on_connect_error(&snap, false, true, GET, 0);
            assert!(matches!(verdict, TryVerdict::Retry(_)));
        }
        t.next(&snap, 0, 0).expect("third pick");
        assert_eq!(
            t.on_connect_error(&snap, false, true, GET, 0).0,
            TryVerdict::Fail(502),
            "retry.attempts = 3"
        );
        let mut t = tries(&snap);
        t.next(&snap, 0, 0).expect("pick");
        assert_eq!(
            t.on_connect_error(&snap, true, false, GET, 0).0,
            TryVerdict::Retry(RetryReason::Timeout)
        );
        assert_eq!(
            t.next(&snap, 5_000, 0),
            Err(504),
            "timeouts.total passed: no new try"
        );
    }

    #[test]
    fn consecutive_failures_never_eject_a_regions_only_upstream() {
        let snap = snapshot();
        for _ in 0..10 {
            let mut t = tries(&snap);
            let pick = t.next(&snap, 0, 0).expect("pick");
            assert_eq!(region_name(&snap, pick), "near");
            let (_, effects) = t.on_response(&snap, 502, &HeaderMap::new(), POST, 0);
            assert!(!effects.ejected, "at least one upstream always stays in");
        }
        let mut t = tries(&snap);
        let pick = t.next(&snap, 1, 0).expect("pick");
        assert_eq!(region_name(&snap, pick), "near", "no failover for ejection");
        assert!(!pick.panic);
    }

    /// One region of four upstreams that fail once to be ejected.
    const FOUR: &str = r#"
schema = 1
[edge]
pop = "test"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[[regions]]
name = "near"
location = { lat = 0.0, lon = 0.0 }
upstreams = [{ address = "127.1.1.1:80" }, { address = "127.1.1.2:80" }, { address = "127.1.1.3:80" }, { address = "127.1.1.4:80" }]
outlier = { consecutive_failures = 1, base_ejection = "10s", max_ejection = "60s", max_ejection_percent = 50, panic_threshold = 50 }

[[routes]]
name = "api"
hosts = ["api.test"]
regions = ["near"]
default_region = "near"
"#;

    fn compile(text: &str) -> Snapshot {
        let config = Config::from_toml_str(text).expect("config");
        Snapshot::compile(config, SnapshotMeta::default(), &UpstreamStates::default())
            .expect("compile")
    }

    #[test]
    fn ejections_stop_at_max_ejection_percent() {
        let snap = compile(FOUR);
        let mut ejected = 0;
        for _ in 0..8 {
            let mut t = tries(&snap);
            t.next(&snap, 0, 0).expect("pick");
            let (_, effects) = t.on_response(&snap, 503, &HeaderMap::new(), POST, 0);
            ejected += usize::from(effects.ejected);
        }
        assert_eq!(ejected, 2, "50 % of four");
        let region = &snap.regions[0];
        let left = region.upstreams.iter().filter(|u| !u.state.is_ejected(0));
        assert_eq!(left.count(), 2);
        assert_eq!(region_verdict(region, 0), RegionVerdict::Available);
    }

    #[test]
    fn client_caused_statuses_do_not_count_against_the_upstream() {
        let snap = compile(FOUR);
        for status in [501, 505, 404, 429, 499] {
            let mut t = tries(&snap);
            t.next(&snap, 0, 0).expect("pick");
            let (_, effects) = t.on_response(&snap, status, &HeaderMap::new(), POST, 0);
            assert!(!effects.ejected, "{status}");
        }
        assert!(snap.regions[0]
            .upstreams
            .iter()
            .all(|u| !u.state.is_ejected(0)));
    }

    #[test]
    fn a_pooled_connection_closed_before_answering_is_never_charged() {
        let snap = compile(FOUR);
        for replay in [POST, GET] {
            for _ in 0..4 {
                let mut t = tries(&snap);
                t.next(&snap, 0, 0).expect("pick");
                let (verdict, effects) = t.on_stale_connection(&snap, replay, 0);
                assert!(!effects.ejected);
                let expect = if replay.idempotent {
                    TryVerdict::Retry(RetryReason::UpstreamError)
                } else {
                    TryVerdict::Fail(502)
                };
                assert_eq!(
                    verdict, expect,
                    "only what may be sent twice goes elsewhere"
                );
            }
        }
        assert!(snap.regions[0]
            .upstreams
            .iter()
            .all(|u| !u.state.is_ejected(0)));
    }

    #[test]
    fn below_the_panic_threshold_ejections_are_ignored() {
        let snap = compile(FOUR);
        // Two ejected (the cap), then active checks take the other two down: the region's only
        // healthy upstreams are ejected ones.
        for _ in 0..2 {
            let mut t = tries(&snap);
            t.next(&snap, 0, 0).expect("pick");
            t.on_response(&snap, 503, &HeaderMap::new(), POST, 0);
        }
        let region = &snap.regions[0];
        for u in region.upstreams.iter().filter(|u| !u.state.is_ejected(0)) {
            u.state.record_probe(false, 1, 1);
        }
        let mut t = tries(&snap);
        let pick = t.next(&snap, 1, 0).expect("panic routing, not a 503");
        assert!(pick.panic);
        assert!(region.upstreams[pick.upstream].state.is_ejected(1));
        // Ejections over: no panic.
        let mut t = tries(&snap);
        let pick = t.next(&snap, 60_000, 0).expect("pick");
        assert!(!pick.panic);
    }

    #[test]
    fn nothing_to_try_is_a_503() {
        let snap = snapshot();
        let mut t = tries(&snap);
        for region in &snap.regions {
            for upstream in &region.upstreams {
                upstream.state.record_probe(false, 1, 1);
            }
        }
        assert_eq!(t.next(&snap, 0, 0), Err(503));
    }

    #[test]
    fn replies_for_refusals_and_failures() {
        let snap = snapshot();
        let cases = [
            (
                EdgeReply::refusal(&snap, &Refusal::UnknownHost),
                421,
                false,
                true,
            ),
            (
                EdgeReply::refusal(&snap, &Refusal::NoRoute),
                404,
                false,
                false,
            ),
            (
                EdgeReply::refusal(
                    &snap,
                    &Refusal::Unavailable {
                        route: 0,
                        reason: RegionVerdict::Full,
                    },
                ),
                503,
                true,
                true,
            ),
            (EdgeReply::failure(504, Some(1)), 504, false, false),
            (EdgeReply::failure(503, Some(1)), 503, true, true),
        ];
        for (reply, status, retry_after, closes) in cases {
            assert_eq!(reply.status, status, "{reply:?}");
            assert_eq!(reply.retry_after, retry_after, "{reply:?}");
            assert_eq!(reply.closes_connection(), closes, "{reply:?}");
            let body: serde_json::Value =
                serde_json::from_slice(&reply.body("pop-1")).expect("json");
            assert_eq!(body["status"], status);
            assert_eq!(body["pop"], "pop-1");
        }
        assert_eq!(EdgeReply::failure(503, Some(1)).region, None);
        assert_eq!(EdgeReply::failure(502, Some(1)).region, Some(1));
    }

    #[test]
    fn head_limits() {
        let limits = Limits::default();
        let mut headers = HeaderMap::new();
        assert_eq!(check_head_limits(&headers, &limits), None);
        headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(limits.max_body_bytes + 1),
        );
        assert_eq!(check_head_limits(&headers, &limits), None);
        assert_eq!(
            check_body_limit(&headers, &limits).map(|r| r.status),
            Some(413)
        );
        let mut headers = HeaderMap::new();
        for i in 0..=limits.max_headers {
            headers.insert(
                http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).expect("name"),
                http::HeaderValue::from_static("v"),
            );
        }
        assert_eq!(
            check_head_limits(&headers, &limits).map(|r| r.status),
            Some(431)
        );
    }

    #[test]
    fn cache_keeps_stale_entries_through_errors() {
        let table = [
            (200, false, CacheOnResponse::Admit),
            (200, true, CacheOnResponse::Admit),
            (304, true, CacheOnResponse::Admit),
            (500, false, CacheOnResponse::Admit),
            (502, true, CacheOnResponse::ServeStale),
        ];
        for (status, had_stale, expect) in table {
            assert_eq!(
                cache_on_response(status, had_stale),
                expect,
                "{status} {had_stale}"
            );
        }
    }
}
