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
        "/metrics" => httpd::respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            store.metrics().render(),
        ),
        "/healthz" => httpd::text(StatusCode::OK, "ok\n"),
        "/admin/snapshot" => httpd::json(StatusCode::OK, &snapshot_json(&store)),
        _ => httpd::json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        ),
    }
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
