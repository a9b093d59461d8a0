//! Following the versions on etcd directly, as an edge with `[control] etcd` does: read the
//! pointer once, then one watch on the store's prefix from the revision after the last one
//! seen. A broken watch is resumed from there (nothing missed, nothing handed out twice); a
//! revision that was compacted away meanwhile makes the next call read the pointer afresh.

use std::collections::HashMap;

use etcd_client::{Client, EventType, WatchOptions, WatchStream};

use crate::etcd_layout::{
    connect_options, decode_version, parse_pointer, read_pointer, read_version, unavailable,
    KeyKind, Keys, MAX_MESSAGE_BYTES,
};
use crate::store::StoredVersion;
use crate::versions::Unavailable;

/// What changed on etcd, in revision order.
#[derive(Debug)]
pub enum Change {
    /// A version newer than every one handed out before (versions that were already
    /// superseded when the edge saw them are skipped: only the newest is worth compiling).
    Version(StoredVersion),
    /// A fleet-wide cache purge, as posted.
    Purge(serde_json::Value),
    /// Purges may have been missed (the revisions since the last one seen were compacted):
    /// whoever applies purges drops everything instead.
    PurgesLost,
}

pub struct EtcdFollower {
    endpoints: Vec<String>,
    keys: Keys,
    client: Option<Client>,
    stream: Option<WatchStream>,
    /// Every change up to this store revision has been handed out; 0: read the pointer first.
    revision: i64,
    /// The newest version handed out (or the one the edge started with).
    version: u64,
}

impl EtcdFollower {
    /// A follower that has `version` already (from the cache on disk, or 0).
    pub fn new(endpoints: &[String], prefix: &str, version: u64) -> EtcdFollower {
        EtcdFollower {
            endpoints: endpoints.to_vec(),
            keys: Keys::new(prefix),
            client: None,
            stream: None,
            revision: 0,
            version,
        }
    }

    /// A follower that has `version` and has seen every change up to `revision` (as an earlier
    /// follower's [`EtcdFollower::revision`] said): its watch starts right after it.
    pub fn resume(endpoints: &[String], prefix: &str, version: u64, revision: i64) -> Self {
        EtcdFollower {
            revision,
            ..EtcdFollower::new(endpoints, prefix, version)
        }
    }

    /// The store revision up to which everything has been handed out.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    async fn client(&mut self) -> Result<Client, Unavailable> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let client = Client::connect(&self.endpoints, Some(connect_options()))
            .await
            .map_err(unavailable)?;
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Reads the pointer: the current version when it is newer than the one held, and the
    /// revision the watch starts after.
    async fn read_afresh(&mut self) -> Result<Option<StoredVersion>, Unavailable> {
        let client = self.client().await?;
        let (current, revision) = read_pointer(&client, &self.keys).await?;
        let newer = if current > self.version {
            let version = read_version(&client, &self.keys, current)
                .await?
                .ok_or_else(|| Unavailable(format!("version {current} is not stored")))?;
            Some(version)
        } else {
            None
        };
        self.revision = revision;
        if let Some(version) = &newer {
            self.version = version.meta.version;
        }
        Ok(newer)
    }

    /// The current version if it is newer than the one held (the edge's start).
    pub async fn current(&mut self) -> Result<Option<StoredVersion>, Unavailable> {
        self.read_afresh().await
    }

    /// Waits for the next changes. An error leaves the position where it was: call again
    /// (after a pause) and the watch resumes from there.
    pub async fn next(&mut self) -> Result<Vec<Change>, Unavailable> {
        let result = self.next_inner().await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn next_inner(&mut self) -> Result<Vec<Change>, Unavailable> {
        if self.revision == 0 {
            self.stream = None;
            if let Some(version) = self.read_afresh().await? {
                return Ok(vec![Change::Version(version)]);
            }
        }
        if self.stream.is_none() {
            let client = self.client().await?;
            // A catch-up after a long disconnect can carry many versions: etcd may split it
            // (fragments), and one message may be larger than gRPC's default 4 MiB.
            let options = WatchOptions::new()
                .with_prefix()
                .with_fragment()
                .with_start_revision(self.revision + 1);
            let stream = client
                .watch_client()
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .watch(self.keys.all(), Some(options))
                .await
                .map_err(unavailable)?;
            self.stream = Some(stream);
        }
        loop {
            let Some(stream) = self.stream.as_mut() else {
                return Err(Unavailable("no watch".into()));
            };
            let Some(message) = stream.message().await.map_err(unavailable)? else {
                return Err(Unavailable("etcd ended the watch".into()));
            };
            if message.canceled() {
                if message.compact_revision() > 0 {
                    // The revisions after the last one seen are gone: read the pointer again
                    // on the next call; purges in the gap cannot be known.
                    tracing::warn!(
                        after = self.revision,
                        compacted = message.compact_revision(),
                        "etcd compacted past the last revision seen; reading the config afresh"
                    );
                    self.revision = 0;
                    self.stream = None;
                    return Ok(vec![Change::PurgesLost]);
                }
                return Err(Unavailable(format!(
                    "etcd canceled the watch: {}",
                    message.cancel_reason()
                )));
            }
            let mut changes = Vec::new();
            let mut pointer = None;
            let mut docs = HashMap::new();
            let mut metas = HashMap::new();
            let mut last_revision = self.revision;
            for event in message.events() {
                let Some(kv) = event.kv() else { continue };
                last_revision = last_revision.max(kv.mod_revision());
                if event.event_type() != EventType::Put {
                    continue;
                }
                if kv.value().len() > MAX_MESSAGE_BYTES {
                    continue;
                }
                match self.keys.classify(kv.key()) {
                    KeyKind::Current => pointer = parse_pointer(kv.value()).ok().or(pointer),
                    KeyKind::Doc(n) => {
                        docs.insert(n, kv.value().to_vec());
                    }
                    KeyKind::Meta(n) => {
                        metas.insert(n, kv.value().to_vec());
                    }
                    KeyKind::Purge => match serde_json::from_slice(kv.value()) {
                        Ok(purge) => changes.push(Change::Purge(purge)),
                        Err(e) => tracing::warn!("ignoring a malformed purge on etcd: {e}"),
                    },
                    KeyKind::Other => {}
                }
            }
            if let Some(n) = pointer.filter(|&n| n > self.version) {
                // A push writes the pointer and the version in one transaction, so both are
                // normally in this batch; read it otherwise.
                let version = match (metas.get(&n), docs.get(&n)) {
                    (Some(meta), Some(doc)) => decode_version(n, meta, doc)?,
                    _ => {
                        let client = self.client().await?;
                        read_version(&client, &self.keys, n)
                            .await?
                            .ok_or_else(|| Unavailable(format!("version {n} is not stored")))?
                    }
                };
                self.version = n;
                changes.push(Change::Version(version));
            }
            self.revision = last_revision;
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }
}

/// Publishes a fleet-wide cache purge on etcd (what `meridian cache purge --etcd` does); every
/// edge following the store sees it as one event.
pub async fn publish_purge(
    endpoints: &[String],
    prefix: &str,
    purge: &serde_json::Value,
) -> Result<i64, Unavailable> {
    let mut client = Client::connect(endpoints, Some(connect_options()))
        .await
        .map_err(unavailable)?;
    let body = serde_json::to_vec(purge).map_err(|e| Unavailable(e.to_string()))?;
    let response = client
        .put(Keys::new(prefix).purge(), body, None)
        .await
        .map_err(unavailable)?;
    Ok(response.header().map_or(0, |h| h.revision()))
}
