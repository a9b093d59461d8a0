//! The edge's response cache as the pipeline uses it: one per process, kept across reloads, shared
//! by every front (same entries, coalescing and policies on every protocol). The cache itself
//! (`crate::cache`) is transport-free.

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;

use crate::cache::{CacheRequest, Lookup, ResponseCache, RoutePolicy, Served};
use crate::reload::Loaded;

/// Route policies compiled for one snapshot (rebuilt on the first request after a reload).
struct Policies {
    loaded: Weak<Loaded>,
    routes: Vec<Option<Arc<RoutePolicy>>>,
}

pub struct EdgeCache {
    cache: ResponseCache,
    policies: ArcSwapOption<Policies>,
}

impl EdgeCache {
    pub fn new(cache: ResponseCache) -> Self {
        Self {
            cache,
            policies: ArcSwapOption::empty(),
        }
    }

    /// The cache itself, for `admit` on a fetched response.
    pub(crate) fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// The route's cache policy, `None` when the route (or the whole cache) does not cache. Policies
    /// are compiled once per snapshot, not per request.
    fn policy(&self, loaded: &Arc<Loaded>, route: usize) -> Option<Arc<RoutePolicy>> {
        let enabled = |r: usize| {
            loaded
                .snapshot
                .config
                .routes
                .get(r)
                .is_some_and(|r| r.cache.enabled)
        };
        if !enabled(route) {
            return None;
        }
        if let Some(current) = self.policies.load().as_ref() {
            if std::ptr::eq(current.loaded.as_ptr(), Arc::as_ptr(loaded)) {
                return current.routes.get(route).cloned().flatten();
            }
        }
        let routes: Vec<_> = loaded
            .snapshot
            .config
            .routes
            .iter()
            .map(|r| {
                let policy = self.cache.route_policy(&r.name, &r.cache);
                policy.rules().enabled.then(|| Arc::new(policy))
            })
            .collect();
        let found = routes.get(route).cloned().flatten();
        self.policies.store(Some(Arc::new(Policies {
            loaded: Arc::downgrade(loaded),
            routes,
        })));
        found
    }

    /// Looks the request up; `None` when route `route` does not cache.
    pub(crate) async fn lookup(
        &self,
        loaded: &Arc<Loaded>,
        route: usize,
        view: &CacheRequest<'_>,
    ) -> Option<Lookup> {
        let policy = self.policy(loaded, route)?;
        Some(self.cache.lookup(view, &policy, SystemTime::now()).await)
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
