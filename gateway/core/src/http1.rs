//! HTTP/1.1 message framing and request-head rules (RFC 9112), shared by the edge's client-facing
//! driver and its upstream connector. A gateway and the server behind it must agree byte for byte on
//! where each message ends, or one request can hide another (request smuggling): so every rule that
//! decides framing lives here, once, strict where the RFC allows a choice, and unit-tested without
//! sockets.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};

/// How the rest of a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No (more) body.
    Done,
    /// This many bytes still to come.
    Length(u64),
    Chunked(ChunkState),
    /// Until the sender closes the connection (responses only; never reused).
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// This many data bytes of the current chunk left, then its CRLF.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

impl Framing {
    pub const CHUNKED: Framing = Framing::Chunked(ChunkState::Size);
}

/// The longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// The next piece of body in `buf` under `framing` (advancing both); `None` when more bytes must
/// be read first, or the body is done. Trailers are read and dropped, at most `max_trailers` bytes.
pub fn decode(
    framing: &mut Framing,
    buf: &mut BytesMut,
    max_trailers: usize,
) -> Result<Option<Bytes>, &'static str> {
    loop {
        match *framing {
            Framing::Done => return Ok(None),
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let chunk = buf.split_to(n).freeze();
                *framing = match left - n as u64 {
                    0 => Framing::Done,
                    rest => Framing::Length(rest),
                };
                return Ok(Some(chunk));
            }
            Framing::UntilClose => {
                if buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(buf.split().freeze()));
            }
            Framing::Chunked(ChunkState::Size) => {
                let Some(end) = find_crlf(buf) else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err("chunk size line too long");
                    }
                    return Ok(None);
                };
                let size = chunk_size(&buf[..end])?;
                buf.advance(end + 2);
                *framing = Framing::Chunked(if size == 0 {
                    ChunkState::Trailers
                } else {
                    ChunkState::Data(size)
                });
            }
            Framing::Chunked(ChunkState::Data(left)) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let chunk = buf.split_to(n).freeze();
                *framing = Framing::Chunked(match left - n as u64 {
                    0 => ChunkState::DataEnd,
                    rest => ChunkState::Data(rest),
                });
                return Ok(Some(chunk));
            }
            Framing::Chunked(ChunkState::DataEnd) => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("missing CRLF after chunk data");
                }
                buf.advance(2);
                *framing = Framing::CHUNKED;
            }
            Framing::Chunked(ChunkState::Trailers) => {
                let Some(end) = find_crlf(buf) else {
                    if buf.len() > max_trailers {
                        return Err("trailers too large");
                    }
                    return Ok(None);
                };
                if end > max_trailers {
                    return Err("trailers too large");
                }
                buf.advance(end + 2);
                if end == 0 {
                    *framing = Framing::Done;
                }
            }
        }
    }
}

/// `chunk-size [ BWS ";" chunk-ext ]`: hex digits only (no sign, no `0x`, no leading blanks — the
/// lenient readings are exactly how two parsers come to disagree), at most 16 of them.
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err("invalid chunk size");
    }
    let rest = &line[digits..];
    let ext = rest.iter().position(|b| !matches!(b, b' ' | b'\t'));
    match ext {
        None if rest.is_empty() => {}
        Some(i) if rest[i] == b';' => {
            if rest.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err("invalid chunk extension");
            }
        }
        _ => return Err("invalid chunk size"),
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        let v = (b as char).to_digit(16).unwrap_or(0) as u64;
        size = size << 4 | v;
    }
    Ok(size)
}

/// A chunk-size line (`<hex>\r\n`) for a chunk of `len` bytes, built on the stack; the line is
/// `line[..n]` of the returned `(line, n)`. Both sides of the edge frame chunked bodies with it.
pub fn chunk_size_line(len: usize) -> ([u8; 18], usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut line = [0u8; 18];
    let digits = ((usize::BITS - len.leading_zeros()).div_ceil(4)).max(1) as usize;
    for (i, slot) in line[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *slot = HEX[(len >> shift) & 0xf];
    }
    line[digits..digits + 2].copy_from_slice(b"\r\n");
    (line, digits + 2)
}

pub fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// `Content-Length`, when present: every value the same number (RFC 9110 §8.6), else an error.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut length = ContentLength::default();
    for value in headers.get_all(header::CONTENT_LENGTH) {
        length.add(value.as_bytes());
    }
    length.value()
}

