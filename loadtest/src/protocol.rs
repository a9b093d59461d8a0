//! Connections per protocol. A protocol is a variant of `Protocol`; each has a connector that turns a
//! (source address, target) into a `Conn` that can send requests. HTTP/3 is a declared variant that
//! is refused at start-up until the project's shared h3 client exists.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

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

/// One open connection; HTTP/2 connections can be shared by several request lanes.
pub enum Conn {
    Http1(hyper::client::conn::http1::SendRequest<ReqBody>),
    Http2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

impl Conn {
    pub fn share(&self) -> Option<Conn> {
        match self {
            Conn::Http1(_) => None,
            Conn::Http2(s) => Some(Conn::Http2(s.clone())),
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Conn::Http1(s) => s.is_closed(),
            Conn::Http2(s) => s.is_closed(),
        }
    }

    pub async fn send(&mut self, request: Request<ReqBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            Conn::Http1(s) => {
                s.ready().await?;
                s.send_request(request).await
            }
            Conn::Http2(s) => {
                s.ready().await?;
                s.send_request(request).await
            }
        }
    }
}

pub struct Connector {
    pub protocol: Protocol,
    pub target: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(
        protocol: Protocol,
        target: SocketAddr,
        tls: Option<TlsSettings<'_>>,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        if protocol == Protocol::Http3 {
            bail!(
                "--protocol h3 is not available yet: it will use the project's shared HTTP/3 client \
                 (quinn + h3) once that exists; use h1 or h2 for now"
            );
        }
        let tls = match tls {
            None => None,
            Some(settings) => Some(tls_connector(protocol, settings)?),
        };
        Ok(Self {
            protocol,
            target,
            tls,
            connect_timeout,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub async fn connect(&self, source: Option<IpAddr>) -> Result<Conn, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, self.connect_inner(source)).await {
            Ok(result) => result.map_err(|e| ConnectError::Failed(format!("{e:#}"))),
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    async fn connect_inner(&self, source: Option<IpAddr>) -> anyhow::Result<Conn> {
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
        match &self.tls {
            None => handshake(self.protocol, stream).await,
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), stream).await?;
                handshake(self.protocol, stream).await
            }
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
        Protocol::Http3 => bail!("h3 is pending"),
    }
}

pub struct TlsSettings<'a> {
    pub cacert: Option<&'a Path>,
    pub server_name: String,
}

fn tls_connector(
    protocol: Protocol,
    settings: TlsSettings<'_>,
) -> anyhow::Result<(TlsConnector, ServerName<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    let path = settings.cacert.context(
        "https:// targets need --cacert FILE (the CA that signed the server certificate)",
    )?;
    for cert in
        CertificateDer::pem_file_iter(path).with_context(|| format!("read {}", path.display()))?
    {
        roots.add(cert.with_context(|| format!("parse {}", path.display()))?)?;
    }
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
