//! One atomic install. Every config version — the first one at start, a changed file, SIGHUP, a
//! version from the config service, rotated certificate files — is compiled here into one
//! [`Loaded`] that holds everything the version needs, and published with one `ArcSwap` store. A
//! version any part of which fails to compile is refused whole: routing, certificates, the DNS zone
//! and the GeoIP database all stay on the previous version.
//! Sources of new versions: the config service (`control`), or the local file (`file`).

pub mod control;
pub mod file;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use meridian_config::{Config, ConfigError, TlsSection};
use meridian_geoip::{GeoIp, GeoIpError};

use crate::cache::{ResponseCache, RoutePolicy};
use crate::core::{CompileError, Snapshot, SnapshotMeta, UpstreamStates};
use crate::dns::{Zone, ZoneError};
use crate::metrics::{EdgeMetrics, SnapshotMetrics};
use crate::tls::{CertTable, TlsError};

/// One installed version, compiled whole: a request (or a DNS query, or a TLS handshake) loads it
/// once and sees one consistent version of everything.
pub struct Loaded {
    pub snapshot: Snapshot,
    /// The version's pre-resolved metric series.
    pub metrics: SnapshotMetrics,
    /// Indexed like `snapshot.routes`: the route's cache policy, `None` when it does not cache.
    cache: Vec<Option<Arc<RoutePolicy>>>,
    /// The SNI certificate table, when this edge terminates TLS.
    pub certificates: Option<Arc<CertTable>>,
    /// The GeoDNS zone, when the document has `[dns]`.
    pub zone: Option<Arc<Zone>>,
    /// The GeoIP database requests of this version locate their clients with (empty without
    /// `geoip.database`).
    pub geoip: Arc<GeoIp>,
}

impl Loaded {
    /// The cache policy of route `route`; `None` when the route (or the edge) does not cache.
    pub fn cache_policy(&self, route: usize) -> Option<&Arc<RoutePolicy>> {
        self.cache.get(route)?.as_ref()
    }
}

/// One reason a version cannot be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Parse(#[from] ConfigError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The document's `[tls]` certificates cannot be loaded on this edge, so routing never moves
    /// to hosts whose certificates are not being served.
    #[error("tls.certificates: {0}")]
    Certificates(#[from] TlsError),
    #[error(transparent)]
    Zone(#[from] ZoneError),
    #[error(transparent)]
    GeoIp(#[from] GeoIpError),
}

/// Every reason a version was refused (the operator fixes them all in one go).
#[derive(Debug)]
pub struct InstallErrors(pub Vec<InstallError>);

impl std::fmt::Display for InstallErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InstallErrors {}

impl<E: Into<InstallError>> From<E> for InstallErrors {
    fn from(error: E) -> Self {
        Self(vec![error.into()])
    }
}

impl InstallErrors {
    /// The `result` label of `meridian_config_reloads_total` for this refusal: `error` when the
    /// document itself is fine but could not be compiled, `invalid` otherwise.
    pub fn label(&self) -> &'static str {
        let internal =
            |e: &InstallError| matches!(e, InstallError::Compile(CompileError::Unusable { .. }));
        if self.0.iter().all(internal) {
            "error"
        } else {
            "invalid"
        }
    }
}

/// What belongs to the process rather than to a config version: fixed at start, used by every install.
pub struct Process {
    pub metrics: Arc<EdgeMetrics>,
    /// The one response cache of the process (entries survive installs); cache policies of each
    /// version are compiled against it.
    pub cache: Option<ResponseCache>,
    /// Relative paths in a document (GeoIP database, certificates) resolve against this directory.
    pub base_dir: Option<PathBuf>,
    /// When following a config service: the boot file's sections every document's are replaced with.
    pub pinned: Option<Pinned>,
}

/// `[edge]` (pop name, listeners, limits) and `[control]` belong to the process's boot file when it
/// follows a config service: a fleet shares one document, but every edge has its own name.
#[derive(Clone, Debug)]
pub struct Pinned {
    pub edge: meridian_config::Edge,
    pub control: Option<meridian_config::Control>,
}

impl Pinned {
    /// The sections of `boot` that stay with the process.
    pub fn from_boot(boot: &Config) -> Self {
        Self {
            edge: boot.edge.clone(),
            control: boot.control.clone(),
        }
    }
}

/// Compiles versions; holds what outlives them.
struct Installer {
    states: UpstreamStates,
    metrics: Arc<EdgeMetrics>,
    cache: Option<ResponseCache>,
    base_dir: Option<PathBuf>,
    pinned: Option<Pinned>,
    /// This edge terminates TLS (it started with `edge.https`): every version carries a
    /// certificate table.
    serves_tls: bool,
}

/// Why a version is compiled: certificate files are only re-read when they are the reason.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Document,
    CertificateFiles,
}

