use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::location::{CountryCode, Location};

#[derive(Debug, thiserror::Error)]
pub enum GeoIpError {
    #[error("geoip database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: maxminddb::MaxMindDbError,
    },
    #[error("geoip database: {0}")]
    Invalid(#[from] maxminddb::MaxMindDbError),
}

/// One opened MaxMind-format database (GeoLite2-City or -Country structure).
pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl GeoDb {
    pub fn open(path: &Path) -> Result<Self, GeoIpError> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|source| GeoIpError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self { reader })
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GeoIpError> {
        Ok(Self {
            reader: maxminddb::Reader::from_source(bytes)?,
        })
    }

    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// Looks an address up. `Ok(None)` when the database has no record for it; a corrupt record is an error.
    pub fn lookup(&self, ip: IpAddr) -> Result<Option<Location>, GeoIpError> {
        let result = self.reader.lookup(ip)?;
        // Only the fields routing needs: decoding the full GeoIP2 City record (localized name maps)
        // allocates on every request. Works for City and Country databases alike.
        let Some(record) = result.decode::<SlimRecord<'_>>()? else {
            return Ok(None);
        };
        let coordinates = match record.location {
            Some(SlimLocation {
                latitude: Some(lat),
                longitude: Some(lon),
            }) => Some((lat, lon)),
            _ => None,
        };
        let location = Location {
            country: record
                .country
                .and_then(|c| c.iso_code)
                .and_then(CountryCode::parse),
            continent: record
                .continent
                .and_then(|c| c.code)
                .and_then(CountryCode::parse),
            coordinates,
        };
        Ok(location.is_known().then_some(location))
    }
}

#[derive(serde::Deserialize)]
struct SlimRecord<'a> {
    #[serde(borrow, default)]
    country: Option<SlimCountry<'a>>,
    #[serde(borrow, default)]
    continent: Option<SlimContinent<'a>>,
    #[serde(default)]
    location: Option<SlimLocation>,
}

#[derive(serde::Deserialize)]
struct SlimCountry<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct SlimContinent<'a> {
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct SlimLocation {
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
}

/// The database one config version uses: opened once, never changed, shared by every request of
/// that version (a new file comes with a new handle, so one request never sees two databases).
pub struct GeoIp {
    db: Option<GeoDb>,
}

impl GeoIp {
    /// A handle with no database: every lookup answers "unknown location".
    pub fn empty() -> Self {
        Self { db: None }
    }

    pub fn open(path: &Path) -> Result<Self, GeoIpError> {
        Ok(Self {
            db: Some(GeoDb::open(path)?),
        })
    }

    /// Unknown (`None`) when there is no database, no record, or the record is unreadable:
    /// a bad record must never fail a request, only lose its location.
    pub fn lookup(&self, ip: IpAddr) -> Option<Location> {
        self.db.as_ref()?.lookup(ip).ok().flatten()
    }
}
