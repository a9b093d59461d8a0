//! Signed GeoDNS checked by a real validator: BIND's `delv`, anchored at the zone with the DS that
//! `meridian dns ds` prints, asks the edge's GeoDNS from test-world resolver addresses (one per
//! PoP the zone can answer with) and must call every answer, NXDOMAIN and NODATA "fully
//! validated". Raw queries check that the DO bit is honoured.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use meridian_config::{Config, DnsDnssec, HumanDuration};
use meridian_gateway::dns::dnssec;
use meridian_tests::{local_config, World};

/// Test-world resolver → the PoP address its nearest PoP answers with (`examples/local.toml`).
const EXPECTED: &[(&str, &str)] = &[
    ("127.10.0.53", "127.2.1.1"),
    ("127.11.0.53", "127.2.2.1"),
    ("127.12.0.53", "127.2.3.1"),
    ("127.13.0.53", "127.2.4.1"),
    ("127.14.0.53", "127.2.5.1"),
    ("127.15.0.53", "127.2.6.1"),
    ("127.16.0.53", "127.2.7.1"),
    ("127.17.0.53", "127.2.8.1"),
];

/// `examples/local.toml` signed with a key written to `dir`, PoP health checks and rate limiting
/// off (a validator asks the same names many times from one address).
fn signed_config(dir: &Path) -> Config {
    let key_file = dir.join("zone.key");
    std::fs::write(&key_file, dnssec::keygen().expect("keygen")).expect("write key");
    let mut config = local_config();
    for pop in &mut config.pops {
        pop.health = None;
    }
    let dns = config.dns.as_mut().expect("[dns] in examples/local.toml");
    dns.health.interval = HumanDuration::millis(50);
    dns.rrl.responses_per_second = 0;
    dns.glue.insert(
        "ns1.example.test".into(),
        vec!["127.0.0.53".into(), "2001:db8::53".into()],
    );
    dns.dnssec = Some(DnsDnssec {
        key_file: key_file.display().to_string(),
        published_key_files: Vec::new(),
        algorithm: "ECDSAP256SHA256".into(),
    });
    config.validate().expect("signed config validates");
    config
}

/// The trust anchor file for `delv -a`, from the DS line `meridian dns ds` prints.
fn write_anchor(config: &Config, dir: &Path) -> std::path::PathBuf {
    let printed = dnssec::ds_records(config).expect("ds");
    let ds = printed.lines().next().expect("a DS line");
    // "example.test. IN DS <tag> 13 2 <hex>"
    let fields: Vec<&str> = ds.split_whitespace().collect();
    assert_eq!(&fields[1..3], ["IN", "DS"], "{ds}");
    let anchor = format!(
        "trust-anchors {{ \"{}\" static-ds {} {} {} \"{}\"; }};\n",
        fields[0], fields[3], fields[4], fields[5], fields[6]
    );
    let path = dir.join("anchor.conf");
    std::fs::write(&path, anchor).expect("write anchor");
    path
}

