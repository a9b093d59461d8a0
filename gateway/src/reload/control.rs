//! Following the fleet's config: long-poll a config service replica (`[control] url`) or watch
//! etcd directly (`[control] etcd`), install each new version through [`apply_document`], keep
//! the last good one on disk, apply fleet-wide cache purges, reconnect with backoff and jitter.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meridian_config_service::{Change, ConfigClient, EtcdFollower, StoredVersion};
use tokio::sync::watch;

use super::{apply_document, SnapshotStore};

/// The last good version: one file, the version and the document's sha256 in its first line,
/// so that a crash can never pair one version's number with another's document.
const LAST_GOOD: &str = "last-good.toml";
/// Where older edges kept the version number (read once when upgrading, then removed).
const LEGACY_LAST_GOOD_VERSION: &str = "last-good.version";
const LAST_GOOD_HEADER: &str = "# meridian last-good";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the start waits for the fleet's config before falling back to the cached copy.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct ControlSettings {
    pub url: String,
    pub token: Option<String>,
    pub cache_dir: PathBuf,
    pub wait: Duration,
    /// Follow etcd directly (client URLs) instead of `url`.
    pub etcd: Vec<String>,
    pub etcd_prefix: String,
    /// CA of an `https://` config service.
    pub ca_file: Option<PathBuf>,
}

impl ControlSettings {
    pub fn from_config(control: &meridian_config::Control) -> std::io::Result<Self> {
        let token = match &control.token_file {
            Some(path) => Some(std::fs::read_to_string(path)?.trim().to_string()),
            None => None,
        };
        Ok(Self {
            url: control.url.clone(),
            token,
            cache_dir: PathBuf::from(&control.cache_dir),
            wait: control.wait.as_duration(),
            etcd: control.etcd.clone(),
            etcd_prefix: control.etcd_prefix.clone(),
            ca_file: control.ca_file.as_ref().map(PathBuf::from),
        })
    }

    pub fn client(&self) -> Result<ConfigClient, meridian_config_service::ClientError> {
        let client = ConfigClient::new(&self.url, self.token.clone())?;
        match &self.ca_file {
            Some(ca) => client.with_ca_file(ca),
            None => Ok(client),
        }
    }

    fn follows_etcd(&self) -> bool {
        !self.etcd.is_empty()
    }
}

/// The document an edge should start from: the fleet's current version, else the cached last
/// good one, else `None` (the caller falls back to its local file).
pub async fn bootstrap(settings: &ControlSettings) -> Option<StoredVersion> {
    match fetch_current(settings).await {
        Ok(Some(current)) => {
            if meridian_config::Config::from_toml_str(&current.document).is_ok() {
                save_last_good(&settings.cache_dir, &current.document, current.meta.version);
                return Some(current);
            }
            tracing::error!(
                version = current.meta.version,
                "the fleet's current config version is invalid"
            );
        }
        Ok(None) => tracing::info!("no config version stored yet"),
        Err(e) => tracing::warn!(
            "config source unreachable at start ({e}); trying the cached last good config"
        ),
    }
    load_last_good(&settings.cache_dir)
}

async fn fetch_current(settings: &ControlSettings) -> Result<Option<StoredVersion>, String> {
    if settings.follows_etcd() {
        let mut follower = EtcdFollower::new(&settings.etcd, &settings.etcd_prefix, 0);
        return match tokio::time::timeout(BOOTSTRAP_TIMEOUT, follower.current()).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("etcd did not answer within {BOOTSTRAP_TIMEOUT:?}")),
        };
    }
    let client = settings
        .client()
        .map_err(|e| e.to_string())?
        .with_request_timeout(BOOTSTRAP_TIMEOUT);
    client.current().await.map_err(|e| e.to_string())
}

/// Runs until `stop`: every new version is validated, compiled and swapped in; the edge stays on
/// the previous snapshot when one is refused, and keeps serving when the source is down.
pub async fn follow(
    store: Arc<SnapshotStore>,
    settings: ControlSettings,
    stop: watch::Receiver<bool>,
) {
    if settings.follows_etcd() {
        return follow_etcd(store, settings, stop).await;
    }
    let client = match settings.client() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("control.url: {e}");
            return;
        }
    };
    tokio::join!(
        follow_service(&store, &settings, &client, stop.clone()),
        follow_service_purges(&store, &settings, &client, stop),
    );
}

/// Installs `version` and keeps it on disk when it was installed.
fn install(store: &SnapshotStore, settings: &ControlSettings, version: &StoredVersion) {
    let number = version.meta.version;
    if apply_document(store, &version.document, number).is_ok() {
        save_last_good(&settings.cache_dir, &version.document, number);
    }
}

