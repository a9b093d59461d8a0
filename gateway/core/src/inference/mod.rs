//! Inference decisions: what an inference route does with a request (the OpenAI-compatible
//! surface), who the caller is, which model a call names and whether this edge serves it. Pure
//! functions over the snapshot; the gateway reads bodies, applies rate limits and counts.

pub mod openai;
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
pub enum Entry {
    /// Not an OpenAI endpoint: proxy it like any route.
    Pass,
    /// Answer with this error (authentication).
    Refused(ApiError),
    /// `GET /v1/models`: answer `200` with this JSON body.
    Models(Bytes),
    /// A model call: read the body (at most `max_body_bytes`, `413` beyond), then
    /// [`InferenceState::route_call`].
    ModelCall { key: KeyHash, max_body_bytes: u64 },
}

/// Classifies a request on inference route `route` and authenticates its caller.
pub fn entry(
    snapshot: &Snapshot,
    route: usize,
    method: &http::Method,
    path: &str,
    authorization: Option<&http::HeaderValue>,
) -> Entry {
    let is_models = path == "/v1/models" && method == http::Method::GET;
    let is_model_call = method == http::Method::POST && MODEL_ENDPOINTS.contains(&path);
    if !is_models && !is_model_call {
        return Entry::Pass;
    }
    let key = match authenticate(snapshot, authorization) {
        Ok(key) => key,
        Err(error) => return Entry::Refused(error),
    };
    if is_models {
        return Entry::Models(openai::models_body(snapshot, route));
    }
    let max_body_bytes = snapshot
        .config
        .routes
        .get(route)
        .and_then(|r| r.inference.as_ref())
        .map(|i| i.max_body_bytes)
        .unwrap_or_else(|| meridian_config::inference::RouteInference::default().max_body_bytes);
    Entry::ModelCall {
        key,
        max_body_bytes,
    }
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

/// The `model` a call names, or the `400` to answer with.
pub fn model_name(body: &[u8]) -> Result<Cow<'_, str>, ApiError> {
    match serde_json::from_slice::<Probe<'_>>(body) {
        Ok(Probe { model: Some(name) }) => Ok(name),
        Ok(Probe { model: None }) => Err(ApiError::new(
            400,
            "invalid_request_error",
            "missing_model",
            "you must provide a model parameter".into(),
        )),
        Err(e) => Err(ApiError::new(
            400,
            "invalid_request_error",
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
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

#[derive(serde::Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
}

const MODEL_ENDPOINTS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// The caller's key: with `[[api_keys]]` configured, a bearer token whose sha256 is listed
/// (else `401`); without, any token (or none) — limits then apply per distinct token.
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
    let hash: KeyHash = match token {
        Some(token) => Sha256::digest(token.as_bytes()).into(),
        None if keys.is_empty() => [0; 32],
        None => {
            return Err(ApiError::new(
                401,
                "invalid_request_error",
                "missing_api_key",
                "you didn't provide an API key (Authorization: Bearer ...)".into(),
            ))
        }
    };
    if keys.is_empty() || keys.iter().any(|k| hex_eq(&k.sha256, &hash)) {
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
            Entry::Pass => "pass".into(),
            Entry::Refused(e) => format!("{} {}", e.status, e.code),
            Entry::Models(_) => "models".into(),
            Entry::ModelCall { .. } => "call".into(),
        }
    }

    #[test]
    fn entry_classifies_and_authenticates() {
        let open = snapshot(false);
        let keyed = snapshot(true);
        let table: [(&Snapshot, &str, &str, Option<&'static str>, &str); 8] = [
            (&open, "GET", "/v1/models", None, "models"),
            (&open, "POST", "/v1/chat/completions", None, "call"),
            (
                &open,
                "POST",
                "/v1/embeddings",
                Some("Bearer anything"),
                "call",
            ),
            (&open, "GET", "/v1/chat/completions", None, "pass"),
            (&open, "GET", "/healthz", None, "pass"),
            (
                &keyed,
                "POST",
                "/v1/chat/completions",
                None,
                "401 missing_api_key",
            ),
            (
                &keyed,
                "POST",
                "/v1/chat/completions",
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
    fn model_names_and_where_they_are_served() {
        let snap = snapshot(false);
        assert_eq!(
            model_name(br#"{"model":"qwen-max"}"#).ok().as_deref(),
            Some("qwen-max")
        );
        assert_eq!(
            model_name(br#"{"messages":[]}"#).err().map(|e| e.code),
            Some("missing_model")
        );
        assert_eq!(
            model_name(b"{not json").err().map(|e| e.code),
            Some("invalid_json")
        );
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
