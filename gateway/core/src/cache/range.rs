//! Byte ranges answered from a complete stored response (RFC 9110 §14): `bytes=a-b`, `bytes=a-`
//! and `bytes=-n`, several of them at once (a `multipart/byteranges` answer, §14.6), `If-Range`,
//! and `416` when no range can be satisfied.
//!
//! Range abuse (§14.2: many small or overlapping ranges) is defused the way the RFC allows:
//! overlapping and adjacent ranges are coalesced into one part, and a request listing more than
//! a configured number of ranges is answered with the whole response.

use std::ops::Range;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};

use super::policy::http_date;

/// The most ranges one request may list before it gets the whole response instead (the default
/// of `[edge.cache] max_ranges`). Browsers and media players ask for one; PDF readers a handful.
pub const DEFAULT_MAX_RANGES: usize = 16;

/// The satisfiable ranges of a request, after coalescing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ranges {
    /// No usable `Range` (absent, not `bytes`, malformed, more ranges than allowed, or `If-Range`
    /// does not match): the whole response, as if no range had been asked (RFC 9110 §14.2 lets a
    /// server ignore it).
    Full,
    /// One range (a single asked range, or several that coalesced or of which only one can be
    /// satisfied): a plain `206` with `Content-Range`.
    Single { start: u64, end: u64 },
    /// Two or more disjoint, non-adjacent ranges as `(start, end)` (inclusive), in the order the
    /// request listed them (RFC 9110 §14.6 asks for that order): a multipart `206`.
    Multiple(Vec<(u64, u64)>),
    /// Not one range overlaps the representation: `416`.
    Unsatisfiable,
}

/// One `range-spec` of a `bytes` ranges-specifier (RFC 9110 §14.1.1) against `len` bytes.
enum Spec {
    /// Satisfiable: `start..=end`, clamped to the representation.
    Within(u64, u64),
    /// Valid but beyond the representation (or `-0`).
    Beyond,
    /// Not a valid range-spec: the whole header is ignored (RFC 9110 §14.2).
    Invalid,
}

fn spec(text: &str, len: u64) -> Spec {
    let Some((from, to)) = text.split_once('-') else {
        return Spec::Invalid;
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
            Some(0) => Spec::Beyond,
            Some(_) if len == 0 => Spec::Beyond,
            Some(n) => Spec::Within(len.saturating_sub(n), len - 1),
            None => Spec::Invalid,
        },
        // bytes=a-: from a to the end.
        (false, true) => match number(from) {
            Some(start) if start < len => Spec::Within(start, len - 1),
            Some(_) => Spec::Beyond,
            None => Spec::Invalid,
        },
        (false, false) => match (number(from), number(to)) {
            (Some(start), Some(end)) if start > end => Spec::Invalid,
            (Some(start), Some(end)) if start < len => Spec::Within(start, end.min(len - 1)),
            (Some(_), Some(_)) => Spec::Beyond,
            _ => Spec::Invalid,
        },
        (true, true) => Spec::Invalid,
    }
}

/// The ranges `request` asks of a stored response with headers `stored` and `len` bytes of body
/// (RFC 9110 §14.1.2, §14.2, §13.1.5), at most `max_ranges` of them.
pub fn ranges(request: &HeaderMap, stored: &HeaderMap, len: u64, max_ranges: usize) -> Ranges {
    let Some(range) = request.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ranges::Full;
    };
    if request.get_all(header::RANGE).iter().count() > 1 || !if_range_matches(request, stored) {
        return Ranges::Full;
    }
    let Some(specs) = range
        .trim()
        .split_once('=')
        .filter(|(unit, _)| unit.trim().eq_ignore_ascii_case("bytes"))
        .map(|(_, specs)| specs)
    else {
        return Ranges::Full;
    };
    // Empty list elements are allowed (RFC 9110 §5.6.1) and mean nothing.
    let specs = specs.split(',').map(str::trim).filter(|s| !s.is_empty());
    let mut within = Vec::new();
    let mut asked = 0;
    for (i, text) in specs.enumerate() {
        asked += 1;
        if i >= max_ranges.max(1) {
            // RFC 9110 §14.2: a flood of ranges is a denial-of-service pattern; the whole
            // response costs the edge less than hundreds of parts.
            return Ranges::Full;
        }
        match spec(text, len) {
            Spec::Within(start, end) => within.push((start, end)),
            Spec::Beyond => {}
            Spec::Invalid => return Ranges::Full,
        }
    }
    let coalesced = coalesce(&within);
    match coalesced.as_slice() {
        // `bytes=` alone is not a valid ranges-specifier.
        [] if asked == 0 => Ranges::Full,
        [] => Ranges::Unsatisfiable,
        [(start, end)] => Ranges::Single {
            start: *start,
            end: *end,
        },
        // Ranges of a content-coded body are ranges of the coded bytes; a `Content-Encoding` on
        // the multipart answer would claim the multipart body itself is coded, and no part field
        // says otherwise reliably. The whole response is unambiguous (RFC 9110 §14.2).
        _ if content_coded(stored) => Ranges::Full,
        _ => Ranges::Multiple(coalesced),
    }
}

