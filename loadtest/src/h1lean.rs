//! A lean HTTP/1.1 client for cleartext load. Each lane owns its socket, writes a request that was
//! encoded once before the run, and reads the answer into a buffer it keeps: the head is parsed in
//! place with httparse, the body is counted and dropped. hyper's client builds a request and a
//! header map per request and hands both request and answer between the lane and a separate
//! connection task through channels; at tens of thousands of requests a second on one core that
//! work made the generator, not the server under test, the limit of a benchmark.
//!
//! One request is in flight per connection (no pipelining), as with hyper and wrk. Nothing here
//! bounds its own waits: the caller wraps every exchange in its per-request timeout and drops the
//! connection when it fires.

use std::io;
use std::mem::MaybeUninit;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// Read buffer per connection: a 64 KiB body arrives in a few reads, and a response head (or a
/// chunk-size line) has to fit in it whole.
const BUF_SIZE: usize = 64 * 1024;
/// The most response header fields accepted, hyper's client limit.
const MAX_HEADERS: usize = 100;

/// The request every lane sends, as bytes on the wire. The headers go out in `headers`' order,
/// names lower case, as hyper writes them; a non-empty body gets a `content-length` (unless one is
/// given), an empty one none, also as hyper does.
pub fn encode(method: &Method, target: &str, headers: &HeaderMap, body: &[u8]) -> Bytes {
    let header_bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut out = BytesMut::with_capacity(64 + target.len() + header_bytes + body.len());
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    if !body.is_empty() && !headers.contains_key(CONTENT_LENGTH) {
        out.put_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.put_slice(b"\r\n");
    out.put_slice(body);
    out.freeze()
}

/// Whether a request can go through this client: it only frames bodies by length, so a request
/// that asks for another transfer coding stays with hyper.
pub fn can_send(headers: &HeaderMap) -> bool {
    !headers.contains_key(TRANSFER_ENCODING)
}

/// A whole answer: its status and how many body bytes it carried (after de-chunking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body_bytes: u64,
}

/// Why an exchange failed. Either way the connection is no longer usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Writing the request, or reading the answer's head, failed (the head was not delivered).
    Request(String),
    /// The head was delivered, then the body failed.
    Body(String),
}

/// How the body of an answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// At the end of the stream: the connection cannot carry another request.
    UntilClose,
}

/// A parsed response head, minus the header fields.
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    keep_alive: bool,
}

/// Where a chunked body is.
#[derive(Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// One cleartext HTTP/1.1 connection.
pub struct LeanConn {
    stream: TcpStream,
    buf: Box<[u8]>,
    /// The bytes read and not consumed yet are `buf[start..end]`.
    start: usize,
    end: usize,
    /// False once an answer said the server closes, ran to the end of the stream, or was followed
    /// by bytes nobody asked for: the next request needs a new connection.
    reusable: bool,
    /// Whether a request went out on it yet.
    used: bool,
}

