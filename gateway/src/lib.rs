//! Meridian's edge gateway: the routing core, the transport adapters around it, and the process glue.

pub mod core;
