//! The TCP front: Meridian's own accept loop, HTTP/1.1 connection loop ([`h1`]) and HTTP/2 driver
//! ([`h2`], on the `h2` crate) in front of the one [`Pipeline`]. Pingora's server still provides the
//! worker threads (one single-threaded runtime each), the TLS listener (rustls handshakes), signal
//! handling and graceful shutdown.
//!
//! Every connection is bounded: a cap per listener (beyond it a connection is closed at accept and
//! counted), a total time for each request head, an idle time between requests, a number of
//! requests, and a time for the client to read what it is sent.

pub mod h1;
pub mod h2;
mod metrics;
mod tunnel;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meridian_config::Limits;
use pingora::apps::ServerApp;
use pingora::server::ShutdownWatch;
use pingora::services::Service;
use tokio::time::Instant;

pub use metrics::FrontMetrics;

use crate::core::http1::HeadLimits;
use crate::metrics::EdgeMetrics;
use crate::pipeline::Pipeline;

/// What ended a connection early, for `meridian_client_timeouts_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// A request head did not complete within `client_header_timeout`.
    Header,
    /// No next request within `keepalive_timeout`.
    KeepAlive,
}

impl Timeout {
    pub const ALL: [Timeout; 2] = [Timeout::Header, Timeout::KeepAlive];

    pub fn label(self) -> &'static str {
        match self {
            Timeout::Header => "header",
            Timeout::KeepAlive => "keepalive",
        }
    }
}

/// `[edge.limits]` as one connection applies them (read when it is accepted). Compact on purpose:
/// every idle connection carries a copy.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    max_header_bytes: u32,
    max_uri_bytes: u32,
    max_headers: u16,
    header_timeout_ms: u32,
    keepalive_timeout_ms: u32,
    send_timeout_ms: u32,
    pub max_requests: u32,
}

impl ConnLimits {
    pub fn of(limits: &Limits) -> Self {
        let ms = |d: &meridian_config::HumanDuration| {
            u32::try_from(d.as_duration().as_millis()).unwrap_or(u32::MAX)
        };
        let bytes = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            max_header_bytes: bytes(limits.max_header_bytes),
            max_uri_bytes: bytes(limits.max_uri_bytes),
            max_headers: u16::try_from(limits.max_headers).unwrap_or(u16::MAX),
            header_timeout_ms: ms(&limits.client_header_timeout),
            keepalive_timeout_ms: ms(&limits.keepalive_timeout),
            send_timeout_ms: ms(&limits.send_timeout),
            max_requests: limits.max_requests_per_connection,
        }
    }

    pub fn head(&self) -> HeadLimits {
        HeadLimits {
            max_header_bytes: self.max_header_bytes as usize,
            max_headers: self.max_headers as usize,
            max_uri_bytes: self.max_uri_bytes as usize,
        }
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms.into())
    }

    pub fn keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.keepalive_timeout_ms.into())
    }

    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.send_timeout_ms.into())
    }
}

/// One listener's open-connection count, and its metrics.
pub struct ListenerSlots {
    open: AtomicUsize,
    open_gauge: prometheus::IntGauge,
    refused: prometheus::IntCounter,
}

impl ListenerSlots {
    pub fn new(label: &'static str, metrics: &FrontMetrics) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            open_gauge: metrics.open.with_label_values(&[label]),
            refused: metrics.refused.with_label_values(&[label]),
        })
    }
}

/// An admitted connection: its limits, when it was accepted, the shutdown signal, and its slot
/// (released when this is dropped).
pub struct Connection {
    pub limits: ConnLimits,
    pub accepted: Instant,
    pub shutdown: ShutdownWatch,
    /// A TLS connection's handshake, counted (once) when its first request arrives, as the h2
    /// session does: a handshake that never carries a request is not a served client.
    pub handshake: Option<Arc<pingora::protocols::tls::SslDigest>>,
    _slot: Slot,
}

struct Slot(Arc<ListenerSlots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.open_gauge.dec();
    }
}

/// What every connection of the TCP front shares.
pub struct Front {
    pub pipeline: Arc<Pipeline>,
    metrics: Arc<EdgeMetrics>,
}

