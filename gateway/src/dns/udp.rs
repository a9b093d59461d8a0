//! UDP workers: each owns one `SO_REUSEPORT` socket (the kernel spreads clients over them) and one
//! OS thread that receives a batch of queries with one `recvmmsg`, answers them into one buffer and
//! sends the answers with `sendmmsg`, those to one client as GSO trains (`Sender`). Threads rather
//! than tasks: a worker never waits on anything but its socket, and a blocking batch call costs
//! less than a readiness round trip through the runtime per wake-up.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::socket::{
    recvmmsg, sendmmsg, setsockopt, sockopt, ControlMessage, MsgFlags, MultiHeaders,
    SockaddrStorage,
};
use nix::unistd::Pid;
use socket2::{Domain, Protocol, Socket, Type};

use super::answer::Transport;
use super::rrl::{self, Verdict};
use super::server::{Scratch, Shared};

/// Queries taken per `recvmmsg`.
const BATCH: usize = 32;
/// Receive slot per query. A longer datagram is cut here, and the cut message is answered FORMERR
/// (no DNS query is anywhere near this long).
const SLOT: usize = 4096;
/// How often an idle worker looks at its stop flag (and publishes what it counted).
const IDLE_CHECK: Duration = Duration::from_millis(200);
/// How often a busy worker adds its local counts to the shared series and lets go of the server
/// state it holds. Every worker adding into the same counters (and the state's reference count)
/// after every batch makes those cache lines travel between cores at each batch: with two workers
/// on two cores that was about a quarter of a worker's user-space time. Once a millisecond costs
/// nothing and keeps a scrape at most that far behind a busy worker (`IDLE_CHECK` behind one that
/// just went idle; a lone query after a quiet millisecond is published at once).
const PUBLISH_EVERY: Duration = Duration::from_millis(1);

/// The CPUs this process may run on (its affinity mask: taskset, cgroup cpusets), lowest first.
pub(super) fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// The CPU worker `index` runs on when workers are pinned.
pub(super) fn worker_cpu(cpus: &[usize], index: usize) -> Option<usize> {
    cpus.get(index % cpus.len().max(1)).copied()
}

/// Attaches a classic BPF program to the `SO_REUSEPORT` group of `socket` that hands a datagram to
/// the socket of the worker pinned to the CPU which received it (the socket's index in the group
/// is its bind order, so the program returns that worker's index). The worker then wakes on the
/// CPU where the packet already is — no cross-CPU wake-up, and the socket's cache lines stay on
/// one CPU. A CPU outside `cpus` (interrupts may run anywhere) goes to `cpu % workers`.
pub(super) fn steer_by_cpu(
    socket: &UdpSocket,
    cpus: &[usize],
    workers: usize,
) -> std::io::Result<()> {
    use nix::libc::{
        sock_filter, sock_fprog, BPF_A, BPF_ABS, BPF_ALU, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_MOD,
        BPF_RET, BPF_W, SKF_AD_CPU, SKF_AD_OFF,
    };
    let workers = u32::try_from(workers.max(1)).unwrap_or(u32::MAX);
    let op = |code: u32, k: u32, jt: u8, jf: u8| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    // A = the CPU the packet is being processed on (a negative offset reads ancillary data).
    let mut program = vec![op(
        BPF_LD | BPF_W | BPF_ABS,
        (SKF_AD_OFF + SKF_AD_CPU) as u32,
        0,
        0,
    )];
    // A classic program is at most 4096 instructions: two per CPU, so the first 2000 are mapped.
    for (index, &cpu) in cpus.iter().take(2000).enumerate() {
        let Ok(cpu) = u32::try_from(cpu) else {
            break;
        };
        let worker = u32::try_from(index).unwrap_or(0) % workers;
        program.push(op(BPF_JMP | BPF_JEQ | BPF_K, cpu, 0, 1));
        program.push(op(BPF_RET | BPF_K, worker, 0, 0));
    }
    program.push(op(BPF_ALU | BPF_MOD | BPF_K, workers, 0, 0));
    program.push(op(BPF_RET | BPF_A, 0, 0, 0));
    let fprog = sock_fprog {
        len: u16::try_from(program.len()).unwrap_or(u16::MAX),
        filter: program.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `program` outlives it.
    setsockopt(socket, sockopt::AttachReusePortCbpf, &fprog).map_err(std::io::Error::from)
}

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

/// Starts a worker thread on `socket`, on CPU `cpu` only when given. It ends when `stop` turns
/// true or the server is gone.
pub(super) fn spawn(
    index: usize,
    socket: UdpSocket,
    cpu: Option<usize>,
    shared: Weak<Shared>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("meridian-dns-udp-{index}"))
        .spawn(move || {
            if let Some(cpu) = cpu {
                pin(cpu);
            }
            run(&socket, &shared, &stop)
        })
        .map(|_| ())
}