/// Runs `delv` against `server` from `source`; returns its output (stdout + stderr).
fn delv(server: SocketAddr, source: &str, anchor: &Path, name: &str, qtype: &str) -> String {
    let output = Command::new("delv")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args(["-b", source])
        .arg("-a")
        .arg(anchor)
        .arg("+root=example.test")
        .args([name, qtype])
        .output()
        .expect("delv runs (package bind9-dnsutils)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn delv_available() -> bool {
    Command::new("delv").arg("-v").output().is_ok()
}

/// A running edge with a signed zone, the trust anchor for its key and its DNS address.
struct SignedWorld {
    _dir: tempfile::TempDir,
    anchor: std::path::PathBuf,
    /// Held for the edge to keep running.
    _world: World,
    server: SocketAddr,
}

impl SignedWorld {
    /// `None` (the test skips) without `delv`: test.sh installs bind9-dnsutils, a bare
    /// `cargo test` elsewhere may not have it.
    fn start() -> Option<Self> {
        if !delv_available() {
            eprintln!("delv not installed: skipping the validator check");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let config = signed_config(dir.path());
        let anchor = write_anchor(&config, dir.path());
        let world = World::start(config);
        let server = world.edge.dns_addr.expect("the edge runs GeoDNS");
        Some(Self {
            _dir: dir,
            anchor,
            _world: world,
            server,
        })
    }
}

#[test]
fn delv_fully_validates_every_pop_variant_nxdomain_and_nodata() {
    let Some(signed) = SignedWorld::start() else {
        return;
    };
    let (anchor, server) = (signed.anchor.clone(), signed.server);

    for (source, pop) in EXPECTED {
        let out = delv(server, source, &anchor, "api.example.test.", "A");
        assert!(out.contains("; fully validated"), "{source}: {out}");
        assert!(out.contains(pop), "{source} answered {pop}: {out}");
        assert!(out.contains("RRSIG"), "{source}: {out}");
    }
    let out = delv(
        server,
        "127.17.0.53",
        &anchor,
        "static.example.test.",
        "AAAA",
    );
    assert!(out.contains("; fully validated"), "AAAA: {out}");
    let out = delv(server, "127.17.0.53", &anchor, "example.test.", "SOA");
    assert!(out.contains("; fully validated"), "SOA: {out}");
    let out = delv(server, "127.17.0.53", &anchor, "example.test.", "NS");
    assert!(out.contains("; fully validated"), "NS: {out}");
    // Asked for by type, a name's NSEC record is its answer (signed), not NODATA.
    for name in ["api.example.test.", "example.test."] {
        let out = delv(server, "127.17.0.53", &anchor, name, "NSEC");
        assert!(
            out.contains("; fully validated") && !out.contains("negative response"),
            "NSEC {name}: {out}"
        );
        assert!(
            out.lines().any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.first() == Some(&name) && fields.get(3) == Some(&"NSEC")
            }),
            "NSEC {name} answered: {out}"
        );
    }
    // The in-zone name server's own addresses (also sent as glue with the NS records).
    for qtype in ["A", "AAAA"] {
        let out = delv(server, "127.17.0.53", &anchor, "ns1.example.test.", qtype);
        assert!(out.contains("; fully validated"), "ns1 {qtype}: {out}");
    }

    // Denial of existence: a name that does not exist (before, between and after the zone's
    // names in canonical order) and names that exist without the asked type.
    for name in [
        "nope.example.test.",
        "0.example.test.",
        "zzz.example.test.",
        "deep.er.api.example.test.",
    ] {
        let out = delv(server, "127.15.0.53", &anchor, name, "A");
        assert!(
            out.contains("; negative response, fully validated"),
            "NXDOMAIN {name}: {out}"
        );
        assert!(
            out.contains("NXDOMAIN") || out.contains("ncache nxdomain"),
            "{name}: {out}"
        );
    }
    for (name, qtype) in [
        ("api.example.test.", "MX"),
        ("example.test.", "TXT"),
        ("example.test.", "A"),
    ] {
        let out = delv(server, "127.15.0.53", &anchor, name, qtype);
        assert!(
            out.contains("; negative response, fully validated"),
            "NODATA {name} {qtype}: {out}"
        );
    }

    // A key the zone does not use as the anchor: validation must fail (the check is real).
    let other = tempfile::tempdir().expect("tempdir");
    let wrong = write_anchor(&signed_config(other.path()), other.path());
    let out = delv(server, "127.15.0.53", &wrong, "api.example.test.", "A");
    assert!(!out.contains("; fully validated"), "wrong anchor: {out}");
}

fn query(name: &str, qtype: RecordType, dnssec_ok: bool) -> Message {
    let mut message = Message::query();
    message.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    edns.set_dnssec_ok(dnssec_ok);
    message.set_edns(edns);
    message
}

