//! TLS termination shared by the TCP listener (Pingora + rustls) and the QUIC front (quinn):
//! certificates are read and checked here (the config crate only checks shape) and compiled into an
//! SNI table that is part of each installed version; one [`CertResolver`] serves the table of the
//! version installed now — open connections keep the certificate they got.
//!
//! Pingora 0.9's rustls `TlsSettings::set_cert_resolver` accepts our resolver, so the TCP listener
//! needs no fork or doc-hidden hook; the handshake metric comes from its post-handshake callback.

pub mod files;

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use meridian_config::TlsSection;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::ALPN;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::metrics::{EdgeMetrics, Protocol};
use crate::reload::SnapshotStore;

pub use files::{load_certified_key, LoadedCert, TlsError};

/// A certificate is reported (logged) when it expires within this long.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The SNI table: exact host names, one-label wildcards (`*.example.test` covers `a.example.test`,
/// not `a.b.example.test`, as a client checks it), and an optional default.
#[derive(Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain (`example.test` for `*.example.test`).
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// (first host of the certificate entry, leaf notAfter), for the expiry metric.
    expiries: Vec<(String, SystemTime)>,
    /// What this table was built from, to notice changes (section and file modification times).
    source: Option<(TlsSection, Vec<Option<SystemTime>>)>,
}

impl CertTable {
    /// Reads and checks every certificate of `section`; relative paths are resolved against
    /// `base`. Returns the table and warnings (certificates expiring soon).
    pub fn load(
        section: &TlsSection,
        base: Option<&Path>,
    ) -> Result<(CertTable, Vec<String>), TlsError> {
        let mut table = CertTable::default();
        let mut warnings = Vec::new();
        let mut errors = Vec::new();
        for entry in &section.certificates {
            let cert_path = resolve(base, &entry.cert);
            let key_path = resolve(base, &entry.key);
            let loaded = match load_certified_key(&cert_path, &key_path, SystemTime::now()) {
                Ok(loaded) => loaded,
                // Keep going: the operator gets every broken file in one answer.
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            if let Some(warning) = loaded.warning {
                warnings.push(warning);
            }
            if let Some(first) = entry.hosts.first() {
                table
                    .expiries
                    .push((first.to_ascii_lowercase(), loaded.not_after));
            }
            let key = Arc::new(loaded.key);
            for host in &entry.hosts {
                let host = host.to_ascii_lowercase();
                match host.strip_prefix("*.") {
                    Some(parent) => table.wildcard.insert(parent.to_string(), Arc::clone(&key)),
                    None => table.exact.insert(host, Arc::clone(&key)),
                };
            }
            if entry.default {
                table.default = Some(Arc::clone(&key));
            }
        }
        match errors.len() {
            0 => {}
            1 => return Err(errors.remove(0)),
            _ => return Err(TlsError::Several(errors)),
        }
        table.source = Some((section.clone(), modification_times(section, base)));
        Ok((table, warnings))
    }

    /// Each certificate entry's first host and its leaf's notAfter.
    pub fn expiries(&self) -> &[(String, SystemTime)] {
        &self.expiries
    }

    /// The certificate for `sni` (any case, optional trailing dot), else the default.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let found = sni.and_then(|name| {
            let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
            self.exact.get(&name).cloned().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent).cloned()
            })
        });
        found.or_else(|| self.default.clone())
    }

    /// Was this table built from `section` and the same file versions?
    pub(crate) fn is_current(&self, section: &TlsSection, base: Option<&Path>) -> bool {
        self.source.as_ref().is_some_and(|(built, times)| {
            built == section && *times == modification_times(section, base)
        })
    }

    /// Was this table built from `section` (whatever the files hold now)?
    pub(crate) fn built_from(&self, section: &TlsSection) -> bool {
        self.source
            .as_ref()
            .is_some_and(|(built, _)| built == section)
    }
}

fn resolve(base: Option<&Path>, path: &str) -> PathBuf {
    let path = Path::new(path);
    match base {
        Some(base) if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    }
}

