//! Meridian's configuration: one TOML document (`schema = 1`) parsed with `deny_unknown_fields`,
//! then [`Config::validate`] collects *every* semantic error with its path
//! (`routes[1].regions[0]: unknown region "ap-sout-1"`).
//!
//! Pure data and functions (no I/O beyond reading a file, no async runtime): [`diff::diff`] between
//! versions and the inference catalog live here too. The config service that stores, serves and
//! fetches versions is the `meridian-config-service` crate.

pub mod diff;
mod duration;
mod error;
pub mod inference;
mod schema;
mod validate;

pub use diff::{diff, Change, ChangeKind};
pub use duration::HumanDuration;
pub use error::{ConfigError, ValidationError};
pub use schema::*;
pub use validate::parse_cidr;

use sha2::{Digest, Sha256};

impl Config {
    /// Parses and validates a document. Syntax and type errors come from the TOML parser (with line
    /// and column); semantic errors all come back together from `validate()`.
    pub fn from_toml_str(source: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(source).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&source)
    }
}

/// Hex sha256 of a config document's bytes: identifies exactly what an edge runs.
pub fn content_hash(source: &str) -> String {
    let digest = Sha256::digest(source.as_bytes());
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}
