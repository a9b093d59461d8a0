//! Sockets around the pure answer function: one UDP and one TCP listener on the same address, a
//! health prober, and zone rebuilds when the config changes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meridian_config::Config;
use meridian_geoip::GeoIp;
use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{IntCounter, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};

use super::answer::{self, Answer, Transport};
use super::cache::{self, AnswerCache};
use super::dnssec::RESIGN_AFTER;
use super::fast::RankCache;
use super::health::{self, HealthUrl, PopHealth};
use super::metrics::DnsMetrics;
use super::rrl::RateLimiter;
use super::udp;
use super::zone::Zone;
use super::DnsError;

/// A compiled zone with the health flags and answer counters of its PoPs (same indices), the
/// GeoIP database that locates clients for it (swapped together, so one query sees one version),
/// and its response rate limiter.
pub(super) struct Serving {
    /// Tells this serving version apart from every other one (worker caches are per version).
    id: u64,
    pub(super) zone: Arc<Zone>,
    pub(super) geoip: Arc<GeoIp>,
    health: Vec<Arc<AtomicBool>>,
    answers: Vec<IntCounter>,
    pub(super) rrl: Arc<RateLimiter>,
}

pub(super) struct Shared {
    pub(super) serving: ArcSwap<Serving>,
    health: PopHealth,
    pub(super) metrics: DnsMetrics,
    /// Wakes the prober after a reload, so new PoPs are probed at once.
    reloaded: Notify,
    listen: SocketAddr,
}

