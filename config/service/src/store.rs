//! The config service's versioned store: every accepted document becomes an immutable, numbered
//! version on local disk.
//!
//! Layout of the store directory, for version 7:
//!
//! ```text
//! v0000000007.meta.json   written (temp file, fsync, rename, fsync dir) FIRST
//! v0000000007.toml        renamed into place LAST: this rename is the commit point
//! .tmp-*                  in-flight writes; removed on open
//! purges.jsonl            fleet-wide cache purges (see `purge_journal`)
//! ```
//!
//! A version exists iff both files exist, the metadata parses, names the same version and its
//! `sha256` matches the document. A `kill -9` at any point therefore leaves either a complete
//! version or leftovers that `open` removes; a version is only acknowledged after the directory
//! fsync that makes its final rename durable.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use meridian_config::{content_hash, Config, ConfigError, ValidationError};

const TEMP_PREFIX: &str = ".tmp-";
const DOC_SUFFIX: &str = ".toml";
const META_SUFFIX: &str = ".meta.json";

/// Metadata of one stored version. Immutable once written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    pub version: u64,
    pub author: String,
    pub message: String,
    /// Unix seconds when the version was stored.
    pub timestamp: u64,
    /// Hex sha256 of the document ([`meridian_config::content_hash`]).
    pub sha256: String,
}

impl VersionMeta {
    /// The metadata of `document` stored now as `version` (both stores write it the same way).
    pub fn new(version: u64, author: &str, message: &str, document: &str) -> Self {
        Self {
            version,
            author: author.to_owned(),
            message: message.to_owned(),
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            sha256: content_hash(document),
        }
    }
}

