//! Cache keys. The primary key is what identifies a resource (method class, scheme, host, path,
//! normalised query, route-configured headers); the secondary key adds the request header values a
//! stored response named in `Vary`. Nothing outside these two can select a cached response.

use http::header::{HeaderMap, HeaderName};
use meridian_config::CacheKeyConfig;

/// Most header names one response may vary on before it is considered uncacheable.
pub const MAX_VARY_HEADERS: usize = 8;
/// Longest request header value captured into a key; longer values make the request bypass.
pub const MAX_KEYED_VALUE_BYTES: usize = 1024;

/// The request as the cache sees it; every front (Pingora h1/h2, h3) builds one.
#[derive(Clone, Copy, Debug)]
pub struct CacheRequest<'a> {
    pub method: &'a http::Method,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// Authority as received (`Host` or `:authority`); lowercased and port-stripped here.
    pub host: &'a str,
    /// Path and query as received (`/a/b?x=1`).
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
}

/// Per-route key options, compiled once per snapshot.
#[derive(Clone, Debug)]
pub struct KeyOptions {
    ignore_query: Vec<String>,
    headers: Vec<HeaderName>,
    /// `Vary` on `Accept-Language` / `Accept-Encoding` compares normalised values.
    normalise_vary: bool,
}

impl Default for KeyOptions {
    fn default() -> Self {
        Self::from_config(&CacheKeyConfig::default())
    }
}

impl KeyOptions {
    /// Names were validated by the config; a name that still does not parse is skipped.
    pub fn from_config(config: &CacheKeyConfig) -> Self {
        Self {
            ignore_query: config.ignore_query.clone(),
            headers: config
                .headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
                .collect(),
            normalise_vary: config.normalise_vary,
        }
    }
}

/// Identifies one resource (all its `Vary` variants share it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrimaryKey {
    /// Normalised absolute URL, `scheme://host/path?sorted-query`; what purge by URL/prefix matches.
    pub url: String,
    /// Route-configured request headers, `name=value` joined by `\n` (empty when none).
    pub keyed_headers: String,
}

/// Identifies one stored variant: the primary key plus the values of the response's `Vary` headers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    pub primary: PrimaryKey,
    /// `name=value` for each `Vary` header, in the response's order, joined by `\n`.
    pub variant: String,
}

/// Why a request cannot be keyed (it bypasses the cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// A keyed header value is over [`MAX_KEYED_VALUE_BYTES`] or not visible ASCII.
    UnkeyableHeader,
    BadHost,
}

impl PrimaryKey {
    pub fn build(req: &CacheRequest<'_>, options: &KeyOptions) -> Result<Self, KeyError> {
        let host = bare_host(req.host).ok_or(KeyError::BadHost)?;
        let (path, query) = match req.path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.path_and_query, None),
        };
        let path = if path.is_empty() { "/" } else { path };
        let mut url =
            String::with_capacity(req.scheme.len() + host.len() + req.path_and_query.len() + 4);
        push_lowercase(&mut url, req.scheme);
        url.push_str("://");
        push_lowercase(&mut url, host);
        url.push_str(path);
        if let Some(query) = query {
            let normalised = normalise_query(query, &options.ignore_query);
            if !normalised.is_empty() {
                url.push('?');
                url.push_str(&normalised);
            }
        }
        let mut keyed_headers = String::new();
        for name in &options.headers {
            let value = header_value(req.headers, name)?;
            if !keyed_headers.is_empty() {
                keyed_headers.push('\n');
            }
            keyed_headers.push_str(name.as_str());
            keyed_headers.push('=');
            keyed_headers.push_str(&value);
        }
        Ok(Self { url, keyed_headers })
    }
}

