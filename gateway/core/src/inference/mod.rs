//! Inference decisions: what an inference route does with a request (the OpenAI-compatible
//! surface), who the caller is, which model a call names and whether this edge serves it. Pure
//! functions over the snapshot; the gateway reads bodies, applies rate limits and counts.

pub mod openai;
pub mod pick;
pub mod prefixes;
pub mod replicas;
pub mod sniff;
pub mod usage;

use std::borrow::Cow;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::models::ModelId;
use crate::snapshot::{CompiledRoute, Snapshot};
use openai::ApiError;

/// sha256 of a caller's bearer token (all zeros for "no token").
pub type KeyHash = [u8; 32];

/// What an inference route does with a request, before any body is read (transport-free).
/// Every request on an inference route passes the gate: its caller is authenticated (when
/// `[[api_keys]]` are configured) and counted against the route's request limit, whatever the path.
pub enum Entry {
    /// Not a model call: proxy it like any route, once `key` is admitted by the route's limit.
    Pass { key: KeyHash },
    /// Answer with this error (authentication).
    Refused(ApiError),
    /// `GET /v1/models`: answer `200` with this JSON body.
    Models(Bytes),
    /// A model call: read the body (at most `max_body_bytes`, `413` beyond) through a
    /// [`sniff::Sniffer`], then route it by the fields found.
    ModelCall { key: KeyHash, max_body_bytes: u64 },
}

/// Classifies a request on inference route `route` and authenticates its caller. The path is
/// compared after [`endpoint_path`], so `/v1/chat/completions/` or `//v1/./responses` are the
/// model calls a model server would take them for.
pub fn entry(
    snapshot: &Snapshot,
    route: usize,
    method: &http::Method,
    path: &str,
    authorization: Option<&http::HeaderValue>,
) -> Entry {
    let key = match authenticate(snapshot, authorization) {
        Ok(key) => key,
        Err(error) => return Entry::Refused(error),
    };
    let path = endpoint_path(path);
    if path == "/v1/models" && method == http::Method::GET {
        return Entry::Models(openai::models_body(snapshot, route));
    }
    if method != http::Method::POST || !MODEL_ENDPOINTS.contains(&path.as_ref()) {
        return Entry::Pass { key };
    }
    Entry::ModelCall {
        key,
        max_body_bytes: max_body_bytes(snapshot, route),
    }
}

/// The body limit of a model call on `route`: the route's `inference.max_body_bytes`, which
/// replaces `edge.limits.max_body_bytes` for model calls (a route made for long prompts would
/// otherwise be capped by the limit meant for everything else).
pub fn max_body_bytes(snapshot: &Snapshot, route: usize) -> u64 {
    snapshot
        .config
        .routes
        .get(route)
        .and_then(|r| r.inference.as_ref())
        .map(|i| i.max_body_bytes)
        .unwrap_or(meridian_config::inference::DEFAULT_INFERENCE_BODY_BYTES)
}

/// The path as model servers route it: `%XX` of unreserved characters decoded, empty and `.`
/// segments dropped, `..` applied, no trailing slash. Only used to classify; the request goes
/// upstream with the path it came with.
pub fn endpoint_path(path: &str) -> Cow<'_, str> {
    let plain = path.len() > 1
        && !path.ends_with('/')
        && !path.contains("//")
        && !path.contains("/.")
        && !path.contains('%');
    if plain || path == "/" {
        return Cow::Borrowed(path);
    }
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(c) = hex.filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c)) {
                decoded.push(char::from(c));
                i += 3;
                continue;
            }
        }
        decoded.push(char::from(b));
        i += 1;
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if normal.is_empty() {
        normal.push('/');
    }
    Cow::Owned(normal)
}

/// The `413` of a model call whose body is over `max` bytes.
pub fn body_too_large(max: u64) -> ApiError {
    ApiError::new(
        413,
        "invalid_request_error",
        "request_too_large",
        format!("request body larger than {max} bytes (routes[].inference.max_body_bytes)"),
    )
}

/// The fields of a call's body, or the `400` to answer with.
pub fn call_error(error: &sniff::SniffError) -> ApiError {
    use sniff::SniffError;
    let code = match error {
        SniffError::Field { .. } | SniffError::Duplicate(_) => "invalid_value",
        _ => "invalid_json",
    };
    ApiError::new(400, "invalid_request_error", code, error.to_string())
}

