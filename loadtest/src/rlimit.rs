//! Thousands of sockets (`--slow 10000`, `--idle 10000`) need more file descriptors than the usual
//! soft limit of 1024, so the generator raises its soft limit to the hard limit at start.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises the soft open-file limit to the hard one; returns the soft limit now in force. Failure
/// is not fatal: a run that needs fewer descriptors still works, and one that needs more reports
/// its connect errors.
pub fn raise_nofile() -> Option<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}
