//! The operator status page on the admin listener: `GET /` is a self-contained HTML
//! page (inline CSS and JS, no external assets) that renders `GET /admin/status.json` and polls it
//! every 2 s. Everything is computed from the edge's own state and its metrics registry, at request
//! time on the admin listener, so the request path pays nothing for it.

use std::collections::BTreeMap;

use prometheus::proto::MetricType;

use crate::reload::SnapshotStore;

/// Per-region request totals from `meridian_requests_total` and `meridian_request_duration_seconds`.
#[derive(Default)]
struct Traffic {
    requests: f64,
    errors: f64,
    /// Histogram of the region's request durations (summed over routes): (upper bound, cumulative).
    buckets: BTreeMap<u64, f64>,
    seconds: f64,
    count: f64,
}

impl Traffic {
    /// The `q` quantile, linearly interpolated within its bucket (as Prometheus does), in ms.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let (mut lower, mut below) = (0.0, 0.0);
        for (&bound_bits, &cumulative) in &self.buckets {
            let bound = f64::from_bits(bound_bits);
            if cumulative >= rank {
                if !bound.is_finite() {
                    return Some(lower * 1e3);
                }
                let in_bucket = cumulative - below;
                let fraction = if in_bucket > 0.0 {
                    (rank - below) / in_bucket
                } else {
                    1.0
                };
                return Some((lower + (bound - lower) * fraction) * 1e3);
            }
            lower = bound;
            below = cumulative;
        }
        Some(lower * 1e3)
    }
}

fn label<'a>(metric: &'a prometheus::proto::Metric, name: &str) -> Option<&'a str> {
    metric
        .get_label()
        .iter()
        .find(|l| l.name() == name)
        .map(|l| l.value())
}

/// The document `/admin/status.json` returns and the page renders.
pub fn status_json(store: &SnapshotStore) -> serde_json::Value {
    let loaded = store.load();
    let snapshot = &loaded.snapshot;
    let now = crate::clock::now_ms();
    let mut traffic: BTreeMap<String, Traffic> = BTreeMap::new();
    let (mut cache_hits, mut cache_lookups) = (0.0, 0.0);
    let mut pop_health: BTreeMap<String, bool> = BTreeMap::new();
    for family in store.metrics().registry().gather() {
        let name = family.name();
        for metric in family.get_metric() {
            match (name, family.get_field_type()) {
                ("meridian_requests_total", MetricType::COUNTER) => {
                    let region = label(metric, "region").unwrap_or_default().to_string();
                    let value = metric.get_counter().get_value();
                    let entry = traffic.entry(region).or_default();
                    entry.requests += value;
                    if label(metric, "status_class") == Some("5xx") {
                        entry.errors += value;
                    }
                }
                ("meridian_request_duration_seconds", MetricType::HISTOGRAM) => {
                    let region = label(metric, "region").unwrap_or_default().to_string();
                    let histogram = metric.get_histogram();
                    let entry = traffic.entry(region).or_default();
                    entry.seconds += histogram.get_sample_sum();
                    entry.count += histogram.get_sample_count() as f64;
                    for bucket in histogram.get_bucket() {
                        *entry
                            .buckets
                            .entry(bucket.upper_bound().to_bits())
                            .or_default() += bucket.cumulative_count() as f64;
                    }
                    *entry.buckets.entry(f64::INFINITY.to_bits()).or_default() +=
                        histogram.get_sample_count() as f64;
                }
                ("meridian_cache_lookups_total", MetricType::COUNTER) => {
                    let value = metric.get_counter().get_value();
                    cache_lookups += value;
                    if label(metric, "result") == Some("hit") {
                        cache_hits += value;
                    }
                }
                ("meridian_pop_healthy", MetricType::GAUGE) => {
                    if let Some(pop) = label(metric, "pop") {
                        pop_health.insert(pop.to_string(), metric.get_gauge().get_value() >= 1.0);
                    }
                }
                _ => {}
            }
        }
    }
    let served: f64 = traffic
        .iter()
        .filter(|(region, _)| region.as_str() != crate::metrics::NO_REGION)
        .map(|(_, t)| t.requests)
        .sum();
    let empty = Traffic::default();
    let regions: Vec<_> = snapshot
        .regions
        .iter()
        .map(|region| {
            let verdict = crate::core::select::region_verdict(region, now);
            let t = traffic.get(&region.name).unwrap_or(&empty);
            let available = region
                .upstreams
                .iter()
                .filter(|u| u.is_available(now))
                .count();
            serde_json::json!({
                "name": region.name,
                "state": verdict.reason(),
                "healthy": matches!(
                    verdict,
                    crate::core::select::RegionVerdict::Available
                        | crate::core::select::RegionVerdict::Full
                ),
                "upstreams": region.upstreams.len(),
                "upstreams_available": available,
                "inflight": region.state.inflight(),
                "max_inflight": region.max_inflight,
                "requests": t.requests,
                "errors_5xx": t.errors,
                "share": if served > 0.0 { t.requests / served } else { 0.0 },
                "latency_mean_ms": (t.count > 0.0).then(|| t.seconds / t.count * 1e3),
                "latency_p95_ms": t.quantile_ms(0.95),
            })
        })
        .collect();
    let pops: Vec<_> = snapshot
        .config
        .pops
        .iter()
        .map(|pop| {
            serde_json::json!({
                "name": pop.name,
                "addresses": pop.addresses,
                "healthy": pop_health.get(&pop.name),
            })
        })
        .collect();
    serde_json::json!({
        "pop": snapshot.pop,
        "version": snapshot.meta.version,
        "config_hash": snapshot.meta.hash,
        "requests": traffic.values().map(|t| t.requests).sum::<f64>(),
        "cache": {
            "lookups": cache_lookups,
            "hits": cache_hits,
            "hit_ratio": (cache_lookups > 0.0).then(|| cache_hits / cache_lookups),
        },
        "regions": regions,
        "pops": pops,
    })
}

