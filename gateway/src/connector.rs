//! The one upstream connector: every path that talks to origins (the TCP and HTTP/3 fronts' tries,
//! model calls, background cache refresh) sends through it.
//!
//! HTTP/1.1 to region upstreams, driven entirely inside the request's own task: the request is
//! written and the response read on the socket directly, with no connection task, channel or
//! wake-up between tasks per request (what a general-purpose client pays). One keep-alive pool per
//! worker thread (no lock, no cross-thread traffic: a connection is reused by the thread that
//! made it), explicit connect/read/write timeouts, the connect time for the access log, and errors
//! that say whether the upstream may have seen the request (only a connect failure is always safe
//! to retry elsewhere). A pooled connection the upstream closed while idle is noticed on use and
//! the request goes out again, once, on a fresh one when nothing of it was written or it may be
//! sent twice; otherwise the error says so ([`UpstreamError::Stale`]) and is not the upstream's
//! fault.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::coarse_timer;
use crate::core::fast_hash::FastBuildHasher;
use crate::core::headers::UpstreamHeaders;
use crate::pipeline::forward::EDGE_RESPONSE_FIELDS;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::core::http1::{decimal, decode, push_field, ChunkState, ContentLength, Framing};

/// Largest response head accepted from an upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most headers in an upstream response head.
const MAX_RESPONSE_HEADERS: usize = 128;
/// Read size for response bodies: large reads mean few syscalls and few chunks to relay.
const READ_CHUNK: usize = 64 * 1024;
/// First read of a response: a usual head and a small body in one read, without holding a
/// body-sized buffer for every request in flight (thousands at once when many clients connect
/// together).
const HEAD_READ: usize = 8 * 1024;
/// Smallest body read worth a syscall.
const MIN_BODY_READ: usize = 4 * 1024;
/// Whole request bodies up to this size go out in the same write as the head.
const COALESCE_BODY: usize = 16 * 1024;

/// A request body for the upstream hop: whole bytes (replayable on any number of tries), or a
/// buffered head followed by chunks still arriving from the client. A streamed body can be
/// replayed on another try only while none of its streamed chunks has been taken.
pub struct UpstreamBody {
    head: Bytes,
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

    /// The next streamed chunk; `None` at the end of the client's body.
    async fn next(&self) -> Option<Result<Bytes, std::io::Error>> {
        let item = std::future::poll_fn(|cx| {
            let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
            chunks.poll_recv(cx)
        })
        .await;
        match &item {
            Some(Ok(chunk)) => {
                self.consumed.store(true, Ordering::Release);
                self.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            Some(Err(_)) => {
                self.consumed.store(true, Ordering::Release);
                self.client_failed.store(true, Ordering::Release);
            }
            None => {}
        }
        item
    }
}

impl UpstreamBody {
    pub fn full(bytes: Bytes) -> Self {
        Self {
            head: bytes,
            rest: None,
        }
    }

    /// `head` (already read from the client) followed by whatever `feed` delivers.
    pub fn streamed(head: Bytes, feed: &Arc<BodyFeed>) -> Self {
        Self {
            head,
            rest: Some(Arc::clone(feed)),
        }
    }

    /// Can this body still go out again (on a fresh connection)?
    fn replayable(&self) -> bool {
        self.rest.as_ref().is_none_or(|feed| !feed.is_consumed())
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
    /// A kept-alive connection closed before any byte of a response, and the request could not
    /// go out again on a fresh one (part of it was written and it may not be sent twice). The
    /// upstream may have seen it, so it is not retried; but closing an idle connection is what
    /// upstreams do, so it says nothing about the upstream's health.
    #[error("upstream {addr}: kept-alive connection closed before a response")]
    Stale { addr: SocketAddr },
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. })
    }

    /// The connection was refused.
    pub fn is_refused(&self) -> bool {
        matches!(self, UpstreamError::Connect { refused: true, .. })
    }

    /// A kept-alive connection closed before answering a request that could not be resent.
    pub fn is_stale(&self) -> bool {
        matches!(self, UpstreamError::Stale { .. })
    }

    /// A connect, read or write timeout.
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

/// One kept-alive connection to an upstream, with what was read past the last response.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: BytesMut,
}

thread_local! {
    /// Idle connections of this worker thread, per upstream address.
    static IDLE: RefCell<HashMap<SocketAddr, Vec<Conn>, FastBuildHasher>> =
        RefCell::new(HashMap::default());
    /// Whether this thread's runtime has its [`TIMER_FLOOR`] ticker.
    static TIMER_FLOOR_STARTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How far ahead a worker's runtime always has a timer due.
///
/// Why: tokio wakes its I/O driver (a write to an eventfd, and an early return from the next
/// `epoll_wait`) whenever a timer is registered that is due before the driver's planned wake-up.
/// When each proxied request registered a tokio timer for its upstream read, with nothing else due
/// sooner, that cost one extra syscall per request (measured with `strace -c`: one eventfd write
/// per request on the worker thread). Request waits now go to [`crate::coarse_timer`]'s list,
/// but a wait off a swept thread still takes a tokio timer; a ticker that is always due within
/// this floor keeps the planned wake-up earlier than any such timeout (seconds), so registering
/// one wakes nobody. The ticker itself costs one wake-up per period and runs the worker's
/// housekeeping.
const TIMER_FLOOR: Duration = Duration::from_millis(500);

/// Starts the [`TIMER_FLOOR`] ticker on this thread's runtime, once per thread. Each tick also
/// runs the process's worker housekeeping ([`crate::housekeeping`]).
fn ensure_timer_floor() {
    if TIMER_FLOOR_STARTED.with(|started| started.replace(true)) {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async {
            loop {
                tokio::time::sleep(TIMER_FLOOR).await;
                crate::housekeeping::on_worker_tick();
            }
        });
    }
}