fn content_coded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let coding = coding.trim();
            !coding.is_empty() && !coding.eq_ignore_ascii_case("identity")
        })
}

/// Merges overlapping and adjacent ranges (RFC 9110 §14.6 allows it whatever their order), so no
/// byte is sent twice and `bytes=0-0,1-1,2-2,...` costs one part. A merged range takes the place
/// of the earliest range it absorbed; the others keep the order the client asked for.
fn coalesce(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let touches =
        |a: (u64, u64), b: (u64, u64)| a.0 <= b.1.saturating_add(1) && b.0 <= a.1.saturating_add(1);
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &range in ranges {
        let mut merged = range;
        let mut at = out.len();
        while let Some(i) = out.iter().position(|&o| touches(o, merged)) {
            let o = out.remove(i);
            merged = (merged.0.min(o.0), merged.1.max(o.1));
            at = at.min(i);
        }
        out.insert(at.min(out.len()), merged);
    }
    out
}

/// A `multipart/byteranges` answer (RFC 9110 §14.6) for ranges of a representation of `len`
/// bytes: each part's header block (`Content-Type` of the representation, `Content-Range`), the
/// range itself, and the closing delimiter. The ranges are taken from the stored body as slices,
/// never copied; only the few header blocks are new.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Multipart {
    boundary: String,
    /// Each part's header block (with the delimiter before it) and its range.
    parts: Vec<(Bytes, u64, u64)>,
    /// The closing delimiter.
    tail: Bytes,
}

impl Multipart {
    /// `boundary` must not occur in the body; callers pass an unpredictable one (RFC 2046 §5.1.1:
    /// 1 to 70 characters from a restricted set, which a letter-digit-hyphen string satisfies).
    pub fn new(
        ranges: &[(u64, u64)],
        len: u64,
        content_type: Option<&HeaderValue>,
        boundary: &str,
    ) -> Self {
        let parts = ranges
            .iter()
            .enumerate()
            .map(|(i, &(start, end))| {
                // The first delimiter starts the body; later ones end the previous part's line.
                let mut head = Vec::with_capacity(96);
                if i > 0 {
                    head.extend_from_slice(b"\r\n");
                }
                head.extend_from_slice(b"--");
                head.extend_from_slice(boundary.as_bytes());
                head.extend_from_slice(b"\r\n");
                if let Some(content_type) = content_type {
                    head.extend_from_slice(b"Content-Type: ");
                    head.extend_from_slice(content_type.as_bytes());
                    head.extend_from_slice(b"\r\n");
                }
                head.extend_from_slice(
                    format!("Content-Range: bytes {start}-{end}/{len}\r\n\r\n").as_bytes(),
                );
                (Bytes::from(head), start, end)
            })
            .collect();
        Self {
            boundary: boundary.to_string(),
            parts,
            tail: Bytes::from(format!("\r\n--{boundary}--\r\n")),
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("multipart/byteranges; boundary={}", self.boundary))
            .unwrap_or_else(|_| HeaderValue::from_static("multipart/byteranges"))
    }

    /// The exact length of the multipart body.
    pub fn content_length(&self) -> u64 {
        self.parts
            .iter()
            .map(|(head, start, end)| head.len() as u64 + (end - start + 1))
            .sum::<u64>()
            + self.tail.len() as u64
    }

