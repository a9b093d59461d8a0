//! The load engine. Closed loop: each lane sends its next request when the previous one finished.
//! Open loop: arrival times are fixed in advance (`start + k / rate`) and every latency is measured
//! from its scheduled time, so a slow server cannot hide its queueing (coordinated omission).

use std::future::Future;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::pin::{pin, Pin};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Uri};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tokio::time::Sleep;

use crate::cli::{LoadArgs, ProtocolArg, Scenario};
use crate::geo::{apportion, GeoMix, Plan, SmoothRoundRobin};
use crate::h1lean::{self, Failure};
use crate::protocol::{Conn, ConnectError, Connector, Protocol, TlsSettings};
use crate::report;
use crate::stats::{bump, record_micros, ErrorKind, Stats};

const DEFAULT_DURATION: Duration = Duration::from_secs(10);
const SSE_DEFAULT_BODY: &str =
    r#"{"model":"qwen-turbo","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Closed,
    Open { rate: f64 },
}

/// Everything a run needs, checked before the first request.
pub struct Settings {
    pub url: String,
    pub protocol: Protocol,
    pub tls: bool,
    pub mode: Mode,
    pub scenario: Scenario,
    pub connections: usize,
    pub streams: usize,
    /// Every request on a fresh connection (handshake throughput).
    pub reconnect: bool,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    pub timeout: Duration,
    pub geo_mix: Option<String>,
    pub method: Method,
    pub host: String,
    pub path: String,
    quiet: bool,
    plan: Plan,
    connector: Connector,
    template: Template,
    /// Cleartext HTTP/1.1 load goes through the lean client with this request, encoded once.
    lean: Option<LeanRequest>,
}

struct LeanRequest {
    bytes: Bytes,
    /// A HEAD request: its answer has no body, whatever the head says.
    head: bool,
}

