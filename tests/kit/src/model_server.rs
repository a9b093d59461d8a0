//! Simulated OpenAI-compatible model servers, served by every simulated origin on
//! `POST /v1/chat/completions`, `/v1/completions` and `/v1/embeddings`.
//!
//! - `stream: true`: Server-Sent Events, one `data:` event per token at the configured interval,
//!   then a final event carrying `usage`, then `data: [DONE]`. A test can hold the end of every
//!   stream ([`ModelControl::hold_stream_end`]) to see tokens arrive while the server is not done.
//! - otherwise one JSON body with `usage` and, for checks, the exact request body it received.
//! - [`ModelControl::set_status`] makes it answer `429`/`503` with `Retry-After: 1`.
//! - `GET /metrics`: Prometheus text with vLLM's names — `vllm:num_requests_waiting`,
//!   `vllm:num_requests_running` (the calls it is serving), `vllm:kv_cache_usage_perc` and
//!   `vllm:lora_requests_info` — whose values a test can set ([`ModelControl::report`]).
//!
//! - [`ModelControl::set_capacity`] makes it behave like a GPU server under load: at most `slots`
//!   calls run at once, the rest wait in a queue (`vllm:num_requests_waiting`, and the KV cache
//!   fills with the running calls); each call's first token comes after a prefill whose time
//!   depends on whether the server holds the call's prompt prefix in its prefix cache (an LRU of
//!   the last `cache_entries` prefixes it served: the first message's content, or `prompt`; a
//!   prefix still being prefilled for another call is reused once that prefill ends). Calls in
//!   their prefill count as running. So time to first token grows with queueing and shrinks with
//!   prefix reuse, as it does on vLLM.
//!
//! Tokens: prompt = ⌈request body bytes / 4⌉, completion = `max_tokens` (default 8, at most 1000).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The response body of every simulated origin: whole or streamed.
pub type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub const DEFAULT_COMPLETION_TOKENS: u64 = 8;

/// Switches of one model server.
pub struct ModelControl {
    status: AtomicU16,
    token_interval_ms: AtomicU64,
    hold_end: watch::Sender<bool>,
    requests: AtomicU64,
    streams_completed: AtomicU64,
    /// Calls being served right now.
    running: Arc<AtomicU64>,
    /// What `/metrics` reports instead of the live state, when set.
    reported: Mutex<Option<Reported>>,
    scrapes: AtomicU64,
    /// Calls queued for a slot ([`ModelControl::set_capacity`]).
    waiting: Arc<AtomicU64>,
    capacity: Mutex<Option<Arc<Simulated>>>,
    prefix_hits: AtomicU64,
}

/// How a simulated GPU server serves calls ([`ModelControl::set_capacity`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Calls running at once; the rest wait.
    pub slots: usize,
    /// Time to the first token when the prompt prefix is not cached.
    pub prefill: Duration,
    /// Time to the first token when it is.
    pub cached_prefill: Duration,
    /// Prefixes the prefix cache holds (least recently used goes first).
    pub cache_entries: usize,
}

struct Simulated {
    capacity: Capacity,
    slots: Arc<Semaphore>,
    /// Prefixes and when their KV cache is complete (the end of the prefill that computed it),
    /// most recently used last.
    cache: Mutex<std::collections::VecDeque<(u64, Instant)>>,
}

impl Simulated {
    /// When the first token of a call for `prefix` that starts its prefill `now` is ready, and
    /// whether the prefix was cached. A prefix being prefilled by another call counts as cached,
    /// but its KV cache is complete only when that prefill ends: a call reusing it waits for it,
    /// as a server batching both would. Either way it is the most recently used prefix now.
    fn prefill(&self, prefix: u64, now: Instant) -> (Instant, bool) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let cached = cache
            .iter()
            .position(|&(p, _)| p == prefix)
            .and_then(|at| cache.remove(at));
        let (first_token, ready) = match cached {
            Some((_, ready)) => ((now + self.capacity.cached_prefill).max(ready), ready),
            None => {
                let ready = now + self.capacity.prefill;
                (ready, ready)
            }
        };
        cache.push_back((prefix, ready));
        while cache.len() > self.capacity.cache_entries {
            cache.pop_front();
        }
        (first_token, cached.is_some())
    }
}

/// Values `/metrics` reports, set by a test.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reported {
    pub waiting: u64,
    pub running: u64,
    /// 0 to 1.
    pub kv_cache: f64,
    pub adapters: Vec<String>,
}

