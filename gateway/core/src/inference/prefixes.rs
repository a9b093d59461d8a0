//! The edge's memory of where prompt prefixes (or sessions) went, so that a prefix keeps finding
//! the replicas whose prefix caches hold it.
//!
//! Rendezvous hashing alone spreads a handful of prefixes unevenly: with 16 system prompts over
//! 4 replicas one replica is commonly the first choice of 7 or 8 of them, more than its prefix
//! cache holds, so it keeps evicting and re-prefilling them while another replica holds none.
//! And when a prefix outgrows its replica's load bound, the next replica in hash order changes
//! with every replica's load, so overflow calls land on replicas that never saw the prefix.
//!
//! So each prefix this edge sees is given, once, a **home**: the first replica in the prefix's
//! rendezvous order that is home to fewer than its equal share of the remembered prefixes
//! (bounded-load consistent hashing, the balls being prefixes). Its calls go home while the home
//! is within its load bound. When the home is over it, the calls go to the prefix's **second**
//! replica, chosen once — the first in the prefix's rendezvous order, after the home, within its
//! bound — and kept, so it warms up and then holds the prefix too. When both are over their bound,
//! the score (queue, KV cache, in-flight calls) picks, which protects them from overload.
//!
//! The memory is bounded: two generations of at most [`GENERATION`] prefixes each; a prefix used
//! again moves to the newest one, and the oldest generation is forgotten when the newest fills up
//! (an approximate LRU that costs no scan and, once warm, no allocation). Placements name replicas
//! by id (their address hash), so they survive snapshot reloads; a home that left the region is
//! replaced.

use std::collections::HashMap;

use super::pick::{rendezvous, PickParams, PickReason, Replica, View};

/// Prefixes remembered per generation (the memory holds up to twice this many).
pub const GENERATION: usize = 2048;

/// Where one prefix goes (replica ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Placement {
    home: u64,
    second: Option<u64>,
}

/// Prefix placements of one edge, across its regions (keys are scoped by region).
#[derive(Debug)]
pub struct PrefixMemory {
    recent: HashMap<u64, Placement>,
    older: HashMap<u64, Placement>,
    /// Per replica id: remembered prefixes whose home it is.
    homes: HashMap<u64, u32>,
    generation: usize,
}

impl Default for PrefixMemory {
    fn default() -> Self {
        Self::with_generation(GENERATION)
    }
}

impl PrefixMemory {
    /// A memory whose generations hold `generation` prefixes each (at least 1).
    pub fn with_generation(generation: usize) -> Self {
        Self {
            recent: HashMap::new(),
            older: HashMap::new(),
            homes: HashMap::new(),
            generation: generation.max(1),
        }
    }