/// The `model` a call names, or the `400` to answer with.
pub fn model_name(fields: &sniff::CallFields) -> Result<&str, ApiError> {
    fields.model.as_deref().ok_or_else(|| {
        ApiError::new(
            400,
            "invalid_request_error",
            "missing_model",
            "you must provide a model parameter".into(),
        )
    })
}

/// The model `name` resolves to, when some region `route` may use serves it; else the `404`.
pub fn model_served(
    snapshot: &Snapshot,
    route: &CompiledRoute,
    name: &str,
) -> Result<ModelId, ApiError> {
    snapshot
        .models
        .resolve(name)
        .filter(|&id| {
            snapshot.models.get(id).is_some_and(|m| {
                route
                    .eligible
                    .iter()
                    .any(|&r| m.served_by.get(usize::from(r)).copied().unwrap_or(false))
            })
        })
        .ok_or_else(|| {
            ApiError::new(
                404,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{name}` does not exist or is not served here"),
            )
        })
}

const MODEL_ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// The caller's key: with `[[api_keys]]` configured, a bearer token whose sha256 is listed
/// (else `401`); without, nobody is authenticated and every caller is anonymous (all zeros; the
/// gateway then limits per client address). A token that proves nothing must not buy a fresh
/// quota, or a client rotating random tokens would never be limited.
fn authenticate(
    snapshot: &Snapshot,
    authorization: Option<&http::HeaderValue>,
) -> Result<KeyHash, ApiError> {
    let token = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let keys = &snapshot.config.api_keys;
    if keys.is_empty() {
        return Ok([0; 32]);
    }
    let hash: KeyHash = match token {
        Some(token) => Sha256::digest(token.as_bytes()).into(),
        None => {
            return Err(ApiError::new(
                401,
                "invalid_request_error",
                "missing_api_key",
                "you didn't provide an API key (Authorization: Bearer ...)".into(),
            ))
        }
    };
    if keys.iter().any(|k| hex_eq(&k.sha256, &hash)) {
        Ok(hash)
    } else {
        Err(ApiError::new(
            401,
            "invalid_request_error",
            "invalid_api_key",
            "incorrect API key provided".into(),
        ))
    }
}

/// The `[[api_keys]]` name of an authenticated caller.
pub fn key_name<'a>(snapshot: &'a Snapshot, key: &KeyHash) -> Option<&'a str> {
    snapshot
        .config
        .api_keys
        .iter()
        .find(|k| hex_eq(&k.sha256, key))
        .map(|k| k.name.as_str())
}

/// How critical a call is: its key's setting, else its model's (the name sent, then the model it
/// resolves to), else standard.
pub fn criticality(
    snapshot: &Snapshot,
    key: &KeyHash,
    sent: &str,
    model: ModelId,
) -> meridian_config::inference::Criticality {
    let settings = &snapshot.config.inference;
    key_name(snapshot, key)
        .and_then(|name| settings.key_criticality.get(name))
        .or_else(|| settings.model_criticality.get(sent))
        .or_else(|| {
            snapshot
                .models
                .get(model)
                .and_then(|m| settings.model_criticality.get(&m.name))
        })
        .copied()
        .unwrap_or_default()
}

fn hex_eq(hex: &str, bytes: &[u8; 32]) -> bool {
    hex.len() == 64
        && bytes.iter().enumerate().all(|(i, b)| {
            u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16) == Ok(*b)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{SnapshotMeta, UpstreamStates};
    use meridian_config::Config;

    const LOCAL: &str = include_str!("../../../../examples/local.toml");

    fn snapshot(with_key: bool) -> Snapshot {
        let mut config = Config::from_toml_str(LOCAL).expect("config");
        if with_key {
            let hash: KeyHash = Sha256::digest(b"sk-good").into();
            let sha256: String = hash.iter().map(|b| format!("{b:02x}")).collect();
            config.api_keys.push(meridian_config::inference::ApiKey {
                name: "team".into(),
                sha256,
            });
        }
        Snapshot::compile(config, SnapshotMeta::default(), &UpstreamStates::default())
            .expect("compile")
    }

    fn classify(snap: &Snapshot, method: &str, path: &str, auth: Option<&'static str>) -> String {
        let route = snap
            .routes
            .iter()
            .position(|r| r.name == "inference")
            .expect("inference route");
        let method: http::Method = method.parse().expect("method");
        let auth = auth.map(http::HeaderValue::from_static);
        match entry(snap, route, &method, path, auth.as_ref()) {
            Entry::Pass { key } if key == [0; 32] => "pass".into(),
            Entry::Pass { .. } => "pass keyed".into(),
            Entry::Refused(e) => format!("{} {}", e.status, e.code),
            Entry::Models(_) => "models".into(),
            Entry::ModelCall { .. } => "call".into(),
        }
    }

    #[test]
    fn entry_classifies_and_authenticates() {
        let open = snapshot(false);
        let keyed = snapshot(true);
        let table: [(&Snapshot, &str, &str, Option<&'static str>, &str); 16] = [
            (&open, "GET", "/v1/models", None, "models"),
            (&open, "GET", "/v1/models/", None, "models"),
            (&open, "POST", "/v1/chat/completions", None, "call"),
            (&open, "POST", "/v1/chat/completions/", None, "call"),
            (&open, "POST", "//v1/./chat/%63ompletions", None, "call"),
            (&open, "POST", "/v1/x/../responses", None, "call"),
            (
                &open,
                "POST",
                "/v1/embeddings",
                Some("Bearer anything"),
                "call",
            ),
            (&open, "GET", "/v1/chat/completions", None, "pass"),
            (&open, "GET", "/healthz", Some("Bearer random"), "pass"),
            (
                &keyed,
                "POST",
                "/v1/chat/completions",
                None,
                "401 missing_api_key",
            ),
            (&keyed, "POST", "/v1/responses", None, "401 missing_api_key"),
            (
                &keyed,
                "POST",
                "/v1/chat/completions/",
                Some("Bearer sk-bad"),
                "401 invalid_api_key",
            ),
            (&keyed, "GET", "/anything/else", None, "401 missing_api_key"),
            (
                &keyed,
                "GET",
                "/v1/models",
                Some("Bearer sk-bad"),
                "401 invalid_api_key",
            ),
            (
                &keyed,
                "POST",
                "/v1/completions",
                Some("Bearer sk-good"),
                "call",
            ),
            (
                &keyed,
                "GET",
                "/healthz",
                Some("Bearer sk-good"),
                "pass keyed",
            ),
        ];
        for (snap, method, path, auth, expect) in table {
            assert_eq!(
                classify(snap, method, path, auth),
                expect,
                "{method} {path} {auth:?}"
            );
        }
    }

    #[test]
    fn endpoint_paths_are_normalised_for_classification_only() {
        for (raw, normal) in [
            ("/v1/models", "/v1/models"),
            ("/", "/"),
            ("", "/"),
            ("/v1//chat/completions/", "/v1/chat/completions"),
            ("/v1/%2e%2e/v1/responses", "/v1/responses"),
            ("/../../v1/embeddings", "/v1/embeddings"),
            ("/v1/chat%2Fcompletions", "/v1/chat%2Fcompletions"),
            ("/v1/%7euser/%", "/v1/~user/%"),
        ] {
            assert_eq!(endpoint_path(raw), normal, "{raw}");
        }
    }

    #[test]
    fn model_names_and_where_they_are_served() {
        let snap = snapshot(false);
        let fields = |body: &[u8]| sniff::sniff(body, 16);
        let named = fields(br#"{"model":"qwen-max"}"#).expect("valid");
        assert_eq!(model_name(&named).ok(), Some("qwen-max"));
        let unnamed = fields(br#"{"messages":[]}"#).expect("valid");
        assert_eq!(
            model_name(&unnamed).err().map(|e| e.code),
            Some("missing_model")
        );
        let broken = fields(b"{not json").expect_err("invalid");
        assert_eq!(call_error(&broken).code, "invalid_json");
        let wrong = fields(br#"{"model":1}"#).expect_err("invalid");
        assert_eq!(call_error(&wrong).code, "invalid_value");
        let route = snap
            .routes
            .iter()
            .find(|r| r.name == "inference")
            .expect("route");
        assert!(model_served(&snap, route, "qwen-max").is_ok());
        assert_eq!(
            model_served(&snap, route, "gpt-9").err().map(|e| e.status),
            Some(404)
        );
    }
}
