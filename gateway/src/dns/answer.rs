//! Query → answer, as a pure function: bytes in, bytes out, no sockets, no clock. The UDP and TCP
//! loops both call [`answer`]; unit tests call it with plain values.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA, NULL};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;

use super::dnssec::{self, Rr};
use super::fast::{self, pop_mask, RankCache};
use super::zone::{Steered, Zone};
use crate::core::geo::distance_km;

/// Largest UDP answer for a client without EDNS (RFC 1035).
pub const CLASSIC_UDP_LIMIT: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The outcome of one query: what to send (if anything) and what to count.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// `None`: drop the packet (too short to answer, or not a query at all).
    pub bytes: Option<Vec<u8>>,
    /// Bounded label set: `A`, `AAAA`, `SOA`, `NS`, `ANY`, `other`, `none`.
    pub qtype: &'static str,
    /// `NOERROR`, `NXDOMAIN`, `REFUSED`, `FORMERR`, `NOTIMP`, `SERVFAIL`, `BADVERS`, `dropped`.
    pub rcode: &'static str,
    /// PoP indices whose addresses are in the answer section.
    pub pops: Vec<usize>,
    /// Every candidate PoP was down, so all of them were answered.
    pub fail_open: bool,
    /// The UDP answer did not fit: TC set, client should retry over TCP.
    pub truncated: bool,
}

impl Answer {
    fn dropped() -> Self {
        Answer {
            bytes: None,
            qtype: "none",
            rcode: "dropped",
            pops: Vec::new(),
            fail_open: false,
            truncated: false,
        }
    }
}

/// Which PoPs to answer with, and whether that was a fail-open answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Steering {
    pub pops: Vec<usize>,
    pub fail_open: bool,
}

/// Picks the PoPs for a steered name: healthy candidates that have an address of the wanted family
/// (`want`: does this PoP have one?), the `zone.answers` nearest to `client` by great-circle distance
/// divided by the PoP's weight; for an unknown location the configured default PoPs (else the first
/// candidates). If no candidate is healthy, all candidates (fail open).
pub fn steer(
    zone: &Zone,
    record: &Steered,
    want: &dyn Fn(usize) -> bool,
    healthy: &dyn Fn(usize) -> bool,
    client: Option<(f64, f64)>,
) -> Steering {
    let candidates: Vec<(usize, f64)> = record
        .pops
        .iter()
        .zip(&record.weights)
        .filter(|(&p, _)| want(p))
        .map(|(&p, &w)| (p, w))
        .collect();
    let mut up: Vec<(usize, f64)> = candidates
        .iter()
        .copied()
        .filter(|&(p, _)| healthy(p))
        .collect();
    if up.is_empty() {
        return Steering {
            fail_open: !candidates.is_empty(),
            pops: candidates.into_iter().map(|(p, _)| p).collect(),
        };
    }
    let pops = match client {
        Some(location) => {
            let cost = |&(p, w): &(usize, f64)| distance_km(location, zone.pops[p].location) / w;
            up.sort_by(|a, b| cost(a).total_cmp(&cost(b)).then(a.0.cmp(&b.0)));
            up.into_iter().map(|(p, _)| p).take(zone.answers).collect()
        }
        None => {
            let defaults: Vec<usize> = zone
                .default_pops
                .iter()
                .copied()
                .filter(|d| up.iter().any(|&(p, _)| p == *d))
                .take(zone.answers)
                .collect();
            if defaults.is_empty() {
                up.into_iter().map(|(p, _)| p).take(zone.answers).collect()
            } else {
                defaults
            }
        }
    };
    Steering {
        pops,
        fail_open: false,
    }
}

