//! Meridian's HTTP/1.1 connection loop: reads a head (bounded in bytes and in total time), hands the
//! request to the one [`Pipeline`] as a [`Downstream`], writes the answer, and waits for the next
//! request holding almost nothing.
//!
//! Why its own loop rather than a framework's session: a kept-alive connection spends most of its
//! life waiting, and what it holds while it waits is what a million idle mobile clients cost. Here
//! the wait holds the socket, a deadline and a few words: the read buffer is released, and the
//! request's state (head, pipeline future) lives in a separate allocation that is freed when the
//! answer is written. The request cycle itself spawns nothing and crosses no channel.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::coarse_timer;
use crate::core::exchange::EdgeReply;
use crate::core::http1::{
    connection_header, decode, encode_response_head, encode_response_head_with, parse_request,
    response_has_body, Framing, HeadError, RequestHead,
};
use crate::metrics::Protocol;
use crate::pipeline::{Arrival, ClientBodyError, Downstream, Head};

use super::{tunnel, ConnLimits, Connection, Front, Timeout};

/// First read of a head; grows (up to the header limit) only for bigger heads.
const HEAD_READ: usize = 4096;
/// The most a request's first read grows by for the body its connection's last request had.
const BODY_HINT_MAX: usize = 16 * 1024;
/// Body reads: big enough that a 64 KiB upload is a handful of reads.
const BODY_READ: usize = 16 * 1024;
/// Length-framed bodies up to this size are read whole before the first chunk goes on (the
/// pipeline holds bodies this small whole anyway, to replay them on another try).
const WHOLE_BODY_READ: usize = 64 * 1024;
/// Body bytes copied behind a pending head (one write for both); bigger chunks go out as they are.
const COALESCE: usize = 16 * 1024;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads more of a head that has not arrived whole: `Ok(false)` when the client closed,
/// `Err(())` when the head is overdue.
async fn read_more<T: Transport>(
    io: &mut T,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<bool, ()> {
    buf.reserve(HEAD_READ);
    match coarse_timer::timeout_at(deadline, io.read_buf(buf)).await {
        Ok(Ok(n)) => Ok(n > 0),
        Ok(Err(_)) => Ok(false),
        Err(_) => Err(()),
    }
}

const HEAD_TIMEOUT: HeadError = HeadError {
    status: 408,
    message: "request head not received in time (edge.limits.client_header_timeout)",
};

/// A client transport the loop can wait on without a buffer.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves when the connection has bytes to read (or is closed). Transports that cannot
    /// wait without reading return at once and the read itself waits.
    fn idle(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// The cleartext socket, when this transport may turn out to speak HTTP/2 by prior knowledge
    /// (h2c); TLS connections chose their protocol by ALPN already.
    fn into_h2c(self) -> Result<tokio::net::TcpStream, Self>
    where
        Self: Sized;
}

impl Transport for tokio::net::TcpStream {
    async fn idle(&mut self) -> io::Result<()> {
        // Polls the socket's readiness directly: no waiter node inside the future, which
        // `readable()` would keep (~150 bytes) in every idle connection.
        std::future::poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    fn into_h2c(self) -> Result<tokio::net::TcpStream, Self> {
        Ok(self)
    }
}

/// A TLS connection from Pingora's listener. rustls reads whole records into its own buffer, so
/// the wait happens in the read itself.
pub struct TlsStream(pub pingora::protocols::Stream);

impl Transport for TlsStream {
    async fn idle(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn into_h2c(self) -> Result<tokio::net::TcpStream, Self> {
        Err(self)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Serves HTTP/1.1 requests on `io` until the client or a limit closes it.
///
/// While a kept-alive connection waits, this future holds the socket, the connection's limits and
/// one timer: each request (its head, refusal or exchange) runs in its own boxed future, freed when
/// answered. A waiting connection does not watch for shutdown: Pingora ends the worker's tasks when
/// the grace period is over, and a request in flight then is finished first and answered
/// `Connection: close`.
///
/// A plain `fn` returning an `async move` block, not an `async fn`: an async fn's future keeps
/// each argument twice (the argument and its binding), which for a connection is most of its
/// size. It is spawned as it is, for the same reason.
#[allow(clippy::manual_async_fn)]
pub fn serve<T: Transport>(
    front: Arc<Front>,
    mut io: T,
    peer: SocketAddr,
    tls: bool,
    mut conn: Connection,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let front = &front;
        let mut buf = BytesMut::new();
        let mut served: u32 = 0;
        // How much the next head read takes in: a client whose last request had a body likely
        // sends another (an API client posting on a kept-alive connection), and reading the head
        // and body in one go saves a read and growing the buffer (a copy of what it holds).
        // Only a client that completed a request gets more than `HEAD_READ`.
        let mut read_size = HEAD_READ;
        // The first head is due within the header timeout of the accept.
        loop {
            // The first head is due within the header timeout of the accept; later ones within
            // the header timeout of their first byte, after at most the keep-alive idle time.
            let first = served == 0;
            if buf.is_empty() {
                // A coarse bound: this wait is what an idle connection holds, and its slot
                // handle is smaller than a timer entry.
                let due = if first {
                    coarse_timer::Due::At(conn.accepted + conn.limits.header_timeout())
                } else {
                    coarse_timer::Due::After(conn.limits.keepalive_timeout())
                };
                match coarse_timer::within(due, io.idle()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        let kind = if served == 0 {
                            Timeout::Header
                        } else {
                            Timeout::KeepAlive
                        };
                        front.metrics().timeout(kind);
                        return;
                    }
                }
            }
            let head_due = if first {
                conn.accepted + conn.limits.header_timeout()
            } else {
                Instant::now() + conn.limits.header_timeout()
            };
            served += 1;
            let request = Request {
                front,
                peer,
                tls,
                head_due,
                served,
            };
            let outcome = crate::pipeline::boxed_in_place(|| {
                request.serve(&mut io, &mut buf, &mut conn, &mut read_size)
            })
            .await;
            if outcome == Outcome::H2c {
                if let Ok(tcp) = io.into_h2c() {
                    // Boxed: the HTTP/2 hand-off's state must not size every connection.
                    Box::pin(front.serve_h2c(tcp, peer, conn, buf)).await;
                }
                return;
            }
            if outcome == Outcome::Linger {
                Box::pin(linger(&mut io, &conn.limits)).await;
                return;
            }
            if outcome != Outcome::KeepAlive || *conn.shutdown.borrow() {
                let _ = tokio::time::timeout(conn.limits.send_timeout(), io.shutdown()).await;
                return;
            }
            if buf.is_empty() {
                // No buffer while idle (a pipelined next request keeps it): the thread keeps it
                // for whichever connection reads next.
                crate::read_buffers::give(std::mem::take(&mut buf));
            }
        }
    }
}

/// One request on a connection, from its first head byte to its answer.
struct Request<'f> {
    front: &'f Front,
    peer: SocketAddr,
    tls: bool,
    /// The head must be complete by then.
    head_due: Instant,
    /// Requests on this connection so far, this one included.
    served: u32,
}

/// What a request leaves the connection able to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    KeepAlive,
    Close,
    /// Close, but the client may still be sending a request body the edge did not read: see
    /// [`linger`].
    Linger,
    /// The first bytes were the HTTP/2 preface: the connection speaks h2c.
    H2c,
}

impl Request<'_> {
    async fn serve<T: Transport>(
        self,
        io: &mut T,
        buf: &mut BytesMut,
        conn: &mut Connection,
        read_size: &mut usize,
    ) -> Outcome {
        let front = self.front;
        let may_be_h2c = self.served == 1 && !self.tls;
        let reading = HeadReading {
            limits: &conn.limits,
            deadline: self.head_due,
            may_be_h2c,
            read_size: *read_size,
        };
        let head = match read_head(io, buf, reading).await {
            HeadRead::Head(head) => head,
            HeadRead::H2c => return Outcome::H2c,
            HeadRead::Closed => return Outcome::Close,
            HeadRead::Overdue => {
                front.metrics().timeout(Timeout::Header);
                return Outcome::Close;
            }
            HeadRead::TimedOut => {
                front.metrics().timeout(Timeout::Header);
                refuse(front, io, &conn.limits, HEAD_TIMEOUT).await;
                return Outcome::Close;
            }
            HeadRead::Refused(error) => {
                refuse(front, io, &conn.limits, error).await;
                return Outcome::Linger;
            }
        };
        *read_size = HEAD_READ
            + match head.framing {
                Framing::Length(n) => {
                    usize::try_from(n).map_or(BODY_HINT_MAX, |n| n.min(BODY_HINT_MAX))
                }
                _ => 0,
            };
        if let Some(handshake) = conn.handshake.take() {
            crate::tls::count_handshake(
                Some(&handshake),
                Protocol::H1,
                front.pipeline.store.metrics(),
            );
        }
        let keep_alive =
            head.keep_alive && self.served < conn.limits.max_requests && !*conn.shutdown.borrow();
        let arrival = Arrival {
            peer: self.peer.ip(),
            protocol: Protocol::H1,
            tls: self.tls,
        };
        exchange(front, io, buf, &head, keep_alive, &conn.limits, arrival).await
    }
}