impl CacheKey {
    /// The variant of `primary` selected by `vary` (header names from a stored response), with
    /// the route's key `options`.
    pub fn with_vary(
        primary: PrimaryKey,
        vary: &[HeaderName],
        headers: &HeaderMap,
        options: &KeyOptions,
    ) -> Result<Self, KeyError> {
        let mut variant = String::new();
        for name in vary {
            let mut value = header_value(headers, name)?;
            if !options.normalise_vary {
                // Byte for byte (whitespace aside, as for every keyed field).
            } else if name == http::header::ACCEPT_LANGUAGE {
                value = normalise_accept_language(&value);
            } else if name == http::header::ACCEPT_ENCODING && headers.contains_key(name) {
                // Absent stays empty: it accepts every coding, which an empty field does not.
                value = normalise_accept_encoding(&value);
            }
            if !variant.is_empty() {
                variant.push('\n');
            }
            variant.push_str(name.as_str());
            variant.push('=');
            variant.push_str(&value);
        }
        Ok(Self { primary, variant })
    }

    /// Bytes this key costs in the store (counted in the entry's weight).
    pub fn weight(&self) -> usize {
        self.primary.url.len() + self.primary.keyed_headers.len() + self.variant.len()
    }
}

/// A response's `Vary`, as far as the cache can honour it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vary {
    /// Header names (lowercase, deduplicated, in first-seen order); empty when there is no `Vary`.
    Headers(Vec<HeaderName>),
    /// `Vary: *`, a malformed name, or too many names: the response must not be stored, since a
    /// request header the key cannot capture may have shaped it (cache poisoning guard).
    Uncacheable,
}

pub fn parse_vary(headers: &HeaderMap) -> Vary {
    let mut names: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(http::header::VARY) {
        let Ok(text) = value.to_str() else {
            return Vary::Uncacheable;
        };
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if token == "*" {
                return Vary::Uncacheable;
            }
            let Ok(name) = HeaderName::from_bytes(token.to_ascii_lowercase().as_bytes()) else {
                return Vary::Uncacheable;
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    if names.len() > MAX_VARY_HEADERS {
        return Vary::Uncacheable;
    }
    Vary::Headers(names)
}

/// Lowercase, port and trailing dot stripped. `None` for an empty or non-ASCII host.
pub fn normalise_host(host: &str) -> Option<String> {
    bare_host(host).map(str::to_ascii_lowercase)
}

/// The host without port, brackets kept for IPv6, trailing dots dropped; `None` when it cannot be
/// a host. Not lowercased (see [`normalise_host`]).
fn bare_host(host: &str) -> Option<&str> {
    let host = host.trim();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: keep the brackets, drop the port.
        let end = rest.find(']')?;
        &host[..end + 2]
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    let bare = bare.trim_end_matches('.');
    // One pass over the bytes (a char-set `contains` walks them as chars, once per request).
    let unfit = |b: u8| !b.is_ascii() || matches!(b, b'/' | b' ' | b'@');
    if bare.is_empty() || bare.bytes().any(unfit) {
        return None;
    }
    Some(bare)
}

/// Appends ASCII `text` lowercased, without an intermediate string.
fn push_lowercase(out: &mut String, text: &str) {
    let start = out.len();
    out.push_str(text);
    out[start..].make_ascii_lowercase();
}

/// Parameters sorted (stable: equal names keep their order), empty pieces and ignored names dropped.
pub fn normalise_query(query: &str, ignore: &[String]) -> String {
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = p.split_once('=').map_or(*p, |(n, _)| n);
            !ignore.iter().any(|i| i == name)
        })
        .collect();
    params.sort_by(|a, b| {
        let name = |p: &&str| p.split_once('=').map_or(*p, |(n, _)| n).to_string();
        name(a).cmp(&name(b))
    });
    params.join("&")
}

/// Normalises an absolute URL given to purge (`https://Host:443/p?b=2&a=1`) the way keys are built
/// (no per-route query exclusions are applied: purge with the URL as the key stores it).
pub fn normalise_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path_and_query) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = normalise_host(authority)?;
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, normalise_query(q, &[])),
        None => (path_and_query, String::new()),
    };
    let mut out = format!("{}://{host}{path}", scheme.to_ascii_lowercase());
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query);
    }
    Some(out)
}

