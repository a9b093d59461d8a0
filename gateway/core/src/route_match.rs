//! Host and path matching: exact hosts before `*.` wildcards (longest suffix first), then the longest
//! path prefix that ends on a segment boundary.

use std::borrow::Cow;
use std::collections::HashMap;

use meridian_config::Route;

use crate::fast_hash::FastBuildHasher;

/// (route index, path prefix) pairs for one host, longest prefix first.
type Claims = Vec<(usize, String)>;

/// Routes per host, each list sorted by path prefix length, longest first.
#[derive(Default)]
pub struct HostTable {
    exact: HashMap<String, Claims, FastBuildHasher>,
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
        let mut exact: HashMap<String, Claims, FastBuildHasher> = HashMap::default();
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

/// Why a request path is refused (`400`) instead of routed: it means different things to
/// different servers, so matching it here and forwarding it there could disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%2F` or `%5C`: a slash some servers decode and split on, others do not.
    #[error("encoded slash or backslash in the path")]
    EncodedSeparator,
    /// A backslash, which some servers take for a slash.
    #[error("backslash in the path")]
    Backslash,
    /// `%00` or any other control character.
    #[error("control character in the path")]
    Control,
    /// `%` not followed by two hex digits.
    #[error("malformed percent-encoding in the path")]
    BadEscape,
    /// A `.`/`..` segment with parameters (`/..;/`), which some servers resolve and others keep.
    #[error("dot segment with parameters in the path")]
    DotParams,
}

/// The path as routes match it and as the upstream gets it: percent-encoded unreserved
/// characters decoded (`%41` → `A`, `%2e` → `.`), then duplicate slashes merged and `.`/`..`
/// segments resolved (never above the root). Paths that servers disagree on are refused
/// (see [`PathError`]). A path that needs none of this — nearly all — is returned borrowed,
/// without allocating. Anything not starting with `/` (`*`) is left as it is.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut suspicious = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::Control),
            b'%' => suspicious = true,
            b'/' if matches!(bytes.get(i + 1), Some(b'/' | b'.')) => suspicious = true,
            _ => {}
        }
    }
    if !suspicious {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut out = String::with_capacity(decoded.len());
    for segment in decoded.split('/').skip(1) {
        let bare = segment.split(';').next().unwrap_or(segment);
        if segment.contains(';') && (bare == "." || bare == "..") {
            return Err(PathError::DotParams);
        }
        match segment {
            "" | "." => {}
            ".." => {
                let cut = out.rfind('/').unwrap_or(0);
                out.truncate(cut);
            }
            _ => {
                out.push('/');
                out.push_str(segment);
            }
        }
    }
    // A trailing slash, `/.` or `/..` names a directory: keep its slash.
    let ends_as_directory =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if out.is_empty() || ends_as_directory {
        out.push('/');
    }
    if out == path {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(out))
}

/// Decodes `%XX` escapes of unreserved characters (RFC 3986 §2.3: they mean the same either
/// way); other escapes stay as they are, with `%2F`, `%5C` and controls refused.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Copy the run up to the next escape (keeps multi-byte characters whole).
            let next = path[i..].find('%').map_or(bytes.len(), |n| i + n);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let hex = |b: u8| (b as char).to_digit(16);
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).and_then(|&b| hex(b)),
            bytes.get(i + 2).and_then(|&b| hex(b)),
        ) else {
            return Err(PathError::BadEscape);
        };
        let value = (hi * 16 + lo) as u8;
        match value {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            0..=0x1f | 0x7f => return Err(PathError::Control),
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                out.push(b as char)
            }
            _ => out.push_str(&path[i..i + 3]),
        }
        i += 3;
    }
    Ok(Cow::Owned(out))
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

    #[test]
    fn paths_are_normalised_before_matching_or_refused() {
        let ok = [
            ("/", "/"),
            ("/static/app.js", "/static/app.js"),
            ("//admin", "/admin"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/../../etc", "/etc"),
            ("/..", "/"),
            ("/%61dmin", "/admin"),
            ("/a%20b", "/a%20b"),
            ("/a%7e", "/a~"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/v1//chat///completions", "/v1/chat/completions"),
            ("/a/...", "/a/..."),
            ("/a;b", "/a;b"),
            ("*", "*"),
        ];
        for (input, expected) in ok {
            assert_eq!(normalize_path(input).as_deref(), Ok(expected), "{input}");
        }
        assert!(matches!(
            normalize_path("/static/app.js"),
            Ok(Cow::Borrowed(_))
        ));
        let refused = [
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%2F..%2Fadmin", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a\\b", PathError::Backslash),
            ("/a%00", PathError::Control),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/public/..;/admin", PathError::DotParams),
            ("/public/.;x/admin", PathError::DotParams),
        ];
        for (input, error) in refused {
            assert_eq!(normalize_path(input), Err(error), "{input}");
        }
    }

    #[test]
    fn a_path_prefix_cannot_be_left_through_dots() {
        let routes = vec![
            route("public", &["h.test"], "/public"),
            route("admin", &["h.test"], "/admin"),
        ];
        let table = HostTable::build(&routes);
        for path in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "//admin",
            "/%61dmin",
        ] {
            let normal = normalize_path(path).expect("normalises");
            assert_eq!(table.find("h.test", &normal), Ok(1), "{path}");
        }
    }
}
