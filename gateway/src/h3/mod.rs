//! The HTTP/3 driver: quinn + h3 on UDP at the HTTPS address, beside Pingora (which has no HTTP/3
//! server). It accepts connections and request streams and hands each request to the one
//! [`Pipeline`], exactly as the TCP driver does: routing, limits, cache, inference, tries, edge
//! answers, metrics and access logs are the pipeline's, so HTTP/3 behaves like h1/h2 by construction.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request, Response, StatusCode};
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
    let max_connections = limits.max_connections;
    runtime.spawn(async move {
        serve(endpoint, pipeline, max_connections, stop_rx, drain).await;
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

async fn serve(
    endpoint: quinn::Endpoint,
    pipeline: Arc<Pipeline>,
    max_connections: usize,
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
        if endpoint.open_connections() >= max_connections {
            incoming.refuse();
            continue;
        }
        let pipeline = Arc::clone(&pipeline);
        let stop = stop.clone();
        connections.spawn(async move {
            match incoming.await {
                Ok(conn) => serve_connection(conn, pipeline, stop).await,
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
                requests.spawn(async move {
                    match resolver.resolve_request().await {
                        Ok((req, stream)) => {
                            let arrival = Arrival {
                                peer,
                                protocol: Protocol::H3,
                                tls: true,
                            };
                            let mut downstream = H3Downstream { req, stream };
                            pipeline.serve(&mut downstream, arrival).await;
                            let _ = downstream.stream.finish().await;
                        }
                        Err(e) => tracing::debug!("HTTP/3 request from {peer}: {e}"),
                    }
                });
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
    req: Request<()>,
    stream: RequestStream,
}

impl Downstream for H3Downstream {
    fn head(&self) -> Head<'_> {
        Head {
            method: self.req.method(),
            uri: self.req.uri(),
            headers: self.req.headers(),
        }
    }

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
