//! The routing decision for one request: which route, where the client is, which regions in what order.

use std::net::IpAddr;

use meridian_geoip::{CountryCode, Location};

use super::models::ModelId;
use super::route_match::MatchError;
use super::select::{order_regions_serving, RegionOrder, RegionVerdict};
use super::snapshot::Snapshot;

/// What the core needs to know about a request (built by each transport adapter, borrowed).
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// `Host` header (HTTP/1.1) or `:authority` (HTTP/2, HTTP/3).
    pub host: &'a str,
    pub path: &'a str,
    /// The client address, already resolved through trusted proxies (see `core::client`).
    pub client: IpAddr,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteDecision {
    pub route: usize,
    pub country: Option<CountryCode>,
    pub located: bool,
    pub candidates: RegionOrder,
}

/// Why a request is answered by the edge itself instead of an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No route claims the host: `421`, and no upstream is contacted (no open proxy).
    UnknownHost,
    /// The host is ours, the path is not: `404`.
    NoRoute,
    /// Strict residency leaves no region for this client's country: `503`.
    Residency { route: usize, country: CountryCode },
    /// Every allowed region is down, draining or full: `503` with `Retry-After`, at once.
    Unavailable { route: usize, reason: RegionVerdict },
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::UnknownHost => 421,
            Refusal::NoRoute => 404,
            Refusal::Residency { .. } | Refusal::Unavailable { .. } => 503,
        }
    }
}

pub fn decide(
    snapshot: &Snapshot,
    view: &RequestView<'_>,
    locate: impl Fn(IpAddr) -> Option<Location>,
    now_ms: u64,
) -> Result<RouteDecision, Refusal> {
    decide_serving(snapshot, view, locate, now_ms, None)
}

/// [`decide`] for an inference request naming `model`: only regions serving the model
/// are candidates (eligible ∩ residency ∩ serves model ∩ healthy ∩ below capacity, nearest first).
pub fn decide_for_model(
    snapshot: &Snapshot,
    view: &RequestView<'_>,
    locate: impl Fn(IpAddr) -> Option<Location>,
    now_ms: u64,
    model: ModelId,
) -> Result<RouteDecision, Refusal> {
    let serves = snapshot
        .models
        .get(model)
        .map(|m| m.served_by.as_slice())
        .unwrap_or(&[]);
    decide_serving(snapshot, view, locate, now_ms, Some(serves))
}

