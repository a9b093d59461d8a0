//! The TCP front's driver for HTTP/1.1 and HTTP/2 (cleartext and TLS): Pingora reads the request
//! head and owns the connection (listeners, TLS, h2, keep-alive, graceful shutdown); each request is
//! handed whole to the one [`Pipeline`] in `request_filter`, exactly as the HTTP/3 driver does, so
//! both fronts behave the same by construction. Pingora's own upstream machinery is not used: every
//! try goes through Meridian's connector.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderMap;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora_error::ErrorType;
use pingora_http::ResponseHeader;

use crate::pipeline::{Arrival, ClientBodyError, Downstream, Head, Pipeline};

pub struct EdgeProxy {
    pipeline: Arc<Pipeline>,
}

impl EdgeProxy {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self { pipeline }
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let connection = crate::tls::Downstream::of(session, self.pipeline.store.metrics());
        let arrival = Arrival {
            peer: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip())
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            protocol: connection.protocol,
            tls: connection.tls,
        };
        let mut downstream = PingoraDownstream {
            session,
            aborted: false,
        };
        self.pipeline.serve(&mut downstream, arrival).await;
        if downstream.aborted {
            // An error (not `Ok(true)`) makes Pingora drop the connection without finishing the
            // response body: the client sees a cut response, not a complete short one.
            return Error::e_explain(ErrorType::ReadError, "upstream response body broke off");
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // Every request is answered in `request_filter`.
        Error::e_explain(
            ErrorType::InternalError,
            "the pipeline answers every request",
        )
    }
}

/// A Pingora session as the pipeline's [`Downstream`].
struct PingoraDownstream<'a> {
    session: &'a mut Session,
    aborted: bool,
}

impl Downstream for PingoraDownstream<'_> {
    fn head(&self) -> Head<'_> {
        let req = self.session.req_header();
        Head {
            method: &req.method,
            uri: &req.uri,
            headers: &req.headers,
        }
    }

    async fn read_body(&mut self) -> std::result::Result<Option<Bytes>, ClientBodyError> {
        self.session
            .read_request_body()
            .await
            .map_err(|e| ClientBodyError(e.to_string()))
    }

    async fn send_head(
        &mut self,
        status: u16,
        mut headers: HeaderMap,
        end: bool,
    ) -> std::io::Result<()> {
        let no_body = end
            || matches!(status, 100..=199 | 204 | 304)
            || self.session.req_header().method == http::Method::HEAD;
        if !no_body
            && !headers.contains_key(http::header::CONTENT_LENGTH)
            && !self.session.is_http2()
        {
            // HTTP/1.1 without a length: chunked, so the connection can be kept alive.
            headers.insert(
                http::header::TRANSFER_ENCODING,
                http::HeaderValue::from_static("chunked"),
            );
        }
        // The map moves into Pingora's header as it is: no per-header copy (a case-preserving
        // `ResponseHeader` would copy every name).
        let mut response = http::Response::new(());
        *response.status_mut() =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        *response.headers_mut() = headers;
        let response = ResponseHeader::from(response.into_parts().0);
        self.session
            .write_response_header(Box::new(response), end)
            .await
            .map_err(io_error)
    }

    async fn send_body(&mut self, chunk: Bytes, end: bool) -> std::io::Result<()> {
        self.session
            .write_response_body(Some(chunk), end)
            .await
            .map_err(io_error)
    }

    fn abort(&mut self) {
        self.session.set_keepalive(None);
        self.aborted = true;
    }

    fn close_after(&mut self) {
        self.session.set_keepalive(None);
    }
}

fn io_error(e: Box<Error>) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
