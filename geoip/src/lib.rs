//! GeoIP for Meridian: MaxMind-format lookups (`maxminddb`) behind a reloadable handle, and a writer
//! for the local geo test world (see `DESIGN.md`), so tests and the demo never need a downloaded database.

mod location;
mod reader;
pub mod test_world;

pub use location::{CountryCode, Location};
pub use reader::{GeoDb, GeoIp, GeoIpError};
