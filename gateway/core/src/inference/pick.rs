//! Which model server (replica) of a region takes a model call: pure scoring over what the edge
//! knows of each replica — its own queue and KV-cache use (scraped from its metrics), the calls
//! this edge has in flight there, whether the requested LoRA adapter is loaded — plus prefix
//! affinity: calls sharing a prompt prefix (or a session key) go to the same replica, so its
//! prefix cache is reused, until that replica carries more than its bounded share of the load.
//!
//! Affinity uses rendezvous hashing (highest random weight): each replica's weight for a prefix is
//! a hash of both, so adding or losing a replica moves only the prefixes that were on it. The
//! bound is "consistent hashing with bounded loads": a replica may take an affine call while its
//! load is at most `load_factor` × the mean load (rounded up; never less than `min_affine_load`;
//! `idle_extra` more when it reported an empty queue), else the prefix's next replica in hash
//! order does. Replicas with stale or missing metrics are scored by in-flight calls only
//! (least outstanding), and the pick says so.

/// What the edge knows of one replica when a call arrives.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Replica {
    /// Upstream health and ejection allow new calls here.
    pub available: bool,
    /// Calls this edge has in flight to it.
    pub inflight: u32,
    /// Its last scraped state, when fresh.
    pub metrics: Option<ReplicaMetrics>,
    /// The call names an adapter and the replica has it loaded (`None`: no adapter asked, or
    /// unknown).
    pub has_adapter: Option<bool>,
    /// A stable identity for hashing (its address, hashed by the caller).
    pub id: u64,
}

/// A replica's own state, from its metrics endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReplicaMetrics {
    /// Requests waiting for a slot (`vllm:num_requests_waiting`).
    pub waiting: f64,
    /// Requests being decoded (`vllm:num_requests_running`).
    pub running: f64,
    /// KV-cache utilisation, 0 to 1 (`vllm:kv_cache_usage_perc`).
    pub kv_cache: f64,
}

/// Tuning of the score (defaults below; `saturation_queue` from `[inference]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PickParams {
    /// Cost of one waiting request.
    pub queue_weight: f64,
    /// Cost of a full KV cache (scaled by utilisation).
    pub kv_weight: f64,
    /// Cost of one call in flight from this edge.
    pub inflight_weight: f64,
    /// Credit for having the requested adapter loaded.
    pub adapter_bonus: f64,
    /// Affine calls stay on their replica while its load ≤ this × the mean load.
    pub load_factor: f64,
    /// ... or while its load is below this, whatever the mean: at low load the bound would move
    /// calls off a server with free slots, costing their prefix cache for nothing.
    pub min_affine_load: f64,
    /// A replica that reported no waiting request may take this many affine calls beyond its
    /// bound: it could start them at once, and a short wait behind its own calls costs less than
    /// an uncached prefill elsewhere. Bounded, because its report is up to a scrape old.
    pub idle_extra: f64,
    /// A replica with at least this many waiting requests is saturated: it takes no new call
    /// while another replica is not.
    pub saturation_queue: f64,
}

impl Default for PickParams {
    fn default() -> Self {
        Self {
            queue_weight: 1.0,
            kv_weight: 4.0,
            inflight_weight: 1.0,
            adapter_bonus: 2.0,
            load_factor: 1.25,
            min_affine_load: 4.0,
            idle_extra: 4.0,
            saturation_queue: 8.0,
        }
    }
}

/// Why a replica was picked (the `reason` label of the picks counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickReason {
    /// Lowest score from queue, KV cache, in-flight calls and adapter.
    Score,
    /// The prompt prefix's (or session's) replica, within its load bound.
    Affinity,
    /// No fresh metrics for any candidate: least outstanding from this edge.
    Fallback,
    /// Every replica of the nearer region was saturated: the call went to the next one.
    Spill,
    /// `[inference] picking = "least_outstanding"`: the weighted pick of any route.
    LeastOutstanding,
}

