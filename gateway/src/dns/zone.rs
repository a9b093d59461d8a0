//! The zone as GeoDNS serves it: compiled once per config version from `[dns]` and `[[pops]]`, then
//! read-only. Names are stored lower-cased (DNS names compare case-insensitively).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hickory_proto::rr::rdata::{NS, SOA};
use hickory_proto::rr::{Name, RData, Record};
use meridian_config::{Config, DnsRrl, DnsSection, Pop};

use super::dnssec::{DnssecError, SigningKey};
use super::fast::Prepared;

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("the config has no [dns] section")]
    NoDnsSection,
    #[error("{path}: bad DNS name {name:?}: {reason}")]
    Name {
        path: String,
        name: String,
        reason: String,
    },
    #[error("{path}: unknown pop {name:?}")]
    UnknownPop { path: String, name: String },
    #[error("{path}: bad address {value:?}")]
    Address { path: String, value: String },
    #[error("dnssec: {0}")]
    Dnssec(#[from] DnssecError),
}

/// One PoP as answers need it.
#[derive(Clone, Debug)]
pub struct ZonePop {
    pub name: String,
    /// (lat, lon) in degrees.
    pub location: (f64, f64),
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    /// `http://ip:port/path`, or `None`: always healthy.
    pub health: Option<String>,
}

/// An in-zone name server's addresses (answered for its name, glue with the apex NS records).
#[derive(Clone, Debug)]
pub struct Glue {
    pub name: Name,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// A name steered to PoPs: candidate PoP indices and their weights (same order).
#[derive(Clone, Debug)]
pub struct Steered {
    pub pops: Vec<usize>,
    pub weights: Vec<f64>,
}

#[derive(Clone, Debug)]
pub struct Zone {
    /// The apex, lower-case, fully qualified.
    pub origin: Name,
    pub ttl: u32,
    pub soa: SOA,
    pub ns: Vec<Name>,
    /// Addresses of in-zone name servers, in `ns` order.
    pub glue: Vec<Glue>,
    pub pops: Vec<ZonePop>,
    /// Steered names (lower-case, fully qualified).
    pub records: HashMap<Name, Steered>,
    /// Every name that exists in the zone, including empty non-terminals (`b.zone` when only
    /// `a.b.zone` is defined): those answer NODATA, everything else under the apex NXDOMAIN.
    pub existing: HashSet<Name>,
    /// PoPs per answer.
    pub answers: usize,
    /// PoP indices for clients whose location is unknown, in preference order.
    pub default_pops: Vec<usize>,
    pub max_udp_payload: u16,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    /// Consecutive passing / failing probes that bring a PoP back / take it out (hysteresis).
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    /// Longest EDNS Client Subnet source prefix used for steering, IPv4 and IPv6.
    pub ecs_max_source: (u8, u8),
    pub max_tcp_connections: usize,
    pub max_tcp_per_address: usize,
    pub tcp_idle_timeout: Duration,
    /// Response rate limiting (applied by the UDP workers, not by the answer functions).
    pub rrl: DnsRrl,
    /// The key that signs the zone (`[dns.dnssec] key_file`); `None`: unsigned.
    pub dnssec: Option<Arc<SigningKey>>,
    /// Keys published next to it during a rollover (`published_key_files`): in the DNSKEY set
    /// and signing it, signing nothing else.
    pub published_keys: Vec<Arc<SigningKey>>,
    /// When the prepared signatures were made (the server re-prepares before they expire).
    pub signed_at: Option<SystemTime>,
    /// The answers above in wire format, for the fast path. Built by [`Zone::compile`]; a zone
    /// changed by hand afterwards needs [`Zone::prepare`] again.
    pub prepared: Prepared,
}

impl Zone {
    /// Compiles the `[dns]` section of `config` (which `validate()` has accepted).
    pub fn compile(config: &Config) -> Result<Zone, ZoneError> {
        let dns = config.dns.as_ref().ok_or(ZoneError::NoDnsSection)?;
        Self::compile_section(dns, &config.pops)
    }