/// `Accept-Language` as a set of weighted tags (RFC 9110 §12.5.4): tags are case-insensitive and
/// their order carries no meaning beyond the q-values, so `en-US, fr;q=0.5` and `FR; q=0.5,en-us`
/// select the same variant. Sorted by weight (highest first), then by tag.
pub fn normalise_accept_language(value: &str) -> String {
    let mut tags: Vec<(u16, String)> = value
        .split(',')
        .filter_map(|part| {
            let mut pieces = part.split(';');
            let tag = pieces.next()?.trim().to_ascii_lowercase();
            if tag.is_empty() {
                return None;
            }
            let mut weight = 1000u16;
            for param in pieces {
                let Some((name, q)) = param.split_once('=') else {
                    continue;
                };
                if name.trim().eq_ignore_ascii_case("q") {
                    weight = parse_qvalue(q.trim()).unwrap_or(1000);
                }
            }
            Some((weight, tag))
        })
        .collect();
    tags.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    tags.dedup_by(|a, b| a.1 == b.1);
    let mut out = String::with_capacity(value.len());
    for (weight, tag) in tags {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&tag);
        if weight != 1000 {
            out.push_str(&format!(";q={}", weight as f64 / 1000.0));
        }
    }
    out
}

/// `Accept-Encoding` as the set of content codings it accepts (RFC 9110 §12.5.3): codings are
/// case-insensitive, `x-gzip` is `gzip`, order and non-zero q-values only express a preference
/// among codings the origin may choose from, and `identity` is acceptable unless excluded. So
/// `gzip, br`, `BR;q=0.8,gzip` and `br, gzip, identity` all select the same variant: the origin
/// answered one of them with a coding every one of them accepts. Sorted, `,`-joined.
pub fn normalise_accept_encoding(value: &str) -> String {
    let codings = parse_accept_encoding(value);
    let mut accepted: Vec<&str> = codings
        .iter()
        .filter(|(_, q)| *q > 0)
        .map(|(c, _)| c.as_str())
        .filter(|c| *c != "identity")
        .collect();
    if coding_accepted(&codings, "identity") {
        accepted.push("identity");
    }
    accepted.sort_unstable();
    accepted.dedup();
    accepted.join(",")
}

/// May a response with `Content-Encoding` `stored` (absent: none) go to a client that sent
/// `request` (RFC 9110 §12.5.3)? Every coding applied must be accepted; no `Accept-Encoding`
/// accepts everything. Guards hits against an origin that encodes without `Vary`.
pub fn encoding_acceptable(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let [accept_encoding] = crate::headers::present(request, [&http::header::ACCEPT_ENCODING]);
    if !accept_encoding {
        return true;
    }
    // The common hit: an unencoded response and a field without weights, which cannot exclude
    // `identity` — no parsing on that path.
    if !stored.contains_key(http::header::CONTENT_ENCODING)
        && request
            .get_all(http::header::ACCEPT_ENCODING)
            .iter()
            .all(|v| v.to_str().is_ok_and(|t| !t.contains(';')))
    {
        return true;
    }
    let mut joined = String::new();
    for value in request.get_all(http::header::ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else {
            return false;
        };
        joined.push_str(text);
        joined.push(',');
    }
    let codings = parse_accept_encoding(&joined);
    let mut applied = stored
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|c| canonical_coding(c.trim()))
        .filter(|c| !c.is_empty() && c != "identity")
        .peekable();
    if applied.peek().is_none() {
        return coding_accepted(&codings, "identity");
    }
    applied.all(|c| coding_accepted(&codings, &c))
}

/// Codings with their weight in thousandths; the highest weight wins for a coding named twice.
fn parse_accept_encoding(value: &str) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for part in value.split(',') {
        let mut pieces = part.split(';');
        let coding = canonical_coding(pieces.next().unwrap_or_default().trim());
        if coding.is_empty() {
            continue;
        }
        let mut weight = 1000u16;
        for param in pieces {
            if let Some((name, q)) = param.split_once('=') {
                if name.trim().eq_ignore_ascii_case("q") {
                    // An unreadable weight is read as "not acceptable": the safe side.
                    weight = parse_qvalue(q.trim()).unwrap_or(0);
                }
            }
        }
        match out.iter_mut().find(|(c, _)| *c == coding) {
            Some(seen) => seen.1 = seen.1.max(weight),
            None => out.push((coding, weight)),
        }
    }
    out
}