async fn exchange(server: SocketAddr, source: IpAddr, message: &Message) -> Message {
    let socket = tokio::net::UdpSocket::bind((source, 0))
        .await
        .expect("bind source");
    let bytes = message.to_vec().expect("encodes");
    let mut buffer = vec![0u8; 65_535];
    loop {
        socket.send_to(&bytes, server).await.expect("send");
        if let Ok(received) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buffer)).await
        {
            let len = received.expect("recv").0;
            return Message::from_vec(&buffer[..len]).expect("answer decodes");
        }
    }
}

#[test]
fn the_do_bit_decides_whether_dnssec_records_are_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world = World::start(signed_config(dir.path()));
    let server = world.edge.dns_addr.expect("the edge runs GeoDNS");
    let korea: IpAddr = "127.15.0.53".parse().expect("ip");
    let ask = |name: &str, qtype: RecordType, dnssec_ok: bool| {
        let message = query(name, qtype, dnssec_ok);
        world.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), exchange(server, korea, &message)).await
        })
    };
    let types = |records: &[hickory_proto::rr::Record]| -> Vec<RecordType> {
        records.iter().map(|r| r.record_type()).collect()
    };

    let plain = ask("api.example.test.", RecordType::A, false).expect("answer");
    assert_eq!(types(&plain.answers), [RecordType::A]);
    assert!(!plain.edns.as_ref().expect("edns").flags().dnssec_ok);
    let signed = ask("api.example.test.", RecordType::A, true).expect("answer");
    assert_eq!(types(&signed.answers), [RecordType::A, RecordType::RRSIG]);
    assert!(signed.edns.as_ref().expect("edns").flags().dnssec_ok);
    match &signed.answers[0].data {
        RData::A(a) => assert_eq!(a.0.to_string(), "127.2.6.1"),
        other => panic!("{other:?}"),
    }

    let denied = ask("nope.example.test.", RecordType::A, true).expect("answer");
    let authority = types(&denied.authorities);
    assert!(authority.contains(&RecordType::NSEC), "{authority:?}");
    assert!(authority.contains(&RecordType::RRSIG), "{authority:?}");
    let denied = ask("nope.example.test.", RecordType::A, false).expect("answer");
    assert_eq!(types(&denied.authorities), [RecordType::SOA]);

    // Glue: the in-zone name server's addresses, signed, in the additional section.
    let ns = ask("example.test.", RecordType::NS, true).expect("answer");
    assert_eq!(types(&ns.answers), [RecordType::NS, RecordType::RRSIG]);
    assert_eq!(
        types(&ns.additionals),
        [
            RecordType::A,
            RecordType::RRSIG,
            RecordType::AAAA,
            RecordType::RRSIG
        ]
    );

    // The apex DNSKEY is there with or without DO (resolvers fetch it to validate).
    let keys = ask("example.test.", RecordType::DNSKEY, false).expect("answer");
    assert_eq!(types(&keys.answers), [RecordType::DNSKEY]);
    let keys = ask("example.test.", RecordType::DNSKEY, true).expect("answer");
    assert_eq!(
        types(&keys.answers),
        [RecordType::DNSKEY, RecordType::RRSIG]
    );
}

/// `dig +dnssec` against `server` from `source`; the answer section only.
fn dig_answers(server: SocketAddr, source: &str, name: &str, qtype: &str) -> Vec<String> {
    let output = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args(["-b", source])
        .args(["+dnssec", "+noall", "+answer", "+nocomments"])
        .args([name, qtype])
        .output()
        .expect("dig runs (package bind9-dnsutils)");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(';'))
        .map(str::to_string)
        .collect()
}

