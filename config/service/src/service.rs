//! The config service's HTTP API (HTTP/1.1, hyper 1):
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/config` | 200 TOML + `ETag: "<n>"`, `X-Meridian-Version`, `X-Meridian-Sha256`; 404 when empty |
//! | `GET /v1/config?after=N&wait=30s` | long-poll: 200 as soon as a version > N exists, else 304 |
//! | `PUT /v1/config` (token) | 201 VersionMeta; 409 on `If-Match` mismatch; 413; 422 with every error |
//! | `GET /v1/history` | VersionMeta array, newest first |
//! | `POST /v1/purge` (token) | 202 `{"seq": n}`: a cache purge (`{"url"\|"prefix"\|"tag": …}`) for every edge |
//! | `GET /v1/purges?after=N&wait=30s` | long-poll: purges after N (`PurgeBatch`); without `after`, the cursor |
//! | `GET /v1/versions/{n}` | 200 TOML as above, or 404 |
//! | `POST /v1/rollback/{n}` (token) | 201 VersionMeta of the new version, or 404 |
//! | `GET /healthz` | 200 `ok` |
//!
//! Every error body is JSON `{"error": "..."}`. Every `GET` under `/v1/` (the long-polls too)
//! needs a token: the read token when one is configured, else the write token — the document
//! holds API key hashes and the whole routing. Only `public_reads` opens reads to anyone.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::store::{ConfigStore, PutError, StoredVersion};
use crate::versions::{FileStore, Unavailable, VersionStore};
use crate::wire::{self, header_text, parse_version_tag};
use meridian_config::HumanDuration;

/// Longest long-poll a client may ask for; longer `wait`s are capped to this.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Long-poll duration when `after` is given without `wait`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// How long a client may take to send its request headers (also the keep-alive idle limit).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (line and headers) read before the connection is refused.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Pause after a failed accept, doubling up to the maximum while it keeps failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long a client may take to send a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish after shutdown was requested.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// An oversized body is read and discarded up to this many bytes (so the client reliably sees
/// the 413 instead of a reset); beyond it the connection is simply closed.
const DISCARD_LIMIT: u64 = 16 * 1024 * 1024;

type Body = Full<Bytes>;

pub struct ServiceState {
    pub store: Arc<dyn VersionStore>,
    /// Bearer token required for writes. An empty token disables every write (401).
    pub token: String,
    /// Bearer token required for reads (the write token is accepted too). `None`: reads need
    /// the write token, unless `public_reads`.
    pub read_token: Option<String>,
    /// Reads need no token at all when no read token is set (`--public-reads`).
    pub public_reads: bool,
    /// Largest accepted `PUT /v1/config` body; more is answered `413`.
    pub max_body_bytes: usize,
    /// Open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Pending long-polls (config and purges) at most; more are answered 503 at once, so that
    /// watchers cannot take every connection slot from pushes.
    pub max_long_polls: usize,
    long_polls: std::sync::atomic::AtomicUsize,
    /// Serve HTTPS instead of plain HTTP ([`crate::tls::acceptor`]).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// `Some`: only requests whose `Host` is a loopback name or address or one of these are
    /// served (DNS rebinding; [`crate::host`]). `None`: any `Host`.
    pub allowed_hosts: Option<Vec<String>>,
}

impl ServiceState {
    pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
    pub const DEFAULT_MAX_LONG_POLLS: usize = 768;

    /// The API over the embedded file store.
    pub fn new(store: ConfigStore, token: impl Into<String>) -> Self {
        Self::with_store(Arc::new(FileStore(Arc::new(store))), token)
    }

    /// The API over any version store (etcd for replicated config servers).
    pub fn with_store(store: Arc<dyn VersionStore>, token: impl Into<String>) -> Self {
        Self {
            store,
            token: token.into(),
            read_token: None,
            public_reads: false,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_long_polls: Self::DEFAULT_MAX_LONG_POLLS,
            long_polls: std::sync::atomic::AtomicUsize::new(0),
            tls: None,
            allowed_hosts: None,
        }
    }

    /// Requires `token` for reads too.
    pub fn with_read_token(mut self, token: Option<String>) -> Self {
        self.read_token = token.filter(|t| !t.is_empty());
        self
    }

    /// Reads are open to anyone only when asked for; otherwise a separate read token lets
    /// edges read without holding the power to write.
    fn may_read(&self, headers: &http::HeaderMap) -> bool {
        match &self.read_token {
            Some(read) => authorized(headers, read) || authorized(headers, &self.token),
            None if self.public_reads => true,
            None => authorized(headers, &self.token),
        }
    }

    /// Takes a long-poll slot; `None` when all are taken.
    fn long_poll(&self) -> Option<LongPollSlot<'_>> {
        use std::sync::atomic::Ordering;
        let taken = self.long_polls.fetch_add(1, Ordering::AcqRel);
        let slot = LongPollSlot(&self.long_polls);
        (taken < self.max_long_polls).then_some(slot)
    }
}

struct LongPollSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for LongPollSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Serves the API on `listener` until `shutdown` completes, then stops accepting, ends pending
/// long-polls (503) and lets open connections finish (bounded by a timeout).
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServiceState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // At the cap, stop accepting until a connection ends: the rest wait in the backlog.
        let room = connections.len() < state.max_connections;
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept(), if room => match accepted {
                Ok((stream, _peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    let stop = stop_rx.clone();
                    connections.spawn(async move {
                        match &state.tls {
                            None => serve_connection(stream, state.clone(), stop).await,
                            Some(acceptor) => {
                                let handshake = tokio::time::timeout(
                                    HEADER_READ_TIMEOUT,
                                    acceptor.accept(stream),
                                );
                                match handshake.await {
                                    Ok(Ok(tls)) => serve_connection(tls, state.clone(), stop).await,
                                    Ok(Err(e)) => tracing::debug!(error = %e, "config service TLS handshake failed"),
                                    Err(_) => tracing::debug!("config service TLS handshake timed out"),
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    // Typically EMFILE: keep serving, but back off instead of spinning on an
                    // error that only a closing connection clears.
                    tracing::warn!(error = %e, "config service accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    stop_tx.send_replace(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn serve_connection<I>(stream: I, state: Arc<ServiceState>, mut stop: watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handler_stop = stop.clone();
    let service = service_fn(move |request| {
        let state = state.clone();
        let stop = handler_stop.clone();
        async move { Ok::<_, Infallible>(handle(request, state, stop).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "config service connection ended with an error");
            }
        }
        () = stopping(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, connection).await;
        }
    }
}

/// Completes once shutdown has begun (the watch `Ref` is not held across any await).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<ServiceState>,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    if let Some(allowed) = &state.allowed_hosts {
        if !crate::host::allowed(request.headers().get(header::HOST), allowed) {
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                "this Host is not served here",
            );
        }
    }
    if method == Method::GET && path.starts_with("/v1/") && !state.may_read(request.headers()) {
        return unauthorized();
    }
    match path.as_str() {
        "/v1/purge" => match method {
            Method::POST => post_purge(request, state).await,
            _ => not_allowed("POST"),
        },
        "/v1/purges" => match method {
            Method::GET => get_purges(request.uri().query(), &state, stop).await,
            _ => not_allowed("GET"),
        },
        "/healthz" => match method {
            Method::GET => text(StatusCode::OK, "ok"),
            _ => not_allowed("GET"),
        },
        "/v1/config" => match method {
            Method::GET => get_config(request.uri().query(), request.headers(), &state, stop).await,
            Method::PUT => put_config(request, state).await,
            _ => not_allowed("GET, PUT"),
        },
        "/v1/history" => match method {
            Method::GET => match state.store.history().await {
                Ok(history) => json_response(StatusCode::OK, &history),
                Err(e) => unavailable(&e),
            },
            _ => not_allowed("GET"),
        },
        _ => {
            if let Some(n) = path.strip_prefix("/v1/versions/") {
                match method {
                    Method::GET => match parse_path_version(n) {
                        Ok(n) => match state.store.get(n).await {
                            Ok(Some(version)) => document(&version),
                            Ok(None) => error(StatusCode::NOT_FOUND, &format!("no version {n}")),
                            Err(e) => unavailable(&e),
                        },
                        Err(reject) => reject.into_response(),
                    },
                    _ => not_allowed("GET"),
                }
            } else if let Some(n) = path.strip_prefix("/v1/rollback/") {
                match method {
                    Method::POST => match parse_path_version(n) {
                        Ok(n) => rollback(request, state, n).await,
                        Err(reject) => reject.into_response(),
                    },
                    _ => not_allowed("POST"),
                }
            } else {
                error(StatusCode::NOT_FOUND, "not found")
            }
        }
    }
}

async fn get_config(
    query: Option<&str>,
    headers: &http::HeaderMap,
    state: &ServiceState,
    mut stop: watch::Receiver<bool>,
) -> Response<Body> {
    let (after, wait) = match parse_watch_query(query) {
        Ok(Some(watch)) => watch,
        Ok(None) => {
            let current = match state.store.current().await {
                Ok(Some(current)) => current,
                Ok(None) => return error(StatusCode::NOT_FOUND, "no config version stored yet"),
                Err(e) => return unavailable(&e),
            };
            let if_none_match = headers
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_version_tag);
            if if_none_match == Some(current.meta.version) {
                return not_modified();
            }
            return document(&current);
        }
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let Some(_slot) = state.long_poll() else {
        return busy();
    };
    // Subscribe before looking: a put that lands in between is then seen by `wait_for`.
    let mut latest = state.store.subscribe();
    let newer = async { latest.wait_for(|&version| version > after).await.is_ok() };
    tokio::select! {
        waited = tokio::time::timeout(wait, newer) => {
            if waited != Ok(true) {
                return not_modified();
            }
        }
        () = stopping(&mut stop) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "config service is shutting down");
        }
    }
    match state.store.current().await {
        Ok(Some(current)) => document(&current),
        Ok(None) => not_modified(),
        Err(e) => unavailable(&e),
    }
}

/// `None` for a plain GET; `Some((after, wait))` for a long-poll.
fn parse_watch_query(query: Option<&str>) -> Result<Option<(u64, Duration)>, String> {
    let mut after = None;
    let mut wait = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "after" => {
                let n = value
                    .parse::<u64>()
                    .map_err(|_| format!("after={value:?} is not a version number"))?;
                after = Some(n);
            }
            "wait" => {
                let duration = HumanDuration::parse(value).map_err(|e| format!("wait: {e}"))?;
                wait = Some(duration.as_duration().min(MAX_WAIT));
            }
            other => return Err(format!("unknown query parameter {other:?}")),
        }
    }
    match (after, wait) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err("wait needs after=<version>".into()),
        (Some(after), wait) => Ok(Some((after, wait.unwrap_or(DEFAULT_WAIT)))),
    }
}

async fn post_purge(request: Request<Incoming>, state: Arc<ServiceState>) -> Response<Body> {
    if !authorized(request.headers(), &state.token) {
        return unauthorized();
    }
    let body = match read_body(request, crate::purges::MAX_PURGE_BYTES).await {
        Ok(body) => body,
        Err(reject) => return reject.into_response(),
    };
    let purge = match crate::purges::parse_purge(&body) {
        Ok(purge) => purge,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match state.store.purge(purge.clone()).await {
        Ok(seq) => {
            tracing::info!(%purge, seq, "fleet-wide cache purge");
            json_response(StatusCode::ACCEPTED, &json!({ "seq": seq }))
        }
        Err(e) => unavailable(&e),
    }
}

/// Without `after`: the cursor to poll from (no purges). With it: the purges after it, as soon
/// as there are any or when `wait` is over (then with none).
async fn get_purges(
    query: Option<&str>,
    state: &ServiceState,
    mut stop: watch::Receiver<bool>,
) -> Response<Body> {
    let purges = state.store.purges();
    let (after, wait) = match parse_watch_query(query) {
        Ok(Some(watch)) => watch,
        Ok(None) => {
            let cursor = crate::purges::PurgeBatch {
                seq: purges.latest(),
                purges: Vec::new(),
                lost: false,
            };
            return json_response(StatusCode::OK, &cursor);
        }
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let Some(_slot) = state.long_poll() else {
        return busy();
    };
    let mut latest = purges.subscribe();
    let newer = async { latest.wait_for(|&seq| seq != after).await.is_ok() };
    tokio::select! {
        _ = tokio::time::timeout(wait, newer) => {}
        () = stopping(&mut stop) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "config service is shutting down");
        }
    }
    json_response(StatusCode::OK, &purges.after(after))
}

fn busy() -> Response<Body> {
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many pending long-polls",
    );
    set_header(&mut response, "retry-after", "1");
    response
}

async fn put_config(request: Request<Incoming>, state: Arc<ServiceState>) -> Response<Body> {
    if !authorized(request.headers(), &state.token) {
        return unauthorized();
    }
    let if_match = match request.headers().get(header::IF_MATCH) {
        None => None,
        Some(value) => match value.to_str().map(str::trim) {
            Ok("*") => None,
            Ok(tag) => match parse_version_tag(tag) {
                Some(n) => Some(n),
                None => return error(StatusCode::BAD_REQUEST, "If-Match must be a version"),
            },
            Err(_) => return error(StatusCode::BAD_REQUEST, "If-Match must be a version"),
        },
    };
    let author = author(&request);
    let message = header_text(request.headers(), wire::MESSAGE).unwrap_or_default();
    let body = match read_body(request, state.max_body_bytes).await {
        Ok(body) => body,
        Err(reject) => return reject.into_response(),
    };
    let Ok(document) = String::from_utf8(body.to_vec()) else {
        return error(StatusCode::BAD_REQUEST, "the document is not UTF-8");
    };
    put_response(state.store.put(document, author, message, if_match).await)
}

async fn rollback(
    request: Request<Incoming>,
    state: Arc<ServiceState>,
    version: u64,
) -> Response<Body> {
    if !authorized(request.headers(), &state.token) {
        return unauthorized();
    }
    let author = author(&request);
    put_response(state.store.rollback(version, author).await)
}

fn put_response(result: Result<crate::VersionMeta, PutError>) -> Response<Body> {
    match result {
        Ok(meta) => {
            let mut response = json_response(StatusCode::CREATED, &meta);
            set_header(&mut response, "etag", &format!("\"{}\"", meta.version));
            set_header(
                &mut response,
                "location",
                &format!("/v1/versions/{}", meta.version),
            );
            response
        }
        Err(PutError::Parse(message)) => invalid(json!([{ "path": "", "message": message }])),
        Err(PutError::Invalid(errors)) => invalid(json!(errors)),
        Err(PutError::Conflict { current }) => json_response(
            StatusCode::CONFLICT,
            &json!({ "error": "conflict", "current": current }),
        ),
        Err(PutError::NoSuchVersion(n)) => error(StatusCode::NOT_FOUND, &format!("no version {n}")),
        Err(PutError::Unavailable(e)) => {
            // Nothing is known to be written: the client may retry (after checking history
            // when the write may have landed before the answer was lost).
            tracing::warn!(error = %e, "config store unavailable for a write");
            error(StatusCode::SERVICE_UNAVAILABLE, "config store unavailable")
        }
        Err(PutError::Io(e)) => {
            tracing::error!(error = %e, "config store write failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "config store write failed",
            )
        }
    }
}

fn author(request: &Request<Incoming>) -> String {
    header_text(request.headers(), wire::AUTHOR)
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| "anonymous".into())
}

/// Reads the whole body, answering 413 past `max` bytes and 408 when the client stalls.
async fn read_body(request: Request<Incoming>, max: usize) -> Result<Bytes, Reject> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut body = request.into_body();
    if declared.is_some_and(|n| n > max as u64) {
        // A 100-continue client has sent nothing yet: answer without making it upload.
        if !expects_continue {
            discard(body).await;
        }
        return Err(Reject::too_large(max));
    }
    let collect = async {
        let mut collected = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue; // trailers
            };
            if collected.len() + data.len() > max {
                return Ok(None);
            }
            collected.extend_from_slice(&data);
        }
        Ok::<_, hyper::Error>(Some(collected))
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, collect).await {
        Err(_) => Err(Reject::new(
            StatusCode::REQUEST_TIMEOUT,
            "timed out reading the request body",
        )),
        Ok(Ok(Some(collected))) => Ok(Bytes::from(collected)),
        Ok(Ok(None)) => {
            discard(body).await;
            Err(Reject::too_large(max))
        }
        Ok(Err(_)) => Err(Reject::new(
            StatusCode::BAD_REQUEST,
            "cannot read the request body",
        )),
    }
}

async fn discard(mut body: Incoming) {
    let drain = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |data| data.len() as u64);
            if seen > DISCARD_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(BODY_READ_TIMEOUT, drain).await;
}

/// `Authorization: Bearer <token>`, compared in constant time (over digests, so the length of
/// the token does not leak either).
fn authorized(headers: &http::HeaderMap, token: &str) -> bool {
    if token.is_empty() {
        return false;
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(presented) = value
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
        .and_then(|_| value.get(7..))
    else {
        return false;
    };
    let presented = Sha256::digest(presented.trim_ascii());
    let expected = Sha256::digest(token.as_bytes());
    presented
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn parse_path_version(text: &str) -> Result<u64, Reject> {
    if text.contains('/') {
        return Err(Reject::new(StatusCode::NOT_FOUND, "not found"));
    }
    text.parse()
        .map_err(|_| Reject::new(StatusCode::BAD_REQUEST, "the version must be a number"))
}

/// An error answer decided by a helper (kept small; turned into a response at the end).
struct Reject {
    status: StatusCode,
    message: String,
}

impl Reject {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn too_large(max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the document is larger than {max} bytes"),
        )
    }

    fn into_response(self) -> Response<Body> {
        let mut response = error(self.status, &self.message);
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // Whatever is left of the body is not worth reading.
            set_header(&mut response, "connection", "close");
        }
        response
    }
}

fn document(version: &StoredVersion) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(version.document.clone())));
    set_header(&mut response, "content-type", "application/toml");
    set_header(&mut response, "cache-control", "no-cache");
    for (name, value) in wire::version_headers(&version.meta) {
        set_header(&mut response, name, &value);
    }
    response
}

fn unavailable(e: &Unavailable) -> Response<Body> {
    tracing::warn!(error = %e, "config store read failed");
    error(StatusCode::SERVICE_UNAVAILABLE, "config store unavailable")
}

fn invalid(errors: serde_json::Value) -> Response<Body> {
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({ "error": "invalid config", "errors": errors }),
    )
}

fn unauthorized() -> Response<Body> {
    let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    set_header(&mut response, "www-authenticate", "Bearer");
    response
}

fn not_allowed(allow: &str) -> Response<Body> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    set_header(&mut response, "allow", allow);
    response
}

fn not_modified() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    response
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{\"error\":\"internal\"}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    set_header(&mut response, "content-type", "application/json");
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    set_header(&mut response, "content-type", "text/plain");
    response
}

fn set_header(response: &mut Response<Body>, name: &'static str, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(value) => {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
        Err(_) => tracing::warn!(header = name, "dropping a header value that is not valid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_query() {
        assert_eq!(parse_watch_query(None), Ok(None));
        assert_eq!(parse_watch_query(Some("")), Ok(None));
        assert_eq!(
            parse_watch_query(Some("after=3&wait=50ms")),
            Ok(Some((3, Duration::from_millis(50))))
        );
        assert_eq!(
            parse_watch_query(Some("after=3")),
            Ok(Some((3, DEFAULT_WAIT)))
        );
        assert_eq!(
            parse_watch_query(Some("after=3&wait=1h")),
            Ok(Some((3, MAX_WAIT)))
        );
        assert!(parse_watch_query(Some("wait=5s")).is_err());
        assert!(parse_watch_query(Some("after=x")).is_err());
        assert!(parse_watch_query(Some("after=1&wait=5")).is_err());
        assert!(parse_watch_query(Some("after=1&colour=red")).is_err());
    }

    #[test]
    fn bearer_token() {
        let mut headers = http::HeaderMap::new();
        assert!(!authorized(&headers, "s3cret"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(authorized(&headers, "s3cret"));
        assert!(!authorized(&headers, "s3cret2"));
        assert!(!authorized(&headers, ""));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer s3cret"),
        );
        assert!(authorized(&headers, "s3cret"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic s3cret"),
        );
        assert!(!authorized(&headers, "s3cret"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert!(!authorized(&headers, "s3cret"));
    }
}
