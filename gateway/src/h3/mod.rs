//! The HTTP/3 driver: quinn + h3 on UDP at the HTTPS address, beside Pingora (which has no HTTP/3
//! server). It accepts connections and request streams and hands each request to the one
//! [`Pipeline`], exactly as the TCP driver does: routing, limits, cache, inference, tries, edge
//! answers, metrics and access logs are the pipeline's, so HTTP/3 behaves like h1/h2 by construction.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, Response, StatusCode};
use meridian_config::H3Limits;
use tokio::sync::watch;

use crate::metrics::Protocol;
use crate::pipeline::{Arrival, ClientBodyError, Downstream, Head, Pipeline};
use crate::tls::{CertResolver, TlsError};

type RequestStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// A running HTTP/3 front. `shutdown` sends GOAWAY on every connection and waits for in-flight
/// requests (bounded), then closes the endpoint.
pub struct H3Front {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    done: Option<std::sync::mpsc::Receiver<()>>,
}

/// Binds the UDP socket now (so the caller knows it listens) and serves on `runtime`.
pub fn start(
    runtime: &tokio::runtime::Handle,
    addr: SocketAddr,
    resolver: Arc<CertResolver>,
    limits: &H3Limits,
    pipeline: Arc<Pipeline>,
    drain: Duration,
) -> Result<H3Front, std::io::Error> {
    let tls = crate::tls::quic_server_config(resolver).map_err(io_error)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| io_error(TlsError::Setup(e.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(limits.max_streams.into());
    // HTTP/3 control and QPACK streams (three per side), plus room for extensions we ignore.
    transport.max_concurrent_uni_streams(16u32.into());
    // Bounded buffering: quinn's defaults let one connection hold ~125 MB of unread data.
    transport.stream_receive_window(limits.stream_receive_window.into());
    transport.receive_window(limits.connection_receive_window.into());
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(limits.idle_timeout.as_duration())
            .map_err(|e| io_error(TlsError::Setup(e.to_string())))?,
    ));
    config.transport_config(Arc::new(transport));
    let socket = std::net::UdpSocket::bind(addr)?;
    let endpoint = {
        let _guard = runtime.enter();
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?
    };
    let addr = endpoint.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let (done_tx, done) = std::sync::mpsc::channel();
    let admission = Admission {
        max_connections: limits.max_connections,
        retry_above: limits.retry_above,
        per_address: limits.max_connections_per_address,
        header_timeout: limits.stream_header_timeout.as_duration(),
        open: Arc::default(),
    };
    runtime.spawn(async move {
        serve(endpoint, pipeline, admission, stop_rx, drain).await;
        let _ = done_tx.send(());
    });
    Ok(H3Front {
        addr,
        stop,
        done: Some(done),
    })
}

impl H3Front {
    /// GOAWAY to every client, then wait (at most `drain` plus a little) for in-flight requests.
    pub fn shutdown(&mut self, wait: bool) {
        self.stop.send_replace(true);
        if let (true, Some(done)) = (wait, self.done.take()) {
            let _ = done.recv_timeout(Duration::from_secs(30));
        }
    }
}

