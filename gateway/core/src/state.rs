//! Runtime state that outlives snapshots: in-flight counts, health verdicts, outlier ejections and
//! retry budgets. Atomics only — the request path never takes a lock here. Time is a monotonic
//! millisecond count passed in by the caller (`now_ms`), so all of it is testable with plain values.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Passive outlier detection settings, compiled from `regions[].outlier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierSpec {
    pub consecutive_failures: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    /// Most of a region's serving upstreams that may be ejected at once (percent); at least one
    /// always stays in: outlier detection must never be what empties a region.
    pub max_ejection_percent: u32,
    /// Below this share (percent) of a region's healthy upstreams not ejected, the region ignores
    /// ejections and spreads requests over all its healthy upstreams (0: never).
    pub panic_threshold: u32,
}

#[derive(Debug)]
pub struct UpstreamState {
    inflight: AtomicU32,
    /// Active-check verdict. Starts healthy: a fresh edge must serve before its first probe.
    healthy: AtomicBool,
    probe_passes: AtomicU32,
    probe_failures: AtomicU32,
    consecutive_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// For `/admin/regions` only (never read on the request path).
    pub report: Mutex<ProbeReport>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProbeReport {
    /// Unix milliseconds of the last active probe.
    pub last_check_unix_ms: u64,
    pub last_error: Option<String>,
}

impl Default for UpstreamState {
    fn default() -> Self {
        Self {
            inflight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            probe_passes: AtomicU32::new(0),
            probe_failures: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            report: Mutex::new(ProbeReport::default()),
        }
    }
}

impl UpstreamState {
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Counts a request as outstanding until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(Arc::clone(self))
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// May new requests go here right now (active verdict and no ejection)?
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.is_healthy() && !self.is_ejected(now_ms)
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Records one active probe; flips the verdict only after `healthy_after` passes or
    /// `unhealthy_after` failures in a row (hysteresis: a flapping origin does not flap routing).
    /// Returns the new verdict when it changed.
    pub fn record_probe(
        &self,
        passed: bool,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> Option<bool> {
        if passed {
            self.probe_failures.store(0, Ordering::Relaxed);
            let passes = self
                .probe_passes
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if !self.is_healthy() && passes >= healthy_after {
                self.healthy.store(true, Ordering::Relaxed);
                // Back in service: forget past request failures too.
                self.consecutive_failures.store(0, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.probe_passes.store(0, Ordering::Relaxed);
            let failures = self
                .probe_failures
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if self.is_healthy() && failures >= unhealthy_after {
                self.healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// A request got a usable answer from this upstream.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed here because of the upstream (connect error, timeout, 5xx). Ejects the
    /// upstream after `consecutive_failures` in a row, for a backoff that doubles with each
    /// ejection — when `may_eject` (the region's ejection cap leaves room). A failure over the cap
    /// stays counted, so the upstream goes as soon as there is room. Returns true when this
    /// failure caused an ejection.
    pub fn record_failure(&self, now_ms: u64, spec: &OutlierSpec, may_eject: bool) -> bool {
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < spec.consecutive_failures || self.is_ejected(now_ms) || !may_eject {
            return false;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let previous = self.ejections.fetch_add(1, Ordering::Relaxed);
        let backoff = spec
            .base_ejection_ms
            .saturating_mul(1u64 << previous.min(20))
            .min(spec.max_ejection_ms);
        self.ejected_until_ms
            .store(now_ms.saturating_add(backoff), Ordering::Relaxed);
        true
    }
}

pub struct InflightGuard(Arc<UpstreamState>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-region runtime state (keyed by region name across reloads).
#[derive(Debug, Default)]
pub struct RegionState {
    inflight: AtomicU32,
    pub budget: RetryBudget,
    /// The region answered 429/503 with `Retry-After`; no new request goes here before
    /// this time (it counts as full).
    penalized_until_ms: AtomicU64,
}

impl RegionState {
    /// Keeps new requests away until `until_ms` (never shortens a longer penalty).
    pub fn penalize_until(&self, until_ms: u64) {
        self.penalized_until_ms
            .fetch_max(until_ms, Ordering::Relaxed);
    }

    pub fn is_penalized(&self, now_ms: u64) -> bool {
        now_ms < self.penalized_until_ms.load(Ordering::Relaxed)
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn begin(self: &Arc<Self>) -> RegionGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        RegionGuard(Arc::clone(self))
    }
}

pub struct RegionGuard(Arc<RegionState>);

impl Drop for RegionGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Retries allowed as a share of recent requests, so that when a region fails the edge does not
/// multiply its load by the retry count. Requests are counted over the current and the previous
/// window, so a burst of failures right after a window starts still finds the budget it earned.
#[derive(Debug, Default)]
pub struct RetryBudget {
    window_start_ms: AtomicU64,
    requests: AtomicU32,
    previous_requests: AtomicU32,
    retries: AtomicU32,
}

pub const BUDGET_WINDOW_MS: u64 = 10_000;

impl RetryBudget {
    fn rotate(&self, now_ms: u64) {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) >= BUDGET_WINDOW_MS
            && self
                .window_start_ms
                .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // A window with no traffic in between leaves nothing to carry over.
            let carried = if now_ms.saturating_sub(start) >= 2 * BUDGET_WINDOW_MS {
                0
            } else {
                self.requests.load(Ordering::Relaxed)
            };
            self.previous_requests.store(carried, Ordering::Relaxed);
            self.requests.store(0, Ordering::Relaxed);
            self.retries.store(0, Ordering::Relaxed);
        }
    }

    pub fn note_request(&self, now_ms: u64) {
        self.rotate(now_ms);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is one left.
    pub fn try_spend(&self, now_ms: u64, percent: u32, min_per_window: u32) -> bool {
        self.rotate(now_ms);
        let requests = u64::from(self.requests.load(Ordering::Relaxed))
            + u64::from(self.previous_requests.load(Ordering::Relaxed));
        let allowed = (requests * u64::from(percent) / 100).max(u64::from(min_per_window));
        let spent = self.retries.fetch_add(1, Ordering::Relaxed);
        if u64::from(spent) < allowed {
            true
        } else {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: OutlierSpec = OutlierSpec {
        consecutive_failures: 3,
        base_ejection_ms: 1_000,
        max_ejection_ms: 5_000,
        max_ejection_percent: 50,
        panic_threshold: 50,
    };

    #[test]
    fn probes_flip_the_verdict_only_after_enough_in_a_row() {
        let s = UpstreamState::default();
        assert!(s.is_healthy());
        assert_eq!(s.record_probe(false, 2, 2), None);
        assert_eq!(
            s.record_probe(true, 2, 2),
            None,
            "one failure is not enough"
        );
        assert_eq!(s.record_probe(false, 2, 2), None);
        assert_eq!(s.record_probe(false, 2, 2), Some(false));
        assert_eq!(
            s.record_probe(true, 2, 2),
            None,
            "one pass is not enough to come back"
        );
        assert_eq!(s.record_probe(false, 2, 2), None);
        assert_eq!(s.record_probe(true, 2, 2), None);
        assert_eq!(s.record_probe(true, 2, 2), Some(true));
    }

    #[test]
    fn consecutive_failures_eject_with_growing_backoff() {
        let s = UpstreamState::default();
        assert!(!s.record_failure(0, &SPEC, true));
        s.record_success();
        assert!(!s.record_failure(0, &SPEC, true));
        assert!(!s.record_failure(0, &SPEC, true));
        assert!(
            s.record_failure(100, &SPEC, true),
            "third failure in a row ejects"
        );
        assert!(s.is_ejected(1_099) && !s.is_available(1_099));
        assert!(s.is_available(1_100), "ejection over");
        for _ in 0..3 {
            s.record_failure(2_000, &SPEC, true);
        }
        assert!(s.is_ejected(3_999), "second ejection lasts twice as long");
        assert!(!s.is_ejected(4_000));
        for round in 0..5u64 {
            for _ in 0..3 {
                s.record_failure(10_000 * (round + 1), &SPEC, true);
            }
        }
        assert!(!s.is_ejected(50_000 + 5_000), "capped at max_ejection");
        assert_eq!(s.ejections(), 7);
    }

    #[test]
    fn no_room_under_the_cap_means_no_ejection_until_there_is() {
        let s = UpstreamState::default();
        for _ in 0..10 {
            assert!(!s.record_failure(0, &SPEC, false));
        }
        assert!(s.is_available(0));
        assert!(s.record_failure(0, &SPEC, true), "room again: out at once");
    }

    #[test]
    fn retry_budget_caps_retries_per_window() {
        let b = RetryBudget::default();
        for _ in 0..100 {
            b.note_request(0);
        }
        let granted = (0..50).filter(|_| b.try_spend(0, 20, 5)).count();
        assert_eq!(granted, 20);
        // The next window still counts the previous one's requests...
        b.note_request(BUDGET_WINDOW_MS);
        let granted = (0..50)
            .filter(|_| b.try_spend(BUDGET_WINDOW_MS, 20, 5))
            .count();
        assert_eq!(granted, 20, "(100 + 1) * 20%");
        // ...but after a quiet gap only the minimum applies.
        b.note_request(5 * BUDGET_WINDOW_MS);
        let granted = (0..50)
            .filter(|_| b.try_spend(5 * BUDGET_WINDOW_MS, 20, 5))
            .count();
        assert_eq!(granted, 5);
    }
}
