//! HTTP clients that choose their source address (the test world places clients by it).

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpSocket;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
    /// The region that served the request, as the edge says.
    pub fn region(&self) -> Option<&str> {
        self.header("x-meridian-region")
    }
}

#[derive(Clone)]
pub struct Client {
    target: SocketAddr,
}

impl Client {
    pub fn new(target: SocketAddr) -> Self {
        Self { target }
    }

    /// One request on a fresh connection from `source`.
    #[allow(clippy::too_many_arguments)]
    pub async fn request(
        &self,
        protocol: Protocol,
        source: IpAddr,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<Reply> {
        let socket = if source.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(self.target).await?;
        let io = TokioIo::new(stream);
        let mut builder = Request::builder().method(method);
        builder = match protocol {
            Protocol::Http1 => builder.uri(path).header("host", host),
            Protocol::H2c => builder.uri(format!("http://{host}{path}")),
        };
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(Bytes::from(body)))?;
        exchange(io, protocol == Protocol::H2c, request).await
    }
}

/// One request on a fresh connection over `io` (HTTP/1.1, or HTTP/2 with prior knowledge/ALPN);
/// any request body (a test may send one that never ends).
pub async fn exchange<IO, B>(io: IO, http2: bool, request: Request<B>) -> anyhow::Result<Reply>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let response = if http2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    };
    Reply::read(response).await
}

impl Reply {
    /// A `GET /hello` on `api.example.test` from `place` was answered by the origin of the
    /// place's expected region through this edge (`local-1`); `via` names the protocol in messages.
    pub fn assert_routed_for(
        &self,
        place: &meridian_geoip::test_world::Place,
        via: &dyn std::fmt::Debug,
    ) {
        assert_eq!(
            self.status,
            200,
            "{} over {via:?}: {}",
            place.country,
            self.text()
        );
        assert_eq!(
            self.region(),
            Some(place.expected_region),
            "{} over {via:?}",
            place.country
        );
        assert_eq!(self.header("x-meridian-pop"), Some("local-1"));
        let body = self.json();
        assert_eq!(
            body["region"], place.expected_region,
            "the origin of that region answered"
        );
        assert_eq!(body["path"], "/hello");
    }

    /// Reads a whole response.
    pub async fn read(response: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Reply> {
        let status = response.status().as_u16();
        let version = response.version();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
            version,
        })
    }
}

/// One HTTP/1.1 keep-alive connection, reused for every request (a reset shows up as an error).
pub struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn keep_alive(&self, source: IpAddr) -> anyhow::Result<KeepAlive> {
        let socket = if source.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(self.target).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(KeepAlive { sender })
    }
}

impl KeepAlive {
    pub async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<Reply> {
        self.sender.ready().await?;
        let request = Request::builder()
            .uri(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))?;
        let response = self.sender.send_request(request).await?;
        Reply::read(response).await
    }
}
