//! The admin listener (loopback only): `/metrics`, `/healthz`, `/admin/snapshot`.

use std::sync::Arc;

use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::httpd;
use crate::reload::SnapshotStore;

pub async fn serve(listener: TcpListener, store: Arc<SnapshotStore>, stop: watch::Receiver<bool>) {
    httpd::serve(listener, move |req| handle(Arc::clone(&store), req), stop).await;
}

async fn handle(
    store: Arc<SnapshotStore>,
    req: Request<hyper::body::Incoming>,
) -> hyper::Response<httpd::Body> {
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
