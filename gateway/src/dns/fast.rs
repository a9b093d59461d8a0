//! The answer path nearly every query takes: the zone's answers are prepared in wire format when the
//! zone compiles ([`Prepared`]), and a query is parsed in place, steered through a per-worker cache
//! of PoP rankings ([`RankCache`]) and answered by copying prepared bytes behind the patched header
//! and the echoed question. Nothing is allocated per query once a worker is warm.
//!
//! It handles the common shapes only (one IN question in the zone, at most one OPT record, plain
//! labels) and declines everything else by returning `None`; the caller then runs the general
//! [`super::answer::answer`], which stays the definition of what an answer is. The unit tests below
//! hold the two paths to the same answers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::SystemTime;

use hickory_proto::rr::Name;

use super::answer::{Transport, CLASSIC_UDP_LIMIT};
use super::dnssec::{
    self, DnssecError, NsecChain, Rr, Signer, Variants, DNSKEY_TTL, MAX_SIGNATURES, TYPE_DNSKEY,
};
use super::zone::{owned_types, Zone};
use crate::core::geo::distance_km;

const TYPE_A: u16 = 1;
const TYPE_NS: u16 = 2;
const TYPE_SOA: u16 = 6;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const OPTION_NSID: u16 = 3;
const OPTION_SUBNET: u16 = 8;
/// A compression pointer to the question name, which always starts right after the header.
const QNAME_POINTER: [u8; 2] = [0xc0, 0x0c];
/// Distinct client locations one worker keeps rankings for before it starts over (a City database
/// has about as many distinct coordinates; the cost of a miss is one ranking of every record).
const RANKED_LOCATIONS: usize = 1 << 17;

/// The hasher of the per-query tables: seeded per table, and several times cheaper than SipHash on
/// the short keys a query looks up.
type FastHash = foldhash::fast::RandomState;

/// Byte → its lower-case form when the fast path takes it in a label (letters, digits, '-', '_'),
/// 0 otherwise: one table load per byte checks and folds it.
const LABEL_BYTE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 256 {
        let c = byte as u8;
        if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' {
            table[byte] = c.to_ascii_lowercase();
        }
        byte += 1;
    }
    table
};

/// Tells apart the prepared zones a [`RankCache`] has seen (rankings belong to one zone version).
static PREPARED_IDS: AtomicU64 = AtomicU64::new(1);

/// The zone in wire format, built once per compile.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    id: u64,
    /// The apex, lower-case, in wire format.
    origin: Vec<u8>,
    /// Every existing name (lower-case wire format) → whether it is steered.
    names: HashMap<Box<[u8]>, Option<usize>, FastHash>,
    pops: Vec<PopRecords>,
    records: Vec<RecordPlan>,
    /// Ranked PoPs stored per location: the sum of every record's candidate count.
    ranks_per_location: usize,
    /// SOA record after its owner name, TTL `ttl` (apex answer) and the negative TTL (authority).
    soa_answer: Vec<u8>,
    soa_negative: Vec<u8>,
    /// The apex NS records, owner = the question name.
    ns_answer: Vec<u8>,
    ns_count: u16,
    answers: usize,
    max_udp_payload: u16,
    ecs_max_source: (u8, u8),
    /// In-zone name servers with addresses: their names and the apex NS answers (which carry
    /// glue) go the general way.
    glue_names: Vec<Box<[u8]>>,
    /// The zone's DNSSEC records and signatures; `None`: unsigned.
    signed: Option<Box<Signed>>,
}

/// A signed zone's DNSSEC records, all made when the zone was prepared: a query only copies them.
#[derive(Clone, Debug)]
pub struct Signed {
    /// The DNSKEY set: the active key first, then the keys published for a rollover.
    pub dnskeys: Vec<Rr>,
    /// One RRSIG over the DNSKEY set per key in it, so a parent DS naming any of them validates
    /// the set (and with it the active key's signatures on everything else).
    pub dnskey_rrsigs: Vec<Rr>,
    /// Over the SOA with the zone's TTL (apex answers) and with the negative TTL (authority).
    pub soa_rrsig: Rr,
    pub soa_negative_rrsig: Rr,
    pub ns_rrsig: Rr,
    /// Every steered answer variant: (record, type, PoPs as a bit mask) → RRSIG.
    pub variants: Variants,
    /// In-zone name servers' address sets: (name, type) → RRSIG.
    pub glue: HashMap<(Vec<u8>, u16), Rr>,
    pub nsec: NsecChain,
}

/// One PoP's A and AAAA records, owner = the question name, TTL = the zone's.
#[derive(Clone, Debug, Default)]
struct PopRecords {
    location: (f64, f64),
    a: Vec<u8>,
    a_count: u16,
    aaaa: Vec<u8>,
    aaaa_count: u16,
}

/// A steered name's candidates as the steering needs them.
#[derive(Clone, Debug)]
struct RecordPlan {
    candidates: Vec<u32>,
    weights: Vec<f64>,
    /// `default_pops` that are candidates of this record, in `default_pops` order.
    defaults: Vec<u32>,
    /// Where this record's ranking starts within one location's block of a [`RankCache`].
    rank_offset: usize,
}

impl Prepared {
    /// Tells this preparation apart from every other one in the process (caches keyed on a zone
    /// version use it).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The DNSSEC records, when the zone is signed.
    pub fn signed(&self) -> Option<&Signed> {
        self.signed.as_deref()
    }

    /// The index of the steered record `name` (lower-case wire format) has here.
    pub fn record_index(&self, name: &[u8]) -> Option<usize> {
        self.names.get(name).copied().flatten()
    }