/// The RRSIG records in `lines` (dig or delv presentation format), owner and data only: the
/// TTL (delv may print a lower one) and the line breaks inside a signature do not count.
fn rrsigs(lines: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut found: Vec<String> = lines
        .into_iter()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // The record type follows the class (an NSEC's type list names RRSIG too).
            let at = fields.windows(2).position(|w| w == ["IN", "RRSIG"])? + 1;
            (at >= 2).then(|| format!("{} {}", fields[0], fields[at + 1..].concat()))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Asked for by type, the signatures at a name are its answer, not NODATA: for test-world
/// resolvers, `dig RRSIG` returns exactly the signatures that `delv` fully validates over the
/// name's sets as that resolver gets them.
#[test]
fn rrsig_by_type_returns_the_signatures_a_validator_accepts() {
    let Some(signed) = SignedWorld::start() else {
        return;
    };
    let (anchor, server) = (signed.anchor.clone(), signed.server);
    let validated = |source: &str, name: &str, qtype: &str| {
        let out = delv(server, source, &anchor, name, qtype);
        assert!(
            out.contains("; fully validated") && !out.contains("negative response"),
            "{name} {qtype} from {source}: {out}"
        );
        rrsigs(out.lines().map(str::to_string))
    };
    for (source, _) in EXPECTED.iter().take(3) {
        for (name, types) in [
            ("api.example.test.", &["A", "AAAA", "NSEC"][..]),
            ("ns1.example.test.", &["A", "AAAA", "NSEC"][..]),
            ("example.test.", &["SOA", "NS", "DNSKEY", "NSEC"][..]),
        ] {
            let answered = rrsigs(dig_answers(server, source, name, "RRSIG"));
            let mut expected: Vec<String> = types
                .iter()
                .flat_map(|qtype| validated(source, name, qtype))
                .collect();
            expected.sort();
            expected.dedup();
            assert_eq!(
                answered.len(),
                types.len(),
                "{name} from {source}: {answered:?}"
            );
            assert_eq!(answered, expected, "{name} RRSIG from {source}");
        }
    }
}

/// The DNSKEY records the server publishes right now, once there are `count` of them (a pushed
/// config reaches the DNS workers shortly after the edge reports its version).
fn dnskeys_eventually(world: &World, server: SocketAddr, count: usize) -> Vec<String> {
    let korea: IpAddr = "127.15.0.53".parse().expect("ip");
    let message = query("example.test.", RecordType::DNSKEY, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = world
            .runtime
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), exchange(server, korea, &message))
                    .await
            })
            .expect("answer");
        let keys: Vec<String> = reply
            .answers
            .iter()
            .filter(|r| r.record_type() == RecordType::DNSKEY)
            .map(|r| format!("{:?}", r.data))
            .collect();
        if keys.len() == count || std::time::Instant::now() > deadline {
            return keys;
        }
        std::thread::yield_now();
    }
}

/// The key tag of the signature over `name`'s A set, as `server` answers with DO.
fn signing_tag(world: &World, server: SocketAddr, name: &str) -> u16 {
    let korea: IpAddr = "127.15.0.53".parse().expect("ip");
    let message = query(name, RecordType::A, true);
    let reply = world
        .runtime
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(10), exchange(server, korea, &message)).await
        })
        .expect("answer");
    let sig = reply
        .answers
        .iter()
        .find(|r| r.record_type() == RecordType::RRSIG)
        .expect("a signature");
    let RData::Unknown { rdata, .. } = &sig.data else {
        panic!("RRSIG decodes as opaque data: {sig:?}");
    };
    let bytes = rdata.anything.as_slice();
    u16::from_be_bytes([bytes[16], bytes[17]])
}

