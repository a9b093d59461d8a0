//! Host and path matching: exact hosts before `*.` wildcards (longest suffix first), then the longest
//! path prefix that ends on a segment boundary.

use std::collections::HashMap;

use meridian_config::Route;

/// (route index, path prefix) pairs for one host, longest prefix first.
type Claims = Vec<(usize, String)>;

/// Routes per host, each list sorted by path prefix length, longest first.
#[derive(Default)]
pub struct HostTable {
    exact: HashMap<String, Claims>,
    /// (suffix including the leading dot, routes), longest suffix first.
    wildcard: Vec<(String, Claims)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchError {
    /// No route claims this host: refuse without contacting any upstream.
    UnknownHost,
    /// The host is ours but no route's path prefix matches.
    NoPath,
}

impl HostTable {
    pub fn build(routes: &[Route]) -> Self {
        let mut exact: HashMap<String, Claims> = HashMap::new();
        let mut wildcard: HashMap<String, Claims> = HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            for host in &route.hosts {
                let host = host.to_ascii_lowercase();
                let claim = (i, route.path_prefix.clone());
                match host.strip_prefix('*') {
                    Some(suffix) => wildcard.entry(suffix.to_string()).or_default().push(claim),
                    None => exact.entry(host).or_default().push(claim),
                }
            }
        }
        let by_prefix_len =
            |list: &mut Claims| list.sort_by_key(|(_, p)| std::cmp::Reverse(p.len()));
        exact.values_mut().for_each(by_prefix_len);
        let mut wildcard: Vec<(String, Claims)> = wildcard.into_iter().collect();
        wildcard
            .iter_mut()
            .for_each(|(_, list)| by_prefix_len(list));
        wildcard.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Self { exact, wildcard }
    }

    /// `host` as the client sent it (any case, optional port, optional trailing dot).
    pub fn find(&self, host: &str, path: &str) -> Result<usize, MatchError> {
        let host = strip_port(host);
        let host = host.strip_suffix('.').unwrap_or(host);
        // Clients almost always send lower case: only allocate when they did not.
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let candidates = match self.exact.get(host) {
            Some(list) => list,
            None => self
                .wildcard
                .iter()
                .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
                .map(|(_, list)| list)
                .ok_or(MatchError::UnknownHost)?,
        };
        candidates
            .iter()
            .find(|(_, prefix)| path_has_prefix(path, prefix))
            .map(|(i, _)| *i)
            .ok_or(MatchError::NoPath)
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port — keep the brackets' content out; such hosts never match a route anyway.
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// `/v1` matches `/v1`, `/v1/x` and `/v1?q`, not `/v10`. A prefix ending in `/` matches plainly.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    if prefix.ends_with('/') || path.len() == prefix.len() {
        return true;
    }
    matches!(path.as_bytes()[prefix.len()], b'/' | b'?')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, hosts: &[&str], prefix: &str) -> Route {
        let text = format!("name = {name:?}\nhosts = {hosts:?}\npath_prefix = {prefix:?}\n",);
        toml::from_str(&text).expect("route")
    }

    #[test]
    fn exact_before_wildcard_and_longest_prefix() {
        let routes = vec![
            route("wild", &["*.example.test"], "/"),
            route("api", &["api.example.test"], "/"),
            route("api-v2", &["api.example.test"], "/v2"),
            route("deep-wild", &["*.eu.example.test"], "/"),
        ];
        let table = HostTable::build(&routes);
        assert_eq!(table.find("api.example.test", "/v2/x"), Ok(2));
        assert_eq!(table.find("API.Example.Test:8080", "/v20"), Ok(1));
        assert_eq!(table.find("api.example.test.", "/v2"), Ok(2));
        assert_eq!(table.find("x.example.test", "/"), Ok(0));
        assert_eq!(table.find("a.b.example.test", "/"), Ok(0));
        assert_eq!(table.find("a.eu.example.test", "/"), Ok(3));
        assert_eq!(
            table.find("example.test", "/"),
            Err(MatchError::UnknownHost)
        );
        assert_eq!(table.find("evil.test", "/"), Err(MatchError::UnknownHost));
        assert_eq!(table.find("", "/"), Err(MatchError::UnknownHost));
    }

    #[test]
    fn path_prefix_needs_a_segment_boundary() {
        let routes = vec![route("v1", &["h.test"], "/v1")];
        let table = HostTable::build(&routes);
        assert_eq!(table.find("h.test", "/v1"), Ok(0));
        assert_eq!(table.find("h.test", "/v1/models"), Ok(0));
        assert_eq!(table.find("h.test", "/v1?x=1"), Ok(0));
        assert_eq!(table.find("h.test", "/v10"), Err(MatchError::NoPath));
        assert_eq!(table.find("h.test", "/"), Err(MatchError::NoPath));
    }
}