    pub fn compile_section(dns: &DnsSection, pops: &[Pop]) -> Result<Zone, ZoneError> {
        let origin = fqdn("dns.zone", &dns.zone)?;
        let pops = pops
            .iter()
            .enumerate()
            .map(|(i, pop)| compile_pop(i, pop))
            .collect::<Result<Vec<_>, _>>()?;
        let index = |path: String, name: &str| {
            pops.iter()
                .position(|p| p.name == name)
                .ok_or_else(|| ZoneError::UnknownPop {
                    path,
                    name: name.to_string(),
                })
        };
        let ns = if dns.ns.is_empty() {
            vec![relative("dns.ns", "ns1", &origin)?]
        } else {
            dns.ns
                .iter()
                .enumerate()
                .map(|(i, n)| fqdn(&format!("dns.ns[{i}]"), n))
                .collect::<Result<Vec<_>, _>>()?
        };
        let mname = if dns.soa.mname.is_empty() {
            ns[0].clone()
        } else {
            fqdn("dns.soa.mname", &dns.soa.mname)?
        };
        let rname = if dns.soa.rname.is_empty() {
            relative("dns.soa.rname", "hostmaster", &origin)?
        } else {
            fqdn("dns.soa.rname", &dns.soa.rname)?
        };
        let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        let soa = SOA::new(
            mname,
            rname,
            dns.soa.serial,
            clamp(dns.soa.refresh),
            clamp(dns.soa.retry),
            clamp(dns.soa.expire),
            dns.soa.minimum,
        );

        let mut records = HashMap::new();
        let mut existing = HashSet::new();
        existing.insert(origin.clone());
        for (i, record) in dns.records.iter().enumerate() {
            let path = format!("dns.records[{i}]");
            let name = if record.name == "@" {
                origin.clone()
            } else {
                relative(&format!("{path}.name"), &record.name, &origin)?
            };
            let candidates: Vec<usize> = if record.pops.is_empty() {
                (0..pops.len()).collect()
            } else {
                record
                    .pops
                    .iter()
                    .enumerate()
                    .map(|(j, p)| index(format!("{path}.pops[{j}]"), p))
                    .collect::<Result<_, _>>()?
            };
            let weights = candidates
                .iter()
                .map(|&p| {
                    let weight = record.weights.get(&pops[p].name).copied().unwrap_or(1);
                    f64::from(weight.max(1))
                })
                .collect();
            // The name and every ancestor up to the apex exist.
            let mut ancestor = name.clone();
            while ancestor.num_labels() > origin.num_labels() {
                existing.insert(ancestor.clone());
                ancestor = ancestor.base_name();
            }
            records.insert(
                name,
                Steered {
                    pops: candidates,
                    weights,
                },
            );
        }
        let mut glue = Vec::new();
        for ns_name in &ns {
            let Some((written, addresses)) = dns
                .glue
                .iter()
                .find(|(written, _)| fqdn("dns.glue", written).is_ok_and(|n| n == *ns_name))
            else {
                continue;
            };
            let mut entry = Glue {
                name: ns_name.clone(),
                v4: Vec::new(),
                v6: Vec::new(),
            };
            for (j, address) in addresses.iter().enumerate() {
                match address.parse::<IpAddr>() {
                    Ok(IpAddr::V4(ip)) => entry.v4.push(ip),
                    Ok(IpAddr::V6(ip)) => entry.v6.push(ip),
                    Err(_) => {
                        return Err(ZoneError::Address {
                            path: format!("dns.glue.{written}[{j}]"),
                            value: address.clone(),
                        })
                    }
                }
            }
            if origin.zone_of(ns_name) {
                let mut ancestor = ns_name.clone();
                while ancestor.num_labels() > origin.num_labels() {
                    existing.insert(ancestor.clone());
                    ancestor = ancestor.base_name();
                }
                glue.push(entry);
            }
        }
        let default_pops = dns
            .default_pops
            .iter()
            .enumerate()
            .map(|(i, p)| index(format!("dns.default_pops[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut zone = Zone {
            origin,
            ttl: dns.ttl,
            soa,
            ns,
            glue,
            pops,
            records,
            existing,
            answers: dns.answers.max(1),
            default_pops,
            max_udp_payload: dns.limits.max_udp_payload.max(512),
            health_interval: dns.health.interval.as_duration(),
            health_timeout: dns.health.timeout.as_duration(),
            healthy_after: dns.health.healthy_after.max(1),
            unhealthy_after: dns.health.unhealthy_after.max(1),
            ecs_max_source: (
                dns.ecs_max_source_v4.clamp(1, 32),
                dns.ecs_max_source_v6.clamp(1, 128),
            ),
            max_tcp_connections: dns.limits.max_tcp_connections.max(1),
            max_tcp_per_address: dns.limits.max_tcp_per_address.max(1),
            tcp_idle_timeout: dns.limits.tcp_idle_timeout.as_duration(),
            rrl: dns.rrl.clone(),
            dnssec: None,
            published_keys: Vec::new(),
            signed_at: None,
            prepared: Prepared::default(),
        };
        if let Some(dnssec) = &dns.dnssec {
            zone.dnssec = Some(Arc::new(SigningKey::load(Path::new(&dnssec.key_file))?));
            for file in &dnssec.published_key_files {
                zone.published_keys
                    .push(Arc::new(SigningKey::load(Path::new(file))?));
            }
        }
        zone.prepare()?;
        Ok(zone)
    }

    /// Rebuilds [`Zone::prepared`] from the fields above, signing every answer variant when the
    /// zone has a key. Fails only when signing does.
    pub fn prepare(&mut self) -> Result<(), ZoneError> {
        let now = SystemTime::now();
        self.prepared = Prepared::build(self, now)?;
        self.signed_at = self.dnssec.as_ref().map(|_| now);
        Ok(())
    }

    /// Signs the zone with `key` (replacing any key it had) and prepares it again.
    pub fn sign_with(&mut self, key: Arc<SigningKey>) -> Result<(), ZoneError> {
        self.dnssec = Some(key);
        self.prepare()
    }

    pub fn soa_record(&self, ttl: u32) -> Record {
        Record::from_rdata(self.origin.clone(), ttl, RData::SOA(self.soa.clone()))
    }

    pub fn ns_records(&self) -> Vec<Record> {
        self.ns
            .iter()
            .map(|n| Record::from_rdata(self.origin.clone(), self.ttl, RData::NS(NS(n.clone()))))
            .collect()
    }

    /// TTL of negative answers (RFC 2308: the smaller of the SOA's TTL and its MINIMUM).
    pub fn negative_ttl(&self) -> u32 {
        self.soa.minimum.min(self.ttl)
    }
}

/// The apex and every name below it that exists, with the types each owns (for the NSEC chain).
pub(super) fn owned_types(zone: &Zone) -> Vec<(Name, Vec<u16>)> {
    use super::dnssec::{TYPE_A, TYPE_AAAA, TYPE_DNSKEY, TYPE_NS, TYPE_SOA};
    zone.existing
        .iter()
        .map(|name| {
            let mut types = Vec::new();
            if *name == zone.origin {
                types.extend([TYPE_SOA, TYPE_NS, TYPE_DNSKEY]);
            }
            if let Some(glue) = zone.glue.iter().find(|g| g.name == *name) {
                if !glue.v4.is_empty() {
                    types.push(TYPE_A);
                }
                if !glue.v6.is_empty() {
                    types.push(TYPE_AAAA);
                }
            }
            if let Some(steered) = zone.records.get(name) {
                let pops = || steered.pops.iter().filter_map(|&p| zone.pops.get(p));
                if pops().any(|pop| !pop.v4.is_empty()) {
                    types.push(TYPE_A);
                }
                if pops().any(|pop| !pop.v6.is_empty()) {
                    types.push(TYPE_AAAA);
                }
            }
            (name.clone(), types)
        })
        .collect()
}

fn compile_pop(i: usize, pop: &Pop) -> Result<ZonePop, ZoneError> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for (j, address) in pop.addresses.iter().enumerate() {
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => v4.push(ip),
            Ok(IpAddr::V6(ip)) => v6.push(ip),
            Err(_) => {
                return Err(ZoneError::Address {
                    path: format!("pops[{i}].addresses[{j}]"),
                    value: address.clone(),
                })
            }
        }
    }
    Ok(ZonePop {
        name: pop.name.clone(),
        location: (pop.location.lat, pop.location.lon),
        v4,
        v6,
        health: pop.health.clone(),
    })
}

fn fqdn(path: &str, text: &str) -> Result<Name, ZoneError> {
    let mut name = Name::from_ascii(text).map_err(|e| ZoneError::Name {
        path: path.to_string(),
        name: text.to_string(),
        reason: e.to_string(),
    })?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

fn relative(path: &str, label: &str, origin: &Name) -> Result<Name, ZoneError> {
    let error = |reason: String| ZoneError::Name {
        path: path.to_string(),
        name: label.to_string(),
        reason,
    };
    let name = Name::from_ascii(label).map_err(|e| error(e.to_string()))?;
    let mut name = name
        .append_domain(origin)
        .map_err(|e| error(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}
