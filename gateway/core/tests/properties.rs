//! Property tests (proptest) for what the edge decides and parses: routing invariants over
//! generated topologies, outlier state and clients; path normalisation; the HTTP/1 request head
//! parser. A failing case is shrunk and printed; nothing is written to the source tree.

use std::net::{IpAddr, Ipv4Addr};

use meridian_config::Config;
use meridian_core::exchange::{Replay, Tries, TryVerdict};
use meridian_core::http1::{parse_request, HeadLimits};
use meridian_core::route_match::normalize_path;
use meridian_core::select::{
    ejection_allowed, in_panic, region_verdict, upstream_eligible, RegionVerdict,
};
use meridian_core::snapshot::{Snapshot, SnapshotMeta, UpstreamStates};
use meridian_core::{decide, RequestView};
use meridian_geoip::{CountryCode, Location};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// --- generated topologies ---

const COUNTRIES: [&str; 4] = ["KR", "DE", "US", "BR"];

#[derive(Clone, Debug)]
struct RegionSpec {
    lat: f64,
    lon: f64,
    /// Upstream weights (0: takes no traffic).
    weights: Vec<u32>,
    consecutive_failures: u32,
    max_ejection_percent: u32,
    panic_threshold: u32,
    min_healthy: u32,
}

#[derive(Clone, Debug)]
struct RouteSpec {
    /// Indices into the regions (deduplicated and taken modulo the region count).
    regions: Vec<usize>,
    default: usize,
}

#[derive(Clone, Debug)]
struct ResidencySpec {
    country: usize,
    regions: Vec<usize>,
    strict: bool,
}

#[derive(Clone, Debug)]
struct Topology {
    regions: Vec<RegionSpec>,
    routes: Vec<RouteSpec>,
    residency: Vec<ResidencySpec>,
}

fn region_spec() -> impl Strategy<Value = RegionSpec> {
    (
        (-80.0f64..80.0, -179.0f64..179.0),
        prop::collection::vec(prop_oneof![4 => 1u32..5, 1 => Just(0u32)], 1..5),
        1u32..4,
        0u32..=100,
        prop_oneof![Just(0u32), 0u32..=100],
        prop_oneof![3 => Just(1u32), 1 => 1u32..4],
    )
        .prop_map(
            |((lat, lon), weights, consecutive_failures, max_ejection_percent, panic, min)| {
                RegionSpec {
                    lat,
                    lon,
                    weights,
                    consecutive_failures,
                    max_ejection_percent,
                    panic_threshold: panic,
                    min_healthy: min,
                }
            },
        )
}

fn topology() -> impl Strategy<Value = Topology> {
    prop::collection::vec(region_spec(), 1..6).prop_flat_map(|regions| {
        let n = regions.len();
        let route = (prop::collection::vec(0..n, 1..=n), 0..n)
            .prop_map(|(regions, default)| RouteSpec { regions, default });
        let residency = (
            0..COUNTRIES.len(),
            prop::collection::vec(0..n, 1..=n),
            any::<bool>(),
        )
            .prop_map(|(country, regions, strict)| ResidencySpec {
                country,
                regions,
                strict,
            });
        (
            Just(regions),
            prop::collection::vec(route, 1..4),
            prop::collection::vec(residency, 0..4),
        )
            .prop_map(|(regions, routes, residency)| Topology {
                regions,
                routes,
                residency,
            })
    })
}

