//! Responses the edge writes itself (refusals, limits, upstream failures): JSON bodies, edge headers.

use bytes::Bytes;
use meridian_config::Limits;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora_http::{RequestHeader, ResponseHeader};

use super::forward::{HEADER_POP, HEADER_REGION};
use crate::core::{Refusal, Snapshot};

pub struct LimitRefusal {
    pub status: u16,
    pub message: &'static str,
}

/// Header count/size and declared body size, checked before any routing work.
pub fn check_limits(req: &RequestHeader, limits: &Limits) -> Option<LimitRefusal> {
    check_header_limits(&req.headers, limits)
}

/// [`check_limits`] on a plain header map: every front (h1, h2, h3) applies the same limits.
pub fn check_header_limits(headers: &http::HeaderMap, limits: &Limits) -> Option<LimitRefusal> {
    if headers.len() > limits.max_headers {
        return Some(LimitRefusal {
            status: 431,
            message: "too many request headers (edge.limits.max_headers)",
        });
    }
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if bytes > limits.max_header_bytes {
        return Some(LimitRefusal {
            status: 431,
            message: "request headers too large (edge.limits.max_header_bytes)",
        });
    }
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_body_bytes) {
        return Some(LimitRefusal {
            status: 413,
            message: "request body too large (edge.limits.max_body_bytes)",
        });
    }
    None
}

pub fn refusal_message(snapshot: &Snapshot, refusal: &Refusal) -> String {
    match refusal {
        Refusal::UnknownHost => "no route claims this host".to_string(),
        Refusal::NoRoute => "no route matches this path".to_string(),
        Refusal::Unavailable { route, reason } => format!(
            "no region can serve route {:?} right now ({}); retry shortly",
            snapshot.routes[*route].name,
            match reason {
                crate::core::select::RegionVerdict::Full => "all at capacity",
                crate::core::select::RegionVerdict::Drained => "all draining",
                _ => "all unhealthy",
            }
        ),
        Refusal::Residency { route, country } => format!(
            "data residency: no region allowed for clients in {country} can serve route {:?}",
            snapshot.routes[*route].name
        ),
    }
}

pub fn error_message(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        413 => "request body too large (edge.limits.max_body_bytes)",
        502 => "no upstream could be reached",
        503 => "no region can serve this request right now",
        504 => "upstream timed out",
        _ => "request failed",
    }
}

/// Writes a complete JSON error response: `{"error": message, "status": code, "pop": ...}`.
pub async fn send(
    session: &mut Session,
    snapshot: &Snapshot,
    region: Option<usize>,
    status: u16,
    message: &str,
) -> Result<()> {
    send_with(session, snapshot, region, status, message, false).await
}

/// [`send`], with `Retry-After: 1` when the refusal is temporary (every region down or full).
pub async fn send_with(
    session: &mut Session,
    snapshot: &Snapshot,
    region: Option<usize>,
    status: u16,
    message: &str,
    retry_after: bool,
) -> Result<()> {
    let body = error_body(snapshot, status, message);
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(HEADER_POP, snapshot.pop_header.clone())?;
    if retry_after {
        resp.insert_header(http::header::RETRY_AFTER, "1")?;
    }
    if let Some(region) = region.and_then(|r| snapshot.regions.get(r)) {
        resp.insert_header(HEADER_REGION, region.header.clone())?;
    }
    if status == 503 || status == 413 || status == 431 || status == 421 {
        // Do not keep reading a request we refused.
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// The JSON body of every response the edge writes itself, whatever the front.
pub fn error_body(snapshot: &Snapshot, status: u16, message: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({"error": message, "status": status, "pop": snapshot.pop}).to_string()
            + "\n",
    )
}
