//! When a failed try may be retried, and how retries and failovers are counted.

use crate::core::{RouteDecision, Snapshot};
use crate::metrics::HealthMetrics;

use super::RequestCtx;

/// One more try is allowed: the route's `retry.attempts`, the overall deadline, somewhere left to
/// go, and the retry budget of the region that just failed. A refused connection is not charged
/// to the budget: no upstream did any work, so retrying it multiplies nobody's load — and a hard
/// region outage is exactly when every in-flight request needs its failover try at once.
pub(super) fn allowed(snapshot: &Snapshot, ctx: &RequestCtx, refused: bool) -> bool {
    let Some(route) = ctx.decision.and_then(|d| snapshot.routes.get(d.route)) else {
        return false;
    };
    if ctx.tries >= route.retry_attempts as usize || ctx.started.elapsed() >= route.total_timeout {
        return false;
    }
    let Some(region) = ctx.region.and_then(|r| snapshot.regions.get(r)) else {
        return false;
    };
    // A retry with nowhere to go would turn the upstream's own answer into a 502.
    if !has_next_candidate(snapshot, ctx) {
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
fn has_next_candidate(snapshot: &Snapshot, ctx: &RequestCtx) -> bool {
    let Some(decision) = ctx.decision else {
        return false;
    };
    let now = crate::clock::now_ms();
    decision.candidates.as_slice()[ctx.region_pos.min(decision.candidates.len())..]
        .iter()
        .map(|&r| usize::from(r))
        .any(|r| {
            let region = &snapshot.regions[r];
            crate::core::select::region_verdict(region, now)
                == crate::core::select::RegionVerdict::Available
                && region
                    .upstreams
                    .iter()
                    .enumerate()
                    .any(|(u, upstream)| upstream.is_available(now) && !ctx.was_tried(r, u))
        })
}

pub(super) fn count(
    snapshot: &Snapshot,
    metrics: &HealthMetrics,
    ctx: &mut RequestCtx,
    reason: &'static str,
) {
    ctx.retry_reason = Some(reason);
    if let Some(route) = ctx.decision.and_then(|d| snapshot.routes.get(d.route)) {
        metrics
            .retries
            .with_label_values(&[&route.name, reason])
            .inc();
    }
}

/// A request served by another region than the one geography (and residency) preferred.
/// Rare by design, so labels are resolved here rather than precompiled for every region pair.
pub(super) fn count_failover(
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