impl Topology {
    /// The topology as a config document; `None` if validation refuses it.
    fn snapshot(&self) -> Option<Snapshot> {
        let mut text = String::from(
            "schema = 1\n[edge]\npop = \"p\"\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
        );
        for (r, region) in self.regions.iter().enumerate() {
            let upstreams: Vec<String> = region
                .weights
                .iter()
                .enumerate()
                .map(|(u, w)| format!("{{ address = \"127.1.{r}.{}:80\", weight = {w} }}", u + 1))
                .collect();
            text += &format!(
                "[[regions]]\nname = \"r{r}\"\nlocation = {{ lat = {:.3}, lon = {:.3} }}\n\
                 upstreams = [{}]\nmin_healthy = {}\n\
                 outlier = {{ consecutive_failures = {}, base_ejection = \"10s\", \
                 max_ejection = \"60s\", max_ejection_percent = {}, panic_threshold = {} }}\n",
                region.lat,
                region.lon,
                upstreams.join(", "),
                region.min_healthy,
                region.consecutive_failures,
                region.max_ejection_percent,
                region.panic_threshold,
            );
        }
        for (i, route) in self.routes.iter().enumerate() {
            let mut regions: Vec<usize> = route.regions.clone();
            regions.sort_unstable();
            regions.dedup();
            let default = regions[route.default % regions.len()];
            let names: Vec<String> = regions.iter().map(|r| format!("\"r{r}\"")).collect();
            text += &format!(
                "[[routes]]\nname = \"route{i}\"\nhosts = [\"h{i}.test\"]\nregions = [{}]\n\
                 default_region = \"r{default}\"\n\
                 retry = {{ attempts = 3, on_status = [503], budget_percent = 100, \
                 budget_min_per_window = 1000 }}\n",
                names.join(", "),
            );
        }
        let mut seen = [false; COUNTRIES.len()];
        for rule in &self.residency {
            if std::mem::replace(&mut seen[rule.country], true) {
                continue;
            }
            let mut regions = rule.regions.clone();
            regions.sort_unstable();
            regions.dedup();
            let names: Vec<String> = regions.iter().map(|r| format!("\"r{r}\"")).collect();
            text += &format!(
                "[[residency]]\ncountries = [\"{}\"]\nregions = [{}]\nstrict = {}\n",
                COUNTRIES[rule.country],
                names.join(", "),
                rule.strict
            );
        }
        let config = Config::from_toml_str(&text).ok()?;
        Snapshot::compile(config, SnapshotMeta::default(), &UpstreamStates::default()).ok()
    }
}

/// Runtime state to lay over a snapshot: per (region, upstream) slot, probe failures and request
/// failures; per region, a penalty.
#[derive(Clone, Debug)]
struct Weather {
    unhealthy: Vec<bool>,
    failures: Vec<u8>,
    penalized: Vec<Option<u16>>,
}

fn weather() -> impl Strategy<Value = Weather> {
    (
        prop::collection::vec(prop::bool::weighted(0.25), 32),
        prop::collection::vec(0u8..8, 32),
        prop::collection::vec(prop::option::weighted(0.1, 0u16..20_000), 8),
    )
        .prop_map(|(unhealthy, failures, penalized)| Weather {
            unhealthy,
            failures,
            penalized,
        })
}

