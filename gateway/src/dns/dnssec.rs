//! DNSSEC online signing (RFC 4033-4035, algorithm 13 = ECDSA P-256 / SHA-256, RFC 6605).
//!
//! Every signature a query can need is computed when the zone is prepared: one RRSIG per answer
//! variant (each set of PoPs steering can pick, per name and address family), the apex SOA, NS and
//! DNSKEY sets, and a pre-signed NSEC chain over the zone's names for denial of existence. A query
//! only looks signatures up and copies them, so signing costs nothing per query and health changes
//! (which only change which prepared variant is picked) need no re-signing.
//!
//! The zone's names are the configured ones, so a plain NSEC chain gives nothing away that the
//! answers do not, and unlike per-query "white lies" it needs no signing on the query path.
//!
//! The crypto is ring's ECDSA (already in the tree through rustls); the record layout (canonical
//! form, RRSIG fields, key tag, DS digest) is done here in wire format because the answers are
//! prepared in wire format. hickory-proto's own DNSSEC support works on its `Record` types and
//! would add a second crypto provider feature to the protocol crate for no gain.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;

pub const ALGORITHM_ECDSAP256SHA256: u8 = 13;
pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_DS: u16 = 43;
pub const TYPE_RRSIG: u16 = 46;
pub const TYPE_NSEC: u16 = 47;
pub const TYPE_DNSKEY: u16 = 48;
const CLASS_IN: u16 = 1;
/// Zone key + secure entry point: one key signs everything (a combined signing key), so the DS in
/// the parent points straight at the key that signs the answers.
const DNSKEY_FLAGS: u16 = 257;
/// TTL of the DNSKEY set (resolvers fetch it once an hour rather than with every answer TTL).
pub const DNSKEY_TTL: u32 = 3600;
/// Signatures are valid from an hour before signing (clock skew) ...
const INCEPTION_SKEW: Duration = Duration::from_secs(3600);
/// ... for this long; the server re-signs well before (see [`RESIGN_AFTER`]).
pub const VALIDITY: Duration = Duration::from_secs(14 * 86_400);
/// How old signatures get before the running server prepares the zone again.
pub const RESIGN_AFTER: Duration = Duration::from_secs(3 * 86_400);
/// Signatures one zone may need (answer variants over every PoP set steering can produce). Past
/// this, compiling fails: the operator lowers `answers` or splits records' PoP lists.
pub const MAX_SIGNATURES: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum DnssecError {
    #[error("dns.dnssec key file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dns.dnssec key file {path}: not a PKCS#8 ECDSA P-256 private key ({reason})")]
    Key { path: String, reason: String },
    #[error("the config has no [dns.dnssec] section")]
    NotSigned,
    #[error("generating a key failed")]
    Generate,
    #[error("signing failed")]
    Sign,
    #[error("a signed zone would need {needed} signatures (at most {MAX_SIGNATURES}): lower dns.answers or give records fewer pops")]
    TooManyVariants { needed: usize },
}

