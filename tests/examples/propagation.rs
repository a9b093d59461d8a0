//! Push-to-applied propagation latency: three edges follow one config service; each push's time
//! until every edge serves it (seen on `/admin/snapshot`), over N pushes. Prints p50/p99/max.
//!
//! `cargo run --release -p meridian-tests --example propagation -- 100`

use std::time::{Duration, Instant};

use meridian_tests::{local_config, World};

fn main() {
    let pushes: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let world = World::start_following(local_config());
    let second = world.start_edge("edge-1-cache");
    let third = world.start_edge("edge-2-cache");
    let edges = [&world.edge, &second, &third];
    let regions = ["us-east", "eu-central-1", "mx-central", "ap-southeast-1"];
    let mut all_edges = Vec::with_capacity(pushes);
    let mut per_edge = Vec::with_capacity(pushes * 3);
    for n in 0..pushes {
        let mut config = world.config.clone();
        if let Some(api) = config.routes.iter_mut().find(|r| r.name == "api") {
            api.default_region = Some(regions[n % regions.len()].to_string());
        }
        let started = Instant::now();
        let version = world.push(&config, "propagation benchmark");
        let mut pending: Vec<usize> = (0..edges.len()).collect();
        while !pending.is_empty() {
            pending.retain(|&i| {
                let seen = world.wait_for_version_once(edges[i]);
                if seen >= version {
                    per_edge.push(started.elapsed());
                    false
                } else {
                    true
                }
            });
            if started.elapsed() > Duration::from_secs(10) {
                panic!("version {version} did not reach every edge within 10 s");
            }
        }
        all_edges.push(started.elapsed());
    }
    let report = |name: &str, samples: &mut Vec<Duration>| {
        samples.sort();
        let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        println!(
            "{name:<28} n={:<4} p50={:>8.2?} p99={:>8.2?} max={:>8.2?}",
            samples.len(),
            pick(0.50),
            pick(0.99),
            samples[samples.len() - 1]
        );
    };
    report("push -> one edge applied", &mut per_edge);
    report("push -> all 3 edges applied", &mut all_edges);
}
