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

/// Does the request ask for several ranges (a multipart answer, left to the origin)?
pub fn several_ranges(request: &HeaderMap) -> bool {
    let mut values = request.get_all(header::RANGE).iter();
    let Some(first) = values.next().and_then(|v| v.to_str().ok()) else {
        return false;
    };
    values.next().is_none()
        && first
            .split_once('=')
            .is_some_and(|(_, specs)| specs.split(',').filter(|s| !s.trim().is_empty()).count() > 1)
}

/// A range miss filled by fetching the whole response (RFC 9110 §14): how the client's `Range`
/// is answered from the origin's response head, before its body arrives. Only a `200` with a
/// known length can be cut while it streams (`bytes=-n` needs the end); anything else goes to
/// the client whole, as a server that ignores `Range` would answer (RFC 9110 §14.2). `If-Range`
/// is checked against the fresh response's validators.
pub fn answer_from_response(request: &HeaderMap, status: u16, response: &HeaderMap) -> RangeAnswer {
    if status != 200 {
        return RangeAnswer::Full;
    }
    let mut lengths = response.get_all(header::CONTENT_LENGTH).iter();
    let length = lengths
        .next()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match (length, lengths.next()) {
        (Some(len), None) if !response.contains_key(header::TRANSFER_ENCODING) => {
            answer(request, response, len)
        }
        _ => RangeAnswer::Full,
    }
}

/// The part of a body chunk at byte `offset` (of `len` bytes) that falls in `start..=end`, as
/// indices into the chunk; `None` when they do not overlap.
pub fn slice_of(offset: u64, len: usize, start: u64, end: u64) -> Option<std::ops::Range<usize>> {
    let chunk_end = offset.saturating_add(len as u64);
    let (from, to) = (start.max(offset), end.saturating_add(1).min(chunk_end));
    (from < to).then(|| (from - offset) as usize..(to - offset) as usize)
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

    /// RFC 9110 §14.2 / §14.4: a range miss answered from the whole response as it streams — a
    /// `200` of known length is cut; any other status, or an unknown length, goes whole.
    #[test]
    fn rfc9110_14_2_answer_from_a_fetched_response() {
        let ask = h(&[("range", "bytes=-3")]);
        let known = h(&[("content-length", "10"), ("etag", "\"v1\"")]);
        assert_eq!(
            answer_from_response(&ask, 200, &known),
            RangeAnswer::Partial { start: 7, end: 9 }
        );
        assert_eq!(answer_from_response(&ask, 404, &known), RangeAnswer::Full);
        let chunked = h(&[("transfer-encoding", "chunked")]);
        assert_eq!(answer_from_response(&ask, 200, &chunked), RangeAnswer::Full);
        let twice = h(&[("content-length", "10"), ("content-length", "10")]);
        assert_eq!(answer_from_response(&ask, 200, &twice), RangeAnswer::Full);
        let beyond = h(&[("range", "bytes=10-")]);
        assert_eq!(
            answer_from_response(&beyond, 200, &known),
            RangeAnswer::Unsatisfiable
        );
        // If-Range is checked against the response that was just fetched.
        let stale_validator = h(&[("range", "bytes=0-0"), ("if-range", "\"v0\"")]);
        assert_eq!(
            answer_from_response(&stale_validator, 200, &known),
            RangeAnswer::Full
        );
        assert!(several_ranges(&h(&[("range", "bytes=0-1, 4-5")])));
        assert!(!several_ranges(&h(&[("range", "bytes=0-1")])));
        assert!(!several_ranges(&HeaderMap::new()));
    }

    /// Cutting `start..=end` out of a body that arrives in chunks.
    #[test]
    fn slices_of_chunks() {
        assert_eq!(slice_of(0, 10, 3, 5), Some(3..6));
        assert_eq!(slice_of(10, 10, 3, 5), None);
        assert_eq!(slice_of(4, 10, 3, 5), Some(0..2));
        assert_eq!(slice_of(0, 4, 3, 100), Some(3..4));
        assert_eq!(slice_of(0, 3, 3, 5), None);
        assert_eq!(slice_of(0, 0, 0, 0), None);
        assert_eq!(slice_of(0, 10, 0, u64::MAX), Some(0..10));
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