impl Weather {
    /// Lays the state over `snapshot` the way the edge would: probe verdicts, and request
    /// failures recorded through the region's ejection cap.
    fn apply(&self, snapshot: &Snapshot) {
        let mut slot = 0;
        for (r, region) in snapshot.regions.iter().enumerate() {
            for upstream in &region.upstreams {
                let i = slot % self.unhealthy.len();
                slot += 1;
                if self.unhealthy[i] {
                    upstream.state.record_probe(false, 1, 1);
                }
                for _ in 0..self.failures[i] {
                    let may_eject = ejection_allowed(region, 0);
                    upstream.state.record_failure(0, &region.outlier, may_eject);
                }
            }
            if let Some(until) = self.penalized[r % self.penalized.len()] {
                region.state.penalize_until(u64::from(until));
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Client {
    country: Option<usize>,
    coordinates: Option<(f64, f64)>,
}

fn client() -> impl Strategy<Value = Client> {
    (
        prop::option::weighted(0.8, 0..COUNTRIES.len()),
        prop::option::weighted(0.8, (-80.0f64..80.0, -179.0f64..179.0)),
    )
        .prop_map(|(country, coordinates)| Client {
            country,
            coordinates,
        })
}

impl Client {
    fn location(self) -> Option<Location> {
        if self.country.is_none() && self.coordinates.is_none() {
            return None;
        }
        Some(Location {
            country: self.country.and_then(|c| CountryCode::parse(COUNTRIES[c])),
            continent: None,
            coordinates: self.coordinates,
        })
    }
}

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 20, 0, 1));

proptest! {
    #![proptest_config(config(256))]

    /// Strict residency is never violated, and a decision is a function of the snapshot, the
    /// request and the time.
    #[test]
    fn residency_holds_and_decisions_are_deterministic(
        topology in topology(),
        weather in weather(),
        client in client(),
        route in 0usize..4,
        now in 0u64..30_000,
    ) {
        let Some(snapshot) = topology.snapshot() else {
            return Err(TestCaseError::reject("config refused"));
        };
        weather.apply(&snapshot);
        let host = format!("h{}.test", route % snapshot.routes.len());
        let view = RequestView { host: &host, path: "/", client: CLIENT };
        let locate = |_| client.location();
        let first = decide(&snapshot, &view, locate, now);
        prop_assert_eq!(first, decide(&snapshot, &view, locate, now));
        let Ok(decision) = first else { return Ok(()) };
        let rule = decision.country.and_then(|c| snapshot.residency.get(&c));
        if let Some(rule) = rule.filter(|r| r.strict) {
            for &region in decision.candidates.as_slice() {
                prop_assert!(
                    rule.allowed[usize::from(region)],
                    "routed to {}", snapshot.regions[usize::from(region)].name
                );
            }
        }
        // Candidates are regions of the route, each at most once.
        let eligible = &snapshot.routes[decision.route].eligible;
        let candidates = decision.candidates.as_slice();
        for (i, region) in candidates.iter().enumerate() {
            prop_assert!(eligible.contains(region));
            prop_assert!(!candidates[..i].contains(region));
        }
    }

    /// Every try goes to a healthy upstream that takes traffic, and never to an ejected one
    /// while its region is not in panic; outside panic, no region is passed over while it has
    /// an available upstream not yet tried.
    #[test]
    fn tries_never_pick_an_ejected_or_unhealthy_upstream_while_a_good_one_exists(
        topology in topology(),
        weather in weather(),
        client in client(),
        now in 0u64..30_000,
        rotation in 0usize..16,
    ) {
        let Some(snapshot) = topology.snapshot() else {
            return Err(TestCaseError::reject("config refused"));
        };
        weather.apply(&snapshot);
        let view = RequestView { host: "h0.test", path: "/", client: CLIENT };
        let Ok(decision) = decide(&snapshot, &view, |_| client.location(), now) else {
            return Ok(());
        };
        let mut tries = Tries::new(decision, now);
        let replay = Replay { idempotent: true, body_replayable: true, model_call: false };
        let mut tried: Vec<(usize, usize)> = Vec::new();
        while let Ok(pick) = tries.next(&snapshot, now, rotation) {
            let region = &snapshot.regions[pick.region];
            let upstream = &region.upstreams[pick.upstream];
            let panic = in_panic(region, now);
            prop_assert_eq!(pick.panic, panic);
            prop_assert!(upstream.weight > 0 && !upstream.drain);
            prop_assert!(upstream.state.is_healthy(), "picked an unhealthy upstream");
            if !panic {
                prop_assert!(!upstream.state.is_ejected(now), "picked an ejected upstream");
            }
            prop_assert!(upstream_eligible(upstream, now, panic));
            prop_assert!(!tried.contains(&(pick.region, pick.upstream)), "tried twice");
            // Regions before this one in the order had nothing left to try.
            let position = decision
                .candidates
                .as_slice()
                .iter()
                .position(|&r| usize::from(r) == pick.region);
            let Some(position) = position else {
                return Err(TestCaseError::fail("picked a region that is not a candidate"));
            };
            for &earlier in &decision.candidates.as_slice()[..position] {
                let earlier = usize::from(earlier);
                let region = &snapshot.regions[earlier];
                if region_verdict(region, now) != RegionVerdict::Available {
                    continue;
                }
                let panic = in_panic(region, now);
                let left = region.upstreams.iter().enumerate().any(|(u, upstream)| {
                    upstream_eligible(upstream, now, panic) && !tried.contains(&(earlier, u))
                });
                prop_assert!(!left, "passed over {} with an upstream left", region.name);
            }
            tried.push((pick.region, pick.upstream));
            // A connect error: the next try goes elsewhere (any method may).
            let (verdict, _) = tries.on_connect_error(&snapshot, false, true, replay, now);
            if !matches!(verdict, TryVerdict::Retry(_)) {
                break;
            }
        }
    }

    /// However failures arrive (any upstream, any time order that only moves forward), a
    /// region's ejected upstreams stay within `max_ejection_percent` of those serving, and one
    /// serving upstream always stays in.
    #[test]
    fn ejections_never_exceed_max_ejection_percent(
        topology in topology(),
        steps in prop::collection::vec((0usize..32, 0u64..2_000, prop::bool::weighted(0.8)), 1..200),
    ) {
        let Some(snapshot) = topology.snapshot() else {
            return Err(TestCaseError::reject("config refused"));
        };
        let slots: Vec<(usize, usize)> = snapshot
            .regions
            .iter()
            .enumerate()
            .flat_map(|(r, region)| (0..region.upstreams.len()).map(move |u| (r, u)))
            .collect();
        let mut now = 0u64;
        for (slot, advance, failed) in steps {
            now += advance;
            let (r, u) = slots[slot % slots.len()];
            let region = &snapshot.regions[r];
            let upstream = &region.upstreams[u];
            if failed {
                upstream
                    .state
                    .record_failure(now, &region.outlier, ejection_allowed(region, now));
            } else {
                upstream.state.record_success();
            }
            for region in &snapshot.regions {
                let serving = region.upstreams.iter().filter(|u| u.weight > 0 && !u.drain);
                let (serving, ejected) = serving.fold((0u64, 0u64), |(s, e), u| {
                    (s + 1, e + u64::from(u.state.is_ejected(now)))
                });
                let cap = serving * u64::from(region.outlier.max_ejection_percent) / 100;
                prop_assert!(ejected <= cap, "{} of {} ejected, cap {}", ejected, serving, cap);
                if serving > 0 {
                    prop_assert!(ejected < serving, "every serving upstream ejected");
                }
            }
        }
    }
}

// --- paths ---

fn path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just("a".to_string()),
        Just("v1".to_string()),
        Just("private".to_string()),
        Just("".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2E%2e".to_string()),
        Just(".%2e".to_string()),
        Just("%41%7e".to_string()),
        Just("%7E".to_string()),
        Just("%c3%a9".to_string()),
        Just("..;".to_string()),
        Just("%2f".to_string()),
        Just("%".to_string()),
        Just("%zz".to_string()),
        Just("a;b=c".to_string()),
        "[a-zA-Z0-9._~%;:@!$&'()*+,=-]{0,6}",
        "\\PC{0,3}",
    ];
    prop::collection::vec(segment, 0..8).prop_map(|segments| format!("/{}", segments.join("/")))
}

proptest! {
    #![proptest_config(config(2_000))]

    /// A normalised path is normalised: idempotent, rooted, with no empty or dot segments left,
    /// and never longer than what came in.
    #[test]
    fn path_normalisation_is_idempotent(path in path()) {
        let Ok(normal) = normalize_path(&path) else { return Ok(()) };
        prop_assert!(normal.starts_with('/'), "{:?} -> {:?}", path, normal);
        prop_assert!(!normal.contains("//"), "{:?} -> {:?}", path, normal);
        prop_assert!(normal.len() <= path.len(), "{:?} -> {:?}", path, normal);
        for segment in normal.split('/') {
            prop_assert!(segment != "." && segment != "..", "{:?} -> {:?}", path, normal);
        }
        let again = normalize_path(&normal);
        prop_assert_eq!(again.as_deref(), Ok(normal.as_ref()), "not idempotent for {:?}", path);
    }
}

// --- the HTTP/1 request head parser ---

const LIMITS: HeadLimits = HeadLimits {
    max_header_bytes: 8 * 1024,
    max_headers: 64,
    max_uri_bytes: 2 * 1024,
};

/// Structured request heads, mostly valid, with the fields whose handling matters.
fn request_head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("HEAD"),
        Just("OPTIONS"),
        Just("PUT"),
        Just("CONNECT"),
        Just("PURGE"),
        Just("G\u{e9}T"),
    ];
    let target = prop_oneof![
        "/[a-z0-9/._%?=&-]{0,20}",
        Just("*".to_string()),
        "http://[a-z]{1,8}(:[0-9]{1,5})?/[a-z]{0,5}",
        "[a-z]{1,5}",
    ];
    let version = prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0"), Just("HTTP/2.0")];
    let name = prop_oneof![
        Just("host"),
        Just("Host"),
        Just("content-length"),
        Just("transfer-encoding"),
        Just("connection"),
        Just("expect"),
        Just("cookie"),
        Just("x-a"),
        Just("x b"),
    ];
    let value = prop_oneof![
        "[a-z0-9.:-]{0,12}",
        Just("chunked".to_string()),
        Just("gzip, chunked".to_string()),
        Just("close".to_string()),
        Just("keep-alive".to_string()),
        Just("100-continue".to_string()),
        "[0-9]{1,3}",
        Just("1, 1".to_string()),
        "[ -~\t]{0,12}",
    ];
    (
        method,
        target,
        version,
        prop::collection::vec((name, value), 0..8),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(method, target, version, fields, host)| {
            let mut head = format!("{method} {target} {version}\r\n");
            if host {
                head += "host: example.test\r\n";
            }
            for (name, value) in fields {
                head += &format!("{name}: {value}\r\n");
            }
            head += "\r\n";
            head.into_bytes()
        })
}

