//! Starting and stopping a whole edge: the Pingora proxy service on its own thread, and a small
//! "sidecar" tokio runtime for everything off the proxy path (admin listener, demo helpers).

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meridian_config::Config;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::{mpsc, watch};

use crate::core::{CompileError, SnapshotMeta};
use crate::metrics::EdgeMetrics;
use crate::reload::control::{self, ControlSettings};
use crate::reload::{InstallErrors, Pinned, Process, SnapshotStore};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] CompileError),
    /// The first config version could not be installed (every reason, as for a reload).
    #[error(transparent)]
    Install(#[from] InstallErrors),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("GeoDNS: {0}")]
    Dns(#[from] crate::dns::DnsError),
    #[error("{what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("the proxy did not start listening on {0} within {1:?}")]
    NotReady(SocketAddr, Duration),
}

pub struct EdgeOptions {
    pub config: Config,
    pub meta: SnapshotMeta,
    /// React to SIGINT (fast stop) and SIGTERM (graceful stop). Off for in-process test edges.
    pub handle_signals: bool,
    /// File mode: reload this file on SIGHUP and when it changes (ignored with `[control]`).
    pub watch_file: Option<std::path::PathBuf>,
    /// Directory that relative paths in the config are resolved against (the config file's).
    pub base_dir: Option<std::path::PathBuf>,
}

/// A running edge. Dropping it stops everything (fast shutdown).
pub struct RunningEdge {
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// GeoDNS (UDP and TCP) when the config has `[dns]`.
    pub dns_addr: Option<SocketAddr>,
    /// HTTPS (h1 + h2 by ALPN) when the config has `edge.https`; HTTP/3 listens on the same
    /// address (UDP) when `edge.h3` is on.
    pub https_addr: Option<SocketAddr>,
    /// The HTTP/3 front and its own runtime, when `edge.h3` is on.
    h3: Option<(crate::h3::H3Front, tokio::runtime::Runtime)>,
    pub store: Arc<SnapshotStore>,
    shutdown: mpsc::UnboundedSender<ShutdownSignal>,
    server: Option<JoinHandle<()>>,
    stop_sidecar: watch::Sender<bool>,
    sidecar: Option<tokio::runtime::Runtime>,
}

impl RunningEdge {
    pub fn start(options: EdgeOptions) -> Result<Self, StartError> {
        let EdgeOptions {
            config,
            meta,
            handle_signals,
            watch_file,
            base_dir,
        } = options;
        // The sidecar runtime: admin listener, config following, and other off-path services.
        let sidecar = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("meridian-sidecar")
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let (stop_sidecar, stop_rx) = watch::channel(false);

        // With a [control] section the config service is the source of truth: start from its
        // current version, else the cached last good one, else the boot file itself. The boot
        // file's [edge] and [control] stay with the process either way (see `Pinned`).
        let boot = config;
        let control = match &boot.control {
            Some(section) => {
                Some(ControlSettings::from_config(section).map_err(StartError::Runtime)?)
            }
            None => None,
        };
        let pinned = control.as_ref().map(|_| Pinned::from_boot(&boot));
        let (config, meta) = match control
            .as_ref()
            .and_then(|c| sidecar.block_on(control::bootstrap(c)))
        {
            Some(stored) => {
                let fetched = Config::from_toml_str(&stored.document).map_err(|e| {
                    StartError::Config(CompileError::Unusable {
                        path: "control".into(),
                        message: e.to_string(),
                    })
                })?;
                let meta = SnapshotMeta {
                    version: stored.meta.version,
                    hash: meridian_config::content_hash(&stored.document),
                };
                (fetched, meta)
            }
            None => (boot.clone(), meta),
        };
        // Listeners, threads, cache size and admin token: the boot file's, read once.
        let edge = boot.edge;
        let http_addr: SocketAddr = parse_listen("edge.http", &edge.http)?;
        let admin_addr: SocketAddr = parse_listen("edge.admin", &edge.admin)?;
        crate::tls::install_crypto_provider();
        let https_addr = match edge.https.as_deref() {
            Some(addr) => Some(parse_listen("edge.https", addr)?),
            None => None,
        };
        let alt_svc = https_addr.filter(|_| edge.h3).and_then(|a| {
            http::HeaderValue::from_str(&format!("h3=\":{}\"; ma=86400", a.port())).ok()
        });
        let metrics = Arc::new(EdgeMetrics::new()?);
        // --- response cache: one per process, kept across config reloads; its size
        // ([edge.cache]) and the admin token ([edge.admin] token_file) are read at start only. ---
        let cache = crate::cache::ResponseCache::new(&edge.cache, metrics.registry())?;
        let token_file = edge.admin.token_file.as_ref().map(|f| {
            let path = std::path::Path::new(f);
            match &base_dir {
                Some(base) if path.is_relative() => base.join(path).display().to_string(),
                _ => f.clone(),
            }
        });
        let admin_token = crate::admin::read_token(token_file.as_deref());
        // --- end response cache ---
        // The first version is installed like every later one: certificates (read and checked
        // before anything listens), GeoIP database, DNS zone, routing, cache policies.
        let store = Arc::new(SnapshotStore::new(
            config,
            meta,
            Process {
                metrics,
                cache: Some(cache.clone()),
                base_dir,
                pinned,
            },
        )?);
        let cert_resolver = https_addr.map(|_| crate::tls::CertResolver::new(Arc::clone(&store)));

        let admin_listener =
            std::net::TcpListener::bind(admin_addr).map_err(|source| StartError::Listen {
                what: "admin listener",
                addr: admin_addr.to_string(),
                source,
            })?;
        let admin_addr = admin_listener.local_addr().map_err(StartError::Runtime)?;
        admin_listener
            .set_nonblocking(true)
            .map_err(StartError::Runtime)?;
        {
            let _guard = sidecar.enter();
            let listener =
                tokio::net::TcpListener::from_std(admin_listener).map_err(StartError::Runtime)?;
            sidecar.spawn(crate::admin::serve(
                listener,
                Arc::clone(&store),
                crate::admin::Purging {
                    cache: cache.clone(),
                    token: admin_token,
                },
                stop_rx.clone(),
            ));
        }

        // GeoDNS: with `[dns]` in the config, the authoritative DNS server runs on the
        // sidecar runtime, registers its metrics in this edge's registry and rebuilds its zone on
        // every reload of `store`.
        let dns_addr = {
            let _guard = sidecar.enter();
            crate::dns::start_for_edge(&store, stop_rx.clone())?
        };

        // Active health checks of every region's upstreams (off the request path).
        sidecar.spawn(crate::health::run(Arc::clone(&store), stop_rx.clone()));

        // Where new config versions come from.
        match (control, watch_file) {
            (Some(settings), watch_file) => {
                if watch_file.is_some() {
                    tracing::info!(
                        "following the config service; local file changes are not watched"
                    );
                }
                let store = Arc::clone(&store);
                sidecar.spawn(control::follow(store, settings, stop_rx.clone()));
            }
            (None, Some(path)) => {
                let store = Arc::clone(&store);
                let hangup = {
                    let _guard = sidecar.enter();
                    crate::reload::file::hangup_signal()
                };
                let watcher = crate::reload::file::watch_file(store, path, hangup, stop_rx.clone());
                sidecar.spawn(watcher);
            }
            (None, None) => {}
        }

        // Every client connection, upstream connection and listener is a descriptor, and the
        // usual soft default (1,024) is far below `max_connections`.
        if let Ok(limit) = crate::httpd::raise_open_file_limit() {
            let wanted = edge.limits.max_connections as u64 * 2 + 1024;
            if limit < wanted {
                tracing::warn!(
                    "open-file limit {limit} is below what edge.limits.max_connections may need ({wanted}): connections beyond it fail at accept"
                );
            }
        }
        // Bound here, so a taken port fails the start with a clear error.
        let http_listener =
            std::net::TcpListener::bind(http_addr).map_err(|source| StartError::Listen {
                what: "http listener",
                addr: http_addr.to_string(),
                source,
            })?;
        let http_addr = http_listener.local_addr().map_err(StartError::Runtime)?;

        let conf = ServerConf {
            threads: edge.threads,
            // One single-threaded tokio runtime per worker thread instead of one work-stealing
            // runtime: a connection stays on the thread that accepted it (Pingora spreads new
            // connections over the threads at random), so a request never pays cross-thread
            // wake-ups or atomics of the stealing scheduler. Measured: +5-25% req/s by scenario
            // with `threads = 1` (docs/benchmarks.md).
            work_stealing: false,
            grace_period_seconds: Some(edge.shutdown_grace.as_duration().as_secs()),
            graceful_shutdown_timeout_seconds: Some(
                edge.shutdown_timeout.as_duration().as_secs().max(1),
            ),
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();
        // One pipeline for every front: the TCP and HTTP/3 drivers share its cache, inference
        // state, connector and counters.
        let pipeline = Arc::new(crate::pipeline::Pipeline::new(
            Arc::clone(&store),
            Some(cache.clone()),
            alt_svc,
        ));
        // HTTP/1.1 and HTTP/2 (h2c on the cleartext listener, ALPN h2 on TLS) are Meridian's own
        // drivers; Pingora provides the worker runtimes, the TLS listener and graceful shutdown.
        let front = crate::front::Front::new(Arc::clone(&pipeline));
        server.add_service(crate::front::PlainListener::new(
            http_listener,
            Arc::clone(&front),
        ));
        let mut service = pingora::services::listening::Service::new(
            "meridian https".to_string(),
            crate::front::TlsConnections::new(front),
        );
        // --- TLS listener: SNI-selected certificates, reloaded off the request path. ---
        if let (Some(addr), Some(resolver)) = (https_addr, cert_resolver.as_ref()) {
            drop(
                std::net::TcpListener::bind(addr).map_err(|source| StartError::Listen {
                    what: "https listener",
                    addr: addr.to_string(),
                    source,
                })?,
            );
            let settings = crate::tls::tcp_settings(Arc::clone(resolver))?;
            // Unbuffered: rustls keeps its own record buffer, so a second 64 KiB one per
            // connection would only cost memory.
            service.add_listener(
                pingora::listeners::ListenerConfig::tcp(addr.to_string())
                    .tls(settings)
                    .l4_buffer(pingora::protocols::l4::stream::L4BufferSettings::unbuffered()),
            );
            sidecar.spawn(crate::tls::follow(
                Arc::clone(&store),
                Duration::from_secs(2),
                stop_rx.clone(),
            ));
        }
        // --- end TLS listener ---
        // --- HTTP/3 front: quinn + h3 on UDP at the HTTPS address, same certificates,
        // same routing core; its own runtime so QUIC work never queues behind the sidecar. ---
        let h3 = match (https_addr, cert_resolver.as_ref()) {
            (Some(addr), Some(resolver)) if edge.h3 => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(edge.threads.max(1))
                    .thread_name("meridian-h3")
                    .enable_all()
                    .build()
                    .map_err(StartError::Runtime)?;
                let front = crate::h3::start(
                    runtime.handle(),
                    addr,
                    Arc::clone(resolver),
                    &edge.h3_limits,
                    Arc::clone(&pipeline),
                    edge.shutdown_timeout.as_duration(),
                )
                .map_err(|source| StartError::Listen {
                    what: "h3 (udp) listener",
                    addr: addr.to_string(),
                    source,
                })?;
                Some((front, runtime))
            }
            _ => None,
        };
        // --- end HTTP/3 front ---
        let (fast_stop, fast_stop_rx) = watch::channel(false);
        if https_addr.is_some() {
            server.add_service(crate::front::TlsListener::new(service, fast_stop_rx));
        }

        let (shutdown, shutdown_rx) = mpsc::unbounded_channel();
        let watch = ChannelShutdown {
            rx: tokio::sync::Mutex::new(shutdown_rx),
            handle_signals,
            fast_stop,
        };
        let thread = std::thread::Builder::new()
            .name("meridian-proxy".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(watch),
                })
            })
            .map_err(StartError::Runtime)?;

        let running = Self {
            http_addr,
            admin_addr,
            dns_addr,
            https_addr,
            h3,
            store,
            shutdown,
            server: Some(thread),
            stop_sidecar,
            sidecar: Some(sidecar),
        };
        wait_until_listening(http_addr, Duration::from_secs(20))?;
        if let Some(addr) = https_addr {
            wait_until_listening(addr, Duration::from_secs(20))?;
        }
        Ok(running)
    }

    /// Blocks until the proxy stops (after a signal, or `stop` from another handle).
    pub fn wait(mut self) {
        if let Some(thread) = self.server.take() {
            let _ = thread.join();
        }
    }

    /// Stops the proxy: `graceful` lets in-flight requests finish (bounded by `edge.shutdown_*`).
    pub fn stop(mut self, graceful: bool) {
        let signal = if graceful {
            ShutdownSignal::GracefulTerminate
        } else {
            ShutdownSignal::FastShutdown
        };
        // HTTP/3 first: GOAWAY, then in-flight requests finish (graceful) while Pingora drains.
        if let Some((front, _)) = self.h3.as_mut() {
            front.shutdown(graceful);
        }
        let _ = self.shutdown.send(signal);
        if let Some(thread) = self.server.take() {
            let _ = thread.join();
        }
    }

    /// Runs `future` on the sidecar runtime (off the proxy path).
    pub fn spawn_sidecar<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(rt) = &self.sidecar {
            rt.spawn(future);
        }
    }

    pub fn sidecar_stop_signal(&self) -> watch::Receiver<bool> {
        self.stop_sidecar.subscribe()
    }
}

