//! `meridian-loadtest origin`: a fast fake origin for benchmarks, the demo and tests. Every request
//! gets a fixed-size body after `latency + U[0, jitter)`, or a `503` with probability `fail_rate`.
//! `/v1/chat/completions` with `"stream": true` in the JSON body (or `?stream=true`) answers a
//! server-sent event stream of `sse_events` events, `sse_interval` apart.

use std::convert::Infallible;
use std::io::Write as _;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use crate::cli::OriginArgs;

/// Largest body a request may ask for with `?bytes=N`.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Request bodies are read (and discarded) up to this size; more is answered `413`.
const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;

type Body = BoxBody<Bytes, Infallible>;

struct Origin {
    latency: Duration,
    jitter: Duration,
    fail_rate: f64,
    body: Bytes,
    sse_events: u32,
    sse_interval: Duration,
}

pub fn main(args: OriginArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&args.fail_rate) {
        bail!("--fail-rate must be within 0.0 ..= 1.0");
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(serve(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: OriginArgs) -> anyhow::Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let socket = if args.listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(args.listen)
        .with_context(|| format!("bind {}", args.listen))?;
    let listener: TcpListener = socket.listen(4096)?;
    let local = listener.local_addr()?;
    {
        // The first line is a contract: scripts and tests read the address from it.
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {local}")?;
        stdout.flush()?;
    }
    let origin = Arc::new(Origin {
        latency: args.latency,
        jitter: args.jitter,
        fail_rate: args.fail_rate,
        body: Bytes::from(vec![b'x'; args.body_bytes]),
        sse_events: args.sse_events,
        sse_interval: args.sse_interval,
    });
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                // Out of file descriptors and the like: keep serving the connections we have.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let origin = Arc::clone(&origin);
        let builder = Arc::clone(&builder);
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&origin), req));
            match tls {
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            }
        });
    }
}

fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn handle(origin: Arc<Origin>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/healthz" {
        return Ok(full(
            StatusCode::OK,
            "text/plain",
            Bytes::from_static(b"ok\n"),
        ));
    }
    let query = req.uri().query().unwrap_or_default().to_string();
    let stream_path = req.uri().path() == "/v1/chat/completions";
    let size = query_value(&query, "bytes")
        .and_then(|v| v.parse::<usize>().ok())
        .map(|n| n.min(MAX_BODY_BYTES));
    // Read the whole request body (benchmarks POST 16 KiB), bounded.
    let body = match http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return Ok(full(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                Bytes::from_static(b"request body too large or broken\n"),
            ))
        }
    };
    let delay = {
        let mut rng = rand::thread_rng();
        let jitter = if origin.jitter.is_zero() {
            Duration::ZERO
        } else {
            origin.jitter.mul_f64(rng.gen::<f64>())
        };
        let fail = origin.fail_rate > 0.0 && rng.gen::<f64>() < origin.fail_rate;
        (origin.latency + jitter, fail)
    };
    if !delay.0.is_zero() {
        tokio::time::sleep(delay.0).await;
    }
    if delay.1 {
        return Ok(full(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"injected failure\n"),
        ));
    }
    let wants_stream = stream_path
        && (query_value(&query, "stream") == Some("true") || body_asks_for_stream(&body));
    if wants_stream {
        return Ok(sse(&origin));
    }
    let body = match size {
        Some(n) if n <= origin.body.len() => origin.body.slice(..n),
        Some(n) => Bytes::from(vec![b'x'; n]),
        None => origin.body.clone(),
    };
    Ok(full(StatusCode::OK, "application/octet-stream", body))
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn body_asks_for_stream(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
        .unwrap_or(false)
}

/// An OpenAI-style token stream: `sse_events` `data:` events then `data: [DONE]`.
fn sse(origin: &Origin) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let (events, interval) = (origin.sse_events, origin.sse_interval);
    tokio::spawn(async move {
        for i in 0..events {
            if !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            let event = format!(
                "data: {{\"id\":\"lt-{i}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n"
            );
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut response = Response::new(ChannelBody { rx }.boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}