    /// Prepares `zone`'s answers, signing them (with validity from `now`) when the zone has a key.
    /// Fails only when signing does.
    pub fn build(zone: &Zone, now: SystemTime) -> Result<Self, DnssecError> {
        let ttl = zone.ttl.to_be_bytes();
        let pops = zone
            .pops
            .iter()
            .map(|pop| {
                let mut records = PopRecords {
                    location: pop.location,
                    ..PopRecords::default()
                };
                for ip in &pop.v4 {
                    records.a.extend_from_slice(&QNAME_POINTER);
                    records.a.extend_from_slice(&TYPE_A.to_be_bytes());
                    records.a.extend_from_slice(&CLASS_IN.to_be_bytes());
                    records.a.extend_from_slice(&ttl);
                    records.a.extend_from_slice(&4u16.to_be_bytes());
                    records.a.extend_from_slice(&ip.octets());
                    records.a_count += 1;
                }
                for ip in &pop.v6 {
                    records.aaaa.extend_from_slice(&QNAME_POINTER);
                    records.aaaa.extend_from_slice(&TYPE_AAAA.to_be_bytes());
                    records.aaaa.extend_from_slice(&CLASS_IN.to_be_bytes());
                    records.aaaa.extend_from_slice(&ttl);
                    records.aaaa.extend_from_slice(&16u16.to_be_bytes());
                    records.aaaa.extend_from_slice(&ip.octets());
                    records.aaaa_count += 1;
                }
                records
            })
            .collect();

        let mut names: HashMap<Box<[u8]>, Option<usize>, FastHash> = zone
            .existing
            .iter()
            .map(|name| (wire(name).into_boxed_slice(), None))
            .collect();
        let mut records = Vec::with_capacity(zone.records.len());
        let mut rank_offset = 0;
        let mut record_names = Vec::with_capacity(zone.records.len());
        for (name, steered) in &zone.records {
            record_names.push(name);
            names.insert(wire(name).into_boxed_slice(), Some(records.len()));
            let candidates: Vec<u32> = steered.pops.iter().map(|&p| index(p)).collect();
            let defaults = zone
                .default_pops
                .iter()
                .filter(|d| steered.pops.contains(d))
                .map(|&d| index(d))
                .collect();
            records.push(RecordPlan {
                weights: steered.weights.clone(),
                defaults,
                rank_offset,
                candidates,
            });
            rank_offset += steered.pops.len();
        }

        let soa = |ttl: u32| {
            let rdata = soa_rdata(zone);
            let mut record = Vec::with_capacity(rdata.len() + 10);
            record.extend_from_slice(&TYPE_SOA.to_be_bytes());
            record.extend_from_slice(&CLASS_IN.to_be_bytes());
            record.extend_from_slice(&ttl.to_be_bytes());
            record.extend_from_slice(&rdlength(&rdata));
            record.extend_from_slice(&rdata);
            record
        };
        let mut ns_answer = Vec::new();
        for ns in &zone.ns {
            let rdata = wire(ns);
            ns_answer.extend_from_slice(&QNAME_POINTER);
            ns_answer.extend_from_slice(&TYPE_NS.to_be_bytes());
            ns_answer.extend_from_slice(&CLASS_IN.to_be_bytes());
            ns_answer.extend_from_slice(&ttl);
            ns_answer.extend_from_slice(&rdlength(&rdata));
            ns_answer.extend_from_slice(&rdata);
        }
        let signed = match &zone.dnssec {
            Some(key) => Some(Box::new(sign(
                zone,
                key,
                &zone.published_keys,
                &records,
                &record_names,
                now,
            )?)),
            None => None,
        };
        Ok(Prepared {
            id: PREPARED_IDS.fetch_add(1, Ordering::Relaxed),
            origin: wire(&zone.origin),
            names,
            pops,
            records,
            ranks_per_location: rank_offset,
            soa_answer: soa(zone.ttl),
            soa_negative: soa(zone.negative_ttl()),
            ns_answer,
            ns_count: u16::try_from(zone.ns.len()).unwrap_or(u16::MAX),
            answers: zone.answers,
            max_udp_payload: zone.max_udp_payload,
            ecs_max_source: zone.ecs_max_source,
            glue_names: zone
                .glue
                .iter()
                .map(|g| wire(&g.name).into_boxed_slice())
                .collect(),
            signed,
        })
    }

    /// The steering of one query: which PoPs answer `record` for a client at `location`, into
    /// `chosen`; returns whether this was a fail-open answer. The same choice as
    /// [`super::answer::steer`], with the distance ranking taken from `ranks`.
    fn steer(
        &self,
        record: usize,
        family: (bool, bool),
        healthy: &dyn Fn(usize) -> bool,
        location: Option<(f64, f64)>,
        ranks: &mut RankCache,
        chosen: &mut Vec<usize>,
    ) -> bool {
        let Some(plan) = self.records.get(record) else {
            return false;
        };
        let (v4, v6) = family;
        let want = |p: usize| {
            self.pops
                .get(p)
                .is_some_and(|pop| (v4 && pop.a_count > 0) || (v6 && pop.aaaa_count > 0))
        };
        let up = |p: usize| want(p) && healthy(p);
        let start = chosen.len();
        if !plan.candidates.iter().any(|&p| up(p as usize)) {
            chosen.extend(
                plan.candidates
                    .iter()
                    .map(|&p| p as usize)
                    .filter(|&p| want(p)),
            );
            return chosen.len() > start;
        }
        let take = self.answers;
        match location {
            Some(location) => {
                let ranked = ranks.ranked(self, location, plan);
                chosen.extend(
                    ranked
                        .iter()
                        .map(|&p| p as usize)
                        .filter(|&p| up(p))
                        .take(take),
                );
            }
            None => {
                chosen.extend(
                    plan.defaults
                        .iter()
                        .map(|&p| p as usize)
                        .filter(|&p| up(p))
                        .take(take),
                );
                if chosen.len() == start {
                    chosen.extend(
                        plan.candidates
                            .iter()
                            .map(|&p| p as usize)
                            .filter(|&p| up(p))
                            .take(take),
                    );
                }
            }
        }
        false
    }
}

/// Signs everything a query of a signed zone can need: the apex sets, every PoP set steering can
/// answer a record with (each subset of at most `answers` candidates of a family, and all of them
/// for fail-open answers), and the NSEC chain.
fn sign(
    zone: &Zone,
    key: &dnssec::SigningKey,
    published: &[Arc<dnssec::SigningKey>],
    records: &[RecordPlan],
    record_names: &[&Name],
    now: SystemTime,
) -> Result<Signed, DnssecError> {
    let origin = wire(&zone.origin);
    let signer = Signer::new(key, &origin, now);
    let soa_rdata = soa_rdata(zone);
    let ns_rdata: Vec<Vec<u8>> = zone.ns.iter().map(wire).collect();
    let ns_refs: Vec<&[u8]> = ns_rdata.iter().map(Vec::as_slice).collect();
    let keys: Vec<&dnssec::SigningKey> = std::iter::once(key)
        .chain(published.iter().map(|k| &**k))
        .collect();
    let dnskeys: Vec<Rr> = keys
        .iter()
        .map(|k| Rr {
            rtype: TYPE_DNSKEY,
            ttl: DNSKEY_TTL,
            rdata: k.dnskey().to_vec(),
        })
        .collect();
    let dnskey_rdatas: Vec<&[u8]> = keys.iter().map(|k| k.dnskey()).collect();
    let dnskey_rrsigs = keys
        .iter()
        .map(|k| {
            Signer::new(k, &origin, now).rrsig(&origin, TYPE_DNSKEY, DNSKEY_TTL, &dnskey_rdatas)
        })
        .collect::<Result<Vec<Rr>, DnssecError>>()?;
    let soa_rrsig = signer.rrsig(&origin, dnssec::TYPE_SOA, zone.ttl, &[&soa_rdata])?;
    let soa_negative_rrsig = signer.rrsig(
        &origin,
        dnssec::TYPE_SOA,
        zone.negative_ttl(),
        &[&soa_rdata],
    )?;
    let ns_rrsig = signer.rrsig(&origin, dnssec::TYPE_NS, zone.ttl, &ns_refs)?;

    let mut plans = Vec::new();
    let mut needed = 0usize;
    for (r, (plan, name)) in records.iter().zip(record_names).enumerate() {
        for (rtype, family) in [(dnssec::TYPE_A, true), (dnssec::TYPE_AAAA, false)] {
            let eligible: Vec<u32> = plan
                .candidates
                .iter()
                .copied()
                .filter(|&p| {
                    zone.pops.get(p as usize).is_some_and(|pop| {
                        if family {
                            !pop.v4.is_empty()
                        } else {
                            !pop.v6.is_empty()
                        }
                    })
                })
                .collect();
            if eligible.is_empty() {
                continue;
            }
            let largest = zone.answers.min(eligible.len());
            needed = needed.saturating_add(subsets(eligible.len(), largest) + 1);
            plans.push((r, *name, rtype, family, eligible, largest));
        }
    }
    if needed > MAX_SIGNATURES {
        return Err(DnssecError::TooManyVariants { needed });
    }
    let mut variants = Variants::with_capacity(needed);
    for (r, name, rtype, family, eligible, largest) in plans {
        let owner = wire(name);
        let mut sign_set = |set: &[u32]| -> Result<(), DnssecError> {
            let mut mask = 0u128;
            let mut rdatas: Vec<Vec<u8>> = Vec::new();
            for &p in set {
                mask |= 1u128 << (p % 128);
                if let Some(pop) = zone.pops.get(p as usize) {
                    if family {
                        rdatas.extend(pop.v4.iter().map(|ip| ip.octets().to_vec()));
                    } else {
                        rdatas.extend(pop.v6.iter().map(|ip| ip.octets().to_vec()));
                    }
                }
            }
            let key = (index(r), rtype, mask);
            if let std::collections::hash_map::Entry::Vacant(slot) = variants.entry(key) {
                let refs: Vec<&[u8]> = rdatas.iter().map(Vec::as_slice).collect();
                slot.insert(signer.rrsig(&owner, rtype, zone.ttl, &refs)?);
            }
            Ok(())
        };
        for size in 1..=largest {
            let mut picked: Vec<usize> = (0..size).collect();
            loop {
                let set: Vec<u32> = picked.iter().map(|&i| eligible[i]).collect();
                sign_set(&set)?;
                // Next combination in lexicographic order.
                let Some(i) = (0..size)
                    .rev()
                    .find(|&i| picked[i] < eligible.len() - size + i)
                else {
                    break;
                };
                picked[i] += 1;
                for j in i + 1..size {
                    picked[j] = picked[j - 1] + 1;
                }
            }
        }
        sign_set(&eligible)?;
    }
    let names = owned_types(zone)
        .into_iter()
        .map(|(name, types)| (wire(&name), types))
        .collect();
    let nsec = NsecChain::build(&signer, names, zone.negative_ttl())?;
    let mut glue = HashMap::new();
    for entry in &zone.glue {
        let owner = wire(&entry.name);
        let v4: Vec<Vec<u8>> = entry.v4.iter().map(|ip| ip.octets().to_vec()).collect();
        let v6: Vec<Vec<u8>> = entry.v6.iter().map(|ip| ip.octets().to_vec()).collect();
        for (rtype, rdatas) in [(dnssec::TYPE_A, v4), (dnssec::TYPE_AAAA, v6)] {
            if rdatas.is_empty() {
                continue;
            }
            let refs: Vec<&[u8]> = rdatas.iter().map(Vec::as_slice).collect();
            let rrsig = signer.rrsig(&owner, rtype, zone.ttl, &refs)?;
            glue.insert((owner.clone(), rtype), rrsig);
        }
    }
    Ok(Signed {
        glue,
        dnskeys,
        dnskey_rrsigs,
        soa_rrsig,
        soa_negative_rrsig,
        ns_rrsig,
        variants,
        nsec,
    })
}

