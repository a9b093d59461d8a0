//! Access logs: one JSON line per request, emitted through `tracing` with target [`TARGET`] by the
//! pipeline's finish record (every front), plus W3C `traceparent` propagation (the client's when
//! valid, else a fresh one) to upstreams.
//!
//! With `[edge.access_log] enabled = false` (the default) a request calls [`sampled`] once and does
//! nothing else for access logging. The JSON is built here with `serde_json`, so the line is the
//! same whatever subscriber is installed; `main` prints the message of this target verbatim.
//!
//! Fields that are `null` by design: `request_id`/`traceparent` of a request that never went
//! upstream (refusal, cache hit) are the client's headers or `null`; `upstream_connect_ms` when no
//! upstream was contacted (0 for a reused pooled connection).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::core::headers::UpstreamHeaders;
use http::{HeaderMap, HeaderName, HeaderValue};
use meridian_config::AccessLog;

use crate::metrics::Protocol;
use crate::pipeline::forward::splitmix;

/// The `tracing` target of access-log events.
pub const TARGET: &str = "meridian::access";
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_MERIDIAN_CACHE: &str = "x-meridian-cache";

/// Whether this request is logged: the switch, then the sampling roll.
pub fn sampled(config: &AccessLog) -> bool {
    roll(if config.enabled { config.sample } else { 0.0 })
}

/// Whether this request is logged, for a compiled share of logged requests (0: none, 1: all).
pub fn roll(sample: f64) -> bool {
    if sample <= 0.0 {
        return false;
    }
    if sample >= 1.0 {
        return true;
    }
    // 53 random bits as a fraction in [0, 1).
    let roll = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
    roll < sample
}

/// Sets `traceparent` on an upstream request: the client's is kept when it is well formed,
/// anything else (absent, malformed) is replaced by a fresh version-00 one.
pub fn propagate_traceparent(headers: &mut UpstreamHeaders<'_>) {
    if needs_traceparent(headers.get(&TRACEPARENT)) {
        headers.insert(TRACEPARENT, new_traceparent_value());
    }
}

/// True when `traceparent` (the field a request carries, if any) is not a well-formed one (the
/// edge then sends a fresh one).
pub fn needs_traceparent(traceparent: Option<&HeaderValue>) -> bool {
    traceparent
        .and_then(|v| v.to_str().ok())
        .and_then(trace_id)
        .is_none()
}

/// The trace id of a well-formed `traceparent` (`VV-<32 hex>-<16 hex>-<2 hex>`, version not
/// `ff`, ids not all zero).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0');
    valid.then_some(trace)
}

/// A fresh `00-<trace id>-<span id>-01` (sampled flag set: the edge asks for the trace).
pub fn new_traceparent() -> String {
    String::from_utf8_lossy(&traceparent_bytes()).into_owned()
}

/// [`new_traceparent`] as a header value, built on the stack (the request path's version: one
/// allocation instead of a `String` and then a copy of it).
pub fn new_traceparent_value() -> HeaderValue {
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(&traceparent_bytes()).unwrap_or(HeaderValue::from_static(""))
}

/// `00-<32 hex trace id>-<16 hex span id>-01`.
fn traceparent_bytes() -> [u8; 55] {
    let (a, b, c) = (random_u64(), random_u64(), random_u64());
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let hex16 = crate::pipeline::forward::hex16;
    out[3..19].copy_from_slice(&hex16(a));
    out[19..35].copy_from_slice(&hex16(b));
    out[36..52].copy_from_slice(&hex16(c.max(1)));
    out
}

/// What the fronts know about a logged request's upstream side, gathered as it runs.
#[derive(Default, Debug)]
pub struct UpstreamSide {
    /// `X-Request-Id` sent upstream (or the client's, when nothing went upstream).
    pub request_id: Option<String>,
    /// `traceparent` sent upstream (or the client's).
    pub traceparent: Option<String>,
    pub upstream: Option<SocketAddr>,
    /// Time to establish the upstream connection (zero when a pooled connection was reused).
    pub connect: Option<Duration>,
    /// From request start to the upstream's response headers.
    pub first_byte: Option<Duration>,
}

impl UpstreamSide {
    /// Request id and traceparent from the headers of the request sent upstream.
    pub fn note_upstream_headers(&mut self, headers: &UpstreamHeaders<'_>) {
        self.note(|name| headers.get(name));
    }

    /// For requests that never went upstream: what the client sent, if anything.
    pub fn fill_from_client(&mut self, headers: &HeaderMap) {
        if self.request_id.is_none() && self.traceparent.is_none() {
            self.note(|name| headers.get(name));
        }
    }

    fn note<'h>(&mut self, get: impl Fn(&HeaderName) -> Option<&'h HeaderValue>) {
        let text = |name: &HeaderName| get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        self.request_id = text(&X_REQUEST_ID);
        self.traceparent = text(&TRACEPARENT);
    }
}

