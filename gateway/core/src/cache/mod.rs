//! The HTTP caching rules the edge cache follows, without the store: cache keys and variants
//! ([`key`]), request/response storability, freshness, invalidation and revalidation
//! ([`policy`]), and byte ranges answered from stored responses ([`range`]).

pub mod key;
pub mod policy;
pub mod range;

/// The response header that says what the cache did (`hit`, `miss`, `stale`, ...).
pub const HEADER_CACHE: &str = "x-meridian-cache";
/// [`HEADER_CACHE`] as a header name, made once at compile time (not validated per response).
pub const HEADER_CACHE_NAME: http::HeaderName = http::HeaderName::from_static(HEADER_CACHE);