/// Subsets of 1 to `largest` elements of a set of `n` (saturating).
fn subsets(n: usize, largest: usize) -> usize {
    let mut total = 0usize;
    let mut choose = 1usize; // C(n, 0)
    for k in 1..=largest {
        choose = choose.saturating_mul(n + 1 - k) / k;
        total = total.saturating_add(choose);
    }
    total
}

/// The bit mask of the PoPs in `chosen` that have addresses of a family (`has`).
pub fn pop_mask(chosen: &[usize], has: impl Fn(usize) -> bool) -> u128 {
    chosen
        .iter()
        .filter(|&&p| has(p))
        .fold(0u128, |mask, &p| mask | 1u128 << (p % 128))
}

/// Per-worker memory of PoP rankings by client location: each distinct location is ranked once
/// (every record's healthy-or-not candidates by distance / weight), after which steering a query is
/// a lookup plus a health filter. Health changes need no re-ranking: the filter reads the current
/// flags.
#[derive(Debug, Default)]
pub struct RankCache {
    prepared: u64,
    slots: HashMap<(u64, u64), usize, FastHash>,
    ranks: Vec<u32>,
}

impl RankCache {
    fn ranked(&mut self, prepared: &Prepared, location: (f64, f64), plan: &RecordPlan) -> &[u32] {
        if self.prepared != prepared.id || self.slots.len() >= RANKED_LOCATIONS {
            self.prepared = prepared.id;
            self.slots.clear();
            self.ranks.clear();
        }
        let key = (location.0.to_bits(), location.1.to_bits());
        let base =
            match self.slots.get(&key) {
                Some(&base) => base,
                None => {
                    let base = self.ranks.len();
                    let mut costed: Vec<(f64, u32)> = Vec::new();
                    for record in &prepared.records {
                        costed.clear();
                        costed.extend(record.candidates.iter().zip(&record.weights).map(
                            |(&p, &w)| {
                                let at = prepared
                                    .pops
                                    .get(p as usize)
                                    .map_or((0.0, 0.0), |pop| pop.location);
                                (distance_km(location, at) / w, p)
                            },
                        ));
                        costed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                        self.ranks.extend(costed.iter().map(|&(_, p)| p));
                    }
                    debug_assert_eq!(self.ranks.len() - base, prepared.ranks_per_location);
                    self.slots.insert(key, base);
                    base
                }
            };
        let start = base + plan.rank_offset;
        self.ranks
            .get(start..start + plan.candidates.len())
            .unwrap_or(&[])
    }
}

/// What [`respond`] answered, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub qtype: &'static str,
    pub rcode: &'static str,
    pub fail_open: bool,
}

/// A query as the fast path understands it.
struct Query<'a> {
    id: [u8; 2],
    recursion_desired: bool,
    /// The question as received (echoed byte for byte, so 0x20 case survives).
    question: &'a [u8],
    /// The length of the question name (lower-cased into the caller's buffer, wire format).
    name_len: usize,
    qtype: u16,
    edns: Option<EdnsQuery>,
}

struct EdnsQuery {
    payload: u16,
    /// The DO bit: the client wants DNSSEC records.
    dnssec_ok: bool,
    /// (address, source prefix) of an EDNS Client Subnet option.
    subnet: Option<(IpAddr, u8)>,
}