    /// The body cut from a stored body held as `chunks`: header blocks and slices of the chunks.
    pub fn body(&self, chunks: &[Bytes]) -> Vec<Bytes> {
        let mut body = Vec::with_capacity(self.parts.len() * 2 + 1);
        for (head, start, end) in &self.parts {
            body.push(head.clone());
            let mut offset = 0u64;
            for chunk in chunks {
                if let Some(within) = slice_of(offset, chunk.len(), *start, *end) {
                    body.push(chunk.slice(within));
                }
                offset += chunk.len() as u64;
                if offset > *end {
                    break;
                }
            }
        }
        body.push(self.tail.clone());
        body
    }

    /// A cut that answers from a body as it streams; `None` unless the parts are in ascending
    /// order (a part before one already passed would need the body held back).
    pub fn streaming(&self) -> Option<BodyCut> {
        let ascending = self.parts.windows(2).all(|w| w[0].2 < w[1].1);
        ascending.then(|| {
            let mut segments = Vec::with_capacity(self.parts.len() * 2 + 1);
            for (head, start, end) in &self.parts {
                segments.push(Segment::Literal(head.clone()));
                segments.push(Segment::Range(*start, *end));
            }
            segments.push(Segment::Literal(self.tail.clone()));
            BodyCut {
                segments,
                next: 0,
                offset: 0,
            }
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(Bytes),
    Range(u64, u64),
}

/// What a client gets of a body that streams past from its first byte: one range, or the parts of
/// a multipart answer, as pieces to send in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyCut {
    segments: Vec<Segment>,
    next: usize,
    /// Body bytes seen so far.
    offset: u64,
}

impl BodyCut {
    /// Bytes `start..=end`.
    pub fn single(start: u64, end: u64) -> Self {
        Self {
            segments: vec![Segment::Range(start, end)],
            next: 0,
            offset: 0,
        }
    }

    /// Appends to `out` what the client gets of the body's next `chunk` (slices, no copies).
    pub fn feed(&mut self, chunk: &Bytes, out: &mut Vec<Bytes>) {
        let chunk_end = self.offset + chunk.len() as u64;
        while let Some(segment) = self.segments.get(self.next) {
            match *segment {
                Segment::Literal(ref bytes) => out.push(bytes.clone()),
                Segment::Range(start, end) => {
                    if let Some(within) = slice_of(self.offset, chunk.len(), start, end) {
                        out.push(chunk.slice(within));
                    }
                    if chunk_end <= end {
                        // The range goes on in a later chunk.
                        break;
                    }
                }
            }
            self.next += 1;
        }
        self.offset = chunk_end;
    }

    /// The client has everything it asked for.
    pub fn is_done(&self) -> bool {
        self.next == self.segments.len()
    }
}

/// A range miss filled by fetching the whole response (RFC 9110 §14): how the client's `Range`
/// is answered from the origin's response head, before its body arrives. Only a `200` with a
/// known length can be cut while it streams (`bytes=-n` needs the end); anything else goes to
/// the client whole, as a server that ignores `Range` would answer (RFC 9110 §14.2). `If-Range`
/// is checked against the fresh response's validators.
pub fn ranges_from_response(
    request: &HeaderMap,
    status: u16,
    response: &HeaderMap,
    max_ranges: usize,
) -> Ranges {
    if status != 200 {
        return Ranges::Full;
    }
    let mut lengths = response.get_all(header::CONTENT_LENGTH).iter();
    let length = lengths
        .next()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match (length, lengths.next()) {
        (Some(len), None) if !response.contains_key(header::TRANSFER_ENCODING) => {
            ranges(request, response, len, max_ranges)
        }
        _ => Ranges::Full,
    }
}

/// The part of a body chunk at byte `offset` (of `len` bytes) that falls in `start..=end`, as
/// indices into the chunk; `None` when they do not overlap.
pub fn slice_of(offset: u64, len: usize, start: u64, end: u64) -> Option<Range<usize>> {
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

    fn range(spec: &'static str, len: u64) -> Ranges {
        ranges(
            &h(&[("range", spec)]),
            &HeaderMap::new(),
            len,
            DEFAULT_MAX_RANGES,
        )
    }

    /// RFC 9110 §14.1.2: the three byte-range forms, clamped to the representation.
    #[test]
    fn rfc9110_14_1_2_byte_ranges() {
        assert_eq!(range("bytes=0-4", 10), Ranges::Single { start: 0, end: 4 });
        assert_eq!(range("bytes=5-", 10), Ranges::Single { start: 5, end: 9 });
        assert_eq!(range("bytes=-3", 10), Ranges::Single { start: 7, end: 9 });
        assert_eq!(range("bytes=-30", 10), Ranges::Single { start: 0, end: 9 });
        assert_eq!(
            range("bytes=8-100", 10),
            Ranges::Single { start: 8, end: 9 }
        );
        assert_eq!(
            range("BYTES = 1-1", 10),
            Ranges::Single { start: 1, end: 1 }
        );
    }

    /// RFC 9110 §15.5.17: 416 when no part of the range overlaps the representation.
    #[test]
    fn rfc9110_15_5_17_unsatisfiable() {
        assert_eq!(range("bytes=10-", 10), Ranges::Unsatisfiable);
        assert_eq!(range("bytes=10-20", 10), Ranges::Unsatisfiable);
        assert_eq!(range("bytes=-0", 10), Ranges::Unsatisfiable);
        assert_eq!(range("bytes=0-", 0), Ranges::Unsatisfiable);
    }

    /// RFC 9110 §14.2: an invalid or unknown-unit Range is ignored; several ranges are a multipart
    /// answer.
    #[test]
    fn rfc9110_14_2_ignored_and_multiple() {
        assert_eq!(range("bytes=5-1", 10), Ranges::Full);
        assert_eq!(range("items=0-1", 10), Ranges::Full);
        assert_eq!(range("bytes=a-b", 10), Ranges::Full);
        assert_eq!(range("bytes=-", 10), Ranges::Full);
        assert_eq!(
            range("bytes=0-1,4-5", 10),
            Ranges::Multiple(vec![(0, 1), (4, 5)])
        );
        assert_eq!(
            ranges(&HeaderMap::new(), &HeaderMap::new(), 10, 16),
            Ranges::Full
        );
    }

    /// RFC 9110 §14.2 / §14.4: a range miss answered from the whole response as it streams — a
    /// `200` of known length is cut; any other status, or an unknown length, goes whole.
    #[test]
    fn rfc9110_14_2_answer_from_a_fetched_response() {
        let ask = h(&[("range", "bytes=-3")]);
        let known = h(&[("content-length", "10"), ("etag", "\"v1\"")]);
        assert_eq!(
            ranges_from_response(&ask, 200, &known, 16),
            Ranges::Single { start: 7, end: 9 }
        );
        assert_eq!(ranges_from_response(&ask, 404, &known, 16), Ranges::Full);
        let chunked = h(&[("transfer-encoding", "chunked")]);
        assert_eq!(ranges_from_response(&ask, 200, &chunked, 16), Ranges::Full);
        let twice = h(&[("content-length", "10"), ("content-length", "10")]);
        assert_eq!(ranges_from_response(&ask, 200, &twice, 16), Ranges::Full);
        let beyond = h(&[("range", "bytes=10-")]);
        assert_eq!(
            ranges_from_response(&beyond, 200, &known, 16),
            Ranges::Unsatisfiable
        );
        // If-Range is checked against the response that was just fetched.
        let stale_validator = h(&[("range", "bytes=0-0"), ("if-range", "\"v0\"")]);
        assert_eq!(
            ranges_from_response(&stale_validator, 200, &known, 16),
            Ranges::Full
        );
        let two = h(&[("range", "bytes=0-1, 4-5")]);
        assert_eq!(
            ranges_from_response(&two, 200, &known, 16),
            Ranges::Multiple(vec![(0, 1), (4, 5)])
        );
        assert_eq!(
            ranges_from_response(&two, 200, &known, 1),
            Ranges::Full,
            "over the limit"
        );
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
            ranges(
                &h(&[("range", "bytes=0-0"), ("if-range", if_range)]),
                &stored,
                10,
                16,
            )
        };
        let partial = Ranges::Single { start: 0, end: 0 };
        assert_eq!(ask("\"v1\""), partial);
        assert_eq!(ask("\"v2\""), Ranges::Full);
        assert_eq!(ask("W/\"v1\""), Ranges::Full);
        assert_eq!(ask("Sun, 06 Nov 1994 08:49:37 GMT"), partial);
        assert_eq!(ask("Sun, 06 Nov 1994 08:49:38 GMT"), Ranges::Full);
    }

    fn many(spec: &'static str, len: u64, max: usize) -> Ranges {
        ranges(&h(&[("range", spec)]), &HeaderMap::new(), len, max)
    }

    /// RFC 9110 §14.1.2 / §14.6: several ranges, in any of the three forms, are answered in the
    /// order asked; the one range left satisfiable is a plain single-part `206`; none left is
    /// `416` (§15.5.17).
    #[test]
    fn rfc9110_14_6_several_ranges() {
        assert_eq!(
            many("bytes=0-9,20-29", 100, 16),
            Ranges::Multiple(vec![(0, 9), (20, 29)])
        );
        assert_eq!(
            many("bytes=90-, 0-1 ,,-3", 200, 16),
            Ranges::Multiple(vec![(90, 199), (0, 1)]),
            "-3 lies inside 90-: coalesced"
        );
        assert_eq!(
            many("bytes=-5,10-12", 100, 16),
            Ranges::Multiple(vec![(95, 99), (10, 12)]),
            "the client's order is kept"
        );
        assert_eq!(
            many("bytes=0-1,200-300,-0", 100, 16),
            Ranges::Single { start: 0, end: 1 }
        );
        assert_eq!(
            many("bytes=100-,200-300,-0", 100, 16),
            Ranges::Unsatisfiable
        );
        assert_eq!(
            many("bytes=0-1,5-2", 100, 16),
            Ranges::Full,
            "one invalid range-spec: the header is ignored"
        );
        assert_eq!(many("bytes=,", 100, 16), Ranges::Full);
    }

    /// RFC 9110 §14.2 / §14.6: overlapping and adjacent ranges coalesce (whatever their order), so
    /// a request can never make the edge send a byte twice.
    #[test]
    fn rfc9110_14_2_overlapping_ranges_coalesce() {
        assert_eq!(
            many("bytes=0-4,5-9", 100, 16),
            Ranges::Single { start: 0, end: 9 }
        );
        assert_eq!(
            many("bytes=10-20,0-5,15-30,6-9", 100, 16),
            Ranges::Single { start: 0, end: 30 }
        );
        assert_eq!(
            many("bytes=50-60,0-0,55-70,-1", 100, 16),
            Ranges::Multiple(vec![(50, 70), (0, 0), (99, 99)])
        );
        assert_eq!(
            many("bytes=0-0,0-0,0-0,0-0", 100, 16),
            Ranges::Single { start: 0, end: 0 }
        );
    }

    /// RFC 9110 §14.2: a request listing more ranges than the limit gets the whole response.
    #[test]
    fn rfc9110_14_2_range_count_limit() {
        let sixteen = "bytes=0-0,2-2,4-4,6-6,8-8,10-10,12-12,14-14,16-16,18-18,20-20,22-22,24-24,26-26,28-28,30-30";
        let Ranges::Multiple(parts) = many(sixteen, 100, DEFAULT_MAX_RANGES) else {
            panic!("16 ranges are answered");
        };
        assert_eq!(parts.len(), 16);
        let seventeen = "bytes=0-0,2-2,4-4,6-6,8-8,10-10,12-12,14-14,16-16,18-18,20-20,22-22,24-24,26-26,28-28,30-30,32-32";
        assert_eq!(many(seventeen, 100, DEFAULT_MAX_RANGES), Ranges::Full);
        // The limit counts what was asked, before coalescing: the flood itself is the abuse.
        assert_eq!(many("bytes=0-0,0-0,0-0", 100, 2), Ranges::Full);
        assert_eq!(
            many("bytes=0-0,0-0", 100, 2),
            Ranges::Single { start: 0, end: 0 }
        );
    }

    /// Several ranges of a content-coded body get the whole response; one range is cut as usual.
    #[test]
    fn several_ranges_of_a_coded_body_get_the_whole_response() {
        let gzip = h(&[("content-encoding", "gzip")]);
        let ask = |spec: &'static str, stored: &HeaderMap| {
            ranges(&h(&[("range", spec)]), stored, 100, 16)
        };
        assert_eq!(ask("bytes=0-1,5-6", &gzip), Ranges::Full);
        assert_eq!(
            ask("bytes=0-1,2-6", &gzip),
            Ranges::Single { start: 0, end: 6 }
        );
        assert_eq!(
            ask("bytes=0-1,5-6", &h(&[("content-encoding", "identity")])),
            Ranges::Multiple(vec![(0, 1), (5, 6)])
        );
    }

