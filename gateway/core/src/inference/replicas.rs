//! A model call's replica inside a region, from what the edge knows of its model servers: the
//! table the scraper fills (queue, running, KV cache, adapters per address) and this edge's own
//! in-flight counts. [`CallPick`] turns a region's upstreams into [`pick::Replica`]s and asks
//! [`pick::pick`]; it also says when a whole region is saturated, which is when a call spills to
//! the next region (see `exchange::Tries::next_call`).
//!
//! A table older than `stale_after_ms` is worth nothing: every replica is then picked least
//! outstanding (the same weighted pick as any route), and the pick says `Fallback`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use super::pick::{self, PickParams, PickReason, Replica, ReplicaMetrics};
use super::prefixes::PrefixMemory;
use crate::select::{in_panic, pick_upstream, upstream_eligible};
use crate::snapshot::{CompiledRegion, CompiledUpstream};

/// What the last scrape round found, by model server address.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaTable {
    /// When the round ended, on the edge's monotonic millisecond clock (`now_ms`).
    pub at_ms: u64,
    pub replicas: HashMap<SocketAddr, ReplicaState>,
}

/// One model server's last scraped state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaState {
    pub metrics: ReplicaMetrics,
    /// The LoRA adapters it has loaded; `None` when it reports none of its adapters at all.
    pub adapters: Option<Vec<String>>,
}

/// How one model call picks its replicas.
#[derive(Clone, Copy, Debug)]
pub struct CallPick<'a> {
    /// `false`: `[inference] picking = "least_outstanding"`, the plain weighted pick.
    pub model_aware: bool,
    pub params: PickParams,
    /// Hash of the session key or the prompt prefix.
    pub affinity: Option<u64>,
    /// This edge's memory of where prefixes went (`None`: plain rendezvous order). Locked only
    /// for the pick itself.
    pub memory: Option<&'a Mutex<PrefixMemory>>,
    /// The model as the call names it: an adapter is asked for by its name.
    pub model: &'a str,
    pub table: &'a ReplicaTable,
    /// A table older than this (ms) is stale.
    pub stale_after_ms: u64,
}

impl CallPick<'_> {
    fn fresh(&self, now_ms: u64) -> bool {
        self.model_aware && now_ms.saturating_sub(self.table.at_ms) <= self.stale_after_ms
    }

    fn replica(&self, upstream: &CompiledUpstream, available: bool, fresh: bool) -> Replica {
        let state = fresh
            .then(|| self.table.replicas.get(&upstream.address))
            .flatten();
        Replica {
            available,
            inflight: upstream.state.inflight(),
            metrics: state.map(|s| s.metrics),
            has_adapter: state
                .and_then(|s| s.adapters.as_ref())
                .map(|list| list.iter().any(|a| a == self.model)),
            id: address_id(upstream.address),
        }
    }

    /// The replica of `region` for this call (an index into its upstreams) and why, skipping
    /// those `excluded` names (already tried); `None` when none can take it.
    pub fn pick(
        &self,
        region: &CompiledRegion,
        now_ms: u64,
        rotation: usize,
        excluded: impl Fn(usize) -> bool,
    ) -> Option<(usize, PickReason)> {
        let fresh = self.fresh(now_ms);
        if fresh {
            let panic = in_panic(region, now_ms);
            let replicas: Vec<Replica> = region
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    self.replica(u, upstream_eligible(u, now_ms, panic) && !excluded(i), true)
                })
                .collect();
            let picked = match (self.affinity, self.memory) {
                (Some(key), Some(memory)) => memory.lock().unwrap_or_else(|p| p.into_inner()).pick(
                    pick::stable_hash(region.name.as_bytes()),
                    &replicas,
                    key,
                    &self.params,
                ),
                (affinity, _) => pick::pick(&replicas, affinity, &self.params),
            };
            if let Some(picked) = picked {
                if picked.1 != PickReason::Fallback {
                    return Some(picked);
                }
            }
        }
        // Nothing known of these servers (or not asked to look): weighted least outstanding.
        let reason = if self.model_aware {
            PickReason::Fallback
        } else {
            PickReason::LeastOutstanding
        };
        pick_upstream(region, now_ms, rotation, excluded).map(|i| (i, reason))
    }

    /// Every available model server of `region` reported at least `saturation_queue` waiting
    /// requests (and the table is fresh): new calls should go elsewhere if they may.
    pub fn region_saturated(&self, region: &CompiledRegion, now_ms: u64) -> bool {
        if !self.fresh(now_ms) {
            return false;
        }
        let panic = in_panic(region, now_ms);
        let replicas: Vec<Replica> = region
            .upstreams
            .iter()
            .map(|u| self.replica(u, upstream_eligible(u, now_ms, panic), true))
            .collect();
        pick::region_saturated(&replicas, &self.params)
    }
}