/// Answers one DNS message received from `source` over `transport`.
///
/// `healthy(pop)` says whether a PoP (by index in `zone.pops`) is up; `locate(ip)` gives a client's
/// (lat, lon) from GeoIP. Never recurses, never panics on any input.
pub fn answer(
    zone: &Zone,
    request: &[u8],
    source: IpAddr,
    transport: Transport,
    healthy: &dyn Fn(usize) -> bool,
    locate: &dyn Fn(IpAddr) -> Option<(f64, f64)>,
) -> Answer {
    // A header we cannot read, or a response (QR set): never answer (no reflection loops).
    if request.len() < 12 || request[2] & 0x80 != 0 {
        return Answer::dropped();
    }
    let id = u16::from_be_bytes([request[0], request[1]]);
    let recursion_desired = request[2] & 0x01 != 0;
    let op_code = OpCode::from_u8((request[2] >> 3) & 0x0f);
    let query = match Message::from_vec(request) {
        Ok(message) => message,
        Err(_) => {
            let mut reply = Message::error_msg(id, op_code, ResponseCode::FormErr);
            reply.metadata.recursion_desired = recursion_desired;
            return finish(
                reply,
                "none",
                Vec::new(),
                false,
                transport,
                CLASSIC_UDP_LIMIT,
            );
        }
    };
    if query.metadata.message_type != MessageType::Query {
        return Answer::dropped();
    }

    let mut reply = Message::response(id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = false;
    reply.add_queries(query.queries.iter().cloned());
    let qtype = query
        .queries
        .first()
        .map_or("none", |q| qtype_label(q.query_type()));

    // EDNS0 (RFC 6891): answer with our own OPT; the client's payload size bounds UDP answers.
    let mut udp_limit = CLASSIC_UDP_LIMIT;
    let mut client_subnet = None;
    // DNSSEC records go to clients that set DO, and only when the zone is signed.
    let signed = zone
        .prepared
        .signed()
        .filter(|_| query.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok));
    if let Some(edns) = &query.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(zone.max_udp_payload);
        ours.set_version(0);
        ours.set_dnssec_ok(signed.is_some());
        if edns.version() > 0 {
            reply.metadata.response_code = ResponseCode::BADVERS;
            ours.set_rcode_high(ResponseCode::BADVERS.high());
            reply.set_edns(ours);
            return finish(reply, qtype, Vec::new(), false, transport, udp_limit);
        }
        udp_limit = usize::from(edns.max_payload().clamp(512, zone.max_udp_payload));
        if let Some(EdnsOption::Subnet(subnet)) = edns.option(EdnsCode::Subnet) {
            client_subnet = Some(*subnet);
        }
        reply.set_edns(ours);
    }

    if query.metadata.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
        return finish(reply, qtype, Vec::new(), false, transport, udp_limit);
    }
    let [question] = query.queries.as_slice() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return finish(reply, qtype, Vec::new(), false, transport, udp_limit);
    };
    // Only class IN data lives here, and only under our apex: anything else is refused
    // (an authoritative server is never an open resolver).
    let name = question.name().to_lowercase();
    if question.query_class() != DNSClass::IN || !zone.origin.zone_of(&name) {
        reply.metadata.response_code = ResponseCode::Refused;
        return finish(reply, qtype, Vec::new(), false, transport, udp_limit);
    }
    reply.metadata.authoritative = true;

    // Where the client is: ECS (RFC 7871) when the resolver sent a non-zero source prefix,
    // otherwise the resolver's own address.
    let (client_ip, ecs_prefix) = match client_subnet {
        Some(subnet) if subnet.source_prefix() > 0 => {
            let max = if subnet.addr().is_ipv4() { 32 } else { 128 };
            if subnet.source_prefix() > max {
                reply.metadata.response_code = ResponseCode::FormErr;
                return finish(reply, qtype, Vec::new(), false, transport, udp_limit);
            }
            (subnet.addr(), Some(subnet.source_prefix()))
        }
        _ => (source, None),
    };

    let owner = question.name().clone();
    let qt = question.query_type();
    let mut steered_pops = Vec::new();
    let mut fail_open = false;
    let mut tailored = false;
    let is_apex = name == zone.origin;
    // A client subnet steers with at most the configured number of bits.
    let client_location = || {
        locate(match ecs_prefix {
            Some(prefix) => mask(client_ip, prefix.min(ecs_bound(zone, client_ip))),
            None => client_ip,
        })
    };
    if is_apex && matches!(qt, RecordType::SOA | RecordType::NS | RecordType::ANY) {
        if matches!(qt, RecordType::SOA | RecordType::ANY) {
            let mut soa = zone.soa_record(zone.ttl);
            soa.name = owner.clone();
            reply.add_answer(soa);
            if let Some(signed) = signed {
                reply.add_answer(raw(owner.clone(), &signed.soa_rrsig));
            }
        }
        if matches!(qt, RecordType::NS | RecordType::ANY) {
            for mut ns in zone.ns_records() {
                ns.name = owner.clone();
                reply.add_answer(ns);
            }
            if let Some(signed) = signed {
                reply.add_answer(raw(owner.clone(), &signed.ns_rrsig));
            }
            // Glue: the addresses of in-zone name servers travel with their NS records.
            for glue in &zone.glue {
                add_glue(glue, zone.ttl, signed, &mut |r| {
                    reply.add_additional(r);
                });
            }
        }
    } else if let (Some(glue), true) = (
        zone.glue.iter().find(|g| g.name == name),
        matches!(qt, RecordType::A | RecordType::AAAA | RecordType::ANY),
    ) {
        let mut glue = glue.clone();
        glue.name = owner.clone();
        if qt == RecordType::A {
            glue.v6.clear();
        }
        if qt == RecordType::AAAA {
            glue.v4.clear();
        }
        let signed_owner = name.clone();
        add_glue_as(&glue, &signed_owner, zone.ttl, signed, &mut |r| {
            reply.add_answer(r);
        });
    } else if let (true, RecordType::DNSKEY, Some(zone_signed)) =
        (is_apex, qt, zone.prepared.signed())
    {
        for dnskey in &zone_signed.dnskeys {
            reply.add_answer(raw(owner.clone(), dnskey));
        }
        if let Some(signed) = signed {
            for rrsig in &signed.dnskey_rrsigs {
                reply.add_answer(raw(owner.clone(), rrsig));
            }
        }
    } else if let (Some(record), true) = (
        zone.records.get(&name),
        matches!(qt, RecordType::A | RecordType::AAAA | RecordType::ANY),
    ) {
        let location = client_location();
        let (v4, v6) = (
            matches!(qt, RecordType::A | RecordType::ANY),
            matches!(qt, RecordType::AAAA | RecordType::ANY),
        );
        let want = |p: usize| {
            let pop = &zone.pops[p];
            (v4 && !pop.v4.is_empty()) || (v6 && !pop.v6.is_empty())
        };
        let steering = steer(zone, record, &want, healthy, location);
        tailored = location.is_some();
        fail_open = steering.fail_open;
        for &p in &steering.pops {
            let pop = &zone.pops[p];
            if v4 {
                for ip in &pop.v4 {
                    reply.add_answer(Record::from_rdata(
                        owner.clone(),
                        zone.ttl,
                        RData::A(A(*ip)),
                    ));
                }
            }
            if v6 {
                for ip in &pop.v6 {
                    reply.add_answer(Record::from_rdata(
                        owner.clone(),
                        zone.ttl,
                        RData::AAAA(AAAA(*ip)),
                    ));
                }
            }
        }
        if let Some(signed) = signed {
            for (wanted, rtype) in [(v4, dnssec::TYPE_A), (v6, dnssec::TYPE_AAAA)] {
                if let Some(rr) = wanted
                    .then(|| variant_rrsig(zone, signed, &name, &steering.pops, rtype))
                    .flatten()
                {
                    reply.add_answer(raw(owner.clone(), rr));
                }
            }
        }
        steered_pops = steering.pops;
    } else if let (true, RecordType::RRSIG, Some(zone_signed)) =
        (zone.existing.contains(&name), qt, zone.prepared.signed())
    {
        // Asked for by type, the signatures at a name are its data (even without DO, like NSEC):
        // those over every set a query for this name from this client would get, including the
        // steered address sets as this client's location chooses them.
        if is_apex {
            for rr in [&zone_signed.soa_rrsig, &zone_signed.ns_rrsig]
                .into_iter()
                .chain(&zone_signed.dnskey_rrsigs)
            {
                reply.add_answer(raw(owner.clone(), rr));
            }
        }
        if let Some(glue) = zone.glue.iter().find(|g| g.name == name) {
            let key = wire(&name);
            for (present, rtype) in [
                (!glue.v4.is_empty(), dnssec::TYPE_A),
                (!glue.v6.is_empty(), dnssec::TYPE_AAAA),
            ] {
                if let Some(rr) = present
                    .then(|| zone_signed.glue.get(&(key.clone(), rtype)))
                    .flatten()
                {
                    reply.add_answer(raw(owner.clone(), rr));
                }
            }
        } else if let Some(record) = zone.records.get(&name) {
            let location = client_location();
            tailored = location.is_some();
            for rtype in [dnssec::TYPE_A, dnssec::TYPE_AAAA] {
                let has = |pop: &super::zone::ZonePop| {
                    if rtype == dnssec::TYPE_A {
                        !pop.v4.is_empty()
                    } else {
                        !pop.v6.is_empty()
                    }
                };
                let want = |p: usize| has(&zone.pops[p]);
                let steering = steer(zone, record, &want, healthy, location);
                fail_open |= steering.fail_open;
                if let Some(rr) = variant_rrsig(zone, zone_signed, &name, &steering.pops, rtype) {
                    reply.add_answer(raw(owner.clone(), rr));
                }
                for p in steering.pops {
                    if !steered_pops.contains(&p) {
                        steered_pops.push(p);
                    }
                }
            }
        }
        if let Some(entry) = zone_signed.nsec.at(&wire(&name)) {
            reply.add_answer(raw(owner.clone(), &entry.rrsig));
        }
    } else if let (true, RecordType::NSEC, Some(zone_signed)) =
        (zone.existing.contains(&name), qt, zone.prepared.signed())
    {
        // Asked for by type, a name's NSEC is its data like any other (RFC 3225: even without
        // DO; its RRSIG only with DO).
        if let Some(entry) = zone_signed.nsec.at(&wire(&name)) {
            reply.add_answer(raw(owner.clone(), &entry.nsec));
            if signed.is_some() {
                reply.add_answer(raw(owner.clone(), &entry.rrsig));
            }
        }
    } else if !zone.existing.contains(&name) {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    if reply.answers.is_empty() {
        // NXDOMAIN or NODATA: the SOA in authority lets resolvers cache the negative answer.
        reply.add_authority(negative_soa(zone));
        if let Some(signed) = signed {
            // ... and, signed, the NSEC records that prove there is nothing to answer.
            reply.add_authority(raw(zone.origin.clone(), &signed.soa_negative_rrsig));
            let qname = wire(&name);
            let proof = if reply.metadata.response_code == ResponseCode::NXDomain {
                let exists =
                    |n: &[u8]| Name::from_bytes(n).is_ok_and(|n| zone.existing.contains(&n));
                dnssec::nxdomain_proof(&signed.nsec, &qname, &exists)
            } else {
                [signed.nsec.at(&qname), None]
            };
            for entry in proof.into_iter().flatten() {
                let Ok(owner) = Name::from_bytes(&entry.owner) else {
                    continue;
                };
                reply.add_authority(raw(owner.clone(), &entry.nsec));
                reply.add_authority(raw(owner, &entry.rrsig));
            }
        }
    }
    // RFC 7871 §7.2.1: echo the option; the scope says how much of the address the answer used.
    if let (Some(prefix), Some(edns)) = (ecs_prefix, reply.edns.as_mut()) {
        let scope = if tailored {
            prefix.min(ecs_bound(zone, client_ip))
        } else {
            0
        };
        let subnet = ClientSubnet::new(mask(client_ip, prefix), prefix, scope);
        edns.options_mut().insert(EdnsOption::Subnet(subnet));
    }
    finish(reply, qtype, steered_pops, fail_open, transport, udp_limit)
}

