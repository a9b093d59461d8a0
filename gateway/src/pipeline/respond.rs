//! Everything the pipeline writes to the client, in one place: the edge's own answers (JSON errors,
//! OpenAI-style errors, `/v1/models`), cached responses, and relayed upstream responses with the
//! edge's headers (`x-meridian-region`, `x-meridian-pop`, `x-meridian-cache`, `alt-svc`).

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::downstream::{Arrival, Downstream, Head};
use super::forward::{HEADER_POP, HEADER_POP_STR, HEADER_REGION};
use super::{EdgeCache, Relayed, RequestState};
use crate::cache::PreparedHead;
use crate::cache::{
    Admission, CacheStatus, CacheWriter, RangeFill, Served, Ticket, HEADER_CACHE, HEADER_CACHE_NAME,
};
use crate::connector::UpstreamResponse;
use crate::core::exchange::{cache_on_response, CacheOnResponse, EdgeReply};
use crate::core::snapshot::InflightGuard;
use crate::inference::openai::ApiError;
use crate::reload::Loaded;

/// The client side of one request.
pub(super) struct Writer<'a, D> {
    downstream: &'a mut D,
    head: Head<'a>,
    loaded: &'a Loaded,
    /// `alt-svc` to add (TLS over TCP with HTTP/3 on).
    alt_svc: Option<&'a HeaderValue>,
    bytes_sent: u64,
    cache: Option<CacheStatus>,
}

impl<'a, D: Downstream> Writer<'a, D> {
    pub(super) fn new(
        downstream: &'a mut D,
        head: Head<'a>,
        loaded: &'a Loaded,
        arrival: Arrival,
        alt_svc: Option<&'a HeaderValue>,
    ) -> Self {
        let over_tcp_tls = arrival.tls && arrival.protocol != crate::metrics::Protocol::H3;
        Self {
            downstream,
            head,
            loaded,
            alt_svc: alt_svc.filter(|_| over_tcp_tls),
            bytes_sent: 0,
            cache: None,
        }
    }

