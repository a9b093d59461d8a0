//! Idle keep-alive connections (`--idle N`): open N connections, send the request once on each
//! (read the whole answer), then hold them all idle for `--idle-for`. Once every connection is
//! open and answered, one line `ready: ...` goes to stdout, so a script can measure the server's
//! memory with N idle connections open (`loadtest/bench/run.sh`, scenario `idle`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cli::LoadArgs;
use crate::engine::{self, Settings};
use crate::protocol::{Conn, ConnectError};

/// Connections being opened at once (see the slowloris mode: a flood of SYNs only measures the
/// server's accept backlog).
const CONNECTS_IN_FLIGHT: usize = 256;

#[derive(Default)]
struct Outcome {
    opened: u64,
    connect_failed: u64,
    request_failed: u64,
    status_codes: BTreeMap<u16, u64>,
    /// Connections the server closed while they were held idle.
    closed_while_held: u64,
    /// Time to open every connection and get its answer.
    ready: Duration,
    held: Duration,
    last_error: Option<String>,
}

pub fn main(mut args: LoadArgs) -> anyhow::Result<ExitCode> {
    let Some(connections) = args.idle else {
        bail!("--idle N is needed for idle mode");
    };
    if connections == 0 {
        bail!("--idle must be at least 1");
    }
    // One lane per connection; --geo-mix spreads them over countries as usual.
    args.connections = connections;
    args.streams = 1;
    let hold = args.idle_for;
    let json_path = args.json.clone();
    let runtime = engine::runtime(args.threads)?;
    let settings = Arc::new(Settings::from_args(args)?);
    let outcome = runtime.block_on(run(Arc::clone(&settings), hold));
    print!("{}", summary(&settings, connections, &outcome));
    if let Some(path) = json_path {
        let report = json!({
            "tool": "meridian-loadtest",
            "version": env!("CARGO_PKG_VERSION"),
            "target": settings.url,
            "mode": "idle",
            "protocol": settings.protocol.name(),
            "tls": settings.tls,
            "connections": connections,
            "opened": outcome.opened,
            "connect_failed": outcome.connect_failed,
            "request_failed": outcome.request_failed,
            "status_codes": outcome.status_codes.iter()
                .map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "ready_s": outcome.ready.as_secs_f64(),
            "held_s": outcome.held.as_secs_f64(),
            "closed_while_held": outcome.closed_while_held,
            "still_open_at_end": outcome.opened - outcome.closed_while_held,
            "last_error": outcome.last_error,
        });
        engine::write_json(&path, &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(settings: Arc<Settings>, hold: Duration) -> Outcome {
    let start = Instant::now();
    let connects = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut set = JoinSet::new();
    for source in settings.sources() {
        let settings = Arc::clone(&settings);
        let connects = Arc::clone(&connects);
        set.spawn(async move {
            let Ok(_permit) = connects.acquire().await else {
                return Err((true, "connect limiter closed".to_string()));
            };
            open_one(&settings, source).await
        });
    }
    let mut outcome = Outcome::default();
    let mut held = Vec::with_capacity(settings.connections);
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok((conn, status))) => {
                outcome.opened += 1;
                *outcome.status_codes.entry(status).or_insert(0) += 1;
                held.push(conn);
            }
            Ok(Err((connect, e))) => {
                if connect {
                    outcome.connect_failed += 1;
                } else {
                    outcome.request_failed += 1;
                }
                outcome.last_error = Some(e);
            }
            Err(e) => {
                outcome.connect_failed += 1;
                outcome.last_error = Some(format!("connection task failed: {e}"));
            }
        }
    }
    outcome.ready = start.elapsed();
    println!(
        "ready: {} idle connections open ({} failed to connect, {} requests failed) in {:.2}s",
        outcome.opened,
        outcome.connect_failed,
        outcome.request_failed,
        outcome.ready.as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    let held_since = Instant::now();
    tokio::time::sleep(hold).await;
    outcome.held = held_since.elapsed();
    outcome.closed_while_held = held.iter().filter(|c| c.is_closed()).count() as u64;
    outcome
}

/// Connects, sends the request, reads the whole answer; the connection stays open (keep-alive).
/// Errors say whether the connect (true) or the request (false) failed.
async fn open_one(
    settings: &Settings,
    source: Option<std::net::IpAddr>,
) -> Result<(Conn, u16), (bool, String)> {
    let mut conn = match settings.connector().connect(source).await {
        Ok(conn) => conn,
        Err(ConnectError::Timeout) => return Err((true, "connect timed out".into())),
        Err(ConnectError::Failed(e)) => return Err((true, e)),
    };
    let exchange = async {
        let mut reply = conn.send(settings.request()).await?;
        let status = reply.status();
        while reply.chunk().await?.is_some() {}
        anyhow::Ok(status)
    };
    match tokio::time::timeout(settings.timeout, exchange).await {
        Ok(Ok(status)) => Ok((conn, status)),
        Ok(Err(e)) => Err((false, format!("request: {e:#}"))),
        Err(_) => Err((false, format!("no answer within {:?}", settings.timeout))),
    }
}

fn summary(settings: &Settings, connections: usize, outcome: &Outcome) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "meridian-loadtest idle {} {} ({connections} kept-alive connections, one request each)",
        settings.protocol.name(),
        settings.url,
    );
    let status: Vec<String> = outcome
        .status_codes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let rows = [
        (
            "connections",
            format!(
                "{} opened and answered in {:.2}s, {} failed to connect, {} requests failed",
                outcome.opened,
                outcome.ready.as_secs_f64(),
                outcome.connect_failed,
                outcome.request_failed
            ),
        ),
        ("status", status.join(" ")),
        (
            "held idle",
            format!(
                "{:.2}s: {} closed by the server meanwhile, {} still open",
                outcome.held.as_secs_f64(),
                outcome.closed_while_held,
                outcome.opened - outcome.closed_while_held
            ),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<11}  {v}");
    }
    if let Some(e) = &outcome.last_error {
        let _ = writeln!(out, "  {:<11}  {e}", "last error");
    }
    out
}