/// The connector every front and background task shares. Cheap to copy into tasks.
#[derive(Clone, Copy, Debug)]
pub struct Connector {
    max_idle_per_upstream: usize,
}

impl Default for Connector {
    /// 256 idle connections per upstream and worker thread: at least as many as requests a
    /// thread has in flight to one upstream under load. A smaller pool closes the surplus after
    /// every burst and reconnects on the next one — measured with 64 concurrent clients on one
    /// thread and a pool of 32, one request in five paid a new upstream connection (seven
    /// syscalls and a handshake). An idle upstream connection costs a socket and a small
    /// buffer.
    fn default() -> Self {
        Self::new(256)
    }
}

/// How one attempt on one connection ended, when it did not produce a response head.
enum Attempt {
    /// The connection was closed before any byte of a response came back (on a kept-alive
    /// connection: the upstream closed it while idle). `written`: the request went out first.
    /// The request may go out again on a fresh connection if nothing of it was written, or if
    /// it may be sent twice (idempotent).
    Stale {
        written: bool,
    },
    Failed(UpstreamError),
}

impl Connector {
    pub fn new(max_idle_per_upstream: usize) -> Self {
        Self {
            max_idle_per_upstream,
        }
    }

    /// Sends `request` (origin-form URI, `Host` set by the caller) to `addr` and reads the
    /// response head; the body follows through [`UpstreamResponse::next_chunk`]. Each `103 Early
    /// Hints` the upstream sends before its final head goes to `interim` as it is read (dropped
    /// when the receiver is not keeping up).
    pub async fn send(
        &self,
        addr: SocketAddr,
        request: OutboundHead<'_>,
        body: UpstreamBody,
        timeouts: Timeouts,
        interim: Option<&InterimSink>,
    ) -> Result<Box<UpstreamResponse>, UpstreamError> {
        ensure_timer_floor();
        let (head, chunked) = encode_head(request, &body);
        let head_request = *request.method == Method::HEAD;
        let idempotent = request.method.is_idempotent();
        if let Some(mut conn) = checkout(addr) {
            // Pinned where it is built, as every exchange below: built and then awaited, the
            // exchange's future was copied into this one's state per request.
            let result = std::pin::pin!(exchange(
                &mut conn,
                addr,
                (&head, chunked),
                &body,
                head_request,
                timeouts,
                interim,
            ))
            .await;
            match result {
                Ok(response) => {
                    return Ok(self.wrap(conn, addr, response, timeouts, Duration::ZERO));
                }
                // Once, on a fresh connection: a second pooled one is as likely closed as the
                // first, and an idempotent request that went out on each would reach an upstream
                // that reads before closing once per idle connection.
                Err(Attempt::Stale { written })
                    if body.replayable() && (!written || idempotent) =>
                {
                    forget_idle(addr)
                }
                Err(Attempt::Stale { .. }) => {
                    forget_idle(addr);
                    return Err(UpstreamError::Stale { addr });
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        let started = Instant::now();
        let mut conn = connect(addr, timeouts.connect).await?;
        let connect = started.elapsed();
        let result = std::pin::pin!(exchange(
            &mut conn,
            addr,
            (&head, chunked),
            &body,
            head_request,
            timeouts,
            interim,
        ))
        .await;
        match result {
            Ok(response) => Ok(self.wrap(conn, addr, response, timeouts, connect)),
            Err(Attempt::Stale { .. }) => Err(UpstreamError::Failed {
                addr,
                message: "connection closed before a response".into(),
            }),
            Err(Attempt::Failed(e)) => Err(e),
        }
    }

    fn wrap(
        &self,
        conn: Conn,
        addr: SocketAddr,
        (head, fields, framing, reusable): Head,
        timeouts: Timeouts,
        connect: Duration,
    ) -> Box<UpstreamResponse> {
        // Boxed: the response passes through several futures' states on its way to the
        // client (try loop, request, relay), and moving ~270 bytes each time cost more than one
        // allocation.
        Box::new(UpstreamResponse {
            head,
            fields,
            mapped: false,
            addr,
            connect,
            read_timeout: timeouts.read,
            framing,
            reusable,
            conn: Some(conn),
            max_idle: self.max_idle_per_upstream,
        })
    }
}

/// An idle connection to `addr` that has not visibly been closed. An upstream that closed it
/// while idle has usually sent its FIN by now: such connections are dropped here, before anything
/// is written, so only a close racing the request is left for the exchange to notice.
fn checkout(addr: SocketAddr) -> Option<Conn> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(conn) = list.pop() {
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(conn),
                // EOF, an error, or bytes nobody asked for: not a connection to reuse.
                _ => continue,
            }
        }
        None
    })
}

