//! `meridian demo`: the whole local world in one process — simulated regional origins, the edge on
//! the embedded `examples/local.toml`, the admin listener, a control API to break regions — and a tour.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, Request, StatusCode};
use meridian_config::Config;
use meridian_geoip::test_world::PLACES;
use tokio::sync::watch;

use crate::core::SnapshotMeta;
use crate::edge::{EdgeOptions, RunningEdge};
use crate::httpd;
use crate::origin::{self, OriginControl};

pub const LOCAL_CONFIG: &str = include_str!("../../examples/local.toml");
pub const CONTROL_ADDR: &str = "127.0.0.1:7071";

/// Origins of each region, by region name.
pub type Regions = Arc<BTreeMap<String, Vec<Arc<OriginControl>>>>;

pub struct DemoOptions {
    pub data_dir: PathBuf,
    pub control: SocketAddr,
    pub config_service: SocketAddr,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            data_dir: std::env::temp_dir().join("meridian-demo"),
            config_service: SocketAddr::from(([127, 0, 0, 1], 7070)),
            control: CONTROL_ADDR
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7071))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("embedded demo config: {0}")]
    Config(#[from] meridian_config::ConfigError),
    #[error(transparent)]
    GeoIp(#[from] meridian_geoip::GeoIpError),
    #[error(transparent)]
    Start(#[from] crate::edge::StartError),
    #[error(transparent)]
    Certificates(#[from] crate::tls::devcerts::DevCertError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Demo {
    pub edge: RunningEdge,
    pub regions: Regions,
    pub geoip_db: PathBuf,
    /// The demo's own CA (generated at start): `curl --cacert` it.
    pub ca_file: PathBuf,
    /// Write token of the demo's config service (also in `token_file`).
    pub token: String,
    pub token_file: PathBuf,
    pub config_service: SocketAddr,
    _runtime: tokio::runtime::Runtime,
    _stop: watch::Sender<bool>,
}

pub fn start(options: DemoOptions) -> Result<Demo, DemoError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| DemoError::Io { what, source }
    };
    // `geoip.database = "test-world.mmdb"` in local.toml resolves against the data directory.
    let geoip_db = options.data_dir.join("test-world.mmdb");
    meridian_geoip::test_world::write(&geoip_db)?;
    let mut config = Config::from_toml_str(LOCAL_CONFIG)?;
    let ca_file = write_demo_certificates(&options.data_dir)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("meridian-demo")
        .enable_all()
        .build()
        .map_err(io("demo runtime"))?;
    let (stop, stop_rx) = watch::channel(false);
    let mut regions: BTreeMap<String, Vec<Arc<OriginControl>>> = BTreeMap::new();
    for region in &config.regions {
        for upstream in &region.upstreams {
            let addr: SocketAddr = upstream.address.parse().map_err(|_| {
                io("upstream address")(std::io::Error::other(upstream.address.clone()))
            })?;
            let control = runtime
                .block_on(origin::spawn(&region.name, addr, stop_rx.clone()))
                .map_err(io(&format!("origin {addr} of {}", region.name)))?;
            // Simulated model servers stream a token every 30 ms (issue 8).
            control.model.set_token_interval(Duration::from_millis(30));
            regions
                .entry(region.name.clone())
                .or_default()
                .push(control);
        }
    }
    let regions = Arc::new(regions);

    let control_listener = runtime
        .block_on(tokio::net::TcpListener::bind(options.control))
        .map_err(io(&format!("demo control API {}", options.control)))?;
    let handler_regions = Arc::clone(&regions);
    runtime.spawn(httpd::serve(
        control_listener,
        move |req| control(Arc::clone(&handler_regions), req),
        stop_rx.clone(),
    ));

    // The config service, holding the embedded config as version 1; the edge follows it.
    let token = start_config_service(&runtime, &options, stop_rx.clone())?;
    // Bearer token of the edge's cache purge endpoint (`token_file = "admin.token"` in local.toml).
    let admin_token = format!("admin-{:016x}\n", demo_token_seed().rotate_left(17));
    std::fs::write(options.data_dir.join("admin.token"), admin_token)
        .map_err(io("demo admin token file"))?;
    config.control = Some(meridian_config::Control {
        url: format!("http://{}", options.config_service),
        token_file: None,
        cache_dir: options.data_dir.join("edge-cache").display().to_string(),
        wait: meridian_config::HumanDuration::secs(30),
    });

    let hash = meridian_config::content_hash(LOCAL_CONFIG);
    let edge = RunningEdge::start(EdgeOptions {
        config,
        meta: SnapshotMeta { version: 0, hash },
        handle_signals: true,
        watch_file: None,
        base_dir: Some(options.data_dir.clone()),
    })?;
    Ok(Demo {
        edge,
        regions,
        geoip_db,
        ca_file,
        token,
        token_file: options.data_dir.join("token"),
        config_service: options.config_service,
        _runtime: runtime,
        _stop: stop,
    })
}

/// A fresh local CA and the leaf certificates `examples/local.toml` names (`tls/*.crt|key` in the
/// data directory). Returns the CA file clients should trust.
fn write_demo_certificates(data_dir: &std::path::Path) -> Result<PathBuf, DemoError> {
    use crate::tls::devcerts::{self, DevCa};
    let dir = data_dir.join("tls");
    std::fs::create_dir_all(&dir).map_err(|source| DemoError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let ca = DevCa::new("Meridian demo CA")?;
    let ca_file = dir.join("demo-ca.crt");
    devcerts::write(&ca_file, &ca.pem)?;
    ca.leaf(&["api.example.test", "*.api.example.test"])?
        .write(&dir, "api.example.test")?;
    ca.leaf(&[
        "inference.example.test",
        "static.example.test",
        "eu.example.test",
    ])?
    .write(&dir, "example.test")?;
    Ok(ca_file)
}

/// Starts `meridian config-server` in-process on a fresh store holding the embedded config as
/// version 1. Returns the write token (also written to `<data_dir>/token`).
fn start_config_service(
    runtime: &tokio::runtime::Runtime,
    options: &DemoOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<String, DemoError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| DemoError::Io { what, source }
    };
    let store_dir = options.data_dir.join("config-store");
    // The demo always starts on the embedded defaults.
    if store_dir.exists() {
        std::fs::remove_dir_all(&store_dir).map_err(io("clearing the demo config store"))?;
    }
    let store = meridian_config_service::ConfigStore::open(&store_dir)
        .map_err(|e| io("config store")(std::io::Error::other(e.to_string())))?;
    store
        .put(
            LOCAL_CONFIG,
            "meridian demo",
            "embedded examples/local.toml",
            None,
        )
        .map_err(|e| io("config store")(std::io::Error::other(format!("{e:?}"))))?;
    let token = format!("demo-{:016x}", demo_token_seed());
    std::fs::write(options.data_dir.join("token"), &token).map_err(io("demo token file"))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(options.config_service))
        .map_err(io(&format!("config service {}", options.config_service)))?;
    let state = Arc::new(meridian_config_service::ServiceState::new(
        store,
        token.clone(),
    ));
    runtime.spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = meridian_config_service::serve(listener, state, shutdown).await {
            tracing::error!("config service stopped: {e}");
        }
    });
    Ok(token)
}