/// The request every lane sends, prebuilt.
struct Template {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Template {
    fn build(&self) -> Request<Bytes> {
        let mut request = Request::new(self.body.clone());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

pub fn main(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime(args.threads)?;
    let json_path = args.json.clone();
    let settings = Settings::from_args(args)?;
    let settings = Arc::new(settings);
    let outcome = runtime.block_on(run(Arc::clone(&settings)));
    let json = report::json(&settings, &outcome);
    print!("{}", report::summary(&settings, &outcome));
    if let Some(path) = json_path {
        write_json(&path, &json)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The generator's runtime: `threads` workers (default: the number of CPUs), 1 = current-thread.
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

pub fn write_json(path: &std::path::Path, json: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(json)?;
    std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))
}

impl Settings {
    pub fn from_args(args: LoadArgs) -> anyhow::Result<Self> {
        let url = args
            .url
            .clone()
            .context("a target URL is needed, e.g. meridian-loadtest http://127.0.0.1:8080/")?;
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("URL {url:?} must start with http:// or https://"),
        };
        let authority = uri
            .authority()
            .with_context(|| format!("URL {url:?} has no host"))?
            .clone();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let target = resolve_loopback(authority.host(), port)?;
        let protocol = match args.protocol {
            ProtocolArg::H1 => Protocol::Http1,
            ProtocolArg::H2 => Protocol::Http2,
            ProtocolArg::H3 => Protocol::Http3,
        };
        if args.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if args.streams == 0 || (args.streams > 1 && protocol == Protocol::Http1) {
            bail!(
                "--streams N (N >= 1) is for h2 and h3; HTTP/1.1 has one request at a time per connection"
            );
        }
        if args.reconnect && args.streams > 1 {
            bail!("--reconnect opens a connection per request, so --streams cannot share one");
        }
        let mode = match args.rate {
            None => Mode::Closed,
            Some(rate) if rate.is_finite() && rate > 0.0 => Mode::Open { rate },
            Some(rate) => bail!("--rate must be a positive number, not {rate}"),
        };
        let duration = match (args.duration, args.requests) {
            (None, None) => Some(DEFAULT_DURATION),
            (d, _) => d,
        };
        let host = args
            .host
            .clone()
            .unwrap_or_else(|| authority.as_str().to_string());
        let mut path = args.path.clone().unwrap_or_else(|| {
            uri.path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into())
        });
        let mut body = match &args.body_file {
            Some(file) => Bytes::from(
                std::fs::read(file).with_context(|| format!("read {}", file.display()))?,
            ),
            None => Bytes::new(),
        };
        let mut method: Method = args
            .method
            .parse()
            .with_context(|| format!("bad method {:?}", args.method))?;
        let mut headers = HeaderMap::new();
        if args.scenario == Scenario::Sse {
            if path == "/" {
                path = "/v1/chat/completions".into();
            }
            if args.body_file.is_none() {
                body = Bytes::from_static(SSE_DEFAULT_BODY.as_bytes());
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                if method == Method::GET {
                    method = Method::POST;
                }
            }
            headers.insert(
                http::header::ACCEPT,
                HeaderValue::from_static("text/event-stream"),
            );
        }
        for h in &args.headers {
            let (name, value) = h
                .split_once(':')
                .with_context(|| format!("bad header {h:?} (expected name:value)"))?;
            let name = HeaderName::try_from(name.trim())
                .with_context(|| format!("bad header name in {h:?}"))?;
            let value = HeaderValue::try_from(value.trim())
                .with_context(|| format!("bad header value in {h:?}"))?;
            headers.append(name, value);
        }
        let request_uri: Uri = if protocol.absolute_uri() {
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{host}{path}").parse()
        } else {
            path.parse()
        }
        .with_context(|| format!("bad host {host:?} or path {path:?}"))?;
        if !protocol.absolute_uri() {
            headers.insert(
                http::header::HOST,
                HeaderValue::try_from(host.as_str()).context("bad --host")?,
            );
        }
        let geo = match &args.geo_mix {
            Some(text) => Some(GeoMix::parse(text).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let plan = Plan::new(args.connections, geo.as_ref());
        let tls_settings = tls.then(|| TlsSettings {
            cacert: args.cacert.as_deref(),
            server_name: args.sni.clone().unwrap_or_else(|| {
                args.host
                    .clone()
                    .map(|h| h.split(':').next().unwrap_or_default().to_string())
                    .unwrap_or_else(|| authority.host().to_string())
            }),
        });
        let connector = Connector::new(protocol, target, tls_settings, args.timeout)?;
        // The lean client does plain cleartext HTTP/1.1 request/response; SSE keeps hyper (its
        // event counting reads body chunks as they arrive), and --hyper-h1 asks for hyper.
        let lean = (protocol == Protocol::Http1
            && !connector.is_tls()
            && args.scenario == Scenario::Plain
            && !args.hyper_h1
            && h1lean::can_send(&headers))
        .then(|| LeanRequest {
            bytes: h1lean::encode(&method, &request_uri.to_string(), &headers, &body),
            head: method == Method::HEAD,
        });
        Ok(Self {
            url,
            protocol,
            tls: connector.is_tls(),
            mode,
            scenario: args.scenario,
            connections: plan.connections.len(),
            streams: args.streams,
            reconnect: args.reconnect,
            duration,
            requests: args.requests,
            timeout: args.timeout,
            geo_mix: args.geo_mix,
            method: method.clone(),
            host,
            path,
            quiet: args.quiet,
            plan,
            connector,
            lean,
            template: Template {
                method,
                uri: request_uri,
                headers,
                body,
            },
        })
    }

    /// The request every connection sends (a fresh copy).
    pub fn request(&self) -> Request<Bytes> {
        self.template.build()
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Which HTTP client sends the load: `lean-h1` (`h1lean`), `hyper` or `h3`.
    pub fn client(&self) -> &'static str {
        match (&self.lean, self.protocol) {
            (Some(_), _) => "lean-h1",
            (None, Protocol::Http3) => "h3",
            (None, _) => "hyper",
        }
    }

    /// A connection for one lane, made for the client that sends the load.
    async fn connect(&self, source: Option<IpAddr>) -> Result<Conn, ConnectError> {
        if self.lean.is_some() {
            self.connector.connect_lean(source).await
        } else {
            self.connector.connect(source).await
        }
    }

    /// Source address of each planned connection (`--geo-mix`), `None` for the default.
    pub fn sources(&self) -> impl Iterator<Item = Option<IpAddr>> + '_ {
        self.plan.connections.iter().map(|c| c.source)
    }

    /// Open loop: how many arrivals the schedule holds.
    pub fn scheduled(&self) -> Option<u64> {
        match self.mode {
            Mode::Closed => None,
            Mode::Open { rate } => {
                let by_time = self
                    .duration
                    .map(|d| (rate * d.as_secs_f64()).floor() as u64)
                    .unwrap_or(u64::MAX);
                Some(by_time.min(self.requests.unwrap_or(u64::MAX)))
            }
        }
    }
}

/// Load is only ever sent to this machine.
fn resolve_loopback(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolve {host}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.ip().is_loopback())
        .copied()
        .with_context(|| {
            format!("{host} is not a loopback address: meridian-loadtest only sends load to this machine")
        })
}

pub struct Outcome {
    pub stats: Stats,
    pub elapsed: Duration,
}

/// Shared by every lane.
struct Shared {
    settings: Arc<Settings>,
    deadline: Option<Instant>,
    completed: AtomicU64,
    failed: AtomicU64,
}

impl Shared {
    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}

/// One request slot: a connection (or a share of an h2/h3 connection) from one source address.
struct Lane {
    /// Index of the planned connection this lane belongs to.
    connection: usize,
    country: Option<&'static str>,
    source: Option<IpAddr>,
    conn: Option<Conn>,
    stats: Stats,
}

enum Attempt {
    Done,
    ConnectFailed,
}

pub async fn run(settings: Arc<Settings>) -> Outcome {
    let lanes = open_lanes(&settings).await;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        settings: Arc::clone(&settings),
        deadline: settings.duration.map(|d| start + d),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let done = AtomicBool::new(false);
    let progress = progress_bar(&settings);
    let work = async {
        let stats = match settings.mode {
            Mode::Closed => run_closed(&shared, lanes).await,
            Mode::Open { rate } => run_open(&shared, lanes, rate, start).await,
        };
        done.store(true, Ordering::Relaxed);
        stats
    };
    let ticker = async {
        while !done.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            update_progress(&progress, &shared, start);
        }
    };
    let (stats, ()) = tokio::join!(work, ticker);
    let elapsed = start.elapsed();
    progress.finish_and_clear();
    Outcome { stats, elapsed }
}