/// Keeps the calling thread on `cpu`. A failure (a CPU taken away since start) only costs locality.
fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    let pinned = set
        .set(cpu)
        .and_then(|()| sched_setaffinity(Pid::from_raw(0), &set));
    if let Err(e) = pinned {
        tracing::warn!(cpu, "dns udp worker not pinned: {e}");
    }
}

fn run(socket: &UdpSocket, shared: &Weak<Shared>, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let Ok(mut slots) =
        Box::<[[u8; SLOT]; BATCH]>::try_from(vec![[0u8; SLOT]; BATCH].into_boxed_slice())
    else {
        return;
    };
    let mut receive = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut sender = Sender::new(socket);
    let mut lengths = [0usize; BATCH];
    let mut peers: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
    let mut ends = [0usize; BATCH];
    let mut destinations: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
    let mut out = Vec::with_capacity(BATCH * 512);
    let mut scratch = Scratch::default();
    let mut keys = [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH];
    // The server's state, held from one publication to the next rather than taken per batch:
    // taking it writes its reference count, which every worker shares.
    let mut held: Option<Arc<Shared>> = None;
    let mut published = Instant::now();
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
        if received == 0 {
            // Idle (or interrupted): publish, and let a server that is gone end this worker.
            scratch.flush();
            held = None;
            if shared.strong_count() == 0 {
                return;
            }
            continue;
        }
        if held.is_none() {
            held = shared.upgrade();
        }
        let Some(shared) = held.as_deref() else {
            return;
        };
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
                        scratch.held_back(&shared.metrics, true);
                    }
                    Verdict::Drop => {
                        out.truncate(start);
                        scratch.held_back(&shared.metrics, false);
                        continue;
                    }
                }
            }
            ends[answers] = out.len();
            keys[answers] = peer;
            destinations[answers] = peers[i];
            answers += 1;
        }
        drop(serving);
        scratch.observe(&shared.metrics, now.elapsed(), received);
        if now.saturating_duration_since(published) >= PUBLISH_EVERY {
            scratch.flush();
            published = now;
            held = None;
        }
        sender.send(
            fd,
            &out,
            &ends[..answers],
            &destinations[..answers],
            &keys[..answers],
        );
    }
    scratch.flush();
}

/// Kernel refusals that mean "no segmented sends on this socket" (no checksum offload on the
/// route's device, a kernel or protocol without `UDP_SEGMENT`) rather than "not this datagram".
fn refuses_segmenting(error: Errno) -> bool {
    matches!(
        error,
        Errno::EIO | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT
    )
}