fn demo_token_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// The demo control API: `POST /regions/{name}/down|up|slow?ms=N`, `GET /regions`.
async fn control(
    regions: Regions,
    req: Request<hyper::body::Incoming>,
) -> hyper::Response<httpd::Body> {
    let path = req.uri().path().trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["regions"]) | (&Method::GET, []) => {
            let state: BTreeMap<&String, serde_json::Value> = regions
                .iter()
                .map(|(name, origins)| {
                    let list: Vec<_> = origins
                        .iter()
                        .map(|o| serde_json::json!({"address": o.address.to_string(), "up": o.is_up(), "requests": o.requests()}))
                        .collect();
                    (name, serde_json::Value::from(list))
                })
                .collect();
            httpd::json(StatusCode::OK, &serde_json::json!(state))
        }
        (&Method::POST, ["regions", name, action]) => {
            let Some(origins) = regions.get(*name) else {
                return httpd::json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": format!("unknown region {name:?}")}),
                );
            };
            match *action {
                "down" => origins.iter().for_each(|o| o.set_up(false)),
                "up" => origins.iter().for_each(|o| {
                    o.set_delay(Duration::ZERO);
                    o.set_up(true)
                }),
                // Issue 8: `status?code=429` (or 503) makes the region's origins and model servers
                // refuse with Retry-After; `code=200` restores them.
                "status" => {
                    let code = req
                        .uri()
                        .query()
                        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("code=")))
                        .and_then(|v| v.parse::<u16>().ok())
                        .filter(|c| (200..=599).contains(c));
                    let Some(code) = code else {
                        return httpd::json(
                            StatusCode::BAD_REQUEST,
                            &serde_json::json!({"error": "status needs ?code=429|503|200"}),
                        );
                    };
                    let forced = (code != 200).then_some(code);
                    origins.iter().for_each(|o| {
                        o.set_status(forced);
                        o.model.set_status(forced);
                    });
                }
                "slow" => {
                    let ms = req
                        .uri()
                        .query()
                        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                        .and_then(|v| v.parse::<u64>().ok());
                    let Some(ms) = ms else {
                        return httpd::json(
                            StatusCode::BAD_REQUEST,
                            &serde_json::json!({"error": "slow needs ?ms=N"}),
                        );
                    };
                    origins
                        .iter()
                        .for_each(|o| o.set_delay(Duration::from_millis(ms)));
                }
                other => {
                    return httpd::json(
                        StatusCode::NOT_FOUND,
                        &serde_json::json!({"error": format!("unknown action {other:?} (down, up, slow?ms=N, status?code=N)")}),
                    )
                }
            }
            httpd::json(
                StatusCode::OK,
                &serde_json::json!({"region": name, "action": action}),
            )
        }
        _ => httpd::json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "try GET /regions or POST /regions/{name}/down|up|slow?ms=N"}),
        ),
    }
}