/// What one query produced when its answer went into a caller's buffer (see [`respond`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether an answer was appended (`false`: drop the packet).
    pub sent: bool,
    pub qtype: &'static str,
    pub rcode: &'static str,
    pub fail_open: bool,
    pub truncated: bool,
}

/// Answers one DNS message like [`answer`], appending the answer to `out` and the steered PoPs to
/// `chosen`: the prepared fast path when the query has a common shape, [`answer`] otherwise. The
/// buffers are the caller's to reuse, so a warm worker allocates nothing per query.
#[allow(clippy::too_many_arguments)]
pub fn respond(
    zone: &Zone,
    ranks: &mut RankCache,
    request: &[u8],
    source: IpAddr,
    transport: Transport,
    healthy: &dyn Fn(usize) -> bool,
    locate: &dyn Fn(IpAddr) -> Option<(f64, f64)>,
    out: &mut Vec<u8>,
    chosen: &mut Vec<usize>,
) -> Outcome {
    if let Some(meta) = fast::respond(
        &zone.prepared,
        ranks,
        request,
        source,
        transport,
        healthy,
        locate,
        out,
        chosen,
    ) {
        return Outcome {
            sent: true,
            qtype: meta.qtype,
            rcode: meta.rcode,
            fail_open: meta.fail_open,
            truncated: false,
        };
    }
    let answer = answer(zone, request, source, transport, healthy, locate);
    if let Some(bytes) = &answer.bytes {
        out.extend_from_slice(bytes);
    }
    chosen.extend_from_slice(&answer.pops);
    Outcome {
        sent: answer.bytes.is_some(),
        qtype: answer.qtype,
        rcode: answer.rcode,
        fail_open: answer.fail_open,
        truncated: answer.truncated,
    }
}