/// The zone's private key and its public DNSKEY record data.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    dnskey: Vec<u8>,
    tag: u16,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &ALGORITHM_ECDSAP256SHA256)
            .field("key_tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key as PKCS#8 DER.
    pub fn generate_pkcs8() -> Result<Vec<u8>, DnssecError> {
        let rng = SystemRandom::new();
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| DnssecError::Generate)
    }

    /// PKCS#8 DER as a PEM `PRIVATE KEY` block (what `meridian dns keygen` writes).
    pub fn pkcs8_pem(der: &[u8]) -> String {
        let encoded = base64(der);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| e.to_string())?;
        // ring gives the uncompressed point 0x04 || X || Y; DNSKEY carries X || Y (RFC 6605 §4).
        let point = pair.public_key().as_ref();
        let public = point.get(1..).ok_or("empty public key")?;
        let mut dnskey = Vec::with_capacity(4 + public.len());
        dnskey.extend_from_slice(&DNSKEY_FLAGS.to_be_bytes());
        dnskey.push(3);
        dnskey.push(ALGORITHM_ECDSAP256SHA256);
        dnskey.extend_from_slice(public);
        let tag = key_tag(&dnskey);
        Ok(Self {
            pair,
            rng,
            dnskey,
            tag,
        })
    }

    /// Reads a PKCS#8 key file, PEM or DER.
    pub fn load(path: &Path) -> Result<Self, DnssecError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| DnssecError::Read {
            path: shown.clone(),
            source,
        })?;
        let der = match PrivatePkcs8KeyDer::from_pem_slice(&bytes) {
            Ok(key) => key.secret_pkcs8_der().to_vec(),
            Err(_) => bytes,
        };
        Self::from_pkcs8(&der).map_err(|reason| DnssecError::Key {
            path: shown,
            reason,
        })
    }

    /// The DNSKEY record data (flags, protocol, algorithm, public key).
    pub fn dnskey(&self) -> &[u8] {
        &self.dnskey
    }

    pub fn key_tag(&self) -> u16 {
        self.tag
    }

    /// The DS record data for this key at `owner` (wire format, lower case): key tag, algorithm,
    /// digest type 2 (SHA-256), digest.
    pub fn ds(&self, owner: &[u8]) -> Vec<u8> {
        let mut input = owner.to_vec();
        input.extend_from_slice(&self.dnskey);
        let digest = ring::digest::digest(&ring::digest::SHA256, &input);
        let mut ds = Vec::with_capacity(4 + 32);
        ds.extend_from_slice(&self.tag.to_be_bytes());
        ds.push(ALGORITHM_ECDSAP256SHA256);
        ds.push(2);
        ds.extend_from_slice(digest.as_ref());
        ds
    }

    /// The DS record in presentation format, as it goes into the parent zone.
    pub fn ds_text(&self, origin: &str, owner: &[u8]) -> String {
        let ds = self.ds(owner);
        let digest: String = ds[4..].iter().map(|b| format!("{b:02X}")).collect();
        format!(
            "{origin} IN DS {} {} 2 {digest}",
            self.tag, ALGORITHM_ECDSAP256SHA256
        )
    }

    /// The DNSKEY record in presentation format.
    pub fn dnskey_text(&self, origin: &str) -> String {
        format!(
            "{origin} IN DNSKEY {DNSKEY_FLAGS} 3 {ALGORITHM_ECDSAP256SHA256} {}",
            base64(&self.dnskey[4..])
        )
    }
}

/// A new key as PEM, for `meridian dns keygen`.
pub fn keygen() -> Result<String, DnssecError> {
    Ok(SigningKey::pkcs8_pem(&SigningKey::generate_pkcs8()?))
}

/// The DS and DNSKEY records of `config`'s `[dns.dnssec]` keys, one per line (`meridian dns ds`):
/// the active key's DS and DNSKEY first, then those of each published key, in config order.
pub fn ds_records(config: &meridian_config::Config) -> Result<String, super::DnsError> {
    let dns = config.dns.as_ref().ok_or(super::ZoneError::NoDnsSection)?;
    let dnssec = dns.dnssec.as_ref().ok_or(DnssecError::NotSigned)?;
    let mut keys = vec![SigningKey::load(Path::new(&dnssec.key_file))?];
    for file in &dnssec.published_key_files {
        keys.push(SigningKey::load(Path::new(file))?);
    }
    let mut origin =
        hickory_proto::rr::Name::from_ascii(&dns.zone).map_err(|e| super::ZoneError::Name {
            path: "dns.zone".into(),
            name: dns.zone.clone(),
            reason: e.to_string(),
        })?;
    origin.set_fqdn(true);
    let origin = origin.to_lowercase();
    let mut owner = Vec::new();
    for label in origin.iter() {
        owner.push(label.len() as u8);
        owner.extend_from_slice(label);
    }
    owner.push(0);
    let text = origin.to_ascii();
    Ok(keys
        .iter()
        .map(|key| {
            format!(
                "{}\n{}\n",
                key.ds_text(&text, &owner),
                key.dnskey_text(&text)
            )
        })
        .collect())
}