/// Returned once per request and never stored, so the size difference between variants costs
/// nothing worth a heap allocation.
#[allow(clippy::large_enum_variant)]
enum HeadRead {
    Head(RequestHead),
    /// The HTTP/2 connection preface, complete, at the start of `buf`.
    H2c,
    Closed,
    /// Not one byte of a head arrived in time: closed without an answer.
    Overdue,
    TimedOut,
    Refused(HeadError),
}

/// Serves one request; whether (and how) the connection may carry another.
async fn exchange<T: Transport>(
    front: &Front,
    io: &mut T,
    buf: &mut BytesMut,
    // Borrowed from the request's state: moved in, the head (a few hundred bytes) was copied.
    head: &RequestHead,
    keep_alive: bool,
    limits: &ConnLimits,
    arrival: Arrival,
) -> Outcome {
    let mut exchange = Exchange {
        io,
        buf,
        framing: head.framing,
        expect_continue: head.expect_continue,
        head,
        keep_alive,
        broken: false,
        out: Vec::new(),
        response: Response::NotStarted,
        limits,
    };
    let request = Head {
        method: &head.method,
        uri: &head.uri,
        headers: &head.headers,
    };
    front.pipeline.serve(request, &mut exchange, arrival).await;
    let unread_body = exchange.framing != Framing::Done;
    if exchange.broken {
        Outcome::Close
    } else if unread_body {
        Outcome::Linger
    } else if exchange.keep_alive && exchange.response == Response::Complete {
        Outcome::KeepAlive
    } else {
        Outcome::Close
    }
}

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(5);
/// Scratch space for discarded bytes (in the boxed linger future, not the connection's).
const LINGER_READ: usize = 16 * 1024;

