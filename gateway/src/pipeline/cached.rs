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

    /// The lookup of the request, to await; `None` when route `route` does not cache. Not an
    /// async fn itself: a route without a cache then builds (and moves) no lookup future at all,
    /// and one that caches builds it where its caller pins it.
    pub(crate) fn lookup<'a>(
        &'a self,
        loaded: &'a Arc<Loaded>,
        route: usize,
        view: &'a CacheRequest<'_>,
    ) -> Option<impl std::future::Future<Output = Lookup> + 'a> {
        let policy = loaded.cache_policy(route)?;
        Some(self.cache.lookup(view, policy, SystemTime::now()))
    }

    /// Routing found no region able to serve now: a stored entry answers instead of the 503 —
    /// fresh as a hit, stale within its stale-if-error (or stale-while-revalidate) window.
    pub(crate) async fn when_unavailable(
        &self,
        loaded: &Arc<Loaded>,
        route: usize,
        view: &CacheRequest<'_>,
    ) -> Option<Served> {
        match std::pin::pin!(self.lookup(loaded, route, view)?).await {
            Lookup::Hit(served) | Lookup::Stale { served, .. } => Some(served),
            Lookup::Fetch(ticket) => ticket.stale_on_error(SystemTime::now()),
            Lookup::Bypass(_) => None,
        }
    }
}
