//! Model-server state from its Prometheus metrics: the waiting queue, running requests, KV-cache
//! use and loaded LoRA adapters, under vLLM's names by default and any server's names through a
//! mapping (SGLang, TGI, ...). The text is read line by line; only the named gauges are kept.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::core::inference::pick::ReplicaMetrics;
use crate::core::inference::replicas::{ReplicaState, ReplicaTable};
use crate::reload::SnapshotStore;
pub use meridian_config::inference::MetricNames;

/// The per-replica state of every model server this edge routes to, exported as gauges.
pub struct ScrapeMetrics {
    /// `meridian_inference_replica_queue{region,upstream}`
    queue: GaugeVec,
    /// `meridian_inference_replica_running{region,upstream}`
    running: GaugeVec,
    /// `meridian_inference_replica_kv_cache_ratio{region,upstream}`
    kv_cache: GaugeVec,
    /// `meridian_inference_scrapes_total{region,result}`
    scrapes: IntCounterVec,
}

impl ScrapeMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge =
            |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["region", "upstream"]);
        let queue = gauge(
            "meridian_inference_replica_queue",
            "Requests waiting at each model server, from its last successful metrics scrape.",
        )?;
        let running = gauge(
            "meridian_inference_replica_running",
            "Requests running at each model server, from its last successful metrics scrape.",
        )?;
        let kv_cache = gauge(
            "meridian_inference_replica_kv_cache_ratio",
            "KV-cache utilisation (0-1) of each model server, from its last successful metrics scrape.",
        )?;
        let scrapes = IntCounterVec::new(
            Opts::new(
                "meridian_inference_scrapes_total",
                "Metrics scrapes of model servers by region and result (ok, error).",
            ),
            &["region", "result"],
        )?;
        registry.register(Box::new(queue.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(kv_cache.clone()))?;
        registry.register(Box::new(scrapes.clone()))?;
        Ok(Self {
            queue,
            running,
            kv_cache,
            scrapes,
        })
    }

    fn record(&self, region: &str, upstream: &str, result: &Result<Scraped, ScrapeError>) {
        let labels = [region, upstream];
        match result {
            Ok(scraped) => {
                self.queue
                    .with_label_values(&labels)
                    .set(scraped.metrics.waiting);
                self.running
                    .with_label_values(&labels)
                    .set(scraped.metrics.running);
                self.kv_cache
                    .with_label_values(&labels)
                    .set(scraped.metrics.kv_cache);
                self.scrapes.with_label_values(&[region, "ok"]).inc();
            }
            Err(e) => {
                tracing::debug!(region, upstream, "model server metrics: {e}");
                // No stale numbers: a replica that cannot be scraped shows none.
                let _ = self.queue.remove_label_values(&labels);
                let _ = self.running.remove_label_values(&labels);
                let _ = self.kv_cache.remove_label_values(&labels);
                self.scrapes.with_label_values(&[region, "error"]).inc();
            }
        }
    }
}

/// The state of every model server that answered the last scrape round, by address (replaced
/// whole each round: read without a lock on the request path).
pub type Replicas = Arc<arc_swap::ArcSwap<ReplicaTable>>;

/// Scrapes every model server of the current snapshot, every `[inference] scrape_interval`,
/// from the first model call on (the edge's runtimes exist by then) until the store is gone.
#[derive(Default)]
pub struct Scraper {
    started: OnceLock<()>,
    replicas: Replicas,
}

impl Scraper {
    pub fn start(&self, store: &Arc<SnapshotStore>, metrics: Option<Arc<ScrapeMetrics>>) {
        if self.started.set(()).is_err() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(run(
            Arc::downgrade(store),
            metrics,
            Arc::clone(&self.replicas),
        ));
    }

    /// What the last round found.
    pub fn replicas(&self) -> Arc<ReplicaTable> {
        self.replicas.load_full()
    }
}

