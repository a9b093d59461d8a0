//! Active health checks: every upstream of every region with `health.enabled` is probed with an
//! HTTP GET off the request path; verdicts flip with hysteresis (`healthy_after`/`unhealthy_after`)
//! into the upstream's shared state, which survives reloads. Probe loops restart on each reload.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use meridian_config::HealthCheck;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::core::state::UpstreamState;
use crate::reload::SnapshotStore;

/// Runs until `stop`, following config reloads.
pub async fn run(store: Arc<SnapshotStore>, mut stop: watch::Receiver<bool>) {
    let mut generation = store.subscribe();
    loop {
        let loaded = store.load();
        let mut probes = JoinSet::new();
        for region in &loaded.snapshot.regions {
            if !region.health.enabled {
                continue;
            }
            for upstream in &region.upstreams {
                probes.spawn(probe_loop(
                    region.name.clone(),
                    upstream.address,
                    Arc::clone(&upstream.state),
                    region.health.clone(),
                ));
            }
        }
        drop(loaded);
        tokio::select! {
            changed = generation.changed() => {
                probes.abort_all();
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.wait_for(|s| *s) => {
                probes.abort_all();
                return;
            }
        }
    }
}

async fn probe_loop(
    region: String,
    address: SocketAddr,
    state: Arc<UpstreamState>,
    spec: HealthCheck,
) {
    let interval = spec.interval.as_duration();
    let mut rng = Jitter::seeded(&address);
    // Spread the first probes over one interval so a fleet does not probe in lockstep.
    tokio::time::sleep(interval.mul_f64(rng.unit())).await;
    loop {
        let outcome = probe(address, &spec).await;
        let passed = outcome.is_ok();
        if let Ok(mut report) = state.report.lock() {
            report.last_check_unix_ms = crate::clock::unix_ms();
            report.last_error = outcome.as_ref().err().cloned();
        }
        if let Some(now_healthy) =
            state.record_probe(passed, spec.healthy_after, spec.unhealthy_after)
        {
            if now_healthy {
                tracing::info!(%region, upstream = %address, "upstream healthy again");
            } else {
                tracing::warn!(%region, upstream = %address, error = ?outcome.err(), "upstream failed health checks");
            }
        }
        // ±10% per tick keeps probes spread out.
        tokio::time::sleep(interval.mul_f64(0.9 + 0.2 * rng.unit())).await;
    }
}

/// One probe: connect, `GET path`, expect the status. `Err` carries a short reason for operators.
pub async fn probe(address: SocketAddr, spec: &HealthCheck) -> Result<(), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let request = http::Request::get(spec.path.as_str())
            .header(http::header::HOST, address.to_string())
            .header(http::header::USER_AGENT, "meridian-health/1")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        // Drain (bounded by the timeout) so the origin sees a complete exchange.
        let _ = response.into_body().collect().await;
        if status == spec.expect_status {
            Ok(())
        } else {
            Err(format!("status {status}, expected {}", spec.expect_status))
        }
    };
    match tokio::time::timeout(spec.timeout.as_duration(), attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}", spec.timeout)),
    }
}

/// A tiny xorshift generator: jitter needs spread, not cryptographic quality.
struct Jitter(u64);

impl Jitter {
    fn seeded(address: &SocketAddr) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        address.hash(&mut hasher);
        crate::clock::unix_ms().hash(&mut hasher);
        Self(hasher.finish() | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}
