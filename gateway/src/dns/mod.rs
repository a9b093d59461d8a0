//! GeoDNS: an authoritative DNS server (built on hickory-proto's message types) that answers each
//! client with the nearest healthy PoP.
//!
//! - [`zone`]: `[dns]` + `[[pops]]` compiled into a read-only [`Zone`].
//! - [`answer`]: the protocol logic, a pure function from query bytes to answer bytes.
//! - [`health`]: active probes of each PoP's health URL.
//! - [`server`]: UDP and TCP on one address, both calling the same handler; zone hot reload.

pub mod answer;
mod cache;
pub mod dnssec;
pub mod fast;
pub mod health;
pub mod metrics;
pub mod rrl;
pub mod server;
mod udp;
pub mod zone;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use meridian_geoip::GeoIp;
use tokio::sync::watch;

pub use answer::{answer, steer, Answer, Steering, Transport};
pub use server::RunningDns;
pub use zone::{Zone, ZoneError};

use crate::reload::SnapshotStore;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Zone(#[from] ZoneError),
    #[error("dns listener {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Config(#[from] meridian_config::ConfigError),
    #[error("geoip: {0}")]
    GeoIp(#[from] meridian_geoip::GeoIpError),
    #[error(transparent)]
    Dnssec(#[from] dnssec::DnssecError),
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// For an edge: when the installed version has `[dns]`, start GeoDNS on the current runtime (the
/// edge's sidecar), metrics in the edge's registry, serving the zone of each version the store
/// installs.
pub fn start_for_edge(
    store: &Arc<SnapshotStore>,
    stop: watch::Receiver<bool>,
) -> Result<Option<SocketAddr>, DnsError> {
    let loaded = store.load();
    let Some(zone) = &loaded.zone else {
        return Ok(None);
    };
    let running = RunningDns::start_serving(
        &loaded.snapshot.config,
        Arc::clone(zone),
        Arc::clone(&loaded.geoip),
        store.metrics().registry(),
        1,
        stop.clone(),
    )?;
    let addr = running.addr;
    let started_on = loaded
        .snapshot
        .config
        .dns
        .as_ref()
        .map(|d| d.listen.clone())
        .unwrap_or_default();
    tokio::spawn(follow(Arc::clone(store), running, started_on, stop));
    Ok(Some(addr))
}

/// Serves the zone (and GeoIP database) of every version the store installs. Both were compiled
/// by the install, which refuses a version whose zone does not compile: nothing can fail here.
async fn follow(
    store: Arc<SnapshotStore>,
    running: RunningDns,
    started_on: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut generation = store.subscribe();
    loop {
        tokio::select! {
            changed = generation.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let loaded = store.load();
        let Some(zone) = &loaded.zone else {
            tracing::warn!(
                "[dns] was removed from the config: GeoDNS keeps the last zone until restart"
            );
            continue;
        };
        let (serving, geoip) = running.serving();
        if Arc::ptr_eq(&serving, zone) && Arc::ptr_eq(&geoip, &loaded.geoip) {
            continue;
        }
        let listen = loaded.snapshot.config.dns.as_ref().map(|d| &d.listen);
        if listen != Some(&started_on) {
            tracing::warn!(
                listen = ?listen,
                serving = %running.addr,
                "dns.listen changed: takes effect on restart"
            );
        }
        running.serve(Arc::clone(zone), Arc::clone(&loaded.geoip));
        tracing::info!(
            version = loaded.snapshot.meta.version,
            "GeoDNS zone reloaded"
        );
    }
}

/// Where `meridian dns` serves `/metrics` and `/healthz` unless told otherwise (loopback; the
/// edge's admin listener is 9901).
pub const STANDALONE_METRICS: &str = "127.0.0.1:9902";

/// `meridian dns --config FILE`: GeoDNS alone, on its own runtime, until SIGINT/SIGTERM. SIGHUP
/// re-reads the file and rebuilds the zone. `metrics` (loopback by default) serves the
/// `meridian_dns_*` / `meridian_pop_healthy` series for Prometheus, and `/healthz`.
pub fn run_standalone(path: &Path, metrics: Option<SocketAddr>) -> Result<(), DnsError> {
    let read = |path: &Path| -> Result<meridian_config::Config, DnsError> {
        let source =
            std::fs::read_to_string(path).map_err(|source| meridian_config::ConfigError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(meridian_config::Config::from_toml_str(&source)?)
    };
    let config = read(path)?;
    let geoip = Arc::new(match &config.geoip.database {
        Some(db) => GeoIp::open(Path::new(db))?,
        None => GeoIp::empty(),
    });
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("meridian-dns")
        .enable_all()
        .build()
        .map_err(DnsError::Runtime)?;
    runtime.block_on(async {
        let registry = prometheus::Registry::new();
        let (stop, stop_rx) = watch::channel(false);
        let running = RunningDns::start(&config, geoip, &registry, workers, stop_rx.clone())?;
        if let Some(addr) = metrics {
            let listener =
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| DnsError::Listen {
                        addr: format!("metrics {addr}"),
                        source,
                    })?;
            tracing::info!(dns = %running.addr, metrics = %addr, "GeoDNS serving");
            let registry = registry.clone();
            tokio::spawn(crate::httpd::serve(
                listener,
                move |req| {
                    let response = metrics_response(&registry, req.uri().path());
                    async move { response }
                },
                stop_rx,
            ));
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).map_err(DnsError::Runtime)?;
        let mut term = signal(SignalKind::terminate()).map_err(DnsError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DnsError::Runtime)?;
        loop {
            tokio::select! {
                _ = hup.recv() => match read(path).and_then(|c| running.reload(&c)) {
                    Ok(()) => tracing::info!("SIGHUP: zone reloaded from {}", path.display()),
                    Err(e) => tracing::warn!("SIGHUP: reload failed, keeping the previous zone: {e}"),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        stop.send_replace(true);
        Ok(())
    })
}

/// The standalone server's tiny HTTP surface: `/metrics` (Prometheus text) and `/healthz`.
fn metrics_response(
    registry: &prometheus::Registry,
    path: &str,
) -> hyper::Response<crate::httpd::Body> {
    use hyper::StatusCode;
    match path {
        "/metrics" => {
            let mut text = String::new();
            match prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut text) {
                Ok(()) => crate::httpd::respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text,
                ),
                Err(e) => crate::httpd::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        "/healthz" => crate::httpd::text(StatusCode::OK, "ok\n"),
        _ => crate::httpd::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
