//! The one upstream connector: every path that talks to origins (the TCP and HTTP/3 fronts' tries,
//! model calls, background cache refresh) sends through it. HTTP/1.1 to region upstreams, one
//! keep-alive pool per worker thread (no lock, no cross-thread traffic on the request path: a
//! connection is reused by the thread whose runtime drives it), explicit connect/read/write
//! timeouts, the connect time for the access log, and errors that say whether the upstream may
//! have seen the request (only a connect failure is always safe to retry elsewhere).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

type Sender = SendRequest<UpstreamBody>;

/// A request body for the upstream hop: whole bytes (replayable on any number of tries), or a
/// buffered head followed by chunks still arriving from the client. A streamed body can be
/// replayed on another try only while none of its streamed chunks has been taken.
pub struct UpstreamBody {
    head: Option<Bytes>,
    rest: Option<Arc<BodyFeed>>,
}

/// The client side of a streamed body: chunks from the front's reader, or why it stopped.
pub struct BodyFeed {
    chunks: Mutex<mpsc::Receiver<Result<Bytes, std::io::Error>>>,
    /// A streamed chunk went to an upstream: the body can no longer be sent again.
    consumed: AtomicBool,
    /// Streamed bytes handed to an upstream so far (progress for the read timeout).
    sent: AtomicU64,
    /// The client side failed (its reader sent an error): the upstream is not to blame.
    client_failed: AtomicBool,
}

impl BodyFeed {
    /// A feed and the sender the front's reader pushes client chunks into (bounded: the client
    /// is only read as fast as the upstream takes the body).
    pub fn channel() -> (Arc<BodyFeed>, mpsc::Sender<Result<Bytes, std::io::Error>>) {
        let (tx, rx) = mpsc::channel(4);
        let feed = BodyFeed {
            chunks: Mutex::new(rx),
            consumed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            client_failed: AtomicBool::new(false),
        };
        (Arc::new(feed), tx)
    }

    pub fn is_consumed(&self) -> bool {
        self.consumed.load(Ordering::Acquire)
    }

    /// The client's body failed (reset, stall, over the limit) and the upstream saw the error.
    pub fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Acquire)
    }
}

impl UpstreamBody {
    pub fn full(bytes: Bytes) -> Self {
        Self {
            head: Some(bytes),
            rest: None,
        }
    }

    /// `head` (already read from the client) followed by whatever `feed` delivers.
    pub fn streamed(head: Bytes, feed: &Arc<BodyFeed>) -> Self {
        Self {
            head: Some(head),
            rest: Some(Arc::clone(feed)),
        }
    }

    fn progress(&self) -> Option<Arc<BodyFeed>> {
        self.rest.clone()
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(head) = self.head.take().filter(|h| !h.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        let Some(feed) = self.rest.as_ref() else {
            return Poll::Ready(None);
        };
        let mut chunks = feed.chunks.lock().unwrap_or_else(|p| p.into_inner());
        match chunks.poll_recv(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                feed.consumed.store(true, Ordering::Release);
                feed.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => {
                feed.consumed.store(true, Ordering::Release);
                feed.client_failed.store(true, Ordering::Release);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                drop(chunks);
                self.rest = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.head.as_ref().is_none_or(|h| h.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        match self.rest {
            None => SizeHint::with_exact(head),
            Some(_) => {
                let mut hint = SizeHint::new();
                hint.set_lower(head);
                hint
            }
        }
    }
}

/// Waits for `send` (the request going out and the response head coming back) until `read`
/// passes without progress: a streamed body that keeps moving keeps the try alive, as a
/// per-read timeout does on the TCP front.
async fn within_read_timeout<F: std::future::Future>(
    read: Duration,
    progress: Option<&BodyFeed>,
    send: F,
) -> Result<F::Output, ()> {
    tokio::pin!(send);
    let mut last = progress.map(|p| p.sent.load(Ordering::Relaxed));
    loop {
        match tokio::time::timeout(read, &mut send).await {
            Ok(output) => return Ok(output),
            Err(_) => {
                let now = progress.map(|p| p.sent.load(Ordering::Relaxed));
                if now == last {
                    return Err(());
                }
                last = now;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: the upstream never saw the request.
    #[error("connect to {addr}: {message}")]
    Connect {
        addr: SocketAddr,
        message: String,
        /// The upstream actively refused (nothing listens): no upstream did any work.
        refused: bool,
        /// `timeouts.connect` passed.
        timed_out: bool,
    },
    #[error("upstream {addr} timed out")]
    Timeout { addr: SocketAddr },
    /// The request may have reached the upstream.
    #[error("upstream {addr}: {message}")]
    Failed { addr: SocketAddr, message: String },
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. })
    }

    /// The connection was refused (as Pingora's `ConnectRefused`).
    pub fn is_refused(&self) -> bool {
        matches!(self, UpstreamError::Connect { refused: true, .. })
    }

    /// A connect or response timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout { .. }
                | UpstreamError::Connect {
                    timed_out: true,
                    ..
                }
        )
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    /// Longest wait for the response head, and then between two body chunks.
    pub read: Duration,
    /// Longest a write to the upstream may stay blocked (it stopped reading the request).
    pub write: Duration,
}

impl Timeouts {
    /// A route's `timeouts.connect/read/write`.
    pub fn of(route: &crate::core::snapshot::CompiledRoute) -> Self {
        Self {
            connect: route.connect_timeout,
            read: route.read_timeout,
            write: route.write_timeout,
        }
    }
}

/// Idle connections of this worker thread, per upstream address.
type Pool = HashMap<SocketAddr, Vec<Sender>>;

thread_local! {
    static IDLE: RefCell<Pool> = RefCell::new(HashMap::new());
}

/// The connector every front and background task shares. Cheap to clone into tasks.
#[derive(Clone, Copy, Debug)]
pub struct Connector {
    max_idle_per_upstream: usize,
}

impl Default for Connector {
    fn default() -> Self {
        Self::new(32)
    }
}

impl Connector {
    pub fn new(max_idle_per_upstream: usize) -> Self {
        Self {
            max_idle_per_upstream,
        }
    }

    /// Sends `request` (origin-form URI, `Host` set by the caller) to `addr`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        request: http::Request<UpstreamBody>,
        timeouts: Timeouts,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let progress = request.body().progress();
        let progress = progress.as_deref();
        let mut request = request;
        // A pooled connection may have been closed by the upstream meanwhile: hyper hands the
        // request back when it was not sent, and we try the next one, then a fresh connection.
        while let Some(mut sender) = checkout(addr) {
            if sender.ready().await.is_err() {
                continue;
            }
            let sent =
                within_read_timeout(timeouts.read, progress, sender.try_send_request(request))
                    .await
                    .map_err(|()| UpstreamError::Timeout { addr })?;
            match sent {
                Ok(response) => {
                    return Ok(self.wrap(addr, sender, response, timeouts, Duration::ZERO))
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(failed(addr, e.into_error(), timeouts)),
                },
            }
        }
        let connect_started = Instant::now();
        let mut sender = connect(addr, timeouts).await?;
        let connect = connect_started.elapsed();
        let response = within_read_timeout(timeouts.read, progress, sender.send_request(request))
            .await
            .map_err(|()| UpstreamError::Timeout { addr })?
            .map_err(|e| failed(addr, e, timeouts))?;
        Ok(self.wrap(addr, sender, response, timeouts, connect))
    }

    fn wrap(
        &self,
        addr: SocketAddr,
        sender: Sender,
        response: http::Response<Incoming>,
        timeouts: Timeouts,
        connect: Duration,
    ) -> UpstreamResponse {
        let (head, body) = response.into_parts();
        UpstreamResponse {
            head,
            body,
            addr,
            connect,
            read_timeout: timeouts.read,
            conn: Some(sender),
            max_idle: self.max_idle_per_upstream,
        }
    }
}

/// A hyper error after the connection was made: a blocked write that hit `timeouts.write` is a
/// timeout (the upstream stopped reading), anything else a failure.
fn failed(addr: SocketAddr, e: hyper::Error, _timeouts: Timeouts) -> UpstreamError {
    let timed_out = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
    if timed_out {
        UpstreamError::Timeout { addr }
    } else {
        UpstreamError::Failed {
            addr,
            message: e.to_string(),
        }
    }
}

fn checkout(addr: SocketAddr) -> Option<Sender> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(sender) = list.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    })
}