/// RFC 4034 Appendix B.
fn key_tag(rdata: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for (i, &byte) in rdata.iter().enumerate() {
        sum += if i % 2 == 0 {
            u32::from(byte) << 8
        } else {
            u32::from(byte)
        };
    }
    sum += (sum >> 16) & 0xffff;
    (sum & 0xffff) as u16
}

/// One resource record after its owner name: type, class IN, TTL and data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rr {
    pub rtype: u16,
    pub ttl: u32,
    pub rdata: Vec<u8>,
}

impl Rr {
    /// Appends type, class, TTL, length and data (the caller has written the owner).
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&self.ttl.to_be_bytes());
        out.extend_from_slice(&u16::try_from(self.rdata.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.rdata);
    }
}

/// Signs RRsets with one key and one validity window.
pub struct Signer<'k> {
    key: &'k SigningKey,
    /// The zone apex, wire format, lower case.
    signer: Vec<u8>,
    inception: u32,
    expiration: u32,
}

impl<'k> Signer<'k> {
    pub fn new(key: &'k SigningKey, origin: &[u8], now: SystemTime) -> Self {
        let secs = |t: SystemTime| {
            // Serial number arithmetic (RFC 4034 §3.1.5): the low 32 bits are what counts.
            t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as u32
        };
        Self {
            key,
            signer: origin.to_vec(),
            inception: secs(now - INCEPTION_SKEW),
            expiration: secs(now + VALIDITY),
        }
    }

    /// The RRSIG over the RRset `rdatas` (any order; duplicates count once) of `rtype` at `owner`
    /// (wire format, lower case) with `ttl`.
    pub fn rrsig(
        &self,
        owner: &[u8],
        rtype: u16,
        ttl: u32,
        rdatas: &[&[u8]],
    ) -> Result<Rr, DnssecError> {
        let mut rdata = Vec::with_capacity(18 + self.signer.len() + 64);
        rdata.extend_from_slice(&rtype.to_be_bytes());
        rdata.push(ALGORITHM_ECDSAP256SHA256);
        rdata.push(labels(owner));
        rdata.extend_from_slice(&ttl.to_be_bytes());
        rdata.extend_from_slice(&self.expiration.to_be_bytes());
        rdata.extend_from_slice(&self.inception.to_be_bytes());
        rdata.extend_from_slice(&self.key.tag.to_be_bytes());
        rdata.extend_from_slice(&self.signer);
        // RFC 4034 §6.3: records in canonical order, by their data as unsigned byte strings.
        let mut sorted: Vec<&[u8]> = rdatas.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut signed = rdata.clone();
        for data in sorted {
            signed.extend_from_slice(owner);
            signed.extend_from_slice(&rtype.to_be_bytes());
            signed.extend_from_slice(&CLASS_IN.to_be_bytes());
            signed.extend_from_slice(&ttl.to_be_bytes());
            signed.extend_from_slice(&u16::try_from(data.len()).unwrap_or(0).to_be_bytes());
            signed.extend_from_slice(data);
        }
        let signature = self
            .key
            .pair
            .sign(&self.key.rng, &signed)
            .map_err(|_| DnssecError::Sign)?;
        rdata.extend_from_slice(signature.as_ref());
        Ok(Rr {
            rtype: TYPE_RRSIG,
            ttl,
            rdata,
        })
    }
}

/// Labels of a wire-format name, root not counted.
fn labels(name: &[u8]) -> u8 {
    let mut count = 0u8;
    let mut at = 0;
    while let Some(&len) = name.get(at) {
        if len == 0 {
            break;
        }
        count = count.saturating_add(1);
        at += 1 + usize::from(len);
    }
    count
}