/// [`content_length`] for parsers that meet the fields one by one: the first invalid or
/// conflicting field decides, and whether that matters is the caller's call (a length that does
/// not frame the body is not an error).
#[derive(Clone, Copy, Debug)]
pub struct ContentLength(Result<Option<u64>, &'static str>);

impl Default for ContentLength {
    fn default() -> Self {
        Self(Ok(None))
    }
}

impl ContentLength {
    /// Folds in one `Content-Length` field (a comma-separated list of equal lengths is allowed).
    pub fn add(&mut self, value: &[u8]) {
        let Ok(found) = &mut self.0 else { return };
        for part in value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            // At most 19 digits: always within u64.
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                self.0 = Err("invalid content-length");
                return;
            }
            let n = part
                .iter()
                .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
            if found.is_some_and(|f| f != n) {
                self.0 = Err("conflicting content-length");
                return;
            }
            *found = Some(n);
        }
    }

    /// The length the fields agree on (`None`: no field), or why they do not.
    pub fn value(self) -> Result<Option<u64>, &'static str> {
        self.0
    }
}

/// Limits that apply while a request head is still arriving.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// The whole head (request line + header fields); more → 431 (or 414 inside the request line).
    pub max_header_bytes: usize,
    /// Header fields; more → 431.
    pub max_headers: usize,
    /// The request target; longer → 414.
    pub max_uri_bytes: usize,
}

/// A request head the edge refuses, with the status RFC 9112 / RFC 9110 prescribe. The connection
/// is closed after the answer: after a framing error nothing on it can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadError {
    pub status: u16,
    pub message: &'static str,
}

const fn refuse(status: u16, message: &'static str) -> HeadError {
    HeadError { status, message }
}

/// A complete, validated request head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// Fields as received, minus the framing fields the edge owns (`Transfer-Encoding`,
    /// `Expect: 100-continue`); `Host` is the request target's authority when one was given.
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The client allows another request on this connection after the answer.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// Bytes of the buffer the head took (the body, or the next request, follows).
    pub length: usize,
}

/// Headers a request head leaves room for beyond its own (see [`parse_request`]).
const FORWARDING_HEADROOM: usize = 4;

