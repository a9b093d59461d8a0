//! GeoDNS end to end through real sockets: test-world resolvers (bound to 127.X.0.Y source
//! addresses) query the edge's DNS listener over UDP and TCP with raw hickory-proto messages.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use meridian_config::{Config, DnsRecord, GeoPoint, HumanDuration, Pop};
use meridian_tests::{local_config, metric_value, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Test-world country → the PoP address GeoDNS should answer (nearest PoP in `examples/local.toml`).
const EXPECTED: &[(&str, &str, &str)] = &[
    ("127.10.0.0", "MX", "127.2.1.1"),
    ("127.11.0.0", "US", "127.2.2.1"),
    ("127.12.0.0", "SG", "127.2.3.1"),
    ("127.13.0.0", "MY", "127.2.4.1"),
    ("127.14.0.0", "TH", "127.2.5.1"),
    ("127.15.0.0", "KR", "127.2.6.1"),
    ("127.16.0.0", "PH", "127.2.7.1"),
    ("127.17.0.0", "DE", "127.2.8.1"),
    ("127.18.0.0", "JP", "127.2.6.1"), // no PoP in Japan: Seoul is nearest
];

const WAIT: Duration = Duration::from_secs(10);

/// `examples/local.toml` with PoP health checks off (tests turn on the ones they control) and a
/// fast probe interval.
fn dns_config() -> Config {
    let mut config = local_config();
    for pop in &mut config.pops {
        pop.health = None;
    }
    let dns = config.dns.as_mut().expect("[dns] in examples/local.toml");
    dns.health.interval = HumanDuration::millis(50);
    dns.health.timeout = HumanDuration::millis(500);
    // These tests ask the same question from one address faster than any caching resolver would;
    // rate limiting has its own test.
    dns.rrl.responses_per_second = 0;
    config
}

fn dns_addr(world: &World) -> SocketAddr {
    world.edge.dns_addr.expect("the edge runs GeoDNS")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    message
}

fn with_subnet(mut message: Message, subnet: &str) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    let subnet: ClientSubnet = subnet.parse().expect("subnet");
    edns.options_mut().insert(EdnsOption::Subnet(subnet));
    message.set_edns(edns);
    message
}

async fn udp_exchange(server: SocketAddr, source: IpAddr, message: &Message) -> Message {
    let socket = tokio::net::UdpSocket::bind((source, 0))
        .await
        .expect("bind source");
    let bytes = message.to_vec().expect("encodes");
    let mut buffer = vec![0u8; 65_535];
    // Resend like a real resolver: UDP may drop a query (e.g. right after a flood filled the
    // server's receive queue); the overall bound stays WAIT.
    let deadline = tokio::time::Instant::now() + WAIT;
    let len = loop {
        socket.send_to(&bytes, server).await.expect("send");
        match tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buffer)).await
        {
            Ok(received) => break received.expect("recv").0,
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "an answer within the bound"
            ),
        }
    };
    let reply = Message::from_vec(&buffer[..len]).expect("answer decodes");
    assert_eq!(reply.metadata.id, message.metadata.id);
    reply
}