fn modification_times(section: &TlsSection, base: Option<&Path>) -> Vec<Option<SystemTime>> {
    section
        .certificates
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .map(|p| {
            std::fs::metadata(resolve(base, p))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect()
}

/// Serves certificates from the table of the version installed now (see [`SnapshotStore`]); unknown
/// SNI without a default gets none, which makes rustls abort the handshake. Established
/// connections keep the certificate they got.
pub struct CertResolver {
    store: Arc<SnapshotStore>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertResolver")
    }
}

impl CertResolver {
    pub fn new(store: Arc<SnapshotStore>) -> Arc<Self> {
        Arc::new(Self { store })
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.store.load();
        loaded.certificates.as_ref()?.lookup(hello.server_name())
    }
}

/// Installs the process-wide rustls provider (`ring`) once; safe to call any number of times.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TCP listener's settings: our resolver, TLS 1.2 and 1.3 (Pingora's rustls builder allows
/// exactly those), ALPN `h2` then `http/1.1`, and a handshake observer for the metric.
pub fn tcp_settings(resolver: Arc<CertResolver>) -> Result<TlsSettings, TlsError> {
    let mut settings = TlsSettings::with_callbacks(Box::new(HandshakeObserver))
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    settings.set_cert_resolver(resolver);
    settings.set_alpn(ALPN::H2H1);
    Ok(settings)
}

/// The QUIC server's rustls config: the same resolver, TLS 1.3 only (QUIC requires it), ALPN `h3`,
/// no 0-RTT (early data can be replayed).
pub fn quic_server_config(resolver: Arc<CertResolver>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h3".to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// Marks a TCP TLS connection (in Pingora's digest) so its handshake is counted once, with the
/// ALPN the connection ended up speaking, on its first request.
struct HandshakeMark {
    version: &'static str,
    counted: AtomicBool,
}

struct HandshakeObserver;

#[async_trait]
impl TlsAccept for HandshakeObserver {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let version = match tls.version() {
            Some("TLSv1_3") | Some("TLSv1.3") => "TLSv1.3",
            Some("TLSv1_2") | Some("TLSv1.2") => "TLSv1.2",
            _ => "other",
        };
        Some(Arc::new(HandshakeMark {
            version,
            counted: AtomicBool::new(false),
        }))
    }
}

/// Counts a TCP connection's TLS handshake once, with the protocol it ended up speaking.
pub fn count_handshake(
    ssl: Option<&pingora::protocols::tls::SslDigest>,
    protocol: Protocol,
    metrics: &EdgeMetrics,
) {
    if let Some(mark) = ssl.and_then(|d| d.extension.get::<HandshakeMark>()) {
        if !mark.counted.swap(true, Ordering::Relaxed) {
            let alpn = match protocol {
                Protocol::H2 => "h2",
                _ => "http/1.1",
            };
            metrics
                .tls
                .handshakes
                .with_label_values(&[mark.version, alpn])
                .inc();
        }
    }
}

/// Notices rotated certificate files (every `poll`) and has the store publish them: a document's
/// own `[tls]` changes are installed with the document. A table that fails to load is logged and
/// counted once per distinct problem, and the previous one keeps serving.
pub async fn follow(
    store: Arc<SnapshotStore>,
    poll: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(poll) => {}
        }
        match store.reload_certificates() {
            Ok(reloaded) => {
                if reloaded {
                    last_error = None;
                }
            }
            Err(e) => {
                let message = e.to_string();
                // The files stay broken until someone fixes them: count and log each new problem once.
                if last_error.as_deref() != Some(message.as_str()) {
                    store
                        .metrics()
                        .tls
                        .reloads
                        .with_label_values(&["error"])
                        .inc();
                    tracing::error!(
                        "TLS certificates not reloaded, keeping the previous ones: {message}"
                    );
                    last_error = Some(message);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_config::TlsCertificate;

    #[test]
    fn sni_lookup_prefers_exact_then_one_label_wildcard_then_default() {
        install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = meridian_testkit::devcerts::DevCa::new("unit").expect("ca");
        let mut section = TlsSection::default();
        for (name, hosts, default) in [
            ("exact", vec!["a.example.test"], false),
            ("wild", vec!["*.example.test"], false),
            ("fallback", vec!["other.test"], true),
        ] {
            ca.leaf(&hosts)
                .expect("leaf")
                .write(dir.path(), name)
                .expect("write");
            section.certificates.push(TlsCertificate {
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                cert: format!("{name}.crt"),
                key: format!("{name}.key"),
                default,
            });
        }
        let (table, warnings) = CertTable::load(&section, Some(dir.path())).expect("load");
        assert!(warnings.is_empty());
        let cert = |sni: Option<&str>| table.lookup(sni).map(|k| k.cert[0].as_ref().to_vec());
        let exact = cert(Some("a.example.test"));
        let wild = cert(Some("b.example.test"));
        let fallback = cert(Some("other.test"));
        assert!(exact.is_some() && wild.is_some() && fallback.is_some());
        assert_ne!(exact, wild);
        assert_eq!(
            cert(Some("A.Example.Test.")),
            exact,
            "case and trailing dot"
        );
        assert_eq!(
            cert(Some("x.y.example.test")),
            fallback,
            "wildcards cover one label"
        );
        assert_eq!(cert(Some("example.test")), fallback, "nor the apex");
        assert_eq!(cert(None), fallback, "no SNI");
        assert!(table.is_current(&section, Some(dir.path())));
        section.certificates.pop();
        let (table, _) = CertTable::load(&section, Some(dir.path())).expect("load");
        assert!(
            table.lookup(Some("nobody.test")).is_none(),
            "no default: refused"
        );
    }
}
