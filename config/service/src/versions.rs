//! What the HTTP API needs of a version store, so that the same API (and the same validation)
//! runs over the embedded file store ([`ConfigStore`], one machine) or over etcd
//! ([`crate::etcd::EtcdStore`], any number of stateless replicas).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::purges::PurgeLog;
use crate::store::{ConfigStore, PutError, StoredVersion, VersionMeta};

/// A read from the backing store failed (the backend is unreachable or answered garbage).
#[derive(Debug, thiserror::Error)]
#[error("config store unavailable: {0}")]
pub struct Unavailable(pub String);

#[async_trait]
pub trait VersionStore: Send + Sync {
    /// The newest version, if any.
    async fn current(&self) -> Result<Option<StoredVersion>, Unavailable>;

    async fn get(&self, version: u64) -> Result<Option<StoredVersion>, Unavailable>;

    /// Metadata of every retained version, newest first.
    async fn history(&self) -> Result<Vec<VersionMeta>, Unavailable>;

    /// Validates `document` and stores it as a new version. With `if_match`, the write only
    /// happens if that is the current version (0 meaning "the store is empty").
    async fn put(
        &self,
        document: String,
        author: String,
        message: String,
        if_match: Option<u64>,
    ) -> Result<VersionMeta, PutError>;

    /// Stores version `version`'s document again as a new version (history is never rewritten).
    async fn rollback(&self, version: u64, author: String) -> Result<VersionMeta, PutError>;

    /// Receiver of the newest version number (0 while empty), for long-polling watchers.
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// How many subscribers (pending long-polls, watchers) currently exist.
    fn watchers(&self) -> usize;

    /// Publishes a fleet-wide cache purge (already checked by [`crate::purges::parse_purge`]);
    /// returns its number.
    async fn purge(&self, purge: serde_json::Value) -> Result<u64, Unavailable>;

    /// The purges edges poll for.
    fn purges(&self) -> &PurgeLog;
}

/// The embedded file store behind the trait. Writes fsync, so they run on the blocking pool.
pub struct FileStore(pub Arc<ConfigStore>);

#[async_trait]
impl VersionStore for FileStore {
    async fn current(&self) -> Result<Option<StoredVersion>, Unavailable> {
        Ok(self.0.current())
    }

    async fn get(&self, version: u64) -> Result<Option<StoredVersion>, Unavailable> {
        Ok(self.0.get(version))
    }

    async fn history(&self) -> Result<Vec<VersionMeta>, Unavailable> {
        Ok(self.0.history())
    }

    async fn put(
        &self,
        document: String,
        author: String,
        message: String,
        if_match: Option<u64>,
    ) -> Result<VersionMeta, PutError> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || store.put(&document, &author, &message, if_match))
            .await
            .map_err(|e| PutError::Unavailable(format!("store write task failed: {e}")))?
    }

    async fn rollback(&self, version: u64, author: String) -> Result<VersionMeta, PutError> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || store.rollback(version, &author))
            .await
            .map_err(|e| PutError::Unavailable(format!("store write task failed: {e}")))?
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }

    fn watchers(&self) -> usize {
        self.0.watchers()
    }

    async fn purge(&self, purge: serde_json::Value) -> Result<u64, Unavailable> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || store.append_purge(purge))
            .await
            .map_err(|e| Unavailable(format!("purge write task failed: {e}")))?
            .map_err(|e| Unavailable(format!("cannot record the purge: {e}")))
    }

    fn purges(&self) -> &PurgeLog {
        self.0.purges()
    }
}