async fn connect(addr: SocketAddr, timeouts: Timeouts) -> Result<Sender, UpstreamError> {
    let limit = timeouts.connect;
    let connect_error = |message: String| UpstreamError::Connect {
        addr,
        message,
        refused: false,
        timed_out: false,
    };
    let stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::Connect {
            addr,
            message: format!("timed out after {limit:?}"),
            refused: false,
            timed_out: true,
        })?
        .map_err(|e| UpstreamError::Connect {
            addr,
            message: e.to_string(),
            refused: e.kind() == std::io::ErrorKind::ConnectionRefused,
            timed_out: false,
        })?;
    let _ = stream.set_nodelay(true);
    let stream = WriteTimeout::new(stream, timeouts.write);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| connect_error(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("upstream connection {addr}: {e}");
        }
    });
    Ok(sender)
}

/// A socket whose writes fail with `TimedOut` once one stays blocked for `limit`: an upstream
/// that stops reading the request cannot hold the try (and the client) forever.
struct WriteTimeout {
    stream: tokio::net::TcpStream,
    limit: Duration,
    blocked_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteTimeout {
    fn new(stream: tokio::net::TcpStream, limit: Duration) -> Self {
        Self {
            stream,
            limit,
            blocked_since: None,
        }
    }

    /// Called when a write is pending: arms the timer, or fails once it fired.
    fn poll_blocked(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let timer = self
            .blocked_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("upstream did not read the request for {limit:?} (timeouts.write)"),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for WriteTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Pending => self.poll_blocked(cx).map(Err),
            ready => {
                self.blocked_since = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.poll_blocked(cx).map(Err),
            ready => {
                self.blocked_since = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A response head and its streaming body; the connection returns to the pool once the body has
/// been read to the end.
pub struct UpstreamResponse {
    pub head: http::response::Parts,
    body: Incoming,
    addr: SocketAddr,
    /// Time to establish the connection (zero for a pooled one).
    pub connect: Duration,
    read_timeout: Duration,
    conn: Option<Sender>,
    max_idle: usize,
}

impl UpstreamResponse {
    /// The response has no body at all (HEAD, 204, 304, `Content-Length: 0`).
    pub fn body_is_empty(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.body)
    }

    /// The next body chunk; `None` at the end (trailers are dropped).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            let frame = tokio::time::timeout(self.read_timeout, self.body.frame())
                .await
                .map_err(|_| UpstreamError::Timeout { addr: self.addr })?;
            match frame {
                None => {
                    self.release();
                    return Ok(None);
                }
                Some(Err(e)) => {
                    self.conn = None;
                    return Err(UpstreamError::Failed {
                        addr: self.addr,
                        message: e.to_string(),
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }

    fn release(&mut self) {
        let Some(sender) = self.conn.take() else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let max_idle = self.max_idle;
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.entry(self.addr).or_default();
            if list.len() < max_idle {
                list.push(sender);
            }
        });
    }
}