/// One finished request.
pub struct Entry<'a> {
    pub protocol: Protocol,
    pub method: &'a str,
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub status: u16,
    pub country: Option<&'a str>,
    pub route: Option<&'a str>,
    pub region: Option<&'a str>,
    /// Response body bytes sent to the client (`None`: not measured on this path).
    pub bytes_sent: Option<u64>,
    /// `x-meridian-cache` of the response, when it had one.
    pub cache: Option<&'a str>,
    pub total: Duration,
    pub side: &'a UpstreamSide,
}

/// The `x-meridian-cache` value of response headers.
pub fn cache_result(headers: &HeaderMap) -> Option<&str> {
    headers.get(X_MERIDIAN_CACHE).and_then(|v| v.to_str().ok())
}

/// The JSON object of one access-log line.
pub fn to_json(entry: &Entry<'_>) -> serde_json::Value {
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let side = entry.side;
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    serde_json::json!({
        "timestamp": httpdate_rfc3339(timestamp),
        "request_id": side.request_id,
        "traceparent": side.traceparent,
        "trace_id": side.traceparent.as_deref().and_then(trace_id),
        "client_country": entry.country,
        "route": entry.route,
        "region": entry.region,
        "upstream": side.upstream.map(|a| a.to_string()),
        "protocol": entry.protocol.label(),
        "method": entry.method,
        "host": entry.host,
        "path": entry.path,
        "status": entry.status,
        "bytes_sent": entry.bytes_sent,
        "cache": entry.cache,
        "duration_ms": ms(entry.total),
        "upstream_connect_ms": side.connect.map(ms),
        "first_byte_ms": side.first_byte.map(ms),
    })
}

/// Emits the line (an `INFO` event of target [`TARGET`] whose message is the JSON object).
pub fn emit(entry: &Entry<'_>) {
    let line = to_json(entry).to_string();
    tracing::info!(target: TARGET, "{line}");
}

/// A `tracing_subscriber` layer that writes the message of each event as one line, verbatim: with
/// a target filter for [`TARGET`] it turns access-log events into pure JSON lines (`main` sends them
/// to stdout; tests to a buffer).
pub struct AccessLogLayer<W> {
    make_writer: W,
}

impl<W> AccessLogLayer<W> {
    pub fn new(make_writer: W) -> Self {
        Self { make_writer }
    }
}

impl<S, W> tracing_subscriber::Layer<S> for AccessLogLayer<W>
where
    S: tracing::Subscriber,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + 'static,
{
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    use std::fmt::Write;
                    let _ = write!(self.0, "{value:?}");
                }
            }
        }
        let mut message = Message(String::with_capacity(512));
        event.record(&mut message);
        message.0.push('\n');
        use std::io::Write;
        let _ = self
            .make_writer
            .make_writer()
            .write_all(message.0.as_bytes());
    }
}

/// Only access-log events (for a per-layer filter on [`AccessLogLayer`]).
pub fn is_access_log(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.target() == TARGET
}

/// `2026-11-27T17:14:17.123Z` from a duration since the Unix epoch (UTC, millisecond precision).
fn httpdate_rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let millis = since_epoch.subsec_millis();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Process-unique, unpredictable-enough ids for traces and sampling (not cryptographic).
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        splitmix(t ^ u64::from(std::process::id()).rotate_left(32))
    });
    splitmix(seed ^ splitmix(COUNTER.fetch_add(1, Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_validated_and_generated() {
        let tp = new_traceparent();
        assert_eq!(tp.len(), 55, "{tp}");
        assert!(trace_id(&tp).is_some(), "{tp}");
        assert_ne!(new_traceparent(), tp);
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(good), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
        let mut client = HeaderMap::new();
        client.insert(TRACEPARENT, HeaderValue::from_static(good));
        let mut headers = UpstreamHeaders::from_client(&client);
        propagate_traceparent(&mut headers);
        assert_eq!(headers.to_map()[&TRACEPARENT], good);
        client.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        let mut headers = UpstreamHeaders::from_client(&client);
        propagate_traceparent(&mut headers);
        let sent = headers.to_map();
        assert!(trace_id(sent[&TRACEPARENT].to_str().expect("ascii")).is_some());
        assert_eq!(sent.get_all(&TRACEPARENT).iter().count(), 1);
    }

    #[test]
    fn sampling_and_timestamps() {
        let mut config = AccessLog::default();
        assert!(!sampled(&config));
        config.enabled = true;
        assert!(sampled(&config));
        config.sample = 0.0;
        assert!(!sampled(&config));
        config.sample = 0.5;
        let hits = (0..10_000).filter(|_| sampled(&config)).count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
        assert_eq!(
            httpdate_rfc3339(Duration::from_millis(1_795_799_657_123)),
            "2026-11-27T17:14:17.123Z"
        );
    }
}