/// Drops this thread's idle connections to `addr`: one of them was found closed, and the older
/// ones have idled even longer.
fn forget_idle(addr: SocketAddr) {
    IDLE.with(|idle| idle.borrow_mut().remove(&addr));
}

async fn connect(addr: SocketAddr, limit: Duration) -> Result<Conn, UpstreamError> {
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
    Ok(Conn {
        stream,
        buf: BytesMut::new(),
    })
}

/// The head of a request for an upstream (origin-form URI, `Host` set), borrowed: the tries of
/// one request share it, so each try encodes it straight into bytes instead of first copying its
/// header map.
#[derive(Clone, Copy, Debug)]
pub struct OutboundHead<'a> {
    pub method: &'a Method,
    pub uri: &'a http::Uri,
    pub headers: &'a UpstreamHeaders<'a>,
}

/// The request head as HTTP/1.1 bytes, and whether the body goes chunked. Whole bodies get their
/// exact `Content-Length`; streamed ones keep the client's declared length, else go chunked.
fn encode_head(parts: OutboundHead<'_>, body: &UpstreamBody) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(256 + parts.headers.len_hint() * 48);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let streamed = body.rest.is_some();
    let mut declared = false;
    for (name, value) in parts.headers.iter() {
        if name == http::header::CONTENT_LENGTH {
            declared = true;
            // A whole body gets its exact length below, whatever the client declared.
            if !streamed {
                continue;
            }
        }
        push_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    let chunked = streamed && !declared;
    if chunked {
        push_field(&mut out, b"transfer-encoding", b"chunked");
    } else if !streamed && (!body.head.is_empty() || expects_body(parts.method)) {
        let mut digits = [0; 20];
        let length = decimal(body.head.len() as u64, &mut digits);
        push_field(&mut out, b"content-length", length);
    }
    out.extend_from_slice(b"\r\n");
    (out, chunked)
}

/// Methods whose empty body is still announced (`Content-Length: 0`), as origins expect.
fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// Writes the request and reads the response head, within the read timeout (which a streamed
/// body that keeps moving extends, as per-read timeouts would). The head is read while the body
/// is still being written: an upstream may answer (and stop reading) before the body ends, or
/// answer as soon as it has read enough of a streamed body.
async fn exchange(
    conn: &mut Conn,
    addr: SocketAddr,
    (head, chunked): (&[u8], bool),
    body: &UpstreamBody,
    head_request: bool,
    timeouts: Timeouts,
    interim: Option<&InterimSink>,
) -> Result<Head, Attempt> {
    let progress = body.rest.clone();
    let Conn { stream, buf } = conn;
    let (mut reader, mut writer) = stream.split();
    // Futures are pinned where they are built: built first and then pinned, each was copied
    // once more per request.
    let work = std::pin::pin!(async {
        let mut write = std::pin::pin!(write_request(
            &mut writer,
            addr,
            (head, chunked),
            body,
            timeouts.write
        ));
        let mut read = std::pin::pin!(read_head(&mut reader, buf, addr, head_request, interim));
        // Some(true): the whole request went out; Some(false): writing failed part-way.
        let mut written: Option<bool> = None;
        loop {
            tokio::select! {
                result = &mut write, if written.is_none() => match result {
                    Ok(()) => written = Some(true),
                    // Nothing went out: the connection was closed while idle.
                    Err(Attempt::Stale { written: false }) => {
                        return Err(Attempt::Stale { written: false })
                    }
                    // The upstream stopped reading the request (`timeouts.write`), or the
                    // client's body broke off: nothing more will come of this exchange.
                    Err(e) if matches!(e, Attempt::Failed(UpstreamError::Timeout { .. }))
                        || body.rest.as_ref().is_some_and(|feed| feed.client_failed()) =>
                    {
                        return Err(e)
                    }
                    // The upstream may have answered and closed: read what it said.
                    Err(_) => written = Some(false),
                },
                result = &mut read => {
                    let (parts, fields, framing, reusable) = result?;
                    // A connection whose request was not fully written is never reused.
                    return Ok((parts, fields, framing, reusable && written == Some(true)));
                }
            }
        }
    });
    within_read_timeout(timeouts.read, progress.as_deref(), work)
        .await
        .unwrap_or(Err(Attempt::Failed(UpstreamError::Timeout { addr })))
}

async fn write_request<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    addr: SocketAddr,
    (head, chunked): (&[u8], bool),
    body: &UpstreamBody,
    write_timeout: Duration,
) -> Result<(), Attempt> {
    // Nothing written yet on a reused connection: a failure here means it was closed while idle.
    let first = if body.head.len() <= COALESCE_BODY && body.rest.is_none() {
        write_all_pair(w, addr, head, &body.head, write_timeout).await
    } else {
        write_all(w, addr, head, write_timeout).await
    };
    match first {
        Ok(()) => {}
        Err(Attempt::Failed(UpstreamError::Failed { .. })) => {
            return Err(Attempt::Stale { written: false })
        }
        Err(e) => return Err(e),
    }
    if body.head.len() > COALESCE_BODY || (body.rest.is_some() && !body.head.is_empty()) {
        write_body_chunk(w, addr, &body.head, chunked, write_timeout).await?;
    }
    let Some(feed) = body.rest.clone() else {
        return Ok(());
    };
    loop {
        match feed.next().await {
            Some(Ok(chunk)) => write_body_chunk(w, addr, &chunk, chunked, write_timeout).await?,
            Some(Err(e)) => {
                return Err(Attempt::Failed(UpstreamError::Failed {
                    addr,
                    message: format!("request body: {e}"),
                }))
            }
            None => break,
        }
    }
    if chunked {
        write_all(w, addr, b"0\r\n\r\n", write_timeout).await?;
    }
    Ok(())
}

