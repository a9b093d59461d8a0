//! The embedded store's purges on disk: one JSON line per purge, appended and fsynced before the
//! purge is acknowledged. A restarted service therefore continues the numbering, and edges that
//! follow it keep their caches: a purge log lost on restart would make every edge drop its whole
//! cache at once and send the full load to the origins.
//!
//! ```text
//! {"complete_after":0}            first line: cursors at or after this are answerable
//! {"seq":1,"purge":{"tag":"a"}}   one line per purge, ascending
//! ```
//!
//! The file is rewritten (atomically) on open and whenever it holds twice the purges kept in
//! memory, so it stays small and a torn last line (a write that was never acknowledged) is gone.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::purges::{PurgeEntry, PurgeLog, KEPT_PURGES};
use crate::store::write_atomically;

/// The journal's file name inside the store directory.
pub const JOURNAL_FILE: &str = "purges.jsonl";

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Start { complete_after: u64 },
    Entry(PurgeEntry),
}

pub struct PurgeJournal {
    dir: PathBuf,
    /// Serialises appends: the number a purge gets and its place in the file agree.
    file: Mutex<Appender>,
    log: PurgeLog,
}

struct Appender {
    file: File,
    lines: usize,
}

impl PurgeJournal {
    /// Reads the journal in `dir` (none yet is an empty log) and rewrites it compactly.
    pub fn open(dir: &Path) -> io::Result<PurgeJournal> {
        let path = dir.join(JOURNAL_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut complete_after = 0;
        let mut entries: Vec<PurgeEntry> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            match serde_json::from_str::<Line>(line) {
                Ok(Line::Start { complete_after: at }) => complete_after = at,
                Ok(Line::Entry(entry)) => {
                    if entries.last().is_none_or(|last| entry.seq > last.seq) {
                        entries.push(entry);
                    }
                }
                // Only a torn final line is expected (its purge was never acknowledged);
                // anything else is reported but must not stop the service.
                Err(e) => {
                    tracing::warn!(path = %path.display(), line = n + 1, "skipping unreadable purge journal line: {e}")
                }
            }
        }
        let log = PurgeLog::restored(complete_after, entries);
        let lines = rewrite(dir, &log)?;
        Ok(PurgeJournal {
            dir: dir.to_path_buf(),
            file: Mutex::new(Appender {
                file: open_append(dir)?,
                lines,
            }),
            log,
        })
    }

    pub fn log(&self) -> &PurgeLog {
        &self.log
    }

    /// Numbers `purge`, makes it durable, then publishes it to the edges (blocking file I/O).
    pub fn append(&self, purge: serde_json::Value) -> io::Result<u64> {
        let mut appender = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = self.log.latest() + 1;
        let entry = PurgeEntry { seq, purge };
        let mut line = serde_json::to_vec(&Line::Entry(entry.clone())).map_err(io::Error::other)?;
        line.push(b'\n');
        let written = appender
            .file
            .write_all(&line)
            .and_then(|()| appender.file.sync_data());
        if let Err(e) = written {
            // Leave a clean file behind (no half line for the next append to continue).
            if let Ok(lines) = rewrite(&self.dir, &self.log) {
                appender.lines = lines;
                if let Ok(file) = open_append(&self.dir) {
                    appender.file = file;
                }
            }
            return Err(e);
        }
        appender.lines += 1;
        self.log.record(entry.seq, entry.purge);
        if appender.lines > 2 * KEPT_PURGES {
            appender.lines = rewrite(&self.dir, &self.log)?;
            appender.file = open_append(&self.dir)?;
        }
        Ok(seq)
    }
}

/// Writes what `log` remembers as the whole journal; returns its line count.
fn rewrite(dir: &Path, log: &PurgeLog) -> io::Result<usize> {
    let (complete_after, entries) = log.snapshot();
    let mut text = serde_json::to_vec(&Line::Start { complete_after }).map_err(io::Error::other)?;
    text.push(b'\n');
    for entry in &entries {
        serde_json::to_writer(&mut text, &Line::Entry(entry.clone())).map_err(io::Error::other)?;
        text.push(b'\n');
    }
    write_atomically(dir, JOURNAL_FILE, &text)?;
    Ok(entries.len() + 1)
}

fn open_append(dir: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).open(dir.join(JOURNAL_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(t: &str) -> serde_json::Value {
        serde_json::json!({ "tag": t })
    }

    #[test]
    fn purges_survive_a_restart_with_their_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = PurgeJournal::open(dir.path()).expect("open");
        assert_eq!(journal.append(tag("a")).expect("append"), 1);
        assert_eq!(journal.append(tag("b")).expect("append"), 2);
        drop(journal);

        let journal = PurgeJournal::open(dir.path()).expect("open");
        let batch = journal.log().after(1);
        assert!(!batch.lost, "an edge at cursor 1 keeps its cache");
        assert_eq!((batch.seq, batch.purges.len()), (2, 1));
        assert_eq!(batch.purges[0].purge, tag("b"));
        assert_eq!(
            journal.append(tag("c")).expect("append"),
            3,
            "numbering continues"
        );
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_file_stays_appendable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = PurgeJournal::open(dir.path()).expect("open");
        journal.append(tag("a")).expect("append");
        drop(journal);
        let path = dir.path().join(JOURNAL_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).expect("append");
        file.write_all(br#"{"seq":2,"purge":{"ta"#).expect("tear");
        drop(file);

        let journal = PurgeJournal::open(dir.path()).expect("open");
        assert_eq!(journal.log().latest(), 1);
        assert_eq!(journal.append(tag("b")).expect("append"), 2);
        drop(journal);
        let journal = PurgeJournal::open(dir.path()).expect("open");
        assert_eq!(journal.log().after(0).purges.len(), 2);
    }

    #[test]
    fn the_journal_is_compacted_to_what_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = PurgeJournal::open(dir.path()).expect("open");
        for i in 0..(2 * KEPT_PURGES + 1) {
            journal.append(tag(&i.to_string())).expect("append");
        }
        let lines = std::fs::read_to_string(dir.path().join(JOURNAL_FILE))
            .expect("journal")
            .lines()
            .count();
        assert!(lines < 2 * KEPT_PURGES, "{lines} lines: never compacted");
        drop(journal);
        let journal = PurgeJournal::open(dir.path()).expect("open");
        let seq = (2 * KEPT_PURGES + 1) as u64;
        assert_eq!(journal.log().latest(), seq);
        assert!(journal.log().after(1).lost, "forgotten purges are reported");
        assert!(!journal.log().after(seq - 10).lost);
    }
}