pub struct SnapshotStore {
    current: ArcSwap<Loaded>,
    installer: Installer,
    /// One install at a time: each compiles against (and reuses parts of) the version it replaces.
    installing: Mutex<()>,
    /// Bumped on every publish, so subsystems that act on a new version (GeoDNS, health checkers)
    /// pick it up off the request path.
    generation: tokio::sync::watch::Sender<u64>,
}

impl SnapshotStore {
    /// Compiles the first version exactly as later ones are compiled; the edge does not start
    /// when it is refused.
    pub fn new(
        config: Config,
        meta: SnapshotMeta,
        process: Process,
    ) -> Result<Self, InstallErrors> {
        let Process {
            metrics,
            cache,
            base_dir,
            pinned,
        } = process;
        let https = match &pinned {
            Some(pinned) => &pinned.edge.https,
            None => &config.edge.https,
        };
        let installer = Installer {
            serves_tls: https.is_some(),
            states: UpstreamStates::default(),
            metrics,
            cache,
            base_dir,
            pinned,
        };
        let version = meta.version;
        let loaded = installer.compile(config, meta, None, Trigger::Document)?;
        if let Some(table) = &loaded.certificates {
            installer.metrics.tls.record_certificates(table.expiries());
        }
        installer.metrics.config.installed(version);
        Ok(Self {
            current: ArcSwap::from_pointee(loaded),
            installer,
            installing: Mutex::new(()),
            generation: tokio::sync::watch::channel(0).0,
        })
    }

    /// The version a request uses from start to end (in-flight requests keep theirs across swaps).
    pub fn load(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Compiles everything `config` needs and publishes it; on error nothing changes. Counts a
    /// successful install (a refusal is counted by the caller, once, with its label).
    pub fn install(
        &self,
        config: Config,
        meta: SnapshotMeta,
    ) -> Result<Arc<Loaded>, InstallErrors> {
        let _one = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.load();
        let version = meta.version;
        let loaded = self
            .installer
            .compile(config, meta, Some(&current), Trigger::Document)?;
        let loaded = self.publish(loaded, &current);
        self.installer.metrics.config.installed(version);
        Ok(loaded)
    }

    /// Re-reads the certificate files when they changed on disk since the serving table was built,
    /// and publishes the current document again with the new table. `Ok(false)`: nothing changed.
    pub fn reload_certificates(&self) -> Result<bool, InstallErrors> {
        let _one = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.load();
        let base = self.installer.base_dir.as_deref();
        let unchanged = current
            .certificates
            .as_ref()
            .is_none_or(|table| table.is_current(&current.snapshot.config.tls, base));
        if unchanged {
            return Ok(false);
        }
        let config = current.snapshot.config.clone();
        let meta = current.snapshot.meta.clone();
        let loaded =
            self.installer
                .compile(config, meta, Some(&current), Trigger::CertificateFiles)?;
        self.publish(loaded, &current);
        Ok(true)
    }

    fn publish(&self, loaded: Loaded, previous: &Loaded) -> Arc<Loaded> {
        let loaded = Arc::new(loaded);
        self.current.store(Arc::clone(&loaded));
        self.generation.send_modify(|g| *g += 1);
        let new_table = match (&loaded.certificates, &previous.certificates) {
            (Some(new), Some(old)) => !Arc::ptr_eq(new, old),
            (new, _) => new.is_some(),
        };
        if let (true, Some(table)) = (new_table, &loaded.certificates) {
            let tls = &self.installer.metrics.tls;
            tls.record_certificates(table.expiries());
            tls.reloads.with_label_values(&["ok"]).inc();
            tracing::info!("TLS certificates reloaded");
        }
        loaded
    }

    /// Changes whenever a new version is published (the value is a generation counter).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn metrics(&self) -> &Arc<EdgeMetrics> {
        &self.installer.metrics
    }

