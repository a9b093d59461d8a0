//! Following the config service: long-poll for newer versions, install each through
//! [`apply_document`], keep the last good one on disk, reconnect with backoff and jitter.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meridian_config_service::{ConfigClient, StoredVersion};
use tokio::sync::watch;

use super::{apply_document, SnapshotStore};

const LAST_GOOD: &str = "last-good.toml";
const LAST_GOOD_VERSION: &str = "last-good.version";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct ControlSettings {
    pub url: String,
    pub token: Option<String>,
    pub cache_dir: PathBuf,
    pub wait: Duration,
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
        })
    }

    pub fn client(&self) -> Result<ConfigClient, meridian_config_service::ClientError> {
        ConfigClient::new(&self.url, self.token.clone())
    }
}

/// The document an edge should start from: the service's current version, else the cached last
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
                "config service's current version is invalid"
            );
        }
        Ok(None) => tracing::info!("config service has no version yet"),
        Err(e) => tracing::warn!(
            "config service unreachable at start ({e}); trying the cached last good config"
        ),
    }
    load_last_good(&settings.cache_dir)
}

async fn fetch_current(
    settings: &ControlSettings,
) -> Result<Option<StoredVersion>, meridian_config_service::ClientError> {
    let client = settings
        .client()?
        .with_request_timeout(Duration::from_secs(3));
    client.current().await
}

/// Runs until `stop`: every new version is validated, compiled and swapped in; the edge stays on
/// the previous snapshot when one is refused, and keeps serving when the service is down.
pub async fn follow(
    store: Arc<SnapshotStore>,
    settings: ControlSettings,
    mut stop: watch::Receiver<bool>,
) {
    let client = match settings.client() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("control.url: {e}");
            return;
        }
    };
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
                let number = version.meta.version;
                seen = seen.max(number);
                let installed = apply_document(&store, &version.document, number).is_ok();
                if installed {
                    save_last_good(&settings.cache_dir, &version.document, number);
                }
            }
            Ok(None) => backoff = BACKOFF_MIN,
            Err(e) => {
                store.metrics().config.fetch_errors.inc();
                let delay = jitter(backoff);
                tracing::warn!("config service: {e}; retrying in {delay:?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
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

/// Writes the last good document atomically (temp file, fsync, rename), then its version.
pub fn save_last_good(dir: &Path, document: &str, version: u64) {
    let result = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_atomic(&dir.join(LAST_GOOD_VERSION), version.to_string().as_bytes())?;
        write_atomic(&dir.join(LAST_GOOD), document.as_bytes())
    })();
    if let Err(e) = result {
        tracing::warn!("cannot keep the last good config in {}: {e}", dir.display());
    }
}

pub fn load_last_good(dir: &Path) -> Option<StoredVersion> {
    let document = std::fs::read_to_string(dir.join(LAST_GOOD)).ok()?;
    let version = std::fs::read_to_string(dir.join(LAST_GOOD_VERSION))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
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

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