/// The `Date` of a response the edge writes without one (RFC 9110 §6.6.1): formatted once a
/// second per thread, not per response.
pub(crate) fn date_now() -> http::HeaderValue {
    pingora::protocols::http::date::get_cached_date()
}

impl Front {
    pub fn new(pipeline: Arc<Pipeline>) -> Arc<Self> {
        let metrics = Arc::clone(pipeline.store.metrics());
        Arc::new(Self { pipeline, metrics })
    }

    pub fn metrics(&self) -> &FrontMetrics {
        &self.metrics.front
    }

    /// Admits a new connection of `listener` unless it is at its cap.
    pub fn admit(
        &self,
        listener: &Arc<ListenerSlots>,
        shutdown: &ShutdownWatch,
    ) -> Option<Connection> {
        let loaded = self.pipeline.store.load();
        let open = listener.open.fetch_add(1, Ordering::Relaxed);
        if open >= loaded.snapshot.limits.max_connections {
            listener.open.fetch_sub(1, Ordering::Relaxed);
            listener.refused.inc();
            return None;
        }
        listener.open_gauge.inc();
        Some(Connection {
            limits: ConnLimits::of(&loaded.snapshot.limits),
            accepted: Instant::now(),
            shutdown: shutdown.clone(),
            handshake: None,
            _slot: Slot(Arc::clone(listener)),
        })
    }

    /// HTTP/2 by prior knowledge; `first` (the preface, and whatever followed it, already read
    /// while looking for an HTTP/1.1 head) is read again first.
    pub(crate) async fn serve_h2c(
        self: &Arc<Self>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        conn: Connection,
        first: bytes::BytesMut,
    ) {
        let io = h2::Prefixed::new(first.freeze(), tcp);
        h2::serve(Arc::clone(self), io, peer, false, conn).await;
    }
}

/// HTTP/2 settings from `[edge.limits]`. The h2 crate also bounds what attackers use against
/// HTTP/2 servers: streams reset right after opening (rapid reset) are capped per connection, and
/// header blocks (CONTINUATION frames included) are bounded by the header-list size.
pub fn h2_options(limits: &Limits) -> ::h2::server::Builder {
    let mut options = ::h2::server::Builder::new();
    options
        .max_concurrent_streams(limits.h2_max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(256));
    options
}

/// The TLS listener's connections after Pingora's listener accepted them and rustls completed the
/// handshake: `h2` by ALPN goes to the HTTP/2 driver, everything else to the HTTP/1.1 loop.
pub struct TlsConnections {
    front: Arc<Front>,
    slots: Arc<ListenerSlots>,
}

impl TlsConnections {
    pub fn new(front: Arc<Front>) -> Self {
        Self {
            slots: ListenerSlots::new("https", front.metrics()),
            front,
        }
    }
}

