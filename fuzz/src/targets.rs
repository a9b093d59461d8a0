//! The targets and the seed inputs they start from (built here, never committed as files).

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use meridian_config::{Config, RouteCache};
use meridian_core::cache::policy::{
    classify_request, headers_to_store, http_date, merge_not_modified, storability, CacheControl,
    ResponseFacts, RouteRules,
};
use meridian_core::route_match::{normalize_path, HostTable};
use meridian_core::snapshot::{Snapshot, SnapshotMeta, UpstreamStates};
use meridian_gateway::dns::{answer, Transport, Zone};

use crate::Target;

const LOCAL: &str = include_str!("../../examples/local.toml");

fn local() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| Config::from_toml_str(LOCAL).expect("examples/local.toml is valid"))
}

pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "dns",
            seeds: dns_seeds,
            run: dns,
            dictionary: &[
                b"\x00\x01",
                b"\x00\x1c",
                b"\x00\xff",
                b"\xc0\x0c",
                b"\x03api",
            ],
        },
        Target {
            name: "cache_headers",
            seeds: cache_seeds,
            run: cache_headers,
            dictionary: &[
                b"max-age=",
                b"s-maxage=",
                b"no-store",
                b"private",
                b"stale-while-revalidate=",
                b"\ncache-control: ",
                b"\nage: ",
                b"\nvary: ",
                b"\ndate: ",
                b"\nexpires: ",
                b"Sun, 06 Nov 1994 08:49:37 GMT",
                b"18446744073709551616",
                b"\"",
                b",",
            ],
        },
        Target {
            name: "config",
            seeds: config_seeds,
            run: config,
            dictionary: &[
                b"[[routes]]\n",
                b"[[regions]]\n",
                b"[[residency]]\n",
                b" = \"",
                b"\"*\"",
                b"upstreams = [{ address = \"127.0.0.1:1\" }]\n",
                b"0.0",
                b"\"0s\"",
                b"4294967295",
            ],
        },
        Target {
            name: "inference_json",
            seeds: inference_seeds,
            run: inference_json,
            dictionary: &[
                b"\"model\"",
                b"\"usage\"",
                b"\"total_tokens\":",
                b"data: ",
                b"\\u0000",
                b"\\\"",
                b"[DONE]",
                b"{",
                b"}",
            ],
        },
        Target {
            name: "forwarding",
            seeds: forwarding_seeds,
            run: forwarding,
            dictionary: &[b", ", b"[::1]:443", b"127.0.0.1", b"10.0.0.1", b":", b"\n"],
        },
        Target {
            name: "paths",
            seeds: path_seeds,
            run: paths,
            dictionary: &[
                b"/..",
                b"/.",
                b"%2e",
                b"%2E",
                b"%2f",
                b"%5c",
                b"//",
                b";",
                b"%",
                b"%41",
                b"?",
                b"/v1",
                b"/private",
            ],
        },
    ]
}

// --- DNS message -> answer ---

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| Zone::compile(local()).expect("the example zone compiles"))
}

fn dns_query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    if edns {
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    }
    q
}

fn dns_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for name in [
        "api.example.test",
        "static.example.test",
        "example.test",
        "x.invalid",
    ] {
        for qtype in [1u16, 28, 6, 2, 255, 16] {
            seeds.push(dns_query(name, qtype, qtype == 1));
        }
    }
    seeds
}

fn dns(input: &[u8]) {
    let source: IpAddr = [127, 12, 0, 1].into();
    for transport in [Transport::Udp, Transport::Tcp] {
        let reply = answer(zone(), input, source, transport, &|_| true, &|_| None);
        if let Some(bytes) = &reply.bytes {
            assert!(bytes.len() >= 12, "an answer has a header");
            assert_eq!(bytes[..2], input[..2], "the answer carries the query id");
        }
    }
}

// --- Cache-Control / Age / Vary / Date parsing and storability ---

/// `name: value` lines into a header map (lines that are not a valid header are skipped).
fn header_block(input: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in input.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    headers
}

