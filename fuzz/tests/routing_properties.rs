//! Property tests for routing on `examples/local.toml`: for generated clients (every test-world
//! country and unknown ones), hosts, paths, health verdicts, ejections, penalties and times,
//! strict residency is never violated and a decision is a function of the snapshot and time.

use std::net::{IpAddr, Ipv4Addr};

use meridian_config::Config;
use meridian_core::snapshot::{Snapshot, SnapshotMeta, UpstreamStates};
use meridian_core::{decide, RequestView};
use meridian_fuzz::Rng;
use meridian_geoip::test_world::PLACES;
use meridian_geoip::{CountryCode, Location};

const LOCAL: &str = include_str!("../../examples/local.toml");

fn locate(ip: IpAddr) -> Option<Location> {
    let IpAddr::V4(v4) = ip else { return None };
    PLACES
        .iter()
        .find(|p| p.client_addr(1) == IpAddr::V4(Ipv4Addr::new(127, v4.octets()[1], 0, 1)))
        .map(|p| Location {
            country: CountryCode::parse(p.country),
            continent: CountryCode::parse(p.continent),
            coordinates: Some((p.latitude, p.longitude)),
        })
}

#[test]
fn residency_holds_and_decisions_are_deterministic() {
    let config = Config::from_toml_str(LOCAL).expect("example config");
    let hosts: Vec<String> = config
        .routes
        .iter()
        .flat_map(|r| r.hosts.iter().map(|h| h.replace('*', "x")))
        .chain(["nobody.invalid".to_string()])
        .collect();
    let paths = [
        "/",
        "/v1/records",
        "/v1/chat/completions",
        "/hello",
        "/elsewhere",
    ];
    let mut rng = Rng(42);
    for round in 0..200 {
        // A fresh snapshot per round, with its own random runtime state.
        let snapshot = Snapshot::compile(
            config.clone(),
            SnapshotMeta::default(),
            &UpstreamStates::default(),
        )
        .expect("compiles");
        for region in &snapshot.regions {
            for upstream in &region.upstreams {
                if rng.below(4) == 0 {
                    upstream.state.record_probe(false, 1, 1);
                }
                for _ in 0..rng.below(8) {
                    let may_eject = rng.below(2) == 0;
                    upstream.state.record_failure(0, &region.outlier, may_eject);
                }
            }
            if rng.below(8) == 0 {
                region.state.penalize_until(rng.below(20_000) as u64);
            }
        }
        for _ in 0..100 {
            let client = if rng.below(10) == 0 {
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))
            } else {
                PLACES[rng.below(PLACES.len())].client_addr(1 + rng.below(200) as u8)
            };
            let view = RequestView {
                host: &hosts[rng.below(hosts.len())],
                path: paths[rng.below(paths.len())],
                client,
            };
            let now = rng.below(30_000) as u64;
            let first = decide(&snapshot, &view, locate, now);
            let second = decide(&snapshot, &view, locate, now);
            assert_eq!(
                first, second,
                "round {round}: same snapshot, same time, same decision"
            );
            let Ok(decision) = first else { continue };
            let Some(country) = decision.country else {
                continue;
            };
            if let Some(rule) = snapshot.residency.get(&country) {
                if rule.strict {
                    for &region in decision.candidates.as_slice() {
                        assert!(
                            rule.allowed[usize::from(region)],
                            "round {round}: {country:?} routed to {}",
                            snapshot.regions[usize::from(region)].name
                        );
                    }
                }
            }
        }
    }
}
