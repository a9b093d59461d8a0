//! Meridian's edge gateway: the routing core, the transport adapters around it, and the process glue.

pub mod access_log;
pub mod admin;
pub mod cache;
pub mod clock;
pub mod connector;
/// The I/O-free core, under the name the gateway's modules have always used for it.
pub use meridian_core as core;
pub mod demo;
pub mod dns;
pub mod edge;
pub mod h3;
pub mod health;
pub mod httpd;
pub mod inference;
pub mod metrics;
pub mod model_server;
pub mod origin;
pub mod pipeline;
pub mod proxy;
pub mod reload;
pub mod status_page;
pub mod tls;