async fn write_body_chunk<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    addr: SocketAddr,
    chunk: &[u8],
    chunked: bool,
    write_timeout: Duration,
) -> Result<(), Attempt> {
    if chunk.is_empty() {
        return Ok(());
    }
    if chunked {
        let (line, len) = crate::core::http1::chunk_size_line(chunk.len());
        write_all(w, addr, &line[..len], write_timeout).await?;
        write_all(w, addr, chunk, write_timeout).await?;
        write_all(w, addr, b"\r\n", write_timeout).await
    } else {
        write_all(w, addr, chunk, write_timeout).await
    }
}

/// `first` then `second` in as few writes as the socket allows (one `writev` usually), within
/// `limit` for the pair.
async fn write_all_pair<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    addr: SocketAddr,
    first: &[u8],
    second: &[u8],
    limit: Duration,
) -> Result<(), Attempt> {
    let pair = crate::write_pair::write_all_pair(w, first, second);
    // A completed pair counts as one non-empty write for `written`.
    let done = coarse_timer::timeout(limit, pair)
        .await
        .map(|r| r.map(|()| 1));
    written(addr, done).map(drop)
}

/// A write that fails once it has been blocked for `limit` (the upstream stopped reading).
async fn write_all<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    addr: SocketAddr,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), Attempt> {
    let mut sent = 0;
    while sent < bytes.len() {
        sent += written(
            addr,
            coarse_timer::timeout(limit, w.write(&bytes[sent..])).await,
        )?;
    }
    Ok(())
}

/// What one write within the write timeout came to: bytes written, or why the request cannot go.
fn written(
    addr: SocketAddr,
    write: Result<std::io::Result<usize>, crate::coarse_timer::Elapsed>,
) -> Result<usize, Attempt> {
    match write {
        Ok(Ok(0)) | Ok(Err(_)) => Err(Attempt::Failed(UpstreamError::Failed {
            addr,
            message: "connection closed while sending the request".into(),
        })),
        Ok(Ok(n)) => Ok(n),
        Err(_) => Err(Attempt::Failed(UpstreamError::Timeout { addr })),
    }
}

/// Where a try hands the `103 Early Hints` it reads, for the front to relay at once. It lives in
/// the request's own future and allocates nothing until a hint arrives: every proxied request
/// carries one, almost none ever receives a hint.
#[derive(Default)]
pub struct InterimSink {
    hints: std::sync::Mutex<Vec<http::response::Parts>>,
    arrived: tokio::sync::Notify,
}

impl InterimSink {
    /// Hints kept for the front at a time; more are dropped (hints are optional).
    const MAX_PENDING: usize = 4;

    /// Never waits: hints the front cannot take now are not worth a stall.
    pub fn offer(&self, hint: http::response::Parts) {
        let mut hints = self
            .hints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if hints.len() < Self::MAX_PENDING {
            hints.push(hint);
            drop(hints);
            self.arrived.notify_one();
        }
    }