/// Closes a connection whose client may still be sending (a body the edge answered without
/// reading): the write side is shut first, then what arrives is read and dropped until the client
/// closes or [`LINGER`] passes. Closing with unread bytes would make the kernel answer them with a
/// reset, which can destroy the response before the client read it (NGINX's "lingering close").
async fn linger<T: Transport>(io: &mut T, limits: &ConnLimits) {
    if tokio::time::timeout(limits.send_timeout(), io.shutdown())
        .await
        .is_err()
    {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut scratch = vec![0u8; LINGER_READ];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, io.read(&mut scratch)).await {
        if n == 0 {
            break;
        }
    }
}

/// How a head is read: within what, by when, and how much at a time.
struct HeadReading<'l> {
    limits: &'l ConnLimits,
    /// The head must be complete by then.
    deadline: Instant,
    /// The connection's first bytes may be the HTTP/2 preface.
    may_be_h2c: bool,
    /// The first read's size.
    read_size: usize,
}

/// Reads until a complete head is buffered (leaving what follows it in `buf`), within `deadline`
/// for the whole head and `limits` for its size — checked as bytes arrive, not after.
async fn read_head<T: Transport>(
    io: &mut T,
    buf: &mut BytesMut,
    reading: HeadReading<'_>,
) -> HeadRead {
    let HeadReading {
        limits,
        deadline,
        may_be_h2c,
        read_size,
    } = reading;
    loop {
        if may_be_h2c && !buf.is_empty() {
            let n = buf.len().min(H2_PREFACE.len());
            if buf[..n] == H2_PREFACE[..n] {
                if n == H2_PREFACE.len() {
                    return HeadRead::H2c;
                }
                match read_more(io, buf, deadline).await {
                    Ok(true) => continue,
                    Ok(false) => return HeadRead::Closed,
                    Err(()) => return HeadRead::TimedOut,
                }
            }
        }
        // Empty lines before a request line are ignored (RFC 9112 §2.2).
        let blank = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        if blank > 0 {
            let _ = buf.split_to(blank);
        }
        if !buf.is_empty() {
            match parse_request(buf, &limits.head()) {
                Ok(Some(head)) => {
                    let _ = buf.split_to(head.length);
                    return HeadRead::Head(head);
                }
                Ok(None) => {}
                Err(e) => return HeadRead::Refused(e),
            }
        }
        if buf.capacity() == 0 {
            if let Some(kept) = crate::read_buffers::take() {
                *buf = kept;
            }
        }
        // A kept buffer smaller than the first read wanted (a client whose last request had a
        // body) gives way to one that takes head and body in one read.
        if buf.capacity() - buf.len() < 512 || (buf.is_empty() && buf.capacity() < read_size) {
            buf.reserve(read_size.max(buf.len()));
        }
        match coarse_timer::timeout_at(deadline, io.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return HeadRead::Closed,
            Ok(Ok(_)) => {}
            Err(_) if buf.is_empty() => return HeadRead::Overdue,
            Err(_) => return HeadRead::TimedOut,
        }
    }
}