    pub(super) fn head(&self) -> Head<'a> {
        self.head
    }

    pub(super) fn downstream(&mut self) -> &mut D {
        self.downstream
    }

    pub(super) fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// What the cache did, when the response came from it.
    pub(super) fn cache_status(&self) -> Option<CacheStatus> {
        self.cache
    }

    /// The edge's own answer: `{"error", "status", "pop"}`.
    pub(super) async fn reply(&mut self, reply: &EdgeReply) -> Result<u16, u16> {
        let snapshot = &self.loaded.snapshot;
        let mut headers = HeaderMap::new();
        if reply.retry_after {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(region) = reply.region.and_then(|r| snapshot.regions.get(r)) {
            headers.insert(HEADER_REGION, region.header.clone());
        }
        if reply.closes_connection() {
            // Do not keep reading a request we refused.
            self.downstream.close_after();
        }
        self.send_json(reply.status, headers, reply.body(&snapshot.pop))
            .await
    }

    /// An OpenAI-style error of an inference route.
    pub(super) async fn api_error(&mut self, error: &ApiError) -> Result<u16, u16> {
        let mut headers = HeaderMap::new();
        if let Some(seconds) = error.retry_after {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(error.status, 400 | 408 | 413) {
            // A body we did not (fully) read must not be parsed as the next request.
            self.downstream.close_after();
        }
        self.send_json(error.status, headers, error.body()).await
    }

    /// A `200` JSON answer written by the edge (`GET /v1/models`).
    pub(super) async fn json(&mut self, status: u16, body: Bytes) -> Result<u16, u16> {
        self.send_json(status, HeaderMap::new(), body).await
    }

    async fn send_json(
        &mut self,
        status: u16,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<u16, u16> {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        self.send(status, headers, std::slice::from_ref(&body))
            .await
    }

    /// A response from the cache: the stored headers (with `Age`, `x-meridian-cache` and the
    /// `x-meridian-region` that produced it), this edge's pop, the body length.
    pub(super) async fn served(&mut self, served: &Served) -> Result<u16, u16> {
        self.cache = Some(served.status);
        if let Some(lines) = self.prepared_lines(served) {
            return self.send_prepared(served, lines).await;
        }
        let mut headers = served.headers();
        if let Some(length) = served.content_length() {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        self.send(served.status_code(), headers, served.body())
            .await
    }

    /// A hit's stored header lines, ready to write, when the driver writes prepared heads and the
    /// answer is the stored response as it is. Made on the entry's first such hit and kept with
    /// it (the route's hidden fields left out); `None` (for good) when the stored fields include
    /// one a hit may have to change beyond the per-hit ones: `alt-svc` (the edge sets its own), a
    /// framing field, or no `Date`.
    fn prepared_lines<'s>(&self, served: &'s Served) -> Option<&'s [u8]> {
        if !self.downstream.writes_prepared_heads() || !served.is_whole_stored_response() {
            return None;
        }
        let prepared = served.entry.prepared_h1.get_or_init(|| {
            let stored = &served.entry.headers;
            let changed = [
                http::header::ALT_SVC,
                http::header::TRANSFER_ENCODING,
                http::header::CONNECTION,
            ];
            if !stored.contains_key(http::header::DATE)
                || changed.iter().any(|name| stored.contains_key(name))
            {
                return None;
            }
            let mut lines = Vec::with_capacity(64 * stored.len());
            // Written per hit instead (`send_prepared`), or never.
            let mut left_out = vec![
                http::header::AGE,
                HEADER_CACHE_NAME,
                http::header::CONTENT_LENGTH,
                HEADER_POP,
            ];
            left_out.extend_from_slice(served.hidden());
            crate::core::http1::encode_header_lines(&mut lines, stored, &left_out);
            Some(PreparedHead {
                hidden: served.hidden().to_vec(),
                lines: lines.into_boxed_slice(),
            })
        });
        prepared
            .as_ref()
            .filter(|p| p.hidden == served.hidden())
            .map(|p| &*p.lines)
    }

    /// A hit from prepared header `lines`: the same head `served` builds from a header map (the
    /// stored fields, `Age`, `x-meridian-cache`, this edge's pop and `alt-svc`, the length),
    /// without building one.
    async fn send_prepared(&mut self, served: &Served, lines: &[u8]) -> Result<u16, u16> {
        let status = served.status_code();
        let body = served.body();
        let mut digits = [0u8; 20];
        let age = crate::core::http1::decimal(served.age.as_secs(), &mut digits);
        let cache = served.status.header_value();
        let pop = &self.loaded.snapshot.pop_header;
        let alt_svc = self.alt_svc.map_or(&[][..], HeaderValue::as_bytes);
        let extra: [(&[u8], &[u8]); 4] = [
            (b"age", age),
            (HEADER_CACHE.as_bytes(), cache.as_bytes()),
            (HEADER_POP_STR.as_bytes(), pop.as_bytes()),
            (b"alt-svc", alt_svc),
        ];
        // `alt-svc` only when this front advertises HTTP/3.
        let fields = if self.alt_svc.is_some() { 4 } else { 3 };
        let length = served.content_length().unwrap_or(0);
        if self
            .downstream
            .send_prepared_head(status, lines, &extra[..fields], length, body.is_empty())
            .await
            .is_err()
        {
            return Err(0);
        }
        self.send_body_chunks(status, body).await
    }

    /// Writes a whole response: head with the edge's headers, then `body`.
    async fn send(&mut self, status: u16, headers: HeaderMap, body: &[Bytes]) -> Result<u16, u16> {
        let headers = self.edge_headers(headers);
        if self
            .downstream
            .send_head(status, headers, body.is_empty())
            .await
            .is_err()
        {
            return Err(0);
        }
        self.send_body_chunks(status, body).await
    }

    /// Writes `body` after its head, counting what was sent.
    async fn send_body_chunks(&mut self, status: u16, body: &[Bytes]) -> Result<u16, u16> {
        for (i, chunk) in body.iter().enumerate() {
            self.bytes_sent += chunk.len() as u64;
            if self
                .downstream
                .send_body(chunk.clone(), i + 1 == body.len())
                .await
                .is_err()
            {
                return Err(0);
            }
        }
        Ok(status)
    }

    /// Whether the driver can pass a protocol switch (`Upgrade`) on to the client.
    pub(super) fn can_upgrade(&self) -> bool {
        self.downstream.can_upgrade()
    }

    /// The upstream agreed to switch protocols: its `101` goes to the client and the two
    /// connections are joined until either is done. A `101` nobody asked for is a broken upstream.
    async fn switch_protocols(
        &mut self,
        mut response: Box<UpstreamResponse>,
        state: &RequestState,
    ) -> Result<u16, u16> {
        let Some(protocol) = state.upgrade.clone() else {
            return Err(502);
        };
        let mut headers = response.take_headers();
        crate::core::headers::strip_hop_by_hop(&mut headers);
        // The driver writes its own `Connection: upgrade` on the client's hop.
        headers.insert(http::header::UPGRADE, protocol);
        let headers = self.edge_headers(headers);
        let idle = state
            .route
            .and_then(|r| self.loaded.snapshot.routes.get(r))
            .map_or(std::time::Duration::from_secs(60), |route| {
                crate::connector::Timeouts::of(route).read
            });
        let Some(upstream) = response.into_upgraded() else {
            return Err(502);
        };
        match self.downstream.tunnel(headers, upstream, idle).await {
            Ok(sent) => {
                self.bytes_sent += sent;
                Ok(101)
            }
            Err(_) => Err(0),
        }
    }

    /// Relays an origin's `103 Early Hints` (hop-by-hop fields dropped); never stored. A client
    /// that is gone shows up at the final head.
    pub(super) async fn interim(&mut self, hint: http::response::Parts) {
        let headers = crate::core::headers::forwardable(&hint.headers);
        let _ = self
            .downstream
            .send_interim(hint.status.as_u16(), headers)
            .await;
    }

    /// This edge's per-client headers: `x-meridian-pop`, and `alt-svc` for TLS clients over TCP.
    fn edge_headers(&self, mut headers: HeaderMap) -> HeaderMap {
        headers.insert(HEADER_POP, self.loaded.snapshot.pop_header.clone());
        if let Some(alt_svc) = self.alt_svc {
            headers.insert(http::header::ALT_SVC, alt_svc.clone());
        }
        headers
    }

    /// Streams the upstream response to the client with the edge's headers, storing it in the
    /// cache as it goes when the cache admits it, and feeding inference usage chunk by chunk.
    pub(super) async fn relay(
        &mut self,
        edge_cache: Option<&EdgeCache>,
        ticket: Option<Box<Ticket>>,
        relayed: Relayed,
        state: &mut RequestState,
    ) -> Result<u16, u16> {
        let Relayed {
            mut response,
            _inflight,
        } = relayed;
        let snapshot = &self.loaded.snapshot;
        let status = response.status().as_u16();
        if status == 101 {
            // Boxed: rare, and the relay's future (part of every request's) would otherwise be
            // as big as the tunnel's.
            return Box::pin(self.switch_protocols(response, state)).await;
        }
        let region = state
            .region()
            .and_then(|r| snapshot.regions.get(r))
            .map(|r| &r.header);
        let cache_policy = state.route.and_then(|r| self.loaded.cache_policy(r));
        if ticket.is_none() && cache_policy.is_none() && self.downstream.writes_prepared_heads() {
            // The usual answer: nothing to store, no field to hide, an HTTP/1.1 client. The
            // upstream's lines go out as they are, the edge's fields after them.
            if let Some(head) = response.verbatim() {
                let cache_value = state.cache.map(CacheStatus::header_value);
                let (fields, count) = edge_fields(
                    region,
                    cache_value.as_ref(),
                    &snapshot.pop_header,
                    self.alt_svc,
                );
                let mut extra: [(&[u8], &[u8]); 4] = [(&[], &[]); 4];
                for (slot, (name, value)) in extra.iter_mut().zip(&fields[..count]) {
                    *slot = (name.as_str().as_bytes(), value.as_bytes());
                }
                let end = response.body_is_empty();
                if self
                    .downstream
                    .send_prepared_head(
                        status,
                        head.lines,
                        &extra[..count],
                        head.content_length,
                        end,
                    )
                    .await
                    .is_err()
                {
                    return Err(0);
                }
                return self
                    .relay_body(&mut response, None, end, status, state)
                    .await;
            }
        }
        let mut headers = response.take_headers();
        crate::core::headers::strip_hop_by_hop(&mut headers);
        if let (Some(region), Some(_)) = (region, &ticket) {
            // In the map before admission, so a stored entry remembers its region.
            headers.insert(HEADER_REGION, region.clone());
        }
        let mut writer: Option<Box<CacheWriter>> = None;
        let mut cache_status = state.cache;
        let mut fill = None;
        if let Some(ticket) = ticket {
            fill = ticket.range_fill(status, &headers);
            let now = SystemTime::now();
            let had_stale = ticket.status() == CacheStatus::Expired;
            match cache_on_response(status, had_stale) {
                CacheOnResponse::ServeStale => {
                    if let Some(served) = ticket.stale_on_error(now) {
                        return Box::pin(self.served(&served)).await;
                    }
                    cache_status = Some(CacheStatus::Expired);
                }
                CacheOnResponse::Admit => {
                    if let Some(edge_cache) = edge_cache {
                        // Boxed: only a cacheable miss waits here.
                        let admission =
                            Box::pin(edge_cache.cache().admit(*ticket, status, &headers, now))
                                .await;
                        let result = admission.status();
                        cache_status = Some(if result == CacheStatus::Miss && had_stale {
                            CacheStatus::Expired
                        } else {
                            result
                        });
                        match admission {
                            Admission::Store(w) => writer = Some(w),
                            Admission::Pass(_) => {}
                            Admission::Revalidated(served) => {
                                return Box::pin(self.served(&served)).await
                            }
                        }
                    }
                }
            }
        }
        if let Some(policy) = cache_policy {
            // Fields only this edge obeys (targeted cache control) end here; the stored copy
            // keeps them for its own revalidations.
            for name in &policy.rules().hidden {
                headers.remove(name);
            }
        }
        state.cache = cache_status;
        if let Some(fill) = fill {
            if let Some(cache_status) = cache_status {
                headers.insert(HEADER_CACHE_NAME, cache_status.header_value());
            }
            return Box::pin(self.relay_range(response, _inflight, headers, writer, fill)).await;
        }
        // The edge's own fields go to the driver beside the map, not into it.
        let cache_value = cache_status.map(CacheStatus::header_value);
        let (fields, count) = edge_fields(
            region,
            cache_value.as_ref(),
            &snapshot.pop_header,
            self.alt_svc,
        );
        let end = response.body_is_empty();
        if self
            .downstream
            .send_head_with(status, headers, &fields[..count], end)
            .await
            .is_err()
        {
            return Err(0);
        }
        self.relay_body(&mut response, writer, end, status, state)
            .await
    }

    /// Streams the upstream's body to the client after its head (`end`: the head said there is
    /// none), into the cache through `writer` when it is being stored.
    async fn relay_body(
        &mut self,
        response: &mut UpstreamResponse,
        mut writer: Option<Box<CacheWriter>>,
        end: bool,
        status: u16,
        state: &mut RequestState,
    ) -> Result<u16, u16> {
        loop {
            let chunk = match response.next_chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    if let Some(w) = writer.take().filter(|w| !w.is_abandoned()) {
                        w.finish().await;
                    }
                    if !end && self.downstream.send_body(Bytes::new(), true).await.is_err() {
                        return Err(0);
                    }
                    return Ok(status);
                }
                Err(e) => {
                    // Headers are gone already: all we can do is cut the stream (nothing stored).
                    tracing::debug!("upstream response body: {e}");
                    self.downstream.abort();
                    return Ok(status);
                }
            };
            if let Some(w) = writer.as_mut() {
                w.push(&chunk);
            }
            if let Some(inference) = state.inference.as_deref_mut() {
                inference.on_body(Some(&chunk));
            }
            self.bytes_sent += chunk.len() as u64;
            if self.downstream.send_body(chunk, false).await.is_err() {
                // The client went away: nothing is stored (followers fetch on their own).
                return Err(0);
            }
        }
    }

    /// A range miss being filled: the whole response streams into the cache while the client
    /// gets only its range or ranges (`206`, multipart for several) or a `416`, as soon as their
    /// bytes arrive. Once the client has all it asked for, the rest is read into the cache off
    /// the client's path (so the next request on the connection is not held up); when nothing is
    /// being stored the upstream connection is simply closed.
    async fn relay_range(
        &mut self,
        mut response: Box<UpstreamResponse>,
        inflight: InflightGuard,
        mut headers: HeaderMap,
        mut writer: Option<Box<CacheWriter>>,
        fill: RangeFill,
    ) -> Result<u16, u16> {
        let (status, mut cut) = match fill {
            RangeFill::Parts {
                content_range,
                content_type,
                length,
                cut,
            } => {
                if let Some(v) = content_range {
                    headers.insert(http::header::CONTENT_RANGE, v);
                }
                if let Some(v) = content_type {
                    headers.insert(http::header::CONTENT_TYPE, v);
                }
                headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
                (206, Some(cut))
            }
            RangeFill::Unsatisfiable { len } => {
                // As a 416 from a stored response: the length, and what identifies it.
                let mut only = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    only.insert(http::header::CONTENT_RANGE, v);
                }
                only.insert(http::header::CONTENT_LENGTH, HeaderValue::from(0));
                for name in [
                    http::header::DATE,
                    http::header::ETAG,
                    HEADER_CACHE_NAME,
                    HEADER_REGION,
                ] {
                    if let Some(v) = headers.get(&name) {
                        only.insert(name, v.clone());
                    }
                }
                headers = only;
                (416, None)
            }
        };
        let headers = self.edge_headers(headers);
        if self
            .downstream
            .send_head(status, headers, cut.is_none())
            .await
            .is_err()
        {
            return Err(0);
        }
        let mut pieces = Vec::new();
        loop {
            let Some(client) = cut.as_mut().filter(|c| !c.is_done()) else {
                match writer.filter(|w| !w.is_abandoned()) {
                    Some(writer) => fill_in_background(response, writer, inflight),
                    None => drop(response),
                }
                return Ok(status);
            };
            let chunk = match response.next_chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    // The body ended before the range did (the declared length was wrong): the
                    // client must see an incomplete answer.
                    self.downstream.abort();
                    return Ok(status);
                }
                Err(e) => {
                    tracing::debug!("upstream response body: {e}");
                    self.downstream.abort();
                    return Ok(status);
                }
            };
            if let Some(w) = writer.as_mut() {
                w.push(&chunk);
            }
            client.feed(&chunk, &mut pieces);
            let done = client.is_done();
            let count = pieces.len();
            for (i, piece) in pieces.drain(..).enumerate() {
                self.bytes_sent += piece.len() as u64;
                if self
                    .downstream
                    .send_body(piece, done && i + 1 == count)
                    .await
                    .is_err()
                {
                    // The client went away: nothing is stored, as for any relay.
                    return Err(0);
                }
            }
            if done && count == 0 && self.downstream.send_body(Bytes::new(), true).await.is_err() {
                return Err(0);
            }
        }
    }
}