async fn run(store: Weak<SnapshotStore>, metrics: Option<Arc<ScrapeMetrics>>, replicas: Replicas) {
    loop {
        let Some(live) = store.upgrade() else {
            return;
        };
        let loaded = live.load();
        drop(live);
        let snapshot = &loaded.snapshot;
        let interval = snapshot
            .config
            .inference
            .scrape_interval
            .as_duration()
            .max(Duration::from_millis(10));
        let path: Arc<str> = snapshot.config.inference.scrape_path.as_str().into();
        let names = Arc::new(snapshot.config.inference.metric_names.clone());
        let mut scrapes = tokio::task::JoinSet::new();
        for (r, region) in snapshot.regions.iter().enumerate() {
            let serves_models = snapshot
                .models
                .models
                .iter()
                .any(|m| m.served_by.get(r).copied().unwrap_or(false));
            if !serves_models {
                continue;
            }
            for upstream in &region.upstreams {
                let (name, address) = (region.name.clone(), upstream.address);
                let (path, names) = (Arc::clone(&path), Arc::clone(&names));
                scrapes.spawn(async move {
                    let result = scrape(address, &path, &names, interval).await;
                    (name, address, result)
                });
            }
        }
        drop(loaded);
        let mut results = Vec::new();
        while let Some(done) = scrapes.join_next().await {
            if let Ok(result) = done {
                results.push(result);
            }
        }
        let found = results
            .iter()
            .filter_map(|(_, address, result)| {
                let scraped = result.as_ref().ok()?;
                let state = ReplicaState {
                    metrics: scraped.metrics,
                    adapters: scraped.adapters.clone(),
                };
                Some((*address, state))
            })
            .collect();
        replicas.store(Arc::new(ReplicaTable {
            at_ms: crate::clock::now_ms(),
            replicas: found,
        }));
        // Exported after the table is in place, so whoever sees a gauge knows the picks do too.
        if let Some(metrics) = metrics.as_ref() {
            for (region, address, result) in &results {
                metrics.record(region, &address.to_string(), result);
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One scrape: the replica's state and the adapters it has loaded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scraped {
    pub metrics: ReplicaMetrics,
    /// `None`: the server reports no adapter information at all.
    pub adapters: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("metrics endpoint: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics endpoint answered {0}")]
    Status(String),
    #[error("metrics endpoint timed out")]
    Timeout,
    #[error("metrics response larger than {0} bytes")]
    TooLarge(usize),
    #[error("no queue or KV-cache metric in the response")]
    Missing,
}

/// Parses Prometheus text exposition: sums the samples of each named gauge across label sets
/// (one series per model on a multi-model server); the adapters of the latest info sample.
pub fn parse(text: &str, names: &MetricNames) -> Result<Scraped, ScrapeError> {
    let mut scraped = Scraped::default();
    let mut found = false;
    let mut kv_samples = 0u32;
    let mut latest_info = f64::NEG_INFINITY;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find(['{', ' ']) {
            Some(at) => line.split_at(at),
            None => continue,
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(inner) => match inner.rfind('}') {
                Some(end) => (&inner[..end], inner[end + 1..].trim()),
                None => continue,
            },
            None => ("", rest.trim()),
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        let is = |list: &[String]| list.iter().any(|n| n == series);
        if is(&names.waiting) {
            scraped.metrics.waiting += value;
            found = true;
        } else if is(&names.running) {
            scraped.metrics.running += value;
            found = true;
        } else if is(&names.kv_cache) {
            scraped.metrics.kv_cache += value;
            kv_samples += 1;
            found = true;
        } else if is(&names.lora_info) && value >= latest_info {
            latest_info = value;
            scraped.adapters = Some(
                label(labels, "running_lora_adapters")
                    .split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_string)
                    .collect(),
            );
        }
    }
    if kv_samples > 1 {
        // Utilisation per model: the mean, not the sum.
        scraped.metrics.kv_cache /= f64::from(kv_samples);
    }
    if found {
        Ok(scraped)
    } else {
        Err(ScrapeError::Missing)
    }
}

/// The value of label `name` in `a="x",b="y,z"` (values are quoted and may hold commas).
fn label<'a>(labels: &'a str, name: &str) -> &'a str {
    let mut rest = labels;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim();
        let Some(quoted) = rest[eq + 1..].trim_start().strip_prefix('"') else {
            return "";
        };
        let mut escaped = false;
        let Some(end) = quoted.bytes().position(|b| {
            let close = b == b'"' && !escaped;
            escaped = b == b'\\' && !escaped;
            close
        }) else {
            return "";
        };
        if key == name {
            return &quoted[..end];
        }
        rest = &quoted[end + 1..];
    }
    ""
}