/// Answers a head the edge refused, and closes: nothing after a bad head can be trusted.
async fn refuse<T: Transport>(front: &Front, io: &mut T, limits: &ConnLimits, error: HeadError) {
    let reply = EdgeReply::new(error.status, error.message);
    let body = reply.body(&front.pipeline.store.load().snapshot.pop);
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(http::header::DATE, super::date_now());
    let mut out = Vec::with_capacity(256 + body.len());
    encode_response_head(
        &mut out,
        error.status,
        &headers,
        connection_header(Version::HTTP_11, false),
        false,
    );
    out.extend_from_slice(&body);
    let _ = tokio::time::timeout(limits.send_timeout(), io.write_all(&out)).await;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Response {
    NotStarted,
    /// Head written (or pending in `out`), body under way.
    Body {
        chunked: bool,
        has_body: bool,
    },
    Complete,
}

/// One request on the connection, as the pipeline sees it.
struct Exchange<'c, T> {
    io: &'c mut T,
    buf: &'c mut BytesMut,
    head: &'c RequestHead,
    /// What is left of the request body.
    framing: Framing,
    expect_continue: bool,
    keep_alive: bool,
    /// The connection cannot be reused (a read or write failed, or the answer was cut).
    broken: bool,
    /// Response bytes not written yet (a head waiting to go out with the first body bytes).
    out: Vec<u8>,
    response: Response,
    limits: &'c ConnLimits,
}

impl<T: Transport> Exchange<'_, T> {
    async fn write_out(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = within(self.limits.send_timeout(), self.io.write_all(&self.out)).await;
        self.out.clear();
        self.failed(result)
    }

    async fn write_chunk(&mut self, chunk: &[u8]) -> io::Result<()> {
        if self.out.len() + chunk.len() <= COALESCE {
            self.out.extend_from_slice(chunk);
            return Ok(());
        }
        self.write_out().await?;
        let result = within(self.limits.send_timeout(), self.io.write_all(chunk)).await;
        self.failed(result)
    }

    /// Room to leave behind a response head in `out` for a body of `length` that follows it: a
    /// small one is coalesced behind the head (one write), unless the socket takes the head and
    /// the body in one `writev` (see `send_body`), when it is not copied there at all.
    fn body_room(&self, body_follows: bool, length: Option<usize>) -> usize {
        length
            .filter(|&n| body_follows && n <= COALESCE && !self.io.is_write_vectored())
            .unwrap_or(0)
    }

    /// The answer comes before the whole request body was read: the rest of it must not be taken
    /// for the next request.
    fn close_if_body_unread(&mut self) {
        if self.framing != Framing::Done && !self.broken {
            self.keep_alive = false;
        }
    }

    /// The final head is in `out`: it goes now when nothing follows it, else with the body.
    async fn head_written(&mut self, end: bool, chunked: bool, has_body: bool) -> io::Result<()> {
        if end || !has_body {
            self.response = Response::Complete;
            return self.write_out().await;
        }
        self.response = Response::Body { chunked, has_body };
        Ok(())
    }

    fn failed(&mut self, result: io::Result<()>) -> io::Result<()> {
        if result.is_err() {
            self.broken = true;
        }
        result
    }
}

