//! The JSON report (`--json FILE`) and the human summary table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cli::Scenario;
use crate::engine::{Mode, Outcome, Settings};

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn percentiles_ms(h: &Histogram<u64>) -> Value {
    let ms = |micros: u64| micros as f64 / 1000.0;
    if h.is_empty() {
        return json!({ "count": 0, "min": null, "mean": null, "p50": null, "p90": null,
                       "p99": null, "p99_9": null, "max": null });
    }
    json!({
        "count": h.len(),
        "min": ms(h.min()),
        "mean": h.mean() / 1000.0,
        "p50": ms(h.value_at_quantile(0.50)),
        "p90": ms(h.value_at_quantile(0.90)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

fn classes(stats: &crate::stats::Stats) -> BTreeMap<&'static str, u64> {
    CLASSES
        .iter()
        .enumerate()
        .map(|(i, name)| (*name, stats.status_classes[i + 1]))
        .collect()
}

pub fn json(settings: &Settings, outcome: &Outcome) -> Value {
    let stats = &outcome.stats;
    let elapsed = outcome.elapsed.as_secs_f64().max(1e-9);
    let ok = stats.status_classes[1] + stats.status_classes[2] + stats.status_classes[3];
    let status_4xx = stats.status_classes[4];
    let status_5xx = stats.status_classes[5];
    let failed = stats.errors() + status_4xx + status_5xx;
    let status_codes: BTreeMap<String, u64> = stats
        .status_codes
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let sse = (settings.scenario == Scenario::Sse).then(|| {
        json!({
            "streams": stats.sse_streams,
            "events": stats.sse_events,
            "events_per_s": stats.sse_events as f64 / elapsed,
            "events_per_stream": if stats.sse_streams > 0 {
                stats.sse_events as f64 / stats.sse_streams as f64 } else { 0.0 },
            "ttfb_ms": percentiles_ms(&stats.ttfb),
            "ttlb_ms": percentiles_ms(&stats.latency),
        })
    });
    let (mode, rate) = match settings.mode {
        Mode::Closed => ("closed", None),
        Mode::Open { rate } => ("open", Some(rate)),
    };
    json!({
        "tool": "meridian-loadtest",
        "version": env!("CARGO_PKG_VERSION"),
        "target": settings.url,
        "method": settings.method.as_str(),
        "host": settings.host,
        "path": settings.path,
        "protocol": settings.protocol.name(),
        "client": settings.client(),
        "tls": settings.tls,
        "scenario": match settings.scenario { Scenario::Plain => "plain", Scenario::Sse => "sse" },
        "mode": mode,
        "connections": settings.connections,
        "streams": settings.streams,
        "reconnect": settings.reconnect,
        "rate": rate,
        "duration_s": settings.duration.map(|d| d.as_secs_f64()),
        "requests_limit": settings.requests,
        "scheduled": settings.scheduled(),
        "geo_mix": settings.geo_mix,
        "elapsed_s": outcome.elapsed.as_secs_f64(),
        "requests": {
            "issued": stats.issued,
            "responses": stats.responses,
            "ok": ok,
            "failed": failed,
        },
        "throughput_rps": stats.responses as f64 / elapsed,
        "bytes_received": stats.body_bytes,
        "connects": stats.connects,
        "connections_opened": stats.connects,
        "latency_ms": percentiles_ms(&stats.latency),
        "status": classes(stats),
        "status_codes": status_codes,
        "errors": {
            "connect": stats.connect_errors,
            "timeout": stats.timeouts,
            "io": stats.io_errors,
            "status_4xx": status_4xx,
            "status_5xx": status_5xx,
            "total": failed,
            "last": stats.last_error,
        },
        "geo": stats.geo,
        "regions": stats.regions,
        "cache": stats.cache,
        "sse": sse,
        "process_cpu_s": process_cpu_s(),
    })
}

/// The generator's own CPU time so far (user and system, all threads). On a machine whose cores
/// the generator shares with the proxy and the origin, its CPU per request is part of the budget
/// every proxy is measured within; `loadtest/bench/run.sh` puts it beside the others'.
fn process_cpu_s() -> serde_json::Value {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(usage) => {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            json!({ "user": secs(usage.user_time()), "system": secs(usage.system_time()) })
        }
        Err(_) => serde_json::Value::Null,
    }
}

/// `key=count` pairs (zero counts left out) joined by spaces; `-` when there are none.
pub(crate) fn counts<K: std::fmt::Display>(map: impl IntoIterator<Item = (K, u64)>) -> String {
    let parts: Vec<String> = map
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

pub fn summary(settings: &Settings, outcome: &Outcome) -> String {
    let stats = &outcome.stats;
    let elapsed = outcome.elapsed.as_secs_f64().max(1e-9);
    let mut out = String::new();
    let mode = match settings.mode {
        Mode::Closed => format!("closed loop, {} connections", settings.connections),
        Mode::Open { rate } => format!(
            "open loop at {rate} req/s over {} connections",
            settings.connections
        ),
    };
    let mode = if settings.reconnect {
        mode + ", a new connection per request"
    } else {
        mode
    };
    let _ = writeln!(
        out,
        "meridian-loadtest {} {} {} ({}, {mode})",
        settings.protocol.name(),
        settings.method,
        settings.url,
        if settings.tls { "tls" } else { "cleartext" },
    );
    let mut rows: Vec<(String, String)> = Vec::new();
    let ok = stats.status_classes[1] + stats.status_classes[2] + stats.status_classes[3];
    let failed = stats.errors() + stats.status_classes[4] + stats.status_classes[5];
    rows.push((
        "requests".into(),
        format!(
            "{} issued, {} responses, {ok} ok, {failed} failed in {elapsed:.2}s",
            stats.issued, stats.responses
        ),
    ));
    rows.push((
        "throughput".into(),
        format!(
            "{:.1} req/s, {:.2} MiB/s body",
            stats.responses as f64 / elapsed,
            stats.body_bytes as f64 / elapsed / (1024.0 * 1024.0)
        ),
    ));
    let lat = |label: &str, h: &Histogram<u64>, rows: &mut Vec<(String, String)>| {
        if h.is_empty() {
            rows.push((label.into(), "-".into()));
            return;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        rows.push((
            label.into(),
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms",
                ms(0.5),
                ms(0.9),
                ms(0.99),
                ms(0.999),
                h.max() as f64 / 1000.0
            ),
        ));
    };
    if settings.scenario == Scenario::Sse {
        lat("time to first byte", &stats.ttfb, &mut rows);
        lat("time to last byte", &stats.latency, &mut rows);
        rows.push((
            "events".into(),
            format!(
                "{} in {} streams, {:.1} events/s",
                stats.sse_events,
                stats.sse_streams,
                stats.sse_events as f64 / elapsed
            ),
        ));
    } else {
        lat("latency", &stats.latency, &mut rows);
    }
    rows.push(("status".into(), counts(classes(stats))));
    rows.push((
        "errors".into(),
        format!(
            "connect={} timeout={} io={}{}",
            stats.connect_errors,
            stats.timeouts,
            stats.io_errors,
            stats
                .last_error
                .as_ref()
                .map(|e| format!("  (last: {e})"))
                .unwrap_or_default()
        ),
    ));
    rows.push(("connections opened".into(), stats.connects.to_string()));
    if !stats.geo.is_empty() {
        rows.push(("geo (requests)".into(), counts(stats.geo.clone())));
    }
    rows.push(("x-meridian-region".into(), counts(stats.regions.clone())));
    rows.push(("x-meridian-cache".into(), counts(stats.cache.clone())));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<width$}  {v}");
    }
    out
}
