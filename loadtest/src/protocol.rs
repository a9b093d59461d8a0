//! Connections per protocol. A protocol is a variant of `Protocol`; each has a connector that turns a
//! (source address, target) into a `Conn` that can send requests, and every protocol answers with
//! the same `Reply` view (status, headers, body chunks), so the engine has one request loop.
//! HTTP/3 uses the project's shared client (`meridian_testkit::h3client`). Cleartext HTTP/1.1 load
//! runs use the lean client (`h1lean`) instead of hyper's: those connections are driven by the
//! engine directly, not through `send`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meridian_testkit::h3client::{H3Client, H3Response, H3Sender};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::h1lean::LeanConn;

pub type ReqBody = Full<Bytes>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Http3,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "h1",
            Protocol::Http2 => "h2",
            Protocol::Http3 => "h3",
        }
    }
    /// Whether a request URI carries scheme and authority (HTTP/2+), or only the path (HTTP/1.1).
    pub fn absolute_uri(self) -> bool {
        !matches!(self, Protocol::Http1)
    }
}

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Failed(String),
}

/// One open connection; HTTP/2 and HTTP/3 connections can be shared by several request lanes.
pub enum Conn {
    Http1(hyper::client::conn::http1::SendRequest<ReqBody>),
    Http2(hyper::client::conn::http2::SendRequest<ReqBody>),
    Http3(H3Sender),
    Lean(LeanConn),
}

impl Conn {
    pub fn share(&self) -> Option<Conn> {
        match self {
            Conn::Http1(_) | Conn::Lean(_) => None,
            Conn::Http2(s) => Some(Conn::Http2(s.clone())),
            Conn::Http3(s) => Some(Conn::Http3(s.clone())),
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Conn::Http1(s) => s.is_closed(),
            Conn::Http2(s) => s.is_closed(),
            Conn::Http3(s) => s.is_closed(),
            Conn::Lean(c) => c.is_closed(),
        }
    }

    /// Sends `request` and waits for the response head; the body is read from the `Reply`.
    pub async fn send(&mut self, request: Request<Bytes>) -> anyhow::Result<Reply> {
        match self {
            Conn::Http1(s) => {
                s.ready().await?;
                Ok(Reply::Hyper(s.send_request(request.map(Full::new)).await?))
            }
            Conn::Http2(s) => {
                s.ready().await?;
                Ok(Reply::Hyper(s.send_request(request.map(Full::new)).await?))
            }
            Conn::Http3(s) => {
                let (parts, body) = request.into_parts();
                let head = Request::from_parts(parts, ());
                Ok(Reply::Http3(Box::new(s.send(head, Some(body)).await?)))
            }
            Conn::Lean(_) => bail!("a lean HTTP/1.1 connection is driven by h1lean, not send"),
        }
    }

    /// Ends the connection now (`--reconnect`): TCP connections close when their last handle is
    /// dropped; a QUIC connection is told so (CONNECTION_CLOSE), or the server would keep it
    /// until its idle timeout.
    pub fn close(self) {
        if let Conn::Http3(s) = self {
            s.close();
        }
    }
}

/// A response whose head has arrived, whatever the protocol.
pub enum Reply {
    Hyper(Response<Incoming>),
    // Boxed: an h3 request stream is several times the size of a hyper response.
    Http3(Box<H3Response>),
}