    /// RFC 9110 §13.1.5: If-Range applies to several ranges as to one.
    #[test]
    fn rfc9110_13_1_5_if_range_with_several_ranges() {
        let stored = h(&[("etag", "\"v1\"")]);
        let ask = |if_range: &'static str| {
            ranges(
                &h(&[("range", "bytes=0-0,5-5"), ("if-range", if_range)]),
                &stored,
                10,
                16,
            )
        };
        assert_eq!(ask("\"v1\""), Ranges::Multiple(vec![(0, 0), (5, 5)]));
        assert_eq!(ask("\"v2\""), Ranges::Full);
    }

    fn concat(pieces: &[Bytes]) -> Vec<u8> {
        pieces.iter().flat_map(|b| b.iter().copied()).collect()
    }

    /// RFC 9110 §14.6: the multipart/byteranges body, byte for byte, with its exact length.
    #[test]
    fn rfc9110_14_6_multipart_body() {
        let stored: Bytes = Bytes::from_static(b"0123456789abcdefghij");
        let chunks = [stored.slice(0..7), stored.slice(7..8), stored.slice(8..20)];
        let text = HeaderValue::from_static("text/plain");
        let multipart = Multipart::new(&[(2, 4), (15, 19)], 20, Some(&text), "B1");
        assert_eq!(
            multipart.content_type(),
            HeaderValue::from_static("multipart/byteranges; boundary=B1")
        );
        let body = multipart.body(&chunks);
        let want = "--B1\r\nContent-Type: text/plain\r\nContent-Range: bytes 2-4/20\r\n\r\n234\
                    \r\n--B1\r\nContent-Type: text/plain\r\nContent-Range: bytes 15-19/20\r\n\r\nfghij\
                    \r\n--B1--\r\n";
        assert_eq!(String::from_utf8(concat(&body)).ok().as_deref(), Some(want));
        assert_eq!(multipart.content_length(), want.len() as u64);
        // The ranges are views of the stored chunks, not copies.
        assert!(body
            .iter()
            .any(|piece| piece.as_ptr() == chunks[0].slice(2..).as_ptr()));

        // Streamed chunk by chunk (any split), the same bytes come out.
        for split in 1..20 {
            let mut cut = multipart.streaming().expect("ascending");
            let mut out = Vec::new();
            for piece in [stored.slice(0..split), stored.slice(split..20)] {
                assert!(!cut.is_done());
                cut.feed(&piece, &mut out);
            }
            assert!(cut.is_done(), "split at {split}");
            assert_eq!(concat(&out), want.as_bytes(), "split at {split}");
        }

        // Without a stored Content-Type the parts carry only Content-Range; parts asked in
        // descending order are cut from a stored body but cannot be streamed.
        let backwards = Multipart::new(&[(15, 19), (0, 0)], 20, None, "B2");
        let body = concat(&backwards.body(&chunks));
        let want = "--B2\r\nContent-Range: bytes 15-19/20\r\n\r\nfghij\
                    \r\n--B2\r\nContent-Range: bytes 0-0/20\r\n\r\n0\r\n--B2--\r\n";
        assert_eq!(body, want.as_bytes());
        assert_eq!(backwards.content_length(), want.len() as u64);
        assert!(backwards.streaming().is_none());
    }

    /// One range cut from a body as it streams, whatever the chunking; done once its last byte
    /// went out, however much of the body is still to come.
    #[test]
    fn single_range_cut_while_streaming() {
        let stored: Bytes = Bytes::from_static(b"0123456789");
        let mut cut = BodyCut::single(3, 5);
        let mut out = Vec::new();
        cut.feed(&stored.slice(0..2), &mut out);
        assert!(out.is_empty() && !cut.is_done());
        cut.feed(&stored.slice(2..4), &mut out);
        assert!(!cut.is_done());
        cut.feed(&stored.slice(4..6), &mut out);
        assert!(cut.is_done());
        assert_eq!(concat(&out), b"345");
    }
}
