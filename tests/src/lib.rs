//! The integration harness: a whole edge in-process on ephemeral ports, simulated origins for every
//! region of the test world, and HTTP clients that bind test-world source addresses (127.X.0.Y) so a
//! request appears to come from any country.

pub mod client;
pub mod engines;
pub mod h3client;
pub mod secure;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use meridian_config::Config;
use meridian_gateway::core::SnapshotMeta;
use meridian_gateway::edge::{EdgeOptions, RunningEdge};
use meridian_testkit::origin::{self, OriginControl, Origins};
use meridian_testkit::LOCAL_CONFIG;
use tokio::sync::watch;

pub use client::{Client, KeepAlive, Protocol, Reply};
pub use meridian_testkit::config_service::ConfigService;
pub use meridian_testkit::test_world::{place_for_country, PLACES};
pub use secure::{Secure, TestTls};

/// A running test world: origins, an edge, a client runtime. Everything stops on drop.
pub struct World {
    pub edge: RunningEdge,
    /// The config the edge started with, upstreams rewritten to the live origins.
    pub config: Config,
    pub config_service: Option<ConfigService>,
    pub origins: Origins,
    pub client: Client,
    pub runtime: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
    /// The World's CA and certificates when the config has `edge.https`.
    pub tls: Option<TestTls>,
    _stop: watch::Sender<bool>,
}

/// The demo config (`examples/local.toml`), to be adjusted by a test before `World::start`.
pub fn local_config() -> Config {
    Config::from_toml_str(LOCAL_CONFIG).expect("examples/local.toml is valid")
}

impl World {
    /// Starts origins for every region of `config` (on 127.1.X.Y with ephemeral ports, rewriting the
    /// upstream addresses), a test-world GeoIP database, and an edge on an ephemeral port.
    pub fn start(config: Config) -> World {
        Self::start_with(config, false)
    }

    /// Like [`World::start`], plus a config service holding the config as version 1, which the
    /// edge follows (`[control]`).
    pub fn start_following(config: Config) -> World {
        Self::start_with(config, true)
    }

