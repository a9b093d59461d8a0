//! Byte ranges answered from a complete stored response (RFC 9110 §14): `bytes=a-b`, `bytes=a-`
//! and `bytes=-n`, `If-Range`, and `416` for a range that cannot be satisfied. Several ranges in
//! one request (a multipart answer) are left to the origin.

use http::header::{self, HeaderMap};

use super::policy::http_date;

/// How a request's `Range` is answered from a stored representation of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable `Range` (absent, not `bytes`, malformed, or `If-Range` does not match): the
    /// whole response, as if no range had been asked (RFC 9110 §14.2 lets a server ignore it).
    Full,
    /// `206` with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// `416` with `Content-Range: bytes */len`.
    Unsatisfiable,
    /// More than one range: the cache does not build multipart answers.
    Multiple,
}

/// Decides the answer for `request` against a stored response with headers `stored` and a body
/// of `len` bytes.
pub fn answer(request: &HeaderMap, stored: &HeaderMap, len: u64) -> RangeAnswer {
    let Some(range) = request.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    if request.get_all(header::RANGE).iter().count() > 1 || !if_range_matches(request, stored) {
        return RangeAnswer::Full;
    }
    let Some(specs) = range
        .trim()
        .split_once('=')
        .filter(|(unit, _)| unit.trim().eq_ignore_ascii_case("bytes"))
        .map(|(_, specs)| specs)
    else {
        return RangeAnswer::Full;
    };
    let mut specs = specs.split(',').map(str::trim).filter(|s| !s.is_empty());
    let Some(first) = specs.next() else {
        return RangeAnswer::Full;
    };
    if specs.next().is_some() {
        return RangeAnswer::Multiple;
    }
    let Some((from, to)) = first.split_once('-') else {
        return RangeAnswer::Full;
    };
    let number = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match (from.trim().is_empty(), to.trim().is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match number(to) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            None => RangeAnswer::Full,
        },
        // bytes=a-: from a to the end.
        (false, true) => match number(from) {
            Some(start) if start < len => RangeAnswer::Partial {
                start,
                end: len - 1,
            },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        (false, false) => match (number(from), number(to)) {
            (Some(start), Some(end)) if start > end => RangeAnswer::Full,
            (Some(start), Some(end)) if start < len => RangeAnswer::Partial {
                start,
                end: end.min(len - 1),
            },
            (Some(_), Some(_)) => RangeAnswer::Unsatisfiable,
            _ => RangeAnswer::Full,
        },
        (true, true) => RangeAnswer::Full,
    }
}

/// `If-Range` (RFC 9110 §13.1.5): the range applies only if the validator still matches — a
/// strong entity-tag equal to the stored one, or a date equal to the stored `Last-Modified`.
fn if_range_matches(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(value) = request.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return request.get(header::IF_RANGE).is_none();
    };
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let etag = etag.trim();
        return !value.starts_with("W/") && !etag.starts_with("W/") && etag == value;
    }
    match (
        super::policy::parse_http_date(value),
        http_date(stored, &header::LAST_MODIFIED),
    ) {
        (Some(given), Some(modified)) => given == modified,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(*n, HeaderValue::from_static(v));
        }
        m
    }

    fn range(spec: &'static str, len: u64) -> RangeAnswer {
        answer(&h(&[("range", spec)]), &HeaderMap::new(), len)
    }

    /// RFC 9110 §14.1.2: the three byte-range forms, clamped to the representation.
    #[test]
    fn rfc9110_14_1_2_byte_ranges() {
        assert_eq!(
            range("bytes=0-4", 10),
            RangeAnswer::Partial { start: 0, end: 4 }
        );
        assert_eq!(
            range("bytes=5-", 10),
            RangeAnswer::Partial { start: 5, end: 9 }
        );
        assert_eq!(
            range("bytes=-3", 10),
            RangeAnswer::Partial { start: 7, end: 9 }
        );
        assert_eq!(
            range("bytes=-30", 10),
            RangeAnswer::Partial { start: 0, end: 9 }
        );
        assert_eq!(
            range("bytes=8-100", 10),
            RangeAnswer::Partial { start: 8, end: 9 }
        );
        assert_eq!(
            range("BYTES = 1-1", 10),
            RangeAnswer::Partial { start: 1, end: 1 }
        );
    }

    /// RFC 9110 §15.5.17: 416 when no part of the range overlaps the representation.
    #[test]
    fn rfc9110_15_5_17_unsatisfiable() {
        assert_eq!(range("bytes=10-", 10), RangeAnswer::Unsatisfiable);
        assert_eq!(range("bytes=10-20", 10), RangeAnswer::Unsatisfiable);
        assert_eq!(range("bytes=-0", 10), RangeAnswer::Unsatisfiable);
        assert_eq!(range("bytes=0-", 0), RangeAnswer::Unsatisfiable);
    }

    /// RFC 9110 §14.2: an invalid or unknown-unit Range is ignored; several ranges go elsewhere.
    #[test]
    fn rfc9110_14_2_ignored_and_multiple() {
        assert_eq!(range("bytes=5-1", 10), RangeAnswer::Full);
        assert_eq!(range("items=0-1", 10), RangeAnswer::Full);
        assert_eq!(range("bytes=a-b", 10), RangeAnswer::Full);
        assert_eq!(range("bytes=-", 10), RangeAnswer::Full);
        assert_eq!(range("bytes=0-1,4-5", 10), RangeAnswer::Multiple);
        assert_eq!(
            answer(&HeaderMap::new(), &HeaderMap::new(), 10),
            RangeAnswer::Full
        );
    }

    /// RFC 9110 §13.1.5: If-Range with a strong ETag or the exact Last-Modified.
    #[test]
    fn rfc9110_13_1_5_if_range() {
        let stored = h(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let ask = |if_range: &'static str| {
            answer(
                &h(&[("range", "bytes=0-0"), ("if-range", if_range)]),
                &stored,
                10,
            )
        };
        let partial = RangeAnswer::Partial { start: 0, end: 0 };
        assert_eq!(ask("\"v1\""), partial);
        assert_eq!(ask("\"v2\""), RangeAnswer::Full);
        assert_eq!(ask("W/\"v1\""), RangeAnswer::Full);
        assert_eq!(ask("Sun, 06 Nov 1994 08:49:37 GMT"), partial);
        assert_eq!(ask("Sun, 06 Nov 1994 08:49:38 GMT"), RangeAnswer::Full);
    }
}
