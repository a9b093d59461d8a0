//! GeoIP for Meridian: MaxMind-format lookups (`maxminddb`) behind a reloadable handle, and the
//! table of the local geo test world (its database writer is in `meridian-testkit`).

mod location;
mod reader;
pub mod test_world;

pub use location::{CountryCode, Location};
pub use reader::{GeoDb, GeoIp, GeoIpError};