/// Largest metrics response read (vLLM's is a few tens of KiB with histograms).
const MAX_METRICS_BYTES: usize = 4 * 1024 * 1024;

/// `GET path` from a model server (HTTP/1.1, one connection per scrape), parsed.
pub async fn scrape(
    address: SocketAddr,
    path: &str,
    names: &MetricNames,
    timeout: Duration,
) -> Result<Scraped, ScrapeError> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            if response.len() + n > MAX_METRICS_BYTES {
                return Err(ScrapeError::TooLarge(MAX_METRICS_BYTES));
            }
            response.extend_from_slice(&chunk[..n]);
        }
        Ok(response)
    };
    let response = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout)??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(ScrapeError::Status(status.to_string()));
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    if chunked {
        parse(&dechunk(body), names)
    } else {
        parse(body, names)
    }
}

/// The body of a chunked response (sizes dropped).
fn dechunk(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 3.0
vllm:num_requests_waiting{model_name="b"} 2.0
vllm:num_requests_running{model_name="a"} 7
vllm:gpu_cache_usage_perc{model_name="a"} 0.5
vllm:gpu_cache_usage_perc{model_name="b"} 0.25
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,tax",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.6e9
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="a"} 12
"#;

    #[test]
    fn reads_vllm_gauges_across_models() {
        let scraped = parse(VLLM, &MetricNames::default()).expect("parsed");
        assert_eq!(scraped.metrics.waiting, 5.0);
        assert_eq!(scraped.metrics.running, 7.0);
        assert_eq!(scraped.metrics.kv_cache, 0.375);
        assert_eq!(scraped.adapters, Some(vec!["sql".into(), "tax".into()]));
    }

    #[test]
    fn other_servers_through_a_mapping() {
        let sglang = "sglang:num_queue_reqs{model_name=\"x\"} 4\nsglang:num_running_reqs 2\nsglang:token_usage 0.9\n";
        let tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 6\ntgi_batch_current_size 3\n";
        // The mapping docs/inference.md gives for a fleet of SGLang and TGI servers.
        let config: meridian_config::Config = toml::from_str(
            r#"
schema = 1
[inference.metric_names]
waiting = ["sglang:num_queue_reqs", "tgi_queue_size"]
running = ["sglang:num_running_reqs", "tgi_batch_current_size"]
kv_cache = ["sglang:token_usage"]
lora_info = []
"#,
        )
        .expect("config");
        let names = &config.inference.metric_names;
        let scraped = parse(sglang, names).expect("parsed");
        assert_eq!(scraped.metrics.waiting, 4.0);
        assert_eq!(scraped.metrics.running, 2.0);
        assert_eq!(scraped.metrics.kv_cache, 0.9);
        assert_eq!(scraped.adapters, None);
        let scraped = parse(tgi, names).expect("parsed");
        assert_eq!(scraped.metrics.waiting, 6.0);
        assert_eq!(scraped.metrics.running, 3.0);
        assert_eq!(scraped.metrics.kv_cache, 0.0, "TGI reports no KV-cache use");
        assert!(
            parse(sglang, &MetricNames::default()).is_err(),
            "no vLLM names"
        );
        assert!(parse(
            "garbage {{{\n\n# x\nvllm:num_requests_waiting NaN\n",
            &MetricNames::default()
        )
        .is_err());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
