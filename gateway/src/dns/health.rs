//! Active health probes of every PoP's health URL. State is kept by PoP name, so it survives zone
//! reloads; a PoP is down after one failed probe and up again after one good one.

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

    /// Forgets PoPs that are no longer configured; returns their names.
    pub fn retain(&self, pops: &[&str]) -> Vec<String> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = states
            .keys()
            .filter(|k| !pops.contains(&k.as_str()))
            .cloned()
            .collect();
        for name in &gone {
            states.remove(name);
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
}
