//! The demo world of `meridian demo`: simulated origins (with model servers) for every region of
//! the embedded `examples/local.toml`, the test-world GeoIP database, a demo CA and the
//! certificates the config names, the config service holding the config as version 1, and a
//! control API to break regions. The edge itself is the gateway's; this world is everything
//! around it, and [`tour`] is what to try once both run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, Request, StatusCode};
use meridian_config::Config;
use tokio::sync::watch;

use crate::config_service::{ConfigService, ConfigServiceError};
use crate::devcerts::{self, DevCa, DevCertError};
use crate::httpd;
use crate::origin::{self, OriginControl};
use crate::test_world::{self, WorldDbError, PLACES};

pub const LOCAL_CONFIG: &str = include_str!("../../../examples/local.toml");
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
        // A fresh name per run: a fixed one in the shared /tmp could be created (or linked)
        // beforehand by another user. `DemoWorld::start` creates it private (0700).
        let suffix = random_hex(8).unwrap_or_else(|_| format!("{:x}", std::process::id()));
        Self {
            data_dir: std::env::temp_dir().join(format!("meridian-demo-{suffix}")),
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
    GeoIp(#[from] WorldDbError),
    #[error(transparent)]
    Certificates(#[from] DevCertError),
    #[error(transparent)]
    ConfigService(#[from] ConfigServiceError),
    #[error("config store: {0}")]
    Push(#[from] meridian_config_service::ClientError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the demo's edge listens (the tour prints these).
pub struct EdgeAddrs {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub https: Option<SocketAddr>,
    pub dns: Option<SocketAddr>,
}

/// Everything of the demo but the edge; stops when dropped.
pub struct DemoWorld {
    /// The embedded config, following the demo's config service: what the edge starts with.
    pub config: Config,
    pub regions: Regions,
    pub data_dir: PathBuf,
    pub geoip_db: PathBuf,
    /// The demo's own CA (generated at start): `curl --cacert` it.
    pub ca_file: PathBuf,
    /// Write token of the demo's config service (also in `token_file`).
    pub token: String,
    pub token_file: PathBuf,
    pub config_service: SocketAddr,
    /// Where the control API listens.
    pub control: SocketAddr,
    _service: ConfigService,
    _runtime: tokio::runtime::Runtime,
    _stop: watch::Sender<bool>,
}

impl DemoWorld {
    /// Starts the world; every listener is ready when this returns.
    pub fn start(options: &DemoOptions) -> Result<DemoWorld, DemoError> {
        // `geoip.database = "test-world.mmdb"` in local.toml resolves against the data directory.
        let geoip_db = options.data_dir.join("test-world.mmdb");
        test_world::write(&geoip_db)?;
        let mut config = Config::from_toml_str(LOCAL_CONFIG)?;
        private_dir(&options.data_dir)?;
        // One secret for the config service's writes and the control API, one for the edge's
        // admin writes: from the OS's random source, in files only this user can read.
        let token = format!("demo-{}", random_hex(16).map_err(io("random token"))?);
        let ca_file = write_demo_certificates(&options.data_dir)?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("meridian-demo")
            .enable_all()
            .build()
            .map_err(io("demo runtime"))?;
        let (stop, stop_rx) = watch::channel(false);
        let regions = runtime
            // A control API on port 0 means a demo on ephemeral ports throughout (tests run
            // several at once); otherwise the origins take the fixed addresses of the tour.
            .block_on(origin::spawn_for(
                &mut config,
                options.control.port() == 0,
                stop_rx.clone(),
            ))
            .map_err(io("simulated origins"))?;
        for control in regions.values().flatten() {
            // Tokens a person can watch arrive.
            control.model.set_token_interval(Duration::from_millis(30));
        }
        let regions = Arc::new(regions);

        let control_listener = runtime
            .block_on(tokio::net::TcpListener::bind(options.control))
            .map_err(io(&format!("demo control API {}", options.control)))?;
        let control_addr = control_listener
            .local_addr()
            .map_err(io("demo control API address"))?;
        let handler_regions = Arc::clone(&regions);
        let control_token = Arc::new(token.clone());
        runtime.spawn(httpd::serve(
            control_listener,
            move |req| {
                control(
                    Arc::clone(&handler_regions),
                    Arc::clone(&control_token),
                    req,
                )
            },
            stop_rx,
        ));

        // The config service, holding the embedded config as version 1; the edge follows it.
        let service = start_config_service(&runtime, options, &token)?;
        // Bearer token of the edge's cache purge endpoint (`token_file = "admin.token"` in local.toml).
        let admin_token = format!("admin-{}\n", random_hex(16).map_err(io("random token"))?);
        write_private(&options.data_dir.join("admin.token"), &admin_token)
            .map_err(io("demo admin token file"))?;
        // The service answers reads only with a token: the edge presents the demo's.
        config.control = Some(meridian_config::Control {
            url: service.url(),
            token_file: Some(options.data_dir.join("token").display().to_string()),
            cache_dir: options.data_dir.join("edge-cache").display().to_string(),
            wait: meridian_config::HumanDuration::secs(30),
            ..Default::default()
        });
        Ok(DemoWorld {
            config,
            regions,
            data_dir: options.data_dir.clone(),
            geoip_db,
            ca_file,
            token,
            token_file: options.data_dir.join("token"),
            config_service: service.addr,
            control: control_addr,
            _service: service,
            _runtime: runtime,
            _stop: stop,
        })
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.to_string();
    move |source| DemoError::Io { what, source }
}

/// `n` bytes from the OS's random source, as hex.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates `dir` (and missing parents) and makes it readable by this user only.
fn private_dir(dir: &Path) -> Result<(), DemoError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let what = format!("creating {}", dir.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(&what))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&what))
}

/// Writes a secret readable by this user only (also when the file existed with wider rights).
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents.as_bytes())
}

/// A fresh local CA and the leaf certificates `examples/local.toml` names (`tls/*.crt|key` in the
/// data directory). Returns the CA file clients should trust.
fn write_demo_certificates(data_dir: &Path) -> Result<PathBuf, DemoError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = data_dir.join("tls");
    private_dir(&dir)?;
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
    for name in ["api.example.test.key", "example.test.key"] {
        let key = dir.join(name);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&format!("protecting {}", key.display())))?;
    }
    Ok(ca_file)
}

