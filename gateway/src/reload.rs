//! The live snapshot: compiled off the request path, swapped atomically, loaded once per request.

use std::sync::Arc;

use arc_swap::ArcSwap;
use meridian_config::Config;

use crate::core::{CompileError, Snapshot, SnapshotMeta, UpstreamStates};
use crate::metrics::{EdgeMetrics, SnapshotMetrics};

/// A compiled snapshot with its pre-resolved metric series: one `load` gives a request both.
pub struct Loaded {
    pub snapshot: Snapshot,
    pub metrics: SnapshotMetrics,
}

pub struct SnapshotStore {
    current: ArcSwap<Loaded>,
    states: UpstreamStates,
    metrics: Arc<EdgeMetrics>,
}

impl SnapshotStore {
    pub fn new(
        config: Config,
        meta: SnapshotMeta,
        metrics: Arc<EdgeMetrics>,
    ) -> Result<Self, CompileError> {
        let states = UpstreamStates::default();
        let loaded = compile(config, meta, &states, &metrics)?;
        Ok(Self {
            current: ArcSwap::from_pointee(loaded),
            states,
            metrics,
        })
    }

    /// The snapshot a request uses from start to end (in-flight requests keep theirs across swaps).
    pub fn load(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Compiles `config` and swaps it in; on error the current snapshot stays.
    pub fn install(&self, config: Config, meta: SnapshotMeta) -> Result<(), CompileError> {
        let loaded = compile(config, meta, &self.states, &self.metrics)?;
        self.current.store(Arc::new(loaded));
        Ok(())
    }

    pub fn metrics(&self) -> &Arc<EdgeMetrics> {
        &self.metrics
    }
}

fn compile(
    config: Config,
    meta: SnapshotMeta,
    states: &UpstreamStates,
    metrics: &EdgeMetrics,
) -> Result<Loaded, CompileError> {
    let snapshot = Snapshot::compile(config, meta, states)?;
    let metrics = metrics.compile(&snapshot);
    Ok(Loaded { snapshot, metrics })
}
