//! Meridian's edge gateway: the drivers that move bytes (TCP h1/h2 through Pingora's server, HTTP/3
//! through quinn + h3, GeoDNS), the one request pipeline they all call, the one upstream connector,
//! the cache store, config install, metrics, admin and the process glue. Decisions live in the
//! I/O-free `meridian-core` (see `docs/architecture.md`).
//!
//! Modules are crate-private unless the binary, the benchmarks or the end-to-end tests need them.

pub mod access_log;
pub(crate) mod admin;
pub mod cache;
pub(crate) mod clock;
pub(crate) mod connector;
/// The I/O-free core, under the name the gateway's modules use for it.
pub use meridian_core as core;
pub(crate) mod coarse_timer;
#[cfg(feature = "demo")]
pub mod demo;
pub mod dns;
pub mod edge;
pub mod front;
pub mod h3;
pub(crate) mod health;
pub mod housekeeping;
pub mod httpd;
pub(crate) mod inference;
pub(crate) mod metrics;
pub(crate) mod pipeline;
pub(crate) mod read_buffers;
pub(crate) mod reload;
pub(crate) mod status_page;
pub mod tls;
pub(crate) mod write_pair;
