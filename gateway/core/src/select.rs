//! Region order and upstream choice.
//!
//! Regions: eligible ∩ residency-allowed, nearest first by great-circle distance from the client.
//! Upstreams: weighted least-outstanding (fewest in-flight per unit of weight), rotating ties.

use super::geo::distance_km;
use super::snapshot::{CompiledRegion, CompiledRoute, CompiledUpstream, ResidencyRule, Snapshot};

/// How many candidate regions a decision carries (enough for any retry budget; nearest kept).
pub const MAX_CANDIDATES: usize = 16;

/// Ordered candidate regions (indices into `Snapshot::regions`), held inline: no allocation per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionOrder {
    len: u8,
    regions: [u16; MAX_CANDIDATES],
    /// The region geography and residency prefer, before health and capacity: when a request is
    /// served elsewhere, that is a failover from here.
    pub preferred: Option<u16>,
    /// Why allowed regions were left out (worst first: any full region makes a 503 "capacity").
    pub skipped: Option<RegionVerdict>,
}

/// Can a region take a new request now?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionVerdict {
    Available,
    /// Fewer than `min_healthy` upstreams pass health checks and are not ejected.
    Unhealthy,
    /// `max_inflight` reached.
    Full,
    /// `drain = true`: finishing in-flight requests only.
    Drained,
}

impl RegionVerdict {
    pub fn reason(self) -> &'static str {
        match self {
            RegionVerdict::Available => "available",
            RegionVerdict::Unhealthy => "unhealthy",
            RegionVerdict::Full => "capacity",
            RegionVerdict::Drained => "drained",
        }
    }
}

/// Is `region` in panic: so many of its healthy upstreams ejected (more than its
/// `panic_threshold` allows) that ejections are ignored and every healthy upstream takes traffic?
/// Passive verdicts are guesses from a few requests; they never empty a region on their own.
pub fn in_panic(region: &CompiledRegion, now_ms: u64) -> bool {
    let threshold = u64::from(region.outlier.panic_threshold);
    if threshold == 0 {
        return false;
    }
    let (mut healthy, mut not_ejected) = (0u64, 0u64);
    for u in region.upstreams.iter().filter(|u| serves(u)) {
        if u.state.is_healthy() {
            healthy += 1;
            if !u.state.is_ejected(now_ms) {
                not_ejected += 1;
            }
        }
    }
    healthy > 0 && not_ejected * 100 < threshold * healthy
}

/// May one more upstream of `region` be ejected now? Only while the ejected ones stay within
/// `max_ejection_percent` of the serving upstreams and at least one serving upstream stays in.
pub fn ejection_allowed(region: &CompiledRegion, now_ms: u64) -> bool {
    let (mut serving, mut ejected) = (0u64, 0u64);
    for u in region.upstreams.iter().filter(|u| serves(u)) {
        serving += 1;
        if u.state.is_ejected(now_ms) {
            ejected += 1;
        }
    }
    let cap = serving * u64::from(region.outlier.max_ejection_percent) / 100;
    ejected < cap && serving.saturating_sub(ejected + 1) >= 1
}

/// Takes traffic at all: weighted and not drained.
fn serves(u: &CompiledUpstream) -> bool {
    u.weight > 0 && !u.drain
}

/// May upstream `u` of a region take a new request now? Healthy and, unless the region is in
/// panic, not ejected.
pub fn upstream_eligible(u: &CompiledUpstream, now_ms: u64, panic: bool) -> bool {
    serves(u) && u.state.is_healthy() && (panic || !u.state.is_ejected(now_ms))
}

pub fn region_verdict(region: &CompiledRegion, now_ms: u64) -> RegionVerdict {
    if region.drain {
        return RegionVerdict::Drained;
    }
    let panic = in_panic(region, now_ms);
    let available = region
        .upstreams
        .iter()
        .filter(|u| upstream_eligible(u, now_ms, panic))
        .count();
    // A region whose upstreams are mostly drained on purpose still counts as healthy when every
    // remaining one is.
    let serving = region
        .upstreams
        .iter()
        .filter(|u| u.weight > 0 && !u.drain)
        .count();
    let needed = (region.min_healthy as usize).min(serving.max(1));
    if available < needed {
        return RegionVerdict::Unhealthy;
    }
    if region
        .max_inflight
        .is_some_and(|max| region.state.inflight() >= max)
        || region.state.is_penalized(now_ms)
    {
        return RegionVerdict::Full;
    }
    RegionVerdict::Available
}

impl RegionOrder {
    pub const fn empty() -> Self {
        Self {
            len: 0,
            regions: [0; MAX_CANDIDATES],
            preferred: None,
            skipped: None,
        }
    }
    pub fn as_slice(&self) -> &[u16] {
        &self.regions[..usize::from(self.len)]
    }
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn get(&self, pos: usize) -> Option<usize> {
        self.as_slice().get(pos).map(|&r| usize::from(r))
    }
}

