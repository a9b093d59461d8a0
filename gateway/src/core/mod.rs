//! The routing core: pure data and functions. No sockets, no tokio, no clock — a request view and a
//! compiled [`Snapshot`] go in, a decision comes out, so every rule is unit-tested with plain values.

pub mod client;
pub mod decide;
pub mod geo;
pub mod models;
pub mod route_match;
pub mod select;
pub mod snapshot;
pub mod state;

pub use decide::{decide, decide_for_model, Refusal, RequestView, RouteDecision};
pub use select::RegionOrder;
pub use snapshot::{CompileError, Snapshot, SnapshotMeta, UpstreamStates};