/// Sleeps for the jittered `backoff` (false: stop was asked meanwhile) and doubles it.
async fn pause(backoff: &mut Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let delay = jitter(*backoff);
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

async fn follow_service(
    store: &SnapshotStore,
    settings: &ControlSettings,
    client: &ConfigClient,
    mut stop: watch::Receiver<bool>,
) {
    // Versions at or below `seen` are not asked for again (including refused ones).
    let mut seen = store.load().snapshot.meta.version;
    let mut backoff = BACKOFF_MIN;
    loop {
        let poll = client.wait_for_newer(seen, settings.wait);
        let result = tokio::select! {
            result = poll => result,
            _ = stop.wait_for(|s| *s) => return,
        };
        match result {
            Ok(Some(version)) => {
                backoff = BACKOFF_MIN;
                seen = seen.max(version.meta.version);
                install(store, settings, &version);
            }
            Ok(None) => backoff = BACKOFF_MIN,
            Err(e) => {
                store.metrics().config.fetch_errors.inc();
                tracing::warn!("config service: {e}; retrying");
                if !pause(&mut backoff, &mut stop).await {
                    return;
                }
            }
        }
    }
}

/// Long-polls the service for fleet-wide purges and applies each once, in order.
async fn follow_service_purges(
    store: &SnapshotStore,
    settings: &ControlSettings,
    client: &ConfigClient,
    mut stop: watch::Receiver<bool>,
) {
    let mut cursor = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let poll = client.purges(cursor, settings.wait);
        let result = tokio::select! {
            result = poll => result,
            _ = stop.wait_for(|s| *s) => return,
        };
        match result {
            Ok(batch) => {
                backoff = BACKOFF_MIN;
                if cursor.is_some() {
                    if batch.lost {
                        purge_everything(store).await;
                    }
                    for entry in &batch.purges {
                        apply_purge(store, &entry.purge).await;
                    }
                }
                cursor = Some(batch.seq);
            }
            Err(meridian_config_service::ClientError::Rejected { status: 404, .. }) => {
                tracing::info!("the config service has no fleet-wide purges; not polling them");
                return;
            }
            Err(e) => {
                tracing::debug!("config service purges: {e}; retrying");
                if !pause(&mut backoff, &mut stop).await {
                    return;
                }
            }
        }
    }
}

/// Watches the versions (and purges) on etcd from the last revision seen.
async fn follow_etcd(
    store: Arc<SnapshotStore>,
    settings: ControlSettings,
    mut stop: watch::Receiver<bool>,
) {
    let version = store.load().snapshot.meta.version;
    let mut follower = EtcdFollower::new(&settings.etcd, &settings.etcd_prefix, version);
    let mut backoff = BACKOFF_MIN;
    loop {
        let result = tokio::select! {
            result = follower.next() => result,
            _ = stop.wait_for(|s| *s) => return,
        };
        match result {
            Ok(changes) => {
                backoff = BACKOFF_MIN;
                for change in changes {
                    match change {
                        Change::Version(version) => install(&store, &settings, &version),
                        Change::Purge(purge) => apply_purge(&store, &purge).await,
                        Change::PurgesLost => purge_everything(&store).await,
                    }
                }
            }
            Err(e) => {
                store.metrics().config.fetch_errors.inc();
                tracing::warn!("etcd: {e}; resuming after revision {}", follower.revision());
                if !pause(&mut backoff, &mut stop).await {
                    return;
                }
            }
        }
    }
}

async fn apply_purge(store: &SnapshotStore, purge: &serde_json::Value) {
    let Some(cache) = store.cache() else { return };
    match crate::cache::Purge::from_json(purge.to_string().as_bytes()) {
        Ok(request) => {
            let purged = cache.purge(&request).await;
            tracing::info!(?request, purged, "fleet-wide cache purge");
        }
        Err(e) => tracing::warn!("ignoring a fleet-wide purge this edge cannot read: {e}"),
    }
}

/// Purges may have been missed: nothing cached can be trusted to be current.
async fn purge_everything(store: &SnapshotStore) {
    if let Some(cache) = store.cache() {
        let purged = cache.purge_prefix("").await;
        tracing::warn!(
            purged,
            "fleet-wide purges may have been missed; cache emptied"
        );
    }
}

/// 50%–150% of `base`, so a fleet of edges does not reconnect in lockstep.
fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let factor = 0.5 + f64::from(nanos % 1000) / 1000.0;
    base.mul_f64(factor)
}