    /// Resolves once a hint was offered since the last [`InterimSink::take`].
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    /// The hints offered so far, oldest first.
    pub fn take(&self) -> Vec<http::response::Parts> {
        std::mem::take(
            &mut *self
                .hints
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Reads until a whole final response head is buffered. Interim (1xx) responses other than
/// `100` and `101` go to `interim` as they are read.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    addr: SocketAddr,
    head_request: bool,
    interim: Option<&InterimSink>,
) -> Result<Head, Attempt> {
    let mut received_any = !buf.is_empty();
    loop {
        // Usually nothing is buffered yet when the head is first awaited.
        let parsed = if buf.is_empty() {
            None
        } else {
            parse_head(buf, head_request, addr)?
        };
        if let Some((mut parts, fields, framing, reusable, used)) = parsed {
            buf.advance(used);
            if parts.status.is_informational() && parts.status != StatusCode::SWITCHING_PROTOCOLS {
                // A proxy forwards the 1xx it did not ask for (RFC 9110 §15.2): `102`, `103` and
                // codes it does not know. `100 Continue` answers an `Expect` the edge handled
                // itself (it never sends one upstream), so it ends here.
                if let (Some(sink), true) = (interim, parts.status != StatusCode::CONTINUE) {
                    parts.headers = fields.to_map();
                    sink.offer(parts);
                }
                continue;
            }
            return Ok((parts, fields, framing, reusable));
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(Attempt::Failed(UpstreamError::Failed {
                addr,
                message: "response head too large".into(),
            }));
        }
        if buf.capacity() == 0 {
            if let Some(kept) = crate::read_buffers::take() {
                *buf = kept;
            }
        }
        buf.reserve(HEAD_READ);
        match r.read_buf(buf).await {
            Ok(0) | Err(_) if !received_any => return Err(Attempt::Stale { written: true }),
            Ok(0) => {
                return Err(Attempt::Failed(UpstreamError::Failed {
                    addr,
                    message: "connection closed in the response head".into(),
                }))
            }
            Ok(_) => received_any = true,
            Err(e) => {
                return Err(Attempt::Failed(UpstreamError::Failed {
                    addr,
                    message: e.to_string(),
                }))
            }
        }
    }
}

type ParsedHead = (http::response::Parts, ResponseFields, Framing, bool, usize);
/// A final response head as read: the head (its `headers` empty), its fields, the body's framing,
/// whether the connection may be reused.
type Head = (http::response::Parts, ResponseFields, Framing, bool);

/// Response headers the edge may add to an upstream's (see [`ResponseFields::to_map`]).
const RELAY_HEADROOM: usize = 4;

/// An upstream response's fields as they arrived, kept as HTTP/1.1 lines rather than parsed into
/// a map. Most answers go to an HTTP/1.1 client untouched, and for those the lines are written as
/// they are ([`UpstreamResponse::verbatim`]): no name lookups, no value copies, no map to build
/// and drop (about 8 % of a proxied GET's instructions). Whatever needs a map (the cache,
/// HTTP/2 and HTTP/3, a retry that reads `Retry-After`) asks for one and it is built then.
#[derive(Debug, Default)]
pub struct ResponseFields {
    /// `name: value\r\n` per field in the upstream's order, names lower-cased; hop-by-hop
    /// fields and `Content-Length` are left out (a `Connection` that names other fields stays, so
    /// whoever builds the map can strip those too).
    lines: Vec<u8>,
    /// How many fields `lines` holds.
    count: usize,
    /// The body length the upstream declared (also on a HEAD or `304` answer, which has no body).
    content_length: Option<u64>,
    /// Whether the lines may go to a client as they are: the upstream sent a `Date`, no field
    /// only the edge sets, and no `Connection` naming other fields.
    verbatim: bool,
}

impl ResponseFields {
    /// The fields as a map (with `Content-Length` when one was declared).
    fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.count + 1 + RELAY_HEADROOM);
        for line in self.lines.split(|&b| b == b'\n') {
            let Some(line) = line.strip_suffix(b"\r") else {
                continue;
            };
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let value = line.get(colon + 2..).unwrap_or_default();
            // The bytes passed the head parser's checks, which are the map's own.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_bytes(value),
            ) {
                map.append(name, value);
            }
        }
        if let Some(length) = self.content_length {
            map.insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        map
    }
}

/// Parses a response head at the start of `buf`: `None` while it is incomplete, else the head
/// (its `headers` left empty: see [`ResponseFields`]), its fields, the body's framing, whether the
/// connection may be reused, and the head's length.
fn parse_head(
    buf: &[u8],
    head_request: bool,
    addr: SocketAddr,
) -> Result<Option<ParsedHead>, Attempt> {
    let failed = |message: String| Attempt::Failed(UpstreamError::Failed { addr, message });
    // Uninitialised slots: initialising them all (4 KiB) cost more than parsing a usual head.
    let mut raw =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut raw,
    );
    let used = match parsed {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(failed(format!("invalid response head: {e}"))),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| failed("invalid status".into()))?;
    // The lines are never longer than the head they come from.
    let mut fields = ResponseFields {
        lines: Vec::with_capacity(used),
        ..ResponseFields::default()
    };
    let mut has_date = false;
    let mut unusual = false;
    // The framing fields are read as the lines are built, not looked up afterwards.
    let mut close = false;
    let mut chunked = false;
    // An invalid length matters only if the length frames the body (not after chunked, HEAD…).
    let mut length = ContentLength::default();
    for h in response.headers.iter() {
        let start = fields.lines.len();
        fields.lines.extend_from_slice(h.name.as_bytes());
        fields.lines[start..].make_ascii_lowercase();
        let keep = match &fields.lines[start..] {
            b"content-length" => {
                length.add(h.value);
                false
            }
            b"transfer-encoding" => {
                // The last coding of the last field decides (RFC 9112 §6.1).
                chunked = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                false
            }
            b"connection" => {
                let mut others = false;
                for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        others = true;
                    }
                }
                unusual |= others;
                others
            }
            name if crate::core::headers::is_hop_by_hop_name(name) => false,
            b"date" => {
                has_date = true;
                true
            }
            name => {
                unusual |= EDGE_RESPONSE_FIELDS
                    .iter()
                    .any(|edge| edge.as_str().as_bytes() == name);
                true
            }
        };
        if keep {
            fields.lines.extend_from_slice(b": ");
            fields.lines.extend_from_slice(h.value);
            fields.lines.extend_from_slice(b"\r\n");
            fields.count += 1;
        } else {
            fields.lines.truncate(start);
        }
    }
    let http11 = response.version == Some(1);
    let declared = length.value();
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Done
    } else if chunked {
        Framing::Chunked(ChunkState::Size)
    } else if let Some(length) = declared.map_err(|m| failed(m.into()))? {
        if length == 0 {
            Framing::Done
        } else {
            Framing::Length(length)
        }
    } else {
        Framing::UntilClose
    };
    if !chunked {
        fields.content_length = declared.ok().flatten();
    }
    fields.verbatim = has_date && !unusual;
    // After a 101 the connection speaks another protocol: it is never pooled.
    let reusable = http11
        && !close
        && !matches!(framing, Framing::UntilClose)
        && status != StatusCode::SWITCHING_PROTOCOLS;
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = if http11 {
        http::Version::HTTP_11
    } else {
        http::Version::HTTP_10
    };
    Ok(Some((parts, fields, framing, reusable, used)))
}

