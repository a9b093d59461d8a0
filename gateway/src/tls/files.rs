//! Reading one certificate/key pair from PEM files, with the checks an operator needs before a
//! config goes live: the files exist and parse, the key belongs to the certificate, the
//! certificate has not expired (and a warning when it expires within [`super::EXPIRY_WARNING`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("{}: the private key does not match the certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: certificate expired {} ago", path.display(), human(*ago))]
    Expired { path: PathBuf, ago: Duration },
    #[error("{}: certificate is not valid yet", path.display())]
    NotYetValid { path: PathBuf },
    #[error("TLS setup: {0}")]
    Setup(String),
    /// Several certificate entries failed: every one is reported, one per line.
    #[error("{} certificate problems:\n  {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Several(Vec<TlsError>),
}

pub struct LoadedCert {
    pub key: CertifiedKey,
    /// Set when the certificate expires within the warning window.
    pub warning: Option<String>,
    /// The leaf's notAfter (exported as `meridian_tls_certificate_expiry_timestamp_seconds`).
    pub not_after: SystemTime,
}

/// Reads `cert` (PEM chain, leaf first) and `key` (PEM private key) and checks them at `now`.
pub fn load_certified_key(
    cert: &Path,
    key: &Path,
    now: SystemTime,
) -> Result<LoadedCert, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|source| TlsError::Read {
        path: cert.to_path_buf(),
        source,
    })?;
    let key_pem = std::fs::read(key).map_err(|source| TlsError::Read {
        path: key.to_path_buf(),
        source,
    })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_path_buf(),
            message: format!("bad PEM: {e}"),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::Pem {
            path: cert.to_path_buf(),
            message: "no CERTIFICATE block".into(),
        });
    };
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: key.to_path_buf(),
        message: format!("no usable private key: {e}"),
    })?;

    let (not_before, not_after) = validity(leaf).ok_or_else(|| TlsError::Pem {
        path: cert.to_path_buf(),
        message: "the certificate does not parse as X.509".into(),
    })?;
    if now < not_before {
        return Err(TlsError::NotYetValid {
            path: cert.to_path_buf(),
        });
    }
    if let Ok(ago) = now.duration_since(not_after) {
        return Err(TlsError::Expired {
            path: cert.to_path_buf(),
            ago,
        });
    }
    let left = not_after.duration_since(now).unwrap_or_default();
    let warning = (left < super::EXPIRY_WARNING)
        .then(|| format!("{}: certificate expires in {}", cert.display(), human(left)));

    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| TlsError::Pem {
            path: key.to_path_buf(),
            message: format!("unsupported private key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            })
        }
    }
    Ok(LoadedCert {
        key: certified,
        warning,
        not_after,
    })
}

/// (notBefore, notAfter) of a DER certificate.
fn validity(der: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let validity = parsed.validity();
    let at = |t: i64| -> SystemTime {
        match u64::try_from(t) {
            Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
            Err(_) => UNIX_EPOCH,
        }
    };
    Some((
        at(validity.not_before.timestamp()),
        at(validity.not_after.timestamp()),
    ))
}

fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 2 * 86400 {
        format!("{} days", secs / 86400)
    } else if secs >= 3600 {
        format!("{} hours", secs / 3600)
    } else {
        format!("{secs} seconds")
    }
}
