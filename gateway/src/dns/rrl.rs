//! Response rate limiting over UDP, after BIND's and Knot's RRL: a spoofed flood asks us to send
//! the same answer to one victim network again and again, so identical answers to one client
//! network are limited to `responses_per_second`; past that, every `slip`-th one goes out empty with
//! TC set (a real client retries over TCP, which cannot be spoofed) and the rest are dropped. The
//! server is then useless as an amplifier while other clients never notice.
//!
//! Identical answer = the same client network (`/ipv4_prefix`, `/ipv6_prefix`) and: for a positive or
//! NODATA answer the same question; for NXDOMAIN any name (random names must not dodge the limit);
//! for an error (REFUSED, FORMERR, ...) any question. Each key is a token bucket refilled at the
//! configured rate that holds at most one second of it.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use meridian_config::DnsRrl;

/// Independent tables, so workers rarely wait for one another.
const SHARDS: usize = 64;

/// What to do with an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Send it empty, with TC set.
    Slip,
    Drop,
}

pub struct RateLimiter {
    /// Tokens per second per key; `None`: limiting is off.
    rate: Option<f64>,
    slip: u32,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    per_shard: usize,
    /// Keyed hashing: a client cannot pick names that collide with someone else's bucket.
    hasher: RandomState,
    epoch: Instant,
    shards: Vec<Mutex<HashMap<u64, Bucket>>>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    /// Nanoseconds since `epoch` at the last refill (integers: elapsed time is exact).
    at: u64,
    /// Limited answers so far, for `slip`.
    limited: u32,
}

impl RateLimiter {
    pub fn new(config: &DnsRrl) -> Self {
        Self {
            rate: (config.responses_per_second > 0)
                .then_some(f64::from(config.responses_per_second)),
            slip: config.slip,
            ipv4_prefix: config.ipv4_prefix,
            ipv6_prefix: config.ipv6_prefix,
            per_shard: config.max_entries.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            epoch: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.rate.is_some()
    }

    /// Decides about `answer` (wire format, as sent) for `client` at `now`.
    pub fn check(&self, client: IpAddr, answer: &[u8], now: Instant) -> Verdict {
        let Some(rate) = self.rate else {
            return Verdict::Send;
        };
        let key = self.key(client, answer);
        let shard = &self.shards[(key as usize) % SHARDS];
        let now =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let refill = |b: &Bucket| b.tokens + now.saturating_sub(b.at) as f64 / 1e9 * rate;
        let mut table = shard.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= self.per_shard && !table.contains_key(&key) {
            // Full: forget every bucket that has refilled (it would start full anyway); if all are
            // busy, start over rather than grow without bound.
            table.retain(|_, b| refill(b) < rate);
            if table.len() >= self.per_shard {
                table.clear();
            }
        }
        let bucket = table.entry(key).or_insert(Bucket {
            tokens: rate,
            at: now,
            limited: 0,
        });
        bucket.tokens = refill(bucket).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Verdict::Send;
        }
        bucket.limited = bucket.limited.wrapping_add(1);
        if self.slip > 0 && bucket.limited.is_multiple_of(self.slip) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    fn key(&self, client: IpAddr, answer: &[u8]) -> u64 {
        let mut hash = self.hasher.build_hasher();
        match client {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let keep = u32::MAX
                    .checked_shl(32 - u32::from(self.ipv4_prefix.min(32)))
                    .unwrap_or(0);
                hash.write_u8(4);
                hash.write_u32(bits & keep);
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let keep = u128::MAX
                    .checked_shl(128 - u32::from(self.ipv6_prefix.min(128)))
                    .unwrap_or(0);
                hash.write_u8(6);
                hash.write_u128(bits & keep);
            }
        }
        let rcode = answer.get(3).map_or(0, |b| b & 0x0f);
        hash.write_u8(rcode);
        if rcode == 0 {
            // The question, case-folded: 0x20 randomisation must not open a bucket per spelling.
            if let Some(question) = question(answer) {
                for &byte in question {
                    hash.write_u8(byte.to_ascii_lowercase());
                }
            }
        }
        hash.finish()
    }
}