/// Waits for `work` until `read` passes without progress: a streamed request body that keeps
/// moving keeps the try alive.
async fn within_read_timeout<F: Future>(
    read: Duration,
    progress: Option<&BodyFeed>,
    mut work: std::pin::Pin<&mut F>,
) -> Option<F::Output> {
    let mut last = progress.map(|p| p.sent.load(Ordering::Relaxed));
    loop {
        match coarse_timer::timeout(read, work.as_mut()).await {
            Ok(output) => return Some(output),
            Err(_) => {
                let now = progress.map(|p| p.sent.load(Ordering::Relaxed));
                if now == last {
                    return None;
                }
                last = now;
            }
        }
    }
}

/// A response head and its streaming body; the connection returns to this thread's pool once the
/// body has been read to its end.
pub struct UpstreamResponse {
    /// Status and version; its `headers` stay empty until [`UpstreamResponse::headers`] fills
    /// them from `fields`.
    head: http::response::Parts,
    fields: ResponseFields,
    /// Whether `head.headers` holds the fields.
    mapped: bool,
    addr: SocketAddr,
    /// Time to establish the connection (zero for a pooled one).
    pub connect: Duration,
    read_timeout: Duration,
    framing: Framing,
    reusable: bool,
    conn: Option<Conn>,
    max_idle: usize,
}

/// An upstream connection that switched protocols (`101`): the socket, and what the upstream
/// sent after its response head.
pub struct Upgraded {
    pub stream: tokio::net::TcpStream,
    pub buffered: BytesMut,
}

/// An upstream's header lines, ready to be written to an HTTP/1.1 client as they are (see
/// [`UpstreamResponse::verbatim`]).
pub struct VerbatimHead<'a> {
    /// `name: value\r\n` lines, `Date` among them; no hop-by-hop field, no `Content-Length`,
    /// none of the edge's own fields.
    pub lines: &'a [u8],
    pub content_length: u64,
}

impl UpstreamResponse {
    pub fn status(&self) -> StatusCode {
        self.head.status
    }

    /// The upstream's fields as a map, built on first use. Hop-by-hop fields are not in it
    /// (except a `Connection` naming other fields, and those fields).
    pub fn headers(&mut self) -> &mut HeaderMap {
        if !self.mapped {
            self.head.headers = self.fields.to_map();
            self.mapped = true;
        }
        &mut self.head.headers
    }

    /// The fields, taken out (built into a map first if need be).
    pub fn take_headers(&mut self) -> HeaderMap {
        std::mem::take(self.headers())
    }

