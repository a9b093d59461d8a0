//! A UDP worker's memory of whole answers. An answer is a pure function of the serving zone and
//! GeoIP database, the PoPs' health, the query bytes after the ID and the client's address (the
//! steering input when the query carries no client subnet), so the same query from the same client
//! gets the same bytes back. Resolvers repeat themselves (a few addresses ask for the same few names
//! all day): a repeat is answered by one hash of the query, a copy and the ID patched in, instead of
//! parsing, locating and steering it again.
//!
//! Everything is forgotten when the serving version or any PoP's health changes, so a cached answer
//! is always the one the answer path would give now. The table is bounded: once full it takes no new
//! answers until it is emptied (at most a second later), so a flood of distinct queries costs a
//! lookup each and cannot make the worker allocate per query.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Answers kept per worker (a few hundred bytes each).
const LARGEST: usize = 4096;
/// Longer queries are not cached (every ordinary query is far shorter).
const LONGEST_QUERY: usize = 160;
/// A full table is emptied this long after it was last emptied, so new popular queries get in.
const REFILL_AFTER: Duration = Duration::from_secs(1);

/// What the metrics need to count a cached answer again.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    /// The whole answer; its first two bytes (the ID) are replaced by the query's.
    pub answer: Box<[u8]>,
    pub qtype: &'static str,
    pub rcode: &'static str,
    pub fail_open: bool,
    pub pops: Box<[usize]>,
}

#[derive(Default)]
pub(super) struct AnswerCache {
    entries: HashMap<Box<[u8]>, Entry, foldhash::fast::RandomState>,
    /// The key of the current query (reused: looking up allocates nothing).
    key: Vec<u8>,
    /// The serving version and PoP health the entries were made with.
    serving: u64,
    health: Vec<bool>,
    emptied: Option<Instant>,
}

impl AnswerCache {
    /// Called once per batch: forgets every answer made for another serving version or another
    /// health state, and empties a full table once [`REFILL_AFTER`] has passed.
    pub fn refresh(&mut self, serving: u64, health: &[Arc<AtomicBool>], now: Instant) {
        let same_health = self.health.len() == health.len()
            && health
                .iter()
                .zip(&self.health)
                .all(|(flag, &was)| flag.load(Ordering::Relaxed) == was);
        let stale_full = self.entries.len() >= LARGEST
            && self
                .emptied
                .is_none_or(|at| now.saturating_duration_since(at) >= REFILL_AFTER);
        if self.serving == serving && same_health && !stale_full {
            return;
        }
        self.entries.clear();
        self.serving = serving;
        self.health.clear();
        self.health
            .extend(health.iter().map(|flag| flag.load(Ordering::Relaxed)));
        self.emptied = Some(now);
    }

    /// Builds the key of `request` from `source` into `self.key`; false when the query is not
    /// cacheable.
    fn key(&mut self, request: &[u8], source: IpAddr) -> bool {
        let Some(rest) = request.get(2..).filter(|r| r.len() <= LONGEST_QUERY) else {
            return false;
        };
        self.key.clear();
        match source {
            IpAddr::V4(v4) => {
                self.key.push(4);
                self.key.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.key.push(6);
                self.key.extend_from_slice(&v6.octets());
            }
        }
        self.key.extend_from_slice(rest);
        true
    }

    /// The answer given to the same query from the same client, if it is still the right one.
    pub fn get(&mut self, request: &[u8], source: IpAddr) -> Option<&Entry> {
        if self.entries.is_empty() || !self.key(request, source) {
            return None;
        }
        self.entries.get(self.key.as_slice())
    }

    /// Remembers `entry` as the answer to `request` from `source` (unless the table is full).
    pub fn insert(&mut self, request: &[u8], source: IpAddr, entry: Entry) {
        if self.entries.len() >= LARGEST || !self.key(request, source) {
            return;
        }
        self.entries
            .insert(self.key.clone().into_boxed_slice(), entry);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn entry(answer: &[u8]) -> Entry {
        Entry {
            answer: answer.into(),
            qtype: "A",
            rcode: "NOERROR",
            fail_open: false,
            pops: vec![1].into(),
        }
    }

    #[test]
    fn same_query_same_client_only_and_forgotten_on_change() {
        let mut cache = AnswerCache::default();
        let flags: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::new(AtomicBool::new(true))).collect();
        let now = Instant::now();
        let here = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
        let there = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        cache.refresh(1, &flags, now);
        cache.insert(&[1, 2, 3, 4], here, entry(&[1, 2, 9]));
        // Another ID, same rest: a hit. Another client or other bytes: a miss.
        assert!(cache.get(&[7, 7, 3, 4], here).is_some());
        assert!(cache.get(&[1, 2, 3, 4], there).is_none());
        assert!(cache.get(&[1, 2, 3, 5], here).is_none());
        cache.refresh(1, &flags, now);
        assert!(cache.get(&[1, 2, 3, 4], here).is_some());
        flags[1].store(false, Ordering::Relaxed);
        cache.refresh(1, &flags, now);
        assert!(cache.get(&[1, 2, 3, 4], here).is_none(), "health changed");
        cache.insert(&[1, 2, 3, 4], here, entry(&[1, 2, 9]));
        cache.refresh(2, &flags, now);
        assert!(
            cache.get(&[1, 2, 3, 4], here).is_none(),
            "new serving version"
        );
        assert!(!cache.key(&[1], here), "no ID: not cacheable");
        assert!(!cache.key(&[0; LONGEST_QUERY + 3], here), "too long");
    }

    #[test]
    fn bounded_and_refilled_later() {
        let mut cache = AnswerCache::default();
        let now = Instant::now();
        cache.refresh(1, &[], now);
        for i in 0..(LARGEST as u32 + 100) {
            let request = [0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            cache.insert(&request, IpAddr::V4(Ipv4Addr::LOCALHOST), entry(&[0, 0]));
        }
        assert_eq!(cache.entries.len(), LARGEST);
        cache.refresh(1, &[], now);
        assert_eq!(cache.entries.len(), LARGEST, "kept until the refill time");
        cache.refresh(1, &[], now + REFILL_AFTER);
        assert!(cache.entries.is_empty());
    }
}