impl PickReason {
    pub fn label(self) -> &'static str {
        match self {
            PickReason::Score => "score",
            PickReason::Affinity => "affinity",
            PickReason::Fallback => "fallback",
            PickReason::Spill => "spill",
            PickReason::LeastOutstanding => "least_outstanding",
        }
    }
}

impl Replica {
    /// The load that the affinity bound compares: queued and running work when known, else what
    /// this edge has in flight.
    fn load(&self) -> f64 {
        match self.metrics {
            Some(m) => m.waiting + m.running.max(f64::from(self.inflight)),
            None => f64::from(self.inflight),
        }
    }

    fn saturated(&self, params: &PickParams) -> bool {
        self.metrics
            .is_some_and(|m| m.waiting >= params.saturation_queue)
    }

    fn score(&self, params: &PickParams) -> f64 {
        let mut score = params.inflight_weight * f64::from(self.inflight);
        if let Some(m) = self.metrics {
            score +=
                params.queue_weight * m.waiting + params.kv_weight * m.kv_cache.clamp(0.0, 1.0);
        }
        if self.has_adapter == Some(true) {
            score -= params.adapter_bonus;
        }
        score
    }
}

/// Every available replica is saturated (and at least one is known to be): the region should
/// spill the call to the next one.
pub fn region_saturated(replicas: &[Replica], params: &PickParams) -> bool {
    let mut any = false;
    for replica in replicas.iter().filter(|r| r.available) {
        if !replica.saturated(params) {
            return false;
        }
        any = true;
    }
    any
}

/// The replica for a call (index into `replicas`), and why; `None` when none is available.
/// `affinity`: the hash of the call's prompt prefix or session key. Without a memory of where
/// prefixes went, a prefix's replicas are its rendezvous order (see [`super::prefixes`] for the
/// edge's memory, which balances prefixes over replicas and keeps their second replica).
pub fn pick(
    replicas: &[Replica],
    affinity: Option<u64>,
    params: &PickParams,
) -> Option<(usize, PickReason)> {
    let view = match View::new(replicas, params) {
        Ok(view) => view,
        Err(decided) => return decided,
    };
    if let Some(key) = affinity {
        let mut order: Vec<(u64, usize)> = view
            .available()
            .map(|i| (rendezvous(key, replicas[i].id), i))
            .collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(&(_, i)) = order.iter().find(|(_, i)| view.takes_affine(*i)) {
            return Some((i, PickReason::Affinity));
        }
    }
    view.best_score()
}

/// A region's replicas as one call sees them, once it is known that scoring applies (some are
/// available, and some have fresh metrics).
pub(super) struct View<'a> {
    pub replicas: &'a [Replica],
    params: &'a PickParams,
    all_saturated: bool,
    /// Affine calls stay on a replica while its load is under this.
    bound: f64,
}

impl<'a> View<'a> {
    /// `Err`: the pick is already decided — no replica is available (`None`), or none has fresh
    /// metrics (least outstanding from this edge, `Fallback`).
    pub fn new(
        replicas: &'a [Replica],
        params: &'a PickParams,
    ) -> Result<Self, Option<(usize, PickReason)>> {
        let available = || replicas.iter().enumerate().filter(|(_, r)| r.available);
        let count = available().count();
        if count == 0 {
            return Err(None);
        }
        if !available().any(|(_, r)| r.metrics.is_some()) {
            // Nothing known of the servers themselves: fewest calls from this edge.
            return Err(available()
                .min_by_key(|(i, r)| (r.inflight, *i))
                .map(|(i, _)| (i, PickReason::Fallback)));
        }
        let total: f64 = available().map(|(_, r)| r.load()).sum();
        let bound = (params.load_factor * (total + 1.0) / count as f64)
            .ceil()
            .max(params.min_affine_load);
        Ok(Self {
            replicas,
            params,
            // Saturated replicas take new calls only when every replica is.
            all_saturated: available().all(|(_, r)| r.saturated(params)),
            bound,
        })
    }