    /// The process's response cache (fleet-wide purges apply to it).
    pub fn cache(&self) -> Option<&ResponseCache> {
        self.installer.cache.as_ref()
    }
}

impl Installer {
    /// Compiles every part of a version; parts whose inputs did not change since `current` are
    /// reused (the GeoIP database is opened only when its path changed, the zone compiled only
    /// when `[dns]` or `[[pops]]` changed, certificates read only when `[tls]` changed or, for
    /// [`Trigger::CertificateFiles`], their files did).
    fn compile(
        &self,
        mut config: Config,
        meta: SnapshotMeta,
        current: Option<&Loaded>,
        trigger: Trigger,
    ) -> Result<Loaded, InstallErrors> {
        if let Some(pinned) = &self.pinned {
            config.edge = pinned.edge.clone();
            config.control = pinned.control.clone();
        }
        resolve_paths(&mut config, self.base_dir.as_deref());
        let mut errors = Vec::new();
        let valid = match config.validate() {
            Ok(()) => true,
            Err(invalid) => {
                errors.push(CompileError::Invalid(invalid).into());
                false
            }
        };
        let certificates = self
            .certificates(&config.tls, current, trigger)
            .map_err(|e| errors.push(e.into()))
            .ok();
        let geoip = geoip(&config, current)
            .map_err(|e| errors.push(e.into()))
            .ok();
        // The zone compiler expects a validated document (its errors would repeat validation's).
        let zone = if valid {
            zone(&config, current)
                .map_err(|e| errors.push(e.into()))
                .ok()
        } else {
            None
        };
        let (Some(certificates), Some(geoip), Some(zone), true) =
            (certificates, geoip, zone, errors.is_empty())
        else {
            return Err(InstallErrors(errors));
        };
        // Last, because compiling the snapshot forgets the runtime state of upstreams the new
        // version drops: a version refused for another part must leave that state untouched.
        let snapshot = Snapshot::compile(config, meta, &self.states)?;
        let metrics = self.metrics.compile(&snapshot);
        let cache = self.cache_policies(&snapshot);
        Ok(Loaded {
            snapshot,
            metrics,
            cache,
            certificates,
            zone,
            geoip,
        })
    }

    fn certificates(
        &self,
        section: &TlsSection,
        current: Option<&Loaded>,
        trigger: Trigger,
    ) -> Result<Option<Arc<CertTable>>, TlsError> {
        if !self.serves_tls {
            return Ok(None);
        }
        let base = self.base_dir.as_deref();
        if let Some(table) = current.and_then(|c| c.certificates.as_ref()) {
            // A new document with the same `[tls]` keeps the serving table: rotated files are
            // the poller's business, and their errors never refuse a document that did not
            // touch them.
            let reuse = match trigger {
                Trigger::Document => table.built_from(section),
                Trigger::CertificateFiles => table.is_current(section, base),
            };
            if reuse {
                return Ok(Some(Arc::clone(table)));
            }
        }
        let (table, warnings) = CertTable::load(section, base)?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        Ok(Some(Arc::new(table)))
    }

    /// Each caching route's policy, with its counters resolved against the process's cache.
    fn cache_policies(&self, snapshot: &Snapshot) -> Vec<Option<Arc<RoutePolicy>>> {
        let Some(cache) = &self.cache else {
            return Vec::new();
        };
        snapshot
            .config
            .routes
            .iter()
            .map(|route| {
                if !route.cache.enabled {
                    return None;
                }
                let policy = cache.route_policy(&route.name, &route.cache);
                policy.rules().enabled.then(|| Arc::new(policy))
            })
            .collect()
    }
}