fn progress_bar(settings: &Settings) -> ProgressBar {
    if settings.quiet {
        return ProgressBar::hidden();
    }
    let length = match (settings.scheduled(), settings.requests, settings.duration) {
        (Some(total), _, _) | (None, Some(total), _) => total,
        (None, None, Some(d)) => d.as_millis() as u64,
        (None, None, None) => 0,
    };
    let bar = ProgressBar::new(length);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

fn update_progress(bar: &ProgressBar, shared: &Shared, start: Instant) {
    let completed = shared.completed.load(Ordering::Relaxed);
    let failed = shared.failed.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    let settings = &shared.settings;
    let counted = settings.scheduled().is_some() || settings.requests.is_some();
    bar.set_position(if counted {
        completed
    } else {
        elapsed.as_millis() as u64
    });
    let rps = completed as f64 / elapsed.as_secs_f64().max(1e-9);
    bar.set_message(format!("{completed} done, {rps:.0} req/s, {failed} failed"));
}

/// Connects every connection before the clock starts (like wrk), then makes `streams` lanes per
/// connection. A connection that fails here is retried (and counted) by its lane. With
/// `--reconnect` nothing is opened in advance: each request makes its own connection.
async fn open_lanes(settings: &Arc<Settings>) -> Vec<Lane> {
    let mut set = JoinSet::new();
    let prepared = if settings.reconnect {
        &[][..]
    } else {
        &settings.plan.connections[..]
    };
    for (i, origin) in prepared.iter().enumerate() {
        let settings = Arc::clone(settings);
        let source = origin.source;
        set.spawn(async move { (i, settings.connect(source).await) });
    }
    let mut conns: Vec<Option<Conn>> = (0..settings.plan.connections.len()).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, Ok(conn))) = joined {
            conns[i] = Some(conn);
        }
    }
    let mut lanes = Vec::new();
    for (i, (origin, conn)) in settings.plan.connections.iter().zip(conns).enumerate() {
        let shared = conn.as_ref().and_then(Conn::share);
        let mut first = conn;
        for s in 0..settings.streams {
            let conn = if s == 0 {
                first.take()
            } else {
                shared.as_ref().and_then(Conn::share)
            };
            let mut stats = Stats::default();
            if conn.is_some() && s == 0 {
                stats.connects += 1;
            }
            lanes.push(Lane {
                connection: i,
                country: origin.country,
                source: origin.source,
                conn,
                stats,
            });
        }
    }
    lanes
}