impl Drop for RunningEdge {
    fn drop(&mut self) {
        let _ = self.shutdown.send(ShutdownSignal::FastShutdown);
        if let Some(thread) = self.server.take() {
            let _ = thread.join();
        }
        if let Some((mut front, runtime)) = self.h3.take() {
            front.shutdown(false);
            runtime.shutdown_background();
        }
        self.stop_sidecar.send_replace(true);
        if let Some(rt) = self.sidecar.take() {
            // Never blocks, so an edge may be dropped from async code (tests) too.
            rt.shutdown_background();
        }
    }
}

fn parse_listen(what: &'static str, addr: &str) -> Result<SocketAddr, StartError> {
    addr.parse().map_err(|_| StartError::Listen {
        what,
        addr: addr.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "expected ip:port"),
    })
}

/// Readiness: the proxy accepts TCP connections.
fn wait_until_listening(addr: SocketAddr, limit: Duration) -> Result<(), StartError> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(StartError::NotReady(addr, limit))
}

/// Shutdown requests from the owning handle and, optionally, from Unix signals.
struct ChannelShutdown {
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<ShutdownSignal>>,
    handle_signals: bool,
    /// Set before a fast shutdown goes to Pingora (see [`crate::front::TlsListener`]).
    fast_stop: watch::Sender<bool>,
}

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let signal = self.next().await;
        if matches!(signal, ShutdownSignal::FastShutdown) {
            self.fast_stop.send_replace(true);
        }
        signal
    }
}

impl ChannelShutdown {
    async fn next(&self) -> ShutdownSignal {
        let mut rx = self.rx.lock().await;
        if !self.handle_signals {
            return rx.recv().await.unwrap_or(ShutdownSignal::FastShutdown);
        }
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return rx.recv().await.unwrap_or(ShutdownSignal::FastShutdown);
        };
        tokio::select! {
            requested = rx.recv() => requested.unwrap_or(ShutdownSignal::FastShutdown),
            _ = term.recv() => {
                tracing::info!("SIGTERM: graceful shutdown");
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                ShutdownSignal::FastShutdown
            }
        }
    }
}