    /// Prefixes remembered now.
    pub fn len(&self) -> usize {
        self.recent.len() + self.older.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The replica for a call whose prefix (or session) hashes to `key`, among `replicas` of the
    /// region `scope` (a hash of its name), and why; `None` when none is available. Places the
    /// prefix when it is new here, and gives it its second replica when its home is first found
    /// over its bound.
    pub fn pick(
        &mut self,
        scope: u64,
        replicas: &[Replica],
        key: u64,
        params: &PickParams,
    ) -> Option<(usize, PickReason)> {
        let view = match View::new(replicas, params) {
            Ok(view) => view,
            Err(decided) => return decided,
        };
        let slot = scoped(scope, key);
        let index_of = |id: u64| replicas.iter().position(|r| r.id == id);
        let mut placement = match self.take(slot) {
            Some(p) if index_of(p.home).is_some() => p,
            stale => {
                if let Some(p) = stale {
                    self.forget_home(p.home);
                }
                let home = self.place(&view, key);
                *self.homes.entry(home).or_insert(0) += 1;
                Placement { home, second: None }
            }
        };
        let home = index_of(placement.home);
        let second = placement.second.and_then(index_of);
        let picked = if let Some(i) = home.filter(|&i| view.takes_affine(i)) {
            Some((i, PickReason::Affinity))
        } else if let Some(i) = second.filter(|&i| view.takes_affine(i)) {
            Some((i, PickReason::Affinity))
        } else if second.is_some_and(|i| view.open(i)) {
            // Both hold the prefix but both are busy: the score protects them.
            view.best_score()
        } else {
            // No usable second yet: the next replica in the prefix's order within its bound.
            match next_in_order(&view, key, |i| Some(i) != home && view.takes_affine(i)) {
                Some(i) => {
                    placement.second = Some(replicas[i].id);
                    Some((i, PickReason::Affinity))
                }
                None => view.best_score(),
            }
        };
        self.put(slot, placement);
        picked
    }

    /// The home of a new prefix: the first replica in its rendezvous order that is home to fewer
    /// than its equal share (rounded up) of the prefixes, counting this one.
    fn place(&self, view: &View<'_>, key: u64) -> u64 {
        let replicas = view.replicas;
        let homes = |i: usize| self.homes.get(&replicas[i].id).copied().unwrap_or(0);
        let count = view.available().count().max(1) as u64;
        let placed: u64 = view.available().map(|i| u64::from(homes(i))).sum();
        let share = (placed + 1).div_ceil(count);
        let i = next_in_order(view, key, |i| u64::from(homes(i)) < share)
            .or_else(|| next_in_order(view, key, |_| true))
            .unwrap_or(0);
        replicas[i].id
    }

    fn take(&mut self, slot: u64) -> Option<Placement> {
        if let Some(p) = self.recent.get(&slot) {
            return Some(*p);
        }
        self.older.remove(&slot)
    }

    /// Stores `placement` in the newest generation, first forgetting the oldest one when the
    /// newest is full.
    fn put(&mut self, slot: u64, placement: Placement) {
        if !self.recent.contains_key(&slot) && self.recent.len() >= self.generation {
            for forgotten in self.older.values() {
                if let Some(n) = self.homes.get_mut(&forgotten.home) {
                    *n = n.saturating_sub(1);
                }
            }
            self.homes.retain(|_, n| *n > 0);
            self.older.clear();
            std::mem::swap(&mut self.recent, &mut self.older);
        }
        self.recent.insert(slot, placement);
    }

    fn forget_home(&mut self, id: u64) {
        if let Some(n) = self.homes.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The available replica highest in `key`'s rendezvous order that satisfies `accept`. Walks the
/// order without sorting (regions have few replicas), so nothing is allocated.
fn next_in_order(view: &View<'_>, key: u64, accept: impl Fn(usize) -> bool) -> Option<usize> {
    view.available()
        .filter(|&i| accept(i))
        .max_by_key(|&i| (rendezvous(key, view.replicas[i].id), std::cmp::Reverse(i)))
}

/// A prefix's key in one region: the same prompt is placed independently in each region.
fn scoped(scope: u64, key: u64) -> u64 {
    rendezvous(key, scope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::pick::{self, stable_hash, ReplicaMetrics};

    /// The bound alone (the allowance for an empty queue is tested in `pick`).
    fn params() -> PickParams {
        PickParams {
            idle_extra: 0.0,
            ..PickParams::default()
        }
    }

    fn replicas(n: u64) -> Vec<Replica> {
        (0..n)
            .map(|i| Replica {
                available: true,
                inflight: 0,
                metrics: Some(ReplicaMetrics::default()),
                has_adapter: None,
                id: stable_hash(&(1000 + i).to_le_bytes()),
            })
            .collect()
    }

    fn key(n: u64) -> u64 {
        stable_hash(format!("system prompt {n}").as_bytes())
    }

    /// A call starts on replica `i`: it counts in its load until `end`.
    fn start(replicas: &mut [Replica], i: usize) {
        replicas[i].inflight += 1;
    }

    fn end(replicas: &mut [Replica], i: usize) {
        replicas[i].inflight -= 1;
    }

    #[test]
    fn prefixes_are_spread_evenly_over_the_replicas() {
        let params = params();
        let region = replicas(4);
        let mut memory = PrefixMemory::default();
        let mut per_replica = [0u32; 4];
        for k in 0..16 {
            let (i, reason) = memory.pick(1, &region, key(k), &params).expect("pick");
            assert_eq!(reason, PickReason::Affinity);
            per_replica[i] += 1;
        }
        assert_eq!(per_replica, [4; 4], "rendezvous alone is uneven here");
        // Later calls of each prefix find the same replica.
        for k in 0..16 {
            let first = memory.pick(1, &region, key(k), &params);
            assert_eq!(first, memory.pick(1, &region, key(k), &params));
        }
        assert_eq!(memory.len(), 16);
    }

    #[test]
    fn a_prefix_over_its_bound_overflows_to_one_stable_second_replica() {
        let params = params();
        let mut region = replicas(4);
        let mut memory = PrefixMemory::default();
        let hot = key(7);
        let (home, _) = memory.pick(1, &region, hot, &params).expect("pick");
        // Fill the home up to its bound (never less than `min_affine_load`).
        let mut placed = vec![home];
        start(&mut region, home);
        let mut second = None;
        for _ in 0..40 {
            let (i, reason) = memory.pick(1, &region, hot, &params).expect("pick");
            assert_eq!(reason, PickReason::Affinity, "{placed:?}");
            if i != home {
                assert!(
                    second.is_none() || second == Some(i),
                    "one second: {placed:?}"
                );
                second = Some(i);
            }
            placed.push(i);
            start(&mut region, i);
            if placed.len() >= 8 {
                break;
            }
        }
        let second = second.expect("moved on once the home was full");
        assert_eq!(placed.iter().filter(|&&i| i == home).count(), 4);
        assert_eq!(placed.iter().filter(|&&i| i == second).count(), 4);
        // The home frees up: calls go home again; when it fills, the same second takes them.
        for &i in &placed {
            end(&mut region, i);
        }
        assert_eq!(
            memory.pick(1, &region, hot, &params).map(|p| p.0),
            Some(home)
        );
        region[home].inflight = 4;
        assert_eq!(
            memory.pick(1, &region, hot, &params).map(|p| p.0),
            Some(second)
        );
        // Both over their bound: the least loaded replica by score takes the call.
        region[second].inflight = 4;
        let (i, reason) = memory.pick(1, &region, hot, &params).expect("pick");
        assert_eq!(reason, PickReason::Score);
        assert!(i != home && i != second);
    }

    #[test]
    fn the_second_replica_is_kept_where_plain_hash_order_would_move_on() {
        let params = params();
        let mut region = replicas(4);
        let mut memory = PrefixMemory::default();
        let hot = key(3);
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rendezvous(hot, region[i].id)));
        let (home, _) = memory.pick(1, &region, hot, &params).expect("pick");
        assert_eq!(home, order[0], "an empty memory places by hash order");
        // The home is full, and so is the next replica in hash order (other prefixes' calls):
        // the third becomes the prefix's second.
        region[order[0]].inflight = 4;
        region[order[1]].inflight = 4;
        let (second, _) = memory.pick(1, &region, hot, &params).expect("pick");
        assert_eq!(second, order[2]);
        // The next one in hash order is idle again; the overflow still goes where the prefix
        // already is, where hash order alone would send it to a replica without it.
        region[order[1]].inflight = 0;
        assert_eq!(
            pick::pick(&region, Some(hot), &params).map(|p| p.0),
            Some(order[1])
        );
        assert_eq!(
            memory.pick(1, &region, hot, &params),
            Some((order[2], PickReason::Affinity))
        );
    }

    #[test]
    fn a_busy_or_saturated_home_never_takes_more_than_the_score_allows() {
        let params = params();
        let mut region = replicas(3);
        let mut memory = PrefixMemory::default();
        let (home, _) = memory.pick(1, &region, key(1), &params).expect("pick");
        region[home].metrics = Some(ReplicaMetrics {
            waiting: 12.0,
            running: 4.0,
            kv_cache: 1.0,
        });
        for _ in 0..10 {
            assert_ne!(
                memory.pick(1, &region, key(1), &params).map(|p| p.0),
                Some(home)
            );
        }
    }

    #[test]
    fn a_replica_leaving_moves_only_its_prefixes() {
        let params = params();
        let mut region = replicas(4);
        let mut memory = PrefixMemory::default();
        let before: Vec<usize> = (0..40)
            .map(|k| memory.pick(1, &region, key(k), &params).expect("pick").0)
            .collect();
        region.remove(2);
        for (k, &was) in before.iter().enumerate() {
            let now = memory
                .pick(1, &region, key(k as u64), &params)
                .expect("pick")
                .0;
            match was {
                2 => {}
                was => assert_eq!(region[now].id, replicas(4)[was].id, "prefix {k}"),
            }
        }
    }

    #[test]
    fn regions_place_the_same_prefix_independently() {
        let params = params();
        let region = replicas(4);
        let mut memory = PrefixMemory::default();
        memory.pick(1, &region, key(1), &params);
        memory.pick(2, &region, key(1), &params);
        assert_eq!(memory.len(), 2);
    }

    #[test]
    fn the_memory_is_bounded_and_keeps_what_is_used() {
        let params = params();
        let region = replicas(4);
        let mut memory = PrefixMemory::with_generation(8);
        let hot = key(0);
        let home = memory.pick(1, &region, hot, &params);
        for k in 1..100 {
            memory.pick(1, &region, key(k), &params);
            assert_eq!(memory.pick(1, &region, hot, &params), home, "{k}");
            assert!(memory.len() <= 16);
        }
        let counted: u32 = memory.homes.values().sum();
        assert_eq!(
            counted as usize,
            memory.len(),
            "home counts follow what is remembered"
        );
    }

    #[test]
    fn without_fresh_metrics_it_is_least_outstanding() {
        let params = params();
        let mut region = replicas(3);
        for (i, r) in region.iter_mut().enumerate() {
            r.metrics = None;
            r.inflight = 3 - i as u32;
        }
        let mut memory = PrefixMemory::default();
        assert_eq!(
            memory.pick(1, &region, key(1), &params),
            Some((2, PickReason::Fallback))
        );
        assert!(memory.is_empty(), "nothing placed on no information");
    }
}