impl LeanConn {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: vec![0; BUF_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            reusable: true,
            used: false,
        }
    }

    /// Whether the connection cannot take another request: its last answer ended it, or the
    /// server closed it since (an idle keep-alive connection timed out), or sent something nobody
    /// asked for. hyper's connection task saw those while idle and the lane reconnected; here the
    /// reactor's readiness mark tells, without a syscall or a lock: every answer ends by clearing
    /// it (`forget_read_readiness`), so a mark set between requests means the peer closed or wrote.
    pub fn is_closed(&self) -> bool {
        if !self.reusable {
            return true;
        }
        // A connection not used yet is taken as open: no answer has cleared its mark yet, so the
        // mark means nothing (a close before the first request fails that request instead).
        self.used && self.stream.try_io(Interest::READABLE, || Ok(())).is_ok()
    }

    /// Sends `request` (from `encode`) and reads the whole answer. `head_request`: the request was
    /// HEAD, so the answer has no body whatever its head says. `on_head` sees the final status and
    /// header fields as soon as the head is parsed (informational 1xx answers are skipped), before
    /// the body is read.
    pub async fn exchange<F>(
        &mut self,
        request: &[u8],
        head_request: bool,
        on_head: F,
    ) -> Result<Answer, Failure>
    where
        F: FnOnce(u16, &[httparse::Header<'_>]),
    {
        self.used = true;
        if let Err(e) = self.stream.write_all(request).await {
            self.reusable = false;
            return Err(Failure::Request(format!("write: {e}")));
        }
        let head = match self.read_head(head_request, on_head).await {
            Ok(head) => head,
            Err(e) => {
                self.reusable = false;
                return Err(Failure::Request(e));
            }
        };
        let body = match head.framing {
            Framing::Empty => Ok(0),
            Framing::Length(len) => self.read_length(len).await,
            Framing::Chunked => self.read_chunked().await,
            Framing::UntilClose => self.read_to_close().await,
        };
        let body_bytes = match body {
            Ok(n) => n,
            Err(e) => {
                self.reusable = false;
                return Err(Failure::Body(e));
            }
        };
        if !head.keep_alive || head.framing == Framing::UntilClose || self.start != self.end {
            self.reusable = false;
        } else {
            self.forget_read_readiness();
        }
        Ok(Answer {
            status: head.status,
            body_bytes,
        })
    }

    /// Clears tokio's readable mark once an answer was read whole. Nothing is waiting then, but the
    /// mark from the last read is still set: left so, the first read after the next request's write
    /// would be a wasted syscall (EAGAIN) to learn that, and `is_closed` could not tell new bytes
    /// from old. Reporting "would block" to `try_io` clears the mark without a syscall. It is safe
    /// only here, with no request outstanding: the next answer can only come after the next write,
    /// as a new readiness event. A close is never cleared (tokio keeps read-closed), an event that
    /// lands while this runs is left set (tokio clears only the readiness it handed out), and bytes
    /// nobody asked for that arrived just before would be read with the next answer and fail it as
    /// a malformed one: an io error, never a hang.
    fn forget_read_readiness(&self) {
        let _ = self.stream.try_io(Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }

    /// Reads more bytes after `end`, moving the unconsumed ones to the front if the buffer is full.
    /// Returns 0 at the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                return Err(io::Error::other(
                    "response head or chunk-size line longer than the read buffer",
                ));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    async fn read_head<F>(&mut self, head_request: bool, on_head: F) -> Result<Head, String>
    where
        F: FnOnce(u16, &[httparse::Header<'_>]),
    {
        let mut on_head = Some(on_head);
        loop {
            if self.start < self.end {
                let parsed =
                    parse_head(&self.buf[self.start..self.end], head_request, &mut on_head)?;
                if let Some(head) = parsed {
                    self.start += head.len;
                    if (100..200).contains(&head.status) && head.status != 101 {
                        // An interim answer (100 Continue, 103 Early Hints): the real one follows.
                        continue;
                    }
                    return Ok(head);
                }
            }
            match self.fill().await {
                Ok(0) => return Err("connection closed before message completed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Consumes up to `want` buffered body bytes; returns how many.
    fn take(&mut self, want: u64) -> u64 {
        let available = (self.end - self.start) as u64;
        let n = available.min(want);
        self.start += n as usize;
        n
    }

    /// Reads more, failing at the end of the stream: the body was cut short.
    async fn more(&mut self) -> Result<(), String> {
        match self.fill().await {
            Ok(0) => Err("connection closed before the body was complete".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    async fn read_length(&mut self, len: u64) -> Result<u64, String> {
        let mut left = len - self.take(len);
        while left > 0 {
            self.more().await?;
            left -= self.take(left);
        }
        Ok(len)
    }

    async fn read_to_close(&mut self) -> Result<u64, String> {
        let mut total = self.take(u64::MAX);
        loop {
            match self.fill().await {
                Ok(0) => return Ok(total),
                Ok(_) => total += self.take(u64::MAX),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    async fn read_chunked(&mut self) -> Result<u64, String> {
        let mut total = 0u64;
        let mut state = Chunk::Size;
        loop {
            let window = &self.buf[self.start..self.end];
            // Each arm either moves on (consuming bytes) or breaks out to read more.
            match state {
                Chunk::Size => match httparse::parse_chunk_size(window) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        self.start += used;
                        state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                        continue;
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return Err("invalid chunk size line".into()),
                },
                Chunk::Data(left) => {
                    let n = self.take(left);
                    total += n;
                    state = if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    };
                    if n == left {
                        continue;
                    }
                }
                Chunk::DataEnd => {
                    if window.len() >= 2 {
                        if &window[..2] != b"\r\n" {
                            return Err("chunk data not followed by CRLF".into());
                        }
                        self.start += 2;
                        state = Chunk::Size;
                        continue;
                    }
                    if window.first().is_some_and(|&b| b != b'\r') {
                        return Err("chunk data not followed by CRLF".into());
                    }
                }
                Chunk::Trailers => {
                    if let Some(pos) = window.iter().position(|&b| b == b'\n') {
                        let line = &window[..pos];
                        self.start += pos + 1;
                        if line.is_empty() || line == b"\r" {
                            return Ok(total);
                        }
                        // A trailer field: not counted, not kept.
                        continue;
                    }
                }
            }
            self.more().await?;
        }
    }
}

/// Parses a response head at the start of `bytes`: `None` when it is not complete yet. A final
/// (non-1xx) head is shown to `on_head`.
fn parse_head<F>(
    bytes: &[u8],
    head_request: bool,
    on_head: &mut Option<F>,
) -> Result<Option<Head>, String>
where
    F: FnOnce(u16, &[httparse::Header<'_>]),
{
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        bytes,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid HTTP response: {e}")),
    };
    let status = response.code.unwrap_or_default();
    let http11 = response.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = false;
    let mut keep_alive = false;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|&b| b == b',') {
                let n = parse_length(part)
                    .ok_or_else(|| "invalid content-length parsed".to_string())?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting content-length values".into());
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            // Chunked counts only as the last coding applied.
            chunked = h
                .value
                .split(|&b| b == b',')
                .next_back()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let informational = (100..200).contains(&status);
    if !informational || status == 101 {
        if let Some(f) = on_head.take() {
            f(status, response.headers);
        }
    }
    // RFC 9112 section 6.3, in its order.
    let framing = if head_request || informational || status == 204 || status == 304 {
        Framing::Empty
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::UntilClose
    };
    // HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 only when asked to. A switch
    // of protocols (101) leaves HTTP behind.
    let keep_alive = status != 101 && if http11 { !close } else { keep_alive && !close };
    Ok(Some(Head {
        len,
        status,
        framing,
        keep_alive,
    }))
}

/// A content-length value: decimal digits only, no sign, no overflow.
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// What the test server does after a request: write these pieces (pausing between them, so
    /// the client sees the answer in several reads), then keep the connection or close it.
    struct Reply {
        pieces: Vec<&'static [u8]>,
        close: bool,
    }

    fn reply(pieces: &[&'static [u8]]) -> Reply {
        Reply {
            pieces: pieces.to_vec(),
            close: false,
        }
    }

    fn reply_then_close(pieces: &[&'static [u8]]) -> Reply {
        Reply {
            pieces: pieces.to_vec(),
            close: true,
        }
    }

    /// A one-connection server on loopback answering requests in turn with `replies`; returns the
    /// client's connection and the server task, which yields the requests it read.
    async fn serve(replies: Vec<Reply>) -> (LeanConn, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut requests = Vec::new();
            for reply in replies {
                requests.push(read_request(&mut socket).await);
                for (i, piece) in reply.pieces.iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    socket.write_all(piece).await.expect("write answer");
                }
                if reply.close {
                    return requests;
                }
            }
            // Held open until the client goes away.
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
            requests
        });
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        (LeanConn::new(stream), server)
    }

    /// Reads one request: its head, then a content-length body.
    async fn read_request(socket: &mut TcpStream) -> Vec<u8> {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            if socket.read(&mut byte).await.expect("read request") == 0 {
                return request;
            }
            request.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&request).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse::<usize>().expect("content-length"));
        let mut body = vec![0; length];
        socket.read_exact(&mut body).await.expect("read body");
        request.extend_from_slice(&body);
        request
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n";

    async fn get(conn: &mut LeanConn) -> Result<Answer, Failure> {
        conn.exchange(GET, false, |_, _| {}).await
    }

    fn whole(status: u16, body_bytes: u64) -> Answer {
        Answer { status, body_bytes }
    }

    async fn answer(conn: &mut LeanConn) -> Answer {
        get(conn).await.expect("a whole answer")
    }

    #[tokio::test]
    async fn content_length_answers_keep_the_connection() {
        let (mut conn, server) = serve(vec![
            reply(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]),
            // Head and body split over several reads, the head itself too.
            reply(&[
                b"HTTP/1.1 404 Not",
                b" Found\r\ncontent-length: 10\r\n\r\n012",
                b"3456789",
            ]),
        ])
        .await;
        let first = answer(&mut conn).await;
        assert_eq!(first, whole(200, 5));
        assert!(!conn.is_closed());
        let second = answer(&mut conn).await;
        assert_eq!(second, whole(404, 10));
        assert!(!conn.is_closed());
        drop(conn);
        let requests = server.await.expect("server task");
        assert_eq!(requests, vec![GET.to_vec(), GET.to_vec()]);
    }

    #[tokio::test]
    async fn chunked_bodies_count_their_data_only() {
        let (mut conn, _server) = serve(vec![
            reply(&[
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                b"5\r\nhel",
                b"lo\r",
                b"\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n",
                b"0\r\nx-trailer: 1\r\n",
                b"\r\n",
            ]),
            reply(&[
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            ]),
        ])
        .await;
        assert_eq!(answer(&mut conn).await, whole(200, 31));
        assert!(!conn.is_closed());
        assert_eq!(answer(&mut conn).await, whole(200, 3));
        assert!(!conn.is_closed());
    }

    #[tokio::test]
    async fn close_delimited_bodies_end_the_connection() {
        let (mut conn, _server) = serve(vec![reply_then_close(&[
            b"HTTP/1.0 200 OK\r\n\r\n0123",
            b"456789",
        ])])
        .await;
        assert_eq!(answer(&mut conn).await, whole(200, 10));
        assert!(conn.is_closed());

        let (mut conn, _server) = serve(vec![reply_then_close(&[
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabc",
        ])])
        .await;
        assert_eq!(answer(&mut conn).await, whole(200, 3));
        assert!(conn.is_closed());
    }

    #[tokio::test]
    async fn connection_close_and_http10_answers_are_not_reused() {
        let (mut conn, _server) = serve(vec![reply(&[
            b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 2\r\n\r\nok",
        ])])
        .await;
        assert_eq!(answer(&mut conn).await, whole(200, 2));
        assert!(conn.is_closed());

        let (mut conn, _server) = serve(vec![reply(&[
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])])
        .await;
        assert_eq!(answer(&mut conn).await, whole(200, 2));
        assert!(conn.is_closed());

        let (mut conn, _server) = serve(vec![reply(&[
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
        ])])
        .await;
        assert_eq!(answer(&mut conn).await, whole(200, 2));
        assert!(!conn.is_closed());
    }

    #[tokio::test]
    async fn malformed_heads_fail_the_request() {
        for bad in [
            &b"HTTP/1.1 2x0 OK\r\n\r\n"[..],
            b"SMTP ready\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        ] {
            let (mut conn, _server) = serve(vec![Reply {
                pieces: vec![bad],
                close: false,
            }])
            .await;
            match get(&mut conn).await {
                Err(Failure::Request(_)) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bad)),
            }
            assert!(conn.is_closed());
        }
    }

    #[tokio::test]
    async fn malformed_chunks_fail_the_body() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabcd\r\n",
        ] {
            let (mut conn, _server) = serve(vec![reply(&[bad])]).await;
            match get(&mut conn).await {
                Err(Failure::Body(_)) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bad)),
            }
        }
    }

    #[tokio::test]
    async fn a_close_mid_answer_is_an_error() {
        // Before any byte of the answer, inside the head, inside a sized body, inside a chunk.
        let cases: [(&'static [u8], bool); 4] = [
            (b"", false),
            (b"HTTP/1.1 200 OK\r\ncontent-le", false),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\nabc",
                true,
            ),
        ];
        for (sent, after_head) in cases {
            let (mut conn, _server) = serve(vec![reply_then_close(&[sent])]).await;
            match (get(&mut conn).await, after_head) {
                (Err(Failure::Request(_)), false) | (Err(Failure::Body(_)), true) => {}
                (other, _) => panic!("{:?}: {other:?}", String::from_utf8_lossy(sent)),
            }
            assert!(conn.is_closed());
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_the_final_head_is_shown() {
        let (mut conn, _server) = serve(vec![reply(&[
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\nx-meridian-cache: interim\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Meridian-Cache: hit\r\ncontent-length: 3\r\n\r\nabc",
        ])])
        .await;
        let mut seen = None;
        let answer = conn
            .exchange(GET, false, |status, headers| {
                let cache = headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("x-meridian-cache"))
                    .map(|h| h.value.to_vec());
                seen = Some((status, cache));
            })
            .await
            .expect("a whole answer");
        assert_eq!(answer, whole(200, 3));
        assert_eq!(seen, Some((200, Some(b"hit".to_vec()))));
    }

    #[tokio::test]
    async fn bodyless_answers() {
        let (mut conn, _server) = serve(vec![
            reply(&[b"HTTP/1.1 204 No Content\r\n\r\n"]),
            reply(&[b"HTTP/1.1 304 Not Modified\r\ncontent-length: 99\r\n\r\n"]),
            reply(&[b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"]),
            reply(&[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]),
        ])
        .await;
        assert_eq!(answer(&mut conn).await, whole(204, 0));
        assert_eq!(answer(&mut conn).await, whole(304, 0));
        let head = b"HEAD / HTTP/1.1\r\nhost: t\r\n\r\n";
        let head_answer = conn
            .exchange(head, true, |_, _| {})
            .await
            .expect("a whole answer");
        assert_eq!(head_answer, whole(200, 0));
        assert_eq!(answer(&mut conn).await, whole(200, 0));
        assert!(!conn.is_closed());
    }

    #[tokio::test]
    async fn extra_bytes_after_an_answer_retire_the_connection() {
        let (mut conn, _server) = serve(vec![reply(&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
        ])])
        .await;
        assert_eq!(answer(&mut conn).await, whole(200, 2));
        assert!(conn.is_closed());
    }

    #[tokio::test]
    async fn a_server_closing_an_idle_connection_is_noticed() {
        let (mut conn, server) = serve(vec![reply_then_close(&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])])
        .await;
        assert_eq!(answer(&mut conn).await, whole(200, 2));
        server.await.expect("server task");
        // The reactor sees the close on its next turn.
        let mut closed = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if conn.is_closed() {
                closed = true;
                break;
            }
        }
        assert!(closed, "the server's close was not noticed");
    }

    #[tokio::test]
    async fn a_large_body_spans_many_reads() {
        static HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 300000\r\n\r\n";
        static BODY: [u8; 300_000] = [b'x'; 300_000];
        let (mut conn, _server) = serve(vec![reply(&[HEAD, &BODY])]).await;
        assert_eq!(answer(&mut conn).await, whole(200, 300_000));
    }

    #[test]
    fn requests_are_encoded_as_hyper_writes_them() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("bench.example.test"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let get = encode(&Method::GET, "/p?q=1", &headers, b"");
        assert_eq!(
            &get[..],
            b"GET /p?q=1 HTTP/1.1\r\nhost: bench.example.test\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        let post = encode(&Method::POST, "/", &headers, b"body");
        assert_eq!(
            &post[..],
            &b"POST / HTTP/1.1\r\nhost: bench.example.test\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 4\r\n\r\nbody"[..]
        );
        assert!(can_send(&headers));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        assert!(!can_send(&headers));
    }

    #[test]
    fn content_length_values() {
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"99999999999999999999999"), None);
    }
}