/// A worker's send side. Answers to one client go out as GSO trains (see `plan_trains`): one
/// datagram through the stack, cut into the client's datagrams at the end, so the route lookup,
/// the skb and the loopback or device transmit are paid once per train rather than per answer.
/// Once the kernel refuses segmenting itself (`refuses_segmenting`), the socket sends one datagram
/// per answer for good.
struct Sender {
    /// Headers without control messages.
    plain: MultiHeaders<SockaddrStorage>,
    /// Headers with room for one `UDP_SEGMENT` control message each.
    segmented: MultiHeaders<SockaddrStorage>,
    lengths: Vec<usize>,
    order: Vec<usize>,
    trains: Vec<Train>,
    /// (segment size of the `sendmmsg` that carries it, train index), in send order.
    calls: Vec<(Option<u16>, usize)>,
    /// Where each train of `calls` goes.
    addresses: Vec<Option<SockaddrStorage>>,
    segmenting: bool,
    /// A refusal the next segmented call gets instead of going to the kernel.
    #[cfg(test)]
    refuse: Option<Errno>,
}

impl Sender {
    fn new(socket: &UdpSocket) -> Self {
        // A kernel without `UDP_SEGMENT` (before 4.18) refuses the option. It would not refuse
        // the control message but ignore it and deliver a train as one datagram, so such a
        // socket never gets one.
        let segmenting = setsockopt(socket, sockopt::UdpGsoSegment, &0).is_ok();
        if !segmenting {
            tracing::debug!("dns udp: no UDP_SEGMENT, one datagram per answer");
        }
        Self {
            plain: MultiHeaders::preallocate(BATCH, None),
            segmented: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(u16))),
            lengths: Vec::with_capacity(BATCH),
            order: Vec::with_capacity(BATCH),
            trains: Vec::with_capacity(BATCH),
            calls: Vec::with_capacity(BATCH),
            addresses: Vec::with_capacity(BATCH),
            segmenting,
            #[cfg(test)]
            refuse: None,
        }
    }

    /// Sends answer `i` (`out[ends[i - 1]..ends[i]]`) to `destinations[i]` (`keys[i]` as a
    /// `SocketAddr`). A datagram the kernel refuses is skipped (the client will retry); a train
    /// it refuses is sent again one answer at a time.
    fn send(
        &mut self,
        fd: RawFd,
        out: &[u8],
        ends: &[usize],
        destinations: &[Option<SockaddrStorage>],
        keys: &[SocketAddr],
    ) {
        let count = ends.len().min(destinations.len()).min(BATCH);
        let slices: [IoSlice<'_>; BATCH] = std::array::from_fn(|i| {
            if i >= count {
                return IoSlice::new(&[]);
            }
            let start = if i == 0 { 0 } else { ends[i - 1] };
            IoSlice::new(out.get(start..ends[i]).unwrap_or(&[]))
        });
        let destinations = &destinations[..count];
        if self.segmenting && keys.len() >= count {
            self.lengths.clear();
            self.lengths
                .extend(slices[..count].iter().map(|slice| slice.len()));
            plan_trains(
                &keys[..count],
                &self.lengths,
                &mut self.order,
                &mut self.trains,
            );
            if self.trains.len() < count {
                self.send_trains(fd, &slices, destinations);
                return;
            }
        }
        // No two answers share a train: one datagram each, in one call.
        let messages: [&[IoSlice<'_>]; BATCH] =
            std::array::from_fn(|i| std::slice::from_ref(&slices[i]));
        send_singles(fd, &mut self.plain, &messages[..count], destinations);
    }

    /// Sends the planned trains: answer `self.order[k]` is `slices[self.order[k]]`.
    fn send_trains(
        &mut self,
        fd: RawFd,
        slices: &[IoSlice<'_>; BATCH],
        destinations: &[Option<SockaddrStorage>],
    ) {
        let ordered: [IoSlice<'_>; BATCH] =
            std::array::from_fn(|k| self.order.get(k).map_or(IoSlice::new(&[]), |&i| slices[i]));
        // nix puts the same control messages on every message of a `sendmmsg`, so one call per
        // segment size. A lone answer rides in the call with the largest segment size when it
        // is no longer than that (the kernel sends such a datagram whole), else in a plain call.
        let largest = self.trains.iter().filter_map(|t| t.segment).max();
        self.calls.clear();
        for (index, train) in self.trains.iter().enumerate() {
            let length = self.lengths[self.order[train.first]];
            let call = train
                .segment
                .or(largest.filter(|&size| usize::from(size) >= length));
            self.calls.push((call, index));
        }
        self.calls.sort_unstable();
        let message = |k: usize| {
            self.calls.get(k).map(|&(_, index)| {
                let train = self.trains[index];
                (train.first, train.first + train.count)
            })
        };
        let messages: [&[IoSlice<'_>]; BATCH] = std::array::from_fn(|k| {
            message(k).map_or(&[][..], |(start, end)| &ordered[start..end])
        });
        self.addresses.clear();
        for &(_, index) in &self.calls {
            self.addresses
                .push(destinations[self.order[self.trains[index].first]]);
        }
        let addresses = std::mem::take(&mut self.addresses);
        let total = self.calls.len();
        let mut start = 0;
        while start < total {
            let segment = self.calls[start].0;
            let end = start
                + self.calls[start..]
                    .iter()
                    .take_while(|call| call.0 == segment)
                    .count();
            let (messages, addresses) = (&messages[start..end], &addresses[start..end]);
            match segment {
                // Lone answers longer than any segment size.
                None => send_singles(fd, &mut self.plain, messages, addresses),
                Some(size) => self.send_segmented(fd, messages, addresses, size),
            }
            start = end;
        }
        self.addresses = addresses;
    }

    /// A refusal a test put in place of the kernel's answer to the next segmented call.
    #[cfg(test)]
    fn injected(&mut self) -> Option<Errno> {
        self.refuse.take()
    }

    #[cfg(not(test))]
    #[inline]
    fn injected(&mut self) -> Option<Errno> {
        None
    }

    /// Sends trains (and lone answers no longer than `size`) with `size` as their segment size.
    fn send_segmented(
        &mut self,
        fd: RawFd,
        messages: &[&[IoSlice<'_>]],
        addresses: &[Option<SockaddrStorage>],
        size: u16,
    ) {
        let mut first = 0;
        while first < messages.len() {
            if !self.segmenting {
                send_each(fd, &mut self.plain, &messages[first..], &addresses[first..]);
                return;
            }
            let (sent, error) = match self.injected() {
                Some(error) => (0, Some(error)),
                None => send_messages(
                    fd,
                    &mut self.segmented,
                    &messages[first..],
                    &addresses[first..],
                    Some(size),
                ),
            };
            first += sent;
            let Some(error) = error else {
                continue;
            };
            let refused = refuses_segmenting(error);
            if refused {
                self.segmenting = false;
                tracing::warn!(
                    "dns udp: the kernel refuses segmented sends ({error}); one datagram per answer on this socket"
                );
            }
            if refused || error == Errno::EMSGSIZE || messages[first].len() > 1 {
                // The segmenting may be what failed (a segment too long for the route's MTU,
                // say): the answers themselves still go out.
                send_each(
                    fd,
                    &mut self.plain,
                    &messages[first..=first],
                    &addresses[first..=first],
                );
            } else {
                tracing::debug!("dns udp send: {error}");
            }
            first += 1;
        }
    }
}

/// Sends every answer in `messages` as a datagram of its own, to its message's address.
fn send_each(
    fd: RawFd,
    headers: &mut MultiHeaders<SockaddrStorage>,
    messages: &[&[IoSlice<'_>]],
    addresses: &[Option<SockaddrStorage>],
) {
    let mut singles: [&[IoSlice<'_>]; BATCH] = [&[]; BATCH];
    let mut to: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
    let answers = messages
        .iter()
        .zip(addresses)
        .flat_map(|(message, address)| message.iter().map(move |answer| (answer, address)));
    let mut count = 0;
    // A batch holds at most `BATCH` answers, so nothing is cut here.
    for (slot, (answer, address)) in answers.take(BATCH).enumerate() {
        singles[slot] = std::slice::from_ref(answer);
        to[slot] = *address;
        count = slot + 1;
    }
    send_singles(fd, headers, &singles[..count], &to[..count]);
}

/// Sends `messages[i]` (one answer each) to `addresses[i]` with as few `sendmmsg` calls as the
/// kernel allows. One the kernel refuses is skipped (the client will retry).
fn send_singles(
    fd: RawFd,
    headers: &mut MultiHeaders<SockaddrStorage>,
    messages: &[&[IoSlice<'_>]],
    addresses: &[Option<SockaddrStorage>],
) {
    let mut first = 0;
    while first < messages.len() {
        let (sent, error) =
            send_messages(fd, headers, &messages[first..], &addresses[first..], None);
        first += sent;
        if let Some(error) = error {
            tracing::debug!("dns udp send: {error}");
            first += 1;
        }
    }
}

/// Sends `messages[i]` to `addresses[i]`, each with `segment` as its `UDP_SEGMENT` when given,
/// with as few `sendmmsg` calls as the kernel allows. Stops at the first message the kernel
/// refuses: returns how many went out, and the refusal if it stopped early.
fn send_messages(
    fd: RawFd,
    headers: &mut MultiHeaders<SockaddrStorage>,
    messages: &[&[IoSlice<'_>]],
    addresses: &[Option<SockaddrStorage>],
    segment: Option<u16>,
) -> (usize, Option<Errno>) {
    let mut sent = 0;
    while sent < messages.len() {
        let size = segment.unwrap_or(0);
        let with_segment = [ControlMessage::UdpGsoSegments(&size)];
        let control: &[ControlMessage<'_>] = if segment.is_some() {
            &with_segment
        } else {
            &[]
        };
        match sendmmsg(
            fd,
            headers,
            messages[sent..].iter(),
            &addresses[sent..],
            control,
            MsgFlags::empty(),
        ) {
            // The kernel sends at least one message or fails; `max` only guards the loop.
            Ok(results) => sent += results.count().max(1),
            Err(Errno::EINTR) => {}
            Err(error) => return (sent, Some(error)),
        }
    }
    (sent, None)
}

/// Most datagrams one GSO send may carry (the kernel's `UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;
/// Most payload bytes one GSO send may carry (one IPv4 datagram's worth before segmentation).
const MAX_TRAIN_BYTES: usize = 65_507;
/// Longest answer sent as a segment: a segment must fit the route's MTU with its headers, and
/// 1232 bytes fit the IPv6 minimum of 1280 (the size EDNS clients are told to ask for anyway).
const MAX_SEGMENT: usize = 1232;

/// One datagram handed to the kernel: answers `order[first..first + count]` laid end to end. With
/// `segment`, the kernel cuts it into datagrams of that many bytes (the last may be shorter), so
/// the route lookup, the skb and the loopback delivery are paid once for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Train {
    first: usize,
    count: usize,
    segment: Option<u16>,
}

/// Groups a batch's answers into trains: answers to one destination, longest first; a train is a
/// run of answers of one length (at most `MAX_SEGMENTS`, `MAX_TRAIN_BYTES`) plus, when the next
/// answer to that destination is shorter, that one as its short last segment. Reordering is free:
/// DNS clients match answers to queries by ID. `order` receives the answer indices in send order.
fn plan_trains(
    destinations: &[SocketAddr],
    lengths: &[usize],
    order: &mut Vec<usize>,
    trains: &mut Vec<Train>,
) {
    order.clear();
    trains.clear();
    let count = lengths.len().min(destinations.len());
    // Sorted as one integer per answer (destination hash, then longest first, then index) rather
    // than by comparing addresses: sorting was a fifth of the worker's user time. Two destinations
    // with one hash only interleave, which splits their trains; the grouping below still compares
    // the addresses themselves.
    order.extend((0..count).map(|i| {
        let longer_first = u16::MAX - u16::try_from(lengths[i]).unwrap_or(u16::MAX);
        (u64::from(destination_hash(&destinations[i])) << 32
            | u64::from(longer_first) << 16
            | (i as u64 & 0xffff)) as usize
    }));
    order.sort_unstable();
    for entry in order.iter_mut() {
        *entry &= 0xffff;
    }
    let mut first = 0;
    while first < order.len() {
        let head = order[first];
        let size = lengths[head];
        let mut count = 1;
        let mut bytes = size;
        if size > 0 && size <= MAX_SEGMENT {
            let same = |i: usize| destinations[i] == destinations[head];
            while let Some(&next) = order.get(first + count) {
                if !same(next) || count == MAX_SEGMENTS || bytes + lengths[next] > MAX_TRAIN_BYTES {
                    break;
                }
                let length = lengths[next];
                if length != size {
                    // A shorter answer may close the train as its last segment.
                    if length < size && length > 0 {
                        count += 1;
                    }
                    break;
                }
                count += 1;
                bytes += length;
            }
        }
        trains.push(Train {
            first,
            count,
            segment: (count > 1).then(|| u16::try_from(size).unwrap_or(u16::MAX)),
        });
        first += count;
    }
}

/// 32 bits of a destination's address and port for [`plan_trains`] to sort by.
fn destination_hash(destination: &SocketAddr) -> u32 {
    let address = match destination.ip() {
        std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            (bits ^ (bits >> 64)) as u64
        }
    };
    let mixed = (address ^ u64::from(destination.port()).rotate_left(40))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 32) as u32
}

fn peer_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    address
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends one datagram to `to` from a thread running on `cpu` only. On loopback the kernel
    /// delivers a datagram on the sending CPU, so that is the CPU the steering program sees.
    fn send_from_cpu(cpu: usize, to: SocketAddr, payload: &'static [u8]) {
        std::thread::spawn(move || {
            pin(cpu);
            let socket = UdpSocket::bind("127.0.0.1:0").expect("client socket");
            socket.send_to(payload, to).expect("send");
        })
        .join()
        .expect("sender thread");
    }

    /// Plans `lengths` to `destinations` and checks what any plan must hold: every answer sent
    /// once, a train goes to one destination, all its segments but the last are of its segment
    /// size, the last is not longer, and the kernel's limits hold.
    fn checked_plan(destinations: &[SocketAddr], lengths: &[usize]) -> (Vec<usize>, Vec<Train>) {
        let (mut order, mut trains) = (Vec::new(), Vec::new());
        plan_trains(destinations, lengths, &mut order, &mut trains);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..lengths.len()).collect::<Vec<_>>(),
            "each answer once"
        );
        let mut next = 0;
        for train in &trains {
            assert_eq!(train.first, next, "trains cover the order in sequence");
            next += train.count;
            let members = &order[train.first..train.first + train.count];
            let to = destinations[members[0]];
            assert!(members.iter().all(|&i| destinations[i] == to), "{train:?}");
            match train.segment {
                None => assert_eq!(train.count, 1, "{train:?}"),
                Some(size) => {
                    let size = usize::from(size);
                    assert!(train.count >= 2 && train.count <= MAX_SEGMENTS, "{train:?}");
                    assert!(size <= MAX_SEGMENT, "{train:?}");
                    let bytes: usize = members.iter().map(|&i| lengths[i]).sum();
                    assert!(bytes <= MAX_TRAIN_BYTES, "{train:?}: {bytes} bytes");
                    let (&last, rest) = members.split_last().expect("two or more");
                    assert!(rest.iter().all(|&i| lengths[i] == size), "{train:?}");
                    assert!(lengths[last] <= size && lengths[last] > 0, "{train:?}");
                }
            }
        }
        assert_eq!(next, order.len());
        (order, trains)
    }

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn equal_answers_to_one_client_share_a_train_and_other_clients_go_apart() {
        let to = [
            client(1),
            client(2),
            client(1),
            client(3),
            client(1),
            client(2),
        ];
        let (order, trains) = checked_plan(&to, &[50, 50, 50, 50, 50, 50]);
        // Destinations come in no particular order.
        let mut counts: Vec<(usize, Option<u16>)> =
            trains.iter().map(|t| (t.count, t.segment)).collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(counts, [(3, Some(50)), (2, Some(50)), (1, None)]);
        let three = trains
            .iter()
            .find(|t| t.count == 3)
            .expect("client 1's train");
        assert_eq!(&order[three.first..three.first + 3], &[0, 2, 4]);
        assert!(checked_plan(&[], &[]).1.is_empty());
        let (_, alone) = checked_plan(&[client(1), client(2)], &[50, 50]);
        assert!(alone.iter().all(|t| t.segment.is_none()));
    }

    #[test]
    fn a_shorter_answer_closes_a_train_as_its_last_segment() {
        let to = [client(1); 6];
        let (order, trains) = checked_plan(&to, &[50, 62, 50, 62, 40, 109]);
        let counts: Vec<(usize, Option<u16>)> =
            trains.iter().map(|t| (t.count, t.segment)).collect();
        // 109 + 62 | 62 + 50 | 50 + 40: three datagrams through the stack instead of six.
        assert_eq!(counts, [(2, Some(109)), (2, Some(62)), (2, Some(50))]);
        assert_eq!(order, [5, 1, 3, 0, 2, 4]);
    }

    #[test]
    fn trains_stop_at_the_kernel_limits_and_long_answers_go_alone() {
        let to = [client(1); 70];
        let (_, trains) = checked_plan(&to, &[100; 70]);
        assert_eq!(trains.iter().map(|t| t.count).collect::<Vec<_>>(), [64, 6]);
        let (_, trains) = checked_plan(&to[..60], &[MAX_SEGMENT; 60]);
        let full = MAX_TRAIN_BYTES / MAX_SEGMENT;
        assert_eq!(
            trains.iter().map(|t| t.count).collect::<Vec<_>>(),
            [full, 60 - full]
        );
        let (_, trains) = checked_plan(&to[..3], &[MAX_SEGMENT + 1; 3]);
        assert!(trains.iter().all(|t| t.segment.is_none()));
        assert_eq!(trains.len(), 3);
    }

    #[test]
    fn any_batch_plans_every_answer_once_within_the_limits() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % bound).expect("small")
        };
        for _ in 0..2000 {
            let count = next(80);
            let clients = 1 + next(5) as u16;
            let sizes = [
                0,
                12,
                50,
                62,
                62,
                109,
                1200,
                MAX_SEGMENT,
                MAX_SEGMENT + 1,
                4000,
            ];
            let to: Vec<SocketAddr> = (0..count)
                .map(|_| client(1 + next(u64::from(clients)) as u16))
                .collect();
            let lengths: Vec<usize> = (0..count)
                .map(|_| sizes[next(sizes.len() as u64)])
                .collect();
            checked_plan(&to, &lengths);
        }
    }

    /// Sends one batch through `sender` from `server` and returns what each client received.
    fn deliver(
        sender: &mut Sender,
        server: &UdpSocket,
        answers: &[(usize, Vec<u8>)],
    ) -> Vec<Vec<Vec<u8>>> {
        let clients: Vec<UdpSocket> = (0..3)
            .map(|_| {
                let socket = UdpSocket::bind("127.0.0.1:0").expect("client");
                socket
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .expect("timeout");
                socket
            })
            .collect();
        let mut out = Vec::new();
        let mut ends = Vec::new();
        let mut destinations = Vec::new();
        let mut keys = Vec::new();
        for (to, answer) in answers {
            out.extend_from_slice(answer);
            ends.push(out.len());
            let addr = clients[*to].local_addr().expect("addr");
            keys.push(addr);
            destinations.push(Some(SockaddrStorage::from(addr)));
        }
        sender.send(server.as_raw_fd(), &out, &ends, &destinations, &keys);
        clients
            .iter()
            .map(|socket| {
                let mut got = Vec::new();
                let mut buf = [0u8; 2048];
                while let Ok((len, _)) = socket.recv_from(&mut buf) {
                    got.push(buf[..len].to_vec());
                }
                got.sort();
                got
            })
            .collect()
    }

    #[test]
    fn a_batch_reaches_every_client_one_datagram_per_answer_with_and_without_segmenting() {
        let server = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let lengths = [50, 62, 62, 109, 40, 50, 1232];
        let answers: Vec<(usize, Vec<u8>)> = (0..BATCH)
            .map(|k| {
                let mut answer = vec![u8::try_from(k).expect("small"); lengths[k % lengths.len()]];
                answer[1] = u8::try_from(k % 3).expect("small");
                (k % 3 + usize::from(k % 7 == 0), answer)
            })
            .map(|(to, answer)| (to.min(2), answer))
            .collect();
        let mut expected = vec![Vec::new(); 3];
        for (to, answer) in &answers {
            expected[*to].push(answer.clone());
        }
        for got in &mut expected {
            got.sort();
        }
        let mut sender = Sender::new(&server);
        if !sender.segmenting {
            eprintln!("this kernel has no UDP_SEGMENT: one datagram per answer");
        }
        assert_eq!(deliver(&mut sender, &server, &answers), expected);
        if !sender.segmenting {
            return;
        }
        // A train the route cannot take (too long for its MTU): resent answer by answer, and
        // the socket keeps segmenting.
        sender.refuse = Some(Errno::EMSGSIZE);
        assert_eq!(deliver(&mut sender, &server, &answers), expected);
        assert!(sender.segmenting);
        // A kernel or device that takes no segmented sends: nothing lost, and the socket sends
        // one datagram per answer from then on.
        sender.refuse = Some(Errno::EIO);
        assert_eq!(deliver(&mut sender, &server, &answers), expected);
        assert!(!sender.segmenting);
        assert_eq!(deliver(&mut sender, &server, &answers), expected);
    }

    #[test]
    fn each_cpu_feeds_its_own_worker_socket() {
        let cpus = allowed_cpus();
        if cpus.len() < 2 {
            eprintln!("one CPU: nothing to steer");
            return;
        }
        let cpus = &cpus[..2];
        let first = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = first.local_addr().expect("local addr");
        let second = bind(addr).expect("bind the same port");
        steer_by_cpu(&first, cpus, 2).expect("attach the steering program");
        let sockets = [&first, &second];
        for _ in 0..3 {
            for (index, &cpu) in cpus.iter().enumerate() {
                send_from_cpu(cpu, addr, b"steered");
                // Blocking read with the socket's idle timeout: the datagram is already queued.
                let mut buf = [0u8; 16];
                let (len, _) = sockets[index]
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("cpu {cpu} → socket {index}: {e}"));
                assert_eq!(&buf[..len], b"steered");
                let other = sockets[1 - index];
                other.set_nonblocking(true).expect("nonblocking");
                assert!(
                    other.recv_from(&mut buf).is_err(),
                    "cpu {cpu} also fed the other socket"
                );
                other.set_nonblocking(false).expect("blocking");
            }
        }
    }

    #[test]
    fn a_cpu_the_program_does_not_know_goes_by_modulo() {
        // The program's fallback, checked without a CPU we cannot run on: with an empty CPU list
        // every datagram takes `cpu % workers`, and one worker gets everything.
        let only = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = only.local_addr().expect("local addr");
        steer_by_cpu(&only, &[], 1).expect("attach");
        let sender = UdpSocket::bind("127.0.0.1:0").expect("client socket");
        sender.send_to(b"x", addr).expect("send");
        let mut buf = [0u8; 4];
        assert_eq!(only.recv_from(&mut buf).expect("received").0, 1);
    }
}