impl Drop for H3Front {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn io_error(e: TlsError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Who may open a connection: the connection caps (total and per client address) and when a
/// client must first prove its address with a Retry.
struct Admission {
    max_connections: usize,
    retry_above: usize,
    per_address: usize,
    header_timeout: Duration,
    /// Connections (handshaking or open) per client IP address.
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// Counts a connection against its client address until dropped.
struct AddressSlot {
    ip: std::net::IpAddr,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl Admission {
    /// A slot for a new connection from `ip`, unless that address already has its share.
    fn slot(&self, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.per_address {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            ip,
            open: Arc::clone(&self.open),
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn serve(
    endpoint: quinn::Endpoint,
    pipeline: Arc<Pipeline>,
    admission: Admission,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(incoming) = incoming else { break };
        let open = endpoint.open_connections();
        if open >= admission.max_connections {
            incoming.refuse();
            continue;
        }
        // Under load (or always, with retry_above = 0) a client proves it owns its address
        // before it gets a connection slot: spoofed Initials cost one stateless packet each.
        if !incoming.remote_address_validated() && open >= admission.retry_above {
            if incoming.may_retry() {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
            } else {
                incoming.refuse();
            }
            continue;
        }
        let Some(slot) = admission.slot(incoming.remote_address().ip()) else {
            incoming.refuse();
            continue;
        };
        let pipeline = Arc::clone(&pipeline);
        let stop = stop.clone();
        let header_timeout = admission.header_timeout;
        connections.spawn(async move {
            let _slot = slot;
            match incoming.await {
                Ok(conn) => serve_connection(conn, pipeline, stop, header_timeout).await,
                Err(e) => tracing::debug!("QUIC handshake failed: {e}"),
            }
        });
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    // Shutting down: connections have sent GOAWAY and finish their requests, within `drain`.
    let _ = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    endpoint.close(quinn::VarInt::from_u32(0x100), b"shutting down"); // H3_NO_ERROR
    endpoint.wait_idle().await;
}

async fn serve_connection(
    conn: quinn::Connection,
    pipeline: Arc<Pipeline>,
    mut stop: watch::Receiver<bool>,
    header_timeout: Duration,
) {
    let metrics = pipeline.store.metrics();
    metrics.tls.quic_connections.inc();
    let _open = GaugeGuard(metrics.tls.quic_connections.clone());
    metrics
        .tls
        .handshakes
        .with_label_values(&["TLSv1.3", "h3"])
        .inc();
    let peer = conn.remote_address().ip();
    // Advertise room above the edge limit (RFC 9114 counts 32 bytes per field on top of names and
    // values) so that an oversized request reaches our own check and gets the same 431 as h1/h2,
    // instead of being refused by the client library; QPACK decoding stays bounded by this.
    let limits = pipeline.store.load().snapshot.limits.clone();
    let max_field_section_size =
        (limits.max_header_bytes as u64 + 32 * limits.max_headers as u64).saturating_mul(2);
    let mut h3conn = match h3::server::builder()
        .max_field_section_size(max_field_section_size)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("HTTP/3 setup with {peer}: {e}");
            return;
        }
    };
    let mut requests = tokio::task::JoinSet::new();
    let mut closing = false;
    loop {
        let next = tokio::select! {
            next = h3conn.accept() => next,
            changed = stop.changed(), if !closing => {
                let stopping = changed.is_err() || *stop.borrow();
                if !stopping {
                    continue;
                }
                closing = true;
                // GOAWAY: no new requests; those accepted so far complete.
                if let Err(e) = h3conn.shutdown(0).await {
                    tracing::debug!("GOAWAY to {peer}: {e}");
                }
                continue;
            }
        };
        match next {
            Ok(Some(resolver)) => {
                let pipeline = Arc::clone(&pipeline);
                // Boxed in place: spawning the request's future by value would copy all of it.
                requests.spawn(crate::pipeline::boxed_in_place(|| async move {
                    // A stream that opens and never sends its headers would hold a stream
                    // slot for the connection's life.
                    let resolved = match tokio::time::timeout(
                        header_timeout,
                        resolver.resolve_request(),
                    )
                    .await
                    {
                        Ok(resolved) => resolved,
                        Err(_) => {
                            tracing::debug!("HTTP/3 request headers from {peer} timed out");
                            return;
                        }
                    };
                    match resolved {
                        Ok((req, stream)) => {
                            let arrival = Arrival {
                                peer,
                                protocol: Protocol::H3,
                                tls: true,
                            };
                            let (parts, ()) = req.into_parts();
                            let mut downstream = H3Downstream { stream };
                            pipeline
                                .serve(Head::of(&parts), &mut downstream, arrival)
                                .await;
                            let _ = downstream.stream.finish().await;
                        }
                        Err(e) => tracing::debug!("HTTP/3 request from {peer}: {e}"),
                    }
                }));
                while requests.try_join_next().is_some() {}
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("HTTP/3 connection with {peer}: {e}");
                break;
            }
        }
    }
    while requests.join_next().await.is_some() {}
}

struct GaugeGuard(prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An h3 request stream as the pipeline's [`Downstream`].
struct H3Downstream {
    stream: RequestStream,
}

impl Downstream for H3Downstream {
    async fn read_body(&mut self) -> Result<Option<Bytes>, ClientBodyError> {
        match self.stream.recv_data().await {
            Ok(Some(mut chunk)) => Ok(Some(chunk.copy_to_bytes(chunk.remaining()))),
            Ok(None) => Ok(None),
            Err(e) => Err(ClientBodyError(e.to_string())),
        }
    }

    async fn send_head(
        &mut self,
        status: u16,
        headers: HeaderMap,
        _end: bool,
    ) -> std::io::Result<()> {
        let mut response = Response::new(());
        *response.status_mut() =
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        *response.headers_mut() = headers;
        self.stream
            .send_response(response)
            .await
            .map_err(std::io::Error::other)
    }

    async fn send_interim(&mut self, status: u16, headers: HeaderMap) -> std::io::Result<()> {
        // An interim response is one more HEADERS frame before the final one (RFC 9114 §4.1).
        self.send_head(status, headers, false).await
    }

    async fn send_body(&mut self, chunk: Bytes, _end: bool) -> std::io::Result<()> {
        if chunk.is_empty() {
            return Ok(()); // the stream ends when the driver finishes it
        }
        self.stream
            .send_data(chunk)
            .await
            .map_err(std::io::Error::other)
    }

    fn abort(&mut self) {
        self.stream.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
    }

    fn close_after(&mut self) {
        // Each HTTP/3 request has its own stream: nothing to close.
    }
}