/// Reads the rest of a response into the cache after its client was answered.
fn fill_in_background(
    mut response: Box<UpstreamResponse>,
    mut writer: Box<CacheWriter>,
    inflight: InflightGuard,
) {
    tokio::spawn(async move {
        // The upstream is still busy with this response until its body ends.
        let _inflight = inflight;
        loop {
            match response.next_chunk().await {
                Ok(Some(chunk)) => {
                    writer.push(&chunk);
                    if writer.is_abandoned() {
                        return;
                    }
                }
                Ok(None) => {
                    writer.finish().await;
                    return;
                }
                Err(e) => {
                    tracing::debug!("range fill body: {e}");
                    return;
                }
            }
        }
    });
}

/// The edge's own response fields for an answer, in the order they are written:
/// `x-meridian-region`, `x-meridian-cache`, `x-meridian-pop`, `alt-svc` (each when it applies); the
/// first `count` of the array.
fn edge_fields<'v>(
    region: Option<&'v HeaderValue>,
    cache: Option<&'v HeaderValue>,
    pop: &'v HeaderValue,
    alt_svc: Option<&'v HeaderValue>,
) -> ([(&'static HeaderName, &'v HeaderValue); 4], usize) {
    const NAMES: &[HeaderName; 4] = &super::forward::EDGE_RESPONSE_FIELDS;
    let edge = [
        region.map(|value| (&NAMES[0], value)),
        cache.map(|value| (&NAMES[1], value)),
        Some((&NAMES[2], pop)),
        alt_svc.map(|value| (&NAMES[3], value)),
    ];
    let mut fields = [(&NAMES[2], pop); 4];
    let mut count = 0;
    for field in edge.into_iter().flatten() {
        fields[count] = field;
        count += 1;
    }
    (fields, count)
}