async fn within<F: Future<Output = io::Result<()>>>(limit: Duration, work: F) -> io::Result<()> {
    match coarse_timer::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not read the response in time",
        )),
    }
}

impl<T: Transport> Downstream for Exchange<'_, T> {
    async fn read_body(&mut self) -> Result<Option<Bytes>, ClientBodyError> {
        if self.expect_continue {
            self.expect_continue = false;
            let sent = within(
                self.limits.send_timeout(),
                self.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"),
            )
            .await;
            self.failed(sent)
                .map_err(|e| ClientBodyError(e.to_string()))?;
        }
        let mut waited = false;
        loop {
            // At most one read is waited for per call, so each call is progress for the body
            // timeout even when a small body trickles in.
            let partial_whole = !waited
                && matches!(self.framing, Framing::Length(left)
                    if left <= WHOLE_BODY_READ as u64 && (self.buf.len() as u64) < left);
            let decoded = if partial_whole {
                Ok(None)
            } else {
                decode(
                    &mut self.framing,
                    self.buf,
                    self.limits.head().max_header_bytes,
                )
            };
            match decoded {
                Ok(Some(chunk)) => return Ok(Some(chunk)),
                Ok(None) if self.framing == Framing::Done => return Ok(None),
                Ok(None) => {}
                Err(message) => {
                    self.broken = true;
                    return Err(ClientBodyError(message.into()));
                }
            }
            // A known remainder that fits one replay-sized read is read whole before it is
            // handed on: the pipeline then gets the body as one chunk and never joins pieces
            // (a copy of every byte), and the client needs fewer reads.
            let want = match self.framing {
                Framing::Length(left) => usize::try_from(left)
                    .ok()
                    .filter(|&left| left <= WHOLE_BODY_READ)
                    .map_or(BODY_READ, |left| left.saturating_sub(self.buf.len()).max(1)),
                _ => BODY_READ,
            };
            self.buf.reserve(want);
            match self.io.read_buf(self.buf).await {
                Ok(0) => {
                    self.broken = true;
                    return Err(ClientBodyError(
                        "the client closed before the end of the body".into(),
                    ));
                }
                Ok(_) => waited = true,
                Err(e) => {
                    self.broken = true;
                    return Err(ClientBodyError(e.to_string()));
                }
            }
        }
    }

    async fn send_head(&mut self, status: u16, headers: HeaderMap, end: bool) -> io::Result<()> {
        self.send_head_with(status, headers, &[], end).await
    }

    async fn send_head_with(
        &mut self,
        status: u16,
        mut headers: HeaderMap,
        edge: &[(&HeaderName, &HeaderValue)],
        end: bool,
    ) -> io::Result<()> {
        let has_body = response_has_body(&self.head.method, status);
        let content_length = headers.get(http::header::CONTENT_LENGTH);
        let length_known = content_length.is_some();
        let coalesced_body = self.body_room(
            has_body && !end,
            content_length.and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()),
        );
        if has_body && end && !length_known {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        if !headers.contains_key(http::header::DATE) {
            // An origin's (or the cache's stored) Date passes through; the edge's own answers
            // and an origin without a clock get the time now (RFC 9110 §6.6.1).
            headers.insert(http::header::DATE, super::date_now());
        }
        let open_ended = has_body && !end && !length_known;
        let chunked = open_ended && self.head.version == Version::HTTP_11;
        if open_ended && !chunked {
            // An HTTP/1.0 client without a length: the body ends when the connection does.
            self.keep_alive = false;
        }
        self.close_if_body_unread();
        // 1xx answers are not final (the client keeps waiting), but this edge sends none itself.
        // Room for the head and the coalesced body: growing the buffer for the body would copy
        // the head again.
        self.out
            .reserve(256 + (headers.len() + edge.len()) * 48 + coalesced_body);
        encode_response_head_with(
            &mut self.out,
            status,
            &headers,
            edge,
            connection_header(self.head.version, self.keep_alive),
            chunked,
        );
        self.head_written(end, chunked, has_body).await
    }

    fn writes_prepared_heads(&self) -> bool {
        true
    }

    async fn send_prepared_head(
        &mut self,
        status: u16,
        lines: &[u8],
        extra: &[(&[u8], &[u8])],
        content_length: u64,
        end: bool,
    ) -> io::Result<()> {
        // The same framing as `send_head` with a known length (a `Date` is among the lines).
        let has_body = response_has_body(&self.head.method, status);
        self.close_if_body_unread();
        let coalesced_body = self.body_room(has_body && !end, usize::try_from(content_length).ok());
        self.out.reserve(160 + lines.len() + coalesced_body);
        crate::core::http1::encode_prepared_response_head(
            &mut self.out,
            status,
            lines,
            extra,
            content_length,
            connection_header(self.head.version, self.keep_alive),
        );
        self.head_written(end, false, has_body).await
    }

    async fn send_interim(&mut self, status: u16, headers: HeaderMap) -> io::Result<()> {
        // HTTP/1.0 clients must not get 1xx answers (RFC 9110 §15.2), and nothing may come after
        // the final head.
        if self.head.version != Version::HTTP_11 || !matches!(self.response, Response::NotStarted) {
            return Ok(());
        }
        encode_response_head(&mut self.out, status, &headers, None, false);
        self.write_out().await
    }

    async fn send_body(&mut self, chunk: Bytes, end: bool) -> io::Result<()> {
        let Response::Body { chunked, has_body } = self.response else {
            return Ok(());
        };
        if has_body && !chunk.is_empty() {
            if chunked {
                let (line, len) = crate::core::http1::chunk_size_line(chunk.len());
                self.out.extend_from_slice(&line[..len]);
                self.write_chunk(&chunk).await?;
                self.out.extend_from_slice(b"\r\n");
            } else if !self.out.is_empty()
                && self.out.len() + chunk.len() <= COALESCE
                && self.io.is_write_vectored()
            {
                // The pending head and this chunk in one `writev`: the chunk is not copied
                // behind the head first.
                let pair = crate::write_pair::write_all_pair(self.io, &self.out, &chunk);
                let result = within(self.limits.send_timeout(), pair).await;
                self.out.clear();
                self.failed(result)?;
            } else {
                self.write_chunk(&chunk).await?;
            }
        }
        if end {
            if chunked {
                self.out.extend_from_slice(b"0\r\n\r\n");
            }
            self.response = Response::Complete;
        }
        // Every call goes out now: a streamed answer (server-sent events) must not wait here.
        self.write_out().await
    }

    fn abort(&mut self) {
        self.broken = true;
    }

    fn close_after(&mut self) {
        self.keep_alive = false;
    }

    fn can_upgrade(&self) -> bool {
        // After the switch the connection's bytes belong to the new protocol: a request body
        // still to come would be mixed into it.
        self.head.version == Version::HTTP_11 && self.framing == Framing::Done
    }

    async fn tunnel(
        &mut self,
        headers: HeaderMap,
        upstream: crate::connector::Upgraded,
        idle: Duration,
    ) -> io::Result<u64> {
        // Whatever happens next, this connection carries no further HTTP/1.1 request.
        self.keep_alive = false;
        self.broken = true;
        self.response = Response::Complete;
        encode_response_head(
            &mut self.out,
            101,
            &headers,
            Some(b"connection: upgrade\r\n"),
            false,
        );
        let sent = within(self.limits.send_timeout(), self.io.write_all(&self.out)).await;
        self.out.clear();
        sent?;
        let client_early = self.buf.split().freeze();
        Ok(Box::pin(tunnel::relay(&mut *self.io, client_early, upstream, idle)).await)
    }
}