    /// The upstream's header lines, when they can go to a client untouched: the answer declared
    /// its length and carries a body or is a HEAD answer (not `1xx`, `204` or `304`), sent a
    /// `Date`, and none of its fields needs the edge's attention. `None`: build the map
    /// ([`UpstreamResponse::headers`]).
    pub fn verbatim(&self) -> Option<VerbatimHead<'_>> {
        let status = self.head.status;
        if self.mapped
            || !self.fields.verbatim
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return None;
        }
        Some(VerbatimHead {
            lines: &self.fields.lines,
            content_length: self.fields.content_length?,
        })
    }

    /// The connection of a `101 Switching Protocols`, for the caller to relay as it is.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        if self.head.status != StatusCode::SWITCHING_PROTOCOLS {
            return None;
        }
        let conn = self.conn.take()?;
        Some(Upgraded {
            stream: conn.stream,
            buffered: conn.buf,
        })
    }

    /// The response has no body at all (HEAD, 204, 304, `Content-Length: 0`).
    pub fn body_is_empty(&self) -> bool {
        self.framing == Framing::Done
    }

    /// The next body chunk; `None` at the end (trailers are dropped).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            if let Some(chunk) = self.take_buffered()? {
                return Ok(Some(chunk));
            }
            if self.framing == Framing::Done {
                self.release();
                return Ok(None);
            }
            self.fill().await?;
        }
    }

    /// Decodes what is buffered: a chunk of body bytes, or `None` when more must be read (or the
    /// body is done).
    fn take_buffered(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        decode(&mut self.framing, &mut conn.buf, MAX_RESPONSE_HEAD).map_err(|message| {
            UpstreamError::Failed {
                addr: self.addr,
                message: message.into(),
            }
        })
    }

    /// Reads more of the body within the read timeout.
    async fn fill(&mut self) -> Result<(), UpstreamError> {
        let addr = self.addr;
        let Some(conn) = self.conn.as_mut() else {
            return Err(UpstreamError::Failed {
                addr,
                message: "connection gone".into(),
            });
        };
        // A known remainder is read in one go when it fits a chunk; an unknown one in chunks.
        let want = match self.framing {
            Framing::Length(left) => usize::try_from(left)
                .map_or(READ_CHUNK, |left| left.clamp(MIN_BODY_READ, READ_CHUNK)),
            _ => READ_CHUNK,
        };
        conn.buf.reserve(want);
        let read = coarse_timer::timeout(self.read_timeout, conn.stream.read_buf(&mut conn.buf))
            .await
            .map_err(|_| UpstreamError::Timeout { addr })?;
        match read {
            Ok(0) if self.framing == Framing::UntilClose => {
                self.framing = Framing::Done;
                self.conn = None;
                Ok(())
            }
            Ok(0) => {
                self.conn = None;
                Err(UpstreamError::Failed {
                    addr,
                    message: "connection closed in the response body".into(),
                })
            }
            Ok(_) => Ok(()),
            Err(e) => {
                self.conn = None;
                Err(UpstreamError::Failed {
                    addr,
                    message: e.to_string(),
                })
            }
        }
    }

    fn release(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Bytes past the response mean the upstream sent more than it framed: never reuse.
        if !self.reusable || !conn.buf.is_empty() {
            return;
        }
        // An idle connection keeps no read buffer; the thread keeps it for the next read.
        crate::read_buffers::give(std::mem::take(&mut conn.buf));
        let (addr, max_idle) = (self.addr, self.max_idle);
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.entry(addr).or_default();
            if list.len() < max_idle {
                list.push(conn);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::forward::{HEADER_POP_STR, HEADER_REGION};

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    fn drain(mut framing: Framing, buffered: &[u8]) -> (Vec<u8>, Framing) {
        let mut buf = BytesMut::from(buffered);
        let mut out = Vec::new();
        while let Ok(Some(chunk)) = decode(&mut framing, &mut buf, MAX_RESPONSE_HEAD) {
            out.extend_from_slice(&chunk);
        }
        (out, framing)
    }

    /// A pooled connection's read buffer goes to the thread's spares and the next response is
    /// read into it; a body chunk still held from the first response is never overwritten.
    #[tokio::test]
    async fn released_read_buffers_are_reused_without_touching_held_chunks() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let origin = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 4096];
            for fill in [b'a', b'b'] {
                let mut read = 0;
                while !request[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    read += socket.read(&mut request[read..]).await.expect("read");
                }
                let mut response = b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\n\r\n".to_vec();
                response.resize(response.len() + 1024, fill);
                socket.write_all(&response).await.expect("write");
            }
        });
        crate::read_buffers::forget();
        let connector = Connector::default();
        let timeouts = Timeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(5),
            write: Duration::from_secs(5),
        };
        let (method, uri, client) = (Method::GET, http::Uri::from_static("/"), HeaderMap::new());
        let headers = UpstreamHeaders::from_client(&client);
        let get = || OutboundHead {
            method: &method,
            uri: &uri,
            headers: &headers,
        };
        let send = || {
            connector.send(
                origin,
                get(),
                UpstreamBody::full(Bytes::new()),
                timeouts,
                None,
            )
        };
        let mut first = send().await.expect("first response");
        let held = first.next_chunk().await.expect("body").expect("a chunk");
        assert!(first.next_chunk().await.expect("end").is_none());
        assert_eq!(crate::read_buffers::kept(), 1, "released to the spares");
        let mut second = send().await.expect("second response");
        assert_eq!(crate::read_buffers::kept(), 0, "the spare was taken");
        let mut read = Vec::new();
        while let Some(chunk) = second.next_chunk().await.expect("body") {
            read.extend_from_slice(&chunk);
        }
        assert_eq!(read, vec![b'b'; 1024]);
        assert_eq!(&held[..], &[b'a'; 1024][..], "the held chunk is untouched");
    }

    /// The process's worker housekeeping (the binary returns freed allocator memory with it)
    /// runs on every tick of a worker's ticker, on the worker's own thread.
    #[tokio::test(start_paused = true)]
    async fn the_worker_ticker_runs_the_housekeeping() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static TICKS: AtomicUsize = AtomicUsize::new(0);
        fn tick() {
            TICKS.fetch_add(1, Ordering::Relaxed);
        }
        assert!(crate::housekeeping::set_worker_tick(tick));
        ensure_timer_floor();
        ensure_timer_floor(); // one ticker per thread, however often it is asked for
        tokio::time::sleep(TIMER_FLOOR * 3 + Duration::from_millis(1)).await;
        assert_eq!(TICKS.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (body, framing) = drain(
            Framing::Chunked(ChunkState::Size),
            b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n",
        );
        assert_eq!(body, b"hello, world");
        assert_eq!(framing, Framing::Done);
        let (body, framing) = drain(Framing::Chunked(ChunkState::Size), b"5\r\nhel");
        assert_eq!(body, b"hel");
        assert_eq!(framing, Framing::Chunked(ChunkState::Data(2)));
        let mut framing = Framing::Chunked(ChunkState::Size);
        assert!(decode(
            &mut framing,
            &mut BytesMut::from(&b"zz\r\n"[..]),
            MAX_RESPONSE_HEAD
        )
        .is_err());
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let (body, framing) = drain(Framing::Length(3), b"abcdef");
        assert_eq!(body, b"abc");
        assert_eq!(framing, Framing::Done);
    }

    #[test]
    fn response_heads_say_framing_and_reuse() {
        let parse = |raw: &[u8], head: bool| {
            parse_head(raw, head, addr())
                .ok()
                .flatten()
                .map(|(p, _, f, reuse, used)| (p.status.as_u16(), f, reuse, used == raw.len()))
        };
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
            Some((200, Framing::Length(5), true, true))
        );
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                false
            ),
            Some((200, Framing::Chunked(ChunkState::Size), true, true))
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true),
            Some((200, Framing::Done, true, true)),
            "HEAD has no body"
        );
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                false
            ),
            Some((200, Framing::Length(1), false, true))
        );
        assert_eq!(
            parse(b"HTTP/1.0 200 OK\r\n\r\n", false),
            Some((200, Framing::UntilClose, false, true))
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-le", false),
            None,
            "partial"
        );
        assert!(parse_head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            false,
            addr()
        )
        .is_err());
    }

    #[test]
    fn response_fields_pass_on_verbatim_only_what_needs_no_attention() {
        let fields = |raw: &[u8]| {
            let (_, fields, ..) = parse_head(raw, false, addr())
                .ok()
                .flatten()
                .expect("a whole head");
            fields
        };
        let plain = fields(
            b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 20:00:00 GMT\r\nContent-Type: text/plain\r\n\
              Keep-Alive: timeout=5\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\
              X-Custom:  a b \r\nTransfer-Encoding: identity\r\nTE: trailers\r\n\r\n",
        );
        assert_eq!(
            String::from_utf8_lossy(&plain.lines),
            "date: Tue, 01 Dec 2026 20:00:00 GMT\r\ncontent-type: text/plain\r\nx-custom: a b\r\n",
            "names lower-cased, hop-by-hop fields and Content-Length left out"
        );
        assert_eq!(plain.count, 3);
        assert_eq!(plain.content_length, Some(5));
        assert!(plain.verbatim);
        let map = plain.to_map();
        assert_eq!(map.len(), 4);
        assert_eq!(map["x-custom"], "a b");
        assert_eq!(map["content-length"], "5");
        assert_eq!(map["date"], "Tue, 01 Dec 2026 20:00:00 GMT");

        let no_date = fields(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(!no_date.verbatim, "the edge adds a Date");
        let edge_named = fields(
            b"HTTP/1.1 200 OK\r\ndate: x\r\nX-Meridian-Pop: fake\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(!edge_named.verbatim, "the edge replaces its own fields");
        let nominating = fields(
            b"HTTP/1.1 200 OK\r\ndate: x\r\nconnection: close, x-secret\r\nx-secret: 1\r\n\r\n",
        );
        assert!(!nominating.verbatim);
        let mut map = nominating.to_map();
        assert!(map.contains_key("connection") && map.contains_key("x-secret"));
        crate::core::headers::strip_hop_by_hop(&mut map);
        assert!(map.len() == 1 && map.contains_key("date"), "{map:?}");

        let chunked = fields(
            b"HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        assert_eq!(
            chunked.content_length, None,
            "a chunked body's length is not declared"
        );
        for name in EDGE_RESPONSE_FIELDS.iter().map(HeaderName::as_str) {
            assert!(
                [
                    HEADER_REGION.as_str(),
                    HEADER_POP_STR,
                    crate::cache::HEADER_CACHE_NAME.as_str(),
                    "alt-svc"
                ]
                .contains(&name),
                "{name} is one of the edge's own fields"
            );
        }
    }

    #[test]
    fn request_heads_frame_their_bodies() {
        let request = |method: &str, body: UpstreamBody, declared: bool| {
            let mut builder = http::Request::builder().method(method).uri("/p?q=1");
            builder = builder.header("host", "h.test");
            if declared {
                builder = builder.header("content-length", "99");
            }
            let (parts, body) = builder.body(body).expect("request").into_parts();
            let headers = UpstreamHeaders::from_client(&parts.headers);
            let outbound = OutboundHead {
                method: &parts.method,
                uri: &parts.uri,
                headers: &headers,
            };
            let (head, chunked) = encode_head(outbound, &body);
            (String::from_utf8(head).expect("utf8"), chunked)
        };
        let (get, _) = request("GET", UpstreamBody::full(Bytes::new()), false);
        assert_eq!(get, "GET /p?q=1 HTTP/1.1\r\nhost: h.test\r\n\r\n");
        let (post, _) = request("POST", UpstreamBody::full(Bytes::from_static(b"abc")), true);
        assert!(
            post.ends_with("host: h.test\r\ncontent-length: 3\r\n\r\n"),
            "{post}"
        );
        let (feed, _tx) = BodyFeed::channel();
        let (streamed, _) = request("PUT", UpstreamBody::streamed(Bytes::new(), &feed), false);
        assert!(
            streamed.ends_with("transfer-encoding: chunked\r\n\r\n"),
            "{streamed}"
        );
        let (declared, _) = request("PUT", UpstreamBody::streamed(Bytes::new(), &feed), true);
        assert!(declared.contains("content-length: 99\r\n"), "{declared}");
        assert!(!declared.contains("chunked"), "{declared}");
    }
}
