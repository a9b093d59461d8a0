//! Inference settings: models per region (`regions[].models`), aliases, API keys and the
//! per-route `inference = { max_body_bytes, rate_limit = { ... } }` table, with their validation.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::schema::{Config, RouteKind};
use crate::HumanDuration;

/// The largest `max_body_bytes` an inference route may set: a model call is held whole in memory
/// (the model is in it, and a fallback replays it), so this bounds what one request can pin.
pub const MAX_INFERENCE_BODY_BYTES: u64 = 256 * 1024 * 1024;
/// `max_body_bytes` when a route does not set it: room for long contexts, tool definitions and
/// base64 images.
pub const DEFAULT_INFERENCE_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Completion tokens reserved against `tokens_per_minute` for a call that names no `max_tokens`.
pub const DEFAULT_RESERVED_COMPLETION_TOKENS: u64 = 256;

/// `[inference]`: settings shared by every inference route.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceSection {
    /// Alias -> model, e.g. `qwen = "qwen-plus"`. The target must be served by some region.
    pub aliases: BTreeMap<String, String>,
    /// Completion tokens reserved against `tokens_per_minute` for a call without `max_tokens`.
    pub default_max_tokens: u64,
    /// How often each model server (upstream of a region serving models) is asked for its
    /// Prometheus metrics: queue, running requests, KV-cache use, loaded adapters.
    pub scrape_interval: HumanDuration,
    /// The path of that metrics endpoint on every model server.
    pub scrape_path: String,
    /// A model server with at least this many waiting requests is saturated; a region whose
    /// model servers all are sheds `sheddable` calls.
    pub saturation_queue: u32,
    /// Criticality per API key name (`[[api_keys]] name`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub key_criticality: BTreeMap<String, Criticality>,
    /// Criticality per model or alias name, for callers whose key sets none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub model_criticality: BTreeMap<String, Criticality>,
    /// How a model call's replica is chosen inside a region.
    pub picking: Picking,
    /// A request header whose value keys prefix affinity instead of the prompt (a conversation
    /// or session id): calls carrying the same value go to the same replica. Empty: none.
    pub session_header: String,
    /// Which Prometheus series of a model server hold its queue, running requests, KV-cache use
    /// and loaded adapters (vLLM's names by default).
    pub metric_names: MetricNames,
}

/// `[inference] picking`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Picking {
    /// Score by the model servers' own state (queue, KV cache, adapters) with prefix affinity;
    /// least outstanding when their metrics are stale or missing.
    #[default]
    ModelAware,
    /// Weighted least outstanding, as for any route (for comparison, or servers without metrics).
    LeastOutstanding,
}

/// `[inference.metric_names]`: for each value, the series names that hold it. Any listed name
/// counts, so a fleet mixing servers lists the names of each.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricNames {
    /// Requests waiting for a slot.
    pub waiting: Vec<String>,
    /// Requests being served.
    pub running: Vec<String>,
    /// KV-cache utilisation, 0 to 1 (several samples are averaged).
    pub kv_cache: Vec<String>,
    /// An info series whose `running_lora_adapters` label lists the loaded adapters.
    pub lora_info: Vec<String>,
}

impl Default for MetricNames {
    fn default() -> Self {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        Self {
            waiting: names(&["vllm:num_requests_waiting"]),
            running: names(&["vllm:num_requests_running"]),
            kv_cache: names(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]),
            lora_info: names(&["vllm:lora_requests_info"]),
        }
    }
}

/// The session header when `[inference] session_header` is not set.
pub const DEFAULT_SESSION_HEADER: &str = "x-meridian-session";

fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// Who goes first when model servers saturate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    /// Never shed while a region can still take it.
    Critical,
    #[default]
    Standard,
    /// Refused with `429` first when the region it would go to is saturated.
    Sheddable,
}

impl Default for InferenceSection {
    fn default() -> Self {
        Self {
            aliases: BTreeMap::new(),
            default_max_tokens: DEFAULT_RESERVED_COMPLETION_TOKENS,
            scrape_interval: HumanDuration::millis(200),
            scrape_path: "/metrics".into(),
            saturation_queue: 8,
            key_criticality: BTreeMap::new(),
            model_criticality: BTreeMap::new(),
            picking: Picking::default(),
            session_header: DEFAULT_SESSION_HEADER.into(),
            metric_names: MetricNames::default(),
        }
    }
}

