//! A small hyper-based HTTP/1.1 server loop for the admin listener and the standalone GeoDNS
//! metrics (neither is on the proxy path, so hyper's simplicity wins over Pingora here).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type Body = Full<Bytes>;

/// Bounds of a small listener: a client that never finishes its request head, or a flood of
/// connections, must not hold the process's sockets forever.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time to send a whole request head, counted from the end of the previous answer on a
    /// keep-alive connection too, so it is also the idle timeout.
    pub header_timeout: Duration,
    /// Open connections at most; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// Largest request head buffered.
    pub max_head_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_head_bytes: 64 * 1024,
        }
    }
}

/// Pause after a failed accept (EMFILE, ENFILE, ENOBUFS), doubling while it keeps failing: only
/// a closing connection clears such an error, and retrying at once would spin a core.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `handler` on `listener` until `stop` turns true; open connections are closed
/// gracefully. Bounded by the default [`Limits`].
pub async fn serve<H, F, B>(listener: TcpListener, handler: H, stop: watch::Receiver<bool>)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    // Any body: `Body` (whole) for most servers, a streaming one for the simulated model servers.
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_with(listener, Limits::default(), handler, stop).await;
}

pub async fn serve_with<H, F, B>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let handler = Arc::new(handler);
    // Connection tasks are tracked so that `serve` returns only once every connection is closed:
    // a caller that stops a server can rely on it being gone.
    let mut connections = tokio::task::JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let room = connections.len() < limits.max_connections;
        let accepted = tokio::select! {
            accepted = listener.accept(), if room => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}; pausing {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        let mut stop = stop.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let handler = Arc::clone(&handler);
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            // Without a timer hyper silently ignores `header_read_timeout`.
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_head_bytes.max(8192))
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            // Idle keep-alive connections close at once; in-flight requests finish first.
            let _ = conn.await;
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Raises this process's open-file limit from its soft value to the hard one: every client,
/// upstream and listener socket is a file, and distributions start processes at a soft limit
/// of 1024. Returns the limit now in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard.max(soft))
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    respond(status, "application/json", value.to_string())
}

pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: Limits) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(serve_with(
            listener,
            limits,
            |_req| async { text(StatusCode::OK, "ok") },
            stop_rx,
        ));
        (addr, stop)
    }

    /// Reads until the server closes the connection; the bytes it sent.
    async fn until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut seen = Vec::new();
        // Bounded so that a server that never closes fails the test instead of hanging it.
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut seen));
        read.await.expect("the server closed the connection").ok();
        seen
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_head_or_stays_idle_is_disconnected() {
        let limits = Limits {
            header_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, _stop) = start(limits).await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .expect("write");
        until_closed(&mut slow).await;

        // Keep-alive: after an answer, silence is bounded the same way.
        let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let answer = until_closed(&mut idle).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }

    #[tokio::test]
    async fn past_the_connection_cap_new_clients_wait_until_one_leaves() {
        let limits = Limits {
            header_timeout: Duration::from_secs(30),
            max_connections: 1,
            ..Limits::default()
        };
        let (addr, _stop) = start(limits).await;
        let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
        first
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut head = [0u8; 12];
        first.read_exact(&mut head).await.expect("first answered");
        // The second connection is accepted by the kernel but not served while the first is
        // open; it is answered once the first closes.
        let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
        second
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        drop(first);
        let answer = until_closed(&mut second).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let (addr, _stop) = start(Limits::default()).await;
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let filler = "x".repeat(128 * 1024);
        let request = format!("GET / HTTP/1.1\r\nhost: x\r\nx-filler: {filler}\r\n\r\n");
        let _ = client.write_all(request.as_bytes()).await;
        let answer = until_closed(&mut client).await;
        assert!(!answer.starts_with(b"HTTP/1.1 200"));
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{getrlimit, Resource};
        let now = raise_open_file_limit().expect("raise");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!(soft, hard);
        assert_eq!(now, hard);
    }
}