/// Answers `request` into `out` (appended) and the steered PoPs into `chosen`, or returns `None`
/// (and leaves both as they were) when the query is not one of the shapes this path handles.
#[allow(clippy::too_many_arguments)]
pub fn respond(
    prepared: &Prepared,
    ranks: &mut RankCache,
    request: &[u8],
    source: IpAddr,
    transport: Transport,
    healthy: &dyn Fn(usize) -> bool,
    locate: &dyn Fn(IpAddr) -> Option<(f64, f64)>,
    out: &mut Vec<u8>,
    chosen: &mut Vec<usize>,
) -> Option<Meta> {
    let mut name = [0u8; 255];
    let query = parse(request, &mut name)?;
    let name = name.get(..query.name_len)?;
    // Only names under the apex, cut at a label boundary; everything else (REFUSED) goes the
    // general way.
    let origin = prepared.origin.as_slice();
    let mut at = 0;
    while name.len() - at > origin.len() {
        at += 1 + usize::from(name[at]);
    }
    if name.get(at..)? != origin {
        return None;
    }
    let origin_pointer = u16::try_from(12 + at).ok()? | 0xc000;
    // Signatures asked for by type are rare: the general way answers them.
    if query.qtype == dnssec::TYPE_RRSIG && prepared.signed.is_some() {
        return None;
    }
    if !prepared.glue_names.is_empty()
        && ((at == 0 && matches!(query.qtype, TYPE_NS | TYPE_ANY))
            || prepared.glue_names.iter().any(|g| **g == *name))
    {
        return None;
    }

    let (client, subnet_prefix) = match query.edns.as_ref().and_then(|e| e.subnet) {
        Some((address, prefix)) if prefix > 0 => (address, Some(prefix)),
        _ => (source, None),
    };
    // A client subnet steers with at most the configured number of bits (the answer's scope).
    let used_prefix = subnet_prefix.map(|prefix| {
        let (v4, v6) = prepared.ecs_max_source;
        prefix.min(if client.is_ipv4() { v4 } else { v6 })
    });
    let located = match used_prefix {
        Some(prefix) => mask(client, prefix),
        None => client,
    };
    let udp_limit = query.edns.as_ref().map_or(CLASSIC_UDP_LIMIT, |e| {
        usize::from(e.payload.clamp(512, prepared.max_udp_payload))
    });

    let start = out.len();
    let chosen_start = chosen.len();
    out.extend_from_slice(&query.id);
    out.push(0x80 | 0x04 | u8::from(query.recursion_desired));
    out.push(0);
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(query.question);

    let entry = prepared.names.get(name);
    let qtype = query.qtype;
    let mut answers: u16 = 0;
    let mut nxdomain = false;
    let mut fail_open = false;
    let mut tailored = false;
    // DNSSEC records go to clients that set DO, and only when the zone is signed.
    let signed = prepared
        .signed
        .as_deref()
        .filter(|_| query.edns.as_ref().is_some_and(|e| e.dnssec_ok));
    let rrsig = |out: &mut Vec<u8>, owner: &[u8], rr: &Rr, answers: &mut u16| {
        out.extend_from_slice(owner);
        rr.write(out);
        *answers = answers.saturating_add(1);
    };
    if at == 0 && matches!(qtype, TYPE_SOA | TYPE_NS | TYPE_ANY) {
        if matches!(qtype, TYPE_SOA | TYPE_ANY) {
            out.extend_from_slice(&QNAME_POINTER);
            out.extend_from_slice(&prepared.soa_answer);
            answers += 1;
            if let Some(signed) = signed {
                rrsig(out, &QNAME_POINTER, &signed.soa_rrsig, &mut answers);
            }
        }
        if matches!(qtype, TYPE_NS | TYPE_ANY) {
            out.extend_from_slice(&prepared.ns_answer);
            answers = answers.saturating_add(prepared.ns_count);
            if let Some(signed) = signed {
                rrsig(out, &QNAME_POINTER, &signed.ns_rrsig, &mut answers);
            }
        }
    } else if let (0, TYPE_DNSKEY, Some(zone_signed)) = (at, qtype, prepared.signed.as_deref()) {
        for dnskey in &zone_signed.dnskeys {
            rrsig(out, &QNAME_POINTER, dnskey, &mut answers);
        }
        if let Some(signed) = signed {
            for sig in &signed.dnskey_rrsigs {
                rrsig(out, &QNAME_POINTER, sig, &mut answers);
            }
        }
    } else if let (Some(Some(record)), true) =
        (entry, matches!(qtype, TYPE_A | TYPE_AAAA | TYPE_ANY))
    {
        let location = locate(located);
        tailored = location.is_some();
        let v4 = matches!(qtype, TYPE_A | TYPE_ANY);
        let v6 = matches!(qtype, TYPE_AAAA | TYPE_ANY);
        fail_open = prepared.steer(*record, (v4, v6), healthy, location, ranks, chosen);
        for &p in &chosen[chosen_start..] {
            let Some(pop) = prepared.pops.get(p) else {
                continue;
            };
            if v4 {
                out.extend_from_slice(&pop.a);
                answers = answers.saturating_add(pop.a_count);
            }
            if v6 {
                out.extend_from_slice(&pop.aaaa);
                answers = answers.saturating_add(pop.aaaa_count);
            }
        }
        if let Some(signed) = signed {
            let picked = &chosen[chosen_start..];
            let pops = &prepared.pops;
            for (wanted, rtype) in [(v4, TYPE_A), (v6, TYPE_AAAA)] {
                let mask = pop_mask(picked, |p| {
                    pops.get(p).is_some_and(|pop| {
                        if rtype == TYPE_A {
                            pop.a_count > 0
                        } else {
                            pop.aaaa_count > 0
                        }
                    })
                });
                if !wanted || mask == 0 {
                    continue;
                }
                if let Some(rr) = signed.variants.get(&(index(*record), rtype, mask)) {
                    rrsig(out, &QNAME_POINTER, rr, &mut answers);
                }
            }
        }
    } else if let (Some(_), dnssec::TYPE_NSEC, Some(zone_signed)) =
        (entry, qtype, prepared.signed.as_deref())
    {
        // Asked for by type, a name's NSEC is its data like any other (RFC 3225: even without
        // DO; its RRSIG only with DO).
        if let Some(nsec) = zone_signed.nsec.at(name) {
            rrsig(out, &QNAME_POINTER, &nsec.nsec, &mut answers);
            if signed.is_some() {
                rrsig(out, &QNAME_POINTER, &nsec.rrsig, &mut answers);
            }
        }
    } else if entry.is_none() {
        nxdomain = true;
    }
    let mut authority = 0u16;
    if answers == 0 {
        // NXDOMAIN or NODATA: the SOA in authority lets resolvers cache the negative answer.
        out.extend_from_slice(&origin_pointer.to_be_bytes());
        out.extend_from_slice(&prepared.soa_negative);
        authority = 1;
        if let Some(signed) = signed {
            // ... and, signed, the NSEC records that prove there is nothing to answer.
            rrsig(
                out,
                &origin_pointer.to_be_bytes(),
                &signed.soa_negative_rrsig,
                &mut authority,
            );
            let proof = if nxdomain {
                dnssec::nxdomain_proof(&signed.nsec, name, &|n| prepared.names.contains_key(n))
            } else {
                [signed.nsec.at(name), None]
            };
            for entry in proof.into_iter().flatten() {
                // Owners are zone names: their labels below the apex, then a pointer to it.
                let below = entry.owner.len().saturating_sub(origin.len());
                let mut owner = [0u8; 257];
                let Some(slot) = owner.get_mut(..below + 2) else {
                    continue;
                };
                slot[..below].copy_from_slice(entry.owner.get(..below)?);
                slot[below..].copy_from_slice(&origin_pointer.to_be_bytes());
                rrsig(out, slot, &entry.nsec, &mut authority);
                rrsig(out, slot, &entry.rrsig, &mut authority);
            }
        }
    }
    let mut additional = 0u8;
    if query.edns.is_some() {
        additional = 1;
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&prepared.max_udp_payload.max(512).to_be_bytes());
        // Extended RCODE, version, flags: DO echoed when DNSSEC records were asked for and given.
        out.extend_from_slice(&[0, 0, if signed.is_some() { 0x80 } else { 0 }, 0]);
        match subnet_prefix {
            Some(prefix) => {
                // RFC 7871 §7.2.1: echo the option; the scope says how much of the address the
                // answer used.
                let scope = match used_prefix {
                    Some(used) if tailored => used,
                    _ => 0,
                };
                let bytes = usize::from(prefix).div_ceil(8);
                let (family, octets) = match mask(client, prefix) {
                    IpAddr::V4(v4) => (1u16, v4.to_ipv6_mapped().octets()),
                    IpAddr::V6(v6) => (2u16, v6.octets()),
                };
                let octets = if family == 1 {
                    &octets[12..12 + bytes.min(4)]
                } else {
                    &octets[..bytes.min(16)]
                };
                let option_len = u16::try_from(4 + octets.len()).ok()?;
                out.extend_from_slice(&(option_len + 4).to_be_bytes());
                out.extend_from_slice(&OPTION_SUBNET.to_be_bytes());
                out.extend_from_slice(&option_len.to_be_bytes());
                out.extend_from_slice(&family.to_be_bytes());
                out.push(prefix);
                out.push(scope);
                out.extend_from_slice(octets);
            }
            None => out.extend_from_slice(&[0, 0]),
        }
    }
    // What does not fit in UDP goes the general way, which decides truncation.
    if transport == Transport::Udp && out.len() - start > udp_limit {
        out.truncate(start);
        chosen.truncate(chosen_start);
        return None;
    }
    if let Some(header) = out.get_mut(start..start + 12) {
        header[3] = if nxdomain { 3 } else { 0 };
        header[6..8].copy_from_slice(&answers.to_be_bytes());
        header[8..10].copy_from_slice(&authority.to_be_bytes());
        header[11] = additional;
    }
    Some(Meta {
        qtype: qtype_label(qtype),
        rcode: if nxdomain { "NXDOMAIN" } else { "NOERROR" },
        fail_open,
    })
}