/// The NSEC type bitmap (RFC 4034 §4.1.2) of `types`.
pub fn type_bitmap(types: &[u16]) -> Vec<u8> {
    let mut types = types.to_vec();
    types.sort_unstable();
    types.dedup();
    let mut out = Vec::new();
    let mut i = 0;
    while i < types.len() {
        let window = (types[i] >> 8) as u8;
        let mut bits = [0u8; 32];
        let mut used = 0;
        while i < types.len() && (types[i] >> 8) as u8 == window {
            let low = usize::from(types[i] & 0xff);
            bits[low / 8] |= 0x80 >> (low % 8);
            used = low / 8 + 1;
            i += 1;
        }
        out.push(window);
        out.push(used as u8);
        out.extend_from_slice(&bits[..used]);
    }
    out
}

/// RFC 4034 §6.1 canonical order of two lower-case wire-format names: label by label from the
/// root, each label compared as an unsigned byte string.
pub fn canonical_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let (a_labels, a_len) = label_starts(a);
    let (b_labels, b_len) = label_starts(b);
    let mut i = a_len;
    let mut j = b_len;
    while i > 0 && j > 0 {
        i -= 1;
        j -= 1;
        match label(a, a_labels[i]).cmp(label(b, b_labels[j])) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    a_len.cmp(&b_len)
}

fn label(name: &[u8], start: u8) -> &[u8] {
    let start = usize::from(start);
    let len = usize::from(name.get(start).copied().unwrap_or(0));
    name.get(start + 1..start + 1 + len).unwrap_or(&[])
}

/// Where each label of a wire-format name starts (at most 128 labels fit in 255 bytes).
fn label_starts(name: &[u8]) -> ([u8; 128], usize) {
    let mut starts = [0u8; 128];
    let mut count = 0;
    let mut at = 0usize;
    while let Some(&len) = name.get(at) {
        if len == 0 || count == starts.len() {
            break;
        }
        starts[count] = at as u8;
        count += 1;
        at += 1 + usize::from(len);
    }
    (starts, count)
}

/// The zone's names with their NSEC records and signatures, in canonical order.
#[derive(Clone, Debug, Default)]
pub struct NsecChain {
    entries: Vec<NsecEntry>,
}

#[derive(Clone, Debug)]
pub struct NsecEntry {
    /// Owner, wire format, lower case.
    pub owner: Vec<u8>,
    pub nsec: Rr,
    pub rrsig: Rr,
}

impl NsecChain {
    /// `names`: every name of the zone with the types it owns (NSEC and RRSIG are added).
    pub fn build(
        signer: &Signer<'_>,
        names: Vec<(Vec<u8>, Vec<u16>)>,
        ttl: u32,
    ) -> Result<Self, DnssecError> {
        let mut names = names;
        names.sort_by(|a, b| canonical_cmp(&a.0, &b.0));
        names.dedup_by(|a, b| a.0 == b.0);
        let mut entries = Vec::with_capacity(names.len());
        for (i, (owner, types)) in names.iter().enumerate() {
            // The last name points back at the apex (the first).
            let next = &names[(i + 1) % names.len()].0;
            let mut types = types.clone();
            types.extend([TYPE_NSEC, TYPE_RRSIG]);
            let mut rdata = next.clone();
            rdata.extend_from_slice(&type_bitmap(&types));
            let rrsig = signer.rrsig(owner, TYPE_NSEC, ttl, &[&rdata])?;
            entries.push(NsecEntry {
                owner: owner.clone(),
                nsec: Rr {
                    rtype: TYPE_NSEC,
                    ttl,
                    rdata,
                },
                rrsig,
            });
        }
        Ok(Self { entries })
    }

