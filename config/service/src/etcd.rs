//! The config store on an etcd cluster: the config server keeps no state of its own, so any
//! number of replicas can serve the same API from one cluster.
//!
//! The keys are described in [`crate::etcd_layout`].
//!
//! A write is one etcd transaction: "if `current` is still at the revision I read, point it at
//! n+1 and create n+1's keys (and drop the ones past retention)". That compare-and-swap on the
//! pointer's revision is what makes `If-Match` exact across replicas, and numbers never
//! collide: two writers that read the same current version cannot both commit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, SortOrder, SortTarget, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::watch;

use crate::etcd_layout::{read_version, read_with_retry, unavailable, KeyKind};
use crate::purges::PurgeLog;
use crate::store::{validate, PutError, StoredVersion, VersionMeta};
use crate::versions::{Unavailable, VersionStore};

pub use crate::etcd_layout::{connect_options, parse_pointer, Keys, DEFAULT_PREFIX};

/// Versions kept when no retention is given: old ones are deleted as new ones are written.
pub const DEFAULT_RETAIN: u64 = 1000;
/// Pause before re-establishing a broken watch on the pointer.
const WATCH_RETRY: Duration = Duration::from_millis(100);
/// How often a writer retries when another replica committed between its read and its write
/// (only without `If-Match`; with it, that race is the conflict the caller asked about).
const MAX_WRITE_ATTEMPTS: usize = 32;

pub struct EtcdStore {
    client: Client,
    keys: Keys,
    retain: u64,
    latest: Arc<watch::Sender<u64>>,
    purges: Arc<PurgeLog>,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl EtcdStore {
    /// Connects to `endpoints` and reads the current version. `retain` is how many versions
    /// are kept (0 keeps all).
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        retain: u64,
    ) -> Result<EtcdStore, Unavailable> {
        let client = Client::connect(endpoints, Some(connect_options()))
            .await
            .map_err(unavailable)?;
        let keys = Keys::new(prefix);
        let (current, revision) = crate::etcd_layout::read_pointer(&client, &keys).await?;
        let (latest, _) = watch::channel(current);
        let latest = Arc::new(latest);
        // Purges are numbered by their etcd revision: the same cursor means the same on every
        // replica. Only the ones after this replica started are known to it.
        let purges = Arc::new(PurgeLog::new(u64::try_from(revision).unwrap_or(0)));
        let follower = tokio::spawn(follow_pointer(
            client.clone(),
            keys.clone(),
            latest.clone(),
            purges.clone(),
            revision,
        ));
        Ok(EtcdStore {
            client,
            keys,
            retain,
            latest,
            purges,
            follower,
        })
    }

    pub fn current_version(&self) -> u64 {
        *self.latest.borrow()
    }

    async fn try_commit(
        &self,
        document: &str,
        author: &str,
        message: &str,
        if_match: Option<u64>,
    ) -> Result<Option<VersionMeta>, PutError> {
        let key = self.keys.current();
        let pointer = read_with_retry(&self.client, |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })
        .await
        .map_err(|e| PutError::Unavailable(e.to_string()))?;
        let mut client = self.client.clone();
        let (current, compare) = match pointer.kvs().first() {
            Some(kv) => (
                parse_pointer(kv.value()).map_err(|e| PutError::Unavailable(e.0))?,
                Compare::mod_revision(self.keys.current(), CompareOp::Equal, kv.mod_revision()),
            ),
            None => (
                0,
                Compare::version(self.keys.current(), CompareOp::Equal, 0),
            ),
        };
        if let Some(expected) = if_match {
            if expected != current {
                return Err(PutError::Conflict { current });
            }
        }
        let version = current + 1;
        let meta = VersionMeta::new(version, author, message, document);
        let meta_json = serde_json::to_vec(&meta).map_err(|e| PutError::Io(e.into()))?;
        let mut ops = vec![
            TxnOp::put(self.keys.current(), version.to_string(), None),
            TxnOp::put(self.keys.meta(version), meta_json, None),
            TxnOp::put(self.keys.doc(version), document, None),
        ];
        if self.retain > 0 && version > self.retain {
            // Everything at or below `version - retain` goes; the zero-padded numbers make the
            // key order the version order.
            let keep_from = version - self.retain + 1;
            for (first, end) in [
                (self.keys.meta(0), self.keys.meta(keep_from)),
                (self.keys.doc(0), self.keys.doc(keep_from)),
            ] {
                ops.push(TxnOp::delete(
                    first,
                    Some(etcd_client::DeleteOptions::new().with_range(end)),
                ));
            }
        }
        let txn = Txn::new().when([compare]).and_then(ops);
        let response = client
            .txn(txn)
            .await
            .map_err(|e| PutError::Unavailable(e.to_string()))?;
        if !response.succeeded() {
            return Ok(None);
        }
        // Wake this replica's long-polls now rather than when the watch event arrives.
        advance(&self.latest, version);
        Ok(Some(meta))
    }

    async fn read_version(&self, version: u64) -> Result<Option<StoredVersion>, Unavailable> {
        read_version(&self.client, &self.keys, version).await
    }
}