/// The question section of a message with one question (`None` for any other shape).
fn question(message: &[u8]) -> Option<&[u8]> {
    if message.get(4..6)? != [0, 1] {
        return None;
    }
    let mut at = 12;
    loop {
        let len = usize::from(*message.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        at += 1 + len;
    }
    message.get(12..at + 4)
}

/// Turns the answer at `buffer[start..]` into the slip response: header and question only, TC set.
pub fn slip(buffer: &mut Vec<u8>, start: usize) {
    let Some(answer) = buffer.get(start..) else {
        return;
    };
    let keep = question(answer).map_or(12, |q| 12 + q.len());
    buffer.truncate(start + keep);
    let Some(header) = buffer.get_mut(start..start + 12) else {
        return;
    };
    header[2] |= 0x02;
    let questions = u8::from(keep > 12);
    header[4..12].copy_from_slice(&[0, questions, 0, 0, 0, 0, 0, 0]);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;

    fn config(rate: u32, slip: u32) -> DnsRrl {
        DnsRrl {
            responses_per_second: rate,
            slip,
            ..DnsRrl::default()
        }
    }

    fn answer(name: &str, rcode: u8) -> Vec<u8> {
        let mut message = Message::query();
        message.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        let mut bytes = message.to_vec().expect("encodes");
        bytes[2] |= 0x80;
        bytes[3] = rcode;
        bytes
    }

    fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn a_flood_gets_the_rate_then_slips_and_drops_while_others_pass() {
        let limiter = RateLimiter::new(&config(5, 2));
        let start = Instant::now();
        let api = answer("api.example.test.", 0);
        let verdicts: Vec<Verdict> = (0..20)
            .map(|i| limiter.check(ip(127, 15, 0, (i % 200) as u8 + 1), &api, start))
            .collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Send).count(), 5);
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Slip).count(), 7);
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Drop).count(), 8);
        // Another network, another name, the same name in another case from the flooded network:
        // the first two are untouched, the third is the same answer.
        assert_eq!(limiter.check(ip(127, 16, 0, 1), &api, start), Verdict::Send);
        let other = answer("static.example.test.", 0);
        assert_eq!(
            limiter.check(ip(127, 15, 0, 1), &other, start),
            Verdict::Send
        );
        let shouted = answer("API.example.TEST.", 0);
        assert_ne!(
            limiter.check(ip(127, 15, 0, 1), &shouted, start),
            Verdict::Send
        );
        // A second later the bucket holds one second of rate again.
        let later = start + Duration::from_secs(1);
        let sent = (0..10)
            .filter(|_| limiter.check(ip(127, 15, 0, 9), &api, later) == Verdict::Send)
            .count();
        assert_eq!(sent, 5);
    }

    #[test]
    fn nxdomain_for_random_names_shares_one_bucket() {
        let limiter = RateLimiter::new(&config(3, 0));
        let now = Instant::now();
        let sent = (0..50)
            .filter(|i| {
                let name = format!("r{i}.example.test.");
                limiter.check(ip(127, 15, 0, 1), &answer(&name, 3), now) == Verdict::Send
            })
            .count();
        assert_eq!(sent, 3, "slip 0: the rest is dropped");
    }

    #[test]
    fn off_sends_everything_and_the_table_stays_bounded() {
        let off = RateLimiter::new(&config(0, 2));
        assert!(!off.enabled());
        let api = answer("api.example.test.", 0);
        assert!(
            (0..100).all(|_| off.check(ip(127, 15, 0, 1), &api, Instant::now()) == Verdict::Send)
        );
        let limiter = RateLimiter::new(&DnsRrl {
            max_entries: 128,
            ..config(1, 2)
        });
        let now = Instant::now();
        for i in 0..10_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            limiter.check(ip(10, b, c, d), &api, now);
        }
        let total: usize = limiter
            .shards
            .iter()
            .map(|s| s.lock().map(|t| t.len()).unwrap_or(0))
            .sum();
        assert!(total <= 128 + SHARDS, "{total}");
    }

    #[test]
    fn slip_keeps_header_and_question_with_tc() {
        let mut bytes = vec![0xee; 3];
        let mut message = answer("api.example.test.", 0);
        let question_len = message.len() - 12;
        message.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 127, 2, 6, 1]);
        message[7] = 1;
        bytes.extend_from_slice(&message);
        slip(&mut bytes, 3);
        assert_eq!(bytes.len(), 3 + 12 + question_len);
        let message = Message::from_vec(&bytes[3..]).expect("decodes");
        assert!(message.metadata.truncation);
        assert!(message.answers.is_empty());
        assert_eq!(message.queries.len(), 1);
    }
}
