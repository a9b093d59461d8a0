//! Per-lane measurements (no locks on the hot path), merged at the end.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, 3 significant digits.
const MAX_MICROS: u64 = 600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Io,
}

pub struct Stats {
    pub latency: Histogram<u64>,
    pub ttfb: Histogram<u64>,
    /// Requests started (or, in open loop, scheduled and given up on).
    pub issued: u64,
    /// Requests that got a whole response (any status).
    pub responses: u64,
    pub status_classes: [u64; 6],
    pub status_codes: BTreeMap<u16, u64>,
    pub connect_errors: u64,
    pub timeouts: u64,
    pub io_errors: u64,
    pub connects: u64,
    pub body_bytes: u64,
    pub sse_streams: u64,
    pub sse_events: u64,
    pub geo: BTreeMap<String, u64>,
    pub regions: BTreeMap<String, u64>,
    pub cache: BTreeMap<String, u64>,
    pub last_error: Option<String>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            latency: new_histogram(),
            ttfb: new_histogram(),
            issued: 0,
            responses: 0,
            status_classes: [0; 6],
            status_codes: BTreeMap::new(),
            connect_errors: 0,
            timeouts: 0,
            io_errors: 0,
            connects: 0,
            body_bytes: 0,
            sse_streams: 0,
            sse_events: 0,
            geo: BTreeMap::new(),
            regions: BTreeMap::new(),
            cache: BTreeMap::new(),
            last_error: None,
        }
    }
}

pub fn record_micros(h: &mut Histogram<u64>, micros: u64) {
    h.saturating_record(micros.clamp(1, MAX_MICROS));
}

impl Stats {
    pub fn error(&mut self, kind: ErrorKind, detail: String) {
        match kind {
            ErrorKind::Connect => self.connect_errors += 1,
            ErrorKind::Timeout => self.timeouts += 1,
            ErrorKind::Io => self.io_errors += 1,
        }
        self.last_error = Some(detail);
    }

    pub fn status(&mut self, code: u16) {
        let class = usize::from(code / 100).min(5);
        self.status_classes[class] += 1;
        *self.status_codes.entry(code).or_insert(0) += 1;
    }

    pub fn errors(&self) -> u64 {
        self.connect_errors + self.timeouts + self.io_errors
    }

    pub fn merge(&mut self, other: Stats) {
        // Same bounds on both sides: add() only fails when a value is out of range.
        let _ = self.latency.add(&other.latency);
        let _ = self.ttfb.add(&other.ttfb);
        self.issued += other.issued;
        self.responses += other.responses;
        for (a, b) in self.status_classes.iter_mut().zip(other.status_classes) {
            *a += b;
        }
        merge_map(&mut self.status_codes, other.status_codes);
        self.connect_errors += other.connect_errors;
        self.timeouts += other.timeouts;
        self.io_errors += other.io_errors;
        self.connects += other.connects;
        self.body_bytes += other.body_bytes;
        self.sse_streams += other.sse_streams;
        self.sse_events += other.sse_events;
        merge_map(&mut self.geo, other.geo);
        merge_map(&mut self.regions, other.regions);
        merge_map(&mut self.cache, other.cache);
        if other.last_error.is_some() {
            self.last_error = other.last_error;
        }
    }
}

fn merge_map<K: Ord>(into: &mut BTreeMap<K, u64>, from: BTreeMap<K, u64>) {
    for (k, v) in from {
        *into.entry(k).or_insert(0) += v;
    }
}

pub fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    if let Some(v) = map.get_mut(key) {
        *v += 1;
    } else {
        map.insert(key.to_string(), 1);
    }
}