/// `GET /`: the page, with the current status embedded so it renders even before the first poll.
pub fn status_html(store: &SnapshotStore) -> String {
    // `</` inside a script element would end it early; `<\/` is the same JSON string.
    let initial = status_json(store).to_string().replace("</", "<\\/");
    STATUS_HTML.replace("/*INITIAL*/null", &initial)
}

const STATUS_HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Meridian edge status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; background: #f6f7f9; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  h2 { font-size: 16px; margin: 24px 0 8px; }
  .meta { color: #5a6375; margin-bottom: 16px; }
  .meta span { margin-right: 18px; }
  table { border-collapse: collapse; width: 100%; background: #fff; box-shadow: 0 1px 2px #0002; }
  th, td { padding: 6px 10px; text-align: left; border-bottom: 1px solid #e6e8ec; }
  th { background: #eef0f4; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .ok { color: #17803d; font-weight: 600; }
  .bad { color: #c0262d; font-weight: 600; }
  .unknown { color: #8a8f99; }
  .bar { display: inline-block; height: 8px; background: #3b6fd8; border-radius: 2px; vertical-align: middle; }
  #updated { font-size: 12px; }
</style>
</head>
<body>
<h1>Meridian edge <span id="pop"></span></h1>
<div class="meta">
  <span>config version <b id="version"></b></span>
  <span>hash <code id="hash"></code></span>
  <span>requests <b id="requests"></b></span>
  <span>cache hit ratio <b id="cache"></b></span>
  <span id="updated" class="unknown">initial data</span>
</div>
<h2>Regions</h2>
<table>
  <thead><tr><th>region</th><th>health</th><th>upstreams</th><th>in flight</th>
  <th>traffic share</th><th>mean latency</th><th>p95 latency</th><th>5xx</th></tr></thead>
  <tbody id="regions"></tbody>
</table>
<div id="pops-section">
<h2>DNS PoPs</h2>
<table>
  <thead><tr><th>PoP</th><th>health</th><th>addresses</th></tr></thead>
  <tbody id="pops"></tbody>
</table>
</div>
<script>
"use strict";
const INITIAL = /*INITIAL*/null;
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
function ms(v) { return v == null ? "–" : v.toFixed(1) + " ms"; }
function pct(v) { return v == null ? "–" : (100 * v).toFixed(1) + " %"; }
function render(s) {
  document.getElementById("pop").textContent = s.pop;
  document.getElementById("version").textContent = s.version;
  document.getElementById("hash").textContent = s.config_hash;
  document.getElementById("requests").textContent = s.requests;
  document.getElementById("cache").textContent = pct(s.cache.hit_ratio);
  const regions = document.getElementById("regions");
  regions.replaceChildren();
  for (const r of s.regions) {
    const row = document.createElement("tr");
    cell(row, r.name);
    cell(row, r.healthy ? "healthy" : r.state, r.healthy ? "ok" : "bad");
    cell(row, r.upstreams_available + " / " + r.upstreams, "num");
    cell(row, r.inflight + (r.max_inflight ? " / " + r.max_inflight : ""), "num");
    const share = cell(row, " " + pct(r.share));
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.round(80 * r.share) + "px";
    share.prepend(bar);
    cell(row, ms(r.latency_mean_ms), "num");
    cell(row, ms(r.latency_p95_ms), "num");
    cell(row, r.errors_5xx, "num");
    regions.appendChild(row);
  }
  const pops = document.getElementById("pops");
  pops.replaceChildren();
  document.getElementById("pops-section").hidden = s.pops.length === 0;
  for (const p of s.pops) {
    const row = document.createElement("tr");
    cell(row, p.name);
    cell(row, p.healthy == null ? "unknown" : (p.healthy ? "healthy" : "down"),
         p.healthy == null ? "unknown" : (p.healthy ? "ok" : "bad"));
    cell(row, p.addresses.join(", "));
    pops.appendChild(row);
  }
}
async function poll() {
  const updated = document.getElementById("updated");
  try {
    const response = await fetch("/admin/status.json", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    updated.textContent = "live, updated " + new Date().toLocaleTimeString();
    updated.className = "ok";
  } catch (e) {
    updated.textContent = "stale: " + e.message;
    updated.className = "bad";
  }
}
render(INITIAL);
poll();
setInterval(poll, 2000);
</script>
</body>
</html>
"##;
