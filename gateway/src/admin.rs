//! The admin listener (loopback only): `/` (status page), `/admin/status.json`, `/metrics`,
//! `/healthz`, `/admin/snapshot`, and `POST /admin/cache/purge` (bearer token from
//! `[edge.admin] token_file`).

use std::sync::Arc;

use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::httpd;
use crate::reload::SnapshotStore;

/// What the cache purge endpoint needs: the edge's cache and the admin token (read at start).
#[derive(Clone)]
pub struct Purging {
    pub cache: crate::cache::ResponseCache,
    /// `None`: no `[edge.admin] token_file` (or unreadable/empty), purge answers 403.
    pub token: Option<String>,
}

/// Reads `[edge.admin] token_file` (trimmed). A missing or empty file disables the write endpoints.
pub fn read_token(path: Option<&str>) -> Option<String> {
    let path = path?;
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => Some(token.trim().to_string()),
        Ok(_) => {
            tracing::warn!("edge.admin.token_file {path} is empty: cache purge is disabled");
            None
        }
        Err(e) => {
            tracing::warn!("edge.admin.token_file {path}: {e}; cache purge is disabled");
            None
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    store: Arc<SnapshotStore>,
    purging: Purging,
    stop: watch::Receiver<bool>,
) {
    let purging = Arc::new(purging);
    httpd::serve(
        listener,
        move |req| handle(Arc::clone(&store), Arc::clone(&purging), req),
        stop,
    )
    .await;
}

async fn handle(
    store: Arc<SnapshotStore>,
    purging: Arc<Purging>,
    req: Request<hyper::body::Incoming>,
) -> hyper::Response<httpd::Body> {
    // The admin listener is loopback only: a Host that is not a loopback name is a browser
    // talking to it on another site's behalf (DNS rebinding).
    if !meridian_config_service::host::allowed(req.headers().get(http::header::HOST), &[]) {
        return httpd::json(
            StatusCode::MISDIRECTED_REQUEST,
            &serde_json::json!({"error": "this Host is not served here"}),
        );
    }
    if req.uri().path() == "/admin/cache/purge" {
        return purge(&purging, req).await;
    }
    if req.method() != Method::GET {
        return httpd::json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "the admin listener only answers GET here"}),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            // Health and in-flight gauges are sampled now, so requests never touch them.
            let loaded = store.load();
            store
                .metrics()
                .health
                .refresh(&loaded.snapshot, crate::clock::now_ms());
            httpd::respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                store.metrics().render(),
            )
        }
        "/admin/regions" => httpd::json(StatusCode::OK, &regions_json(&store)),
        // The operator status page and the document it polls.
        "/" => httpd::respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::status_page::status_html(&store).into_bytes(),
        ),
        "/admin/status.json" => {
            httpd::json(StatusCode::OK, &crate::status_page::status_json(&store))
        }
        "/healthz" => httpd::text(StatusCode::OK, "ok\n"),
        "/admin/snapshot" => httpd::json(StatusCode::OK, &snapshot_json(&store)),
        _ => httpd::json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        ),
    }
}

/// Every region and upstream with its live state: what an operator checks during an incident.
fn regions_json(store: &SnapshotStore) -> serde_json::Value {
    let loaded = store.load();
    let now = crate::clock::now_ms();
    let regions: Vec<_> = loaded
        .snapshot
        .regions
        .iter()
        .map(|region| {
            let verdict = crate::core::select::region_verdict(region, now);
            let upstreams: Vec<_> = region
                .upstreams
                .iter()
                .map(|u| {
                    let report = u.state.report.lock().map(|r| r.clone()).unwrap_or_default();
                    let state = if u.drain || u.weight == 0 {
                        "drained"
                    } else if u.state.is_ejected(now) {
                        "ejected"
                    } else if !u.state.is_healthy() {
                        "unhealthy"
                    } else {
                        "healthy"
                    };
                    serde_json::json!({
                        "address": u.address.to_string(),
                        "state": state,
                        "weight": u.weight,
                        "inflight": u.state.inflight(),
                        "ejections": u.state.ejections(),
                        "last_check_unix_ms": report.last_check_unix_ms,
                        "last_error": report.last_error,
                    })
                })
                .collect();
            serde_json::json!({
                "name": region.name,
                "state": verdict.reason(),
                "inflight": region.state.inflight(),
                "max_inflight": region.max_inflight,
                "min_healthy": region.min_healthy,
                "drain": region.drain,
                "health_checks": region.health.enabled,
                "upstreams": upstreams,
            })
        })
        .collect();
    serde_json::json!({ "regions": regions })
}

fn snapshot_json(store: &SnapshotStore) -> serde_json::Value {
    let loaded = store.load();
    let snap = &loaded.snapshot;
    let routes: Vec<_> = snap
        .routes
        .iter()
        .zip(&snap.config.routes)
        .map(|(compiled, source)| {
            serde_json::json!({
                "name": compiled.name,
                "hosts": source.hosts,
                "path_prefix": compiled.path_prefix,
                "kind": source.kind,
                "regions": compiled.eligible.iter().map(|&i| &snap.regions[usize::from(i)].name).collect::<Vec<_>>(),
                "default_region": snap.regions[usize::from(compiled.default_region)].name,
                "retry_attempts": compiled.retry_attempts,
            })
        })
        .collect();
    let regions: Vec<_> = snap
        .regions
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "location": {"lat": r.location.0, "lon": r.location.1},
                "upstreams": r.upstreams.iter().map(|u| serde_json::json!({
                    "address": u.address.to_string(),
                    "weight": u.weight,
                    "inflight": u.state.inflight(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "pop": snap.pop,
        "version": snap.meta.version,
        "config_hash": snap.meta.hash,
        "routes": routes,
        "regions": regions,
    })
}

/// Largest purge request body accepted.
const MAX_PURGE_BODY: usize = 4096;

/// `POST /admin/cache/purge` with `{"url"|"prefix"|"tag": ...}`: `200 {"purged": n}`.
async fn purge(
    purging: &Purging,
    req: Request<hyper::body::Incoming>,
) -> hyper::Response<httpd::Body> {
    use http_body_util::BodyExt;
    let error =
        |status, message: &str| httpd::json(status, &serde_json::json!({ "error": message }));
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    let Some(token) = purging.token.as_deref() else {
        return error(
            StatusCode::FORBIDDEN,
            "set [edge.admin] token_file to enable",
        );
    };
    if !crate::cache::bearer_matches(req.headers().get(http::header::AUTHORIZATION), token) {
        let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_PURGE_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "body unreadable or over 4 KiB"),
    };
    let request = match crate::cache::Purge::from_json(&body) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let purged = purging.cache.purge(&request).await;
    tracing::info!(?request, purged, "cache purge");
    httpd::json(StatusCode::OK, &serde_json::json!({ "purged": purged }))
}
