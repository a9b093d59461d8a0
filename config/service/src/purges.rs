//! Fleet-wide cache purges: the config service keeps the recent ones in order, numbered, so
//! every edge long-polling it applies each one once. On etcd the numbers are etcd revisions, so
//! a cursor from one replica means the same on another.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Purges remembered for edges that are behind; an edge further behind than this drops its
/// whole cache instead (it cannot know what it missed).
pub const KEPT_PURGES: usize = 1024;
/// Largest purge request (`{"url"|"prefix"|"tag": "..."}`).
pub const MAX_PURGE_BYTES: usize = 4096;

/// One purge as edges receive it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeEntry {
    pub seq: u64,
    /// `{"url": …}`, `{"prefix": …}` or `{"tag": …}`, as the admin purge endpoint takes it.
    pub purge: serde_json::Value,
}

/// What a poll for purges answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeBatch {
    /// The cursor to ask from next time.
    pub seq: u64,
    pub purges: Vec<PurgeEntry>,
    /// Purges after the asked cursor may be missing (the service restarted, or the edge was
    /// too far behind): the edge drops everything it caches.
    pub lost: bool,
}

/// Checks that `body` is one purge request and returns it normalised.
pub fn parse_purge(body: &[u8]) -> Result<serde_json::Value, String> {
    if body.len() > MAX_PURGE_BYTES {
        return Err(format!("a purge is at most {MAX_PURGE_BYTES} bytes"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let valid = value.as_object().is_some_and(|object| {
        object.len() == 1
            && object
                .iter()
                .all(|(k, v)| matches!(k.as_str(), "url" | "prefix" | "tag") && v.is_string())
    });
    if !valid {
        return Err("expected {\"url\": ...}, {\"prefix\": ...} or {\"tag\": ...}".into());
    }
    Ok(value)
}

pub struct PurgeLog {
    entries: Mutex<Log>,
    latest: watch::Sender<u64>,
}

struct Log {
    entries: VecDeque<PurgeEntry>,
    /// Everything after this cursor is in `entries`.
    complete_after: u64,
}

impl PurgeLog {
    /// An empty log whose cursor starts at `start`.
    pub fn new(start: u64) -> PurgeLog {
        PurgeLog::restored(start, Vec::new())
    }

    /// A log holding `entries` (in ascending order), complete after `complete_after`: what a
    /// store reads back from disk, so edges' cursors stay valid across a restart.
    pub fn restored(complete_after: u64, entries: Vec<PurgeEntry>) -> PurgeLog {
        let latest = entries.last().map_or(complete_after, |e| e.seq);
        let mut log = Log {
            entries: VecDeque::with_capacity(entries.len()),
            complete_after,
        };
        for entry in entries {
            Self::push(&mut log, entry);
        }
        PurgeLog {
            entries: Mutex::new(log),
            latest: watch::channel(latest).0,
        }
    }

    /// The entries still remembered and the cursor after which they are complete.
    pub fn snapshot(&self) -> (u64, Vec<PurgeEntry>) {
        let log = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        (log.complete_after, log.entries.iter().cloned().collect())
    }

    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// Records a purge under the next local number (the embedded store).
    pub fn append(&self, purge: serde_json::Value) -> u64 {
        let mut log = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = self.latest() + 1;
        Self::push(&mut log, PurgeEntry { seq, purge });
        self.latest.send_replace(seq);
        seq
    }

    /// Records a purge seen at `seq` (an etcd revision); older or repeated ones are ignored.
    pub fn record(&self, seq: u64, purge: serde_json::Value) {
        let mut log = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if seq <= self.latest() {
            return;
        }
        Self::push(&mut log, PurgeEntry { seq, purge });
        self.latest.send_replace(seq);
    }

    /// Everything up to `at` is unknown (a watch resumed past a compacted gap): cursors
    /// before it are answered as lost.
    pub fn reset(&self, at: u64) {
        let mut log = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if at <= log.complete_after {
            return;
        }
        log.entries.retain(|e| e.seq > at);
        log.complete_after = at;
        if at > self.latest() {
            self.latest.send_replace(at);
        }
    }

    fn push(log: &mut Log, entry: PurgeEntry) {
        if log.entries.len() == KEPT_PURGES {
            if let Some(dropped) = log.entries.pop_front() {
                log.complete_after = dropped.seq;
            }
        }
        log.entries.push_back(entry);
    }

    /// The purges after `after`.
    pub fn after(&self, after: u64) -> PurgeBatch {
        let log = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let latest = self.latest();
        PurgeBatch {
            seq: latest,
            purges: log
                .entries
                .iter()
                .filter(|e| e.seq > after)
                .cloned()
                .collect(),
            lost: after < log.complete_after || after > latest,
        }
    }

    /// Receiver of the newest purge number, for long-polls.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purges_are_numbered_and_replayed_after_a_cursor() {
        let log = PurgeLog::new(0);
        let tag = |t: &str| serde_json::json!({ "tag": t });
        assert_eq!(log.append(tag("a")), 1);
        assert_eq!(log.append(tag("b")), 2);
        let batch = log.after(1);
        assert_eq!((batch.seq, batch.lost), (2, false));
        assert_eq!(
            batch.purges,
            [PurgeEntry {
                seq: 2,
                purge: tag("b")
            }]
        );
        // A cursor from before a restart of the service (numbers restarted) is reported.
        assert!(log.after(9).lost);
        for i in 0..KEPT_PURGES {
            log.append(tag(&i.to_string()));
        }
        assert!(log.after(1).lost, "entry 2 was forgotten");
        assert!(!log.after(3).lost);
        // Etcd revisions: out-of-order or repeated records are ignored.
        let log = PurgeLog::new(100);
        log.record(105, tag("x"));
        log.record(103, tag("old"));
        assert_eq!(log.after(100).purges.len(), 1);
        assert!(log.after(99).lost);
    }

    #[test]
    fn purge_bodies_are_checked() {
        assert!(parse_purge(br#"{"tag":"t"}"#).is_ok());
        assert!(parse_purge(br#"{"url":"http://a/b"}"#).is_ok());
        assert!(parse_purge(br#"{"tag":1}"#).is_err());
        assert!(parse_purge(br#"{"tag":"a","url":"b"}"#).is_err());
        assert!(parse_purge(br#"{"everything":"x"}"#).is_err());
        assert!(parse_purge(&vec![b' '; MAX_PURGE_BYTES + 1]).is_err());
    }
}
