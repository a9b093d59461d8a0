//! The `meridian` command line. Only argument parsing and process glue live here.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meridian_config::{Config, ConfigError};
use meridian_gateway::core::SnapshotMeta;
use meridian_gateway::edge::{EdgeOptions, RunningEdge};

mod allocator;
mod operator;
mod purge_cli;

/// mimalloc instead of glibc malloc: Pingora allocates and frees many small, short-lived buffers
/// per request (session, header maps, `Bytes`); with glibc, malloc/free were ~13% of the proxy's
/// cycles. mimalloc gave about +12-20% requests/s on the proxy benchmarks (jemalloc a little less),
/// for ~3 MiB more peak RSS than glibc (docs/benchmarks.md). Called through `EdgeAllocator`, which
/// keeps word-aligned requests on mimalloc's unaligned fast paths.
#[global_allocator]
static GLOBAL: allocator::EdgeAllocator = allocator::EdgeAllocator;

/// Run by every worker thread on its ticker: hands the thread's free pages (and arena ranges whose
/// purge delay has passed) back to the OS. mimalloc only purges when the allocator is called again,
/// so after a burst a process that then sits idle would keep the burst's freed memory resident:
/// measured with 10,000 idle connections opened at once, 0.8-1.3 KiB per connection depending on
/// how many requests were in flight during the burst, against ~0.75 KiB when the freed memory is
/// returned.
#[allow(unsafe_code)]
fn return_freed_memory() {
    // SAFETY: `mi_collect` takes no pointers and is safe to call from any thread at any time; it
    // only frees what no allocation uses.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Meridian: global edge gateway and multi-region traffic router"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `meridian dns ...`: DNSSEC key management.
#[derive(Subcommand)]
enum DnsCommand {
    /// Write a new DNSSEC signing key (ECDSA P-256, PKCS#8 PEM) for `[dns.dnssec] key_file`.
    Keygen {
        /// Where to write the key (refuses to overwrite; created readable by the owner only).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the DS record (and the DNSKEY) of each of a config's `[dns.dnssec]` keys, for the
    /// parent zone: the active `key_file` first, then the `published_key_files`.
    Ds {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole local world: simulated regions, the edge, admin, and print a tour.
    #[cfg(feature = "demo")]
    Demo,
    /// Run an edge from a config file.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run only the GeoDNS server of a config file (`[dns]` + `[[pops]]`); SIGHUP reloads the file.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Dns {
        #[arg(long, required = true)]
        config: Option<PathBuf>,
        /// Serve /metrics and /healthz here (keep it on loopback); `off` disables it.
        #[arg(long, default_value = meridian_gateway::dns::STANDALONE_METRICS)]
        metrics: String,
        #[command(subcommand)]
        command: Option<DnsCommand>,
    },
    /// Run the config service: versioned store on local disk (or on etcd), HTTP API, long-poll watch.
    ConfigServer {
        /// Directory holding every version (created if missing).
        #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
        data: Option<PathBuf>,
        /// Keep the versions on this etcd cluster instead (client URLs, comma-separated): the
        /// server is then stateless and several may serve one cluster.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// Key prefix of the versions on etcd.
        #[arg(long, default_value = meridian_config_service::etcd::DEFAULT_PREFIX)]
        etcd_prefix: String,
        /// Versions kept (older ones are deleted as new ones are written; 0 keeps all), on disk
        /// or on etcd.
        #[arg(long, alias = "etcd-retain", default_value_t = meridian_config_service::DEFAULT_KEEP_VERSIONS)]
        keep_versions: u64,
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// File holding the bearer token that writes must present.
        #[arg(long)]
        token_file: PathBuf,
        /// File holding the bearer token that reads (`GET /v1/…`) must present (the write
        /// token is accepted too); the documents hold API key hashes and the whole routing.
        /// Without it reads need the write token, unless --public-reads.
        #[arg(long)]
        read_token_file: Option<PathBuf>,
        /// Serve reads (`GET /v1/…`, long-polls included) to anyone, without a token.
        #[arg(long, conflicts_with = "read_token_file")]
        public_reads: bool,
        /// Serve HTTPS with this PEM certificate chain (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// A `Host` name the service answers besides loopback names and addresses (repeat for
        /// more). Without any, a service on a loopback address answers only loopback names
        /// (DNS rebinding); one on another address answers any.
        #[arg(long = "allowed-host")]
        allowed_hosts: Vec<String>,
    },
    /// Work with config documents.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The edge response cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// GeoIP databases.
    Geoip {
        #[command(subcommand)]
        command: GeoipCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a document: print every error with its path (exit 1), or a one-line summary (exit 0).
    Validate { file: PathBuf },
    /// Print the live document (or `--version N`) from the config service.
    Get {
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Validate and push a document; prints the new version.
    Push {
        file: PathBuf,
        #[arg(short, long, default_value = "")]
        message: String,
        #[arg(long)]
        author: Option<String>,
        /// Refuse (409) unless the live version is this one.
        #[arg(long)]
        if_match: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Structural diff between the live version and a local file.
    Diff {
        file: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Versions, newest first.
    History {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Make version N live again (as a new version).
    Rollback {
        version: u64,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Config service URL.
    #[arg(long, env = "MERIDIAN_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// Bearer token file: the write token, or the read token for get, diff and history
    /// (default: the MERIDIAN_TOKEN environment variable).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) of an https:// config service.
    #[arg(long, env = "MERIDIAN_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl ServerArgs {
    fn client(&self) -> anyhow::Result<meridian_config_service::ConfigClient> {
        let token = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("MERIDIAN_TOKEN").ok(),
        };
        let client = meridian_config_service::ConfigClient::new(&self.server, token)?;
        Ok(match &self.ca_file {
            Some(ca) => client.with_ca_file(ca)?,
            None => client,
        })
    }
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Purge by --url, --prefix or --tag: on one edge (its admin listener), or on every edge of
    /// the fleet through the config service (--server) or etcd (--etcd).
    Purge(purge_cli::PurgeArgs),
}

#[derive(Subcommand)]
enum GeoipCommand {
    /// Write the local geo test world (loopback ranges → countries) as a MaxMind-format database.
    #[cfg(feature = "demo")]
    BuildTestWorld { out: PathBuf },
    /// Look an address up.
    Lookup {
        ip: IpAddr,
        /// Database to read (default: the test world, built in memory; required in a build
        /// without the `demo` feature).
        #[arg(long)]
        db: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    // Before any listener: a gateway at the distribution's soft limit (often 1024 files)
    // refuses clients long before the machine is busy.
    match meridian_gateway::httpd::raise_open_file_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
    meridian_gateway::housekeeping::set_worker_tick(return_freed_memory);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Access logs are JSON lines on stdout, governed by [edge.access_log] rather than
    // MERIDIAN_LOG; every other event goes to stderr through the usual formatter.
    let filter = match "meridian::access=off".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // The hint matters for speed: a filter without one makes the subscriber's max level TRACE, and
    // `init` passes that on to the `log` crate, so every `debug!`/`trace!` record Pingora emits per
    // request went through the whole subscriber instead of stopping at `log`'s level check.
    let access = meridian_gateway::access_log::AccessLogLayer::new(std::io::stdout).with_filter(
        tracing_subscriber::filter::filter_fn(meridian_gateway::access_log::is_access_log)
            .with_max_level_hint(tracing::level_filters::LevelFilter::INFO),
    );
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(access)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo => {
            let demo =
                meridian_gateway::demo::start(Default::default()).context("starting the demo")?;
            println!("{}", meridian_gateway::demo::tour(&demo));
            let meridian_gateway::demo::Demo { edge, .. } = demo;
            edge.wait();
            Ok(ExitCode::SUCCESS)
        }
        Command::Dns {
            command: Some(DnsCommand::Keygen { out }),
            ..
        } => {
            let pem = meridian_gateway::dns::dnssec::keygen()?;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            file.write_all(pem.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Dns {
            command: Some(DnsCommand::Ds { config }),
            ..
        } => {
            let source = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let parsed = Config::from_toml_str(&source)
                .with_context(|| format!("loading {}", config.display()))?;
            print!("{}", meridian_gateway::dns::dnssec::ds_records(&parsed)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Dns {
            config: None,
            command: None,
            ..
        } => anyhow::bail!("meridian dns needs --config FILE (or a subcommand)"),
        Command::Dns {
            config: Some(config),
            metrics,
            command: None,
        } => {
            let metrics = match metrics.as_str() {
                "off" => None,
                addr => Some(
                    addr.parse()
                        .with_context(|| format!("--metrics {addr}: not an address"))?,
                ),
            };
            meridian_gateway::dns::run_standalone(&config, metrics)
                .with_context(|| format!("GeoDNS from {}", config.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config } => {
            let source = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let parsed = Config::from_toml_str(&source)
                .with_context(|| format!("loading {}", config.display()))?;
            let meta = SnapshotMeta {
                version: 0,
                hash: meridian_config::content_hash(&source),
            };
            let edge = RunningEdge::start(EdgeOptions {
                config: parsed,
                meta,
                handle_signals: true,
                watch_file: Some(config.clone()),
                base_dir: config.parent().map(std::path::Path::to_path_buf),
            })?;
            tracing::info!(http = %edge.http_addr, admin = %edge.admin_addr, "edge serving");
            edge.wait();
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { command } => match command {
            ConfigCommand::Validate { file } => validate(&file),
            other => runtime()?.block_on(operator::run(other)),
        },
        Command::ConfigServer {
            data,
            etcd,
            etcd_prefix,
            keep_versions,
            listen,
            token_file,
            read_token_file,
            public_reads,
            tls_cert,
            tls_key,
            allowed_hosts,
        } => {
            let backend = match data {
                Some(data) => operator::StoreBackend::Dir(data),
                None => operator::StoreBackend::Etcd {
                    endpoints: etcd,
                    prefix: etcd_prefix,
                },
            };
            let options = operator::ServerOptions {
                listen,
                token_file,
                read_token_file,
                public_reads,
                keep_versions,
                tls: tls_cert.zip(tls_key),
                allowed_hosts,
            };
            runtime()?.block_on(operator::config_server(backend, options))
        }
        Command::Cache {
            command: CacheCommand::Purge(args),
        } => runtime()?.block_on(purge_cli::run(args)),
        Command::Geoip { command } => match command {
            #[cfg(feature = "demo")]
            GeoipCommand::BuildTestWorld { out } => {
                meridian_testkit::test_world::write(&out)?;
                println!(
                    "wrote {} ({} test-world ranges)",
                    out.display(),
                    meridian_testkit::test_world::PLACES.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            GeoipCommand::Lookup { ip, db } => {
                let db = match db {
                    Some(path) => meridian_geoip::GeoDb::open(&path)?,
                    None => test_world_db()?,
                };
                match db.lookup(ip)? {
                    Some(location) => {
                        let json = serde_json::json!({
                            "ip": ip.to_string(),
                            "country": location.country.map(|c| c.to_string()),
                            "continent": location.continent.map(|c| c.to_string()),
                            "latitude": location.coordinates.map(|c| c.0),
                            "longitude": location.coordinates.map(|c| c.1),
                        });
                        println!("{json}");
                        Ok(ExitCode::SUCCESS)
                    }
                    None => {
                        println!("{{\"ip\":\"{ip}\",\"country\":null}}");
                        Ok(ExitCode::from(3))
                    }
                }
            }
        },
    }
}

/// The test world, built in memory: the default database of `meridian geoip lookup`.
#[cfg(feature = "demo")]
fn test_world_db() -> anyhow::Result<meridian_geoip::GeoDb> {
    Ok(meridian_geoip::GeoDb::from_bytes(
        meridian_testkit::test_world::build()?,
    )?)
}

#[cfg(not(feature = "demo"))]
fn test_world_db() -> anyhow::Result<meridian_geoip::GeoDb> {
    anyhow::bail!(
        "--db is required: this build has no test world (built without the `demo` feature)"
    )
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn validate(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let source =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    match Config::from_toml_str(&source) {
        Ok(config) => {
            println!(
                "{}: ok (schema {}, {} regions, {} routes, {} residency rules, sha256 {})",
                file.display(),
                config.schema,
                config.regions.len(),
                config.routes.len(),
                config.residency.len(),
                &meridian_config::content_hash(&source)[..12]
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid(errors)) => {
            for error in &errors {
                eprintln!("{}: {error}", file.display());
            }
            eprintln!("{}: {} error(s)", file.display(), errors.len());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}
