//! The `Host` check of the loopback listeners (admin, config service, demo control API): a web
//! page the operator visits can make the browser resolve its own name to 127.0.0.1 (DNS
//! rebinding) and then talk to these listeners as a same-origin site. Its requests still carry
//! the attacker's name in `Host`, so only loopback names, loopback addresses and names the
//! operator configured are served.

use std::net::IpAddr;

use http::HeaderValue;

/// Whether a request with this `Host` header may be served. A request without one (HTTP/1.0
/// tools) is allowed: browsers always send it.
pub fn allowed(host: Option<&HeaderValue>, configured: &[String]) -> bool {
    let Some(host) = host else { return true };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = strip_port(host.trim());
    if name.eq_ignore_ascii_case("localhost") || name.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    if let Ok(ip) = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        if ip.is_loopback() {
            return true;
        }
    }
    configured.iter().any(|c| {
        let c = c.trim();
        c.eq_ignore_ascii_case(name) || c.eq_ignore_ascii_case(host.trim())
    })
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split_once(']').map_or(host, |(inside, _)| inside);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(host: &str, configured: &[&str]) -> bool {
        let configured: Vec<String> = configured.iter().map(|s| s.to_string()).collect();
        allowed(
            Some(&HeaderValue::from_str(host).expect("header")),
            &configured,
        )
    }

    #[test]
    fn loopback_and_configured_names_only() {
        for host in [
            "localhost",
            "localhost:9901",
            "LOCALHOST",
            "app.localhost:1",
            "127.0.0.1",
            "127.0.0.1:7070",
            "127.9.9.9:80",
            "[::1]:7070",
            "[::1]",
            "::1",
        ] {
            assert!(check(host, &[]), "{host}");
        }
        for host in [
            "evil.test",
            "evil.test:9901",
            "10.0.0.1:7070",
            "localhost.evil.test",
            "127.0.0.1.evil.test",
            "[2001:db8::1]:1",
        ] {
            assert!(!check(host, &[]), "{host}");
        }
        assert!(check("config.internal:7070", &["config.internal"]));
        assert!(check("Config.Internal", &["config.internal"]));
        assert!(allowed(None, &[]));
    }
}