/// Writes a parsed head back as HTTP/1.1 bytes, the framing fields the parser takes out included.
fn encode(head: &meridian_core::http1::RequestHead) -> Vec<u8> {
    let version = if head.version == http::Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    let mut out = format!("{} {} {version}\r\n", head.method, head.uri).into_bytes();
    for (name, value) in &head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if head.framing == meridian_core::http1::Framing::CHUNKED {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if head.expect_continue {
        out.extend_from_slice(b"expect: 100-continue\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn check_head(input: &[u8]) -> Result<(), TestCaseError> {
    let Ok(Some(head)) = parse_request(input, &LIMITS) else {
        return Ok(());
    };
    prop_assert!(head.length <= input.len());
    // Every shorter prefix of a complete head is incomplete, never a different verdict.
    for cut in 0..head.length {
        let prefix = parse_request(&input[..cut], &LIMITS);
        prop_assert!(matches!(prefix, Ok(None)), "prefix {}: {:?}", cut, prefix);
    }
    // What follows the head (a body, the next request) does not change it.
    let mut longer = input[..head.length].to_vec();
    longer.extend_from_slice(b"GET / HTTP/1.1\r\n\r\nbody");
    let again = parse_request(&longer, &LIMITS);
    prop_assert!(
        matches!(&again, Ok(Some(h)) if h.length == head.length),
        "{:?}",
        again
    );
    // Written back and read again, the head says the same.
    let encoded = encode(&head);
    let reread = parse_request(&encoded, &LIMITS);
    let Ok(Some(reread)) = reread else {
        return Err(TestCaseError::fail(format!(
            "re-encoded head refused: {reread:?}\n{}",
            String::from_utf8_lossy(&encoded)
        )));
    };
    prop_assert_eq!(&reread.method, &head.method);
    prop_assert_eq!(&reread.uri, &head.uri);
    prop_assert_eq!(reread.version, head.version);
    prop_assert_eq!(&reread.headers, &head.headers);
    prop_assert_eq!(reread.framing, head.framing);
    prop_assert_eq!(reread.keep_alive, head.keep_alive);
    prop_assert_eq!(reread.expect_continue, head.expect_continue);
    prop_assert_eq!(reread.length, encoded.len());
    Ok(())
}

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn the_head_parser_agrees_with_itself(head in request_head()) {
        check_head(&head)?;
    }

    /// Any bytes: no panic, and a refusal always carries a client- or server-error status.
    #[test]
    fn the_head_parser_never_panics_on_bytes(
        input in prop::collection::vec(any::<u8>(), 0..300),
        mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        base in request_head(),
        use_base in any::<bool>(),
    ) {
        let mut input = if use_base { base } else { input };
        for (at, byte) in mutations {
            if !input.is_empty() {
                let i = at.index(input.len());
                input[i] = byte;
            }
        }
        match parse_request(&input, &LIMITS) {
            Err(e) => prop_assert!((400..=505).contains(&e.status), "{:?}", e),
            Ok(_) => check_head(&input)?,
        }
    }
}