fn parse<'a>(request: &'a [u8], name: &mut [u8; 255]) -> Option<Query<'a>> {
    let header = request.get(..12)?;
    let flags = header[2];
    // A query (QR clear) with opcode QUERY, one question, nothing in answer or authority.
    if flags & 0x80 != 0 || (flags >> 3) & 0x0f != 0 {
        return None;
    }
    if be16(header, 4)? != 1 || be16(header, 6)? != 0 || be16(header, 8)? != 0 {
        return None;
    }
    let additional = be16(header, 10)?;
    if additional > 1 {
        return None;
    }
    let mut name_len = 0;
    let mut at = 12;
    loop {
        let len = usize::from(*request.get(at)?);
        if len == 0 {
            *name.get_mut(name_len)? = 0;
            name_len += 1;
            at += 1;
            break;
        }
        // Compression pointers, extended label types and anything but letters, digits, '-' and
        // '_' in a label: the general path.
        if len > 63 || name_len + len + 2 > name.len() {
            return None;
        }
        let label = request.get(at + 1..at + 1 + len)?;
        name[name_len] = len as u8;
        let to = name.get_mut(name_len + 1..name_len + 1 + len)?;
        for (to, &byte) in to.iter_mut().zip(label) {
            let folded = LABEL_BYTE[usize::from(byte)];
            if folded == 0 {
                return None;
            }
            *to = folded;
        }
        name_len += 1 + len;
        at += 1 + len;
    }
    let qtype = be16(request, at)?;
    if be16(request, at + 2)? != CLASS_IN {
        return None;
    }
    at += 4;
    let question = request.get(12..at)?;
    let mut edns = None;
    if additional == 1 {
        // Only an OPT record at the root, version 0, with well-formed options.
        if *request.get(at)? != 0 || be16(request, at + 1)? != TYPE_OPT {
            return None;
        }
        let payload = be16(request, at + 3)?;
        if *request.get(at + 6)? != 0 {
            return None;
        }
        let dnssec_ok = *request.get(at + 7)? & 0x80 != 0;
        let length = usize::from(be16(request, at + 9)?);
        let options = request.get(at + 11..at + 11 + length)?;
        at += 11 + length;
        let mut subnet = None;
        let mut i = 0;
        while i < options.len() {
            let code = be16(options, i)?;
            let len = usize::from(be16(options, i + 2)?);
            let data = options.get(i + 4..i + 4 + len)?;
            match code {
                OPTION_SUBNET if subnet.is_none() => subnet = Some(parse_subnet(data)?),
                OPTION_SUBNET | OPTION_NSID => return None,
                _ => {}
            }
            i += 4 + len;
        }
        edns = Some(EdnsQuery {
            payload,
            dnssec_ok,
            subnet,
        });
    }
    if at != request.len() {
        return None;
    }
    Some(Query {
        id: [header[0], header[1]],
        recursion_desired: flags & 0x01 != 0,
        question,
        name_len,
        qtype,
        edns,
    })
}

/// RFC 7871 option data: family, source prefix, scope prefix, the address cut to the prefix.
fn parse_subnet(data: &[u8]) -> Option<(IpAddr, u8)> {
    let family = be16(data, 0)?;
    let prefix = *data.get(2)?;
    let bytes = usize::from(prefix).div_ceil(8);
    let address = data.get(4..)?;
    if address.len() != bytes {
        return None;
    }
    match family {
        1 if prefix <= 32 => {
            let mut octets = [0u8; 4];
            octets[..bytes].copy_from_slice(address);
            Some((IpAddr::V4(Ipv4Addr::from(octets)), prefix))
        }
        2 if prefix <= 128 => {
            let mut octets = [0u8; 16];
            octets[..bytes].copy_from_slice(address);
            Some((IpAddr::V6(Ipv6Addr::from(octets)), prefix))
        }
        _ => None,
    }
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    let pair = bytes.get(at..at + 2)?;
    Some(u16::from_be_bytes([pair[0], pair[1]]))
}

fn qtype_label(qtype: u16) -> &'static str {
    match qtype {
        TYPE_A => "A",
        TYPE_AAAA => "AAAA",
        TYPE_SOA => "SOA",
        TYPE_NS => "NS",
        TYPE_ANY => "ANY",
        _ => "other",
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let keep = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & keep).into())
        }
        IpAddr::V6(v6) => {
            let keep = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & keep).into())
        }
    }
}

/// A (lower-case, fully qualified) name in uncompressed wire format.
/// The zone's SOA record data (mname, rname, then the five counters), as answered and as signed.
fn soa_rdata(zone: &Zone) -> Vec<u8> {
    let mut rdata = wire(&zone.soa.mname);
    rdata.extend_from_slice(&wire(&zone.soa.rname));
    for value in [
        zone.soa.serial,
        zone.soa.refresh as u32,
        zone.soa.retry as u32,
        zone.soa.expire as u32,
        zone.soa.minimum,
    ] {
        rdata.extend_from_slice(&value.to_be_bytes());
    }
    rdata
}

fn wire(name: &Name) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(name.len() + 1);
    for label in name.iter() {
        bytes.push(label.len() as u8);
        bytes.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    bytes.push(0);
    bytes
}

fn rdlength(rdata: &[u8]) -> [u8; 2] {
    u16::try_from(rdata.len()).unwrap_or(u16::MAX).to_be_bytes()
}

