//! Meridian's edge gateway: the routing core, the transport adapters around it, and the process glue.

pub mod access_log;
pub mod admin;
pub mod cache;
pub mod clock;
pub mod core;
#[cfg(feature = "demo")]
pub mod demo;
pub mod dns;
pub mod edge;
pub mod h3;
pub mod health;
pub mod httpd;
pub mod inference;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod status_page;
pub mod tls;
pub mod upstream_client;
