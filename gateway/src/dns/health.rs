//! Active health probes of every PoP's health URL. State is kept by PoP name, so it survives zone
//! reloads; a PoP leaves answers after `unhealthy_after` failed probes in a row and comes back
//! after `healthy_after` good ones (hysteresis: a flapping PoP does not flap DNS answers).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

/// Health of every PoP by name. New PoPs start healthy (GeoDNS answers before the first probe).
#[derive(Default)]
pub struct PopHealth {
    states: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Consecutive (passes, failures) of each PoP's probes.
    streaks: Mutex<HashMap<String, (u32, u32)>>,
}

impl PopHealth {
    /// The shared flag of `pop` (created healthy).
    pub fn state(&self, pop: &str) -> Arc<AtomicBool> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            states
                .entry(pop.to_string())
                .or_insert_with(|| Arc::new(AtomicBool::new(true))),
        )
    }

    /// Records one probe of `pop`; flips its flag only after `healthy_after` passes or
    /// `unhealthy_after` failures in a row. Returns the new verdict when it changed.
    pub fn record_probe(
        &self,
        pop: &str,
        passed: bool,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> Option<bool> {
        let flag = self.state(pop);
        let mut streaks = self.streaks.lock().unwrap_or_else(|e| e.into_inner());
        let (passes, failures) = streaks.entry(pop.to_string()).or_insert((0, 0));
        let healthy = flag.load(Ordering::Relaxed);
        if passed {
            *failures = 0;
            *passes = passes.saturating_add(1);
            if !healthy && *passes >= healthy_after {
                flag.store(true, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            *passes = 0;
            *failures = failures.saturating_add(1);
            if healthy && *failures >= unhealthy_after {
                flag.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// Forgets PoPs that are no longer configured; returns their names.
    pub fn retain(&self, pops: &[&str]) -> Vec<String> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = states
            .keys()
            .filter(|k| !pops.contains(&k.as_str()))
            .cloned()
            .collect();
        let mut streaks = self.streaks.lock().unwrap_or_else(|e| e.into_inner());
        for name in &gone {
            states.remove(name);
            streaks.remove(name);
        }
        gone
    }

    pub fn is_healthy(flag: &AtomicBool) -> bool {
        flag.load(Ordering::Relaxed)
    }
}

/// A parsed `http://ip:port/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthUrl {
    pub addr: SocketAddr,
    pub path: String,
}

impl HealthUrl {
    pub fn parse(url: &str) -> Option<Self> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        Some(Self {
            addr: authority.parse().ok()?,
            path: path.to_string(),
        })
    }
}

/// One probe: `GET path` over HTTP/1.1; healthy on a 2xx within `timeout`.
pub async fn probe(url: &HealthUrl, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, probe_once(url))
        .await
        .unwrap_or(false)
}

async fn probe_once(url: &HealthUrl) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect(url.addr).await else {
        return false;
    };
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let Ok(request) = hyper::Request::get(url.path.as_str())
        .header(hyper::header::HOST, url.addr.to_string())
        .header(hyper::header::USER_AGENT, "meridian-geodns-health")
        .body(Empty::new())
    else {
        return false;
    };
    match sender.send_request(request).await {
        Ok(response) => response.status().is_success(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_health_urls() {
        let url = HealthUrl::parse("http://127.1.6.1:7001/healthz").expect("valid");
        assert_eq!(url.addr, "127.1.6.1:7001".parse().expect("addr"));
        assert_eq!(url.path, "/healthz");
        assert_eq!(
            HealthUrl::parse("http://[::1]:80").map(|u| u.path),
            Some("/".into())
        );
        assert_eq!(HealthUrl::parse("https://127.0.0.1:1/"), None);
        assert_eq!(HealthUrl::parse("http://localhost:80/"), None);
    }

    #[test]
    fn state_survives_and_forgets() {
        let health = PopHealth::default();
        let seoul = health.state("seoul");
        assert!(PopHealth::is_healthy(&seoul));
        seoul.store(false, Ordering::Relaxed);
        assert!(!PopHealth::is_healthy(&health.state("seoul")));
        assert_eq!(health.retain(&["tokyo"]), vec!["seoul".to_string()]);
        assert!(PopHealth::is_healthy(&health.state("seoul")));
    }

    #[test]
    fn probes_flip_the_flag_only_after_a_streak() {
        let health = PopHealth::default();
        let flag = health.state("seoul");
        // Two failures to go down (a pass in between starts over) ...
        assert_eq!(health.record_probe("seoul", false, 3, 2), None);
        assert_eq!(health.record_probe("seoul", true, 3, 2), None);
        assert_eq!(health.record_probe("seoul", false, 3, 2), None);
        assert!(PopHealth::is_healthy(&flag));
        assert_eq!(health.record_probe("seoul", false, 3, 2), Some(false));
        assert!(!PopHealth::is_healthy(&flag));
        // ... three passes to come back.
        assert_eq!(health.record_probe("seoul", true, 3, 2), None);
        assert_eq!(health.record_probe("seoul", true, 3, 2), None);
        assert_eq!(health.record_probe("seoul", false, 3, 2), None);
        for _ in 0..2 {
            assert_eq!(health.record_probe("seoul", true, 3, 2), None);
        }
        assert_eq!(health.record_probe("seoul", true, 3, 2), Some(true));
        assert!(PopHealth::is_healthy(&flag));
        // With 1/1, every probe decides (the old behaviour).
        assert_eq!(health.record_probe("tokyo", false, 1, 1), Some(false));
        assert_eq!(health.record_probe("tokyo", true, 1, 1), Some(true));
    }
}