fn index(p: usize) -> u32 {
    u32::try_from(p).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    //! The fast path against the general one ([`super::super::answer::answer`], the answers GeoDNS
    //! gave before the fast path existed): the same message for every test-world client, name,
    //! type, EDNS shape and health state, and for thousands of damaged queries.

    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;

    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
    use hickory_proto::rr::RData;
    use hickory_proto::rr::{Name, RecordType};
    use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
    use meridian_geoip::{test_world, GeoDb};
    use meridian_testkit::test_world::build as build_test_world;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    use super::super::answer::{answer, respond, Transport};
    use super::super::dnssec::SigningKey;
    use super::super::zone::Zone;
    use super::{Prepared, RankCache};

    const LOCAL: &str = include_str!("../../../examples/local.toml");

    /// `examples/local.toml`, and a variant that exercises the rest of the steering: several PoPs
    /// per answer, weights, the apex and an empty non-terminal steered, a PoP without IPv6, no
    /// configured default PoPs.
    fn zones() -> Vec<Zone> {
        let local = meridian_config::Config::from_toml_str(LOCAL).expect("examples/local.toml");
        let mut variant = local.clone();
        {
            let dns = variant.dns.as_mut().expect("[dns]");
            dns.answers = 3;
            dns.default_pops.clear();
            dns.records.push(meridian_config::DnsRecord {
                name: "@".into(),
                pops: Vec::new(),
                weights: [("frankfurt".to_string(), 7)].into_iter().collect(),
            });
            dns.records.push(meridian_config::DnsRecord {
                name: "a.b".into(),
                pops: vec!["seoul".into(), "frankfurt".into(), "manila".into()],
                weights: [("manila".to_string(), 3)].into_iter().collect(),
            });
        }
        variant.pops[5].addresses.retain(|a| !a.contains(':'));
        variant.validate().expect("variant validates");
        [local, variant]
            .iter()
            .map(|config| Zone::compile(config).expect("zone compiles"))
            .collect()
    }

    /// [`zones`] signed with one fresh key.
    fn signed_zones() -> Vec<Zone> {
        let key = Arc::new(
            SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().expect("generate")).expect("key"),
        );
        zones()
            .into_iter()
            .map(|mut zone| {
                zone.sign_with(Arc::clone(&key)).expect("signs");
                zone
            })
            .collect()
    }

    /// A query with EDNS and the DO bit.
    fn message_do(
        name: &str,
        qtype: RecordType,
        payload: u16,
        subnet: Option<&ClientSubnet>,
    ) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 0x5a18;
        message.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        edns.set_dnssec_ok(true);
        if let Some(subnet) = subnet {
            edns.options_mut().insert(EdnsOption::Subnet(*subnet));
        }
        message.set_edns(edns);
        message.to_vec().expect("encodes")
    }

    /// Checks `reply` as a validator would with `key` as the trust anchor: every RRset in the
    /// answer and authority sections is covered by an RRSIG that verifies (canonical form, RFC
    /// 4034 §6), is in its validity window and names the key and the zone. Without DO there must
    /// be no DNSSEC records at all but the answers the question asked for by type. Returns the
    /// number of signatures checked.
    fn verify_signatures(reply: &Message, zone: &Zone, dnssec_ok: bool, context: &str) -> usize {
        let Some(key) = zone.dnssec.as_ref() else {
            return 0;
        };
        let dnssec_types = [RecordType::RRSIG, RecordType::NSEC];
        if !dnssec_ok {
            let asked = reply.queries.first().map(|q| q.query_type());
            assert!(
                !reply
                    .answers
                    .iter()
                    .filter(|r| Some(r.record_type()) != asked)
                    .chain(&reply.authorities)
                    .any(|r| dnssec_types.contains(&r.record_type())),
                "{context}: DNSSEC records without DO"
            );
            return 0;
        }
        // Published keys (a rollover) sign the DNSKEY set only; the active key signs everything.
        let keys: Vec<&SigningKey> = std::iter::once(&**key)
            .chain(zone.published_keys.iter().map(|k| &**k))
            .collect();
        let public_of = |tag: u16| {
            let signer = keys
                .iter()
                .find(|k| k.key_tag() == tag)
                .unwrap_or_else(|| panic!("{context}: key tag {tag} is no zone key"));
            let mut point = vec![4u8];
            point.extend_from_slice(&signer.dnskey()[4..]);
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as u32;
        let origin = super::wire(&zone.origin);
        let mut checked = 0;
        for section in [&reply.answers, &reply.authorities] {
            let mut covered: Vec<(Name, u16)> = Vec::new();
            for sig in section
                .iter()
                .filter(|r| r.record_type() == RecordType::RRSIG)
            {
                let RData::Unknown { rdata, .. } = &sig.data else {
                    panic!("{context}: RRSIG decodes as opaque data");
                };
                let bytes = rdata.anything.as_slice();
                let type_covered = u16::from_be_bytes([bytes[0], bytes[1]]);
                let original_ttl = &bytes[4..8];
                let expiration = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
                let inception = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
                assert!(inception < now && now < expiration, "{context}: window");
                assert_eq!(bytes[2], 13, "{context}: algorithm");
                let tag = u16::from_be_bytes([bytes[16], bytes[17]]);
                if type_covered != u16::from(RecordType::DNSKEY) {
                    assert_eq!(tag, key.key_tag(), "{context}: key tag");
                }
                let public = public_of(tag);
                assert_eq!(
                    &bytes[18..18 + origin.len()],
                    origin.as_slice(),
                    "{context}"
                );
                let owner = sig.name.to_lowercase();
                let mut rdatas: Vec<Vec<u8>> = section
                    .iter()
                    .filter(|r| {
                        r.name.to_lowercase() == owner && u16::from(r.record_type()) == type_covered
                    })
                    .map(|r| {
                        assert_eq!(r.ttl, sig.ttl, "{context}: TTLs of an RRset and its RRSIG");
                        let mut buf = Vec::new();
                        let mut encoder = BinEncoder::new(&mut buf);
                        encoder.set_canonical_form(true);
                        r.data.emit(&mut encoder).expect("emits");
                        buf
                    })
                    .collect();
                rdatas.sort();
                rdatas.dedup();
                assert!(!rdatas.is_empty(), "{context}: RRSIG over nothing");
                let signature_at = bytes.len() - 64;
                let mut signed = bytes[..signature_at].to_vec();
                let owner_wire = super::wire(&owner);
                assert_eq!(
                    usize::from(bytes[3]),
                    owner.num_labels() as usize,
                    "{context}: labels"
                );
                for data in rdatas {
                    signed.extend_from_slice(&owner_wire);
                    signed.extend_from_slice(&type_covered.to_be_bytes());
                    signed.extend_from_slice(&[0, 1]);
                    signed.extend_from_slice(original_ttl);
                    signed.extend_from_slice(&(data.len() as u16).to_be_bytes());
                    signed.extend_from_slice(&data);
                }
                public
                    .verify(&signed, &bytes[signature_at..])
                    .unwrap_or_else(|_| panic!("{context}: RRSIG {owner} {type_covered} verifies"));
                covered.push((owner, type_covered));
                checked += 1;
            }
            for record in section
                .iter()
                .filter(|r| r.record_type() != RecordType::RRSIG)
            {
                let key = (record.name.to_lowercase(), u16::from(record.record_type()));
                assert!(covered.contains(&key), "{context}: {key:?} unsigned");
            }
            let dnskey_signatures = covered
                .iter()
                .filter(|(_, t)| *t == u16::from(RecordType::DNSKEY))
                .count();
            assert!(
                dnskey_signatures == 0 || dnskey_signatures == keys.len(),
                "{context}: every key signs the DNSKEY set"
            );
        }
        if reply.answers.is_empty() {
            assert!(
                reply
                    .authorities
                    .iter()
                    .any(|r| r.record_type() == RecordType::NSEC),
                "{context}: denial without NSEC"
            );
        }
        checked
    }

    fn geo() -> GeoDb {
        GeoDb::from_bytes(build_test_world().expect("test world")).expect("test world opens")
    }

    fn message(
        name: &str,
        qtype: RecordType,
        edns: Option<(u16, Option<ClientSubnet>)>,
    ) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 0x5a17;
        message.metadata.recursion_desired = name.len().is_multiple_of(2);
        message.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        if let Some((payload, subnet)) = edns {
            let mut edns = Edns::new();
            edns.set_max_payload(payload);
            if let Some(subnet) = subnet {
                edns.options_mut().insert(EdnsOption::Subnet(subnet));
            }
            message.set_edns(edns);
        }
        message.to_vec().expect("encodes")
    }

    /// Runs both paths; when the fast one answers, its answer must be the general one's. Returns
    /// whether the fast path answered.
    fn same(
        zone: &Zone,
        ranks: &mut RankCache,
        request: &[u8],
        source: IpAddr,
        healthy: &dyn Fn(usize) -> bool,
        locate: &dyn Fn(IpAddr) -> Option<(f64, f64)>,
        context: &str,
    ) -> bool {
        let general = answer(zone, request, source, Transport::Udp, healthy, locate);
        // Earlier answers of a batch sit in front: the fast path appends after them.
        let mut out = vec![0xaa, 0xbb];
        let mut chosen = vec![99];
        let fast = super::respond(
            &zone.prepared,
            ranks,
            request,
            source,
            Transport::Udp,
            healthy,
            locate,
            &mut out,
            &mut chosen,
        );
        let Some(meta) = fast else {
            assert_eq!(out, [0xaa, 0xbb], "{context}: declined, buffer untouched");
            assert_eq!(chosen, [99], "{context}: declined, PoPs untouched");
            return false;
        };
        let bytes = general
            .bytes
            .as_deref()
            .expect("the general path answers too");
        let expected = Message::from_vec(bytes).expect("general answer decodes");
        let got = Message::from_vec(&out[2..]).expect("fast answer decodes");
        assert_eq!(got, expected, "{context}");
        let dnssec_ok = Message::from_vec(request)
            .ok()
            .and_then(|m| m.edns.map(|e| e.flags().dnssec_ok))
            .unwrap_or(false);
        if got.metadata.response_code != hickory_proto::op::ResponseCode::Refused {
            verify_signatures(&got, zone, dnssec_ok, context);
        }
        // Signed answers: the prepared SOA and NSEC owners are compressed less than hickory does.
        let slack = if dnssec_ok { 64 } else { 0 };
        assert!(
            out.len() - 2 <= bytes.len().max(512) + slack,
            "{context}: size"
        );
        assert_eq!(
            (meta.qtype, meta.rcode, meta.fail_open),
            (general.qtype, general.rcode, general.fail_open),
            "{context}"
        );
        assert_eq!(&chosen[1..], general.pops.as_slice(), "{context}: PoPs");
        assert!(!general.truncated, "{context}");
        true
    }

    #[test]
    fn same_answers_as_the_general_path_for_the_whole_test_world() {
        let db = geo();
        let locate = |ip: IpAddr| db.lookup(ip).ok().flatten().and_then(|l| l.coordinates);
        let names = [
            "api.example.test.",
            "API.Example.TEST.",
            "inference.example.test.",
            "static.example.test.",
            "example.test.",
            "eXample.tesT.",
            "nope.example.test.",
            "missing.api.example.test.",
            "b.example.test.",
            "a.b.example.test.",
            "_x-1.a.b.example.test.",
            "zzz.example.test.",
            "0.example.test.",
        ];
        let qtypes = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::ANY,
            RecordType::SOA,
            RecordType::NS,
            RecordType::MX,
            RecordType::TXT,
            RecordType::CNAME,
            RecordType::AXFR,
            RecordType::DNSKEY,
            RecordType::NSEC,
            RecordType::RRSIG,
            RecordType::DS,
            RecordType::Unknown(65_000),
        ];
        let mut sources: Vec<IpAddr> = test_world::PLACES
            .iter()
            .map(|place| place.client_addr(53))
            .collect();
        sources.extend([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
        let subnet_sources = [sources[0], IpAddr::V4(Ipv4Addr::LOCALHOST)];
        // EDNS shapes: none, plain (small and large buffers), and client subnets of every
        // test-world network at several prefix lengths, unplaced ones and opted-out (/0) ones.
        let mut shapes: Vec<Option<(u16, Option<ClientSubnet>)>> =
            vec![None, Some((100, None)), Some((4096, None))];
        for place in test_world::PLACES {
            let net: ipnet::Ipv4Net = place.network.parse().expect("network");
            let base = net.network();
            for (address, prefix) in [(base, 24), (base, 16), (base, 32), (base, 20)] {
                shapes.push(Some((
                    1232,
                    Some(ClientSubnet::new(IpAddr::V4(address), prefix, 0)),
                )));
            }
        }
        for (address, prefix) in [
            (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), 24),
            (IpAddr::V4(Ipv4Addr::new(127, 15, 3, 7)), 31),
            (IpAddr::V6("2001:db8:aa::".parse().expect("v6")), 56),
            (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        ] {
            shapes.push(Some((1232, Some(ClientSubnet::new(address, prefix, 0)))));
        }
        let all_up = |_: usize| true;
        let (mut fast, mut total) = (0, 0);
        let mut all_zones = zones();
        all_zones.extend(signed_zones());
        for (z, zone) in all_zones.iter().enumerate() {
            let pops = zone.pops.len();
            // Health: all up, each PoP down alone, all down, only one up.
            let mut patterns: Vec<Vec<bool>> = vec![vec![true; pops], vec![false; pops]];
            for down in 0..pops {
                patterns.push((0..pops).map(|p| p != down).collect());
            }
            patterns.push((0..pops).map(|p| p == 5).collect());
            patterns.push((0..pops).map(|p| p % 2 == 0).collect());
            let mut ranks = RankCache::default();
            for name in names {
                for qtype in qtypes {
                    let steerable =
                        matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY);
                    for (s, shape) in shapes.iter().enumerate() {
                        // Signed zones answer unsigned queries like the others: a sample of the
                        // subnet shapes is enough for them (it keeps this test's run time sane).
                        if zone.dnssec.is_some() && s > 2 && s % 4 != 0 {
                            continue;
                        }
                        // Signed zones: with and without DO. A signed answer may not fit a small
                        // buffer; that one goes the general way (which truncates).
                        let mut requests = vec![(message(name, qtype, *shape), true)];
                        if zone.dnssec.is_some() {
                            if let Some((payload, subnet)) = shape {
                                requests.push((
                                    message_do(name, qtype, *payload, subnet.as_ref()),
                                    *payload >= 1232,
                                ));
                            }
                        }
                        // A client subnet decides alone; without one, the resolver's address.
                        let has_subnet = matches!(shape, Some((_, Some(_))));
                        let from: &[IpAddr] = if has_subnet {
                            &subnet_sources
                        } else {
                            &sources
                        };
                        for (request, must_be_fast) in &requests {
                            // Signatures by type in a signed zone go the general way.
                            let must_be_fast = *must_be_fast
                                && !(qtype == RecordType::RRSIG && zone.dnssec.is_some());
                            for &source in from {
                                let context =
                                    format!("zone {z} {name} {qtype} {shape:?} from {source}");
                                total += usize::from(must_be_fast);
                                if same(
                                    zone, &mut ranks, request, source, &all_up, &locate, &context,
                                ) && must_be_fast
                                {
                                    fast += 1;
                                }
                                if !steerable {
                                    continue;
                                }
                                for health in &patterns {
                                    let healthy = |p: usize| health.get(p).copied().unwrap_or(true);
                                    let context = format!("{context} health {health:?}");
                                    total += usize::from(must_be_fast);
                                    if same(
                                        zone, &mut ranks, request, source, &healthy, &locate,
                                        &context,
                                    ) && must_be_fast
                                    {
                                        fast += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Every query above is in the zone, class IN, one OPT at most: all of them are fast.
        assert_eq!(fast, total, "queries the fast path declined");
    }

    /// During a rollover the DNSKEY set holds every configured key and carries one signature by
    /// each (so a parent DS naming either validates it), while answers stay signed by the active
    /// key alone; both paths agree.
    #[test]
    fn published_keys_join_the_dnskey_set_and_sign_only_it() {
        let db = geo();
        let locate = |ip: IpAddr| db.lookup(ip).ok().flatten().and_then(|l| l.coordinates);
        let all_up = |_: usize| true;
        let fresh = || {
            Arc::new(
                SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().expect("generate"))
                    .expect("key"),
            )
        };
        let mut zone = zones().remove(0);
        zone.published_keys = vec![fresh(), fresh()];
        zone.sign_with(fresh()).expect("signs");
        let mut ranks = RankCache::default();
        let source = IpAddr::V4(Ipv4Addr::new(127, 15, 0, 53));
        for (name, qtype) in [
            ("example.test.", RecordType::DNSKEY),
            ("example.test.", RecordType::SOA),
            ("api.example.test.", RecordType::A),
            ("nope.example.test.", RecordType::A),
            ("example.test.", RecordType::RRSIG),
        ] {
            let request = message_do(name, qtype, 4096, None);
            let context = format!("{name} {qtype}");
            same(
                &zone, &mut ranks, &request, source, &all_up, &locate, &context,
            );
            let reply = answer(&zone, &request, source, Transport::Udp, &all_up, &locate);
            let reply =
                Message::from_vec(reply.bytes.as_deref().expect("answered")).expect("decodes");
            if qtype != RecordType::RRSIG {
                // Asked for by type, the signatures are the data: no sets here to check them on.
                verify_signatures(&reply, &zone, true, &context);
            }
            let count = |t: RecordType| {
                reply
                    .answers
                    .iter()
                    .filter(|r| r.record_type() == t)
                    .count()
            };
            match qtype {
                RecordType::DNSKEY => {
                    assert_eq!(count(RecordType::DNSKEY), 3, "{context}");
                    assert_eq!(count(RecordType::RRSIG), 3, "{context}");
                }
                // SOA, NS, NSEC and three over the DNSKEY set.
                RecordType::RRSIG => assert_eq!(count(RecordType::RRSIG), 6, "{context}"),
                _ => assert!(count(RecordType::RRSIG) <= 1, "{context}"),
            }
        }
    }

    /// Asked for by type, the signatures at a name are the ones the same client gets with each of
    /// the name's sets (with DO or without): the steered A and AAAA variants as its location
    /// chooses them, the apex's SOA, NS and DNSKEY, glue addresses, and the NSEC.
    #[test]
    fn signatures_by_type_are_those_of_the_names_sets() {
        let db = geo();
        let locate = |ip: IpAddr| db.lookup(ip).ok().flatten().and_then(|l| l.coordinates);
        let all_up = |_: usize| true;
        let mut with_glue =
            meridian_config::Config::from_toml_str(LOCAL).expect("examples/local.toml");
        with_glue.dns.as_mut().expect("[dns]").glue.insert(
            "ns1.example.test".into(),
            vec!["192.0.2.53".into(), "2001:db8::53".into()],
        );
        with_glue.validate().expect("glue validates");
        let mut with_glue = Zone::compile(&with_glue).expect("zone compiles");
        let mut zones = signed_zones();
        let key = zones[0].dnssec.clone().expect("signed");
        with_glue.sign_with(key).expect("signs");
        zones.push(with_glue);
        for (z, zone) in zones.iter().enumerate() {
            let glue = z == zones.len() - 1;
            let signatures = |name: &str, qtype, source, dnssec_ok: bool| {
                let request = if dnssec_ok {
                    message_do(name, qtype, 4096, None)
                } else {
                    message(name, qtype, Some((4096, None)))
                };
                let reply = answer(zone, &request, source, Transport::Udp, &all_up, &locate);
                let reply =
                    Message::from_vec(reply.bytes.as_deref().expect("answered")).expect("decodes");
                let mut found: Vec<String> = reply
                    .answers
                    .iter()
                    .filter(|r| r.record_type() == RecordType::RRSIG)
                    .map(|r| format!("{r:?}"))
                    .collect();
                found.sort();
                found
            };
            let address_types = [RecordType::A, RecordType::AAAA, RecordType::NSEC];
            let apex_types = [
                RecordType::SOA,
                RecordType::NS,
                RecordType::DNSKEY,
                RecordType::A,
                RecordType::AAAA,
                RecordType::NSEC,
            ];
            let mut sources: Vec<IpAddr> = test_world::PLACES
                .iter()
                .map(|place| place.client_addr(53))
                .collect();
            sources.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
            for source in sources {
                for (name, types) in [
                    ("api.example.test.", &address_types[..]),
                    ("inference.example.test.", &address_types[..]),
                    ("ns1.example.test.", &address_types[..]),
                    ("example.test.", &apex_types[..]),
                ] {
                    if name.starts_with("ns1") && !glue {
                        continue;
                    }
                    let mut expected: Vec<String> = types
                        .iter()
                        .flat_map(|&qtype| signatures(name, qtype, source, true))
                        .collect();
                    expected.sort();
                    assert!(expected.len() >= 2, "{name} from {source}: {expected:?}");
                    for dnssec_ok in [true, false] {
                        assert_eq!(
                            signatures(name, RecordType::RRSIG, source, dnssec_ok),
                            expected,
                            "{name} RRSIG from {source}, DO {dnssec_ok}"
                        );
                    }
                }
            }
            // A name that does not exist has none: NXDOMAIN, proven as for any other type.
            let request = message_do("nope.example.test.", RecordType::RRSIG, 4096, None);
            let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let reply = answer(zone, &request, source, Transport::Udp, &all_up, &locate);
            let reply =
                Message::from_vec(reply.bytes.as_deref().expect("answered")).expect("decodes");
            assert_eq!(
                reply.metadata.response_code,
                hickory_proto::op::ResponseCode::NXDomain
            );
            verify_signatures(&reply, zone, true, "nope RRSIG");
        }
    }

    #[test]
    fn damaged_queries_are_declined_or_answered_the_same() {
        let db = geo();
        let locate = |ip: IpAddr| db.lookup(ip).ok().flatten().and_then(|l| l.coordinates);
        let zones = zones();
        let seeds = [
            message("api.example.test.", RecordType::A, None),
            message(
                "Static.example.test.",
                RecordType::AAAA,
                Some((
                    1232,
                    Some(ClientSubnet::new(
                        IpAddr::V4(Ipv4Addr::new(127, 14, 0, 0)),
                        24,
                        0,
                    )),
                )),
            ),
            message("example.test.", RecordType::SOA, Some((4096, None))),
            message("nope.example.test.", RecordType::A, Some((1232, None))),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut ranks = RankCache::default();
        let healthy = |p: usize| p != 2;
        let mut answered = 0;
        for round in 0..20_000 {
            let zone = &zones[round % zones.len()];
            let mut packet = seeds[round % seeds.len()].clone();
            for _ in 0..=(next() % 3) {
                match next() % 4 {
                    0 if !packet.is_empty() => {
                        let at = next() as usize % packet.len();
                        packet[at] = next() as u8;
                    }
                    1 => packet.truncate(next() as usize % (packet.len() + 1)),
                    2 => packet.push(next() as u8),
                    _ if packet.len() > 12 => {
                        // Header fields are where shapes differ: counts, flags, opcode.
                        let at = 2 + next() as usize % 10;
                        packet[at] = next() as u8;
                    }
                    _ => {}
                }
            }
            let source = IpAddr::V4(Ipv4Addr::new(127, 10 + (round % 9) as u8, 0, 9));
            if same(
                zone,
                &mut ranks,
                &packet,
                source,
                &healthy,
                &locate,
                &format!("round {round}: {packet:02x?}"),
            ) {
                answered += 1;
            }
        }
        assert!(
            answered > 300,
            "the fast path still answers most lightly damaged queries: {answered}"
        );
    }

    #[test]
    fn what_does_not_fit_goes_the_general_way_and_truncates() {
        let mut zone = zones().remove(0);
        zone.pops[1].v4 = (1..=60).map(|i| Ipv4Addr::new(198, 51, 100, i)).collect();
        zone.prepare().expect("prepares");
        let request = message("api.example.test.", RecordType::A, None);
        let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut ranks = RankCache::default();
        let (mut out, mut chosen) = (Vec::new(), Vec::new());
        let none = |_: IpAddr| None;
        let outcome = respond(
            &zone,
            &mut ranks,
            &request,
            source,
            Transport::Udp,
            &|_| true,
            &none,
            &mut out,
            &mut chosen,
        );
        assert!(outcome.sent && outcome.truncated);
        assert!(
            Message::from_vec(&out)
                .expect("decodes")
                .metadata
                .truncation
        );
        out.clear();
        let outcome = respond(
            &zone,
            &mut ranks,
            &request,
            source,
            Transport::Tcp,
            &|_| true,
            &none,
            &mut out,
            &mut chosen,
        );
        assert!(outcome.sent && !outcome.truncated);
        assert_eq!(Message::from_vec(&out).expect("decodes").answers.len(), 60);
        // A stale prepared zone is never used by a cache built for another one.
        assert_ne!(zone.prepared.id, Prepared::default().id);
    }
}
