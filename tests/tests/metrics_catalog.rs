//! `docs/metrics.md` lists exactly the metric families the edge exports, and no label value in a
//! real scrape is unbounded (client IPs, request paths, API keys).

mod observability;

use std::collections::BTreeSet;

use observability::{catalog_families, drive, scrape_families, start_world, API_KEY};

#[test]
fn the_catalog_lists_every_exported_family_and_nothing_else() {
    let world = start_world();
    drive(&world);
    let scraped = scrape_families(&world.metrics());
    let catalog = catalog_families();
    assert!(catalog.len() > 20, "the catalog parses: {catalog:?}");

    let missing: Vec<_> = scraped
        .keys()
        .filter(|name| !catalog.contains_key(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "exported but not in docs/metrics.md: {missing:?}"
    );
    let never: Vec<_> = catalog
        .keys()
        .filter(|name| !scraped.contains_key(*name))
        .collect();
    assert!(
        never.is_empty(),
        "in docs/metrics.md but never exported (or the traffic does not reach it): {never:?}"
    );
    let wrong: Vec<_> = scraped
        .iter()
        .filter(|(name, kind)| catalog.get(*name) != Some(kind))
        .map(|(name, kind)| format!("{name}: exported {kind}, catalog {:?}", catalog.get(name)))
        .collect();
    assert!(wrong.is_empty(), "types disagree: {wrong:?}");
}

#[test]
fn label_values_are_bounded() {
    let world = start_world();
    drive(&world);
    let text = world.metrics();
    let upstreams: BTreeSet<String> = world
        .config
        .regions
        .iter()
        .flat_map(|r| r.upstreams.iter().map(|u| u.address.clone()))
        .collect();
    let mut checked = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        for (label, value) in labels(line) {
            checked += 1;
            if label == "upstream" {
                // A configured upstream address: bounded by the config.
                assert!(
                    upstreams.contains(&value),
                    "{line}: upstream is not a configured address"
                );
                continue;
            }
            assert!(!looks_like_ip(&value), "{line}: {label} looks like an IP");
            assert!(
                !looks_like_path(&value),
                "{line}: {label} looks like a request path"
            );
            assert!(
                !looks_like_secret(&value),
                "{line}: {label} looks like an API key"
            );
        }
    }
    assert!(checked > 100, "the scrape has labelled samples: {text}");
}

/// `(label, value)` pairs of one sample line (`name{a="x",b="y"} 1`).
fn labels(line: &str) -> Vec<(String, String)> {
    let Some((_, rest)) = line.split_once('{') else {
        return Vec::new();
    };
    let mut pairs = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if name.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        pairs.push((name.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        } else {
            break;
        }
    }
    pairs
}

fn looks_like_ip(value: &str) -> bool {
    let host = value.rsplit_once(':').map_or(value, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>().is_ok() || value.parse::<std::net::IpAddr>().is_ok()
}

/// A raw request path with more than one segment (`/v1/chat/completions`); `http/1.1` (an ALPN)
/// is not one.
fn looks_like_path(value: &str) -> bool {
    value.starts_with('/') && value.split('/').filter(|s| !s.is_empty()).count() > 1
}

fn looks_like_secret(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    lower.contains(API_KEY)
        || lower.starts_with("sk-")
        || lower.starts_with("bearer")
        || (value.len() >= 24
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
}

#[test]
fn the_label_parser_and_checks_catch_what_they_should() {
    let pairs = labels(r#"x{a="1",b="q\"z",upstream="127.0.0.1:80"} 1"#);
    assert_eq!(
        pairs,
        vec![
            ("a".into(), "1".into()),
            ("b".into(), "q\"z".into()),
            ("upstream".into(), "127.0.0.1:80".into())
        ]
    );
    assert!(looks_like_ip("127.10.0.7"));
    assert!(looks_like_ip("127.1.1.1:7001"));
    assert!(looks_like_ip("2001:db8::1"));
    assert!(!looks_like_ip("0.005"));
    assert!(!looks_like_ip("0.1.0"));
    assert!(looks_like_path("/v1/chat/completions"));
    assert!(!looks_like_path("http/1.1"));
    assert!(looks_like_secret("sk-alpha"));
    assert!(looks_like_secret("2179e632e89277f18aa600491b68ad55"));
    assert!(!looks_like_secret("ap-southeast-1"));
}
