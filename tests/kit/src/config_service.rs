//! An in-process `meridian config-server` (the real service from `meridian-config-service`), for
//! the demo and the tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use meridian_config_service::{ConfigClient, ConfigStore, ServiceState, StoreError};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum ConfigServiceError {
    #[error("config store: {0}")]
    Store(#[from] StoreError),
    #[error("config service {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running config service; stops when [`stop`](Self::stop) is called or when dropped.
pub struct ConfigService {
    pub addr: SocketAddr,
    pub token: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ConfigService {
    /// Opens (or creates) the store in `dir` and serves it on `listen` (port 0: any free port)
    /// with `token` for writes. Listening when this returns.
    pub fn start(
        runtime: &Runtime,
        dir: &Path,
        listen: SocketAddr,
        token: &str,
    ) -> Result<ConfigService, ConfigServiceError> {
        let store = ConfigStore::open(dir)?;
        let bind = |source| ConfigServiceError::Bind {
            addr: listen,
            source,
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let mut state = ServiceState::new(store, token);
        // As `meridian config-server` on a loopback address: loopback Host names only.
        if addr.ip().is_loopback() {
            state.allowed_hosts = Some(Vec::new());
        }
        let state = Arc::new(state);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = runtime.spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = meridian_config_service::serve(listener, state, shutdown).await {
                tracing::error!("config service stopped: {e}");
            }
        });
        Ok(ConfigService {
            addr,
            token: token.to_string(),
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client holding the write token.
    pub fn client(&self) -> ConfigClient {
        ConfigClient::new(&self.url(), Some(self.token.clone()))
            .expect("a socket address always makes a valid config service URL")
    }

    /// Stops the service (its port stops answering) and waits for it to finish.
    pub fn stop(&mut self, runtime: &Runtime) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = runtime.block_on(task);
        }
    }
}