/// A running GeoDNS server. Its tasks stop when the `stop` watch given to `start` turns true (or
/// their runtime shuts down).
#[derive(Clone)]
pub struct RunningDns {
    /// The bound address (UDP and TCP), with the real port when `listen` asked for port 0.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl RunningDns {
    /// Compiles the zone, binds `[dns] listen` for UDP and TCP, registers metrics into `registry`
    /// and spawns the listeners and the prober on the current tokio runtime.
    pub fn start(
        config: &Config,
        geoip: Arc<GeoIp>,
        registry: &Registry,
        udp_workers: usize,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, DnsError> {
        let zone = Arc::new(Zone::compile(config)?);
        Self::start_serving(config, zone, geoip, registry, udp_workers, stop)
    }

    /// [`RunningDns::start`] with `config`'s zone compiled already.
    pub fn start_serving(
        config: &Config,
        zone: Arc<Zone>,
        geoip: Arc<GeoIp>,
        registry: &Registry,
        udp_workers: usize,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, DnsError> {
        let listen: SocketAddr = config
            .dns
            .as_ref()
            .map(|d| d.listen.as_str())
            .unwrap_or_default()
            .parse()
            .map_err(|_| DnsError::Listen {
                addr: config
                    .dns
                    .as_ref()
                    .map(|d| d.listen.clone())
                    .unwrap_or_default(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "expected ip:port"),
            })?;
        let metrics = DnsMetrics::register(registry)?;
        let health = PopHealth::default();
        let serving = serving(zone, geoip, &health, &metrics, None);
        // Standalone servers get one worker per core unless `[dns] workers` says otherwise.
        let workers = match config.dns.as_ref().map_or(0, |d| d.workers) {
            0 => udp_workers,
            n => n,
        }
        .max(1);
        let (udp, tcp) = bind(listen, workers)?;
        // Pinned workers, each fed the queries its own CPU received: no cross-CPU wake-ups. With
        // more workers than CPUs, some would share a CPU and others get nothing: no pinning then.
        let pin = config.dns.as_ref().is_some_and(|d| d.pin_workers);
        let mut cpus = if pin { udp::allowed_cpus() } else { Vec::new() };
        if workers > cpus.len() {
            cpus.clear();
        }
        if let (Some(first), true) = (udp.first(), workers > 1 && !cpus.is_empty()) {
            if let Err(e) = udp::steer_by_cpu(first, &cpus, workers) {
                tracing::warn!("dns udp: queries not steered by CPU: {e}");
            }
        }
        let addr = tcp.local_addr().map_err(|source| DnsError::Listen {
            addr: listen.to_string(),
            source,
        })?;
        let tcp = TcpListener::from_std(tcp).map_err(|source| DnsError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        let shared = Arc::new(Shared {
            serving: ArcSwap::from_pointee(serving),
            health,
            metrics,
            reloaded: Notify::new(),
            listen,
        });
        let stopped = Arc::new(AtomicBool::new(false));
        for (i, socket) in udp.into_iter().enumerate() {
            let cpu = udp::worker_cpu(&cpus, i);
            udp::spawn(
                i,
                socket,
                cpu,
                Arc::downgrade(&shared),
                Arc::clone(&stopped),
            )
            .map_err(|source| DnsError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        }
        {
            let mut stop = stop.clone();
            let stopped = Arc::clone(&stopped);
            tokio::spawn(async move {
                let _ = stop.wait_for(|s| *s).await;
                stopped.store(true, Ordering::Relaxed);
            });
        }
        tokio::spawn(serve_tcp(tcp, Arc::clone(&shared), stop.clone()));
        tokio::spawn(probe_loop(Arc::clone(&shared), stop.clone()));
        tokio::spawn(resign_loop(
            RunningDns {
                addr,
                shared: Arc::clone(&shared),
            },
            stop,
        ));
        tracing::info!(%addr, zone = %shared.serving.load().zone.origin, "GeoDNS listening (udp+tcp)");
        Ok(Self { addr, shared })
    }

    /// Rebuilds the zone from `config`; on error the current zone stays in service.
    pub fn reload(&self, config: &Config) -> Result<(), DnsError> {
        let zone = match Zone::compile(config) {
            Ok(zone) => Arc::new(zone),
            Err(e) => {
                self.shared
                    .metrics
                    .reloads
                    .with_label_values(&["error"])
                    .inc();
                return Err(e.into());
            }
        };
        if let Some(dns) = &config.dns {
            if dns.listen.parse::<SocketAddr>().ok() != Some(self.shared.listen) {
                tracing::warn!(
                    listen = %dns.listen,
                    serving = %self.addr,
                    "dns.listen changed: takes effect on restart"
                );
            }
        }
        let geoip = Arc::clone(&self.shared.serving.load().geoip);
        self.serve(zone, geoip);
        Ok(())
    }

    /// Serves `zone`, locating clients with `geoip`, from the next query on (a zone compiled
    /// elsewhere, e.g. as part of an edge's installed config version).
    pub fn serve(&self, zone: Arc<Zone>, geoip: Arc<GeoIp>) {
        self.install(zone, geoip);
        self.shared.metrics.reloads.with_label_values(&["ok"]).inc();
    }

    fn install(&self, zone: Arc<Zone>, geoip: Arc<GeoIp>) {
        let metrics = &self.shared.metrics;
        let names: Vec<&str> = zone.pops.iter().map(|p| p.name.as_str()).collect();
        for gone in self.shared.health.retain(&names) {
            let _ = metrics.pop_healthy.remove_label_values(&[&gone]);
        }
        let serving = serving(
            zone,
            geoip,
            &self.shared.health,
            metrics,
            Some(&self.shared.serving.load()),
        );
        self.shared.serving.store(Arc::new(serving));
        self.shared.reloaded.notify_one();
    }

    /// The zone and GeoIP database being served now.
    pub fn serving(&self) -> (Arc<Zone>, Arc<GeoIp>) {
        let serving = self.shared.serving.load();
        (Arc::clone(&serving.zone), Arc::clone(&serving.geoip))
    }

    /// Answers one query against the current zone and records its metrics.
    pub fn answer(&self, request: &[u8], source: IpAddr, transport: Transport) -> Answer {
        self.shared.answer(request, source, transport)
    }
}

/// `previous`: the serving zone being replaced, whose rate-limit state carries over when the
/// limits did not change (a config push must not reset an attacker's buckets).
fn serving(
    zone: Arc<Zone>,
    geoip: Arc<GeoIp>,
    health: &PopHealth,
    metrics: &DnsMetrics,
    previous: Option<&Serving>,
) -> Serving {
    let flags: Vec<Arc<AtomicBool>> = zone.pops.iter().map(|p| health.state(&p.name)).collect();
    for (pop, flag) in zone.pops.iter().zip(&flags) {
        metrics
            .pop_healthy
            .with_label_values(&[&pop.name])
            .set(i64::from(flag.load(Ordering::Relaxed)));
    }
    let answers = zone
        .pops
        .iter()
        .map(|p| metrics.answers.with_label_values(&[&p.name]))
        .collect();
    let rrl = match previous {
        Some(previous) if previous.zone.rrl == zone.rrl => Arc::clone(&previous.rrl),
        _ => Arc::new(RateLimiter::new(&zone.rrl)),
    };
    static SERVING_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Serving {
        id: SERVING_IDS.fetch_add(1, Ordering::Relaxed),
        zone,
        geoip,
        health: flags,
        answers,
        rrl,
    }
}

impl Shared {
    fn answer(&self, request: &[u8], source: IpAddr, transport: Transport) -> Answer {
        let started = Instant::now();
        let serving = self.serving.load();
        let healthy = |p: usize| {
            serving
                .health
                .get(p)
                .is_none_or(|flag| flag.load(Ordering::Relaxed))
        };
        let locate = |ip: IpAddr| serving.geoip.lookup(ip).and_then(|l| l.coordinates);
        let answer = answer::answer(&serving.zone, request, source, transport, &healthy, &locate);
        self.metrics
            .queries
            .with_label_values(&[answer.qtype, answer.rcode, transport.label()])
            .inc();
        for &p in &answer.pops {
            if let Some(counter) = serving.answers.get(p) {
                counter.inc();
            }
        }
        if answer.fail_open {
            self.metrics.fail_open.inc();
        }
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        answer
    }

    /// Answers one query into `out` (appended) with a worker's reusable `scratch`, and counts it.
    /// Returns whether there is an answer to send. `now` is the time of the batch the query came
    /// in (one clock read per batch, not per query); UDP answers are remembered per worker.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn respond(
        &self,
        serving: &Serving,
        scratch: &mut Scratch,
        request: &[u8],
        source: IpAddr,
        transport: Transport,
        out: &mut Vec<u8>,
        now: Instant,
    ) -> bool {
        scratch.switch_to(serving);
        if transport == Transport::Udp {
            if let Some(hit) = scratch.cache.get(request, source) {
                out.extend_from_slice(request.get(..2).unwrap_or(&[0, 0]));
                out.extend_from_slice(hit.answer.get(2..).unwrap_or(&[]));
                let (qtype, rcode, fail_open) = (hit.qtype, hit.rcode, hit.fail_open);
                for &p in &hit.pops {
                    if let Some(counter) = scratch.answers.get(p) {
                        counter.inc();
                    }
                }
                scratch
                    .counters
                    .get(&self.metrics, qtype, rcode, transport)
                    .inc();
                if fail_open {
                    self.metrics.fail_open.inc();
                }
                return true;
            }
        }
        let healthy = |p: usize| {
            serving
                .health
                .get(p)
                .is_none_or(|flag| flag.load(Ordering::Relaxed))
        };
        scratch.places.refresh(serving.zone.prepared.id(), now);
        let places = RefCell::new(&mut scratch.places.known);
        let locate = |ip: IpAddr| {
            let mut places = places.borrow_mut();
            if let Some(&place) = places.get(&ip) {
                return place;
            }
            let place = serving.geoip.lookup(ip).and_then(|l| l.coordinates);
            places.insert(ip, place);
            place
        };
        scratch.chosen.clear();
        let start = out.len();
        let outcome = answer::respond(
            &serving.zone,
            &mut scratch.ranks,
            request,
            source,
            transport,
            &healthy,
            &locate,
            out,
            &mut scratch.chosen,
        );
        scratch
            .counters
            .get(&self.metrics, outcome.qtype, outcome.rcode, transport)
            .inc();
        for &p in &scratch.chosen {
            if let Some(counter) = scratch.answers.get(p) {
                counter.inc();
            }
        }
        if outcome.fail_open {
            self.metrics.fail_open.inc();
        }
        if transport == Transport::Udp && outcome.sent {
            if let Some(answer) = out.get(start..).filter(|a| a.len() >= 12) {
                scratch.cache.insert(
                    request,
                    source,
                    cache::Entry {
                        answer: answer.into(),
                        qtype: outcome.qtype,
                        rcode: outcome.rcode,
                        fail_open: outcome.fail_open,
                        pops: scratch.chosen.as_slice().into(),
                    },
                );
            }
        }
        outcome.sent
    }
}

/// A worker's reusable state: PoP rankings by location, the current query's PoPs, and worker-local
/// query counters and duration histogram (label lookups and atomics every core writes are not free
/// at a few hundred thousand queries/s), added to the shared series by [`Scratch::flush`].
#[derive(Default)]
pub(super) struct Scratch {
    ranks: RankCache,
    places: Places,
    cache: AnswerCache,
    chosen: Vec<usize>,
    counters: QueryCounters,
    duration: Option<LocalHistogram>,
    /// Worker-local answer counters of each PoP of the serving version `answers_for`.
    answers: Vec<LocalIntCounter>,
    answers_for: u64,
    /// Worker-local rate-limiting counters (slipped, dropped): a flood is when they count most.
    held_back: Option<[LocalIntCounter; 2]>,
}

impl Scratch {
    /// Publishes the local counts: the TCP path after every answer, before sending it; a UDP
    /// worker at most once a millisecond while busy and whenever it goes idle (its batches would
    /// otherwise make every worker write the same shared counters once per batch).
    pub(super) fn flush(&mut self) {
        for (.., counter) in &self.counters.known {
            counter.flush();
        }
        for counter in &self.answers {
            counter.flush();
        }
        if let Some(duration) = &self.duration {
            duration.flush();
        }
        for counter in self.held_back.iter().flatten() {
            counter.flush();
        }
    }

    /// Counts an answer that rate limiting slipped (sent empty with TC) or dropped.
    pub(super) fn held_back(&mut self, metrics: &DnsMetrics, slipped: bool) {
        let [slips, drops] = self.held_back.get_or_insert_with(|| {
            ["slipped", "dropped"].map(|action| metrics.rrl.with_label_values(&[action]).local())
        });
        if slipped { slips } else { drops }.inc();
    }

    /// Readies the worker for a batch against `serving` at `now`: the answer cache is checked
    /// against the current version and health once here rather than per query.
    pub(super) fn begin(&mut self, serving: &Serving, now: Instant) {
        self.switch_to(serving);
        self.cache.refresh(serving.id, &serving.health, now);
    }

    /// Records `count` queries that took `elapsed` together (a batch: each is counted at the
    /// batch's average, which costs two clock reads per batch instead of two per query).
    pub(super) fn observe(&mut self, metrics: &DnsMetrics, elapsed: Duration, count: usize) {
        let Some(each) = u32::try_from(count)
            .ok()
            .filter(|&n| n > 0)
            .map(|n| elapsed.as_secs_f64() / f64::from(n))
        else {
            return;
        };
        let duration = self
            .duration
            .get_or_insert_with(|| metrics.duration.local());
        for _ in 0..count {
            duration.observe(each);
        }
    }

    fn switch_to(&mut self, serving: &Serving) {
        if self.answers_for == serving.id {
            return;
        }
        for counter in &self.answers {
            counter.flush();
        }
        self.answers = serving.answers.iter().map(|c| c.local()).collect();
        self.answers_for = serving.id;
    }
}

/// A worker's memory of GeoIP answers by exact address: resolvers and ECS networks repeat, and a
/// database lookup decodes a record every time. Forgotten when the zone changes, at most a second
/// after it was learnt (so a replaced database is seen within a second) and when it grows large.
#[derive(Default)]
struct Places {
    known: HashMap<IpAddr, Option<(f64, f64)>, foldhash::fast::RandomState>,
    zone: u64,
    since: Option<Instant>,
}

impl Places {
    const LARGEST: usize = 1 << 16;
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(1);

    fn refresh(&mut self, zone: u64, now: Instant) {
        let expired = self
            .since
            .is_none_or(|since| now.saturating_duration_since(since) >= Self::LONGEST);
        if expired || self.zone != zone || self.known.len() >= Self::LARGEST {
            self.known.clear();
            self.zone = zone;
            self.since = Some(now);
        }
    }
}

#[derive(Default)]
struct QueryCounters {
    known: Vec<(&'static str, &'static str, Transport, LocalIntCounter)>,
}

impl QueryCounters {
    fn get(
        &mut self,
        metrics: &DnsMetrics,
        qtype: &'static str,
        rcode: &'static str,
        transport: Transport,
    ) -> &LocalIntCounter {
        // The labels are string constants: comparing where they live (and their length) is enough
        // and skips a byte comparison per entry and query. Should one label text live at two
        // addresses, it gets two local counters that flush into the same series.
        let same = |a: &str, b: &str| std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len();
        let found = self
            .known
            .iter()
            .position(|(q, r, t, _)| same(q, qtype) && same(r, rcode) && *t == transport);
        let at = match found {
            Some(at) => at,
            None => {
                let counter = metrics
                    .queries
                    .with_label_values(&[qtype, rcode, transport.label()])
                    .local();
                self.known.push((qtype, rcode, transport, counter));
                self.known.len() - 1
            }
        };
        &self.known[at].3
    }
}

/// Binds `workers` UDP sockets (`SO_REUSEPORT`) and one TCP listener on the same address; with
/// port 0, UDP picks the port and TCP follows it.
fn bind(
    listen: SocketAddr,
    workers: usize,
) -> Result<(Vec<std::net::UdpSocket>, std::net::TcpListener), DnsError> {
    let error = |source| DnsError::Listen {
        addr: listen.to_string(),
        source,
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let first = udp::bind(listen).map_err(error)?;
        let addr = first.local_addr().map_err(error)?;
        match std::net::TcpListener::bind(addr) {
            Ok(tcp) => {
                tcp.set_nonblocking(true).map_err(error)?;
                let mut sockets = vec![first];
                for _ in 1..workers {
                    sockets.push(udp::bind(addr).map_err(error)?);
                }
                return Ok((sockets, tcp));
            }
            // The kernel's free UDP port can be taken for TCP: try another one.
            Err(_) if listen.port() == 0 && attempts < 16 => continue,
            Err(source) => return Err(error(source)),
        }
    }
}

/// Open TCP connections by client address, so one address cannot take every slot.
#[derive(Default)]
struct PerAddress {
    open: std::sync::Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// Counts a connection from `ip` unless it already holds `cap`.
    fn admit(&self, ip: IpAddr, cap: usize) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= cap {
            return false;
        }
        *count += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&ip);
            }
        }
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let max = shared.serving.load().zone.max_tcp_connections;
    let slots = Arc::new(Semaphore::new(max));
    let per_address = Arc::new(PerAddress::default());
    loop {
        // Take a slot first: past the limit, new connections wait in the kernel backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!("dns tcp accept: {e}");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        // Fair shares: an address at its cap gets its new connection closed (it still has open
        // ones to ask on), and the slot goes back to everyone else.
        let cap = shared.serving.load().zone.max_tcp_per_address;
        if !per_address.admit(peer.ip(), cap) {
            shared.metrics.tcp_refused.inc();
            drop(stream);
            drop(permit);
            continue;
        }
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        let per_address = Arc::clone(&per_address);
        tokio::spawn(async move {
            serve_connection(stream, peer, shared, stop).await;
            per_address.release(peer.ip());
            drop(permit);
        });
    }
}