/// Writes the last good version as one file in one atomic step (temp file, fsync, rename,
/// fsync of the directory).
pub fn save_last_good(dir: &Path, document: &str, version: u64) {
    let hash = meridian_config::content_hash(document);
    let contents = format!("{LAST_GOOD_HEADER} version={version} sha256={hash}\n{document}");
    let result = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_atomic(dir, LAST_GOOD, contents.as_bytes())?;
        match std::fs::remove_file(dir.join(LEGACY_LAST_GOOD_VERSION)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    })();
    if let Err(e) = result {
        tracing::warn!("cannot keep the last good config in {}: {e}", dir.display());
    }
}

/// The cached last good version, when it is complete and valid.
pub fn load_last_good(dir: &Path) -> Option<StoredVersion> {
    let contents = std::fs::read_to_string(dir.join(LAST_GOOD)).ok()?;
    let (version, document) = match parse_last_good(&contents) {
        Ok(parsed) => parsed,
        Err(LastGood::Legacy) => {
            // Written by an older edge: the number was in a second file.
            let version = std::fs::read_to_string(dir.join(LEGACY_LAST_GOOD_VERSION))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            (version, contents.clone())
        }
        Err(LastGood::Damaged) => {
            tracing::error!(
                "cached config in {} does not match its checksum; ignoring it",
                dir.display()
            );
            return None;
        }
    };
    if meridian_config::Config::from_toml_str(&document).is_err() {
        tracing::error!("cached config in {} is invalid; ignoring it", dir.display());
        return None;
    }
    tracing::info!(version, "starting from the cached last good config");
    Some(StoredVersion {
        meta: meridian_config_service::VersionMeta {
            version,
            author: String::new(),
            message: "cached last good".into(),
            timestamp: 0,
            sha256: meridian_config::content_hash(&document),
        },
        document,
    })
}

#[derive(Debug, PartialEq)]
enum LastGood {
    /// No header: the two-file format of older edges.
    Legacy,
    /// A header whose checksum does not match the document.
    Damaged,
}

fn parse_last_good(contents: &str) -> Result<(u64, String), LastGood> {
    let Some(rest) = contents.strip_prefix(LAST_GOOD_HEADER) else {
        return Err(LastGood::Legacy);
    };
    let (header, document) = rest.split_once('\n').ok_or(LastGood::Damaged)?;
    let mut version = None;
    let mut hash = None;
    for field in header.split_whitespace() {
        if let Some(v) = field.strip_prefix("version=") {
            version = v.parse::<u64>().ok();
        } else if let Some(h) = field.strip_prefix("sha256=") {
            hash = Some(h);
        }
    }
    match (version, hash) {
        (Some(version), Some(hash)) if hash == meridian_config::content_hash(document) => {
            Ok((version, document.to_string()))
        }
        _ => Err(LastGood::Damaged),
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, dir.join(name))?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
    fn the_last_good_copy_is_one_file_with_its_version_inside() {
        let dir = tempfile::tempdir().expect("tempdir");
        save_last_good(dir.path(), DOC, 7);
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(files, [LAST_GOOD], "one file, no temp left behind");
        let loaded = load_last_good(dir.path()).expect("loads");
        assert_eq!((loaded.meta.version, loaded.document.as_str()), (7, DOC));

        // A version number can never go with another version's document: the number lives
        // inside the file that is replaced whole, and a document that does not match the
        // checksum next to the number is refused.
        let other = DOC.replace("api.example.test", "api2.example.test");
        let tampered = std::fs::read_to_string(dir.path().join(LAST_GOOD))
            .expect("read")
            .replace(DOC, &other);
        std::fs::write(dir.path().join(LAST_GOOD), tampered).expect("write");
        assert!(load_last_good(dir.path()).is_none());
        assert_eq!(
            parse_last_good(&format!("{LAST_GOOD_HEADER} version=8\n{DOC}")),
            Err(LastGood::Damaged)
        );
    }

    #[test]
    fn an_older_edges_two_files_still_load_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LAST_GOOD), DOC).expect("write");
        std::fs::write(dir.path().join(LEGACY_LAST_GOOD_VERSION), "4").expect("write");
        assert_eq!(load_last_good(dir.path()).expect("loads").meta.version, 4);
        save_last_good(dir.path(), DOC, 5);
        assert!(!dir.path().join(LEGACY_LAST_GOOD_VERSION).exists());
        assert_eq!(load_last_good(dir.path()).expect("loads").meta.version, 5);
    }
}
