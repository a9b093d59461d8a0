//! The operator side of the config service: `meridian config get|push|diff|history|rollback` and
//! `meridian config-server`. Part of the binary only (argument glue around
//! `meridian_config_service`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use meridian_config::Config;
use meridian_config_service::ClientError;

use crate::ConfigCommand;

pub async fn run(command: ConfigCommand) -> anyhow::Result<ExitCode> {
    match command {
        ConfigCommand::Validate { .. } => unreachable_validate(),
        ConfigCommand::Get { version, server } => {
            let client = server.client()?;
            let found = match version {
                Some(n) => client.version(n).await?,
                None => client.current().await?,
            };
            let Some(stored) = found else {
                eprintln!("no such version on {}", server.server);
                return Ok(ExitCode::FAILURE);
            };
            eprintln!(
                "version {} by {} ({}): {}",
                stored.meta.version, stored.meta.author, stored.meta.sha256, stored.meta.message
            );
            print!("{}", stored.document);
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Push {
            file,
            message,
            author,
            if_match,
            server,
        } => {
            let document = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let author = author
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "operator".into());
            match server
                .client()?
                .push(&document, &author, &message, if_match)
                .await
            {
                Ok(meta) => {
                    println!(
                        "pushed version {} (sha256 {})",
                        meta.version,
                        &meta.sha256[..12.min(meta.sha256.len())]
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => report_rejection(&file, e),
            }
        }
        ConfigCommand::Diff { file, server } => {
            let document = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let local = Config::from_toml_str(&document)
                .with_context(|| format!("loading {}", file.display()))?;
            let live = server
                .client()?
                .current()
                .await?
                .context("the config service has no version yet")?;
            let live_config =
                Config::from_toml_str(&live.document).context("the live version does not parse")?;
            let changes = meridian_config::diff(&live_config, &local);
            if changes.is_empty() {
                println!("no changes against live version {}", live.meta.version);
            } else {
                println!("live version {} -> {}:", live.meta.version, file.display());
                for change in changes {
                    println!("  {change}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::History { server } => {
            let history = server.client()?.history().await?;
            println!(
                "{:>8}  {:<20}  {:<12}  {:<16}  message",
                "version", "time (unix)", "sha256", "author"
            );
            for meta in history {
                println!(
                    "{:>8}  {:<20}  {:<12}  {:<16}  {}",
                    meta.version,
                    meta.timestamp,
                    &meta.sha256[..12.min(meta.sha256.len())],
                    meta.author,
                    meta.message
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Rollback { version, server } => {
            let meta = server.client()?.rollback(version).await?;
            println!(
                "version {version} is live again as version {}",
                meta.version
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn unreachable_validate() -> anyhow::Result<ExitCode> {
    anyhow::bail!("validate runs without a config service")
}

/// Prints every validation error of a 422 with its path, or the service's reason for a 409/401/413.
fn report_rejection(file: &std::path::Path, error: ClientError) -> anyhow::Result<ExitCode> {
    if let Some(errors) = error.validation_errors() {
        for e in &errors {
            eprintln!("{}: {e}", file.display());
        }
        eprintln!(
            "{}: rejected, {} error(s); the live version is unchanged",
            file.display(),
            errors.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    match error {
        ClientError::Rejected { status, body } => {
            eprintln!("{}: rejected ({status}): {body}", file.display());
            Ok(ExitCode::FAILURE)
        }
        other => Err(other.into()),
    }
}

/// Where `meridian config-server` keeps its versions.
pub enum StoreBackend {
    Dir(PathBuf),
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

/// How `meridian config-server` serves.
pub struct ServerOptions {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    pub read_token_file: Option<PathBuf>,
    /// Reads without any token (only without a read token).
    pub public_reads: bool,
    pub keep_versions: u64,
    /// Certificate chain and key (PEM) for HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub allowed_hosts: Vec<String>,
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
    Ok(token)
}

pub async fn config_server(
    backend: StoreBackend,
    options: ServerOptions,
) -> anyhow::Result<ExitCode> {
    let ServerOptions {
        listen,
        token_file,
        read_token_file,
        public_reads,
        keep_versions,
        tls,
        allowed_hosts,
    } = options;
    let token = read_token(&token_file)?;
    let read_token = read_token_file.as_deref().map(read_token).transpose()?;
    if read_token.is_none() && public_reads {
        tracing::warn!("--public-reads: anyone who reaches the service reads every document, API key hashes included");
    }
    let tls = match tls {
        Some((cert, key)) => Some(
            meridian_config_service::tls::acceptor(&cert, &key).context("--tls-cert/--tls-key")?,
        ),
        None => {
            if !listen.ip().is_loopback() {
                tracing::warn!(%listen, "serving plain HTTP beyond loopback: tokens and documents travel in clear (set --tls-cert/--tls-key)");
            }
            None
        }
    };
    let store: std::sync::Arc<dyn meridian_config_service::VersionStore> = match backend {
        StoreBackend::Dir(data) => {
            let store = meridian_config_service::ConfigStore::open(&data)
                .with_context(|| format!("opening {}", data.display()))?
                .with_keep_versions(keep_versions);
            tracing::info!(data = %data.display(), version = store.current_version(), "config store on local disk");
            std::sync::Arc::new(meridian_config_service::FileStore(std::sync::Arc::new(
                store,
            )))
        }
        StoreBackend::Etcd { endpoints, prefix } => {
            anyhow::ensure!(!endpoints.is_empty(), "--etcd needs at least one URL");
            let store =
                meridian_config_service::EtcdStore::connect(&endpoints, &prefix, keep_versions)
                    .await
                    .with_context(|| format!("connecting to etcd {}", endpoints.join(",")))?;
            tracing::info!(etcd = %endpoints.join(","), %prefix, version = store.current_version(), "config store on etcd");
            std::sync::Arc::new(store)
        }
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(%listen, "config service running");
    let mut state =
        meridian_config_service::ServiceState::with_store(store, token).with_read_token(read_token);
    state.public_reads = public_reads;
    state.tls = tls;
    state.allowed_hosts =
        (listen.ip().is_loopback() || !allowed_hosts.is_empty()).then_some(allowed_hosts);
    let state = std::sync::Arc::new(state);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    meridian_config_service::serve(listener, state, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