/// The signature of the address set (`rtype` A or AAAA) that a client steered to `pops` receives
/// at `name`; `None` when that set is empty (no RRSIG covers an empty set).
fn variant_rrsig<'z>(
    zone: &Zone,
    signed: &'z fast::Signed,
    name: &Name,
    pops: &[usize],
    rtype: u16,
) -> Option<&'z Rr> {
    let mask = pop_mask(pops, |p| {
        zone.pops.get(p).is_some_and(|pop| {
            if rtype == dnssec::TYPE_A {
                !pop.v4.is_empty()
            } else {
                !pop.v6.is_empty()
            }
        })
    });
    if mask == 0 {
        return None;
    }
    let record = zone.prepared.record_index(&wire(name));
    signed
        .variants
        .get(&(record.map_or(u32::MAX, |r| r as u32), rtype, mask))
}

/// An in-zone name server's A and AAAA records (each set followed by its RRSIG when signed).
fn add_glue(
    glue: &super::zone::Glue,
    ttl: u32,
    signed: Option<&fast::Signed>,
    add: &mut dyn FnMut(Record),
) {
    add_glue_as(glue, &glue.name, ttl, signed, add);
}

/// [`add_glue`] with the records owned by `glue.name` as written (the question's case) and their
/// signatures looked up by `signed_owner` (lower case).
fn add_glue_as(
    glue: &super::zone::Glue,
    signed_owner: &Name,
    ttl: u32,
    signed: Option<&fast::Signed>,
    add: &mut dyn FnMut(Record),
) {
    let key = wire(signed_owner);
    if !glue.v4.is_empty() {
        for ip in &glue.v4 {
            add(Record::from_rdata(glue.name.clone(), ttl, RData::A(A(*ip))));
        }
        if let Some(rrsig) = signed.and_then(|s| s.glue.get(&(key.clone(), dnssec::TYPE_A))) {
            add(raw(glue.name.clone(), rrsig));
        }
    }
    if !glue.v6.is_empty() {
        for ip in &glue.v6 {
            add(Record::from_rdata(
                glue.name.clone(),
                ttl,
                RData::AAAA(AAAA(*ip)),
            ));
        }
        if let Some(rrsig) = signed.and_then(|s| s.glue.get(&(key.clone(), dnssec::TYPE_AAAA))) {
            add(raw(glue.name.clone(), rrsig));
        }
    }
}

