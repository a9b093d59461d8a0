//! A small, fast hasher for tables whose keys the operator's config chooses (route hosts,
//! upstream addresses).
//!
//! Why not the standard library's SipHash: its resistance to chosen-key flooding only matters when
//! an attacker chooses the keys that go *into* a table. These tables are filled from the config;
//! a client only looks keys up, and a lookup cannot lengthen a bucket. SipHash cost about 1.5% of
//! a proxied request's instructions in the upstream pool and host table alone (callgrind).

use std::hash::{BuildHasherDefault, Hasher};

/// The multiply-rotate step of FxHash (rustc's hasher).
const MULTIPLIER: u64 = 0x517c_c1b7_2722_0a95;

#[derive(Clone, Copy)]
pub struct FastHasher {
    hash: u64,
}

impl Default for FastHasher {
    /// Not zero: from a zero state a zero word would leave the hash unchanged, so keys that
    /// differ only by leading zero bytes would collide.
    fn default() -> Self {
        Self { hash: MULTIPLIER }
    }
}

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(MULTIPLIER);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// For `HashMap<K, V, FastBuildHasher>` (created with `HashMap::default()`).
pub type FastBuildHasher = BuildHasherDefault<FastHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hash};
    use std::net::SocketAddr;

    fn hash<T: Hash>(value: &T) -> u64 {
        FastBuildHasher::default().hash_one(value)
    }

    /// Neighbouring keys of the shapes these tables hold (hosts differing in one byte or in
    /// length, addresses differing in a port or an octet) all hash apart.
    #[test]
    fn neighbouring_keys_hash_apart() {
        let mut hosts = HashSet::new();
        for i in 0..2000 {
            assert!(hosts.insert(hash(&format!("api{i}.example.test"))));
        }
        for len in 1..40 {
            assert!(hosts.insert(hash(&"a".repeat(len))));
        }
        let mut addresses = HashSet::new();
        for octet in 0..=255u8 {
            for port in [80u16, 443, 8080, 18300] {
                let addr = SocketAddr::from(([127, 0, 0, octet], port));
                assert!(addresses.insert(hash(&addr)));
            }
        }
        assert_ne!(hash(&""), hash(&"\0"));
    }

    #[test]
    fn maps_with_it_find_what_they_hold() {
        let mut map: std::collections::HashMap<String, usize, FastBuildHasher> =
            std::collections::HashMap::default();
        for i in 0..500 {
            map.insert(format!("host-{i}.example.test"), i);
        }
        for i in 0..500 {
            assert_eq!(map.get(&format!("host-{i}.example.test")), Some(&i));
        }
        assert_eq!(map.get("host-500.example.test"), None);
    }
}