/// A zone signing key rollover as the runbook describes it, through config pushes to a running
/// edge: publish the new key, switch signing to it, retire the old one. A validator anchored at
/// the old key's DS validates until the old key is retired, one anchored at the new key's DS from
/// the moment it is published: with the parent's DS changed in between, no resolver sees a gap.
/// `meridian dns ds` prints a DS for every configured key.
#[test]
fn a_key_rollover_validates_at_every_step() {
    if !delv_available() {
        eprintln!("delv not installed: skipping the validator check");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let old_dir = dir.path().join("old");
    let new_dir = dir.path().join("new");
    std::fs::create_dir_all(&old_dir).expect("mkdir");
    std::fs::create_dir_all(&new_dir).expect("mkdir");
    let config = signed_config(&old_dir);
    let new_config = signed_config(&new_dir);
    let old_anchor = write_anchor(&config, &old_dir);
    let new_anchor = write_anchor(&new_config, &new_dir);
    let old_key = config
        .dns
        .as_ref()
        .and_then(|d| d.dnssec.clone())
        .expect("key")
        .key_file;
    let new_key = new_config
        .dns
        .as_ref()
        .and_then(|d| d.dnssec.clone())
        .expect("key")
        .key_file;
    let tag = |key: &str| {
        dnssec::SigningKey::load(Path::new(key))
            .expect("loads")
            .key_tag()
    };
    let (old_tag, new_tag) = (tag(&old_key), tag(&new_key));

    let world = World::start_following(config);
    // What the edge follows (ephemeral ports, the test-world database), changed step by step.
    let mut config = world.config.clone();
    let server = world.edge.dns_addr.expect("the edge runs GeoDNS");
    let validates = |anchor: &Path| {
        let answer = delv(server, "127.15.0.53", anchor, "api.example.test.", "A");
        let keys = delv(server, "127.15.0.53", anchor, "example.test.", "DNSKEY");
        let denial = delv(server, "127.15.0.53", anchor, "nope.example.test.", "A");
        answer.contains("; fully validated")
            && keys.contains("; fully validated")
            && denial.contains("; negative response, fully validated")
    };
    let mut step = |key_file: &str, published: &[&str], message: &str| {
        let dnssec = config
            .dns
            .as_mut()
            .and_then(|d| d.dnssec.as_mut())
            .expect("[dns.dnssec]");
        dnssec.key_file = key_file.to_string();
        dnssec.published_key_files = published.iter().map(|p| p.to_string()).collect();
        config.validate().expect("rollover config validates");
        let version = world.push(&config, message);
        assert_eq!(
            world.wait_for_version(&world.edge, version),
            version,
            "{message}"
        );
        assert_eq!(
            dnskeys_eventually(&world, server, 1 + published.len()).len(),
            1 + published.len(),
            "{message}: DNSKEY set"
        );
        let printed = dnssec::ds_records(&config).expect("ds");
        let ds_lines = printed.lines().filter(|l| l.contains(" IN DS ")).count();
        assert_eq!(ds_lines, 1 + published.len(), "{message}: {printed}");
    };

    // Before: only the old key.
    assert!(validates(&old_anchor), "old key alone");
    assert!(!validates(&new_anchor), "the new key is not published yet");
    assert_eq!(signing_tag(&world, server, "api.example.test."), old_tag);

    // 1. Publish the new key: both DS validate, the old key still signs the answers.
    step(&old_key, &[&new_key], "publish the new key");
    assert!(validates(&old_anchor), "published: old DS");
    assert!(validates(&new_anchor), "published: new DS");
    assert_eq!(signing_tag(&world, server, "api.example.test."), old_tag);

    // 2. Switch: the new key signs, the old one stays published.
    step(&new_key, &[&old_key], "sign with the new key");
    assert!(validates(&old_anchor), "switched: old DS");
    assert!(validates(&new_anchor), "switched: new DS");
    assert_eq!(signing_tag(&world, server, "api.example.test."), new_tag);

    // 3. Retire the old key (after the parent dropped its DS): the new DS alone validates.
    step(&new_key, &[], "retire the old key");
    assert!(validates(&new_anchor), "retired: new DS");
    assert!(
        !validates(&old_anchor),
        "retired: the old DS no longer leads anywhere"
    );
}