    /// The NSEC owned by `name` (NODATA proof).
    pub fn at(&self, name: &[u8]) -> Option<&NsecEntry> {
        self.entries
            .binary_search_by(|e| canonical_cmp(&e.owner, name))
            .ok()
            .and_then(|i| self.entries.get(i))
    }

    /// The NSEC whose owner is the last one before `name` in canonical order (it covers `name`
    /// when `name` does not exist).
    pub fn covering(&self, name: &[u8]) -> Option<&NsecEntry> {
        let after = self
            .entries
            .partition_point(|e| canonical_cmp(&e.owner, name) != Ordering::Greater);
        match after {
            0 => self.entries.last(),
            n => self.entries.get(n - 1),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The NSEC records that prove `name` (lower-case wire format) does not exist: the one covering
/// it and the one covering the wildcard at its closest encloser (`exists` says which names do),
/// once each.
pub fn nxdomain_proof<'c>(
    chain: &'c NsecChain,
    name: &[u8],
    exists: &dyn Fn(&[u8]) -> bool,
) -> [Option<&'c NsecEntry>; 2] {
    let covering = chain.covering(name);
    // The closest encloser: the longest existing ancestor of `name`.
    let mut at = 0usize;
    let mut encloser: &[u8] = &[0];
    while let Some(&len) = name.get(at) {
        if len == 0 {
            break;
        }
        at += 1 + usize::from(len);
        if let Some(ancestor) = name.get(at..) {
            if exists(ancestor) {
                encloser = ancestor;
                break;
            }
        }
    }
    let mut wildcard = [0u8; 257];
    let wildcard_len = 2 + encloser.len();
    let wildcard_name = match wildcard.get_mut(..wildcard_len) {
        Some(slot) => {
            slot[0] = 1;
            slot[1] = b'*';
            slot[2..].copy_from_slice(encloser);
            &slot[..]
        }
        None => return [covering, None],
    };
    let wildcard_cover = chain.covering(wildcard_name);
    match (covering, wildcard_cover) {
        (Some(a), Some(b)) if std::ptr::eq(a, b) => [Some(a), None],
        (a, b) => [a, b],
    }
}

/// Signatures of every answer variant of a steered name, by (record, type, PoP set as a bit mask).
pub type Variants = HashMap<(u32, u16, u128), Rr>;

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in text.trim_end_matches('.').split('.') {
            if label.is_empty() {
                continue;
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    #[test]
    fn canonical_order_is_rfc_4034s_example() {
        // RFC 4034 §6.1, lower-cased (the zone's names always are).
        let names = [
            "example.",
            "a.example.",
            "yljkjljk.a.example.",
            "z.a.example.",
            "zabc.a.example.",
            "z.example.",
        ];
        for pair in names.windows(2) {
            assert_eq!(
                canonical_cmp(&wire(pair[0]), &wire(pair[1])),
                Ordering::Less,
                "{} < {}",
                pair[0],
                pair[1]
            );
        }
        // '*' (0x2a) sorts before letters: *.z.example. comes right after z.example.
        assert_eq!(
            canonical_cmp(&wire("z.example."), &wire("*.z.example.")),
            Ordering::Less
        );
        assert_eq!(
            canonical_cmp(&wire("a.example."), &wire("a.example.")),
            Ordering::Equal
        );
    }

    #[test]
    fn key_tag_ds_and_bitmap() {
        // RFC 4034 §4.1.2 example bitmap: A MX RRSIG NSEC TYPE1234.
        assert_eq!(
            type_bitmap(&[1, 15, 46, 47, 1234]),
            [
                0x00, 0x06, 0x40, 0x01, 0x00, 0x00, 0x00, 0x03, 0x04, 0x1b, 0x00, 0x00, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20
            ]
        );
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().expect("generate"))
            .expect("loads");
        assert_eq!(key.dnskey().len(), 4 + 64);
        assert_eq!(key.key_tag(), key_tag(key.dnskey()));
        let ds = key.ds(&wire("example.test."));
        assert_eq!(ds.len(), 36);
        assert!(key
            .ds_text("example.test.", &wire("example.test."))
            .starts_with(&format!("example.test. IN DS {} 13 2 ", key.key_tag())));
        assert_eq!(base64(b"any carnal pleasur"), "YW55IGNhcm5hbCBwbGVhc3Vy");
        assert_eq!(base64(b"any carnal pleasu"), "YW55IGNhcm5hbCBwbGVhc3U=");
        assert_eq!(base64(b"any carnal pleas"), "YW55IGNhcm5hbCBwbGVhcw==");
    }

    #[test]
    fn pem_round_trip_and_signatures_verify() {
        let der = SigningKey::generate_pkcs8().expect("generate");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("zone.key");
        std::fs::write(&path, SigningKey::pkcs8_pem(&der)).expect("write");
        let key = SigningKey::load(&path).expect("PEM loads");
        let der_path = dir.path().join("zone.der");
        std::fs::write(&der_path, &der).expect("write");
        assert_eq!(
            SigningKey::load(&der_path).expect("DER loads").dnskey(),
            key.dnskey()
        );
        std::fs::write(&der_path, b"nonsense").expect("write");
        assert!(matches!(
            SigningKey::load(&der_path),
            Err(DnssecError::Key { .. })
        ));

        let origin = wire("example.test.");
        let signer = Signer::new(&key, &origin, SystemTime::now());
        let owner = wire("api.example.test.");
        let rrsig = signer
            .rrsig(&owner, TYPE_A, 30, &[&[192, 0, 2, 2], &[192, 0, 2, 1]])
            .expect("signs");
        // Verify as a validator would: rebuild the signed data, check with the public key.
        let signature_at = rrsig.rdata.len() - 64;
        let mut signed = rrsig.rdata[..signature_at].to_vec();
        for data in [[192u8, 0, 2, 1], [192, 0, 2, 2]] {
            signed.extend_from_slice(&owner);
            signed.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            signed.extend_from_slice(&data);
        }
        let mut point = vec![4u8];
        point.extend_from_slice(&key.dnskey()[4..]);
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(&signed, &rrsig.rdata[signature_at..])
            .expect("signature verifies");
        assert_eq!(rrsig.rdata[3], 3, "labels");
    }

    #[test]
    fn nsec_chain_covers_and_proves() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().expect("generate"))
            .expect("loads");
        let origin = wire("example.test.");
        let signer = Signer::new(&key, &origin, SystemTime::now());
        let names = [
            "example.test.",
            "api.example.test.",
            "b.example.test.",
            "a.b.example.test.",
        ];
        let chain = NsecChain::build(
            &signer,
            names.iter().map(|n| (wire(n), vec![TYPE_A])).collect(),
            30,
        )
        .expect("builds");
        assert_eq!(chain.len(), 4);
        assert!(chain.at(&wire("b.example.test.")).is_some());
        assert!(chain.at(&wire("c.example.test.")).is_none());
        let exists = |n: &[u8]| names.iter().any(|e| wire(e) == n);
        // zzz.example.test. sorts after a.b.example.test. (the last name, whose NSEC wraps to the
        // apex); the wildcard *.example.test. sorts right after the apex.
        let [first, second] = nxdomain_proof(&chain, &wire("zzz.example.test."), &exists);
        assert_eq!(
            first.map(|e| e.owner.clone()),
            Some(wire("a.b.example.test."))
        );
        assert_eq!(second.map(|e| e.owner.clone()), Some(wire("example.test.")));
        let [first, second] = nxdomain_proof(&chain, &wire("x.api.example.test."), &exists);
        assert_eq!(
            first.map(|e| e.owner.clone()),
            Some(wire("api.example.test."))
        );
        // *.api.example.test. is covered by the same NSEC: listed once.
        assert!(second.is_none());
    }
}
