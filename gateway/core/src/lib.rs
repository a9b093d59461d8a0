//! Meridian's I/O-free core: pure data and functions. No sockets, no tokio, no clock — a request view
//! and a compiled [`Snapshot`] go in, a decision comes out, so every rule is unit-tested with plain
//! values. The drivers in `meridian-gateway` (TCP h1/h2, HTTP/3, GeoDNS) move bytes and call this.
//!
//! - routing: [`route_match`], [`client`] (who the client is), [`decide`] and [`select`] (which
//!   regions, in what order), [`models`] (inference models), [`snapshot`] (compiled config);
//! - runtime state that outlives snapshots: [`state`] (atomics only);
//! - one request's life: [`exchange`] (head accepted → tries → upstream head/error → finish);
//! - HTTP caching rules: [`cache`] (RFC 9111 policy and cache keys);
//! - [`inference`]: the OpenAI-compatible surface, callers, models;
//! - [`headers`]: which headers a proxy must not forward;
//! - [`http1`]: HTTP/1.1 framing and request-head rules (RFC 9112), for the client and upstream sides.

pub mod cache;
pub mod client;
pub mod decide;
pub mod exchange;
pub mod fast_hash;
pub mod geo;
pub mod headers;
pub mod http1;
pub mod inference;
pub mod models;
pub mod route_match;
pub mod select;
pub mod snapshot;
pub mod state;

pub use decide::{decide, decide_for_model, Refusal, RequestView, RouteDecision};
pub use select::RegionOrder;
pub use snapshot::{CompileError, Snapshot, SnapshotMeta, UpstreamStates};