impl Default for ModelControl {
    fn default() -> Self {
        Self {
            status: AtomicU16::new(0),
            token_interval_ms: AtomicU64::new(0),
            hold_end: watch::channel(false).0,
            requests: AtomicU64::new(0),
            streams_completed: AtomicU64::new(0),
            running: Arc::new(AtomicU64::new(0)),
            reported: Mutex::new(None),
            scrapes: AtomicU64::new(0),
            waiting: Arc::new(AtomicU64::new(0)),
            capacity: Mutex::new(None),
            prefix_hits: AtomicU64::new(0),
        }
    }
}

/// Counts a call as running until dropped.
struct Running(Arc<AtomicU64>);

impl Running {
    fn start(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Running(Arc::clone(counter))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ModelControl {
    /// Answer model calls with `status` (429, 503, ...) and `Retry-After: 1`; `None`: serve.
    pub fn set_status(&self, status: Option<u16>) {
        self.status.store(status.unwrap_or(0), Ordering::Relaxed);
    }
    /// Time between two streamed tokens.
    pub fn set_token_interval(&self, interval: Duration) {
        self.token_interval_ms
            .store(interval.as_millis() as u64, Ordering::Relaxed);
    }
    /// While `true`, streams stop before their last event (usage + `[DONE]`).
    pub fn hold_stream_end(&self, hold: bool) {
        self.hold_end.send_replace(hold);
    }
    /// Model calls received (any status).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Streams whose last event has been sent.
    pub fn streams_completed(&self) -> u64 {
        self.streams_completed.load(Ordering::Relaxed)
    }
    /// Makes `/metrics` report these values (`None`: the live state, no adapters).
    pub fn report(&self, reported: Option<Reported>) {
        *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = reported;
    }
    /// `GET /metrics` answered so far.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::Relaxed)
    }
    /// Serve like a loaded GPU server (`None`: every call at once, no prefill time).
    pub fn set_capacity(&self, capacity: Option<Capacity>) {
        let simulated = capacity.map(|capacity| {
            Arc::new(Simulated {
                capacity,
                slots: Arc::new(Semaphore::new(capacity.slots.max(1))),
                cache: Mutex::new(std::collections::VecDeque::new()),
            })
        });
        *self.capacity.lock().unwrap_or_else(|p| p.into_inner()) = simulated;
    }
    /// Calls whose prompt prefix was in the prefix cache.
    pub fn prefix_hits(&self) -> u64 {
        self.prefix_hits.load(Ordering::Relaxed)
    }
    /// Calls running now (holding a slot).
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    fn simulated(&self) -> Option<Arc<Simulated>> {
        self.capacity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for a slot (counted as waiting meanwhile).
    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let simulated = self.simulated()?;
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = Arc::clone(&simulated.slots).acquire_owned().await.ok();
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        permit
    }

    /// The prefill of a call holding a slot: shorter when its prompt prefix is cached.
    async fn prefill(&self, prefix: u64) {
        let Some(simulated) = self.simulated() else {
            return;
        };
        let (first_token, hit) = simulated.prefill(prefix, Instant::now());
        if hit {
            self.prefix_hits.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep_until(first_token).await;
    }

    fn metrics_text(&self) -> String {
        let reported = self
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| {
                let running = self.running.load(Ordering::Relaxed);
                let kv_cache = self
                    .simulated()
                    .map_or(0.0, |s| running as f64 / s.capacity.slots.max(1) as f64);
                Reported {
                    waiting: self.waiting.load(Ordering::Relaxed),
                    running,
                    kv_cache,
                    adapters: Vec::new(),
                }
            });
        let labels = r#"{model_name="simulated"}"#;
        format!(
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{labels} {}\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{labels} {}\n\
             # TYPE vllm:kv_cache_usage_perc gauge\n\
             vllm:kv_cache_usage_perc{labels} {}\n\
             # TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"\"}} 1.7e9\n",
            reported.waiting,
            reported.running,
            reported.kv_cache,
            reported.adapters.join(","),
        )
    }
}

/// Requests the simulated model server answers: model calls, and `GET /metrics`.
pub fn is_model_call(req: &Request<Incoming>) -> bool {
    (req.method() == hyper::Method::GET && req.uri().path() == "/metrics")
        || req.method() == hyper::Method::POST
            && matches!(
                req.uri().path(),
                "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings"
            )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<OriginBody> {
    crate::httpd::json(status, value).map(|b| b.boxed())
}

pub async fn handle(
    control: Arc<ModelControl>,
    region: String,
    req: Request<Incoming>,
) -> Response<OriginBody> {
    if req.method() == hyper::Method::GET {
        control.scrapes.fetch_add(1, Ordering::Relaxed);
        let mut resp = Response::new(
            http_body_util::Full::new(Bytes::from(control.metrics_text()))
                .map_err(|never| match never {})
                .boxed(),
        );
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        return resp;
    }
    control.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": {"message": "bad body", "type": "invalid_request_error", "code": null}}),
            )
        }
    };
    let forced = control.status.load(Ordering::Relaxed);
    if forced != 0 {
        let status = StatusCode::from_u16(forced).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut resp = json(
            status,
            &serde_json::json!({"error": {"message": format!("{region} is saturated"), "type": "server_error", "code": "overloaded"}, "region": region}),
        );
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
        return resp;
    }
    let request: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": {"message": e.to_string(), "type": "invalid_request_error", "code": null}}),
            )
        }
    };
    let prefix = request["messages"][0]["content"]
        .as_str()
        .or(request["prompt"].as_str())
        .map_or(0, prefix_key);
    let permit = control.admit().await;
    // A call in its prefill runs (vLLM counts it in `num_requests_running`).
    let running = Running::start(&control.running);
    control.prefill(prefix).await;
    let model = request["model"].as_str().unwrap_or("unknown").to_string();
    let prompt_tokens = (body.len() as u64).div_ceil(4);
    let completion_tokens = request["max_tokens"]
        .as_u64()
        .unwrap_or(DEFAULT_COMPLETION_TOKENS)
        .min(1000);
    let request_body = String::from_utf8_lossy(&body).into_owned();
    if path == "/v1/embeddings" {
        return json(
            StatusCode::OK,
            &serde_json::json!({
                "object": "list",
                "model": model,
                "region": region,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                "request_body": request_body,
            }),
        );
    }
    let usage = serde_json::json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    if request["stream"].as_bool() != Some(true) {
        let text: Vec<String> = (0..completion_tokens).map(|i| format!("tok{i}")).collect();
        return json(
            StatusCode::OK,
            &serde_json::json!({
                "id": "chatcmpl-meridian",
                "object": "chat.completion",
                "model": model,
                "region": region,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.join(" ")}, "finish_reason": "stop"}],
                "usage": usage,
                "request_body": request_body,
            }),
        );
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(stream_tokens(
        (running, permit),
        control,
        region,
        model,
        completion_tokens,
        usage,
        tx,
    ));
    let mut resp = Response::new(ChannelBody { rx }.boxed());
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    resp
}

