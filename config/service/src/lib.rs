//! Meridian's config service: [`store::ConfigStore`] (versioned, crash-safe, on local disk) or
//! [`etcd::EtcdStore`] (on an etcd cluster, for stateless replicas) behind
//! [`versions::VersionStore`], its HTTP API [`service::serve`] and the [`client::ConfigClient`]
//! that edges and operators use.
//!
//! Kept apart from `meridian-config` so that the schema, validation and diff stay free of tokio
//! and hyper: only what serves or fetches versions over the network pulls them in.

pub mod client;
pub mod etcd;
pub mod etcd_follow;
pub mod etcd_layout;
pub mod host;
pub mod purge_journal;
pub mod purges;
pub mod service;
pub mod store;
pub mod tls;
pub mod versions;
mod wire;

pub use client::{ClientError, ConfigClient};
pub use etcd::EtcdStore;
pub use etcd_follow::{Change, EtcdFollower};
pub use purges::{PurgeBatch, PurgeEntry};
pub use service::{serve, ServiceState};
pub use store::{
    ConfigStore, PutError, StoreError, StoredVersion, VersionMeta, DEFAULT_KEEP_VERSIONS,
};
pub use versions::{FileStore, Unavailable, VersionStore};
