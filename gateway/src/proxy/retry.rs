//! When a failed try may be retried, which upstream the next try goes to, and how retries and
//! failovers are counted. Transport-free: the Pingora front (h1/h2) and the HTTP/3 front both keep a
//! [`Tries`] view of their request and call the same functions, so retries behave the same on both.

use std::time::Instant;

use crate::core::select::{pick_upstream, region_verdict, RegionVerdict};
use crate::core::{RouteDecision, Snapshot};
use crate::metrics::HealthMetrics;

use super::RequestCtx;

/// Upper bound on tries per request, whatever a route asks for (config caps it at 10).
pub(crate) const MAX_TRIES: usize = 10;

/// What the retry rules need to know about a request's tries so far, whatever the front.
pub(crate) struct Tries<'a> {
    pub decision: &'a RouteDecision,
    pub started: Instant,
    /// (region, upstream) pairs already tried, in order.
    pub tried: &'a [(u16, u16)],
    /// Region of the last try.
    pub region: Option<usize>,
    /// Position in `decision.candidates` of the region being tried.
    pub region_pos: usize,
}

impl Tries<'_> {
    fn was_tried(&self, region: usize, upstream: usize) -> bool {
        self.tried
            .iter()
            .any(|&(r, u)| usize::from(r) == region && usize::from(u) == upstream)
    }
}

/// [`may_retry`] for the Pingora front's request context.
pub(super) fn allowed(snapshot: &Snapshot, ctx: &RequestCtx, refused: bool) -> bool {
    let Some(decision) = ctx.decision.as_ref() else {
        return false;
    };
    let tries = Tries {
        decision,
        started: ctx.started,
        tried: &ctx.tried[..ctx.tries],
        region: ctx.region,
        region_pos: ctx.region_pos,
    };
    may_retry(snapshot, &tries, refused)
}

/// One more try is allowed: the route's `retry.attempts`, the overall deadline, somewhere left to
/// go, and the retry budget of the region that just failed. A refused connection is not charged
/// to the budget: no upstream did any work, so retrying it multiplies nobody's load — and a hard
/// region outage is exactly when every in-flight request needs its failover try at once.
pub(crate) fn may_retry(snapshot: &Snapshot, tries: &Tries<'_>, refused: bool) -> bool {
    let Some(route) = snapshot.routes.get(tries.decision.route) else {
        return false;
    };
    if tries.tried.len() >= route.retry_attempts as usize
        || tries.started.elapsed() >= route.total_timeout
    {
        return false;
    }
    let Some(region) = tries.region.and_then(|r| snapshot.regions.get(r)) else {
        return false;
    };
    // A retry with nowhere to go would turn the upstream's own answer into a 502.
    if !has_next_candidate(snapshot, tries) {
        return false;
    }
    if refused {
        return true;
    }
    region.state.budget.try_spend(
        crate::clock::now_ms(),
        route.retry_budget_percent,
        route.retry_budget_min,
    )
}

/// Is there an untried, available upstream in the current or a later candidate region?
fn has_next_candidate(snapshot: &Snapshot, tries: &Tries<'_>) -> bool {
    let decision = tries.decision;
    let now = crate::clock::now_ms();
    decision.candidates.as_slice()[tries.region_pos.min(decision.candidates.len())..]
        .iter()
        .map(|&r| usize::from(r))
        .any(|r| {
            let region = &snapshot.regions[r];
            region_verdict(region, now) == RegionVerdict::Available
                && region
                    .upstreams
                    .iter()
                    .enumerate()
                    .any(|(u, upstream)| upstream.is_available(now) && !tries.was_tried(r, u))
        })
}

/// The upstream of the next try: the first candidate region (from `region_pos` on, advancing it)
/// that is available now and has an untried upstream. Health and capacity are checked again at
/// each try: they change under our feet. When a region is skipped for its verdict and no reason
/// was noted yet, `retry_reason` says why (for `meridian_failovers_total`).
pub(crate) fn next_upstream(
    snapshot: &Snapshot,
    decision: &RouteDecision,
    region_pos: &mut usize,
    tried: &[(u16, u16)],
    rotation: usize,
    now: u64,
    retry_reason: &mut Option<&'static str>,
) -> Option<(usize, usize)> {
    while let Some(region_index) = decision.candidates.get(*region_pos) {
        let region = &snapshot.regions[region_index];
        let verdict = region_verdict(region, now);
        let picked = if verdict == RegionVerdict::Available && tried.len() < MAX_TRIES {
            pick_upstream(region, now, rotation, |u| {
                tried
                    .iter()
                    .any(|&(r, t)| usize::from(r) == region_index && usize::from(t) == u)
            })
        } else {
            if verdict != RegionVerdict::Available && retry_reason.is_none() {
                *retry_reason = Some(verdict.reason());
            }
            None
        };
        match picked {
            Some(upstream) => return Some((region_index, upstream)),
            None => *region_pos += 1,
        }
    }
    None
}

/// Counts one retry of `route` for `reason` (`meridian_retries_total`).
pub(crate) fn count_retry(
    snapshot: &Snapshot,
    metrics: &HealthMetrics,
    route: usize,
    reason: &'static str,
) {
    if let Some(route) = snapshot.routes.get(route) {
        metrics
            .retries
            .with_label_values(&[&route.name, reason])
            .inc();
    }
}

pub(super) fn count(
    snapshot: &Snapshot,
    metrics: &HealthMetrics,
    ctx: &mut RequestCtx,
    reason: &'static str,
) {
    ctx.retry_reason = Some(reason);
    if let Some(decision) = ctx.decision {
        count_retry(snapshot, metrics, decision.route, reason);
    }
}

/// A request served by another region than the one geography (and residency) preferred.
/// Rare by design, so labels are resolved here rather than precompiled for every region pair.
pub(crate) fn count_failover(
    snapshot: &Snapshot,
    metrics: &HealthMetrics,
    decision: &RouteDecision,
    served: usize,
    reason: Option<&'static str>,
) {
    let Some(preferred) = decision.candidates.preferred.map(usize::from) else {
        return;
    };
    if preferred == served {
        return;
    }
    let (Some(route), Some(from), Some(to)) = (
        snapshot.routes.get(decision.route),
        snapshot.regions.get(preferred),
        snapshot.regions.get(served),
    ) else {
        return;
    };
    let reason = reason
        .or(decision.candidates.skipped.map(|v| v.reason()))
        .unwrap_or("unhealthy");
    metrics
        .failovers
        .with_label_values(&[&route.name, &from.name, &to.name, reason])
        .inc();
}
