//! UDP workers: each owns one `SO_REUSEPORT` socket (the kernel spreads clients over them) and one
//! OS thread that receives a batch of queries with one `recvmmsg`, answers them into one buffer and
//! sends every answer with one `sendmmsg`. Threads rather than tasks: a worker never waits on
//! anything but its socket, and a blocking batch call costs less than a readiness round trip
//! through the runtime per wake-up.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use socket2::{Domain, Protocol, Socket, Type};

use super::answer::Transport;
use super::rrl::{self, Verdict};
use super::server::{Scratch, Shared};

/// Queries taken per `recvmmsg`.
const BATCH: usize = 32;
/// Receive slot per query. A longer datagram is cut here, and the cut message is answered FORMERR
/// (no DNS query is anywhere near this long).
const SLOT: usize = 4096;
/// How often an idle worker looks at its stop flag.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// Binds one UDP socket for a worker: `SO_REUSEPORT`, so every worker binds the same address.
pub(super) fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    // Blocking with a timeout: the worker sleeps in the kernel and still notices a stop.
    socket.set_read_timeout(Some(IDLE_CHECK))?;
    socket.set_write_timeout(Some(Duration::from_secs(1)))?;
    Ok(socket.into())
}

/// Starts a worker thread on `socket`. It ends when `stop` turns true or the server is gone.
pub(super) fn spawn(
    index: usize,
    socket: UdpSocket,
    shared: Weak<Shared>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("meridian-dns-udp-{index}"))
        .spawn(move || run(&socket, &shared, &stop))
        .map(|_| ())
}

fn run(socket: &UdpSocket, shared: &Weak<Shared>, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let Ok(mut slots) =
        Box::<[[u8; SLOT]; BATCH]>::try_from(vec![[0u8; SLOT]; BATCH].into_boxed_slice())
    else {
        return;
    };
    let mut receive = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut send = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut lengths = [0usize; BATCH];
    let mut peers: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
    let mut ends = [0usize; BATCH];
    let mut destinations: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
    let mut out = Vec::with_capacity(BATCH * 512);
    let mut scratch = Scratch::default();
    while !stop.load(Ordering::Relaxed) {
        let received = {
            let mut buffers = slots.each_mut().map(|slot| [IoSliceMut::new(slot)]);
            match recvmmsg(
                fd,
                &mut receive,
                buffers.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(messages) => {
                    let mut count = 0;
                    for (i, message) in messages.enumerate().take(BATCH) {
                        lengths[i] = message.bytes.min(SLOT);
                        peers[i] = message.address;
                        count = i + 1;
                    }
                    count
                }
                Err(Errno::EAGAIN | Errno::EINTR) => 0,
                Err(e) => {
                    tracing::debug!("dns udp receive: {e}");
                    0
                }
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if received == 0 {
            continue;
        }
        let serving = shared.serving.load();
        // One clock read for the whole batch: RRL, the caches and the duration histogram all use it.
        let now = Instant::now();
        scratch.begin(&serving, now);
        out.clear();
        let mut answers = 0;
        for i in 0..received {
            let Some(peer) = peers[i].as_ref().and_then(peer_addr) else {
                continue;
            };
            let request = &slots[i][..lengths[i]];
            let start = out.len();
            if !shared.respond(
                &serving,
                &mut scratch,
                request,
                peer.ip(),
                Transport::Udp,
                &mut out,
                now,
            ) {
                continue;
            }
            if serving.rrl.enabled() {
                match serving.rrl.check(peer.ip(), &out[start..], now) {
                    Verdict::Send => {}
                    Verdict::Slip => {
                        rrl::slip(&mut out, start);
                        shared.metrics.rrl.with_label_values(&["slipped"]).inc();
                    }
                    Verdict::Drop => {
                        out.truncate(start);
                        shared.metrics.rrl.with_label_values(&["dropped"]).inc();
                        continue;
                    }
                }
            }
            ends[answers] = out.len();
            destinations[answers] = peers[i];
            answers += 1;
        }
        drop(serving);
        scratch.observe(&shared.metrics, now.elapsed(), received);
        scratch.flush();
        send_all(
            fd,
            &mut send,
            &out,
            &ends[..answers],
            &destinations[..answers],
        );
    }
}

/// Sends answer `i` (`out[ends[i - 1]..ends[i]]`) to `destinations[i]`, as few `sendmmsg` calls as
/// the kernel allows. A datagram the kernel refuses is skipped (the client will retry).
fn send_all(
    fd: std::os::fd::RawFd,
    headers: &mut MultiHeaders<SockaddrStorage>,
    out: &[u8],
    ends: &[usize],
    destinations: &[Option<SockaddrStorage>],
) {
    let mut first = 0;
    while first < ends.len() {
        let slices: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
            let i = first + i;
            let start = if i == 0 {
                0
            } else {
                ends.get(i - 1).copied().unwrap_or(0)
            };
            let end = ends.get(i).copied().unwrap_or(start);
            [IoSlice::new(out.get(start..end).unwrap_or(&[]))]
        });
        let pending = ends.len() - first;
        let result = sendmmsg(
            fd,
            headers,
            slices.iter().take(pending),
            &destinations[first..],
            [],
            MsgFlags::empty(),
        );
        match result {
            Ok(sent) => first += sent.count().max(1),
            Err(Errno::EINTR) => {}
            Err(e) => {
                tracing::debug!("dns udp send: {e}");
                first += 1;
            }
        }
    }
}

fn peer_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    address
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}
