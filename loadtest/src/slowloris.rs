//! Slowloris (`--slow N`): N cleartext connections that each start a request head and never finish
//! it — `GET PATH HTTP/1.1\r\nHost: HOST\r\nX-a: `, then one more byte every `--slow-interval` —
//! to see how long a server keeps them. A connection ends when the server closes it (EOF or reset)
//! or at `--slow-for` after its connect, when it is given up and counted as still open. The report
//! says how many the server closed, after how long (p50/p99/max), and what it answered first
//! (`408`, another status, or nothing).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cli::{LoadArgs, ProtocolArg};
use crate::engine::{self, micros, Settings};
use crate::stats::{new_histogram, record_micros};

/// Connects in flight at once: thousands of simultaneous SYNs overflow a server's accept backlog
/// and turn into 1 s+ SYN retransmits, which would only measure the backlog.
const CONNECTS_IN_FLIGHT: usize = 256;
/// What is kept of the server's answer: enough for its status line.
const ANSWER_BYTES: usize = 64;

struct Slow {
    url: String,
    target: SocketAddr,
    head: Vec<u8>,
    connections: usize,
    interval: Duration,
    cap: Duration,
    connect_timeout: Duration,
}

/// How one connection ended.
enum End {
    ConnectFailed(String),
    /// EOF or reset from the server after `lived` (from the connect).
    ClosedByServer {
        lived: Duration,
    },
    /// Still open at the cap.
    StillOpen,
}

struct Ended {
    end: End,
    /// The first bytes the server sent, if any.
    answer: Vec<u8>,
    /// Head bytes sent, the prefix included.
    sent: u64,
}

#[derive(Default)]
struct Outcome {
    opened: u64,
    connect_failed: u64,
    closed_by_server: u64,
    still_open: u64,
    bytes_sent: u64,
    /// First status code the server sent ("408"), "none" when it sent nothing, "other" for bytes
    /// that are not a status line.
    answers: BTreeMap<String, u64>,
    last_error: Option<String>,
    elapsed: Duration,
}

pub fn main(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let Some(connections) = args.slow else {
        bail!("--slow N is needed for slowloris mode");
    };
    if connections == 0 {
        bail!("--slow must be at least 1");
    }
    if args.protocol != ProtocolArg::H1 {
        bail!("--slow trickles an HTTP/1.1 head: it runs with -p h1 only");
    }
    if args.slow_interval.is_zero() {
        bail!("--slow-interval must be more than 0");
    }
    let interval = args.slow_interval;
    let cap = args.slow_for;
    let json_path = args.json.clone();
    let runtime = engine::runtime(args.threads)?;
    // The same URL, --host and --path handling (and loopback check) as the load engine.
    let settings = Settings::from_args(args)?;
    if settings.tls {
        bail!("--slow runs over cleartext HTTP/1.1 (an http:// URL)");
    }
    let slow = Arc::new(Slow {
        url: settings.url.clone(),
        target: settings.connector().target,
        head: format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nX-a: ",
            settings.path, settings.host
        )
        .into_bytes(),
        connections,
        interval,
        cap,
        connect_timeout: settings.timeout,
    });
    let (outcome, lived) = runtime.block_on(run(Arc::clone(&slow)));
    print!("{}", summary(&slow, &outcome, &lived));
    if let Some(path) = json_path {
        engine::write_json(&path, &json_report(&slow, &outcome, &lived))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(slow: Arc<Slow>) -> (Outcome, Histogram<u64>) {
    let start = Instant::now();
    let connects = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut set = JoinSet::new();
    for _ in 0..slow.connections {
        set.spawn(trickle(Arc::clone(&slow), Arc::clone(&connects)));
    }
    let mut outcome = Outcome::default();
    let mut lived = new_histogram();
    while let Some(joined) = set.join_next().await {
        let ended = match joined {
            Ok(ended) => ended,
            Err(e) => Ended {
                end: End::ConnectFailed(format!("connection task failed: {e}")),
                answer: Vec::new(),
                sent: 0,
            },
        };
        outcome.bytes_sent += ended.sent;
        match ended.end {
            End::ConnectFailed(e) => {
                outcome.connect_failed += 1;
                outcome.last_error = Some(e);
                continue;
            }
            End::ClosedByServer { lived: d } => {
                outcome.opened += 1;
                outcome.closed_by_server += 1;
                record_micros(&mut lived, micros(d));
            }
            End::StillOpen => {
                outcome.opened += 1;
                outcome.still_open += 1;
            }
        }
        *outcome.answers.entry(answer_of(&ended.answer)).or_insert(0) += 1;
    }
    outcome.elapsed = start.elapsed();
    (outcome, lived)
}

async fn trickle(slow: Arc<Slow>, connects: Arc<Semaphore>) -> Ended {
    let failed = |e: String| Ended {
        end: End::ConnectFailed(e),
        answer: Vec::new(),
        sent: 0,
    };
    let connected = {
        let Ok(_permit) = connects.acquire().await else {
            return failed("connect limiter closed".into());
        };
        tokio::time::timeout(slow.connect_timeout, TcpStream::connect(slow.target)).await
    };
    let mut stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return failed(format!("connect: {e}")),
        Err(_) => return failed("connect timed out".into()),
    };
    // Each trickled byte goes out on its own, as an attacker's would.
    let _ = stream.set_nodelay(true);
    let opened = Instant::now();
    let deadline = tokio::time::Instant::from_std(opened + slow.cap);
    let mut answer = Vec::new();
    let mut sent = 0u64;
    // After a failed write the server is gone or going: stop writing, read what it said until EOF.
    let mut writable = stream.write_all(&slow.head).await.is_ok();
    if writable {
        sent += slow.head.len() as u64;
    }
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(opened + slow.interval),
        slow.interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 1024];
    let end = loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break End::ClosedByServer { lived: opened.elapsed() },
                Ok(n) => {
                    let keep = n.min(ANSWER_BYTES.saturating_sub(answer.len()));
                    answer.extend_from_slice(&buf[..keep]);
                }
            },
            _ = tick.tick(), if writable => {
                if stream.write_all(b"a").await.is_ok() {
                    sent += 1;
                } else {
                    writable = false;
                }
            }
            () = tokio::time::sleep_until(deadline) => break End::StillOpen,
        }
    };
    Ended { end, answer, sent }
}