async fn stream_tokens(
    _running: (Running, Option<OwnedSemaphorePermit>),
    control: Arc<ModelControl>,
    region: String,
    model: String,
    tokens: u64,
    usage: serde_json::Value,
    tx: mpsc::Sender<Bytes>,
) {
    let event = |value: serde_json::Value| Bytes::from(format!("data: {value}\n\n"));
    for i in 0..tokens {
        let interval = control.token_interval_ms.load(Ordering::Relaxed);
        if interval > 0 && i > 0 {
            tokio::time::sleep(Duration::from_millis(interval)).await;
        }
        let chunk = event(serde_json::json!({
            "id": "chatcmpl-meridian",
            "object": "chat.completion.chunk",
            "model": model,
            "region": region,
            "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}],
            "usage": null,
        }));
        if tx.send(chunk).await.is_err() {
            return; // the client went away
        }
    }
    let mut hold = control.hold_end.subscribe();
    if hold.wait_for(|held| !*held).await.is_err() {
        return;
    }
    let last = event(serde_json::json!({
        "id": "chatcmpl-meridian",
        "object": "chat.completion.chunk",
        "model": model,
        "region": region,
        "choices": [],
        "usage": usage,
    }));
    let mut done = last.to_vec();
    done.extend_from_slice(b"data: [DONE]\n\n");
    if tx.send(Bytes::from(done)).await.is_ok() {
        control.streams_completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The prefix cache's key of a prompt's first message (FNV-1a).
fn prefix_key(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A response body fed chunk by chunk from a channel (ends when the sender drops).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}
