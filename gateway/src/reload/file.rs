//! File mode: `meridian serve --config FILE` reloads on SIGHUP and when the file changes, through
//! the same [`apply_document`] path as the config service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::Signal;
use tokio::sync::watch;

use super::{apply_document, SnapshotStore};

/// How often the file is checked for changes (cheap: one stat, and a read only when it changed).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Registers the SIGHUP handler now (call inside the runtime that will run [`watch_file`]), so a
/// SIGHUP that arrives once the edge is up can never take the default action (terminate).
pub fn hangup_signal() -> Option<Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP: {e}");
            None
        }
    }
}

pub async fn watch_file(
    store: Arc<SnapshotStore>,
    path: PathBuf,
    mut hangup: Option<Signal>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_seen = stamp(&path);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = stop.wait_for(|s| *s) => return,
        };
        let now = stamp(&path);
        if !forced && now == last_seen {
            continue;
        }
        last_seen = now;
        match tokio::fs::read_to_string(&path).await {
            Ok(source) => {
                if forced {
                    tracing::info!("SIGHUP: reloading {}", path.display());
                }
                let _ = apply_document(&store, &source, 0);
            }
            Err(e) => {
                store
                    .metrics()
                    .config
                    .reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(
                    "cannot read {}: {e}; keeping the current config",
                    path.display()
                );
            }
        }
    }
}

/// (modified time, length): changes whenever an editor saves the file.
fn stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