/// A prepared DNSSEC record (RRSIG, NSEC, DNSKEY) as an opaque hickory record: the data was built
/// in wire format and goes out byte for byte.
fn raw(owner: Name, rr: &Rr) -> Record {
    Record::from_rdata(
        owner,
        rr.ttl,
        RData::Unknown {
            code: RecordType::from(rr.rtype),
            rdata: NULL::with(rr.rdata.clone()),
        },
    )
}

/// A (lower-case, fully qualified) name in uncompressed wire format.
fn wire(name: &Name) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(name.len() + 1);
    for label in name.iter() {
        bytes.push(label.len() as u8);
        bytes.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    bytes.push(0);
    bytes
}

fn negative_soa(zone: &Zone) -> Record {
    zone.soa_record(zone.negative_ttl())
}

/// Serializes `reply`; over UDP an answer larger than `udp_limit` is replaced by an empty one with
/// TC set (the client retries over TCP, where the whole answer goes).
fn finish(
    mut reply: Message,
    qtype: &'static str,
    pops: Vec<usize>,
    fail_open: bool,
    transport: Transport,
    udp_limit: usize,
) -> Answer {
    let rcode = rcode_label(reply.metadata.response_code);
    let mut truncated = false;
    let bytes = match reply.to_vec() {
        Ok(bytes) if transport == Transport::Udp && bytes.len() > udp_limit => {
            truncated = true;
            reply.metadata.truncation = true;
            reply.answers.clear();
            reply.authorities.clear();
            reply.additionals.clear();
            reply.to_vec().ok()
        }
        Ok(bytes) => Some(bytes),
        Err(_) => {
            let mut failure = Message::error_msg(
                reply.metadata.id,
                reply.metadata.op_code,
                ResponseCode::ServFail,
            );
            failure.add_queries(reply.queries.iter().cloned());
            failure.to_vec().ok()
        }
    };
    Answer {
        bytes,
        qtype,
        rcode,
        pops: if truncated { Vec::new() } else { pops },
        fail_open,
        truncated,
    }
}

/// The longest client subnet prefix the zone steers with for `ip`'s family.
fn ecs_bound(zone: &Zone, ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        zone.ecs_max_source.0
    } else {
        zone.ecs_max_source.1
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let keep = if prefix >= 32 {
                u32::MAX
            } else {
                !(u32::MAX >> prefix)
            };
            IpAddr::V4((bits & keep).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = if prefix >= 128 {
                u128::MAX
            } else {
                !(u128::MAX >> prefix)
            };
            IpAddr::V6((bits & keep).into())
        }
    }
}

pub fn qtype_label(qtype: RecordType) -> &'static str {
    match qtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