/// One version: its metadata and the exact document text that was pushed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVersion {
    pub meta: VersionMeta,
    pub document: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("config store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("config does not parse: {0}")]
    Parse(String),
    #[error("config is invalid ({} error(s))", .0.len())]
    Invalid(Vec<ValidationError>),
    /// `if_match` named a version that is not the current one. `current` is 0 for an empty store.
    #[error("version conflict: current version is {current}")]
    Conflict { current: u64 },
    #[error("no such version {0}")]
    NoSuchVersion(u64),
    #[error("config store write failed: {0}")]
    Io(#[from] io::Error),
    /// The backing store could not be reached; nothing was written.
    #[error("config store unavailable: {0}")]
    Unavailable(String),
}

/// The validation every store runs before accepting a document.
pub(crate) fn validate(document: &str) -> Result<(), PutError> {
    match Config::from_toml_str(document) {
        Ok(_) => Ok(()),
        Err(ConfigError::Parse(message)) => Err(PutError::Parse(message)),
        Err(ConfigError::Invalid(errors)) => Err(PutError::Invalid(errors)),
        Err(ConfigError::Io { source, .. }) => Err(PutError::Io(source)),
    }
}

/// Versioned, validated, crash-safe config store. Cheap reads (versions are kept in memory);
/// writes are serialized by an internal mutex and do blocking file I/O (call them from
/// `spawn_blocking` in async code).
pub struct ConfigStore {
    dir: PathBuf,
    /// Committed versions. Locked only briefly, never during file I/O, so reads do not wait
    /// for a write's fsyncs.
    versions: RwLock<BTreeMap<u64, StoredVersion>>,
    /// Serializes writers; holds the next version number to write (never reused, even after a
    /// failed write).
    writer: Mutex<u64>,
    latest: watch::Sender<u64>,
    /// Versions kept (older ones are deleted as new ones are written); 0 keeps all.
    keep_versions: u64,
    purges: crate::purge_journal::PurgeJournal,
}

/// Versions kept by default: enough history to roll back far, without growing forever.
pub const DEFAULT_KEEP_VERSIONS: u64 = 1000;

impl ConfigStore {
    /// Opens (creating if needed) the store in `dir`, loads every committed version and removes
    /// leftovers of interrupted writes.
    pub fn open(dir: &Path) -> Result<ConfigStore, StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut docs = BTreeMap::new();
        let mut metas = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TEMP_PREFIX) {
                remove_leftover(&entry.path());
            } else if let Some(n) = parse_name(name, META_SUFFIX) {
                metas.insert(n, entry.path());
            } else if let Some(n) = parse_name(name, DOC_SUFFIX) {
                docs.insert(n, entry.path());
            }
        }

        let mut versions = BTreeMap::new();
        let mut highest_seen = 0;
        for (&n, doc_path) in &docs {
            let Some(meta_path) = metas.remove(&n) else {
                // Only possible if the meta never became durable: the version was never acknowledged.
                tracing::warn!(path = %doc_path.display(), "removing document without metadata (interrupted write)");
                remove_leftover(doc_path);
                continue;
            };
            highest_seen = highest_seen.max(n);
            match load_version(n, doc_path, &meta_path) {
                Ok(version) => {
                    versions.insert(n, version);
                }
                // Keep the files as evidence and never reuse the number; just do not serve it.
                Err(problem) => {
                    tracing::error!(version = n, %problem, "ignoring corrupt stored version")
                }
            }
        }
        for meta_path in metas.values() {
            // Metadata whose document rename never happened: an interrupted, unacknowledged write.
            remove_leftover(meta_path);
        }
        if !docs.is_empty() || !metas.is_empty() {
            sync_dir(dir).map_err(io_err(dir))?;
        }

        let purges = crate::purge_journal::PurgeJournal::open(dir)
            .map_err(io_err(&dir.join(crate::purge_journal::JOURNAL_FILE)))?;
        let current = versions.keys().next_back().copied().unwrap_or(0);
        let (latest, _) = watch::channel(current);
        Ok(ConfigStore {
            dir: dir.to_path_buf(),
            versions: RwLock::new(versions),
            writer: Mutex::new(highest_seen + 1),
            latest,
            keep_versions: DEFAULT_KEEP_VERSIONS,
            purges,
        })
    }

    /// Keeps only the newest `keep` versions from the next write on (0 keeps all).
    pub fn with_keep_versions(mut self, keep: u64) -> Self {
        self.keep_versions = keep;
        self
    }

    /// Fleet-wide cache purges posted to this service.
    pub fn purges(&self) -> &crate::purges::PurgeLog {
        self.purges.log()
    }

    /// Records a fleet-wide purge durably and returns its number (blocking file I/O).
    pub fn append_purge(&self, purge: serde_json::Value) -> io::Result<u64> {
        self.purges.append(purge)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest version, if any.
    pub fn current(&self) -> Option<StoredVersion> {
        self.read().values().next_back().cloned()
    }

    /// Version number of the newest version, 0 when the store is empty.
    pub fn current_version(&self) -> u64 {
        *self.latest.borrow()
    }

    pub fn get(&self, version: u64) -> Option<StoredVersion> {
        self.read().get(&version).cloned()
    }

    /// Metadata of every version, newest first.
    pub fn history(&self) -> Vec<VersionMeta> {
        self.read().values().rev().map(|v| v.meta.clone()).collect()
    }

    /// Validates `document` and stores it as a new version. With `if_match`, the write only
    /// happens if that is the current version (0 meaning "the store is empty").
    pub fn put(
        &self,
        document: &str,
        author: &str,
        message: &str,
        if_match: Option<u64>,
    ) -> Result<VersionMeta, PutError> {
        validate(document)?;
        // The poisoned case: a panicking writer left at most a burnt version number behind.
        let mut next = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(expected) = if_match {
            let current = self.read().keys().next_back().copied().unwrap_or(0);
            if expected != current {
                return Err(PutError::Conflict { current });
            }
        }
        self.commit(&mut next, document, author, message)
    }

    /// Stores version `version`'s document again as a new version (history is never rewritten).
    pub fn rollback(&self, version: u64, author: &str) -> Result<VersionMeta, PutError> {
        let document = self
            .get(version)
            .ok_or(PutError::NoSuchVersion(version))?
            .document;
        // Re-validated: a document that this build can no longer read must not become current.
        self.put(
            &document,
            author,
            &format!("rollback to version {version}"),
            None,
        )
    }

    /// Receiver of the newest version number (0 while empty), for long-polling watchers.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// How many subscribers (pending long-polls, watchers) currently exist.
    pub fn watchers(&self) -> usize {
        self.latest.receiver_count()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<u64, StoredVersion>> {
        // The map only changes by inserting a complete version, so a panic elsewhere cannot leave
        // it half-updated; keep serving.
        self.versions.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn commit(
        &self,
        next: &mut u64,
        document: &str,
        author: &str,
        message: &str,
    ) -> Result<VersionMeta, PutError> {
        let version = *next;
        // Burn the number up front: after a failed write, files for it may exist on disk.
        *next += 1;
        let meta = VersionMeta::new(version, author, message, document);
        let meta_json = serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?;
        write_atomically(&self.dir, &file_name(version, META_SUFFIX), &meta_json)?;
        write_atomically(
            &self.dir,
            &file_name(version, DOC_SUFFIX),
            document.as_bytes(),
        )?;
        self.versions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                version,
                StoredVersion {
                    meta: meta.clone(),
                    document: document.to_owned(),
                },
            );
        self.latest.send_replace(version);
        self.drop_old_versions(version);
        Ok(meta)
    }

    /// Deletes versions past retention, oldest first. A failure only leaves old files behind
    /// (they are tried again on the next write).
    fn drop_old_versions(&self, newest: u64) {
        if self.keep_versions == 0 || newest <= self.keep_versions {
            return;
        }
        let keep_from = newest - self.keep_versions + 1;
        let old: Vec<u64> = {
            let mut versions = self
                .versions
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let kept = versions.split_off(&keep_from);
            let old = versions.keys().copied().collect();
            *versions = kept;
            old
        };
        for version in old {
            for suffix in [DOC_SUFFIX, META_SUFFIX] {
                let path = self.dir.join(file_name(version, suffix));
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "cannot delete an old version");
                    }
                }
            }
        }
        if let Err(e) = sync_dir(&self.dir) {
            tracing::warn!(error = %e, "cannot sync the store directory after deleting old versions");
        }
    }
}

