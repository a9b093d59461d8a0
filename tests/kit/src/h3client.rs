//! The project's HTTP/3 client (quinn + h3), shared by the test harness (`meridian-tests`) and the
//! load generator (`meridian-loadtest`). It binds a chosen source address, so a QUIC request can
//! come from any test-world country (`127.12.0.5` is Singapore), and it streams responses: the
//! head first, then the body one chunk at a time (SSE clients time the first chunk).
//!
//! One [`H3Client`] is one QUIC connection. Its [`H3Sender`] is cheap to clone: every clone opens
//! request streams on the same connection (like an HTTP/2 client handle), so several request
//! lanes can share one connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode};

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
type RequestStream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Application error code sent in CONNECTION_CLOSE by [`H3Client::close`] (`H3_NO_ERROR`).
const H3_NO_ERROR: u32 = 0x100;

#[derive(Debug, thiserror::Error)]
pub enum H3ClientError {
    #[error("TLS client config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC client config: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {target}: {source}")]
    Connect {
        target: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("QUIC handshake with {target}: {source}")]
    Handshake {
        target: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("HTTP/3 connection: {0}")]
    Connection(#[from] h3::error::ConnectionError),
    #[error("HTTP/3 stream: {0}")]
    Stream(#[from] h3::error::StreamError),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
}

/// A rustls client config for HTTP/3 (ALPN `h3`, TLS 1.3 only, the ring provider explicitly, so
/// no process-wide provider is needed) that trusts `roots`.
pub fn client_config(roots: rustls::RootCertStore) -> Result<quinn::ClientConfig, H3ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// One QUIC connection carrying HTTP/3 requests, from its own UDP socket.
pub struct H3Client {
    sender: H3Sender,
    driver: tokio::task::JoinHandle<()>,
}

impl H3Client {
    /// Binds a UDP socket on `source` (any port), connects to `target` presenting `server_name`
    /// as SNI, and completes the QUIC and HTTP/3 (SETTINGS) handshakes.
    pub async fn connect(
        source: IpAddr,
        target: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> Result<Self, H3ClientError> {
        let bind = SocketAddr::new(source, 0);
        let mut endpoint = quinn::Endpoint::client(bind)
            .map_err(|source| H3ClientError::Bind { addr: bind, source })?;
        endpoint.set_default_client_config(config);
        let connecting = endpoint
            .connect(target, server_name)
            .map_err(|source| H3ClientError::Connect { target, source })?;
        let connection = connecting
            .await
            .map_err(|source| H3ClientError::Handshake { target, source })?;
        let (mut driver, send) =
            h3::client::new(h3_quinn::Connection::new(connection.clone())).await?;
        // The connection driver (control stream, QPACK, GOAWAY) must be polled for as long as
        // the connection lives; it ends when the connection closes.
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Self {
            sender: H3Sender {
                send,
                connection,
                endpoint,
            },
            driver,
        })
    }

    /// A handle that sends requests on this connection; clone it to share the connection.
    pub fn sender(&self) -> H3Sender {
        self.sender.clone()
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.sender.endpoint
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.sender.connection
    }

    /// One request on this connection, body collected (see [`H3Sender::request`]).
    pub async fn request(
        &mut self,
        request: Request<()>,
        body: Option<Bytes>,
    ) -> Result<Response<Bytes>, H3ClientError> {
        self.sender.request(request, body).await
    }

    /// Closes the connection politely (`H3_NO_ERROR`) and waits until the peer acknowledged it
    /// (or the close timed out), so the server sees a clean close rather than an idle timeout.
    pub async fn close(self) {
        self.sender.close();
        self.sender.endpoint.wait_idle().await;
        self.driver.abort();
    }
}

/// Sends requests on one HTTP/3 connection. Clones share the connection.
#[derive(Clone)]
pub struct H3Sender {
    send: SendRequest,
    connection: quinn::Connection,
    // Kept so the UDP socket outlives every handle to the connection.
    endpoint: quinn::Endpoint,
}

impl H3Sender {
    /// Sends the request head and then `body` (if any), finishes the request stream, and waits
    /// for the response head. The body is read from the returned [`H3Response`].
    /// `request`'s URI must be absolute (`https://host/path`): it gives `:scheme`, `:authority`
    /// and `:path`.
    pub async fn send(
        &mut self,
        request: Request<()>,
        body: Option<Bytes>,
    ) -> Result<H3Response, H3ClientError> {
        let mut stream = self.send.send_request(request).await?;
        let sent = async {
            if let Some(body) = body.filter(|b| !b.is_empty()) {
                stream.send_data(body).await?;
            }
            stream.finish().await
        }
        .await;
        // A server may answer before it read the whole request and then stop reading
        // (STOP_SENDING, RFC 9114 §4.1): the response still counts, so read it even when sending
        // failed; report the send error only when no response came.
        loop {
            match stream.recv_response().await {
                // Interim answers (103 Early Hints) come first; the final head follows.
                Ok(head) if head.status().is_informational() => continue,
                Ok(head) => return Ok(H3Response { head, stream }),
                Err(e) => return Err(sent.err().map_or(e.into(), Into::into)),
            }
        }
    }

    /// One request with the response body collected.
    pub async fn request(
        &mut self,
        request: Request<()>,
        body: Option<Bytes>,
    ) -> Result<Response<Bytes>, H3ClientError> {
        self.send(request, body).await?.collect().await
    }

    /// Whether the connection is gone (closed by either side, or timed out).
    pub fn is_closed(&self) -> bool {
        self.connection.close_reason().is_some()
    }

    /// Closes the connection now (`H3_NO_ERROR`) without waiting for the peer: requests still in
    /// flight on any clone fail.
    pub fn close(&self) {
        self.connection.close(H3_NO_ERROR.into(), b"done");
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }
}

/// A response whose head has arrived; the body follows chunk by chunk.
pub struct H3Response {
    head: Response<()>,
    stream: RequestStream,
}

impl H3Response {
    pub fn status(&self) -> StatusCode {
        self.head.status()
    }

    pub fn headers(&self) -> &HeaderMap {
        self.head.headers()
    }

    pub fn version(&self) -> http::Version {
        self.head.version()
    }

    /// The next body chunk as it arrives, `None` at the end of the body.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, H3ClientError> {
        match self.stream.recv_data().await? {
            // h3-quinn hands out `Bytes`, so this is not a copy.
            Some(mut buf) => Ok(Some(buf.copy_to_bytes(buf.remaining()))),
            None => Ok(None),
        }
    }

    /// Reads the rest of the body.
    pub async fn collect(mut self) -> Result<Response<Bytes>, H3ClientError> {
        let mut body = BytesMut::new();
        while let Some(chunk) = self.chunk().await? {
            body.extend_from_slice(&chunk);
        }
        Ok(self.head.map(|()| body.freeze()))
    }
}