/// What to try, printed once everything listens.
pub fn tour(demo: &Demo) -> String {
    let http = demo.edge.http_addr;
    let admin = demo.edge.admin_addr;
    let mut out = String::new();
    out.push_str(&format!(
        "\nMeridian demo is running.\n\n  edge (HTTP/1.1 + h2c)  http://{http}\n  admin + /metrics       http://{admin}/metrics\n  demo control API       http://{CONTROL_ADDR}/regions\n  test-world GeoIP db    {}\n\n",
        demo.geoip_db.display()
    ));
    out.push_str("Clients in each test-world country (source address picks the country):\n");
    for place in PLACES {
        out.push_str(&format!(
            "  curl -s --interface {:<11} -H 'Host: api.example.test' http://{http}/hello   # {} -> {}\n",
            place.client_addr(1).to_string(),
            place.country,
            place.expected_region
        ));
    }
    // TLS, HTTP/2 and HTTP/3 (issue 5).
    if let Some(https) = demo.edge.https_addr {
        let (port, ca) = (https.port(), demo.ca_file.display());
        out.push_str(&format!(
            "\nHTTPS (h1 + h2 by ALPN) and HTTP/3 on {https} (certificates from the demo CA {ca}):\n  curl --cacert {ca} --resolve api.example.test:{port}:{ip} https://api.example.test:{port}/hello\n  curl --cacert {ca} --resolve api.example.test:{port}:{ip} --http2 --interface 127.17.0.1 -si https://api.example.test:{port}/hello   # h2, Frankfurt; alt-svc advertises h3\n  HTTP/3 (QUIC, udp {https}), 20 requests from Korea with the project's load generator:\n  cargo run --release -q -p meridian-loadtest -- https://{https}/hello -p h3 --cacert {ca} --sni api.example.test --host api.example.test --geo-mix KR=1 -n 20\n",
            ip = https.ip()
        ));
    }
    // GeoDNS (issue 9): the nearest healthy PoP for a client subnet.
    if let Some(dns) = demo.edge.dns_addr {
        let (ip, port) = (dns.ip(), dns.port());
        out.push_str(&format!(
            "\nGeoDNS (authoritative for example.test, udp+tcp on {dns}):\n  dig @{ip} -p {port} api.example.test +subnet=127.15.0.0/24   # a client in Seoul -> seoul PoP 127.2.6.1\n  dig @{ip} -p {port} api.example.test AAAA +subnet=127.17.0.0/24  # Frankfurt, IPv6\n  dig @{ip} -p {port} nope.example.test                          # NXDOMAIN (SOA in authority); other zones: REFUSED\n  curl -s -X POST http://{CONTROL_ADDR}/regions/ap-northeast-2/down  # Seoul's health check fails -> Seoul clients get manila\n"
        ));
    }
    let svc = demo.config_service;
    // The response cache (issue 6): route `static` caches; purge through the admin listener.
    let admin_token = demo.token_file.with_file_name("admin.token");
    out.push_str(&format!(
        "\nEdge cache (route static, x-meridian-cache: miss, then hit; Age counts up):\n  curl -si -H 'Host: static.example.test' 'http://{http}/logo.png?cc=max-age%3D300&tag=brand' | grep -i -e x-meridian-cache -e age\n  curl -si -H 'Host: static.example.test' 'http://{http}/logo.png?cc=max-age%3D300&tag=brand' | grep -i -e x-meridian-cache -e age\n  MERIDIAN_ADMIN_TOKEN=$(cat {}) meridian cache purge --tag brand --admin http://{admin}   # then: miss again\n  curl -s http://{admin}/metrics | grep meridian_cache_\n",
        admin_token.display()
    ));
    let token = demo.token_file.display();
    out.push_str(&format!(
        "\nMore:\n  curl -si -H 'Host: api.example.test' http://{http}/hello                         # unknown location -> default region us-east\n  curl -si --interface 127.15.0.1 -H 'Host: eu.example.test' http://{http}/v1/x  # KR residency is strict -> 503\n  curl -si -H 'Host: nobody.test' http://{http}/                                  # no route claims it -> 421\n  curl -s -H 'Host: api.example.test' -H 'X-Forwarded-For: 127.12.0.9' http://{http}/  # XFF trusted from 127.0.0.1 -> ap-southeast-1\n  curl -s --http2-prior-knowledge --interface 127.17.0.1 -H 'Host: api.example.test' http://{http}/  # h2c\n  curl -s -X POST http://{CONTROL_ADDR}/regions/mx-central/down                  # break a region; /up to heal\n\nInference (OpenAI-compatible; the model in the body picks the region):\n  curl -s -H 'Host: inference.example.test' http://{http}/v1/models\n  curl -si --interface 127.10.0.1 -H 'Host: inference.example.test' http://{http}/v1/chat/completions -d '{{\"model\":\"qwen-max\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'   # Mexico asks for qwen-max -> eu-central-1 (Frankfurt: nearer than Singapore)\n  curl -sN --interface 127.10.0.1 -H 'Host: inference.example.test' http://{http}/v1/chat/completions -d '{{\"model\":\"qwen-turbo\",\"stream\":true,\"max_tokens\":20}}'   # SSE tokens stream from mx-central\n  curl -s -X POST 'http://{CONTROL_ADDR}/regions/eu-central-1/status?code=429'    # Frankfurt saturated -> qwen-max from Mexico falls back to ap-southeast-1; code=200 heals\n  curl -s http://{admin}/admin/snapshot\n  curl -s http://{admin}/admin/regions                                          # health, ejections, in-flight per region\n\nChange routing live (the edge follows the config service on {svc}):\n  export MERIDIAN_TOKEN=$(cat {token})\n  $EDITOR examples/local.toml            # e.g. set default_region = \"eu-central-1\" on route api\n  meridian config diff examples/local.toml\n  meridian config push examples/local.toml -m 'send unknown clients to Frankfurt'\n  curl -si -H 'Host: api.example.test' http://{http}/hello | grep x-meridian-region\n  meridian config history; meridian config rollback 1\n  (meridian = cargo run --release --)\n\nCtrl-C stops everything.\n"
    ));
    out
}