/// Parses and validates the request head at the start of `buf`; `Ok(None)` when it is not complete
/// yet (and still within limits).
pub fn parse_request(buf: &[u8], limits: &HeadLimits) -> Result<Option<RequestHead>, HeadError> {
    // Empty lines before a request line are tolerated (RFC 9112 §2.2); the caller strips them.
    const STACK_SLOTS: usize = 128;
    // Uninitialised slots: initialising 128 of them (4 KiB) cost more per request than parsing
    // a usual head; the parser writes each slot before anything reads it.
    let mut stack =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_SLOTS];
    let mut heap;
    let slots: &mut [std::mem::MaybeUninit<httparse::Header<'_>>] =
        if limits.max_headers <= STACK_SLOTS {
            &mut stack[..limits.max_headers]
        } else {
            heap = Vec::with_capacity(limits.max_headers);
            heap.resize_with(limits.max_headers, std::mem::MaybeUninit::uninit);
            &mut heap
        };
    let mut request = httparse::Request::new(&mut []);
    let status = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        slots,
    ) {
        Ok(status) => status,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(431, "too many request header fields"))
        }
        Err(httparse::Error::Version) => {
            return Err(refuse(505, "only HTTP/1.0 and HTTP/1.1 are served here"))
        }
        Err(_) => return Err(refuse(400, "malformed request head")),
    };
    let length = match status {
        httparse::Status::Complete(length) => length,
        httparse::Status::Partial => {
            if buf.len() > limits.max_header_bytes {
                return Err(if find_crlf(buf).is_none() {
                    refuse(414, "request line too long")
                } else {
                    refuse(431, "request header too large")
                });
            }
            if find_crlf(buf).is_none() && buf.len() > limits.max_uri_bytes + 32 {
                return Err(refuse(414, "request target too long"));
            }
            return Ok(None);
        }
    };
    if length > limits.max_header_bytes {
        return Err(refuse(431, "request header too large"));
    }
    let target = request.path.unwrap_or("");
    if target.len() > limits.max_uri_bytes {
        return Err(refuse(414, "request target too long"));
    }
    let method = Method::from_bytes(request.method.unwrap_or("").as_bytes())
        .map_err(|_| refuse(400, "invalid method"))?;
    if method == Method::CONNECT {
        return Err(refuse(
            405,
            "CONNECT is not served: this is not a forward proxy",
        ));
    }
    let uri: Uri = target
        .parse()
        .map_err(|_| refuse(400, "invalid request target"))?;
    // Only origin-form (`/path`) and absolute-form (`http://host/path`) name a resource here;
    // `*` is OPTIONS's asterisk-form.
    let asterisk = target == "*" && method == Method::OPTIONS;
    if !asterisk && !target.starts_with('/') && uri.scheme().is_none() {
        return Err(refuse(400, "invalid request target"));
    }
    let version = if request.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Room for the headers a proxy adds on the way upstream (X-Forwarded-For/-Proto,
    // X-Request-Id, traceparent), so adding them does not grow and rehash the map per request.
    let mut headers = HeaderMap::with_capacity(request.headers.len() + FORWARDING_HEADROOM);
    let mut host_count = 0;
    let mut host_valid = true;
    // Framing and host facts are gathered as the map is built, not looked up in it afterwards.
    let mut length_field = ContentLength::default();
    let mut transfer_encoding = false;
    let mut expect_continue = false;
    let (mut close, mut keep) = (false, false);
    for field in request.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| refuse(400, "invalid header name"))?;
        // `HeaderValue` refuses NUL, CR, LF and other controls: none may reach an upstream.
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| refuse(400, "invalid header value"))?;
        if name == header::HOST {
            host_count += 1;
            host_valid &= valid_host(field.value);
        } else if name == header::CONTENT_LENGTH {
            length_field.add(field.value);
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            check_transfer_coding(&value, version)?;
            continue;
        } else if name == header::EXPECT {
            if !value.as_bytes().eq_ignore_ascii_case(b"100-continue") {
                return Err(refuse(417, "only Expect: 100-continue is understood"));
            }
            expect_continue = version == Version::HTTP_11;
            continue;
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        headers.append(name, value);
    }
    if host_count > 1 {
        return Err(refuse(400, "more than one Host header"));
    }
    if let Some(authority) = uri.authority() {
        // Absolute form: the target's authority is the host and any Host field is replaced
        // (RFC 9112 §3.2.2), so routing and the upstream see one and the same host.
        let value = HeaderValue::from_str(authority.as_str())
            .map_err(|_| refuse(400, "invalid request target"))?;
        host_valid = valid_host(value.as_bytes());
        headers.insert(header::HOST, value);
    } else if host_count == 0 && version == Version::HTTP_11 {
        return Err(refuse(400, "HTTP/1.1 request without Host"));
    }
    if !host_valid {
        return Err(refuse(400, "invalid Host"));
    }
    let length_field = length_field.value().map_err(|m| refuse(400, m))?;
    let framing = if transfer_encoding {
        if length_field.is_some() {
            // Both: exactly the ambiguity smuggling is made of; refuse rather than pick one.
            return Err(refuse(
                400,
                "both Content-Length and Transfer-Encoding in one request",
            ));
        }
        Framing::CHUNKED
    } else {
        match length_field {
            Some(0) | None => Framing::Done,
            Some(n) => Framing::Length(n),
        }
    };
    if expect_continue && framing == Framing::Done {
        expect_continue = false;
    }
    let keep_alive = match version {
        Version::HTTP_10 => keep && !close,
        _ => !close,
    };
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
        length,
    }))
}

/// `Transfer-Encoding` of a request: HTTP/1.0 has none (RFC 9112 §6.1: faulty framing), and the
/// edge decodes only `chunked`, which must come last; any other coding is not implemented.
fn check_transfer_coding(value: &HeaderValue, version: Version) -> Result<(), HeadError> {
    if version == Version::HTTP_10 {
        return Err(refuse(400, "Transfer-Encoding in an HTTP/1.0 request"));
    }
    let mut codings = value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (Some(only), None) if only.eq_ignore_ascii_case(b"chunked") => Ok(()),
        (None, _) => Err(refuse(400, "empty Transfer-Encoding")),
        _ => Err(refuse(
            501,
            "only Transfer-Encoding: chunked is implemented",
        )),
    }
}

/// `uri-host [ ":" port ]` with nothing a URL parser could read differently (no userinfo, path,
/// blanks or controls).
fn valid_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host.len() <= 255 + 6
        && host.iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
}

