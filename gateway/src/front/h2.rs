//! HTTP/2 on the `h2` crate: TLS connections that chose `h2` by ALPN and cleartext ones that opened
//! with the HTTP/2 preface (h2c by prior knowledge). Each stream is one request handed to the one
//! [`Pipeline`] as a [`Downstream`], as the HTTP/1.1 loop and the HTTP/3 driver do.
//!
//! The connection is bounded like an HTTP/1.1 one: the first request is due within the header
//! timeout of the accept, a connection without open streams is closed (GOAWAY) after the
//! keep-alive time, and a shutdown sends GOAWAY and lets the streams in flight finish. The h2
//! crate bounds the rest (concurrent streams, header-list size, streams reset right after opening).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::Protocol;
use crate::pipeline::{Arrival, ClientBodyError, Downstream, Head};

use super::{ConnLimits, Connection, Front, Timeout};

/// Serves one HTTP/2 connection to its end.
pub async fn serve<T>(front: Arc<Front>, io: T, peer: SocketAddr, tls: bool, mut conn: Connection)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = conn.limits;
    let builder = {
        let loaded = front.pipeline.store.load();
        super::h2_options(&loaded.snapshot.limits)
    };
    let first_due = conn.accepted + limits.header_timeout();
    let mut h2 = match tokio::time::timeout_at(first_due, builder.handshake::<_, Bytes>(io)).await {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => {
            tracing::debug!("HTTP/2 handshake with {peer}: {e}");
            return;
        }
        Err(_) => {
            front.metrics().timeout(Timeout::Header);
            return;
        }
    };
    let arrival = Arrival {
        peer: peer.ip(),
        protocol: Protocol::H2,
        tls,
    };
    let mut streams = JoinSet::new();
    let mut served: u32 = 0;
    let mut idle_since = conn.accepted;
    // Set once GOAWAY went out: from then on the loop only drives the streams in flight, until
    // this deadline.
    let mut closing: Option<Instant> = None;
    let mut shutdown = conn.shutdown.clone();
    loop {
        let idle_until = if served == 0 {
            first_due
        } else {
            idle_since + limits.keepalive_timeout()
        };
        let deadline = closing.unwrap_or(idle_until);
        let watch_idle = closing.is_some() || streams.is_empty();
        let next = tokio::select! {
            next = h2.accept() => next,
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_since = Instant::now();
                }
                continue;
            }
            () = tokio::time::sleep_until(deadline), if watch_idle => {
                if closing.is_some() {
                    break;
                }
                let kind = if served == 0 { Timeout::Header } else { Timeout::KeepAlive };
                front.metrics().timeout(kind);
                h2.graceful_shutdown();
                closing = Some(Instant::now() + limits.send_timeout());
                continue;
            }
            changed = shutdown.changed(), if closing.is_none() => {
                if changed.is_err() || *shutdown.borrow() {
                    h2.graceful_shutdown();
                    closing = Some(Instant::now() + limits.send_timeout());
                }
                continue;
            }
        };
        match next {
            Some(Ok((request, mut respond))) => {
                served = served.saturating_add(1);
                if served > limits.max_requests {
                    // Opened before the client saw the GOAWAY: refused, which tells the
                    // client it may safely retry it on a new connection.
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                if let Some(handshake) = conn.handshake.take() {
                    crate::tls::count_handshake(
                        Some(&handshake),
                        Protocol::H2,
                        front.pipeline.store.metrics(),
                    );
                }
                if served >= limits.max_requests && closing.is_none() {
                    // The same bound as an HTTP/1.1 connection: this stream is served, later
                    // ones go to a new connection.
                    h2.graceful_shutdown();
                    closing = Some(Instant::now() + limits.keepalive_timeout());
                }
                let front = Arc::clone(&front);
                // Boxed in place: spawning the stream's future by value would copy all of it.
                streams.spawn(crate::pipeline::boxed_in_place(|| async move {
                    let (parts, body) = request.into_parts();
                    let mut stream = Stream {
                        body,
                        respond,
                        send: None,
                        ended: false,
                        limits,
                    };
                    front
                        .pipeline
                        .serve(Head::of(&parts), &mut stream, arrival)
                        .await;
                    stream.finish();
                }));
            }
            Some(Err(e)) => {
                tracing::debug!("HTTP/2 connection with {peer}: {e}");
                break;
            }
            None => break,
        }
    }
    // The connection is gone: streams still running could not write anything more.
    streams.abort_all();
    drop(conn);
}

