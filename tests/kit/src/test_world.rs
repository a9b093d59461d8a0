//! The test-world GeoIP database: [`PLACES`](meridian_geoip::test_world::PLACES) written as a
//! MaxMind-format (GeoLite2-City structure) database, so tests and the demo never need a
//! downloaded one. The table itself stays in `meridian-geoip`; everything of it is re-exported
//! here so callers find the world and its database in one place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
pub use meridian_geoip::test_world::*;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum WorldDbError {
    #[error("geoip writer: {0}")]
    Write(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

// GeoLite2-City record structure (the subset Meridian reads).
#[derive(Serialize)]
struct Record {
    continent: Code,
    country: Country,
    city: Names,
    location: Coordinates,
}
#[derive(Serialize)]
struct Code {
    code: &'static str,
    names: BTreeMap<&'static str, &'static str>,
}
#[derive(Serialize)]
struct Country {
    iso_code: &'static str,
    names: BTreeMap<&'static str, &'static str>,
}
#[derive(Serialize)]
struct Names {
    names: BTreeMap<&'static str, &'static str>,
}
#[derive(Serialize)]
struct Coordinates {
    latitude: f64,
    longitude: f64,
    accuracy_radius: u16,
}

/// Builds the test-world database (GeoLite2-City structure) in memory.
pub fn build() -> Result<Vec<u8>, WorldDbError> {
    let mut writer = mmdb_writer::Writer::builder("Meridian-Test-World-City")
        .description(&[("en", "Meridian local geo test world (loopback ranges)")])
        .build();
    for p in PLACES {
        let network: IpNet = p
            .network
            .parse()
            .map_err(|e| WorldDbError::Write(format!("{}: {e}", p.network)))?;
        let record = Record {
            continent: Code {
                code: p.continent,
                names: BTreeMap::new(),
            },
            country: Country {
                iso_code: p.country,
                names: BTreeMap::from([("en", p.country)]),
            },
            city: Names {
                names: BTreeMap::from([("en", p.city)]),
            },
            location: Coordinates {
                latitude: p.latitude,
                longitude: p.longitude,
                accuracy_radius: 50,
            },
        };
        writer
            .insert(network, &record)
            .map_err(|e| WorldDbError::Write(e.to_string()))?;
    }
    writer
        .to_bytes()
        .map_err(|e| WorldDbError::Write(e.to_string()))
}

/// Writes the test-world database to `path` (atomically: temp file then rename).
pub fn write(path: &Path) -> Result<(), WorldDbError> {
    let bytes = build()?;
    let io = |source| WorldDbError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("mmdb.tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_geoip::{CountryCode, GeoDb, GeoIp};
    use std::net::IpAddr;

    #[test]
    fn every_place_round_trips_through_maxminddb() {
        let db = GeoDb::from_bytes(build().expect("build")).expect("open");
        for p in PLACES {
            for host in [1u8, 77, 254] {
                let ip = p.client_addr(host);
                let loc = db.lookup(ip).expect("lookup").expect("record");
                assert_eq!(loc.country, CountryCode::parse(p.country), "{ip}");
                assert_eq!(loc.continent, CountryCode::parse(p.continent), "{ip}");
                let (lat, lon) = loc.coordinates.expect("coordinates");
                assert!((lat - p.latitude).abs() < 1e-9 && (lon - p.longitude).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn addresses_outside_the_world_are_unknown() {
        let db = GeoDb::from_bytes(build().expect("build")).expect("open");
        for ip in ["127.0.0.1", "127.1.1.1", "10.0.0.1", "::1", "8.8.8.8"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(db.lookup(ip).expect("lookup"), None, "{ip}");
        }
    }

    #[test]
    fn file_written_and_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("world.mmdb");
        write(&path).expect("write");
        assert_eq!(
            GeoIp::empty().lookup("127.15.0.9".parse().expect("ip")),
            None
        );
        let geo = GeoIp::open(&path).expect("open");
        let kr = geo.lookup("127.15.0.9".parse().expect("ip")).expect("KR");
        assert_eq!(kr.country.map(|c| c.to_string()).as_deref(), Some("KR"));
        let missing = GeoIp::open(&dir.path().join("missing.mmdb")).err();
        assert!(
            missing.is_some_and(|e| e.to_string().contains("missing.mmdb")),
            "the error names the file"
        );
        assert_eq!(db_type(&path), "Meridian-Test-World-City");
    }

    fn db_type(path: &std::path::Path) -> String {
        GeoDb::open(path).expect("open").database_type().to_string()
    }
}