    /// Indices of the available replicas.
    pub fn available(&self) -> impl Iterator<Item = usize> + '_ {
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.available)
            .map(|(i, _)| i)
    }

    /// May replica `i` take a new call at all?
    pub fn open(&self, i: usize) -> bool {
        let r = &self.replicas[i];
        r.available && (self.all_saturated || !r.saturated(self.params))
    }

    /// May replica `i` take an affine call: open, and within its load bound (a little beyond it
    /// when it reported an empty queue)?
    pub fn takes_affine(&self, i: usize) -> bool {
        let r = &self.replicas[i];
        let bound = match r.metrics {
            Some(m) if m.waiting <= 0.0 => self.bound + self.params.idle_extra,
            _ => self.bound,
        };
        self.open(i) && r.load() < bound
    }

    /// The open replica with the lowest score (queue, KV cache, in-flight calls, adapter).
    pub fn best_score(&self) -> Option<(usize, PickReason)> {
        self.available()
            .filter(|&i| self.open(i))
            .min_by(|&i, &j| {
                self.replicas[i]
                    .score(self.params)
                    .total_cmp(&self.replicas[j].score(self.params))
                    .then_with(|| i.cmp(&j))
            })
            .map(|i| (i, PickReason::Score))
    }
}

/// The weight of replica `id` for `key` (splitmix64 of both: well spread, stable across
/// processes and versions).
pub(super) fn rendezvous(key: u64, id: u64) -> u64 {
    let mut z = key ^ id.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of `bytes` (FNV-1a): replica ids from addresses, session keys.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: u64, waiting: f64, kv: f64, inflight: u32) -> Replica {
        Replica {
            available: true,
            inflight,
            metrics: Some(ReplicaMetrics {
                waiting,
                running: 0.0,
                kv_cache: kv,
            }),
            has_adapter: None,
            id: stable_hash(&id.to_le_bytes()),
        }
    }

    #[test]
    fn a_long_queue_gets_no_new_calls_while_another_replica_is_idle() {
        let params = PickParams::default();
        let replicas = [replica(1, 12.0, 0.9, 0), replica(2, 0.0, 0.1, 0)];
        for key in 0..200u64 {
            assert_eq!(
                pick(&replicas, Some(key), &params).map(|p| p.0),
                Some(1),
                "{key}"
            );
        }
        assert_eq!(pick(&replicas, None, &params), Some((1, PickReason::Score)));
        assert!(!region_saturated(&replicas, &params));
        let both = [replica(1, 12.0, 0.9, 0), replica(2, 9.0, 0.1, 0)];
        assert!(region_saturated(&both, &params));
        assert_eq!(
            pick(&both, None, &params).map(|p| p.0),
            Some(1),
            "least bad when all are"
        );
    }

    #[test]
    fn score_weighs_queue_kv_inflight_and_adapter() {
        let params = PickParams::default();
        let busy_kv = [replica(1, 1.0, 0.95, 0), replica(2, 2.0, 0.05, 0)];
        assert_eq!(pick(&busy_kv, None, &params).map(|p| p.0), Some(1));
        let inflight = [replica(1, 0.0, 0.0, 5), replica(2, 1.0, 0.0, 0)];
        assert_eq!(pick(&inflight, None, &params).map(|p| p.0), Some(1));
        let mut adapter = [replica(1, 1.0, 0.2, 0), replica(2, 0.0, 0.2, 0)];
        adapter[0].has_adapter = Some(true);
        adapter[1].has_adapter = Some(false);
        assert_eq!(pick(&adapter, None, &params).map(|p| p.0), Some(0));
    }

    #[test]
    fn shared_prefixes_stick_to_one_replica_until_its_load_bound() {
        let params = PickParams {
            idle_extra: 0.0,
            ..PickParams::default()
        };
        let mut replicas: Vec<Replica> = (0..4).map(|i| replica(i, 0.0, 0.1, 0)).collect();
        let key = stable_hash(b"You are a helpful tax assistant.");
        let (home, reason) = pick(&replicas, Some(key), &params).expect("pick");
        assert_eq!(reason, PickReason::Affinity);
        // Calls with the prefix pile onto `home` until it holds more than its bounded share.
        let mut placed = [0u32; 4];
        for _ in 0..40 {
            let (i, _) = pick(&replicas, Some(key), &params).expect("pick");
            placed[i] += 1;
            replicas[i].inflight += 1;
            replicas[i].metrics = replicas[i].metrics.map(|m| ReplicaMetrics {
                running: m.running + 1.0,
                ..m
            });
        }
        let total: u32 = placed.iter().sum();
        let bound = (1.25 * (f64::from(total) + 1.0) / 4.0).ceil() as u32;
        assert!(placed[home] >= placed.iter().copied().max().unwrap_or(0));
        assert!(placed[home] <= bound, "{placed:?} bound {bound}");
        assert!(
            placed.iter().filter(|&&n| n > 0).count() > 1,
            "moved on: {placed:?}"
        );
        // Other prefixes spread over the replicas.
        let fresh: Vec<Replica> = (0..4).map(|i| replica(i, 0.0, 0.1, 0)).collect();
        let mut homes = std::collections::HashSet::new();
        for k in 0..64u64 {
            homes.insert(pick(&fresh, Some(stable_hash(&k.to_le_bytes())), &params).map(|p| p.0));
        }
        assert_eq!(homes.len(), 4);
    }

    #[test]
    fn a_replica_without_a_queue_keeps_a_few_affine_calls_beyond_its_bound() {
        let params = PickParams::default();
        let key = stable_hash(b"You are a helpful tax assistant.");
        let fill = |waiting: f64| {
            let mut replicas: Vec<Replica> = (0..4).map(|i| replica(i, waiting, 0.1, 0)).collect();
            let mut placed = [0u32; 4];
            for _ in 0..12 {
                let (i, _) = pick(&replicas, Some(key), &params).expect("pick");
                placed[i] += 1;
                replicas[i].inflight += 1;
            }
            placed
        };
        // No queue reported: the home takes its bound (4 here) plus `idle_extra`.
        let idle = fill(0.0);
        assert_eq!(idle.iter().copied().max(), Some(8), "{idle:?}");
        // A queue: the bound alone (load = 1 waiting + calls in flight).
        let queued = fill(1.0);
        assert!(queued.iter().all(|&n| n <= 4), "{queued:?}");
    }

    #[test]
    fn losing_a_replica_moves_only_its_prefixes() {
        let params = PickParams::default();
        let all: Vec<Replica> = (0..5).map(|i| replica(i, 0.0, 0.0, 0)).collect();
        let mut fewer = all.clone();
        fewer[2].available = false;
        for k in 0..500u64 {
            let key = stable_hash(&k.to_le_bytes());
            let before = pick(&all, Some(key), &params).map(|p| p.0);
            let after = pick(&fewer, Some(key), &params).map(|p| p.0);
            if before != Some(2) {
                assert_eq!(before, after, "{k}");
            }
        }
    }

    #[test]
    fn without_metrics_it_is_least_outstanding() {
        let params = PickParams::default();
        let mut replicas: Vec<Replica> =
            (0..3).map(|i| replica(i, 0.0, 0.0, 3 - i as u32)).collect();
        for r in &mut replicas {
            r.metrics = None;
        }
        assert_eq!(
            pick(&replicas, Some(7), &params),
            Some((2, PickReason::Fallback))
        );
        replicas[2].available = false;
        assert_eq!(
            pick(&replicas, None, &params),
            Some((1, PickReason::Fallback))
        );
        for r in &mut replicas {
            r.available = false;
        }
        assert_eq!(pick(&replicas, None, &params), None);
        assert!(!region_saturated(&replicas, &params));
    }
}
