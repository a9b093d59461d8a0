//! Simulated regional origins for the demo and the tests: each answers JSON describing the request it
//! saw, and can be told to go down (refuse connections), come back up, or answer slowly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::httpd;

/// Shared switches and counters for one origin.
pub struct OriginControl {
    pub region: String,
    pub address: SocketAddr,
    up: watch::Sender<bool>,
    delay_ms: AtomicU64,
    requests: AtomicU64,
    /// Answer every (non-health) request with this status instead of 200 (0: normal).
    forced_status: AtomicU64,
    /// `/healthz` alternates pass/fail on each probe (a flapping origin).
    flap_health: std::sync::atomic::AtomicBool,
    health_probes: AtomicU64,
}

impl OriginControl {
    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
    /// Requests this origin has answered (health checks excluded).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Answer requests with `status` (e.g. 503) while staying up and healthy; `None` restores 200.
    pub fn set_status(&self, status: Option<u16>) {
        self.forced_status
            .store(status.map_or(0, u64::from), Ordering::Relaxed);
    }
    pub fn set_flapping_health(&self, flap: bool) {
        self.flap_health.store(flap, Ordering::Relaxed);
    }
    /// Health probes answered so far.
    pub fn health_probes(&self) -> u64 {
        self.health_probes.load(Ordering::Relaxed)
    }
}

/// Binds `address` now (so the caller knows it is listening) and serves until `stop`.
pub async fn spawn(
    region: &str,
    address: SocketAddr,
    stop: watch::Receiver<bool>,
) -> std::io::Result<Arc<OriginControl>> {
    let listener = bind(address)?;
    let address = listener.local_addr()?;
    let control = Arc::new(OriginControl {
        region: region.to_string(),
        address,
        up: watch::channel(true).0,
        delay_ms: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        forced_status: AtomicU64::new(0),
        flap_health: std::sync::atomic::AtomicBool::new(false),
        health_probes: AtomicU64::new(0),
    });
    tokio::spawn(run(Arc::clone(&control), listener, stop));
    Ok(control)
}

fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

/// While up: serve. When switched down: close the listener (new connections are refused) and every
/// open connection, then wait to come back up on the same address.
async fn run(control: Arc<OriginControl>, first: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut listener = Some(first);
    let mut up = control.up.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        let current = match listener.take() {
            Some(l) => l,
            None => match bind(control.address) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("origin {} cannot rebind: {e}", control.address);
                    return;
                }
            },
        };
        // One stop signal for this "up" period: fires when going down or stopping for good.
        let (period_tx, period_rx) = watch::channel(false);
        let handler_control = Arc::clone(&control);
        let server = httpd::serve(
            current,
            move |req| handle(Arc::clone(&handler_control), req),
            period_rx,
        );
        tokio::pin!(server);
        tokio::select! {
            _ = server.as_mut() => return,
            _ = up.wait_for(|u| !*u) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        period_tx.send_replace(true);
        server.await;
        tokio::select! {
            _ = up.wait_for(|u| *u) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn handle(
    control: Arc<OriginControl>,
    req: Request<hyper::body::Incoming>,
) -> hyper::Response<httpd::Body> {
    if req.uri().path() == "/healthz" {
        let n = control.health_probes.fetch_add(1, Ordering::Relaxed);
        if control.flap_health.load(Ordering::Relaxed) && n % 2 == 1 {
            return httpd::text(StatusCode::INTERNAL_SERVER_ERROR, "flap\n");
        }
        return httpd::text(StatusCode::OK, "ok\n");
    }
    control.requests.fetch_add(1, Ordering::Relaxed);
    let delay = control.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let (host, xff, proto, request_id) = (
        header("host"),
        header("x-forwarded-for"),
        header("x-forwarded-proto"),
        header("x-request-id"),
    );
    let body_bytes = match req.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => return httpd::text(StatusCode::BAD_REQUEST, "bad body\n"),
    };
    let status = match control.forced_status.load(Ordering::Relaxed) {
        0 => StatusCode::OK,
        code => StatusCode::from_u16(code as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    httpd::json(
        status,
        &serde_json::json!({
            "region": control.region,
            "upstream": control.address.to_string(),
            "method": method,
            "path": path,
            "host": host,
            "x_forwarded_for": xff,
            "x_forwarded_proto": proto,
            "x_request_id": request_id,
            "body_bytes": body_bytes,
        }),
    )
}
