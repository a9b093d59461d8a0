//! The config store on an etcd cluster: the config server keeps no state of its own, so any
//! number of replicas can serve the same API from one cluster.
//!
//! Keys under the prefix (default `/meridian`), for version 7:
//!
//! ```text
//! {prefix}/current                 "7": the pointer to the newest version
//! {prefix}/meta/00000000000000000007   VersionMeta as JSON (immutable)
//! {prefix}/doc/00000000000000000007    the document exactly as pushed (immutable)
//! ```
//!
//! A write is one etcd transaction: "if `current` is still at the revision I read, point it at
//! n+1 and create n+1's keys (and drop the ones past retention)". That compare-and-swap on the
//! pointer's revision is what makes `If-Match` exact across replicas, and numbers never
//! collide: two writers that read the same current version cannot both commit.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, SortOrder, SortTarget, Txn,
    TxnOp, WatchOptions,
};
use tokio::sync::watch;

use meridian_config::content_hash;

use crate::store::{validate, PutError, StoredVersion, VersionMeta};
use crate::versions::{Unavailable, VersionStore};

/// Key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "/meridian";
/// Versions kept when no retention is given: old ones are deleted as new ones are written.
pub const DEFAULT_RETAIN: u64 = 1000;
/// Pause before re-establishing a broken watch on the pointer.
const WATCH_RETRY: Duration = Duration::from_millis(100);
/// How often a writer retries when another replica committed between its read and its write
/// (only without `If-Match`; with it, that race is the conflict the caller asked about).
const MAX_WRITE_ATTEMPTS: usize = 32;

/// Tries of an idempotent read: a member that just died still gets some requests until the
/// client's balancer notices, and a read can safely go again (to another member).
const READ_ATTEMPTS: usize = 5;

/// Runs the idempotent read `op` until it succeeds or [`READ_ATTEMPTS`] tries failed.
async fn read_with_retry<T, F, Fut>(client: &Client, op: F) -> Result<T, etcd_client::Error>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 1;
    loop {
        match op(client.clone()).await {
            Ok(value) => return Ok(value),
            Err(e) if attempt >= READ_ATTEMPTS => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, attempt, "etcd read failed; trying again");
                attempt += 1;
            }
        }
    }
}

/// Connection settings shared by the config server's store and the edges that follow etcd.
pub fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        // A member cut off from the quorum cancels our watch instead of going silent, so the
        // watcher reconnects to a member that still hears the leader.
        .with_require_leader(true)
}

/// The etcd keys of one store.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn current(&self) -> String {
        format!("{}/current", self.prefix)
    }

    pub fn meta(&self, version: u64) -> String {
        format!("{}/meta/{version:020}", self.prefix)
    }

    pub fn meta_prefix(&self) -> String {
        format!("{}/meta/", self.prefix)
    }

    pub fn doc(&self, version: u64) -> String {
        format!("{}/doc/{version:020}", self.prefix)
    }
}

pub struct EtcdStore {
    client: Client,
    keys: Keys,
    retain: u64,
    latest: Arc<watch::Sender<u64>>,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

fn unavailable(error: etcd_client::Error) -> Unavailable {
    Unavailable(error.to_string())
}

/// The version number a `current` value names.
pub fn parse_pointer(value: &[u8]) -> Result<u64, Unavailable> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| Unavailable("the current-version key does not hold a number".into()))
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
        let store_client = client.clone();
        let mut reader = client.clone();
        let current = match reader
            .get(keys.current(), None)
            .await
            .map_err(unavailable)?
            .kvs()
            .first()
        {
            Some(kv) => parse_pointer(kv.value())?,
            None => 0,
        };
        let (latest, _) = watch::channel(current);
        let latest = Arc::new(latest);
        let follower = tokio::spawn(follow_pointer(client, keys.clone(), latest.clone()));
        Ok(EtcdStore {
            client: store_client,
            keys,
            retain,
            latest,
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
        let meta = VersionMeta {
            version,
            author: author.to_owned(),
            message: message.to_owned(),
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            sha256: content_hash(document),
        };
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
        let (meta_key, doc_key) = (self.keys.meta(version), self.keys.doc(version));
        let response = read_with_retry(&self.client, |mut c| {
            let txn = Txn::new().and_then([
                TxnOp::get(meta_key.clone(), None),
                TxnOp::get(doc_key.clone(), None),
            ]);
            async move { c.txn(txn).await }
        })
        .await
        .map_err(unavailable)?;
        let mut values = response.op_responses().into_iter().map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let (Some(Some(meta)), Some(Some(document))) = (values.next(), values.next()) else {
            return Ok(None);
        };
        let meta: VersionMeta = serde_json::from_slice(&meta)
            .map_err(|e| Unavailable(format!("version {version}: bad metadata: {e}")))?;
        let document = String::from_utf8(document)
            .map_err(|_| Unavailable(format!("version {version}: document is not UTF-8")))?;
        Ok(Some(StoredVersion { meta, document }))
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

/// Keeps `latest` at the pointer's value: read it, watch it from the next revision, and start
/// over with a fresh read whenever the watch breaks or was compacted away.
async fn follow_pointer(mut client: Client, keys: Keys, latest: Arc<watch::Sender<u64>>) {
    loop {
        let result: Result<(), etcd_client::Error> = async {
            let response = client.get(keys.current(), None).await?;
            let revision = response.header().map_or(0, |h| h.revision());
            if let Some(kv) = response.kvs().first() {
                if let Ok(version) = parse_pointer(kv.value()) {
                    advance(&latest, version);
                }
            }
            let mut stream = client
                .watch(
                    keys.current(),
                    Some(WatchOptions::new().with_start_revision(revision + 1)),
                )
                .await?;
            while let Some(message) = stream.message().await? {
                if message.canceled() {
                    break;
                }
                for event in message.events() {
                    if event.event_type() == EventType::Put {
                        if let Some(version) =
                            event.kv().and_then(|kv| parse_pointer(kv.value()).ok())
                        {
                            advance(&latest, version);
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "etcd watch on the config pointer broke; re-reading");
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
}