/// The version's GeoIP database: the current one when the path is the same, else opened now.
fn geoip(config: &Config, current: Option<&Loaded>) -> Result<Arc<GeoIp>, GeoIpError> {
    let path = &config.geoip.database;
    if let Some(current) = current.filter(|c| &c.snapshot.config.geoip.database == path) {
        return Ok(Arc::clone(&current.geoip));
    }
    Ok(Arc::new(match path {
        Some(path) => GeoIp::open(Path::new(path))?,
        None => GeoIp::empty(),
    }))
}

/// The version's GeoDNS zone (`None` without `[dns]`): the current one when `[dns]` and
/// `[[pops]]` are the same, else compiled now.
fn zone(config: &Config, current: Option<&Loaded>) -> Result<Option<Arc<Zone>>, ZoneError> {
    if config.dns.is_none() {
        return Ok(None);
    }
    if let Some(current) = current {
        let same = current.snapshot.config.dns == config.dns
            && current.snapshot.config.pops == config.pops;
        if let (true, Some(zone)) = (same, &current.zone) {
            return Ok(Some(Arc::clone(zone)));
        }
    }
    Ok(Some(Arc::new(Zone::compile(config)?)))
}

/// The one path every new document takes, whatever its source: parse, then [`SnapshotStore::install`].
/// A refused document is logged with every error and counted once; the edge keeps its version.
pub fn apply_document(
    store: &SnapshotStore,
    source: &str,
    version: u64,
) -> Result<(), InstallErrors> {
    let hash = meridian_config::content_hash(source);
    let current = store.load();
    if current.snapshot.meta.hash == hash && current.snapshot.meta.version == version {
        return Ok(());
    }
    let result = Config::from_toml_str(source)
        .map_err(InstallErrors::from)
        .and_then(|config| {
            if store.installer.pinned.is_none() {
                warn_about_restart_only_changes(&current.snapshot.config, &config);
            }
            store.install(config, SnapshotMeta { version, hash })
        });
    match result {
        Ok(_) => {
            tracing::info!(version, "config installed");
            Ok(())
        }
        Err(errors) => {
            store
                .metrics()
                .config
                .reloads
                .with_label_values(&[errors.label()])
                .inc();
            tracing::error!(
                version,
                "config refused, still serving the previous one: {errors}"
            );
            Err(errors)
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `examples/local.toml` without what needs files or sockets (TLS, the GeoIP database).
    fn document() -> Config {
        let mut config =
            Config::from_toml_str(crate::demo::LOCAL_CONFIG).expect("examples/local.toml");
        config.edge.https = None;
        config.edge.h3 = false;
        config.geoip.database = None;
        config
    }

    fn store(config: Config, pinned: Option<Pinned>) -> SnapshotStore {
        let metrics = Arc::new(EdgeMetrics::new().expect("metrics"));
        let cache = ResponseCache::new(&config.edge.cache, metrics.registry()).expect("cache");
        let process = Process {
            metrics,
            cache: Some(cache),
            base_dir: None,
            pinned,
        };
        let meta = SnapshotMeta {
            version: 1,
            hash: "one".into(),
        };
        SnapshotStore::new(config, meta, process).expect("version 1 installs")
    }

    fn meta(version: u64) -> SnapshotMeta {
        SnapshotMeta {
            version,
            hash: version.to_string(),
        }
    }

    /// A record name every document rule accepts, but too long for a DNS name under the zone.
    fn uncompilable_record() -> meridian_config::DnsRecord {
        meridian_config::DnsRecord {
            name: ["a", "b", "c"].map(|l| l.repeat(63)).join(".") + "." + &"d".repeat(50),
            pops: Vec::new(),
            weights: Default::default(),
        }
    }

    /// Where the `api` route sends clients of unknown location.
    fn api_default(loaded: &Loaded) -> &str {
        let route = loaded.snapshot.routes.iter().find(|r| r.name == "api");
        let region = route.expect("api route").default_region;
        &loaded.snapshot.regions[usize::from(region)].name
    }

    /// `document()` with the routing change the tests install.
    fn moved() -> Config {
        let mut config = document();
        let api = config.routes.iter_mut().find(|r| r.name == "api");
        api.expect("api route").default_region = Some("eu-central-1".into());
        config
    }

    #[test]
    fn a_version_with_a_broken_part_changes_nothing_and_names_every_error() {
        let store = store(document(), None);
        let before = store.load();
        let generation = *store.subscribe().borrow();
        assert_eq!(api_default(&before), "us-east");
        let mut next = moved();
        next.dns
            .as_mut()
            .expect("[dns]")
            .records
            .push(uncompilable_record());
        next.geoip.database = Some("/nonexistent/world.mmdb".into());

        let errors = store.install(next.clone(), meta(2)).err().expect("refused");
        assert_eq!(errors.label(), "invalid");
        assert!(
            matches!(
                errors.0.as_slice(),
                [InstallError::GeoIp(_), InstallError::Zone(_)]
            ),
            "{errors}"
        );
        assert!(
            errors.to_string().contains("/nonexistent/world.mmdb"),
            "{errors}"
        );
        assert!(errors.to_string().contains("dns.records[3]"), "{errors}");
        let after = store.load();
        assert!(Arc::ptr_eq(&before, &after), "nothing was published");
        assert_eq!(*store.subscribe().borrow(), generation);

        // An invalid document is reported with its other broken parts too.
        next.routes[0].regions = meridian_config::RegionSet::List(vec!["nowhere".into()]);
        let errors = store.install(next.clone(), meta(2)).err().expect("refused");
        assert!(
            matches!(
                errors.0.as_slice(),
                [
                    InstallError::Compile(CompileError::Invalid(_)),
                    InstallError::GeoIp(_)
                ]
            ),
            "{errors}"
        );

        // The same routing change without the broken parts lands, in one piece.
        assert_eq!(api_default(&store.load()), "us-east");
        let good = store.install(moved(), meta(2)).expect("installs");
        assert_eq!(good.snapshot.meta.version, 2);
        assert!(Arc::ptr_eq(&good, &store.load()));
        assert_eq!(api_default(&good), "eu-central-1");
        assert_eq!(*store.subscribe().borrow(), generation + 1);
    }

    #[test]
    fn unchanged_parts_are_reused_and_changed_ones_rebuilt() {
        let store = store(document(), None);
        let first = store.load();
        let mut next = moved();
        let second = store.install(next.clone(), meta(2)).expect("installs");
        let zone = |l: &Loaded| Arc::clone(l.zone.as_ref().expect("zone"));
        assert!(
            Arc::ptr_eq(&zone(&first), &zone(&second)),
            "same [dns]: same zone"
        );
        assert!(
            Arc::ptr_eq(&first.geoip, &second.geoip),
            "same path: same database"
        );

        next.pops[0].addresses = vec!["127.9.9.9".into()];
        let third = store.install(next.clone(), meta(3)).expect("installs");
        assert!(
            !Arc::ptr_eq(&zone(&second), &zone(&third)),
            "[[pops]] changed"
        );

        next.dns = None;
        let fourth = store.install(next, meta(4)).expect("installs");
        assert!(fourth.zone.is_none());
    }

    #[test]
    fn cache_policies_are_compiled_with_the_version() {
        let store = store(document(), None);
        let loaded = store.load();
        for (i, route) in loaded.snapshot.config.routes.iter().enumerate() {
            assert_eq!(
                loaded.cache_policy(i).is_some(),
                route.cache.enabled,
                "{}",
                route.name
            );
        }
        assert!(loaded.cache_policy(usize::MAX).is_none());
    }

    #[test]
    fn a_followed_document_keeps_the_boot_files_edge_and_control() {
        let mut boot = document();
        boot.edge.pop = "boot-pop".into();
        boot.control = Some(meridian_config::Control {
            url: "http://127.0.0.1:1".into(),
            token_file: None,
            cache_dir: "cache".into(),
            wait: meridian_config::HumanDuration::secs(30),
            ..Default::default()
        });
        let pinned = Pinned::from_boot(&boot);
        let mut shared = document();
        shared.edge.pop = "fleet-pop".into();
        let store = store(shared.clone(), Some(pinned));
        assert_eq!(store.load().snapshot.pop, "boot-pop", "at start");
        shared.routes = moved().routes;
        let loaded = store.install(shared, meta(2)).expect("installs");
        assert_eq!(loaded.snapshot.pop, "boot-pop", "on every install");
        assert_eq!(loaded.snapshot.config.control, boot.control);
    }
}