/// RFC 1035 §4.2.2 / RFC 7766: two-byte length, then the message; several queries per connection.
async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let idle = shared.serving.load().zone.tcp_idle_timeout;
    let mut scratch = Scratch::default();
    let mut framed = Vec::new();
    loop {
        let read = async {
            let mut length = [0u8; 2];
            stream.read_exact(&mut length).await?;
            let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
            stream.read_exact(&mut message).await?;
            Ok::<_, std::io::Error>(message)
        };
        let message = tokio::select! {
            read = tokio::time::timeout(idle, read) => match read {
                Ok(Ok(message)) => message,
                _ => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        framed.clear();
        framed.extend_from_slice(&[0, 0]);
        let serving = shared.serving.load_full();
        let started = Instant::now();
        let sent = shared.respond(
            &serving,
            &mut scratch,
            &message,
            peer.ip(),
            Transport::Tcp,
            &mut framed,
            started,
        );
        scratch.observe(&shared.metrics, started.elapsed(), 1);
        scratch.flush();
        if !sent {
            return;
        }
        let Ok(length) = u16::try_from(framed.len() - 2) else {
            return;
        };
        framed[..2].copy_from_slice(&length.to_be_bytes());
        match tokio::time::timeout(idle, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

/// How often the re-signing loop looks at the serving zone's signature age: signatures are
/// re-made after days ([`RESIGN_AFTER`]), so an hourly look is ample and costs nothing.
const RESIGN_CHECK_EVERY: Duration = Duration::from_secs(60 * 60);

/// Keeps a signed zone's signatures fresh: once they are [`RESIGN_AFTER`] old, the serving zone is
/// prepared (signed) again off the runtime's workers and swapped in, long before they expire.
async fn resign_loop(running: RunningDns, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RESIGN_CHECK_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let serving = running.shared.serving.load_full();
        let Some(signed_at) = serving.zone.signed_at else {
            continue;
        };
        if signed_at.elapsed().unwrap_or_default() < RESIGN_AFTER {
            continue;
        }
        let original = Arc::clone(&serving.zone);
        let mut zone = (*serving.zone).clone();
        let geoip = Arc::clone(&serving.geoip);
        drop(serving);
        match tokio::task::spawn_blocking(move || zone.prepare().map(|()| zone)).await {
            // A reload while signing wins: its zone was signed when it compiled.
            Ok(Ok(_)) if !Arc::ptr_eq(&running.shared.serving.load().zone, &original) => {}
            Ok(Ok(zone)) => {
                running.install(Arc::new(zone), geoip);
                tracing::info!("GeoDNS zone re-signed");
            }
            Ok(Err(e)) => tracing::error!("GeoDNS re-signing failed, old signatures stay: {e}"),
            Err(e) => tracing::error!("GeoDNS re-signing failed, old signatures stay: {e}"),
        }
    }
}

/// Probes every PoP with a health URL each `dns.health.interval`; PoPs without one stay healthy.
async fn probe_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let serving = shared.serving.load_full();
        let zone = &serving.zone;
        let mut probes = tokio::task::JoinSet::new();
        for (i, pop) in zone.pops.iter().enumerate() {
            match pop.health.as_deref().and_then(HealthUrl::parse) {
                Some(url) => {
                    let timeout = zone.health_timeout;
                    probes.spawn(async move { (i, health::probe(&url, timeout).await) });
                }
                None => {
                    // No health URL: always in answers.
                    let changed = serving
                        .health
                        .get(i)
                        .is_some_and(|flag| !flag.swap(true, Ordering::Relaxed));
                    set_health(&shared, &serving, i, true, changed);
                }
            }
        }
        while let Some(result) = probes.join_next().await {
            let Ok((i, passed)) = result else {
                continue;
            };
            let Some(pop) = zone.pops.get(i) else {
                continue;
            };
            let changed = shared.health.record_probe(
                &pop.name,
                passed,
                zone.healthy_after,
                zone.unhealthy_after,
            );
            let up = PopHealth::is_healthy(&shared.health.state(&pop.name));
            set_health(&shared, &serving, i, up, changed.is_some());
        }
        tokio::select! {
            _ = tokio::time::sleep(zone.health_interval) => {}
            _ = shared.reloaded.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Publishes PoP `pop`'s verdict `up` (already in its flag); `changed`: it just flipped.
fn set_health(shared: &Shared, serving: &Serving, pop: usize, up: bool, changed: bool) {
    let Some(zone_pop) = serving.zone.pops.get(pop) else {
        return;
    };
    if changed {
        if up {
            tracing::info!(pop = %zone_pop.name, "PoP healthy again: back in DNS answers");
        } else {
            tracing::warn!(pop = %zone_pop.name, "PoP health check failed: out of DNS answers");
        }
    }
    shared
        .metrics
        .pop_healthy
        .with_label_values(&[&zone_pop.name])
        .set(i64::from(up));
}