/// Moves the published newest version forward (never back: events may arrive after a local
/// commit already announced a later version).
fn advance(latest: &watch::Sender<u64>, version: u64) {
    latest.send_if_modified(|current| {
        if version > *current {
            *current = version;
            true
        } else {
            false
        }
    });
}

/// Keeps `latest` at the pointer's value and `purges` up to date: one watch on the whole
/// prefix, resumed after the last revision seen when it breaks; when that revision was
/// compacted away, the pointer is read afresh and purges in the gap are reported as lost.
async fn follow_pointer(
    client: Client,
    keys: Keys,
    latest: Arc<watch::Sender<u64>>,
    purges: Arc<PurgeLog>,
    mut revision: i64,
) {
    loop {
        let result: Result<(), Unavailable> = async {
            if revision == 0 {
                let (version, read_at) = crate::etcd_layout::read_pointer(&client, &keys).await?;
                advance(&latest, version);
                purges.reset(u64::try_from(read_at).unwrap_or(0));
                revision = read_at;
            }
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut stream = client
                .clone()
                .watch(keys.all(), Some(options))
                .await
                .map_err(unavailable)?;
            while let Some(message) = stream.message().await.map_err(unavailable)? {
                if message.canceled() {
                    if message.compact_revision() > 0 {
                        revision = 0;
                    }
                    return Err(Unavailable(format!(
                        "watch canceled: {}",
                        message.cancel_reason()
                    )));
                }
                for event in message.events() {
                    let Some(kv) = event.kv() else { continue };
                    if event.event_type() == EventType::Put {
                        match keys.classify(kv.key()) {
                            KeyKind::Current => {
                                if let Ok(version) = parse_pointer(kv.value()) {
                                    advance(&latest, version);
                                }
                            }
                            KeyKind::Purge => {
                                if let Ok(purge) = serde_json::from_slice(kv.value()) {
                                    purges.record(
                                        u64::try_from(kv.mod_revision()).unwrap_or(0),
                                        purge,
                                    );
                                }
                            }
                            _ => {}
                        }
                    }
                    revision = revision.max(kv.mod_revision());
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "etcd watch of the config store broke; resuming");
        }
        tokio::time::sleep(WATCH_RETRY).await;
    }
}

#[async_trait]
impl VersionStore for EtcdStore {
    async fn current(&self) -> Result<Option<StoredVersion>, Unavailable> {
        let key = self.keys.current();
        let pointer = read_with_retry(&self.client, |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })
        .await
        .map_err(unavailable)?;
        let Some(kv) = pointer.kvs().first() else {
            return Ok(None);
        };
        let version = parse_pointer(kv.value())?;
        advance(&self.latest, version);
        self.read_version(version).await
    }

    async fn get(&self, version: u64) -> Result<Option<StoredVersion>, Unavailable> {
        self.read_version(version).await
    }

    async fn history(&self) -> Result<Vec<VersionMeta>, Unavailable> {
        let prefix = self.keys.meta_prefix();
        let response = read_with_retry(&self.client, |mut c| {
            let prefix = prefix.clone();
            async move {
                let options = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Key, SortOrder::Descend);
                c.get(prefix, Some(options)).await
            }
        })
        .await
        .map_err(unavailable)?;
        response
            .kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value())
                    .map_err(|e| Unavailable(format!("bad version metadata: {e}")))
            })
            .collect()
    }

    async fn put(
        &self,
        document: String,
        author: String,
        message: String,
        if_match: Option<u64>,
    ) -> Result<VersionMeta, PutError> {
        validate(&document)?;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            if let Some(meta) = self
                .try_commit(&document, &author, &message, if_match)
                .await?
            {
                return Ok(meta);
            }
            // Another replica moved the pointer between our read and our write. With If-Match
            // the next read reports that as the conflict; without, try on top of the new one.
        }
        Err(PutError::Unavailable(
            "too much write contention on the config pointer".into(),
        ))
    }

    async fn rollback(&self, version: u64, author: String) -> Result<VersionMeta, PutError> {
        let document = self
            .read_version(version)
            .await
            .map_err(|e| PutError::Unavailable(e.0))?
            .ok_or(PutError::NoSuchVersion(version))?
            .document;
        self.put(
            document,
            author,
            format!("rollback to version {version}"),
            None,
        )
        .await
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    fn watchers(&self) -> usize {
        self.latest.receiver_count()
    }

    async fn purge(&self, purge: serde_json::Value) -> Result<u64, Unavailable> {
        let body = serde_json::to_vec(&purge).map_err(|e| Unavailable(e.to_string()))?;
        let response = self
            .client
            .clone()
            .put(self.keys.purge(), body, None)
            .await
            .map_err(unavailable)?;
        let seq = response
            .header()
            .map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0));
        // Known here at once, whenever the watch delivers it.
        self.purges.record(seq, purge);
        Ok(seq)
    }

    fn purges(&self) -> &PurgeLog {
        &self.purges
    }
}
