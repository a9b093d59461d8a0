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
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::socket::{
    recvmmsg, sendmmsg, setsockopt, sockopt, MsgFlags, MultiHeaders, SockaddrStorage,
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
/// How often an idle worker looks at its stop flag.
const IDLE_CHECK: Duration = Duration::from_millis(200);

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
