//! The local geo test world: loopback source ranges mapped to countries, so that tests, the demo
//! and the load generator can place clients anywhere on one machine (all of 127.0.0.0/8 is
//! loopback on Linux). Only the table lives here, because the routing core's unit tests use it;
//! the MaxMind-format writer for it is in `meridian-testkit`.

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