fn cache_seeds() -> Vec<Vec<u8>> {
    [
        "cache-control: max-age=60\ndate: Sun, 06 Nov 1994 08:49:37 GMT\nage: 5",
        "cache-control: public, s-maxage=30, stale-while-revalidate=10, stale-if-error=60",
        "cache-control: no-store\nvary: accept-encoding",
        "cache-control: private, no-cache=\"set-cookie\"\nset-cookie: a=b",
        "expires: Thu, 01 Dec 1994 16:00:00 GMT\nlast-modified: Wed, 21 Oct 2015 07:28:00 GMT",
        "vary: *\netag: \"abc\"",
        "cache-control: max-age=99999999999999999999, must-revalidate\nage: 18446744073709551615",
        "pragma: no-cache\nauthorization: Bearer x\nrange: bytes=0-1",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn cache_headers(input: &[u8]) {
    let headers = header_block(input);
    let _ = CacheControl::parse(&headers);
    for name in [
        http::header::DATE,
        http::header::EXPIRES,
        http::header::LAST_MODIFIED,
    ] {
        let _ = http_date(&headers, &name);
    }
    let _ = meridian_core::cache::key::parse_vary(&headers);
    let rules = RouteRules::from_config(&RouteCache {
        enabled: true,
        default_ttl: Some(meridian_config::HumanDuration::secs(60)),
        ..RouteCache::default()
    });
    let request = classify_request(&Method::GET, &headers, &rules);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    if let Ok(request) = request {
        for status in [200u16, 301, 404, 500] {
            let facts = ResponseFacts {
                status,
                headers: &headers,
                request_time: now,
                response_time: now,
            };
            if let Ok(stored) = storability(&request, &facts, &rules, 1 << 20) {
                for later in [0u64, 1, 3_600, u64::from(u32::MAX)] {
                    let at = now + Duration::from_secs(later);
                    let age = stored.freshness.age(at);
                    assert!(age >= stored.freshness.age(now), "age never goes back");
                    let _ = stored.freshness.usability(at, &request);
                    let _ = stored.freshness.serves_on_error(at);
                }
            }
        }
    }
    let stored = headers_to_store(&headers);
    let _ = merge_not_modified(&stored, &headers, &rules);
}

// --- config TOML -> validate -> compile ---

fn config_seeds() -> Vec<Vec<u8>> {
    vec![
        LOCAL.as_bytes().to_vec(),
        br#"schema = 1
[edge]
pop = "p"
[[regions]]
name = "r"
location = { lat = 0.0, lon = 0.0 }
upstreams = [{ address = "127.0.0.1:1" }]
[[routes]]
name = "a"
hosts = ["a.test", "*.a.test"]
regions = "*"
default_region = "r"
retry = { attempts = 3, on_status = [503] }
"#
        .to_vec(),
    ]
}

fn config(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(config) = Config::from_toml_str(text) {
        // Whatever validate() accepts compiles or says why; it never panics.
        let _ = Snapshot::compile(config, SnapshotMeta::default(), &UpstreamStates::default());
    }
}

// --- inference JSON sniffing ---

fn inference_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"model":"qwen-max","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"messages":[],"model":"q\u0077en","stream":true}"#,
        "data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8}}\n\ndata: [DONE]\n\n",
        r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn inference_json(input: &[u8]) {
    // The streaming scan of a request body, whole and in small chunks, must agree.
    let whole_fields = meridian_core::inference::sniff::sniff(input, 64);
    let mut sniffer = meridian_core::inference::sniff::Sniffer::new(64);
    let chunked_fields = input
        .chunks(5)
        .try_for_each(|chunk| sniffer.push(chunk))
        .and_then(|()| sniffer.finish());
    assert_eq!(
        whole_fields.as_ref().ok().map(|f| f.model.clone()),
        chunked_fields.as_ref().ok().map(|f| f.model.clone()),
        "the model name does not depend on how the body is split"
    );
    if let Ok(fields) = &whole_fields {
        let _ = meridian_core::inference::model_name(fields);
    }
    let mut whole = meridian_core::inference::usage::UsageScanner::default();
    whole.push(input);
    let mut chunked = meridian_core::inference::usage::UsageScanner::default();
    for chunk in input.chunks(7) {
        chunked.push(chunk);
    }
    if let Some(usage) = whole.usage() {
        let _ = usage.total();
    }
    let _ = chunked.usage();
}

// --- forwarding headers (X-Forwarded-For walk through trusted proxies) ---

fn forwarding_seeds() -> Vec<Vec<u8>> {
    [
        "127.12.0.9",
        "10.0.0.1, 127.15.0.7\n10.1.1.1",
        "[::1]:443, 127.13.0.1:1234",
        "garbage, 127.0.0.1",
        "2001:db8::1,,,",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn forwarding(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let trusted: Vec<ipnet::IpNet> = ["127.0.0.1/32", "10.0.0.0/8"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    let values: Vec<&str> = text.split('\n').collect();
    let untrusted: IpAddr = [127, 17, 0, 7].into();
    let got = meridian_core::client::client_ip(untrusted, values.iter().copied(), &trusted);
    assert_eq!(
        got, untrusted,
        "an untrusted peer is the client, whatever it sends"
    );
    let peer: IpAddr = [127, 0, 0, 1].into();
    let got = meridian_core::client::client_ip(peer, values.iter().copied(), &trusted);
    let again = meridian_core::client::client_ip(peer, values.iter().copied(), &trusted);
    assert_eq!(got, again, "deterministic");
    assert!(
        got == peer || text.contains(&got.to_string()) || got.is_ipv6(),
        "the client comes from the chain or is the peer: {got}"
    );
}

// --- path normalisation + route matching ---

fn table() -> &'static HostTable {
    static TABLE: OnceLock<HostTable> = OnceLock::new();
    TABLE.get_or_init(|| HostTable::build(&local().routes))
}

fn path_seeds() -> Vec<Vec<u8>> {
    [
        "/",
        "/v1/chat/completions",
        "/public/../private/x",
        "/a/%2e%2E/b//c/./d?x=/../y",
        "/%61dmin/..;/x",
        "/caf%C3%A9/%7e",
        "*",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn paths(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let path = text.split('?').next().unwrap_or("");
    let Ok(normal) = normalize_path(path) else {
        return;
    };
    if path.starts_with('/') {
        assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
        assert!(!normal.contains("//"), "{path:?} -> {normal:?}");
        for segment in normal.split('/') {
            assert!(segment != "." && segment != "..", "{path:?} -> {normal:?}");
        }
        assert_eq!(
            normalize_path(&normal).as_deref(),
            Ok(normal.as_ref()),
            "normalising is idempotent"
        );
    }
    for host in ["api.example.test", "eu.example.test", "x.api.example.test"] {
        assert_eq!(table().find(host, &normal), table().find(host, &normal));
    }
}
