//! OpenAI-style answers written by the edge itself: `{"error":{"message","type","code"}}` errors and
//! the `GET /v1/models` list.

use bytes::Bytes;

use crate::snapshot::Snapshot;

/// One error the edge answers with.
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI error `type`: `invalid_request_error`, `authentication_error`, `requests`, `tokens`, ...
    pub kind: &'static str,
    pub code: &'static str,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            kind,
            code,
            retry_after: None,
        }
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(
            serde_json::json!({"error": {
                "message": self.message,
                "type": self.kind,
                "code": self.code,
            }})
            .to_string()
                + "\n",
        )
    }
}

/// `GET /v1/models`: every model some eligible region of `route` serves, with those regions.
pub fn models_body(snapshot: &Snapshot, route: usize) -> Bytes {
    let eligible = snapshot
        .routes
        .get(route)
        .map(|r| r.eligible.as_slice())
        .unwrap_or(&[]);
    let aliases = &snapshot.config.inference.aliases;
    let data: Vec<serde_json::Value> = snapshot
        .models
        .models
        .iter()
        .filter_map(|model| {
            let regions: Vec<&str> = eligible
                .iter()
                .map(|&r| usize::from(r))
                .filter(|&r| model.served_by.get(r).copied().unwrap_or(false))
                .map(|r| snapshot.regions[r].name.as_str())
                .collect();
            if regions.is_empty() {
                return None;
            }
            let model_aliases: Vec<&str> = aliases
                .iter()
                .filter(|(_, target)| **target == model.name)
                .map(|(alias, _)| alias.as_str())
                .collect();
            Some(serde_json::json!({
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": "meridian",
                "regions": regions,
                "aliases": model_aliases,
            }))
        })
        .collect();
    Bytes::from(serde_json::json!({"object": "list", "data": data}).to_string() + "\n")
}
