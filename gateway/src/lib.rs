//! Meridian's edge gateway: the routing core, the transport adapters around it, and the process glue.

pub mod admin;
pub mod core;
pub mod demo;
pub mod dns;
pub mod edge;
pub mod httpd;
pub mod metrics;
pub mod origin;
pub mod proxy;
pub mod reload;
