//! The local geo test world of `DESIGN.md`: loopback source ranges mapped to countries, so that tests,
//! the demo and the load generator can place clients anywhere on one machine.

use std::collections::BTreeMap;
use std::path::Path;

use ipnet::IpNet;
use serde::Serialize;

use crate::reader::GeoIpError;

/// One country of the test world and the loopback range its clients come from.
#[derive(Clone, Copy, Debug)]
pub struct Place {
    pub network: &'static str,
    pub country: &'static str,
    pub continent: &'static str,
    pub city: &'static str,
    pub latitude: f64,
    pub longitude: f64,
    /// The region a client here should be routed to in `examples/local.toml` (nearest, or residency).
    pub expected_region: &'static str,
}

impl Place {
    /// A source address inside this place's range (`127.X.0.<host>`).
    pub fn client_addr(&self, host: u8) -> std::net::IpAddr {
        let second = self
            .network
            .split('.')
            .nth(1)
            .and_then(|s| s.parse::<u8>().ok())
            .unwrap_or(0);
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, second, 0, host.max(1)))
    }
}

// Kuala Lumpur sits at latitude 3.14: a coordinate, not an approximation of pi.
#[allow(clippy::approx_constant)]
pub const PLACES: &[Place] = &[
    place(
        "127.10.0.0/16",
        "MX",
        "NA",
        "Mexico City",
        19.43,
        -99.13,
        "mx-central",
    ),
    place(
        "127.11.0.0/16",
        "US",
        "NA",
        "New York",
        40.71,
        -74.01,
        "us-east",
    ),
    place(
        "127.12.0.0/16",
        "SG",
        "AS",
        "Singapore",
        1.35,
        103.82,
        "ap-southeast-1",
    ),
    place(
        "127.13.0.0/16",
        "MY",
        "AS",
        "Kuala Lumpur",
        3.14,
        101.69,
        "ap-southeast-3",
    ),
    place(
        "127.14.0.0/16",
        "TH",
        "AS",
        "Bangkok",
        13.75,
        100.50,
        "ap-southeast-7",
    ),
    place(
        "127.15.0.0/16",
        "KR",
        "AS",
        "Seoul",
        37.57,
        126.98,
        "ap-northeast-2",
    ),
    place(
        "127.16.0.0/16",
        "PH",
        "AS",
        "Manila",
        14.60,
        120.98,
        "ap-southeast-6",
    ),
    place(
        "127.17.0.0/16",
        "DE",
        "EU",
        "Berlin",
        52.52,
        13.40,
        "eu-central-1",
    ),
    place(
        "127.18.0.0/16",
        "JP",
        "AS",
        "Tokyo",
        35.68,
        139.69,
        "ap-northeast-2",
    ),
];

const fn place(
    network: &'static str,
    country: &'static str,
    continent: &'static str,
    city: &'static str,
    latitude: f64,
    longitude: f64,
    expected_region: &'static str,
) -> Place {
    Place {
        network,
        country,
        continent,
        city,
        latitude,
        longitude,
        expected_region,
    }
}

pub fn place_for_country(country: &str) -> Option<&'static Place> {
    PLACES
        .iter()
        .find(|p| p.country.eq_ignore_ascii_case(country))
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
pub fn build() -> Result<Vec<u8>, GeoIpError> {
    let mut writer = mmdb_writer::Writer::builder("Meridian-Test-World-City")
        .description(&[("en", "Meridian local geo test world (loopback ranges)")])
        .build();
    for p in PLACES {
        let network: IpNet = p
            .network
            .parse()
            .map_err(|e| GeoIpError::Write(format!("{}: {e}", p.network)))?;
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
            .map_err(|e| GeoIpError::Write(e.to_string()))?;
    }
    writer
        .to_bytes()
        .map_err(|e| GeoIpError::Write(e.to_string()))
}

/// Writes the test-world database to `path` (atomically: temp file then rename).
pub fn write(path: &Path) -> Result<(), GeoIpError> {
    let bytes = build()?;
    let io = |source| GeoIpError::Io {
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
    use crate::{CountryCode, GeoDb, GeoIp};
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