#[async_trait]
impl ServerApp for TlsConnections {
    async fn process_new(
        self: &Arc<Self>,
        stream: pingora::protocols::Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<pingora::protocols::Stream> {
        let mut conn = self.front.admit(&self.slots, shutdown)?;
        let h2 = matches!(
            stream.selected_alpn_proto(),
            Some(pingora::protocols::ALPN::H2)
        );
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        // Counted on the connection's first request: a handshake that never carries a request
        // is not a served client.
        conn.handshake = stream.get_ssl_digest();
        if h2 {
            h2::serve(Arc::clone(&self.front), stream, peer, true, conn).await;
            return None;
        }
        h1::serve(
            Arc::clone(&self.front),
            h1::TlsStream(stream),
            peer,
            true,
            conn,
        )
        .await;
        None
    }
}

/// Pingora's TLS listener service, stopped on a fast shutdown as well as a graceful one.
///
/// Pingora's fast shutdown stops the worker runtimes without telling the services first, and its
/// accept loop runs on a worker thread other than the one whose I/O driver holds the listening
/// socket. When that driver stops first, every `accept` fails at once without yielding, so the
/// other worker spins in the loop and never gets to stop: the process hangs. `fast_stop` (set by
/// the edge before it asks Pingora for a fast shutdown) ends the accept loops first.
pub struct TlsListener {
    inner: pingora::services::listening::Service<TlsConnections>,
    fast_stop: tokio::sync::watch::Receiver<bool>,
}

impl TlsListener {
    pub fn new(
        inner: pingora::services::listening::Service<TlsConnections>,
        fast_stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self { inner, fast_stop }
    }
}

#[async_trait]
impl Service for TlsListener {
    async fn start_service(
        &mut self,
        fds: Option<pingora::server::ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let mut graceful = shutdown;
        let mut fast = self.fast_stop.clone();
        let serve = self.inner.start_service(fds, stopping, listeners_per_fd);
        tokio::pin!(serve);
        tokio::select! {
            () = &mut serve => return,
            // A closed sender means its side is gone: stop as well.
            _ = graceful.wait_for(|stop| *stop) => {}
            _ = fast.wait_for(|stop| *stop) => {}
        }
        stop.send_replace(true);
        serve.await;
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// The cleartext listener as a Pingora service: Pingora runs it on its worker threads and tells it
/// when to stop; the accept loop and everything after it are Meridian's.
pub struct PlainListener {
    listener: Option<std::net::TcpListener>,
    front: Arc<Front>,
    slots: Arc<ListenerSlots>,
}

impl PlainListener {
    /// `listener` is bound already, so a taken port fails the start with a clear error.
    pub fn new(listener: std::net::TcpListener, front: Arc<Front>) -> Self {
        Self {
            listener: Some(listener),
            slots: ListenerSlots::new("http", front.metrics()),
            front,
        }
    }
}

#[async_trait]
impl Service for PlainListener {
    async fn start_service(
        &mut self,
        _fds: Option<pingora::server::ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(std_listener) = self.listener.take() else {
            return;
        };
        let listener = match std_listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(std_listener))
        {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!("http listener: {e}");
                return;
            }
        };
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let Some(conn) = self.front.admit(&self.slots, &shutdown) else {
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    // The connection loop's future is spawned as it is (no wrapping block, which
                    // would keep a second copy of the socket and connection). Spread over the
                    // worker threads; each connection then stays on its thread.
                    let serve = h1::serve(Arc::clone(&self.front), tcp, peer, false, conn);
                    pingora_runtime::current_handle().spawn(serve);
                }
                Err(e) => {
                    // Out of descriptors or memory: accept fails at once until something is
                    // released, so back off instead of spinning.
                    tracing::warn!("http listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn name(&self) -> &str {
        "meridian http"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reload::{Process, SnapshotStore};

    fn front() -> Arc<Front> {
        let config = meridian_config::Config::from_toml_str(
            r#"
            schema = 1
            [[regions]]
            name = "r"
            location = { lat = 0.0, lon = 0.0 }
            upstreams = [{ address = "127.0.0.1:9", weight = 1 }]
            [[routes]]
            name = "a"
            hosts = ["a.test"]
            path_prefix = "/"
            kind = "api"
            regions = ["r"]
            default_region = "r"
            "#,
        )
        .expect("minimal config");
        let metrics = Arc::new(EdgeMetrics::new().expect("metrics"));
        let process = Process {
            metrics,
            cache: None,
            base_dir: None,
            pinned: None,
        };
        let meta = crate::core::SnapshotMeta {
            version: 1,
            hash: "one".into(),
        };
        let store = Arc::new(SnapshotStore::new(config, meta, process).expect("installs"));
        Front::new(Arc::new(Pipeline::new(store, None, None)))
    }

    /// What an idle kept-alive connection costs is mostly the size of its task's future: keep
    /// the whole connection future small (the request's own state is boxed separately).
    /// Measured at 352 bytes (debug build) when this bound was set. A lazily armed timeout on
    /// the idle wait made it 432 and cost about 250 bytes of RSS per idle connection (the task's
    /// allocation moved up a size class), so the bound is tight.
    #[tokio::test]
    async fn a_connection_future_stays_small() {
        let front = front();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (tcp, peer) = listener.accept().await.expect("accept");
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let slots = ListenerSlots::new("http", front.metrics());
        let conn = front.admit(&slots, &shutdown).expect("admitted");
        let plain = h1::serve(Arc::clone(&front), tcp, peer, false, conn);
        let size = std::mem::size_of_val(&plain);
        eprintln!("cleartext connection future: {size} bytes");
        assert!(size <= 384, "cleartext connection future is {size} bytes");
    }
}
