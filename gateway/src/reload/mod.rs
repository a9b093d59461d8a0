//! The live snapshot: compiled off the request path, swapped atomically, loaded once per request.
//! Sources of new versions: the config service (`control`), or the local file (`file`).

pub mod control;
pub mod file;

use std::sync::Arc;

use arc_swap::ArcSwap;
use meridian_config::{Config, ConfigError};
use meridian_geoip::GeoIp;

use crate::core::{CompileError, Snapshot, SnapshotMeta, UpstreamStates};
use crate::metrics::{EdgeMetrics, SnapshotMetrics};

/// A compiled snapshot with its pre-resolved metric series: one `load` gives a request both.
pub struct Loaded {
    pub snapshot: Snapshot,
    pub metrics: SnapshotMetrics,
}

pub struct SnapshotStore {
    current: ArcSwap<Loaded>,
    states: UpstreamStates,
    metrics: Arc<EdgeMetrics>,
    /// Bumped on every successful install, so subsystems that derive their own state from the
    /// config (GeoDNS zone, health checkers) can rebuild it off the request path.
    generation: tokio::sync::watch::Sender<u64>,
    /// Relative paths in a config (the GeoIP database) are resolved against this directory.
    base_dir: Option<std::path::PathBuf>,
    /// When following a config service, `[edge]` (pop name, listeners, limits) belongs to this
    /// process's boot file: a fleet shares one document, but every edge has its own name.
    pinned_edge: Option<meridian_config::Edge>,
    /// This edge terminates TLS (it started with `edge.https`): a new document's certificates must
    /// load before it is installed.
    serves_tls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Parse(#[from] ConfigError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The document's `[tls]` certificates cannot be loaded on this edge: the whole document is
    /// refused, so routing never moves to hosts whose certificates are not being served.
    #[error("tls.certificates: {0}")]
    Certificates(#[from] crate::tls::TlsError),
}

impl SnapshotStore {
    pub fn new(
        mut config: Config,
        meta: SnapshotMeta,
        metrics: Arc<EdgeMetrics>,
        base_dir: Option<std::path::PathBuf>,
        pin_edge: bool,
    ) -> Result<Self, CompileError> {
        resolve_paths(&mut config, base_dir.as_deref());
        let pinned_edge = pin_edge.then(|| config.edge.clone());
        let serves_tls = config.edge.https.is_some();
        let states = UpstreamStates::default();
        let version = meta.version;
        let loaded = compile(config, meta, &states, &metrics)?;
        metrics.config.installed(version);
        Ok(Self {
            current: ArcSwap::from_pointee(loaded),
            states,
            metrics,
            generation: tokio::sync::watch::channel(0).0,
            base_dir,
            pinned_edge,
            serves_tls,
        })
    }

    /// The snapshot a request uses from start to end (in-flight requests keep theirs across swaps).
    pub fn load(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Compiles `config` and swaps it in; on error the current snapshot stays. On a TLS edge the
    /// document's certificates are loaded first (the TLS follower installs them right after).
    pub fn install(&self, mut config: Config, meta: SnapshotMeta) -> Result<(), ApplyError> {
        resolve_paths(&mut config, self.base_dir.as_deref());
        if let Some(edge) = &self.pinned_edge {
            config.edge = edge.clone();
        }
        if self.serves_tls && config.tls != self.load().snapshot.config.tls {
            crate::tls::CertTable::load(&config.tls, self.base_dir.as_deref())?;
        }
        let version = meta.version;
        let loaded = compile(config, meta, &self.states, &self.metrics)?;
        self.current.store(Arc::new(loaded));
        self.metrics.config.installed(version);
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Changes whenever a new snapshot is installed (the value is a generation counter).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn metrics(&self) -> &Arc<EdgeMetrics> {
        &self.metrics
    }
}

/// The one path every new document takes, whatever its source: parse, validate, compile, swap.
/// Invalid documents are refused, logged with every error, and counted; the edge keeps its snapshot.
pub fn apply_document(
    store: &SnapshotStore,
    geoip: &GeoIp,
    source: &str,
    version: u64,
) -> Result<(), ApplyError> {
    let hash = meridian_config::content_hash(source);
    let current = store.load();
    if current.snapshot.meta.hash == hash && current.snapshot.meta.version == version {
        return Ok(());
    }
    let result = Config::from_toml_str(source)
        .map_err(ApplyError::from)
        .and_then(|config| {
            if store.pinned_edge.is_none() {
                warn_about_restart_only_changes(&current.snapshot.config, &config);
            }
            store.install(config, SnapshotMeta { version, hash })?;
            let database = store.load().snapshot.config.geoip.database.clone();
            let db_changed = database != current.snapshot.config.geoip.database;
            if let (true, Some(path)) = (db_changed, database) {
                if let Err(e) = geoip.reload(std::path::Path::new(&path)) {
                    tracing::warn!("geoip.database {path}: {e}; keeping the previous database");
                }
            }
            Ok(())
        });
    match &result {
        Ok(()) => tracing::info!(version, "config installed"),
        Err(e) => {
            let label = match e {
                ApplyError::Parse(_) => "invalid",
                ApplyError::Compile(CompileError::Invalid(_)) => "invalid",
                ApplyError::Compile(_) => "error",
                ApplyError::Certificates(_) => "invalid",
            };
            store
                .metrics
                .config
                .reloads
                .with_label_values(&[label])
                .inc();
            tracing::error!(
                version,
                "config refused, still serving the previous one: {e}"
            );
        }
    }
    result
}

/// Listener addresses and thread counts are bound at start; say so instead of silently ignoring.
fn warn_about_restart_only_changes(old: &Config, new: &Config) {
    let (a, b) = (&old.edge, &new.edge);
    if a.http != b.http || a.admin != b.admin || a.threads != b.threads {
        tracing::warn!(
            "edge listeners/threads changed in the new config: they apply at the next restart"
        );
    }
}

/// Makes a relative `geoip.database` relative to `base` (the config file's directory).
pub fn resolve_paths(config: &mut Config, base: Option<&std::path::Path>) {
    if let (Some(base), Some(db)) = (base, config.geoip.database.as_mut()) {
        if std::path::Path::new(db.as_str()).is_relative() {
            *db = base.join(&*db).display().to_string();
        }
    }
}

fn compile(
    config: Config,
    meta: SnapshotMeta,
    states: &UpstreamStates,
    metrics: &EdgeMetrics,
) -> Result<Loaded, CompileError> {
    let snapshot = Snapshot::compile(config, meta, states)?;
    let metrics = metrics.compile(&snapshot);
    Ok(Loaded { snapshot, metrics })
}