async fn collect(mut set: JoinSet<Stats>) -> Stats {
    let mut total = Stats::default();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(stats) => total.merge(stats),
            Err(e) => total.error(ErrorKind::Io, format!("lane task failed: {e}")),
        }
    }
    total
}

async fn run_closed(shared: &Arc<Shared>, lanes: Vec<Lane>) -> Stats {
    let settings = &shared.settings;
    let streams = settings.streams;
    // Per connection quota (exact per country), split over the connection's lanes.
    let quotas: Vec<Vec<u64>> = match settings.requests {
        Some(total) => settings
            .plan
            .connection_quotas(total)
            .into_iter()
            .map(|q| apportion(q, &vec![1; streams]))
            .collect(),
        None => vec![vec![u64::MAX; streams]; settings.plan.connections.len()],
    };
    let mut set = JoinSet::new();
    let mut next_stream = vec![0usize; quotas.len()];
    for lane in lanes {
        let c = lane.connection;
        let quota = quotas[c][next_stream[c]];
        next_stream[c] += 1;
        set.spawn(closed_lane(lane, quota, Arc::clone(shared)));
    }
    collect(set).await
}

async fn closed_lane(mut lane: Lane, mut quota: u64, shared: Arc<Shared>) -> Stats {
    let mut timer = pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
    while quota > 0 {
        // One clock read is both the end-of-run check and the request's start.
        let start = Instant::now();
        if shared.expired(start) {
            break;
        }
        if let Attempt::ConnectFailed =
            one_request(&mut lane, &shared, timer.as_mut(), start, start).await
        {
            // Do not spin on a refused port: a short pause, still counted as one failed request.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        quota -= 1;
    }
    lane.stats
}

async fn run_open(shared: &Arc<Shared>, lanes: Vec<Lane>, rate: f64, start: Instant) -> Stats {
    let settings = &shared.settings;
    let total = settings.scheduled().unwrap_or(0);
    let groups = settings.plan.group_weights.len();
    let mut senders = Vec::with_capacity(groups);
    let mut receivers = Vec::with_capacity(groups);
    for _ in 0..groups {
        let (tx, rx) = mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        receivers.push(Arc::new(Mutex::new(rx)));
    }
    let mut set = JoinSet::new();
    for lane in lanes {
        let queue = Arc::clone(&receivers[settings.plan.group_of[lane.connection]]);
        set.spawn(open_lane(lane, queue, Arc::clone(shared)));
    }
    drop(receivers);
    // Arrival k is due at start + k / rate, whatever happened to the ones before it.
    let group_quota = apportion(total, &settings.plan.group_weights);
    let mut rr = SmoothRoundRobin::new(&group_quota);
    for k in 0..total {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        // A closed queue means its lanes are gone; nothing left to schedule for them.
        let _ = senders[rr.next_index()].send(at);
    }
    drop(senders);
    collect(set).await
}

async fn open_lane(
    mut lane: Lane,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
    shared: Arc<Shared>,
) -> Stats {
    let mut timer = pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
    loop {
        let next = { queue.lock().await.recv().await };
        let Some(scheduled) = next else { break };
        one_request(
            &mut lane,
            &shared,
            timer.as_mut(),
            scheduled,
            Instant::now(),
        )
        .await;
    }
    lane.stats
}

/// Sends one request and records it; latency counts from `start` (the scheduled time in open loop),
/// and the answer is due `--timeout` after it. `now` is the current time, which the caller has;
/// `timer` is the lane's (see `within`).
async fn one_request(
    lane: &mut Lane,
    shared: &Shared,
    timer: Pin<&mut Sleep>,
    start: Instant,
    now: Instant,
) -> Attempt {
    let settings = &shared.settings;
    lane.stats.issued += 1;
    if let Some(country) = lane.country {
        bump(&mut lane.stats.geo, country);
    }
    let remaining = settings
        .timeout
        .saturating_sub(now.saturating_duration_since(start));
    let errors_before = lane.stats.errors() + lane.stats.status_classes[5];
    let result = if remaining.is_zero() {
        None
    } else {
        let due = now + remaining;
        match &settings.lean {
            Some(request) => {
                let work = pin!(lean_attempt(lane, settings, request, start));
                within(timer, due, work).await
            }
            // Boxed: hyper's and the h3 client's futures make this one several KiB, which kept in
            // place would make every request's future (the lean one's too) that large to set up.
            None => {
                within(
                    timer,
                    due,
                    Box::pin(attempt(lane, settings, start)).as_mut(),
                )
                .await
            }
        }
    };
    let outcome = match result {
        Some(outcome) => outcome,
        None => {
            lane.conn = None;
            lane.stats.error(
                ErrorKind::Timeout,
                format!("no answer within {:?}", settings.timeout),
            );
            Attempt::Done
        }
    };
    shared.completed.fetch_add(1, Ordering::Relaxed);
    if lane.stats.errors() + lane.stats.status_classes[5] > errors_before {
        shared.failed.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

/// Gives the lane the connection just made and counts it, or counts the failure to make one (false).
fn connected(lane: &mut Lane, made: Result<Conn, ConnectError>) -> bool {
    match made {
        Ok(conn) => {
            lane.stats.connects += 1;
            lane.conn = Some(conn);
            true
        }
        Err(ConnectError::Timeout) => {
            lane.stats
                .error(ErrorKind::Connect, "connect timed out".into());
            false
        }
        Err(ConnectError::Failed(e)) => {
            lane.stats.error(ErrorKind::Connect, e);
            false
        }
    }
}

/// One request through the lean HTTP/1.1 client.
async fn lean_attempt(
    lane: &mut Lane,
    settings: &Settings,
    request: &LeanRequest,
    start: Instant,
) -> Attempt {
    if lane.conn.as_ref().is_none_or(Conn::is_closed) {
        lane.conn = None;
        let made = settings.connector.connect_lean(lane.source).await;
        if !connected(lane, made) {
            return Attempt::ConnectFailed;
        }
    }
    let Some(Conn::Lean(conn)) = lane.conn.as_mut() else {
        return Attempt::ConnectFailed;
    };
    let stats = &mut lane.stats;
    let exchange = conn.exchange(&request.bytes, request.head, |_, headers| {
        count_headers(stats, |name| {
            headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        });
    });
    match exchange.await {
        Ok(answer) => {
            if settings.reconnect {
                lane.conn = None;
            }
            record(&mut lane.stats, answer.status, answer.body_bytes, start);
        }
        // The same kinds and wording as hyper's errors in `attempt`.
        Err(Failure::Request(e)) => {
            lane.conn = None;
            lane.stats.error(ErrorKind::Io, format!("request: {e}"));
        }
        Err(Failure::Body(e)) => {
            lane.conn = None;
            lane.stats
                .error(ErrorKind::Io, format!("response body: {e}"));
        }
    }
    Attempt::Done
}

/// One request through hyper (h1, h2) or the h3 client.
async fn attempt(lane: &mut Lane, settings: &Settings, start: Instant) -> Attempt {
    if lane.conn.as_ref().is_none_or(Conn::is_closed) {
        lane.conn = None;
        let made = settings.connector.connect(lane.source).await;
        if !connected(lane, made) {
            return Attempt::ConnectFailed;
        }
    }
    let Some(conn) = lane.conn.as_mut() else {
        return Attempt::ConnectFailed;
    };
    let mut response = match conn.send(settings.template.build()).await {
        Ok(response) => response,
        Err(e) => {
            lane.conn = None;
            lane.stats.error(ErrorKind::Io, format!("request: {e:#}"));
            return Attempt::Done;
        }
    };
    let status = response.status();
    count_headers(&mut lane.stats, |name| {
        response.header(name).map(HeaderValue::as_bytes)
    });
    let sse = settings.scenario == Scenario::Sse;
    let mut first_byte: Option<Instant> = None;
    let mut events = 0u64;
    let mut newline = false;
    let mut bytes = 0u64;
    loop {
        let data = match response.chunk().await {
            Ok(Some(data)) => data,
            Ok(None) => break,
            Err(e) => {
                lane.conn = None;
                lane.stats
                    .error(ErrorKind::Io, format!("response body: {e:#}"));
                return Attempt::Done;
            }
        };
        first_byte.get_or_insert_with(Instant::now);
        bytes += data.len() as u64;
        if sse {
            // An event ends at a blank line ("\n\n", or "\r\n\r\n").
            for &b in data.iter() {
                match b {
                    b'\n' if newline => {
                        events += 1;
                        newline = false;
                    }
                    b'\n' => newline = true,
                    b'\r' => {}
                    _ => newline = false,
                }
            }
        }
    }
    drop(response);
    if settings.reconnect {
        if let Some(conn) = lane.conn.take() {
            conn.close();
        }
    }
    let end = record(&mut lane.stats, status, bytes, start);
    let stats = &mut lane.stats;
    if sse {
        stats.sse_streams += 1;
        stats.sse_events += events;
        let first = first_byte.unwrap_or(end);
        record_micros(
            &mut stats.ttfb,
            micros(first.saturating_duration_since(start)),
        );
    }
    Attempt::Done
}

/// Runs `work` until it is done (`Some`) or `due` has passed (`None`, `work` dropped). `timer` is
/// the lane's and is only ever set to a deadline of its lane, which come in increasing order; so a
/// timer that fires before the current `due` is moved on to it, and one that fires at or after it
/// means time is up. Arming and disarming a timer per request (`tokio::time::timeout`) cost the
/// generator about 4% of its CPU; this touches the timer wheel once per `--timeout` per lane.
async fn within<F: Future>(
    mut timer: Pin<&mut Sleep>,
    due: Instant,
    mut work: Pin<&mut F>,
) -> Option<F::Output> {
    let due = tokio::time::Instant::from_std(due);
    if timer.deadline() > due {
        // Not expected (see above), but a timer must never fire late.
        timer.as_mut().reset(due);
    }
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        while timer.as_mut().poll(cx).is_ready() {
            if timer.deadline() >= due {
                return Poll::Ready(None);
            }
            timer.as_mut().reset(due);
        }
        Poll::Pending
    })
    .await
}

/// Counts the values of the answer headers the edge adds (`get` finds a header field's value).
fn count_headers<'a>(stats: &mut Stats, get: impl Fn(&str) -> Option<&'a [u8]>) {
    for (name, map) in [
        ("x-meridian-region", &mut stats.regions),
        ("x-meridian-cache", &mut stats.cache),
    ] {
        if let Some(value) = get(name) {
            bump(map, &String::from_utf8_lossy(value));
        }
    }
}

/// Records a whole answer that started at `start`; returns the time it ended.
fn record(stats: &mut Stats, status: u16, body_bytes: u64, start: Instant) -> Instant {
    let end = Instant::now();
    stats.responses += 1;
    stats.body_bytes += body_bytes;
    stats.status(status);
    record_micros(&mut stats.latency, micros(end - start));
    end
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