fn file_name(version: u64, suffix: &str) -> String {
    format!("v{version:010}{suffix}")
}

fn parse_name(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix('v')?.strip_suffix(suffix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn load_version(n: u64, doc_path: &Path, meta_path: &Path) -> Result<StoredVersion, String> {
    let document =
        fs::read_to_string(doc_path).map_err(|e| format!("{}: {e}", doc_path.display()))?;
    let meta_bytes = fs::read(meta_path).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    let meta: VersionMeta =
        serde_json::from_slice(&meta_bytes).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    if meta.version != n {
        return Err(format!(
            "{} names version {}, expected {n}",
            meta_path.display(),
            meta.version
        ));
    }
    if meta.sha256 != content_hash(&document) {
        return Err(format!(
            "{} does not match the sha256 in its metadata",
            doc_path.display()
        ));
    }
    Ok(StoredVersion { meta, document })
}

/// Temp file in the same directory, fsync, rename over the final name, fsync the directory.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let temp = dir.join(format!(
        "{TEMP_PREFIX}{}-{}-{name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, dir.join(name))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_leftover(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"schema = 1
[[regions]]
name = "us-east"
location = { lat = 38.9, lon = -77.0 }
upstreams = [{ address = "127.1.2.1:7001" }]
[[routes]]
name = "api"
hosts = ["api.example.test"]
regions = "*"
"#;

    #[test]
    fn names_round_trip() {
        assert_eq!(file_name(7, DOC_SUFFIX), "v0000000007.toml");
        assert_eq!(parse_name("v0000000007.toml", DOC_SUFFIX), Some(7));
        assert_eq!(parse_name("v0000000007.meta.json", META_SUFFIX), Some(7));
        assert_eq!(parse_name("v0000000007.meta.json", DOC_SUFFIX), None);
        assert_eq!(parse_name("v.toml", DOC_SUFFIX), None);
        assert_eq!(parse_name("v+1.toml", DOC_SUFFIX), None);
    }

    #[test]
    fn put_get_history_rollback_and_watch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ConfigStore::open(dir.path()).expect("open");
        let watch = store.subscribe();
        assert!(store.current().is_none());
        assert_eq!(*watch.borrow(), 0);
        let v1 = store.put(DOC, "ana", "first", Some(0)).expect("put 1");
        assert_eq!(v1.version, 1);
        assert_eq!(v1.sha256, content_hash(DOC));
        let doc2 = DOC.replace("api.example.test", "api2.example.test");
        assert!(matches!(
            store.put(&doc2, "ana", "stale", Some(0)),
            Err(PutError::Conflict { current: 1 })
        ));
        store.put(&doc2, "bo", "second", Some(1)).expect("put 2");
        let v3 = store.rollback(1, "cy").expect("rollback");
        assert_eq!(v3.version, 3);
        assert_eq!(*watch.borrow(), 3);
        assert_eq!(store.get(3).expect("v3").document, DOC);
        let versions: Vec<u64> = store.history().iter().map(|m| m.version).collect();
        assert_eq!(versions, [3, 2, 1]);
        assert!(matches!(
            store.rollback(9, "cy"),
            Err(PutError::NoSuchVersion(9))
        ));
        assert!(matches!(
            store.put("schema = [", "x", "", None),
            Err(PutError::Parse(_))
        ));
    }

    #[test]
    fn only_the_newest_versions_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ConfigStore::open(dir.path())
            .expect("open")
            .with_keep_versions(3);
        for n in 1..=5 {
            store.put(DOC, "a", &n.to_string(), None).expect("put");
        }
        let kept: Vec<u64> = store.history().iter().map(|m| m.version).collect();
        assert_eq!(kept, [5, 4, 3]);
        assert!(store.get(2).is_none());
        assert!(!dir.path().join(file_name(2, DOC_SUFFIX)).exists());
        assert!(!dir.path().join(file_name(2, META_SUFFIX)).exists());
        drop(store);
        let store = ConfigStore::open(dir.path()).expect("reopen");
        assert_eq!(store.history().len(), 3);
        assert_eq!(store.put(DOC, "a", "6", None).expect("put 6").version, 6);
    }

    #[test]
    fn corrupt_version_is_ignored_and_its_number_not_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ConfigStore::open(dir.path()).expect("open");
        store.put(DOC, "a", "1", None).expect("put 1");
        store.put(DOC, "a", "2", None).expect("put 2");
        drop(store);
        fs::write(dir.path().join("v0000000002.toml"), "tampered").expect("tamper");
        let store = ConfigStore::open(dir.path()).expect("reopen");
        assert_eq!(store.current().expect("current").meta.version, 1);
        assert_eq!(store.put(DOC, "a", "3", None).expect("put 3").version, 3);
        assert!(dir.path().join("v0000000002.toml").exists());
    }
}