/// Starts the config service on a fresh store holding the embedded config as version 1, with
/// `token` for writes (also written to `<data_dir>/token`).
fn start_config_service(
    runtime: &tokio::runtime::Runtime,
    options: &DemoOptions,
    token: &str,
) -> Result<ConfigService, DemoError> {
    let store_dir = options.data_dir.join("config-store");
    // The demo always starts on the embedded defaults.
    if store_dir.exists() {
        std::fs::remove_dir_all(&store_dir).map_err(io("clearing the demo config store"))?;
    }
    write_private(&options.data_dir.join("token"), token).map_err(io("demo token file"))?;
    let service = ConfigService::start(runtime, &store_dir, options.config_service, token)?;
    runtime.block_on(service.client().push(
        LOCAL_CONFIG,
        "meridian demo",
        "embedded examples/local.toml",
        None,
    ))?;
    Ok(service)
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn bearer_is(header: Option<&http::HeaderValue>, token: &str) -> bool {
    let Some(given) = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len()
        && !b.is_empty()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The demo control API: `POST /regions/{name}/down|up|slow?ms=N`, `GET /regions`. Every call
/// needs the demo token as a bearer token (a web page cannot send it, so a cross-site POST
/// cannot break regions) and a loopback `Host` (DNS rebinding).
async fn control(
    regions: Regions,
    token: Arc<String>,
    req: Request<hyper::body::Incoming>,
) -> hyper::Response<httpd::Body> {
    if !meridian_config_service::host::allowed(req.headers().get(hyper::header::HOST), &[]) {
        return httpd::json(
            StatusCode::MISDIRECTED_REQUEST,
            &serde_json::json!({"error": "this Host is not served here"}),
        );
    }
    if !bearer_is(req.headers().get(hyper::header::AUTHORIZATION), &token) {
        let mut response = httpd::json(
            StatusCode::UNAUTHORIZED,
            &serde_json::json!({"error": "send the demo token: -H \"Authorization: Bearer $(cat <data dir>/token)\""}),
        );
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
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
                // `status?code=429` (or 503) makes the region's origins and model servers refuse
                // with Retry-After; `code=200` restores them.
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

/// What to try, printed once everything listens: `edge` says where the demo's edge is.
pub fn tour(demo: &DemoWorld, edge: &EdgeAddrs) -> String {
    let http = edge.http;
    let admin = edge.admin;
    let mut out = String::new();
    out.push_str(&format!(
        "\nMeridian demo is running.\n\n  edge (HTTP/1.1 + h2c)  http://{http}\n  admin + /metrics       http://{admin}/metrics\n  demo control API       http://{CONTROL_ADDR}/regions (bearer: the demo token)\n  test-world GeoIP db    {}\n  demo files (0600/0700) {}\n\n  export MERIDIAN_TOKEN=$(cat {})   # the demo token: control API and config pushes\n\n",
        demo.geoip_db.display(),
        demo.data_dir.display(),
        demo.token_file.display()
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
    if let Some(https) = edge.https {
        let (port, ca) = (https.port(), demo.ca_file.display());
        out.push_str(&format!(
            "\nHTTPS (h1 + h2 by ALPN) and HTTP/3 on {https} (certificates from the demo CA {ca}):\n  curl --cacert {ca} --resolve api.example.test:{port}:{ip} https://api.example.test:{port}/hello\n  curl --cacert {ca} --resolve api.example.test:{port}:{ip} --http2 --interface 127.17.0.1 -si https://api.example.test:{port}/hello   # h2, Frankfurt; alt-svc advertises h3\n  HTTP/3 (QUIC, udp {https}), 20 requests from Korea with the project's load generator:\n  cargo run --release -q -p meridian-loadtest -- https://{https}/hello -p h3 --cacert {ca} --sni api.example.test --host api.example.test --geo-mix KR=1 -n 20\n",
            ip = https.ip()
        ));
    }
    // GeoDNS: the nearest healthy PoP for a client subnet.
    if let Some(dns) = edge.dns {
        let (ip, port) = (dns.ip(), dns.port());
        out.push_str(&format!(
            "\nGeoDNS (authoritative for example.test, udp+tcp on {dns}):\n  dig @{ip} -p {port} api.example.test +subnet=127.15.0.0/24   # a client in Seoul -> seoul PoP 127.2.6.1\n  dig @{ip} -p {port} api.example.test AAAA +subnet=127.17.0.0/24  # Frankfurt, IPv6\n  dig @{ip} -p {port} nope.example.test                          # NXDOMAIN (SOA in authority); other zones: REFUSED\n  curl -s -H \"Authorization: Bearer $MERIDIAN_TOKEN\" -X POST http://{CONTROL_ADDR}/regions/ap-northeast-2/down  # Seoul's health check fails -> Seoul clients get manila\n"
        ));
    }
    let svc = demo.config_service;
    // The response cache: route `static` caches; purge through the admin listener.
    let admin_token = demo.token_file.with_file_name("admin.token");
    out.push_str(&format!(
        "\nEdge cache (route static, x-meridian-cache: miss, then hit; Age counts up):\n  curl -si -H 'Host: static.example.test' 'http://{http}/logo.png?cc=max-age%3D300&tag=brand' | grep -i -e x-meridian-cache -e age\n  curl -si -H 'Host: static.example.test' 'http://{http}/logo.png?cc=max-age%3D300&tag=brand' | grep -i -e x-meridian-cache -e age\n  MERIDIAN_ADMIN_TOKEN=$(cat {}) meridian cache purge --tag brand --admin http://{admin}   # then: miss again\n  curl -s http://{admin}/metrics | grep meridian_cache_\n",
        admin_token.display()
    ));
    out.push_str(&format!(
        "\nMore:\n  curl -si -H 'Host: api.example.test' http://{http}/hello                         # unknown location -> default region us-east\n  curl -si --interface 127.15.0.1 -H 'Host: eu.example.test' http://{http}/v1/x  # KR residency is strict -> 503\n  curl -si -H 'Host: nobody.test' http://{http}/                                  # no route claims it -> 421\n  curl -s -H 'Host: api.example.test' -H 'X-Forwarded-For: 127.12.0.9' http://{http}/  # XFF trusted from 127.0.0.1 -> ap-southeast-1\n  curl -s --http2-prior-knowledge --interface 127.17.0.1 -H 'Host: api.example.test' http://{http}/  # h2c\n  curl -s -H \"Authorization: Bearer $MERIDIAN_TOKEN\" -X POST http://{CONTROL_ADDR}/regions/mx-central/down                  # break a region; /up to heal\n\nInference (OpenAI-compatible; the model in the body picks the region):\n  curl -s -H 'Host: inference.example.test' http://{http}/v1/models\n  curl -si --interface 127.10.0.1 -H 'Host: inference.example.test' http://{http}/v1/chat/completions -d '{{\"model\":\"qwen-max\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'   # Mexico asks for qwen-max -> eu-central-1 (Frankfurt: nearer than Singapore)\n  curl -sN --interface 127.10.0.1 -H 'Host: inference.example.test' http://{http}/v1/chat/completions -d '{{\"model\":\"qwen-turbo\",\"stream\":true,\"max_tokens\":20}}'   # SSE tokens stream from mx-central\n  curl -s -H \"Authorization: Bearer $MERIDIAN_TOKEN\" -X POST 'http://{CONTROL_ADDR}/regions/eu-central-1/status?code=429'    # Frankfurt saturated -> qwen-max from Mexico falls back to ap-southeast-1; code=200 heals\n  curl -s http://{admin}/admin/snapshot\n  curl -s http://{admin}/admin/regions                                          # health, ejections, in-flight per region\n\nChange routing live (the edge follows the config service on {svc}; MERIDIAN_TOKEN as above):\n  $EDITOR examples/local.toml            # e.g. set default_region = \"eu-central-1\" on route api\n  meridian config diff examples/local.toml\n  meridian config push examples/local.toml -m 'send unknown clients to Frankfurt'\n  curl -si -H 'Host: api.example.test' http://{http}/hello | grep x-meridian-region\n  meridian config history; meridian config rollback 1\n  (meridian = cargo run --release --)\n\nCtrl-C stops everything.\n"
    ));
    out
}