async fn tcp_exchange(server: SocketAddr, source: IpAddr, message: &Message) -> Message {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind source");
    let mut stream = socket.connect(server).await.expect("connect");
    let bytes = message.to_vec().expect("encodes");
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await.expect("write");
    let read = async {
        let mut length = [0u8; 2];
        stream.read_exact(&mut length).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(WAIT, read)
        .await
        .expect("an answer within the bound")
        .expect("read");
    Message::from_vec(&reply).expect("answer decodes")
}

fn udp(world: &World, source: IpAddr, message: &Message) -> Message {
    world
        .runtime
        .block_on(udp_exchange(dns_addr(world), source, message))
}

fn tcp(world: &World, source: IpAddr, message: &Message) -> Message {
    world
        .runtime
        .block_on(tcp_exchange(dns_addr(world), source, message))
}

fn addresses(reply: &Message) -> Vec<String> {
    reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

fn scope(reply: &Message) -> Option<(u8, u8)> {
    match reply.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(s) => Some((s.source_prefix(), s.scope_prefix())),
        _ => None,
    }
}

/// Asks `name A` from `source` until the answer is `expected` (bounded); returns the last answer.
fn answer_eventually(world: &World, source: IpAddr, name: &str, expected: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = addresses(&udp(world, source, &query(name, RecordType::A)));
        if seen == expected || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(world: &World, series: &str) -> Option<f64> {
    metric_value(&world.metrics(), series)
}

#[test]
fn every_test_world_client_gets_its_nearest_pop_by_subnet_and_by_resolver_address() {
    let world = World::start(dns_config());
    for (network, country, pop) in EXPECTED {
        let client: Ipv4Addr = network.parse().expect("network");
        let [a, b, _, _] = client.octets();
        let resolver = IpAddr::V4(Ipv4Addr::new(a, b, 0, 53));

        // The resolver's own address places the client.
        let reply = udp(&world, resolver, &query("api.example.test.", RecordType::A));
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NoError,
            "{country}"
        );
        assert!(reply.metadata.authoritative, "{country}");
        assert!(!reply.metadata.recursion_available, "{country}");
        assert_eq!(addresses(&reply), [*pop], "{country} by resolver address");

        // ECS: a resolver at 127.0.0.1 (unknown location) asks for a client in this country.
        let reply = udp(
            &world,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            &with_subnet(
                query("api.example.test.", RecordType::A),
                &format!("{network}/24"),
            ),
        );
        assert_eq!(addresses(&reply), [*pop], "{country} by client subnet");
        assert_eq!(scope(&reply), Some((24, 24)), "{country}: scope prefix");
    }
    // The example, over TCP too, and AAAA.
    let seoul = with_subnet(query("api.example.test.", RecordType::A), "127.15.0.0/24");
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    assert_eq!(addresses(&tcp(&world, localhost, &seoul)), ["127.2.6.1"]);
    let aaaa = with_subnet(
        query("api.example.test.", RecordType::AAAA),
        "127.15.0.0/24",
    );
    assert_eq!(addresses(&udp(&world, localhost, &aaaa)), ["2001:db8:6::1"]);
    // Unknown location: the default PoP (Virginia).
    let reply = udp(
        &world,
        localhost,
        &query("api.example.test.", RecordType::A),
    );
    assert_eq!(addresses(&reply), ["127.2.2.1"]);
    assert_eq!(scope(&reply), None, "no ECS asked, none answered");
    // A record restricted to some PoPs: Seoul clients get the nearest of those (Singapore).
    let reply = udp(
        &world,
        ip("127.15.0.53"),
        &query("static.example.test.", RecordType::A),
    );
    assert_eq!(addresses(&reply), ["127.2.3.1"]);

    // Metrics: 2 Seoul answers per KR/JP client, plus the TCP, AAAA and static queries above.
    // A UDP worker publishes its counts within moments (at once only on TCP): read until they add up.
    assert_eq!(
        world.metric_eventually("meridian_dns_answers_total{pop=\"seoul\"}", 6.0),
        Some(6.0)
    );
    let udp_a = 2.0 * EXPECTED.len() as f64 + 2.0;
    assert_eq!(
        world.metric_eventually(
            "meridian_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",transport=\"udp\"}",
            udp_a
        ),
        Some(udp_a)
    );
    assert_eq!(
        metric(
            &world,
            "meridian_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",transport=\"tcp\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&world, "meridian_pop_healthy{pop=\"seoul\"}"),
        Some(1.0)
    );
    let text = world.metrics();
    assert!(text.contains("meridian_dns_request_duration_seconds_count"));
}

#[test]
fn pinned_workers_steered_by_cpu_answer_every_client() {
    let mut config = dns_config();
    let dns = config.dns.as_mut().expect("[dns]");
    dns.workers = 2;
    dns.pin_workers = true;
    let world = World::start(config);
    // Several rounds: the client sockets (and the CPUs the kernel receives on) vary.
    for _ in 0..4 {
        for (network, country, pop) in EXPECTED {
            let client: Ipv4Addr = network.parse().expect("network");
            let [a, b, _, _] = client.octets();
            let resolver = IpAddr::V4(Ipv4Addr::new(a, b, 0, 53));
            let reply = udp(&world, resolver, &query("api.example.test.", RecordType::A));
            assert_eq!(addresses(&reply), [*pop], "{country} with pinned workers");
        }
    }
}

#[test]
fn nxdomain_inside_the_zone_refused_outside_and_soa_ns_at_the_apex() {
    let world = World::start(dns_config());
    let source = ip("127.17.0.53");
    let reply = udp(&world, source, &query("nope.example.test.", RecordType::A));
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(reply.metadata.authoritative);
    assert!(
        matches!(
            reply.authorities.first().map(|r| &r.data),
            Some(RData::SOA(_))
        ),
        "SOA in authority: {reply:?}"
    );
    for outside in ["example.com.", "api.example.test.evil.test.", "."] {
        let reply = udp(&world, source, &query(outside, RecordType::A));
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::Refused,
            "{outside}"
        );
        assert!(reply.answers.is_empty() && !reply.metadata.recursion_available);
    }
    let mut chaos = query("version.bind.", RecordType::TXT);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(
        udp(&world, source, &chaos).metadata.response_code,
        ResponseCode::Refused
    );
    let soa = tcp(&world, source, &query("example.test.", RecordType::SOA));
    assert!(matches!(
        soa.answers.first().map(|r| &r.data),
        Some(RData::SOA(_))
    ));
    let ns = udp(&world, source, &query("example.test.", RecordType::NS));
    match ns.answers.first().map(|r| &r.data) {
        Some(RData::NS(name)) => assert_eq!(name.0.to_ascii(), "ns1.example.test."),
        other => panic!("NS at the apex: {other:?}"),
    }
    assert_eq!(
        world.metric_eventually(
            "meridian_dns_queries_total{qtype=\"A\",rcode=\"NXDOMAIN\",transport=\"udp\"}",
            1.0
        ),
        Some(1.0)
    );
    assert_eq!(
        world.metric_eventually(
            "meridian_dns_queries_total{qtype=\"A\",rcode=\"REFUSED\",transport=\"udp\"}",
            3.0
        ),
        Some(3.0)
    );
}

#[test]
fn a_large_answer_is_truncated_on_udp_and_whole_over_tcp() {
    let mut config = dns_config();
    config.pops.push(Pop {
        name: "big".into(),
        location: GeoPoint {
            lat: 37.57,
            lon: 126.98,
        },
        addresses: (1..=40).map(|i| format!("127.2.9.{i}")).collect(),
        health: None,
    });
    let dns = config.dns.as_mut().expect("[dns]");
    dns.records.push(DnsRecord {
        name: "big".into(),
        pops: vec!["big".into()],
        weights: Default::default(),
    });
    let world = World::start(config);
    let source = ip("127.15.0.53");
    let plain = query("big.example.test.", RecordType::A);
    let reply = udp(&world, source, &plain);
    assert!(reply.metadata.truncation, "TC on a 512-byte UDP answer");
    assert!(reply.answers.is_empty());
    let reply = tcp(&world, source, &plain);
    assert!(!reply.metadata.truncation);
    assert_eq!(addresses(&reply).len(), 40);
    // EDNS0 with a 1232-byte buffer: it fits, no truncation.
    let reply = udp(&world, source, &with_subnet(plain, "127.15.0.0/24"));
    assert!(!reply.metadata.truncation);
    assert_eq!(addresses(&reply).len(), 40);
}

#[test]
fn a_pop_health_failure_moves_answers_and_recovery_brings_them_back() {
    let probes = tokio::runtime::Runtime::new().expect("runtime");
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let health = probes
        .block_on(meridian_testkit::origin::spawn(
            "seoul-pop",
            "127.2.250.1:0".parse().expect("addr"),
            stop_rx,
        ))
        .expect("health endpoint");
    let mut config = dns_config();
    for pop in &mut config.pops {
        if pop.name == "seoul" {
            pop.health = Some(format!("http://{}/healthz", health.address));
        }
    }
    let dns = config.dns.as_mut().expect("[dns]");
    dns.records.push(DnsRecord {
        name: "solo".into(),
        pops: vec!["seoul".into()],
        weights: Default::default(),
    });
    let world = World::start(config);
    let korea = ip("127.15.0.53");
    assert_eq!(
        answer_eventually(&world, korea, "api.example.test.", &["127.2.6.1"]),
        ["127.2.6.1"]
    );

    health.set_up(false);
    // Next nearest to Seoul is Manila.
    assert_eq!(
        answer_eventually(&world, korea, "api.example.test.", &["127.2.7.1"]),
        ["127.2.7.1"]
    );
    assert_eq!(
        metric(&world, "meridian_pop_healthy{pop=\"seoul\"}"),
        Some(0.0)
    );
    // A name served only by the down PoP fails open, and says so.
    let before = metric(&world, "meridian_dns_fail_open_total").unwrap_or(0.0);
    assert_eq!(
        addresses(&udp(
            &world,
            korea,
            &query("solo.example.test.", RecordType::A)
        )),
        ["127.2.6.1"]
    );
    assert_eq!(
        metric(&world, "meridian_dns_fail_open_total"),
        Some(before + 1.0)
    );

    health.set_up(true);
    assert_eq!(
        answer_eventually(&world, korea, "api.example.test.", &["127.2.6.1"]),
        ["127.2.6.1"]
    );
    assert_eq!(
        metric(&world, "meridian_pop_healthy{pop=\"seoul\"}"),
        Some(1.0)
    );
}

#[test]
fn the_zone_follows_config_pushes() {
    let world = World::start_following(dns_config());
    let korea = ip("127.15.0.53");
    assert_eq!(
        addresses(&udp(
            &world,
            korea,
            &query("api.example.test.", RecordType::A)
        )),
        ["127.2.6.1"]
    );
    let mut next = world.config.clone();
    for pop in &mut next.pops {
        if pop.name == "seoul" {
            pop.addresses = vec!["127.2.6.99".into()];
        }
    }
    next.dns.as_mut().expect("[dns]").records.push(DnsRecord {
        name: "new".into(),
        pops: Vec::new(),
        weights: Default::default(),
    });
    world.push(&next, "move seoul, add new.example.test");
    assert_eq!(
        answer_eventually(&world, korea, "new.example.test.", &["127.2.6.99"]),
        ["127.2.6.99"]
    );
    assert_eq!(
        addresses(&udp(
            &world,
            korea,
            &query("api.example.test.", RecordType::A)
        )),
        ["127.2.6.99"]
    );
}

#[test]
fn malformed_truncated_wrong_class_and_random_packets_never_crash_or_stall_the_server() {
    let world = World::start(dns_config());
    let server = dns_addr(&world);
    let valid = query("api.example.test.", RecordType::A)
        .to_vec()
        .expect("encodes");
    let mut chaos = query("api.example.test.", RecordType::A);
    chaos.queries[0].set_query_class(DNSClass::CH);
    let chaos = chaos.to_vec().expect("encodes");
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let packets: Vec<Vec<u8>> = (0..3000)
        .map(|i| match i % 5 {
            0 => valid[..(next() as usize % valid.len())].to_vec(), // truncated
            1 => chaos.clone(),                                     // wrong class
            2 => {
                let mut p = valid.clone(); // flipped bytes in a valid query
                let at = next() as usize % p.len();
                p[at] ^= next() as u8 | 1;
                p
            }
            3 => vec![0u8; next() as usize % 12], // shorter than a header
            _ => (0..next() % 600).map(|_| next() as u8).collect(), // random bytes
        })
        .collect();
    world.runtime.block_on(async {
        let socket = tokio::net::UdpSocket::bind("127.13.0.66:0")
            .await
            .expect("bind");
        for packet in &packets {
            socket.send_to(packet, server).await.expect("send");
        }
        // TCP: garbage frames, a frame longer than what follows, a bare length byte.
        for packet in packets.iter().take(50) {
            let mut stream = tokio::net::TcpStream::connect(server)
                .await
                .expect("connect");
            let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(packet);
            let _ = stream.write_all(&framed).await;
            let _ = stream.write_all(&[0xff, 0xff, 1, 2, 3]).await;
            drop(stream);
        }
        let mut half = tokio::net::TcpStream::connect(server)
            .await
            .expect("connect");
        let _ = half.write_all(&[0x00]).await;
        drop(half);
    });
    // Still answering, on both transports.
    let source = ip("127.17.0.53");
    let probe = query("api.example.test.", RecordType::A);
    assert_eq!(addresses(&udp(&world, source, &probe)), ["127.2.8.1"]);
    assert_eq!(addresses(&tcp(&world, source, &probe)), ["127.2.8.1"]);
    let refused = world.metric_at_least(
        "meridian_dns_queries_total{qtype=\"A\",rcode=\"REFUSED\",transport=\"udp\"}",
        1.0,
    );
    assert!(
        refused.unwrap_or(0.0) >= 1.0,
        "wrong-class queries refused: {refused:?}"
    );
    let formerr = world.metric_at_least(
        "meridian_dns_queries_total{qtype=\"none\",rcode=\"FORMERR\",transport=\"udp\"}",
        1.0,
    );
    assert!(
        formerr.unwrap_or(0.0) >= 1.0,
        "garbage answered FORMERR: {formerr:?}"
    );
}

#[test]
fn rate_limiting_answers_a_spoofed_flood_at_the_rate_and_leaves_other_clients_alone() {
    const FLOOD: usize = 60;
    const RATE: u32 = 5;
    let mut config = dns_config();
    let dns = config.dns.as_mut().expect("[dns]");
    dns.rrl.responses_per_second = RATE;
    dns.rrl.slip = 2;
    let world = World::start(config);
    let server = dns_addr(&world);
    let dropped = |world: &World| metric(world, "meridian_dns_rrl_total{action=\"dropped\"}");
    assert_eq!(
        dropped(&world),
        Some(0.0),
        "the series exists from the start"
    );

    // The "victim" 127.15.0.77: every query of the flood claims to come from there.
    let victim = std::net::UdpSocket::bind((ip("127.15.0.77"), 0)).expect("bind victim");
    victim
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let started = Instant::now();
    for id in 0..FLOOD {
        let mut message = query("api.example.test.", RecordType::A);
        message.metadata.id = id as u16;
        victim
            .send_to(&message.to_vec().expect("encodes"), server)
            .expect("send");
    }
    // Every query is either answered (in full or slipped) or counted as dropped: read until the
    // two add up.
    let (mut full, mut slipped) = (0usize, 0usize);
    let mut buffer = vec![0u8; 65_535];
    let deadline = Instant::now() + WAIT;
    loop {
        let dropped = dropped(&world).unwrap_or(0.0) as usize;
        if full + slipped + dropped >= FLOOD {
            break;
        }
        assert!(Instant::now() < deadline, "every flood query accounted for");
        if let Ok((len, _)) = victim.recv_from(&mut buffer) {
            let reply = Message::from_vec(&buffer[..len]).expect("decodes");
            if reply.metadata.truncation {
                assert!(reply.answers.is_empty(), "a slipped answer is empty");
                assert_eq!(reply.queries.len(), 1, "and echoes the question");
                slipped += 1;
            } else {
                assert_eq!(addresses(&reply), ["127.2.6.1"]);
                full += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    // The burst is one second of the rate; more only as time passes (refill at RATE per second).
    let refill = (elapsed.as_secs_f64() * f64::from(RATE)).ceil() as usize;
    assert!(
        (RATE as usize..=RATE as usize + refill).contains(&full),
        "{full} full answers in {elapsed:?}"
    );
    let limited = FLOOD - full;
    assert_eq!(slipped, limited / 2, "every 2nd limited answer slips");
    assert_eq!(
        dropped(&world),
        Some((limited - slipped) as f64),
        "the rest is dropped"
    );
    assert_eq!(
        world.metric_eventually("meridian_dns_rrl_total{action=\"slipped\"}", slipped as f64),
        Some(slipped as f64)
    );

    // Unaffected: another network asking the same name, the flooded network asking another
    // name, and the victim itself over TCP (which cannot be spoofed).
    assert_eq!(
        addresses(&udp(
            &world,
            ip("127.16.0.9"),
            &query("api.example.test.", RecordType::A)
        )),
        ["127.2.7.1"]
    );
    assert_eq!(
        addresses(&udp(
            &world,
            ip("127.15.0.9"),
            &query("static.example.test.", RecordType::A)
        )),
        ["127.2.3.1"]
    );
    assert_eq!(
        addresses(&tcp(
            &world,
            ip("127.15.0.77"),
            &query("api.example.test.", RecordType::A)
        )),
        ["127.2.6.1"]
    );
}

#[test]
fn bursts_from_many_clients_get_every_answer_whole_and_to_the_right_port() {
    // Several clients (two share an address and differ by port) each send a burst of mixed
    // questions without waiting, interleaved, so the server's batches hold many answers per
    // client, of equal and of different lengths: the ones that go out as one segmented send.
    const QUERIES: u16 = 60;
    let world = World::start(dns_config());
    let server = dns_addr(&world);
    // (source, api A, api AAAA, static A)
    let clients = [
        ("127.15.0.61", "127.2.6.1", "2001:db8:6::1", "127.2.3.1"),
        ("127.15.0.61", "127.2.6.1", "2001:db8:6::1", "127.2.3.1"),
        ("127.17.0.61", "127.2.8.1", "2001:db8:8::1", "127.2.8.1"),
        ("127.10.0.61", "127.2.1.1", "2001:db8:1::1", "127.2.2.1"),
    ];
    let questions = [
        ("api.example.test.", RecordType::A),
        ("api.example.test.", RecordType::AAAA),
        ("static.example.test.", RecordType::A),
        ("nope.example.test.", RecordType::A),
        ("example.test.", RecordType::SOA),
        ("api.example.test.", RecordType::A),
    ];
    let ask = |id: u16| {
        let (name, qtype) = questions[usize::from(id) % questions.len()];
        let mut message = query(name, qtype);
        message.metadata.id = id;
        message.to_vec().expect("encodes")
    };
    let sockets: Vec<std::net::UdpSocket> = clients
        .iter()
        .map(|(source, ..)| {
            let socket = std::net::UdpSocket::bind((ip(source), 0)).expect("bind client");
            socket
                .set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            socket
        })
        .collect();
    for id in 0..QUERIES {
        for socket in &sockets {
            socket.send_to(&ask(id), server).expect("send");
        }
    }
    let mut buffer = vec![0u8; 65_535];
    for (socket, (source, a, aaaa, static_a)) in sockets.iter().zip(clients) {
        let mut answered = vec![false; usize::from(QUERIES)];
        let deadline = Instant::now() + WAIT;
        while answered.contains(&false) {
            assert!(Instant::now() < deadline, "{source}: every query answered");
            let Ok((len, from)) = socket.recv_from(&mut buffer) else {
                // Like a resolver: ask again what is still missing (UDP may drop).
                for id in (0..QUERIES).filter(|&id| !answered[usize::from(id)]) {
                    socket.send_to(&ask(id), server).expect("resend");
                }
                continue;
            };
            assert_eq!(from, server);
            // Exactly one answer per datagram: a train the kernel did not cut would decode as
            // its first answer with the others left over.
            let mut decoder = BinDecoder::new(&buffer[..len]);
            let reply = Message::read(&mut decoder).expect("answer decodes");
            assert!(
                decoder.is_empty(),
                "{source}: {} bytes after one answer",
                decoder.len()
            );
            let id = reply.metadata.id;
            assert!(
                id < QUERIES,
                "{source}: an answer to a query of its own, id {id}"
            );
            let (name, qtype) = questions[usize::from(id) % questions.len()];
            assert_eq!(reply.queries.len(), 1);
            assert_eq!(reply.queries[0].name().to_ascii(), name, "id {id}");
            assert_eq!(reply.queries[0].query_type(), qtype, "id {id}");
            let expected = match (name, qtype) {
                ("api.example.test.", RecordType::A) => vec![a],
                ("api.example.test.", RecordType::AAAA) => vec![aaaa],
                ("static.example.test.", RecordType::A) => vec![static_a],
                _ => vec![],
            };
            assert_eq!(addresses(&reply), expected, "{source} id {id}");
            let rcode = if name == "nope.example.test." {
                ResponseCode::NXDomain
            } else {
                ResponseCode::NoError
            };
            assert_eq!(reply.metadata.response_code, rcode, "{source} id {id}");
            if qtype == RecordType::SOA {
                assert_eq!(reply.answers.len(), 1, "the apex SOA");
            }
            answered[usize::from(id)] = true;
        }
    }
}
