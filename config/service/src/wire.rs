//! What the config service and its client agree on: header names and how free text (author,
//! commit message) travels in a header.

use http::HeaderMap;

use crate::store::VersionMeta;

pub const VERSION: &str = "x-meridian-version";
pub const SHA256: &str = "x-meridian-sha256";
pub const TIMESTAMP: &str = "x-meridian-timestamp";
pub const AUTHOR: &str = "x-meridian-author";
pub const MESSAGE: &str = "x-meridian-message";

/// Percent-encodes everything outside visible ASCII (and `%` itself), so any UTF-8 text is a
/// valid header value.
pub fn encode_header_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Inverse of [`encode_header_text`]; malformed escapes are kept literally, bad UTF-8 replaced.
pub fn decode_header_text(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let escaped = (raw[i] == b'%')
            .then(|| raw.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| decode_header_text(v.as_bytes()))
}

/// Parses an entity tag that carries a version: `"7"`, `W/"7"` or a bare `7`.
pub fn parse_version_tag(text: &str) -> Option<u64> {
    let text = text.trim();
    let text = text.strip_prefix("W/").unwrap_or(text);
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Headers describing a stored version, as `(name, value)` pairs (values are header-safe).
pub fn version_headers(meta: &VersionMeta) -> [(&'static str, String); 6] {
    [
        ("etag", format!("\"{}\"", meta.version)),
        (VERSION, meta.version.to_string()),
        (SHA256, meta.sha256.clone()),
        (TIMESTAMP, meta.timestamp.to_string()),
        (AUTHOR, encode_header_text(&meta.author)),
        (MESSAGE, encode_header_text(&meta.message)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_round_trips() {
        for text in ["plain", "100% sure", "Zoë: ünïcode\nnewline", ""] {
            assert_eq!(
                decode_header_text(encode_header_text(text).as_bytes()),
                text
            );
        }
        assert_eq!(decode_header_text(b"bad %zz %4"), "bad %zz %4");
    }

    #[test]
    fn version_tags() {
        assert_eq!(parse_version_tag("\"7\""), Some(7));
        assert_eq!(parse_version_tag("W/\"7\""), Some(7));
        assert_eq!(parse_version_tag(" 12 "), Some(12));
        assert_eq!(parse_version_tag("\"\""), None);
        assert_eq!(parse_version_tag("*"), None);
        assert_eq!(parse_version_tag("-1"), None);
    }
}
