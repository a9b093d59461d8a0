//! The request body on its way upstream. Bodies up to [`REPLAY_BYTES`] are read whole, so a failed
//! try can be replayed on another upstream; longer ones stream to the upstream as the client sends
//! them, and can be replayed only until a streamed chunk went out.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::downstream::Downstream;
use crate::connector::{BodyFeed, UpstreamBody};

/// Request bodies up to this size are held whole for replay.
pub const REPLAY_BYTES: u64 = 64 * 1024;

/// Why the client's body could not be (fully) read. Never the upstream's fault: it is not counted
/// against any upstream, and the client gets the matching 4xx.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// More than the limit (`413`).
    TooLarge,
    /// No progress within the route's read timeout (`408`).
    Timeout,
    /// The client reset or sent a malformed body (`400`).
    Client,
}

impl BodyError {
    pub fn status(self) -> u16 {
        match self {
            BodyError::TooLarge => 413,
            BodyError::Timeout => 408,
            BodyError::Client => 400,
        }
    }

    fn code(self) -> u8 {
        match self {
            BodyError::TooLarge => 1,
            BodyError::Timeout => 2,
            BodyError::Client => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(BodyError::TooLarge),
            2 => Some(BodyError::Timeout),
            3 => Some(BodyError::Client),
            _ => None,
        }
    }
}

/// The request body as the upstream tries send it.
pub enum RequestBody {
    /// Read whole: every try sends the same bytes.
    Whole(Bytes),
    /// The first bytes, then the rest as the client sends it.
    Streamed {
        head: Bytes,
        feed: Arc<BodyFeed>,
        /// Why the client side stopped, once it did (a [`BodyError`] code, 0 while fine).
        client_error: Arc<AtomicU8>,
    },
}

impl RequestBody {
    /// The body for the next try; `None` once a streamed body cannot be sent again.
    pub fn for_try(&self) -> Option<UpstreamBody> {
        match self {
            RequestBody::Whole(bytes) => Some(UpstreamBody::full(bytes.clone())),
            RequestBody::Streamed { head, feed, .. } => {
                (!feed.is_consumed()).then(|| UpstreamBody::streamed(head.clone(), feed))
            }
        }
    }

    pub fn replayable(&self) -> bool {
        match self {
            RequestBody::Whole(_) => true,
            RequestBody::Streamed { feed, .. } => !feed.is_consumed(),
        }
    }

    /// A streamed body failed on the client's side (reset, stalled, too large).
    pub fn client_error(&self) -> Option<BodyError> {
        match self {
            RequestBody::Streamed {
                feed, client_error, ..
            } if feed.client_failed() => BodyError::from_code(client_error.load(Ordering::Acquire))
                .or(Some(BodyError::Client)),
            _ => None,
        }
    }
}

/// The next body chunk within `read_timeout`.
async fn next_chunk<D: Downstream>(
    downstream: &mut D,
    read_timeout: Duration,
) -> Result<Option<Bytes>, BodyError> {
    match crate::coarse_timer::timeout(read_timeout, downstream.read_body()).await {
        Ok(Ok(chunk)) => Ok(chunk),
        Ok(Err(e)) => {
            tracing::debug!("request body: {e}");
            Err(BodyError::Client)
        }
        Err(_) => {
            tracing::debug!("request body: no data within {read_timeout:?}");
            Err(BodyError::Timeout)
        }
    }
}

/// Reads the body until it ends (`(body, false)`) or passes `keep` bytes (`(head, true)`: more
/// follows); at most `limit` bytes in all.
pub async fn read_head<D: Downstream>(
    downstream: &mut D,
    keep: u64,
    limit: u64,
    read_timeout: Duration,
) -> Result<(Bytes, bool), BodyError> {
    let mut body = Gathered::default();
    loop {
        if body.len() as u64 > keep {
            return Ok((body.into_bytes(), true));
        }
        match next_chunk(downstream, read_timeout).await? {
            Some(chunk) => {
                if (body.len() + chunk.len()) as u64 > limit {
                    return Err(BodyError::TooLarge);
                }
                body.push(chunk);
            }
            None => return Ok((body.into_bytes(), false)),
        }
    }
}

/// A body gathered chunk by chunk. The first chunk is kept as it is: a body that arrives as one
/// chunk (the usual small body, which the HTTP/1.1 front reads whole) is never copied. Later
/// chunks are joined to it, the buffer growing as bytes arrive, never by a declared length: a
/// client announcing 16 MiB and sending two bytes must not make the edge hold 16 MiB.
#[derive(Default)]
struct Gathered {
    first: Option<Bytes>,
    rest: BytesMut,
}

impl Gathered {
    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.rest.len()
    }

    fn push(&mut self, chunk: Bytes) {
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(chunk),
            None => self.rest.extend_from_slice(&chunk),
            Some(previous) => {
                self.rest.reserve(previous.len() + chunk.len());
                self.rest.extend_from_slice(&previous);
                self.rest.extend_from_slice(&chunk);
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        self.first.unwrap_or_else(|| self.rest.freeze())
    }
}

/// The whole body of a model call, at most `limit` bytes, each chunk shown to `inspect` as it
/// arrives (the streaming scan that finds the model): the body, or `inspect`'s verdict as soon as
/// it refuses (the rest is not read). Held whole, so a fallback can send it again.
pub async fn read_inspected<D: Downstream, E>(
    downstream: &mut D,
    limit: u64,
    read_timeout: Duration,
    mut inspect: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<Result<Bytes, E>, BodyError> {
    let mut body = Gathered::default();
    while let Some(chunk) = next_chunk(downstream, read_timeout).await? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::TooLarge);
        }
        if let Err(refused) = inspect(&chunk) {
            return Ok(Err(refused));
        }
        body.push(chunk);
    }
    Ok(Ok(body.into_bytes()))
}

/// Starts streaming: the body for the tries, and the pump that feeds it.
pub fn stream(head: Bytes) -> (RequestBody, Pump) {
    let (feed, tx) = BodyFeed::channel();
    let client_error = Arc::new(AtomicU8::new(0));
    let read = head.len() as u64;
    let body = RequestBody::Streamed {
        head,
        feed,
        client_error: Arc::clone(&client_error),
    };
    (
        body,
        Pump {
            tx,
            read,
            client_error,
        },
    )
}

/// Feeds the rest of a streamed body into the upstream tries.
pub struct Pump {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    read: u64,
    client_error: Arc<AtomicU8>,
}

impl Pump {
    /// Forwards the client's chunks as they arrive; more than `limit` bytes in all, a reset or a
    /// stall ends the upstream body with an error (and records why).
    pub async fn run<D: Downstream>(
        mut self,
        downstream: &mut D,
        limit: u64,
        read_timeout: Duration,
    ) {
        loop {
            let failure = match next_chunk(downstream, read_timeout).await {
                Ok(Some(chunk)) => {
                    self.read += chunk.len() as u64;
                    if self.read > limit {
                        BodyError::TooLarge
                    } else {
                        if self.tx.send(Ok(chunk)).await.is_err() {
                            return; // the try ended; nobody reads the body any more
                        }
                        continue;
                    }
                }
                Ok(None) => return, // dropping `tx` ends the upstream body
                Err(e) => e,
            };
            self.client_error.store(failure.code(), Ordering::Release);
            let message = match failure {
                BodyError::TooLarge => "request body exceeds max_body_bytes",
                BodyError::Timeout => "client request body stalled",
                BodyError::Client => "client request body broke off",
            };
            let _ = self.tx.send(Err(std::io::Error::other(message))).await;
            return;
        }
    }
}
