//! A connection that switched protocols (`101`, a WebSocket for instance): from then on the edge
//! only relays bytes both ways, as they come, until both sides are done or neither sent anything
//! for the idle time. The relay's buffers live as long as the tunnel, never in an idle HTTP
//! connection.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::connector::Upgraded;

/// One read per direction per wake-up.
const TUNNEL_READ: usize = 16 * 1024;

/// Relays between `client` and `upstream`; `client_early` (bytes the client sent right behind its
/// request head) goes to the upstream first, and what the upstream sent behind its `101` to the
/// client. Returns the bytes written to the client.
pub async fn relay<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    client_early: Bytes,
    upstream: Upgraded,
    idle: Duration,
) -> u64 {
    let Upgraded {
        mut stream,
        buffered,
    } = upstream;
    let mut to_client = 0u64;
    if !client_early.is_empty() && !write(&mut stream, &client_early, idle).await {
        return 0;
    }
    if !buffered.is_empty() {
        if !write(client, &buffered, idle).await {
            return 0;
        }
        to_client += buffered.len() as u64;
    }
    drop(buffered);
    let mut from_client = vec![0u8; TUNNEL_READ];
    let mut from_upstream = vec![0u8; TUNNEL_READ];
    let (mut upstream_read, mut upstream_write) = stream.split();
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut client_open, mut upstream_open) = (true, true);
    while client_open || upstream_open {
        let quiet_until = Instant::now() + idle;
        tokio::select! {
            read = client_read.read(&mut from_client), if client_open => match read {
                Ok(n) if n > 0 => {
                    if !write(&mut upstream_write, &from_client[..n], idle).await {
                        break;
                    }
                }
                _ => {
                    // The client is done sending: the upstream sees the end, and may still answer.
                    client_open = false;
                    let _ = upstream_write.shutdown().await;
                }
            },
            read = upstream_read.read(&mut from_upstream), if upstream_open => match read {
                Ok(n) if n > 0 => {
                    if !write(&mut client_write, &from_upstream[..n], idle).await {
                        break;
                    }
                    to_client += n as u64;
                }
                _ => {
                    upstream_open = false;
                    let _ = client_write.shutdown().await;
                }
            },
            () = tokio::time::sleep_until(quiet_until) => break,
        }
    }
    to_client
}

/// Writes all of `bytes` unless the peer stops reading for `limit`.
async fn write<W: AsyncWrite + Unpin>(to: &mut W, bytes: &[u8], limit: Duration) -> bool {
    matches!(
        crate::coarse_timer::timeout(limit, to.write_all(bytes)).await,
        Ok(Ok(()))
    )
}
