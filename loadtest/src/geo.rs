//! `--geo-mix`: which test-world country each connection comes from, and how many requests each
//! country sends. Apportionment is deterministic so that a fixed `--requests` gives exact counts.

use std::net::IpAddr;

use meridian_geoip::test_world::{place_for_country, Place};

#[derive(Clone, Debug)]
pub struct GeoMix {
    pub entries: Vec<(&'static Place, u64)>,
}

impl GeoMix {
    /// Parses `MX=30,SG=20,KR=10`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries: Vec<(&'static Place, u64)> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (country, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("bad --geo-mix entry {part:?} (expected CC=WEIGHT)"))?;
            let place = place_for_country(country.trim())
                .ok_or_else(|| format!("unknown test-world country {country:?} in --geo-mix"))?;
            let weight: u64 = weight
                .trim()
                .parse()
                .map_err(|_| format!("bad weight in --geo-mix entry {part:?}"))?;
            if entries.iter().any(|(p, _)| p.country == place.country) {
                return Err(format!("country {} twice in --geo-mix", place.country));
            }
            if weight > 0 {
                entries.push((place, weight));
            }
        }
        if entries.is_empty() {
            return Err("--geo-mix has no country with a weight above 0".into());
        }
        Ok(Self { entries })
    }
}

/// Where one connection comes from.
#[derive(Clone, Debug)]
pub struct Origin {
    /// Test-world country code, or `None` (the OS picks the source address).
    pub country: Option<&'static str>,
    pub source: Option<IpAddr>,
}

/// Splits `total` into parts proportional to `weights` (largest remainder, ties to the first).
pub fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let mut parts: Vec<u64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (i, &w) in weights.iter().enumerate() {
        let exact = u128::from(total) * u128::from(w);
        parts.push((exact / sum) as u64);
        remainders.push((exact % sum, i));
    }
    let given: u64 = parts.iter().sum();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take((total - given) as usize) {
        parts[i] += 1;
    }
    parts
}

/// The plan: where each connection comes from and each country's share of a request budget.
#[derive(Clone, Debug)]
pub struct Plan {
    pub connections: Vec<Origin>,
    /// Per connection: index into the group it belongs to (one group per country, or one group).
    pub group_of: Vec<usize>,
    /// Per group: its weight for request apportioning.
    pub group_weights: Vec<u64>,
}

impl Plan {
    pub fn new(connections: usize, mix: Option<&GeoMix>) -> Self {
        let Some(mix) = mix else {
            return Self {
                connections: vec![
                    Origin {
                        country: None,
                        source: None
                    };
                    connections
                ],
                group_of: vec![0; connections],
                group_weights: vec![1],
            };
        };
        let weights: Vec<u64> = mix.entries.iter().map(|(_, w)| *w).collect();
        // Every country gets one connection first (when there are enough), the rest by weight.
        let k = weights.len() as u64;
        let n = connections as u64;
        let per_country = if n >= k {
            apportion(n - k, &weights)
                .into_iter()
                .map(|c| c + 1)
                .collect()
        } else {
            apportion(n, &weights)
        };
        let mut plan = Self {
            connections: Vec::with_capacity(connections),
            group_of: Vec::with_capacity(connections),
            group_weights: Vec::new(),
        };
        for ((place, weight), count) in mix.entries.iter().zip(per_country) {
            if count == 0 {
                continue;
            }
            let group = plan.group_weights.len();
            plan.group_weights.push(*weight);
            for i in 0..count {
                // Hosts 127.X.0.1 ..= 127.X.0.254, spread across this country's connections.
                let host = (i % 254) as u8 + 1;
                plan.connections.push(Origin {
                    country: Some(place.country),
                    source: Some(place.client_addr(host)),
                });
                plan.group_of.push(group);
            }
        }
        plan
    }

    /// Per connection: its share of `total` requests (exact per group for the groups' weights).
    pub fn connection_quotas(&self, total: u64) -> Vec<u64> {
        let group_quota = apportion(total, &self.group_weights);
        let mut quotas = vec![0; self.connections.len()];
        for (g, quota) in group_quota.iter().enumerate() {
            let members: Vec<usize> = (0..self.connections.len())
                .filter(|&c| self.group_of[c] == g)
                .collect();
            let shares = apportion(*quota, &vec![1; members.len()]);
            for (c, share) in members.into_iter().zip(shares) {
                quotas[c] = share;
            }
        }
        quotas
    }
}

/// Smooth weighted round-robin (as in NGINX): after `sum(weights)` picks every index was chosen
/// exactly its weight, and the picks are interleaved rather than bunched.
pub struct SmoothRoundRobin {
    weights: Vec<i128>,
    current: Vec<i128>,
    total: i128,
}

impl SmoothRoundRobin {
    pub fn new(weights: &[u64]) -> Self {
        let weights: Vec<i128> = weights.iter().map(|&w| i128::from(w)).collect();
        let total = weights.iter().sum();
        Self {
            current: vec![0; weights.len()],
            weights,
            total,
        }
    }

    pub fn next_index(&mut self) -> usize {
        let mut best = 0;
        for i in 0..self.weights.len() {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apportion_is_exact() {
        assert_eq!(apportion(200, &[30, 20, 10]), vec![100, 67, 33]);
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(0, &[1, 2]), vec![0, 0]);
        assert_eq!(apportion(7, &[0, 0]), vec![0, 0]);
    }

    #[test]
    fn plan_spreads_hosts_and_gives_each_country_a_connection() {
        let mix = GeoMix::parse("MX=30,SG=20,KR=1").expect("mix");
        let plan = Plan::new(8, Some(&mix));
        assert_eq!(plan.connections.len(), 8);
        let kr: Vec<_> = plan
            .connections
            .iter()
            .filter(|o| o.country == Some("KR"))
            .collect();
        assert_eq!(kr.len(), 1);
        let mx: Vec<String> = plan
            .connections
            .iter()
            .filter(|o| o.country == Some("MX"))
            .filter_map(|o| o.source.map(|s| s.to_string()))
            .collect();
        assert_eq!(mx[0], "127.10.0.1");
        assert_eq!(mx[1], "127.10.0.2");
        let quotas = plan.connection_quotas(510);
        assert_eq!(quotas.iter().sum::<u64>(), 510);
    }

    #[test]
    fn smooth_round_robin_is_exact_per_cycle() {
        let mut rr = SmoothRoundRobin::new(&[5, 1, 1]);
        let picks: Vec<usize> = (0..7).map(|_| rr.next_index()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn bad_mixes() {
        assert!(GeoMix::parse("XX=1").is_err());
        assert!(GeoMix::parse("MX").is_err());
        assert!(GeoMix::parse("MX=0").is_err());
        assert!(GeoMix::parse("MX=1,mx=2").is_err());
    }
}