impl InferenceSection {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `[[api_keys]]`: a caller of inference routes. Only the hash of the bearer token is stored.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub name: String,
    /// Lowercase hex sha256 of the bearer token (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: String,
}

/// A route's `inference = { ... }`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteInference {
    /// Request bodies larger than this are answered `413` (default 16 MiB, at most
    /// [`MAX_INFERENCE_BODY_BYTES`]; it replaces `edge.limits.max_body_bytes` for model calls).
    pub max_body_bytes: u64,
    /// Per API key, per route, per edge (not global across edges).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

impl Default for RouteInference {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_INFERENCE_BODY_BYTES,
            rate_limit: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens. A call reserves its estimate at admission (prompt bytes / 4 +
    /// `max_tokens`, or `[inference] default_max_tokens`), settled to the response `usage` when it
    /// ends (the reservation when none came).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

fn is_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

/// `name` when it is a lowercase token a header may be named by.
fn http_header_name(name: &str) -> Option<&str> {
    (name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-'))
    .then_some(name)
}

/// Every inference problem as (path, message), in document order.
pub(crate) fn validate(config: &Config) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let mut served: HashSet<&str> = HashSet::new();
    for (i, region) in config.regions.iter().enumerate() {
        let mut seen = HashSet::new();
        for (j, model) in region.models.iter().enumerate() {
            let path = format!("regions[{i}].models[{j}]");
            if !is_model_name(model) {
                errors.push((
                    path,
                    format!("bad model name {model:?} (1-128 characters of A-Z, a-z, 0-9, '-', '_', '.', ':', '/')"),
                ));
            } else if !seen.insert(model.as_str()) {
                errors.push((path, format!("model {model:?} listed twice")));
            } else {
                served.insert(model.as_str());
            }
        }
    }
    for (alias, target) in &config.inference.aliases {
        let path = format!("inference.aliases.{alias}");
        if !is_model_name(alias) {
            errors.push((path, format!("bad alias name {alias:?}")));
        } else if served.contains(alias.as_str()) {
            errors.push((
                path,
                format!("alias {alias:?} is also a model name served by a region"),
            ));
        } else if !served.contains(target.as_str()) {
            errors.push((
                path,
                format!("unknown model {target:?} (no region lists it in models)"),
            ));
        }
    }
    if config.inference.default_max_tokens == 0 {
        errors.push((
            "inference.default_max_tokens".into(),
            "must be at least 1".into(),
        ));
    }
    if config.inference.scrape_interval.as_duration() < std::time::Duration::from_millis(10) {
        errors.push((
            "inference.scrape_interval".into(),
            "must be at least 10ms".into(),
        ));
    }
    if !config.inference.scrape_path.starts_with('/') {
        errors.push(("inference.scrape_path".into(), "must start with '/'".into()));
    }
    if config.inference.saturation_queue == 0 {
        errors.push((
            "inference.saturation_queue".into(),
            "must be at least 1".into(),
        ));
    }
    let header = &config.inference.session_header;
    if !header.is_empty() && http_header_name(header).is_none() {
        errors.push((
            "inference.session_header".into(),
            format!("{header:?} is not a lowercase header name (a-z, 0-9, '-')"),
        ));
    }
    let names = &config.inference.metric_names;
    if names.waiting.is_empty() {
        errors.push((
            "inference.metric_names.waiting".into(),
            "name at least one series (the queue is what picking and saturation need)".into(),
        ));
    }
    for (field, list) in [
        ("waiting", &names.waiting),
        ("running", &names.running),
        ("kv_cache", &names.kv_cache),
        ("lora_info", &names.lora_info),
    ] {
        for (i, name) in list.iter().enumerate() {
            if !is_metric_name(name) {
                errors.push((
                    format!("inference.metric_names.{field}[{i}]"),
                    format!("{name:?} is not a Prometheus metric name"),
                ));
            }
        }
    }
    for name in config.inference.key_criticality.keys() {
        if !config.api_keys.iter().any(|k| &k.name == name) {
            errors.push((
                format!("inference.key_criticality.{name}"),
                "no [[api_keys]] entry has this name".into(),
            ));
        }
    }
    for name in config.inference.model_criticality.keys() {
        if !served.contains(name.as_str()) && !config.inference.aliases.contains_key(name) {
            errors.push((
                format!("inference.model_criticality.{name}"),
                "no region serves this model and no alias has this name".into(),
            ));
        }
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut hashes: HashMap<String, usize> = HashMap::new();
    for (i, key) in config.api_keys.iter().enumerate() {
        let path = format!("api_keys[{i}]");
        let good_name = !key.name.is_empty()
            && key.name.len() <= 64
            && key
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !good_name {
            errors.push((
                format!("{path}.name"),
                format!(
                    "bad name {:?} (1-64 characters of a-z, 0-9, '-', '_')",
                    key.name
                ),
            ));
        } else if let Some(first) = names.insert(&key.name, i) {
            errors.push((
                format!("{path}.name"),
                format!("duplicate API key name (first defined at api_keys[{first}])"),
            ));
        }
        if key.sha256.len() != 64 || !key.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            errors.push((
                format!("{path}.sha256"),
                "must be the 64 hex digits of the token's sha256".into(),
            ));
        } else if let Some(first) = hashes.insert(key.sha256.to_ascii_lowercase(), i) {
            errors.push((
                format!("{path}.sha256"),
                format!("same token hash as api_keys[{first}]"),
            ));
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        let Some(inference) = &route.inference else {
            continue;
        };
        let path = format!("routes[{i}].inference");
        if route.kind != RouteKind::Inference {
            errors.push((
                path.clone(),
                "only routes of kind = \"inference\" take inference settings".into(),
            ));
        }
        if !(1..=MAX_INFERENCE_BODY_BYTES).contains(&inference.max_body_bytes) {
            errors.push((
                format!("{path}.max_body_bytes"),
                format!("must be between 1 and {MAX_INFERENCE_BODY_BYTES}"),
            ));
        }
        if let Some(limit) = &inference.rate_limit {
            if limit.requests_per_minute == Some(0) {
                errors.push((
                    format!("{path}.rate_limit.requests_per_minute"),
                    "must be at least 1 (omit it for no limit)".into(),
                ));
            }
            if limit.tokens_per_minute == Some(0) {
                errors.push((
                    format!("{path}.rate_limit.tokens_per_minute"),
                    "must be at least 1 (omit it for no limit)".into(),
                ));
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use crate::Config;

    const BASE: &str = r#"
schema = 1
[[regions]]
name = "a"
location = { lat = 1.0, lon = 2.0 }
upstreams = [{ address = "127.0.0.1:1" }]
models = ["m-1", "m-1"]
[[routes]]
name = "r"
hosts = ["x.test"]
inference = { max_body_bytes = 300000000, rate_limit = { requests_per_minute = 0 } }
[inference]
aliases = { m = "nope", "m-1" = "m-1" }
default_max_tokens = 0
scrape_interval = "1ms"
scrape_path = "metrics"
saturation_queue = 0
session_header = "X Session"
metric_names = { waiting = [], kv_cache = ["ok:name", "9bad"] }
key_criticality = { nobody = "critical" }
model_criticality = { gpt-9 = "sheddable" }
[[api_keys]]
name = "k"
sha256 = "abc"
"#;

    #[test]
    fn every_inference_error_has_its_path() {
        let config: Config = toml::from_str(BASE).expect("parses");
        let errors: Vec<String> = config
            .validate()
            .expect_err("invalid")
            .iter()
            .map(ToString::to_string)
            .collect();
        let all = errors.join("\n");
        for path in [
            "regions[0].models[1]",
            "inference.aliases.m:",
            "inference.aliases.m-1",
            "api_keys[0].sha256",
            "routes[0].inference:",
            "routes[0].inference.max_body_bytes",
            "routes[0].inference.rate_limit.requests_per_minute",
            "inference.default_max_tokens",
            "inference.scrape_interval",
            "inference.scrape_path",
            "inference.saturation_queue",
            "inference.session_header",
            "inference.metric_names.waiting",
            "inference.metric_names.kv_cache[1]",
            "inference.key_criticality.nobody",
            "inference.model_criticality.gpt-9",
        ] {
            assert!(all.contains(path), "{path} missing in:\n{all}");
        }
    }
}