fn decide_serving(
    snapshot: &Snapshot,
    view: &RequestView<'_>,
    locate: impl Fn(IpAddr) -> Option<Location>,
    now_ms: u64,
    serves: Option<&[bool]>,
) -> Result<RouteDecision, Refusal> {
    let route_index = snapshot
        .hosts
        .find(view.host, view.path)
        .map_err(|e| match e {
            MatchError::UnknownHost => Refusal::UnknownHost,
            MatchError::NoPath => Refusal::NoRoute,
        })?;
    let route = &snapshot.routes[route_index];
    let location = locate(view.client);
    let country = location.and_then(|l| l.country);
    let residency = country.and_then(|c| snapshot.residency.get(&c));
    let coordinates = location.and_then(|l| l.coordinates);
    let candidates = order_regions_serving(snapshot, route, coordinates, residency, now_ms, serves);
    if candidates.is_empty() {
        if let (None, Some(country)) = (candidates.preferred, country) {
            return Err(Refusal::Residency {
                route: route_index,
                country,
            });
        }
        return Err(Refusal::Unavailable {
            route: route_index,
            reason: candidates.skipped.unwrap_or(RegionVerdict::Unhealthy),
        });
    }
    Ok(RouteDecision {
        route: route_index,
        country,
        located: coordinates.is_some(),
        candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::pick_upstream;
    use crate::snapshot::{SnapshotMeta, UpstreamStates};
    use meridian_config::Config;
    use meridian_geoip::test_world::PLACES;

    const LOCAL: &str = include_str!("../../../examples/local.toml");

    fn snapshot(text: &str) -> Snapshot {
        let config = Config::from_toml_str(text).expect("config");
        Snapshot::compile(config, SnapshotMeta::default(), &UpstreamStates::default())
            .expect("compile")
    }

    fn world(ip: IpAddr) -> Option<Location> {
        let v4 = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => return None,
        };
        PLACES
            .iter()
            .find(|p| {
                p.client_addr(1) == IpAddr::V4(std::net::Ipv4Addr::new(127, v4.octets()[1], 0, 1))
            })
            .map(|p| Location {
                country: CountryCode::parse(p.country),
                continent: CountryCode::parse(p.continent),
                coordinates: Some((p.latitude, p.longitude)),
            })
    }

    fn region_for(snap: &Snapshot, client: &str) -> Result<String, Refusal> {
        let view = RequestView {
            host: "api.example.test",
            path: "/hello",
            client: client.parse().expect("ip"),
        };
        let d = decide(snap, &view, world, 0)?;
        Ok(snap.regions[d.candidates.get(0).expect("a candidate")]
            .name
            .clone())
    }

    #[test]
    fn every_test_world_country_reaches_its_region() {
        let snap = snapshot(LOCAL);
        for place in PLACES {
            let client = place.client_addr(9).to_string();
            assert_eq!(
                region_for(&snap, &client).as_deref(),
                Ok(place.expected_region),
                "{}",
                place.country
            );
        }
    }

    #[test]
    fn unknown_location_gets_default_region_first() {
        let snap = snapshot(LOCAL);
        assert_eq!(region_for(&snap, "127.0.0.1").as_deref(), Ok("us-east"));
    }

    #[test]
    fn strict_residency_keeps_kr_home_or_refuses() {
        let snap = snapshot(LOCAL);
        let view = RequestView {
            host: "api.example.test",
            path: "/v1/x",
            client: "127.15.0.3".parse().expect("ip"),
        };
        let d = decide(&snap, &view, world, 0).expect("decision");
        assert_eq!(d.candidates.len(), 1, "KR may only use ap-northeast-2");
        // A route whose regions exclude ap-northeast-2 cannot serve KR at all.
        let view = RequestView {
            host: "eu.example.test",
            ..view
        };
        assert!(matches!(
            decide(&snap, &view, world, 0),
            Err(Refusal::Residency { .. })
        ));
    }

    #[test]
    fn fallback_order_is_by_distance() {
        let snap = snapshot(LOCAL);
        let view = RequestView {
            host: "api.example.test",
            path: "/",
            client: "127.12.0.3".parse().expect("ip"),
        };
        let d = decide(&snap, &view, world, 0).expect("decision");
        let names: Vec<&str> = d
            .candidates
            .as_slice()
            .iter()
            .map(|&i| snap.regions[usize::from(i)].name.as_str())
            .collect();
        assert_eq!(
            &names[..3],
            ["ap-southeast-1", "ap-southeast-3", "ap-southeast-7"]
        );
    }

    #[test]
    fn unknown_host_and_path_are_refused() {
        let snap = snapshot(LOCAL);
        let mut view = RequestView {
            host: "nobody.invalid",
            path: "/",
            client: "127.12.0.3".parse().expect("ip"),
        };
        assert_eq!(decide(&snap, &view, world, 0), Err(Refusal::UnknownHost));
        view.host = "eu.example.test";
        view.path = "/elsewhere";
        assert_eq!(decide(&snap, &view, world, 0), Err(Refusal::NoRoute));
    }

    #[test]
    fn model_aware_order_keeps_only_regions_serving_the_model() {
        let snap = snapshot(LOCAL);
        let max = snap.models.resolve("qwen-max").expect("qwen-max");
        let view = RequestView {
            host: "inference.example.test",
            path: "/v1/chat/completions",
            client: "127.10.0.3".parse().expect("ip"),
        };
        let d = decide_for_model(&snap, &view, world, 0, max).expect("decision");
        let names: Vec<&str> = d
            .candidates
            .as_slice()
            .iter()
            .map(|&i| snap.regions[usize::from(i)].name.as_str())
            .collect();
        assert_eq!(
            names,
            ["eu-central-1", "ap-southeast-1"],
            "Mexico: Frankfurt first"
        );
        // A Retry-After penalty takes Frankfurt out until it expires.
        let eu = snap.region_index("eu-central-1").expect("eu");
        snap.regions[eu].state.penalize_until(1_000);
        let d = decide_for_model(&snap, &view, world, 999, max).expect("decision");
        assert_eq!(d.candidates.get(0), snap.region_index("ap-southeast-1"));
        let d = decide_for_model(&snap, &view, world, 1_000, max).expect("decision");
        assert_eq!(d.candidates.get(0), Some(eu));
    }

    #[test]
    fn upstream_choice_is_least_outstanding_per_weight() {
        let snap = snapshot(LOCAL);
        let region = &snap.regions[snap.region_index("us-east").expect("us-east")];
        assert_eq!(region.upstreams.len(), 2);
        let first = pick_upstream(region, 0, 0, |_| false).expect("pick");
        let _busy = region.upstreams[first].state.begin();
        let second = pick_upstream(region, 0, 0, |_| false).expect("pick");
        assert_ne!(first, second, "the idle upstream wins");
        assert_eq!(pick_upstream(region, 0, 0, |i| i == second), Some(first));
        assert_eq!(pick_upstream(region, 0, 0, |_| true), None);
    }
}
