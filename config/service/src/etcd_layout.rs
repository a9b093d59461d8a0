//! What the config server's etcd store and the edges that follow etcd directly agree on: how
//! to connect, which keys hold what, and how a version is read back.
//!
//! Keys under the prefix (default `/meridian`), for version 7:
//!
//! ```text
//! {prefix}/current                     "7": the pointer to the newest version
//! {prefix}/meta/00000000000000000007   VersionMeta as JSON (immutable)
//! {prefix}/doc/00000000000000000007    the document exactly as pushed (immutable)
//! {prefix}/purge                       the latest fleet-wide cache purge (JSON); every put is one
//!                                      purge, so watchers see each as its own event
//! ```

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, Txn, TxnOp};

use crate::store::{StoredVersion, VersionMeta};
use crate::versions::Unavailable;

/// Key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "/meridian";

/// Tries of an idempotent read: a member that just died still gets some requests until the
/// client's balancer notices, and a read can safely go again (to another member).
const READ_ATTEMPTS: usize = 5;

/// Largest gRPC message accepted from etcd: a version is at most the config service's body
/// limit, and a watch batch carries a few of them.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

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

    pub fn purge(&self) -> String {
        format!("{}/purge", self.prefix)
    }

    /// Everything of this store: one watch on it sees pointer moves, the versions they point
    /// at and purges in one ordered stream of revisions.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// What a key under [`Keys::all`] is.
    pub fn classify(&self, key: &[u8]) -> KeyKind {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_bytes())
            .and_then(|r| r.strip_prefix(b"/"))
        else {
            return KeyKind::Other;
        };
        let number = |digits: &[u8]| {
            std::str::from_utf8(digits)
                .ok()
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse().ok())
        };
        match rest {
            b"current" => KeyKind::Current,
            b"purge" => KeyKind::Purge,
            _ => {
                if let Some(n) = rest.strip_prefix(b"doc/").and_then(number) {
                    KeyKind::Doc(n)
                } else if let Some(n) = rest.strip_prefix(b"meta/").and_then(number) {
                    KeyKind::Meta(n)
                } else {
                    KeyKind::Other
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Current,
    Doc(u64),
    Meta(u64),
    Purge,
    Other,
}

pub(crate) fn unavailable(error: etcd_client::Error) -> Unavailable {
    Unavailable(error.to_string())
}

/// The version number a `current` value names.
pub fn parse_pointer(value: &[u8]) -> Result<u64, Unavailable> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| Unavailable("the current-version key does not hold a number".into()))
}

/// A version from its two stored values.
pub fn decode_version(
    version: u64,
    meta: &[u8],
    document: &[u8],
) -> Result<StoredVersion, Unavailable> {
    let meta: VersionMeta = serde_json::from_slice(meta)
        .map_err(|e| Unavailable(format!("version {version}: bad metadata: {e}")))?;
    let document = String::from_utf8(document.to_vec())
        .map_err(|_| Unavailable(format!("version {version}: document is not UTF-8")))?;
    if meta.version != version || meta.sha256 != meridian_config::content_hash(&document) {
        return Err(Unavailable(format!(
            "version {version}: metadata does not match the document"
        )));
    }
    Ok(StoredVersion { meta, document })
}

/// Runs the idempotent read `op` until it succeeds or [`READ_ATTEMPTS`] tries failed.
pub(crate) async fn read_with_retry<T, F, Fut>(
    client: &Client,
    op: F,
) -> Result<T, etcd_client::Error>
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

/// Reads version `version` (metadata and document in one transaction); `None` when it is not
/// stored (never written, or deleted by retention).
pub async fn read_version(
    client: &Client,
    keys: &Keys,
    version: u64,
) -> Result<Option<StoredVersion>, Unavailable> {
    let (meta_key, doc_key) = (keys.meta(version), keys.doc(version));
    let response = read_with_retry(client, |mut c| {
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
    decode_version(version, &meta, &document).map(Some)
}

/// The pointer's version (0 when nothing was pushed yet) and the store revision it was read at.
pub async fn read_pointer(client: &Client, keys: &Keys) -> Result<(u64, i64), Unavailable> {
    let key = keys.current();
    let response = read_with_retry(client, |mut c| {
        let key = key.clone();
        async move { c.get(key, None).await }
    })
    .await
    .map_err(unavailable)?;
    let revision = response.header().map_or(0, |h| h.revision());
    let version = match response.kvs().first() {
        Some(kv) => parse_pointer(kv.value())?,
        None => 0,
    };
    Ok((version, revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified() {
        let keys = Keys::new("/fleet/");
        assert_eq!(keys.classify(keys.current().as_bytes()), KeyKind::Current);
        assert_eq!(keys.classify(keys.doc(7).as_bytes()), KeyKind::Doc(7));
        assert_eq!(keys.classify(keys.meta(7).as_bytes()), KeyKind::Meta(7));
        assert_eq!(keys.classify(keys.purge().as_bytes()), KeyKind::Purge);
        assert_eq!(keys.classify(b"/fleet/doc/x"), KeyKind::Other);
        assert_eq!(keys.classify(b"/fleetx/current"), KeyKind::Other);
        assert!(keys.current().starts_with(&keys.all()));
    }
}
