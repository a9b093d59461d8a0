//! The edge's response cache as the pipeline uses it: one per process, kept across reloads, shared
//! by every front (same entries, coalescing and policies on every protocol). The cache itself
//! (`crate::cache`) is transport-free.

use std::sync::Arc;
use std::time::SystemTime;

use crate::cache::{CacheRequest, Lookup, ResponseCache, Served};
use crate::reload::Loaded;

pub struct EdgeCache {
    cache: ResponseCache,
}

impl EdgeCache {
    pub fn new(cache: ResponseCache) -> Self {
        Self { cache }
    }

    /// The cache itself, for `admit` on a fetched response.
    pub(crate) fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// Looks the request up; `None` when route `route` does not cache.
    pub(crate) async fn lookup(
        &self,
        loaded: &Arc<Loaded>,
        route: usize,
        view: &CacheRequest<'_>,
    ) -> Option<Lookup> {
        let policy = loaded.cache_policy(route)?;
        // Pinned where it is built: built and then awaited, the lookup's future was copied.
        Some(std::pin::pin!(self.cache.lookup(view, policy, SystemTime::now())).await)
    }

    /// Routing found no region able to serve now: a stored entry answers instead of the 503 —
    /// fresh as a hit, stale within its stale-if-error (or stale-while-revalidate) window.
    pub(crate) async fn when_unavailable(
        &self,
        loaded: &Arc<Loaded>,
        route: usize,
        view: &CacheRequest<'_>,
    ) -> Option<Served> {
        match self.lookup(loaded, route, view).await? {
            Lookup::Hit(served) | Lookup::Stale { served, .. } => Some(served),
            Lookup::Fetch(ticket) => ticket.stale_on_error(SystemTime::now()),
            Lookup::Bypass(_) => None,
        }
    }
}