    fn start_with(mut config: Config, follow: bool) -> World {
        if let Ok(filter) = std::env::var("MERIDIAN_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (stop, stop_rx) = watch::channel(false);
        let origins = runtime
            .block_on(origin::spawn_for(&mut config, true, stop_rx))
            .expect("origins");
        let db = dir.path().join("test-world.mmdb");
        meridian_testkit::test_world::write(&db).expect("geoip db");
        config.geoip.database = Some(db.display().to_string());
        // TLS: a per-World CA and certificates; each edge gets its own HTTPS port.
        meridian_gateway::tls::install_crypto_provider();
        let tls = config.edge.https.is_some().then(|| {
            config.edge.https = Some(free_local_addr().to_string());
            TestTls::install(&mut config, dir.path())
        });
        config.edge.threads = 1;
        // GeoDNS on an ephemeral port (examples/local.toml asks for 5353). Done on the shared
        // config, not per edge, because following edges take [dns] from the pushed document.
        if let Some(dns) = config.dns.as_mut() {
            dns.listen = "127.0.0.1:0".into();
        }
        let config_service = follow.then(|| {
            let service = ConfigService::start(
                &runtime,
                &dir.path().join("config-store"),
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                "test-token",
            )
            .expect("config service");
            let document = toml::to_string(&config).expect("config serializes");
            runtime
                .block_on(service.client().push(&document, "test", "version 1", None))
                .expect("push version 1");
            service
        });
        let edge = start_edge(
            &config,
            config_service.as_ref(),
            &dir.path().join("edge-0-cache"),
        );
        let client = Client::new(edge.http_addr);
        World {
            edge,
            config,
            config_service,
            origins,
            client,
            runtime,
            dir,
            tls,
            _stop: stop,
        }
    }

    /// Another edge on the same origins (following the config service when there is one), with
    /// its own last-good cache in `cache_dir`.
    pub fn start_edge(&self, cache_dir: &str) -> RunningEdge {
        start_edge(
            &self.config,
            self.config_service.as_ref(),
            &self.path(cache_dir),
        )
    }

    pub fn service(&self) -> &ConfigService {
        self.config_service
            .as_ref()
            .expect("World::start_following")
    }

    /// Pushes `config` to the config service; returns the new version.
    pub fn push(&self, config: &Config, message: &str) -> u64 {
        let document = toml::to_string(config).expect("config serializes");
        self.runtime
            .block_on(
                self.service()
                    .client()
                    .push(&document, "test", message, None),
            )
            .expect("push accepted")
            .version
    }

    /// `/admin/snapshot` version of `edge`, once it reaches `version` (bounded wait; returns the
    /// last seen value so the caller's assertion says what happened).
    pub fn wait_for_version(&self, edge: &RunningEdge, version: u64) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let seen = self
                .runtime
                .block_on(admin_get(edge.admin_addr, "/admin/snapshot"))
                .json()["version"]
                .as_u64()
                .unwrap_or(0);
            if seen >= version || std::time::Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The version `edge` serves right now (one `/admin/snapshot` request).
    pub fn wait_for_version_once(&self, edge: &RunningEdge) -> u64 {
        self.runtime
            .block_on(admin_get(edge.admin_addr, "/admin/snapshot"))
            .json()["version"]
            .as_u64()
            .unwrap_or(0)
    }

    /// A request to a specific edge.
    pub fn request_to(&self, edge: &RunningEdge, country: &str, host: &str, path: &str) -> Reply {
        self.runtime
            .block_on(Client::new(edge.http_addr).request(
                Protocol::Http1,
                source_for(country),
                "GET",
                host,
                path,
                &[],
                Vec::new(),
            ))
            .expect("request completes")
    }

    /// Sends a request from `source` (a test-world address) and waits for the whole reply.
    pub fn request(
        &self,
        protocol: Protocol,
        source: IpAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.runtime
            .block_on(
                self.client
                    .request(protocol, source, "GET", host, path, headers, Vec::new()),
            )
            .expect("request completes")
    }

    /// `GET http://{host}{path}` over HTTP/1.1 from a client in `country` (`"??"`: unknown location).
    pub fn get_from(&self, country: &str, host: &str, path: &str) -> Reply {
        self.request(Protocol::Http1, source_for(country), host, path, &[])
    }

    pub fn origins_of(&self, region: &str) -> &[Arc<OriginControl>] {
        self.origins.get(region).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Takes every origin of `region` down (listener and connections closed) or back up, and
    /// returns once that has happened.
    pub fn set_region_up(&self, region: &str, up: bool) {
        for origin in self.origins_of(region) {
            self.runtime.block_on(origin.set_up_and_settle(up));
        }
    }

    /// Requests answered by every origin of every region.
    pub fn origin_requests(&self) -> u64 {
        self.origins.values().flatten().map(|o| o.requests()).sum()
    }

    /// The admin listener's `/metrics` text.
    pub fn metrics(&self) -> String {
        metrics_text(&self.runtime, &self.edge)
    }

    /// The value of `series` once it equals `expected`, or its last value after a bounded wait.
    /// The edge records a request's metrics just after the response is written, so a scrape right
    /// after the reply can be a moment early.
    pub fn metric_eventually(&self, series: &str, expected: f64) -> Option<f64> {
        self.metric_once(series, |value| value == expected)
    }

    /// The value of `series` once it is at least `least`, or its last value after a bounded wait.
    pub fn metric_at_least(&self, series: &str, least: f64) -> Option<f64> {
        self.metric_once(series, |value| value >= least)
    }

    fn metric_once(&self, series: &str, reached: impl Fn(f64) -> bool) -> Option<f64> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let value = metric_value(&self.metrics(), series);
            if value.is_some_and(&reached) || std::time::Instant::now() > deadline {
                return value;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    pub fn admin_get(&self, path: &str) -> Reply {
        self.runtime.block_on(admin_get(self.edge.admin_addr, path))
    }

    /// One request over TLS (h1, h2) or QUIC (h3) to this World's edge, from `source`.
    pub fn secure_request(
        &self,
        protocol: Secure,
        source: IpAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let tls = self
            .tls
            .as_ref()
            .expect("the World's config has edge.https");
        let target = self.edge.https_addr.expect("edge.https");
        self.runtime
            .block_on(secure::request(
                protocol,
                tls.roots(),
                target,
                source,
                "GET",
                host,
                path,
                headers,
                Vec::new(),
            ))
            .unwrap_or_else(|e| panic!("{protocol:?} request to {host}{path}: {e:#}"))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

async fn admin_get(admin: SocketAddr, path: &str) -> Reply {
    Client::new(admin)
        .request(
            Protocol::Http1,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "GET",
            "localhost",
            path,
            &[],
            Vec::new(),
        )
        .await
        .expect("admin request")
}

/// Starts an edge on fresh ephemeral ports for `config` (already rewritten to live origins).
fn start_edge(
    config: &Config,
    service: Option<&ConfigService>,
    cache_dir: &std::path::Path,
) -> RunningEdge {
    let mut config = config.clone();
    config.edge.http = free_local_addr().to_string();
    config.edge.admin.listen = "127.0.0.1:0".into(); // keeps [edge.admin] token_file
    if config.edge.https.is_some() {
        config.edge.https = Some(free_local_addr().to_string());
    }
    // The service answers reads only with a token: each edge gets its own copy of it.
    let token_file = service.map(|s| {
        let path = cache_dir.with_extension("token");
        std::fs::write(&path, &s.token).expect("write the edge's control token file");
        path.display().to_string()
    });
    config.control = service.map(|s| meridian_config::Control {
        url: s.url(),
        token_file,
        cache_dir: cache_dir.display().to_string(),
        wait: meridian_config::HumanDuration::secs(30),
        ..Default::default()
    });
    start_edge_from(config)
}

/// An edge running `config` as version 0, without signal handling or a watched file.
pub fn start_edge_from(config: Config) -> RunningEdge {
    RunningEdge::start(EdgeOptions {
        config,
        meta: SnapshotMeta {
            version: 0,
            hash: "test".into(),
        },
        handle_signals: false,
        watch_file: None,
        base_dir: None,
    })
    .expect("edge starts")
}

/// The runtime the blocking tests drive their async clients on: two workers, I/O and timers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A client address in `country` of the test world; `"??"` gives 127.0.0.1 (unknown location).
pub fn source_for(country: &str) -> IpAddr {
    match place_for_country(country) {
        Some(place) => place.client_addr(7),
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

/// Value of one sample in Prometheus text (`name{labels}` written exactly as exposed, labels sorted).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// An address on a random loopback IP with a port the kernel just handed out (then released), so
/// parallel test processes do not collide.
pub fn free_local_addr() -> SocketAddr {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let salt = nanos ^ std::process::id().rotate_left(16);
    let ip = Ipv4Addr::new(127, 200, (salt >> 8) as u8, (salt as u8).max(1));
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind a free port");
    listener.local_addr().expect("local addr")
}

/// The `/metrics` text of a running edge's admin listener (asserting a 200).
pub fn metrics_text(runtime: &tokio::runtime::Runtime, edge: &RunningEdge) -> String {
    let reply = runtime
        .block_on(Client::new(edge.admin_addr).request(
            Protocol::Http1,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "GET",
            "localhost",
            "/metrics",
            &[],
            Vec::new(),
        ))
        .expect("metrics");
    assert_eq!(reply.status, 200);
    reply.text()
}
