//! The inference picking benchmark's two halves:
//!
//! - `model-servers`: simulated GPU model servers (the test kit's, with a slot limit, a queue, and
//!   a prefix cache that makes a cached prompt prefix prefill faster), one per address, until
//!   SIGTERM/SIGINT; then each one's calls and prefix-cache hits are written as JSON;
//! - `prefix-load`: an open-loop stream of chat calls over prompt-prefix groups of uneven
//!   popularity (Zipf) and uneven lengths, from a fixed seed (every run sends the same calls at the
//!   same times); time to first token (from each call's scheduled start, so queueing counts) and
//!   completed calls per second.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meridian_testkit::model_server::Capacity;
use rand::{Rng, SeedableRng};

use crate::duration;

#[derive(Args, Debug, Clone)]
pub struct ModelServerArgs {
    /// Addresses to serve on, comma-separated (one simulated model server each).
    #[arg(long, value_delimiter = ',', required = true)]
    pub listen: Vec<SocketAddr>,
    /// Calls each server runs at once; more wait in its queue.
    #[arg(long, default_value_t = 4)]
    pub slots: usize,
    /// Time to first token when the prompt prefix is not in the server's prefix cache.
    #[arg(long, value_parser = duration::parse, default_value = "60ms")]
    pub prefill: Duration,
    /// Time to first token when it is.
    #[arg(long, value_parser = duration::parse, default_value = "6ms")]
    pub cached_prefill: Duration,
    /// Prefixes each server's prefix cache holds.
    #[arg(long, default_value_t = 4)]
    pub cache_entries: usize,
    /// Pause between streamed tokens.
    #[arg(long, value_parser = duration::parse, default_value = "2ms")]
    pub token_interval: Duration,
    /// Write each server's calls and prefix-cache hits here (JSON) when stopped.
    #[arg(long)]
    pub stats: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct PrefixLoadArgs {
    /// Chat completions URL, e.g. http://127.0.0.1:18113/v1/chat/completions.
    pub url: String,
    #[arg(long)]
    pub host: String,
    #[arg(long, default_value = "bench-model")]
    pub model: String,
    /// Calls per second (open loop: sent on schedule whatever the answers do).
    #[arg(short = 'r', long, default_value_t = 150.0)]
    pub rate: f64,
    #[arg(short = 'd', long, value_parser = duration::parse, default_value = "20s")]
    pub duration: Duration,
    /// Calls before this (from the start) are sent but not measured: the servers' prefix caches
    /// fill first, so the figures describe steady state.
    #[arg(long, value_parser = duration::parse, default_value = "0s")]
    pub warmup: Duration,
    /// Prompt-prefix groups (distinct system prompts).
    #[arg(long, default_value_t = 16)]
    pub groups: usize,
    /// Zipf exponent of group popularity (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Bytes of each group's system prompt (the shared prefix).
    #[arg(long, default_value_t = 3000)]
    pub prefix_bytes: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Per-call timeout.
    #[arg(long, value_parser = duration::parse, default_value = "30s")]
    pub timeout: Duration,
    /// A label written into the report (e.g. the picking mode).
    #[arg(long, default_value = "")]
    pub label: String,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn model_servers(args: ModelServerArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut servers = Vec::new();
        for address in &args.listen {
            let control = meridian_testkit::origin::spawn("bench", *address, stopped.clone())
                .await
                .with_context(|| format!("model server on {address}"))?;
            control.model.set_capacity(Some(Capacity {
                slots: args.slots,
                prefill: args.prefill,
                cached_prefill: args.cached_prefill,
                cache_entries: args.cache_entries,
            }));
            control.model.set_token_interval(args.token_interval);
            println!("listening on {}", control.address);
            servers.push(control);
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop.send(true);
        let stats: Vec<serde_json::Value> = servers
            .iter()
            .map(|s| {
                serde_json::json!({
                    "address": s.address.to_string(),
                    "calls": s.model.requests(),
                    "prefix_hits": s.model.prefix_hits(),
                })
            })
            .collect();
        if let Some(path) = &args.stats {
            std::fs::write(path, serde_json::to_vec_pretty(&stats)?)?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One call of the workload.
struct Call {
    at: Duration,
    body: Bytes,
}

fn workload(args: &PrefixLoadArgs) -> Vec<Call> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(args.seed);
    let groups = args.groups.max(1);
    let weights: Vec<f64> = (1..=groups)
        .map(|k| 1.0 / (k as f64).powf(args.zipf))
        .collect();
    let total: f64 = weights.iter().sum();
    let prompts: Vec<String> = (0..groups)
        .map(|g| {
            let mut text = format!("You are assistant number {g} of the benchmark. ");
            let filler = format!("Rule {g}: answer precisely and briefly. ");
            while text.len() < args.prefix_bytes {
                text.push_str(&filler);
            }
            text
        })
        .collect();
    let count = (args.rate * args.duration.as_secs_f64()).round() as usize;
    (0..count)
        .map(|i| {
            let mut pick = rng.gen::<f64>() * total;
            let group = weights
                .iter()
                .position(|w| {
                    pick -= w;
                    pick <= 0.0
                })
                .unwrap_or(groups - 1);
            // Mostly short answers, some long ones.
            let tokens = match rng.gen::<f64>() {
                x if x < 0.5 => 4,
                x if x < 0.85 => 16,
                _ => 64,
            };
            let body = serde_json::json!({
                "model": args.model,
                "stream": true,
                "max_tokens": tokens,
                "messages": [
                    {"role": "system", "content": prompts[group]},
                    {"role": "user", "content": format!("question {i}")},
                ],
            });
            Call {
                at: Duration::from_secs_f64(i as f64 / args.rate),
                body: Bytes::from(body.to_string()),
            }
        })
        .collect()
}

/// Time to first token, or why the call failed.
async fn call(
    target: SocketAddr,
    host: &str,
    path: &str,
    body: Bytes,
    scheduled: Instant,
) -> anyhow::Result<Duration> {
    let stream = tokio::net::TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let request = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    let mut body = response.into_body();
    let mut first = None;
    let mut tail = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if first.is_none() && !data.is_empty() {
                first = Some(scheduled.elapsed());
            }
            tail.extend_from_slice(&data);
            if tail.len() > 64 {
                tail.drain(..tail.len() - 64);
            }
        }
    }
    conn.abort();
    anyhow::ensure!(tail.ends_with(b"data: [DONE]\n\n"), "stream cut short");
    first.context("no token")
}

pub fn prefix_load(args: PrefixLoadArgs) -> anyhow::Result<ExitCode> {
    let uri: http::Uri = args.url.parse().context("URL")?;
    let authority = uri.authority().context("URL without host:port")?;
    let target: SocketAddr = authority
        .as_str()
        .parse()
        .context("URL host must be an IP:port")?;
    anyhow::ensure!(target.ip().is_loopback(), "loopback targets only");
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let calls = workload(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = runtime.block_on(async move {
        let start = Instant::now();
        let host: Arc<str> = args.host.as_str().into();
        let path: Arc<str> = path.as_str().into();
        let mut tasks = tokio::task::JoinSet::new();
        let sent = calls.len();
        let measured = calls.iter().filter(|c| c.at >= args.warmup).count();
        for c in calls {
            tokio::time::sleep_until((start + c.at).into()).await;
            let (host, path) = (Arc::clone(&host), Arc::clone(&path));
            let scheduled = start + c.at;
            let timeout = args.timeout;
            let counts = c.at >= args.warmup;
            tasks.spawn(async move {
                let result = tokio::time::timeout(timeout, call(target, &host, &path, c.body, scheduled))
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out"))
                    .and_then(|r| r);
                (counts, result)
            });
        }
        let mut ttft = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
            .expect("histogram bounds");
        let (mut completed, mut failed) = (0u64, 0u64);
        let mut last_error = None;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((false, _)) => {}
                Ok((true, Ok(first))) => {
                    completed += 1;
                    let _ = ttft.record(first.as_micros().max(1) as u64);
                }
                Ok((true, Err(e))) => {
                    failed += 1;
                    last_error = Some(e.to_string());
                }
                Err(e) => {
                    failed += 1;
                    last_error = Some(e.to_string());
                }
            }
        }
        let elapsed = (start.elapsed().saturating_sub(args.warmup)).as_secs_f64();
        let ms = |q: f64| ttft.value_at_quantile(q) as f64 / 1000.0;
        serde_json::json!({
            "label": args.label,
            "rate": args.rate,
            "duration_s": args.duration.as_secs_f64(),
            "groups": args.groups,
            "zipf": args.zipf,
            "sent": sent,
            "measured": measured,
            "warmup_s": args.warmup.as_secs_f64(),
            "completed": completed,
            "failed": failed,
            "last_error": last_error,
            "elapsed_s": elapsed,
            "completed_per_s": completed as f64 / elapsed,
            "ttft_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": ttft.max() as f64 / 1000.0},
        })
    });
    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(ExitCode::SUCCESS)
}