/// A request's status line and fields would be written for `version` with this `Connection`
/// decision; HTTP/1.0 clients need `keep-alive` said explicitly.
pub fn connection_header(version: Version, keep_alive: bool) -> Option<&'static [u8]> {
    match (version, keep_alive) {
        (_, false) => Some(b"connection: close\r\n"),
        (Version::HTTP_10, true) => Some(b"connection: keep-alive\r\n"),
        _ => None,
    }
}

/// Appends an HTTP/1.1 response head. `chunked` adds `Transfer-Encoding: chunked` (the caller
/// decided the body has no length); hop-by-hop fields were removed by the pipeline.
pub fn encode_response_head(
    out: &mut Vec<u8>,
    status: u16,
    headers: &HeaderMap,
    connection: Option<&[u8]>,
    chunked: bool,
) {
    encode_response_head_with(out, status, headers, &[], connection, chunked);
}

/// [`encode_response_head`] with `edge` fields after the map's, each replacing the map's fields
/// of its name.
pub fn encode_response_head_with(
    out: &mut Vec<u8>,
    status: u16,
    headers: &HeaderMap,
    edge: &[(&HeaderName, &HeaderValue)],
    connection: Option<&[u8]>,
    chunked: bool,
) {
    push_status_line(out, status);
    for (name, value) in headers {
        if !edge.iter().any(|&(replaced, _)| replaced == name) {
            push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    for &(name, value) in edge {
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    push_head_end(out, connection);
}

/// Appends `headers` as HTTP/1.1 header lines (`name: value\r\n` each, in the map's order), all
/// but those named in `skip`: what a stored response's head is prepared from once.
pub fn encode_header_lines(out: &mut Vec<u8>, headers: &HeaderMap, skip: &[HeaderName]) {
    for (name, value) in headers {
        if !skip.contains(name) {
            push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Appends an HTTP/1.1 response head made of prepared header `lines` (see
/// [`encode_header_lines`]), then each `extra` field, `Content-Length` and the connection line.
pub fn encode_prepared_response_head(
    out: &mut Vec<u8>,
    status: u16,
    lines: &[u8],
    extra: &[(&[u8], &[u8])],
    content_length: u64,
    connection: Option<&[u8]>,
) {
    push_status_line(out, status);
    out.extend_from_slice(lines);
    for (name, value) in extra {
        push_field(out, name, value);
    }
    let mut digits = [0u8; 20];
    push_field(out, b"content-length", decimal(content_length, &mut digits));
    push_head_end(out, connection);
}

/// `n` in decimal, written into `digits` without formatting machinery or an allocation.
pub fn decimal(n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &digits[at..]
}

/// One `name: value` line of a head.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The connection line, if any, and the empty line that ends a head.
fn push_head_end(out: &mut Vec<u8>, connection: Option<&[u8]>) {
    if let Some(line) = connection {
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b"\r\n");
}

fn push_status_line(out: &mut Vec<u8>, status: u16) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let code = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(code.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Whether a response to `method` with `status` carries a body (RFC 9110 §6.4.1).
pub fn response_has_body(method: &Method, status: u16) -> bool {
    !(method == Method::HEAD || matches!(status, 100..=199 | 204 | 304))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_header_bytes: 4096,
        max_headers: 16,
        max_uri_bytes: 1024,
    };

    fn parse(raw: &str) -> Result<RequestHead, HeadError> {
        parse_request(raw.as_bytes(), &LIMITS).map(|h| h.expect("complete head"))
    }

    fn status(raw: &str) -> u16 {
        match parse(raw) {
            Ok(_) => 200,
            Err(e) => e.status,
        }
    }

    fn drain(mut framing: Framing, input: &[u8]) -> Result<(Vec<u8>, Framing), &'static str> {
        let mut buf = BytesMut::from(input);
        let mut body = Vec::new();
        while let Some(piece) = decode(&mut framing, &mut buf, 1024)? {
            body.extend_from_slice(&piece);
        }
        Ok((body, framing))
    }

    #[test]
    fn framing_comes_from_one_unambiguous_field() {
        let head = parse("POST /a HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\n")
            .expect("accepted");
        assert_eq!(head.framing, Framing::Length(5));
        let head = parse("POST /a HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .expect("accepted");
        assert_eq!(head.framing, Framing::CHUNKED);
        assert!(!head.headers.contains_key(header::TRANSFER_ENCODING));
        // RFC 9112 §6.3: CL + TE, conflicting CLs and TE other than a final chunked are refused.
        for (raw, want) in [
            ("Content-Length: 5\r\nTransfer-Encoding: chunked", 400),
            ("Content-Length: 5\r\nContent-Length: 6", 400),
            ("Content-Length: 5, 6", 400),
            ("Content-Length: +5", 400),
            ("Content-Length: 0x5", 400),
            ("Transfer-Encoding: gzip, chunked", 501),
            ("Transfer-Encoding: chunked, gzip", 501),
            ("Transfer-Encoding: identity", 501),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                200,
            ),
            ("Content-Length: 5\r\nContent-Length: 5", 200),
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a.test\r\n{raw}\r\n\r\n");
            assert_eq!(status(&raw), want, "{raw:?}");
        }
        assert_eq!(
            status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400,
            "RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0"
        );
    }

    #[test]
    fn heads_that_could_be_read_two_ways_are_refused() {
        for (raw, want) in [
            ("GET / HTTP/1.1\r\n\r\n", 400), // no Host (RFC 9112 §3.2)
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400), // two Hosts
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400), // obs-fold (§5.2)
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", 400), // NUL
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400), // bare CR
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400), // space before colon
            ("GET / HTTP/1.1\r\nHost: a/b@c\r\n\r\n", 400), // not a host
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("GET x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 405),
            ("GET / HTTP/1.1\r\nHost: a\r\nExpect: fancy\r\n\r\n", 417),
            ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 200),
            ("GET / HTTP/1.0\r\n\r\n", 200),
        ] {
            assert_eq!(status(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn absolute_form_names_the_host() {
        let head =
            parse("GET http://b.test/x?y HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("accepted");
        assert_eq!(head.headers[header::HOST], "b.test");
        assert_eq!(head.uri.path(), "/x");
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let cases = [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", true),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                false,
            ),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
        ];
        for (raw, keep) in cases {
            assert_eq!(parse(raw).expect("accepted").keep_alive, keep, "{raw:?}");
        }
        let head = parse(
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        )
        .expect("accepted");
        assert!(head.expect_continue);
        assert!(!head.headers.contains_key(header::EXPECT));
    }

    #[test]
    fn limits_apply_while_the_head_arrives() {
        let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(5000));
        let err = parse_request(&long_line.as_bytes()[..4200], &LIMITS).expect_err("refused");
        assert_eq!(err.status, 414);
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}", "b".repeat(5000));
        assert_eq!(
            parse_request(big.as_bytes(), &LIMITS)
                .expect_err("refused")
                .status,
            431
        );
        let many: String = (0..20).map(|i| format!("X-{i}: 1\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(status(&raw), 431);
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n", &LIMITS)
            .expect("accepted")
            .is_none());
    }

    #[test]
    fn chunk_size_lines_are_lower_case_hex() {
        for (len, want) in [
            (0, "0\r\n"),
            (5, "5\r\n"),
            (255, "ff\r\n"),
            (65536, "10000\r\n"),
        ] {
            let (line, n) = chunk_size_line(len);
            assert_eq!(&line[..n], want.as_bytes());
        }
        let (line, n) = chunk_size_line(usize::MAX);
        assert_eq!(&line[..n], b"ffffffffffffffff\r\n");
    }

    #[test]
    fn chunked_bodies_decode_strictly() {
        let (body, end) =
            drain(Framing::CHUNKED, b"5;ext=1\r\nhello\r\n0\r\nT: v\r\n\r\n").expect("accepted");
        assert_eq!(body, b"hello");
        assert_eq!(end, Framing::Done);
        for bad in [
            &b"+5\r\nhello\r\n0\r\n\r\n"[..],
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
        ] {
            assert!(drain(Framing::CHUNKED, bad).is_err(), "{bad:?}");
        }
        let (body, end) = drain(Framing::Length(3), b"abcdef").expect("accepted");
        assert_eq!((body.as_slice(), end), (&b"abc"[..], Framing::Done));
    }

    #[test]
    fn response_heads_say_connection_and_chunking() {
        let mut out = Vec::new();
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        encode_response_head(
            &mut out,
            200,
            &headers,
            connection_header(Version::HTTP_10, true),
            true,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
        );
        assert!(!response_has_body(&Method::HEAD, 200));
        assert!(!response_has_body(&Method::GET, 304));
    }
}