pub fn rcode_label(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::Name;

    use super::*;

    const CONFIG: &str = r#"
schema = 1
[[regions]]
name = "r"
location = { lat = 0.0, lon = 0.0 }
upstreams = [{ address = "127.1.1.1:7001" }]

[dns]
zone = "example.test"
default_pops = ["virginia"]
[[dns.records]]
name = "api"
[[dns.records]]
name = "solo"
pops = ["seoul"]
[[dns.records]]
name = "a.b"
pops = ["seoul", "frankfurt"]
weights = { frankfurt = 100 }

[[pops]]
name = "virginia"
location = { lat = 38.9, lon = -77.0 }
addresses = ["192.0.2.1", "2001:db8::1"]
[[pops]]
name = "seoul"
location = { lat = 37.57, lon = 126.98 }
addresses = ["192.0.2.6"]
[[pops]]
name = "frankfurt"
location = { lat = 50.1, lon = 8.68 }
addresses = ["192.0.2.8", "192.0.2.9"]
"#;

    const SEOUL: (f64, f64) = (37.57, 126.98);
    const TOKYO: (f64, f64) = (35.68, 139.69);
    const BERLIN: (f64, f64) = (52.52, 13.40);

    fn zone() -> Zone {
        let config = meridian_config::Config::from_toml_str(CONFIG).expect("test config");
        Zone::compile(&config).expect("zone compiles")
    }

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        message
    }

    fn with_edns(mut message: Message, payload: u16, subnet: Option<ClientSubnet>) -> Message {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        if let Some(subnet) = subnet {
            edns.options_mut().insert(EdnsOption::Subnet(subnet));
        }
        message.set_edns(edns);
        message
    }

    /// Client location by address: 10.0.0.0/8 is Seoul, 10.1.0.0/16 Tokyo, 10.2.0.0/16 Berlin.
    fn locate(ip: IpAddr) -> Option<(f64, f64)> {
        match ip {
            IpAddr::V4(v4) if v4.octets()[0] == 10 => Some(match v4.octets()[1] {
                1 => TOKYO,
                2 => BERLIN,
                _ => SEOUL,
            }),
            _ => None,
        }
    }

    fn ask(
        zone: &Zone,
        message: &Message,
        source: [u8; 4],
        up: &dyn Fn(usize) -> bool,
    ) -> (Answer, Message) {
        let bytes = message.to_vec().expect("encodes");
        let answer = answer(
            zone,
            &bytes,
            IpAddr::V4(Ipv4Addr::from(source)),
            Transport::Udp,
            up,
            &locate,
        );
        let reply = Message::from_vec(answer.bytes.as_deref().expect("answered")).expect("decodes");
        (answer, reply)
    }

    fn addresses(reply: &Message) -> Vec<String> {
        reply
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    const ALL_UP: &dyn Fn(usize) -> bool = &|_| true;

    #[test]
    fn nearest_pop_by_resolver_address_and_default_for_unknown() {
        let zone = zone();
        let q = query("api.example.test.", RecordType::A);
        let (answer, reply) = ask(&zone, &q, [10, 0, 0, 1], ALL_UP);
        assert_eq!(addresses(&reply), ["192.0.2.6"]);
        assert_eq!(answer.pops, [1]);
        assert!(reply.metadata.authoritative);
        assert!(!reply.metadata.recursion_available);
        assert_eq!(reply.answers[0].ttl, 30);
        let (_, reply) = ask(&zone, &q, [10, 2, 0, 1], ALL_UP);
        assert_eq!(addresses(&reply), ["192.0.2.8", "192.0.2.9"]);
        // Unknown location: the default PoP.
        let (_, reply) = ask(&zone, &q, [192, 168, 0, 1], ALL_UP);
        assert_eq!(addresses(&reply), ["192.0.2.1"]);
        // AAAA: only PoPs with an IPv6 address are candidates.
        let (_, reply) = ask(
            &zone,
            &query("api.example.test.", RecordType::AAAA),
            [10, 0, 0, 1],
            ALL_UP,
        );
        assert_eq!(addresses(&reply), ["2001:db8::1"]);
    }

    #[test]
    fn client_subnet_wins_over_the_resolver_and_sets_the_scope() {
        let zone = zone();
        let subnet = ClientSubnet::new(IpAddr::V4(Ipv4Addr::new(10, 2, 7, 0)), 24, 0);
        let q = with_edns(
            query("API.example.test.", RecordType::A),
            1232,
            Some(subnet),
        );
        let (_, reply) = ask(&zone, &q, [10, 0, 0, 1], ALL_UP);
        assert_eq!(addresses(&reply), ["192.0.2.8", "192.0.2.9"]);
        assert_eq!(
            reply.queries[0].name().to_ascii(),
            "API.example.test.",
            "0x20 case echoed"
        );
        let Some(EdnsOption::Subnet(echo)) =
            reply.edns.as_ref().and_then(|e| e.option(EdnsCode::Subnet))
        else {
            panic!("ECS echoed: {reply:?}");
        };
        assert_eq!((echo.source_prefix(), echo.scope_prefix()), (24, 24));
        // Source prefix 0: the client opted out; the resolver address decides, scope 0.
        let subnet = ClientSubnet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, 0);
        let q = with_edns(
            query("api.example.test.", RecordType::A),
            1232,
            Some(subnet),
        );
        let (_, reply) = ask(&zone, &q, [10, 0, 0, 1], ALL_UP);
        assert_eq!(addresses(&reply), ["192.0.2.6"]);
    }

    #[test]
    fn client_subnet_scope_is_bounded_by_config() {
        let mut zone = zone();
        // A /32 from a client: steered (and scoped) by its /24 only.
        let subnet = ClientSubnet::new(IpAddr::V4(Ipv4Addr::new(10, 2, 7, 9)), 32, 0);
        let q = with_edns(
            query("api.example.test.", RecordType::A),
            1232,
            Some(subnet),
        );
        let (_, reply) = ask(&zone, &q, [10, 0, 0, 1], ALL_UP);
        assert_eq!(addresses(&reply), ["192.0.2.8", "192.0.2.9"]);
        assert_eq!(scope_of(&reply), Some((32, 24)));
        // With a /8 bound the same client is located by 10.0.0.0: Seoul.
        zone.ecs_max_source = (8, 56);
        zone.prepare().expect("prepares");
        let (_, reply) = ask(&zone, &q, [10, 0, 0, 1], ALL_UP);
        assert_eq!(addresses(&reply), ["192.0.2.6"]);
        assert_eq!(scope_of(&reply), Some((32, 8)));
    }

    #[test]
    fn in_zone_name_servers_answer_and_travel_as_glue() {
        let mut config = meridian_config::Config::from_toml_str(CONFIG).expect("test config");
        let dns = config.dns.as_mut().expect("[dns]");
        dns.ns = vec!["ns1.example.test".into(), "ns.elsewhere.test".into()];
        dns.glue.insert(
            "ns1.example.test".into(),
            vec!["192.0.2.53".into(), "2001:db8::53".into()],
        );
        config.validate().expect("valid");
        let zone = Zone::compile(&config).expect("zone compiles");
        let (_, reply) = ask(
            &zone,
            &query("example.test.", RecordType::NS),
            [10, 0, 0, 1],
            ALL_UP,
        );
        assert_eq!(reply.answers.len(), 2);
        let glue: Vec<String> = reply
            .additionals
            .iter()
            .map(|r| format!("{} {}", r.name, r.data))
            .collect();
        assert_eq!(
            glue,
            [
                "ns1.example.test. 192.0.2.53",
                "ns1.example.test. 2001:db8::53"
            ]
        );
        let (_, reply) = ask(
            &zone,
            &query("NS1.example.test.", RecordType::A),
            [10, 0, 0, 1],
            ALL_UP,
        );
        assert_eq!(addresses(&reply), ["192.0.2.53"]);
        assert_eq!(reply.answers[0].name.to_ascii(), "NS1.example.test.");
        let (_, reply) = ask(
            &zone,
            &query("ns1.example.test.", RecordType::MX),
            [10, 0, 0, 1],
            ALL_UP,
        );
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty());
        // Glue for a name server outside the zone, or one that is not a name server: refused.
        let mut bad = config.clone();
        let dns = bad.dns.as_mut().expect("[dns]");
        dns.glue
            .insert("ns.elsewhere.test".into(), vec!["192.0.2.54".into()]);
        dns.glue
            .insert("api.example.test".into(), vec!["192.0.2.55".into()]);
        let errors = bad.validate().expect_err("invalid");
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    fn scope_of(reply: &Message) -> Option<(u8, u8)> {
        match reply.edns.as_ref()?.option(EdnsCode::Subnet)? {
            EdnsOption::Subnet(s) => Some((s.source_prefix(), s.scope_prefix())),
            _ => None,
        }
    }

    #[test]
    fn down_pops_drop_out_and_all_down_fails_open() {
        let zone = zone();
        let seoul_down = |p: usize| p != 1;
        let (answer, reply) = ask(
            &zone,
            &query("api.example.test.", RecordType::A),
            [10, 1, 0, 1],
            &seoul_down,
        );
        assert_eq!(
            addresses(&reply),
            ["192.0.2.8", "192.0.2.9"],
            "Tokyo falls back to Frankfurt"
        );
        assert!(!answer.fail_open);
        let (answer, reply) = ask(
            &zone,
            &query("solo.example.test.", RecordType::A),
            [10, 1, 0, 1],
            &seoul_down,
        );
        assert_eq!(addresses(&reply), ["192.0.2.6"]);
        assert!(answer.fail_open);
    }

    #[test]
    fn weights_bias_and_n_nearest() {
        let mut zone = zone();
        // From Tokyo, Frankfurt (weight 100: 9300 km / 100) looks closer than Seoul (1160 km).
        let (_, reply) = ask(
            &zone,
            &query("a.b.example.test.", RecordType::A),
            [10, 1, 0, 1],
            ALL_UP,
        );
        assert_eq!(addresses(&reply), ["192.0.2.8", "192.0.2.9"]);
        zone.answers = 2;
        let steering = steer(
            &zone,
            &zone.records[&Name::from_ascii("api.example.test.").expect("name")],
            &|_| true,
            &|_| true,
            Some(BERLIN),
        );
        assert_eq!(steering.pops, [2, 0], "Frankfurt, then Virginia");
    }

    #[test]
    fn nxdomain_nodata_refused_and_apex() {
        let zone = zone();
        let (answer, reply) = ask(
            &zone,
            &query("nope.example.test.", RecordType::A),
            [10, 0, 0, 1],
            ALL_UP,
        );
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(answer.rcode, "NXDOMAIN");
        assert!(matches!(reply.authorities[0].data, RData::SOA(_)));
        assert_eq!(reply.authorities[0].ttl, 30, "min(ttl, soa minimum)");
        // Empty non-terminal and a steered name asked for another type: NODATA.
        for (name, qtype) in [
            ("b.example.test.", RecordType::A),
            ("api.example.test.", RecordType::MX),
            ("example.test.", RecordType::A),
        ] {
            let (_, reply) = ask(&zone, &query(name, qtype), [10, 0, 0, 1], ALL_UP);
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NoError,
                "{name}"
            );
            assert!(reply.answers.is_empty(), "{name}");
            assert!(matches!(reply.authorities[0].data, RData::SOA(_)), "{name}");
        }
        let (_, reply) = ask(
            &zone,
            &query("example.com.", RecordType::A),
            [10, 0, 0, 1],
            ALL_UP,
        );
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert!(!reply.metadata.authoritative);
        let (_, reply) = ask(
            &zone,
            &query("example.test.", RecordType::SOA),
            [10, 0, 0, 1],
            ALL_UP,
        );
        assert!(matches!(reply.answers[0].data, RData::SOA(_)));
        let (_, reply) = ask(
            &zone,
            &query("example.test.", RecordType::NS),
            [10, 0, 0, 1],
            ALL_UP,
        );
        assert_eq!(reply.answers.len(), 1);
        let mut chaos = query("version.bind.", RecordType::TXT);
        chaos.queries[0].set_query_class(DNSClass::CH);
        let (_, reply) = ask(&zone, &chaos, [10, 0, 0, 1], ALL_UP);
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn udp_truncates_what_does_not_fit() {
        let mut zone = zone();
        let many: Vec<Ipv4Addr> = (1..=60).map(|i| Ipv4Addr::new(198, 51, 100, i)).collect();
        zone.pops[1].v4 = many;
        let q = query("api.example.test.", RecordType::A);
        let (answer, reply) = ask(&zone, &q, [10, 0, 0, 1], ALL_UP);
        assert!(answer.truncated && reply.metadata.truncation);
        assert!(reply.answers.is_empty());
        let bytes = q.to_vec().expect("encodes");
        let over_tcp = super::answer(
            &zone,
            &bytes,
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            Transport::Tcp,
            ALL_UP,
            &locate,
        );
        let reply = Message::from_vec(over_tcp.bytes.as_deref().expect("answer")).expect("decodes");
        assert_eq!(reply.answers.len(), 60);
        assert!(!reply.metadata.truncation);
        // EDNS with room for it: no truncation on UDP either.
        let (answer, reply) = ask(&zone, &with_edns(q, 4096, None), [10, 0, 0, 1], ALL_UP);
        assert!(!answer.truncated);
        assert_eq!(reply.answers.len(), 60);
    }

    #[test]
    fn garbage_never_panics() {
        let zone = zone();
        let valid = query("api.example.test.", RecordType::A)
            .to_vec()
            .expect("encodes");
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..5000 {
            let mut packet = if round % 2 == 0 {
                valid[..(next() as usize % (valid.len() + 1))].to_vec()
            } else {
                (0..(next() % 300)).map(|_| next() as u8).collect()
            };
            if round % 3 == 0 && packet.len() > 2 {
                packet[2] &= 0x7f; // a query, so it is parsed
            }
            let answer = super::answer(
                &zone,
                &packet,
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                Transport::Udp,
                ALL_UP,
                &locate,
            );
            if let Some(bytes) = answer.bytes {
                assert!(bytes.len() <= CLASSIC_UDP_LIMIT.max(1232));
            }
        }
        // Header only (no question): FORMERR with the id; a response (QR set): dropped.
        let answer = super::answer(
            &zone,
            &valid[..12],
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            Transport::Udp,
            ALL_UP,
            &locate,
        );
        assert_eq!(answer.rcode, "FORMERR");
        let mut response = valid.clone();
        response[2] |= 0x80;
        assert_eq!(
            super::answer(
                &zone,
                &response,
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                Transport::Udp,
                ALL_UP,
                &locate
            )
            .bytes,
            None
        );
    }

    #[test]
    fn edns_version_above_zero_is_badvers() {
        let zone = zone();
        let mut q = with_edns(query("api.example.test.", RecordType::A), 1232, None);
        if let Some(edns) = q.edns.as_mut() {
            edns.set_version(1);
        }
        let (answer, _) = ask(&zone, &q, [10, 0, 0, 1], ALL_UP);
        assert_eq!(answer.rcode, "BADVERS");
    }
}
