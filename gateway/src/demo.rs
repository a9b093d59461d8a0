//! `meridian demo`: the demo world of `meridian-testkit` (simulated regional origins, the config
//! service, a control API to break regions) with this crate's edge on the embedded
//! `examples/local.toml`, and the tour. Built only with the `demo` feature.

use crate::core::SnapshotMeta;
use crate::edge::{EdgeOptions, RunningEdge};

pub use meridian_testkit::demo::{DemoError, DemoOptions, DemoWorld, LOCAL_CONFIG};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    World(#[from] DemoError),
    #[error(transparent)]
    Edge(#[from] crate::edge::StartError),
}

/// The running demo. Fields drop in order: the edge stops before the world it proxies to.
pub struct Demo {
    pub edge: RunningEdge,
    pub world: DemoWorld,
}

pub fn start(options: DemoOptions) -> Result<Demo, StartError> {
    let world = DemoWorld::start(&options)?;
    let edge = RunningEdge::start(EdgeOptions {
        config: world.config.clone(),
        meta: SnapshotMeta {
            version: 0,
            hash: meridian_config::content_hash(LOCAL_CONFIG),
        },
        handle_signals: true,
        watch_file: None,
        base_dir: Some(options.data_dir.clone()),
    })?;
    Ok(Demo { edge, world })
}

/// What to try, printed once everything listens.
pub fn tour(demo: &Demo) -> String {
    meridian_testkit::demo::tour(
        &demo.world,
        &meridian_testkit::demo::EdgeAddrs {
            http: demo.edge.http_addr,
            admin: demo.edge.admin_addr,
            https: demo.edge.https_addr,
            dns: demo.edge.dns_addr,
        },
    )
}