/// One HTTP/2 stream as the pipeline sees it.
struct Stream {
    body: h2::RecvStream,
    respond: h2::server::SendResponse<Bytes>,
    send: Option<h2::SendStream<Bytes>>,
    ended: bool,
    limits: ConnLimits,
}

impl Stream {
    /// A response that did not end (the pipeline gave up mid-way) is reset, never left open.
    fn finish(&mut self) {
        if self.ended {
            return;
        }
        match self.send.as_mut() {
            Some(send) => send.send_reset(h2::Reason::INTERNAL_ERROR),
            None => self.respond.send_reset(h2::Reason::INTERNAL_ERROR),
        }
    }
}

impl Downstream for Stream {
    async fn read_body(&mut self) -> Result<Option<Bytes>, ClientBodyError> {
        match self.body.data().await {
            Some(Ok(chunk)) => {
                // Reopen the client's window by what was taken: the pipeline bounds what it
                // buffers, so flow control follows the pipeline's pace.
                let _ = self.body.flow_control().release_capacity(chunk.len());
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(ClientBodyError(e.to_string())),
            None => Ok(None),
        }
    }

    async fn send_head(
        &mut self,
        status: u16,
        mut headers: HeaderMap,
        end: bool,
    ) -> io::Result<()> {
        // Connection-specific fields (RFC 9113 §8.2.2) never get here: the pipeline strips every
        // hop-by-hop field from what it relays, for all protocols, with one shared list.
        if !headers.contains_key(http::header::DATE) {
            headers.insert(http::header::DATE, super::date_now());
        }
        let mut response = Response::new(());
        *response.status_mut() =
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        *response.headers_mut() = headers;
        let send = self
            .respond
            .send_response(response, end)
            .map_err(io::Error::other)?;
        self.ended = end;
        self.send = Some(send);
        Ok(())
    }

    async fn send_interim(&mut self, status: u16, headers: HeaderMap) -> io::Result<()> {
        if self.send.is_some() {
            return Ok(()); // the final head went out already
        }
        let mut interim = Response::new(());
        *interim.status_mut() = StatusCode::from_u16(status).map_err(io::Error::other)?;
        *interim.headers_mut() = headers;
        self.respond
            .send_informational(interim)
            .map_err(io::Error::other)
    }

    async fn send_body(&mut self, mut chunk: Bytes, end: bool) -> io::Result<()> {
        let Some(send) = self.send.as_mut() else {
            return Ok(());
        };
        if self.ended {
            return Ok(());
        }
        // Only what the client's window allows is handed to h2, so a client that stops reading
        // holds back this stream (up to the send timeout), not the edge's memory.
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let capacity = crate::coarse_timer::timeout(
                self.limits.send_timeout(),
                std::future::poll_fn(|cx| send.poll_capacity(cx)),
            )
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not read the response in time",
                )
            })?;
            let granted = match capacity {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Err(io::Error::other("the client closed the stream")),
            };
            if granted == 0 {
                continue;
            }
            let part = chunk.split_to(granted.min(chunk.len()));
            let last = end && chunk.is_empty();
            send.send_data(part, last).map_err(io::Error::other)?;
            if last {
                self.ended = true;
            }
        }
        if end && !self.ended {
            send.send_data(Bytes::new(), true)
                .map_err(io::Error::other)?;
            self.ended = true;
        }
        Ok(())
    }

    fn abort(&mut self) {
        if let Some(send) = self.send.as_mut() {
            send.send_reset(h2::Reason::INTERNAL_ERROR);
        }
        // A reset stream is finished: nothing more is sent on it.
        self.ended = true;
    }

    fn close_after(&mut self) {}
}

/// A cleartext connection whose first bytes (the HTTP/2 preface) were read while looking for an
/// HTTP/1.1 head: they are read again first.
pub struct Prefixed<T> {
    prefix: Bytes,
    io: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, io: T) -> Self {
        Self { prefix, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
