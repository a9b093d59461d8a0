//! What a front's driver provides to the pipeline: the request head, its body as it arrives, and a
//! way to write the response. TCP (h1/h2 through Pingora's session) and HTTP/3 (an h3 request
//! stream) each implement it once; everything else about a request is the pipeline's.

use std::future::Future;
use std::net::IpAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::metrics::Protocol;

/// The request head, borrowed from the driver. It is handed to the pipeline beside the
/// [`Downstream`], not borrowed through it: the head stays readable (the upstream request borrows
/// its fields) while the downstream is busy reading the body or writing interim answers.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl<'a> Head<'a> {
    /// The head of a request taken apart (HTTP/2, HTTP/3).
    pub fn of(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
        }
    }
}

/// Facts about the connection a request arrived on.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    /// The peer address of the connection (before `X-Forwarded-For`).
    pub peer: IpAddr,
    pub protocol: Protocol,
    /// The client reached the edge over TLS (or QUIC).
    pub tls: bool,
}

impl Arrival {
    /// What the client used to reach the edge (`X-Forwarded-Proto`, cache keys).
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// Why reading the request body stopped early.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBodyError(pub String);

/// One request's I/O as the driver sees it.
pub trait Downstream: Send {
    /// The next chunk of the request body; `None` at its end.
    fn read_body(&mut self) -> impl Future<Output = Result<Option<Bytes>, ClientBodyError>> + Send;

    /// Writes the response head; `end` when no body follows.
    fn send_head(
        &mut self,
        status: u16,
        headers: HeaderMap,
        end: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// [`Downstream::send_head`] with the edge's own `edge` fields, each replacing any field of
    /// its name in `headers`. A driver that encodes heads itself writes them after the map's
    /// fields instead of inserting them (a hashed insert each, for fields every response gets).
    fn send_head_with(
        &mut self,
        status: u16,
        mut headers: HeaderMap,
        edge: &[(&HeaderName, &HeaderValue)],
        end: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send {
        for &(name, value) in edge {
            headers.insert(name.clone(), value.clone());
        }
        self.send_head(status, headers, end)
    }

    /// Whether [`Downstream::send_prepared_head`] can write this response's head (HTTP/1.1).
    fn writes_prepared_heads(&self) -> bool {
        false
    }

    /// Writes a final head from header `lines` already in HTTP/1.1 form (`name: value\r\n` each;
    /// a stored response's, prepared once), then the `extra` fields and `Content-Length`; `end`
    /// when no body follows. Called only when [`Downstream::writes_prepared_heads`] says so.
    fn send_prepared_head(
        &mut self,
        status: u16,
        lines: &[u8],
        extra: &[(&[u8], &[u8])],
        content_length: u64,
        end: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send {
        let _ = (status, lines, extra, content_length, end);
        std::future::ready(Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this protocol writes heads from header maps",
        )))
    }

    /// Writes an interim (1xx) response ahead of the final one: an origin's `103 Early Hints`
    /// relayed as it arrives. Fronts whose stack cannot send one (or whose client must not get
    /// one) drop it: hints are optional.
    fn send_interim(
        &mut self,
        status: u16,
        headers: HeaderMap,
    ) -> impl Future<Output = std::io::Result<()>> + Send {
        let _ = (status, headers);
        std::future::ready(Ok(()))
    }

    /// Writes a chunk of the response body; `end` on the last one.
    fn send_body(
        &mut self,
        chunk: Bytes,
        end: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// The response body broke off after its head went out: cut the stream so the client sees an
    /// incomplete response, not a complete short one.
    fn abort(&mut self);

    /// Do not read another request from this connection after this response (h1 only).
    fn close_after(&mut self);

    /// Whether this request's connection can be handed to the protocol it asks to switch to
    /// (HTTP/1.1 `Upgrade`, e.g. WebSocket). HTTP/2 and HTTP/3 have no such switch.
    fn can_upgrade(&self) -> bool {
        false
    }

    /// Writes the `101` head, then relays bytes both ways between the client and `upstream`
    /// until either side is done or `idle` passes without a byte. Returns the bytes sent to the
    /// client; an error only when the head could not be written.
    fn tunnel(
        &mut self,
        headers: HeaderMap,
        upstream: crate::connector::Upgraded,
        idle: std::time::Duration,
    ) -> impl Future<Output = std::io::Result<u64>> + Send {
        let _ = (headers, upstream, idle);
        async {
            Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this protocol cannot switch protocols",
            ))
        }
    }
}