impl Default for RegionOrder {
    fn default() -> Self {
        Self::empty()
    }
}

/// Orders `route`'s eligible regions for a client at `from` (None: unknown location).
/// Residency narrows the set (strict) or moves allowed regions first (preferred).
pub fn order_regions(
    snapshot: &Snapshot,
    route: &CompiledRoute,
    from: Option<(f64, f64)>,
    residency: Option<&ResidencyRule>,
    now_ms: u64,
) -> RegionOrder {
    order_regions_serving(snapshot, route, from, residency, now_ms, None)
}

/// [`order_regions`] restricted to the regions `serves` marks (indexed by region; the
/// regions serving the requested model). `None`: no restriction.
pub fn order_regions_serving(
    snapshot: &Snapshot,
    route: &CompiledRoute,
    from: Option<(f64, f64)>,
    residency: Option<&ResidencyRule>,
    now_ms: u64,
    serves: Option<&[bool]>,
) -> RegionOrder {
    // Unknown location: measure from the route's default region, so it comes first and the
    // fallbacks are its neighbours.
    let origin =
        from.unwrap_or_else(|| snapshot.regions[usize::from(route.default_region)].location);
    let mut scored: [(u8, f64, u16); MAX_CANDIDATES] = [(0, 0.0, 0); MAX_CANDIDATES];
    let mut len = 0usize;
    for &idx in &route.eligible {
        let region: &CompiledRegion = &snapshot.regions[usize::from(idx)];
        if serves.is_some_and(|s| !s.get(usize::from(idx)).copied().unwrap_or(false)) {
            continue;
        }
        // Preference tier: 0 = allowed by residency (or no rule), 1 = only tolerated (preferred rule).
        let tier = match residency {
            None => 0,
            Some(rule) if rule.allowed[usize::from(idx)] => 0,
            Some(rule) if rule.strict => continue,
            Some(_) => 1,
        };
        // One candidate needs no ranking: skip the trigonometry.
        let distance = if route.eligible.len() == 1 {
            0.0
        } else {
            distance_km(origin, region.location)
        };
        let candidate = (tier, distance, idx);
        if len < MAX_CANDIDATES {
            scored[len] = candidate;
            len += 1;
        } else if let Some(worst) = (0..len).max_by(|&a, &b| cmp(&scored[a], &scored[b])) {
            if cmp(&candidate, &scored[worst]).is_lt() {
                scored[worst] = candidate;
            }
        }
    }
    scored[..len].sort_unstable_by(cmp);
    let mut order = RegionOrder::empty();
    order.preferred = scored[..len].first().map(|c| c.2);
    let mut kept = 0usize;
    for (_, _, idx) in &scored[..len] {
        match region_verdict(&snapshot.regions[usize::from(*idx)], now_ms) {
            RegionVerdict::Available => {
                order.regions[kept] = *idx;
                kept += 1;
            }
            RegionVerdict::Full => order.skipped = Some(RegionVerdict::Full),
            other => {
                if order.skipped.is_none() {
                    order.skipped = Some(other);
                }
            }
        }
    }
    order.len = kept as u8;
    order
}

fn cmp(a: &(u8, f64, u16), b: &(u8, f64, u16)) -> std::cmp::Ordering {
    a.0.cmp(&b.0)
        .then_with(|| a.1.total_cmp(&b.1))
        .then_with(|| a.2.cmp(&b.2))
}

/// Picks the upstream with the fewest in-flight requests per unit of weight, skipping weight 0,
/// unhealthy, ejected (unless the region is in panic) and those `excluded` says were already tried. `rotation` breaks ties so equal upstreams share load.
pub fn pick_upstream(
    region: &CompiledRegion,
    now_ms: u64,
    rotation: usize,
    excluded: impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = region.upstreams.len();
    let panic = in_panic(region, now_ms);
    let mut best: Option<(u64, u64, usize)> = None; // (inflight+1, weight, index): compare a/b by cross-multiplying
    for k in 0..n {
        let i = (rotation + k) % n;
        let upstream = &region.upstreams[i];
        if !upstream_eligible(upstream, now_ms, panic) || excluded(i) {
            continue;
        }
        let load = u64::from(upstream.state.inflight()) + 1;
        let weight = u64::from(upstream.weight);
        let better = match best {
            None => true,
            Some((best_load, best_weight, _)) => load * best_weight < best_load * weight,
        };
        if better {
            best = Some((load, weight, i));
        }
    }
    best.map(|(_, _, i)| i)
}