/// Lowercase, with the `x-` aliases RFC 9110 §8.4.1 makes equivalent.
fn canonical_coding(coding: &str) -> String {
    let lower = coding.to_ascii_lowercase();
    match lower.as_str() {
        "x-gzip" => "gzip".to_string(),
        "x-compress" => "compress".to_string(),
        _ => lower,
    }
}

/// Is `coding` acceptable under the parsed field: named with a non-zero weight, else `*` with
/// one; `identity` is acceptable unless `identity;q=0`, or `*;q=0` without naming it.
fn coding_accepted(codings: &[(String, u16)], coding: &str) -> bool {
    if let Some((_, q)) = codings.iter().find(|(c, _)| c == coding) {
        return *q > 0;
    }
    match codings.iter().find(|(c, _)| c == "*") {
        Some((_, q)) => *q > 0,
        None => coding == "identity",
    }
}

/// A qvalue (`0`, `0.5`, `1.000`) in thousandths.
fn parse_qvalue(text: &str) -> Option<u16> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = match int {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    for (i, b) in frac.bytes().enumerate() {
        thousandths += u16::from(b - b'0') * [100, 10, 1][i];
    }
    (thousandths <= 1000).then_some(thousandths)
}

/// All values of `name`, joined by `,`, whitespace-normalised; absent headers key as empty.
fn header_value(headers: &HeaderMap, name: &HeaderName) -> Result<String, KeyError> {
    let mut out = String::new();
    for value in headers.get_all(name) {
        let text = value.to_str().map_err(|_| KeyError::UnkeyableHeader)?;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if !out.is_empty() {
                out.push(',');
            }
            // Collapse inner whitespace so `gzip,  br` and `gzip, br` share a variant.
            let mut last_space = false;
            for c in part.chars() {
                if c.is_ascii_whitespace() {
                    if !last_space {
                        out.push(' ');
                    }
                    last_space = true;
                } else {
                    out.push(c);
                    last_space = false;
                }
            }
        }
        if out.len() > MAX_KEYED_VALUE_BYTES {
            return Err(KeyError::UnkeyableHeader);
        }
    }
    // A newline would let one value impersonate another header in the key string.
    if out.contains('\n') {
        return Err(KeyError::UnkeyableHeader);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Method};

    fn req<'a>(host: &'a str, pq: &'a str, headers: &'a HeaderMap) -> CacheRequest<'a> {
        CacheRequest {
            method: &Method::GET,
            scheme: "https",
            host,
            path_and_query: pq,
            headers,
        }
    }

    fn options(ignore: &[&str], headers: &[&str]) -> KeyOptions {
        KeyOptions::from_config(&CacheKeyConfig {
            ignore_query: ignore.iter().map(|s| s.to_string()).collect(),
            headers: headers.iter().map(|s| s.to_string()).collect(),
            ..CacheKeyConfig::default()
        })
    }

    #[test]
    fn host_is_lowercased_and_port_stripped() {
        let h = HeaderMap::new();
        let a = PrimaryKey::build(
            &req("API.Example.Test:8443", "/x", &h),
            &KeyOptions::default(),
        );
        let b = PrimaryKey::build(&req("api.example.test.", "/x", &h), &KeyOptions::default());
        assert_eq!(a, b);
        assert_eq!(a.map(|k| k.url), Ok("https://api.example.test/x".into()));
        assert_eq!(normalise_host("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(normalise_host(""), None);
        assert_eq!(normalise_host("a b"), None);
        assert_eq!(normalise_host("a/b.test"), None);
        assert_eq!(normalise_host("user@b.test"), None);
        assert_eq!(normalise_host("h\u{e9}.test"), None, "not ASCII");
        assert_eq!(normalise_host("B.Test.:443").as_deref(), Some("b.test"));
    }

    #[test]
    fn query_is_sorted_and_ignored_params_dropped() {
        let h = HeaderMap::new();
        let opts = options(&["utm_source"], &[]);
        let a = PrimaryKey::build(&req("h", "/p?b=2&a=1&utm_source=x", &h), &opts);
        let b = PrimaryKey::build(&req("h", "/p?a=1&&b=2", &h), &opts);
        assert_eq!(a, b);
        assert_eq!(a.map(|k| k.url), Ok("https://h/p?a=1&b=2".into()));
        let only_ignored = PrimaryKey::build(&req("h", "/p?utm_source=1", &h), &opts);
        assert_eq!(only_ignored.map(|k| k.url), Ok("https://h/p".into()));
        // Repeated names keep their relative order (a=2&a=1 is a different resource).
        assert_eq!(normalise_query("a=2&b=0&a=1", &[]), "a=2&a=1&b=0");
        assert_ne!(
            normalise_query("a=2&a=1", &[]),
            normalise_query("a=1&a=2", &[])
        );
    }

    #[test]
    fn different_paths_hosts_schemes_differ() {
        let h = HeaderMap::new();
        let o = KeyOptions::default();
        let base = PrimaryKey::build(&req("h", "/a", &h), &o);
        assert_ne!(base, PrimaryKey::build(&req("h", "/b", &h), &o));
        assert_ne!(base, PrimaryKey::build(&req("g", "/a", &h), &o));
        let mut http = req("h", "/a", &h);
        http.scheme = "http";
        assert_ne!(base, PrimaryKey::build(&http, &o));
    }

    #[test]
    fn configured_headers_join_the_key() {
        let mut h1 = HeaderMap::new();
        h1.insert("x-tenant", HeaderValue::from_static("a"));
        let mut h2 = HeaderMap::new();
        h2.insert("x-tenant", HeaderValue::from_static("b"));
        h2.insert("x-unkeyed", HeaderValue::from_static("evil"));
        let opts = options(&[], &["X-Tenant"]);
        let a = PrimaryKey::build(&req("h", "/", &h1), &opts);
        let b = PrimaryKey::build(&req("h", "/", &h2), &opts);
        assert_ne!(a, b);
        assert_eq!(a.map(|k| k.keyed_headers), Ok("x-tenant=a".into()));
        // Unkeyed headers change nothing.
        let mut h3 = h1.clone();
        h3.insert("x-forwarded-host", HeaderValue::from_static("evil.test"));
        assert_eq!(
            PrimaryKey::build(&req("h", "/", &h1), &opts),
            PrimaryKey::build(&req("h", "/", &h3), &opts)
        );
    }

    #[test]
    fn oversized_keyed_header_is_unkeyable() {
        let mut h = HeaderMap::new();
        let long = "x".repeat(MAX_KEYED_VALUE_BYTES + 1);
        h.insert("x-tenant", HeaderValue::from_str(&long).expect("value"));
        let opts = options(&[], &["x-tenant"]);
        assert_eq!(
            PrimaryKey::build(&req("h", "/", &h), &opts),
            Err(KeyError::UnkeyableHeader)
        );
    }

    #[test]
    fn vary_selects_variant_and_normalises_whitespace() {
        let h = HeaderMap::new();
        let primary = PrimaryKey::build(&req("h", "/", &h), &KeyOptions::default()).expect("key");
        let vary = [http::header::ACCEPT_ENCODING];
        let mut gzip = HeaderMap::new();
        gzip.insert("accept-encoding", HeaderValue::from_static("gzip,  br"));
        let mut gzip2 = HeaderMap::new();
        gzip2.append("accept-encoding", HeaderValue::from_static("gzip"));
        gzip2.append("accept-encoding", HeaderValue::from_static("br"));
        let mut none = HeaderMap::new();
        none.insert("accept-language", HeaderValue::from_static("de"));
        let a = CacheKey::with_vary(primary.clone(), &vary, &gzip, &KeyOptions::default());
        let b = CacheKey::with_vary(primary.clone(), &vary, &gzip2, &KeyOptions::default());
        let c = CacheKey::with_vary(primary, &vary, &none, &KeyOptions::default());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a.map(|k| k.variant),
            Ok("accept-encoding=br,gzip,identity".into())
        );
    }

    #[test]
    fn vary_parsing_and_poisoning_guard() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_vary(&h), Vary::Headers(vec![]));
        h.append(
            "vary",
            HeaderValue::from_static("Accept-Encoding, accept-encoding"),
        );
        h.append("vary", HeaderValue::from_static("Accept-Language"));
        assert_eq!(
            parse_vary(&h),
            Vary::Headers(vec![
                http::header::ACCEPT_ENCODING,
                http::header::ACCEPT_LANGUAGE
            ])
        );
        let mut star = HeaderMap::new();
        star.insert("vary", HeaderValue::from_static("Accept, *"));
        assert_eq!(parse_vary(&star), Vary::Uncacheable);
        let mut bad = HeaderMap::new();
        bad.insert("vary", HeaderValue::from_static("bad header"));
        assert_eq!(parse_vary(&bad), Vary::Uncacheable);
        let mut many = HeaderMap::new();
        let list: Vec<String> = (0..=MAX_VARY_HEADERS).map(|i| format!("x-h{i}")).collect();
        many.insert(
            "vary",
            HeaderValue::from_str(&list.join(",")).expect("value"),
        );
        assert_eq!(parse_vary(&many), Vary::Uncacheable);
    }

    #[test]
    fn purge_urls_normalise_like_keys() {
        let h = HeaderMap::new();
        let key = PrimaryKey::build(
            &req("Api.Test:443", "/p?b=1&a=2", &h),
            &KeyOptions::default(),
        )
        .expect("key");
        assert_eq!(
            normalise_url("HTTPS://api.test:443/p?a=2&b=1").as_deref(),
            Some(key.url.as_str())
        );
        assert_eq!(normalise_url("https://h").as_deref(), Some("https://h/"));
        assert_eq!(normalise_url("not a url"), None);
    }

    /// RFC 9110 §12.5.3: Accept-Encoding variants are the set of accepted codings — order,
    /// case, `x-` aliases and non-zero q-values do not matter; `q=0` and `identity` do.
    #[test]
    fn rfc9110_12_5_3_accept_encoding_normalised() {
        let n = normalise_accept_encoding;
        assert_eq!(n("gzip, br"), "br,gzip,identity");
        assert_eq!(n("BR;q=0.8, gzip"), n("gzip, br"));
        assert_eq!(n("br,  x-gzip , identity;q=0.5"), n("gzip, br"));
        assert_eq!(n("gzip, br, zstd"), "br,gzip,identity,zstd");
        assert_ne!(n("gzip, br;q=0"), n("gzip, br"));
        assert_eq!(n("gzip, br;q=0"), "gzip,identity");
        assert_eq!(n("gzip, identity;q=0"), "gzip");
        assert_eq!(n("*;q=0, gzip"), "gzip");
        assert_eq!(n("*"), "*,identity");
        assert_eq!(n(""), "identity");
        assert_eq!(n("gzip;q=bogus"), "identity");
        let primary = PrimaryKey {
            url: "http://a/".into(),
            keyed_headers: String::new(),
        };
        let vary = [http::header::ACCEPT_ENCODING];
        let key = |v: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(http::header::ACCEPT_ENCODING, HeaderValue::from_static(v));
            }
            CacheKey::with_vary(primary.clone(), &vary, &h, &KeyOptions::default()).expect("key")
        };
        assert_eq!(
            key(Some("gzip, deflate, br")),
            key(Some("br;q=1.0, Deflate, GZIP"))
        );
        assert_ne!(key(Some("gzip")), key(Some("br")));
        // No field (anything goes) is not an empty field (identity only).
        assert_ne!(key(None), key(Some("")));
    }

    /// RFC 9110 §12.5.3: a stored coding is served only to clients that accept it.
    #[test]
    fn rfc9110_12_5_3_encoding_acceptable() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (n, v) in pairs {
                m.append(*n, HeaderValue::from_static(v));
            }
            m
        };
        let gzip = h(&[("content-encoding", "gzip")]);
        let plain = HeaderMap::new();
        assert!(encoding_acceptable(&HeaderMap::new(), &gzip));
        assert!(encoding_acceptable(
            &h(&[("accept-encoding", "gzip, br")]),
            &gzip
        ));
        assert!(encoding_acceptable(
            &h(&[("accept-encoding", "X-GZIP")]),
            &gzip
        ));
        assert!(!encoding_acceptable(
            &h(&[("accept-encoding", "br")]),
            &gzip
        ));
        assert!(!encoding_acceptable(
            &h(&[("accept-encoding", "gzip;q=0, br")]),
            &gzip
        ));
        assert!(encoding_acceptable(&h(&[("accept-encoding", "*")]), &gzip));
        assert!(!encoding_acceptable(&h(&[("accept-encoding", "")]), &gzip));
        assert!(encoding_acceptable(
            &h(&[("accept-encoding", "br")]),
            &plain
        ));
        assert!(!encoding_acceptable(
            &h(&[("accept-encoding", "br, identity;q=0")]),
            &plain
        ));
        assert!(!encoding_acceptable(
            &h(&[("accept-encoding", "br, *;q=0")]),
            &plain
        ));
        // Several codings applied: each must be accepted.
        let both = h(&[("content-encoding", "gzip, br")]);
        assert!(!encoding_acceptable(
            &h(&[("accept-encoding", "gzip")]),
            &both
        ));
        assert!(encoding_acceptable(
            &h(&[("accept-encoding", "gzip, br")]),
            &both
        ));
    }

    /// RFC 9110 §12.5.4: Accept-Language variants match regardless of tag order, case and
    /// whitespace; q-values still separate them.
    #[test]
    fn rfc9110_12_5_4_accept_language_normalised() {
        assert_eq!(
            normalise_accept_language("en-US, fr;q=0.5"),
            normalise_accept_language("FR; q=0.500,en-us")
        );
        assert_eq!(
            normalise_accept_language("de, en"),
            normalise_accept_language("en,de")
        );
        assert_ne!(
            normalise_accept_language("de;q=0.5, en"),
            normalise_accept_language("en;q=0.5, de")
        );
        assert_eq!(normalise_accept_language("en;q=1, fr;q=0"), "en,fr;q=0");
        let vary = [http::header::ACCEPT_LANGUAGE];
        let primary = PrimaryKey {
            url: "http://a/".into(),
            keyed_headers: String::new(),
        };
        let key = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::ACCEPT_LANGUAGE,
                http::HeaderValue::from_static(v),
            );
            CacheKey::with_vary(primary.clone(), &vary, &h, &KeyOptions::default()).expect("key")
        };
        assert_eq!(key("en-GB,  de;q=0.8"), key("de;q=0.8, EN-gb"));
    }

    /// With `key.normalise_vary = false` the varied fields are compared as sent (RFC 9111 §4.1
    /// allows, not requires, normalising them).
    #[test]
    fn vary_normalisation_can_be_turned_off() {
        let raw = KeyOptions::from_config(&CacheKeyConfig {
            normalise_vary: false,
            ..CacheKeyConfig::default()
        });
        let primary = PrimaryKey {
            url: "http://a/".into(),
            keyed_headers: String::new(),
        };
        let vary = [http::header::ACCEPT_LANGUAGE, http::header::ACCEPT_ENCODING];
        let key = |language: &'static str, encoding: &'static str, options: &KeyOptions| {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::ACCEPT_LANGUAGE,
                HeaderValue::from_static(language),
            );
            h.insert(
                http::header::ACCEPT_ENCODING,
                HeaderValue::from_static(encoding),
            );
            CacheKey::with_vary(primary.clone(), &vary, &h, options).expect("key")
        };
        let normalised = KeyOptions::default();
        assert_eq!(
            key("en, de", "gzip, br", &normalised),
            key("DE,en", "br,GZIP", &normalised)
        );
        assert_ne!(
            key("en, de", "gzip, br", &raw),
            key("DE,en", "gzip, br", &raw)
        );
        assert_ne!(key("en", "gzip, br", &raw), key("en", "br, gzip", &raw));
        assert_eq!(
            key("en, de", "gzip, br", &raw),
            key("en,  de", "gzip,br", &raw)
        );
    }
}
