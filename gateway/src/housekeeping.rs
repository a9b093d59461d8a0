//! Periodic work the process asks of each worker thread, off the request path.
//!
//! The library does not know the process's allocator; the binary does. So the binary registers
//! one function here, and every worker thread runs it on its ticker (a few times a second, from
//! that thread: allocators such as mimalloc keep freed pages per thread, and only the owning
//! thread can hand them back).

use std::sync::OnceLock;

static ON_WORKER_TICK: OnceLock<fn()> = OnceLock::new();

/// Registers the function every worker thread runs on its ticker. Only the first registration
/// counts (the process registers once, at start); later ones return `false`.
pub fn set_worker_tick(tick: fn()) -> bool {
    ON_WORKER_TICK.set(tick).is_ok()
}

/// Runs the registered function, if any, on the calling worker thread.
pub(crate) fn on_worker_tick() {
    if let Some(tick) = ON_WORKER_TICK.get() {
        tick();
    }
}