/// "408" for `HTTP/1.1 408 ...`, "none" for no bytes, "other" for anything else.
fn answer_of(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "none".into();
    }
    let status = bytes
        .strip_prefix(b"HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .filter(|code| code.iter().all(u8::is_ascii_digit));
    match status {
        Some(code) => String::from_utf8_lossy(code).into_owned(),
        None => "other".into(),
    }
}

fn time_to_close_ms(h: &Histogram<u64>) -> Value {
    let ms = |micros: u64| micros as f64 / 1000.0;
    if h.is_empty() {
        return json!({ "count": 0, "min": null, "p50": null, "p99": null, "max": null });
    }
    json!({
        "count": h.len(),
        "min": ms(h.min()),
        "p50": ms(h.value_at_quantile(0.50)),
        "p99": ms(h.value_at_quantile(0.99)),
        "max": ms(h.max()),
    })
}

fn json_report(slow: &Slow, outcome: &Outcome, lived: &Histogram<u64>) -> Value {
    json!({
        "tool": "meridian-loadtest",
        "version": env!("CARGO_PKG_VERSION"),
        "target": slow.url,
        "mode": "slow",
        "connections": slow.connections,
        "interval_s": slow.interval.as_secs_f64(),
        "cap_s": slow.cap.as_secs_f64(),
        "elapsed_s": outcome.elapsed.as_secs_f64(),
        "opened": outcome.opened,
        "connect_failed": outcome.connect_failed,
        "closed_by_server": outcome.closed_by_server,
        "still_open_at_cap": outcome.still_open,
        "time_to_close_ms": time_to_close_ms(lived),
        "answers": outcome.answers,
        "bytes_sent": outcome.bytes_sent,
        "last_error": outcome.last_error,
    })
}

fn summary(slow: &Slow, outcome: &Outcome, lived: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "meridian-loadtest slowloris {} ({} connections, a byte every {:?}, given up after {:?})",
        slow.url, slow.connections, slow.interval, slow.cap
    );
    let close = if lived.is_empty() {
        "-".to_string()
    } else {
        let s = |micros: u64| micros as f64 / 1e6;
        format!(
            "p50 {:.3}  p99 {:.3}  max {:.3} s",
            s(lived.value_at_quantile(0.5)),
            s(lived.value_at_quantile(0.99)),
            s(lived.max())
        )
    };
    let rows = [
        (
            "connections",
            format!(
                "{} opened, {} failed to connect in {:.2}s",
                outcome.opened,
                outcome.connect_failed,
                outcome.elapsed.as_secs_f64()
            ),
        ),
        ("closed by server", outcome.closed_by_server.to_string()),
        ("still open at cap", outcome.still_open.to_string()),
        ("time to close", close),
        (
            "server answered",
            crate::report::counts(outcome.answers.iter().map(|(k, v)| (k, *v))),
        ),
        ("head bytes sent", outcome.bytes_sent.to_string()),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<17}  {v}");
    }
    if let Some(e) = &outcome.last_error {
        let _ = writeln!(out, "  {:<17}  {e}", "last error");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::answer_of;

    #[test]
    fn answers_are_classified_by_status_line() {
        assert_eq!(answer_of(b""), "none");
        assert_eq!(answer_of(b"HTTP/1.1 408 Request Timeout\r\n"), "408");
        assert_eq!(answer_of(b"HTTP/1.0 400 Bad"), "400");
        assert_eq!(answer_of(b"HTTP/1.1 4"), "other");
        assert_eq!(answer_of(b"garbage"), "other");
    }
}