/// A replica's identity for affinity hashing: its address, so every edge (and every snapshot)
/// hashes a replica the same way.
fn address_id(address: SocketAddr) -> u64 {
    let mut bytes = [0u8; 18];
    match address.ip() {
        std::net::IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        std::net::IpAddr::V6(v6) => bytes[..16].copy_from_slice(&v6.octets()),
    }
    bytes[16..].copy_from_slice(&address.port().to_be_bytes());
    pick::stable_hash(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Snapshot, SnapshotMeta, UpstreamStates};
    use meridian_config::Config;

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
models = ["m"]

[[routes]]
name = "inference"
hosts = ["api.test"]
kind = "inference"
regions = ["near"]
default_region = "near"
"#;

    fn snapshot() -> Snapshot {
        let config = Config::from_toml_str(FOUR).expect("config");
        Snapshot::compile(config, SnapshotMeta::default(), &UpstreamStates::default())
            .expect("compile")
    }

    fn table(snap: &Snapshot, waiting: [f64; 4], at_ms: u64) -> ReplicaTable {
        let replicas = snap.regions[0]
            .upstreams
            .iter()
            .zip(waiting)
            .map(|(u, waiting)| {
                let metrics = ReplicaMetrics {
                    waiting,
                    ..ReplicaMetrics::default()
                };
                let adapters = Some(vec!["sql-lora".to_string()]).filter(|_| waiting == 0.5);
                (u.address, ReplicaState { metrics, adapters })
            })
            .collect();
        ReplicaTable { at_ms, replicas }
    }

    fn call<'a>(table: &'a ReplicaTable, model_aware: bool) -> CallPick<'a> {
        CallPick {
            model_aware,
            params: PickParams::default(),
            affinity: None,
            memory: None,
            model: "m",
            table,
            stale_after_ms: 1_000,
        }
    }

    #[test]
    fn fresh_tables_score_stale_ones_fall_back() {
        let snap = snapshot();
        let region = &snap.regions[0];
        let table = table(&snap, [9.0, 3.0, 0.0, 2.0], 100);
        let fresh = call(&table, true);
        assert_eq!(
            fresh.pick(region, 200, 0, |_| false),
            Some((2, PickReason::Score))
        );
        assert_eq!(
            fresh.pick(region, 200, 0, |i| i == 2),
            Some((3, PickReason::Score)),
            "tried ones are skipped"
        );
        assert_eq!(
            fresh.pick(region, 5_000, 1, |_| false),
            Some((1, PickReason::Fallback)),
            "stale: least outstanding from the rotation"
        );
        let plain = call(&table, false);
        assert_eq!(
            plain.pick(region, 200, 1, |_| false),
            Some((1, PickReason::LeastOutstanding))
        );
        assert!(!fresh.region_saturated(region, 200));
        let full = self::table(&snap, [9.0; 4], 100);
        assert!(call(&full, true).region_saturated(region, 200));
        assert!(!call(&full, true).region_saturated(region, 5_000), "stale");
        assert!(!call(&full, false).region_saturated(region, 200));
        let empty = ReplicaTable {
            at_ms: 100,
            ..ReplicaTable::default()
        };
        assert_eq!(
            call(&empty, true).pick(region, 200, 3, |_| false),
            Some((3, PickReason::Fallback)),
            "no server answered: fallback"
        );
    }

    #[test]
    fn adapters_are_matched_by_the_model_name() {
        let snap = snapshot();
        let region = &snap.regions[0];
        // Replica 1 has the adapter and a slightly longer queue than replica 0.
        let table = table(&snap, [0.0, 0.5, 4.0, 4.0], 0);
        let mut with = call(&table, true);
        with.model = "sql-lora";
        assert_eq!(with.pick(region, 0, 0, |_| false).map(|p| p.0), Some(1));
        assert_eq!(
            call(&table, true)
                .pick(region, 0, 0, |_| false)
                .map(|p| p.0),
            Some(0)
        );
    }
}
