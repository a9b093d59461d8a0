//! The HTTP caching rules the edge cache follows, without the store: cache keys and variants
//! ([`key`]), and request/response storability, freshness and revalidation ([`policy`]).

pub mod key;
pub mod policy;

/// The response header that says what the cache did (`hit`, `miss`, `stale`, ...).
pub const HEADER_CACHE: &str = "x-meridian-cache";