impl Reply {
    pub fn status(&self) -> u16 {
        match self {
            Reply::Hyper(r) => r.status().as_u16(),
            Reply::Http3(r) => r.status().as_u16(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&HeaderValue> {
        match self {
            Reply::Hyper(r) => r.headers().get(name),
            Reply::Http3(r) => r.headers().get(name),
        }
    }

    /// The next non-empty body chunk as it arrives; `None` at the end of the body.
    pub async fn chunk(&mut self) -> anyhow::Result<Option<Bytes>> {
        loop {
            let chunk = match self {
                Reply::Hyper(r) => match r.body_mut().frame().await {
                    None => return Ok(None),
                    // Trailers and other non-data frames carry no body bytes.
                    Some(frame) => frame?.into_data().unwrap_or_default(),
                },
                Reply::Http3(r) => match r.chunk().await? {
                    None => return Ok(None),
                    Some(data) => data,
                },
            };
            if !chunk.is_empty() {
                return Ok(Some(chunk));
            }
        }
    }
}

pub struct Connector {
    pub protocol: Protocol,
    pub target: SocketAddr,
    transport: Transport,
    connect_timeout: Duration,
}

enum Transport {
    Tcp,
    Tls(TlsConnector, ServerName<'static>),
    Quic(quinn::ClientConfig, String),
}

impl Connector {
    pub fn new(
        protocol: Protocol,
        target: SocketAddr,
        tls: Option<TlsSettings<'_>>,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let transport = match (protocol, tls) {
            (Protocol::Http3, None) => {
                bail!("--protocol h3 needs an https:// URL (HTTP/3 runs over QUIC, always TLS)")
            }
            (Protocol::Http3, Some(settings)) => {
                let roots = load_roots(settings.cacert)?;
                let config = meridian_testkit::h3client::client_config(roots)
                    .context("HTTP/3 client config")?;
                // Checked here so a bad name fails at start-up, not on every connect.
                ServerName::try_from(settings.server_name.clone())
                    .with_context(|| format!("bad TLS server name {:?}", settings.server_name))?;
                Transport::Quic(config, settings.server_name)
            }
            (_, None) => Transport::Tcp,
            (_, Some(settings)) => {
                let (connector, name) = tls_connector(protocol, settings)?;
                Transport::Tls(connector, name)
            }
        };
        Ok(Self {
            protocol,
            target,
            transport,
            connect_timeout,
        })
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self.transport, Transport::Tcp)
    }

    pub async fn connect(&self, source: Option<IpAddr>) -> Result<Conn, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, self.connect_inner(source)).await {
            Ok(result) => result.map_err(|e| ConnectError::Failed(format!("{e:#}"))),
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    /// A cleartext HTTP/1.1 connection for the lean client (`h1lean`).
    pub async fn connect_lean(&self, source: Option<IpAddr>) -> Result<Conn, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, self.tcp(source)).await {
            Ok(Ok(stream)) => Ok(Conn::Lean(LeanConn::new(stream))),
            Ok(Err(e)) => Err(ConnectError::Failed(format!("{e:#}"))),
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    /// A TCP connection to the target from `source`, Nagle off (requests are written whole).
    async fn tcp(&self, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
        let socket = if self.target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(source) = source {
            socket
                .bind(SocketAddr::new(source, 0))
                .with_context(|| format!("bind {source}"))?;
        }
        let stream = socket.connect(self.target).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn connect_inner(&self, source: Option<IpAddr>) -> anyhow::Result<Conn> {
        if let Transport::Quic(config, server_name) = &self.transport {
            let source = source.unwrap_or(if self.target.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            });
            let client =
                H3Client::connect(source, self.target, server_name, config.clone()).await?;
            // The client's connection driver runs on its own task; the sender is all a lane needs.
            return Ok(Conn::Http3(client.sender()));
        }
        let stream = self.tcp(source).await?;
        match &self.transport {
            Transport::Tls(connector, name) => {
                let stream = connector.connect(name.clone(), stream).await?;
                handshake(self.protocol, stream).await
            }
            _ => handshake(self.protocol, stream).await,
        }
    }
}

async fn handshake<T>(protocol: Protocol, io: T) -> anyhow::Result<Conn>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    match protocol {
        Protocol::Http1 => {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Ok(Conn::Http1(sender))
        }
        Protocol::Http2 => {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Ok(Conn::Http2(sender))
        }
        Protocol::Http3 => bail!("HTTP/3 runs over QUIC, not TCP"),
    }
}

pub struct TlsSettings<'a> {
    pub cacert: Option<&'a Path>,
    pub server_name: String,
}

fn load_roots(cacert: Option<&Path>) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let path = cacert.context(
        "https:// targets need --cacert FILE (the CA that signed the server certificate)",
    )?;
    for cert in
        CertificateDer::pem_file_iter(path).with_context(|| format!("read {}", path.display()))?
    {
        roots.add(cert.with_context(|| format!("parse {}", path.display()))?)?;
    }
    Ok(roots)
}

fn tls_connector(
    protocol: Protocol,
    settings: TlsSettings<'_>,
) -> anyhow::Result<(TlsConnector, ServerName<'static>)> {
    let roots = load_roots(settings.cacert)?;
    // The ring provider explicitly: no process-wide provider needed, no aws-lc-rs.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = match protocol {
        Protocol::Http2 => vec![b"h2".to_vec()],
        _ => vec![b"http/1.1".to_vec()],
    };
    let name = ServerName::try_from(settings.server_name.clone())
        .with_context(|| format!("bad TLS server name {:?}", settings.server_name))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}
