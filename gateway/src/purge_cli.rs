//! `meridian cache purge`: one `POST /admin/cache/purge` to an edge's admin listener, or a
//! fleet-wide purge that every edge applies: posted to the config service (`--server`, whose
//! edges long-poll it) or written to etcd (`--etcd`, for edges that follow etcd directly).

use std::process::ExitCode;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["url", "prefix", "tag"])))]
pub struct PurgeArgs {
    /// Exact URL (every stored variant), e.g. http://static.example.test/logo.png
    #[arg(long)]
    url: Option<String>,
    /// URL prefix, e.g. http://static.example.test/img/
    #[arg(long)]
    prefix: Option<String>,
    /// Cache tag (`Cache-Tag` / `Surrogate-Key` response header).
    #[arg(long)]
    tag: Option<String>,
    /// The edge's admin listener.
    #[arg(long, default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// File holding the bearer token: the admin token, or with --server the config service's
    /// write token (default: MERIDIAN_ADMIN_TOKEN, or MERIDIAN_TOKEN with --server).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Purge on every edge through this config service instead of one admin listener.
    #[arg(long, conflicts_with_all = ["admin", "etcd"])]
    server: Option<String>,
    /// CA certificate (PEM) of an https:// --server.
    #[arg(long, requires = "server")]
    ca_file: Option<std::path::PathBuf>,
    /// Purge on every edge that follows this etcd cluster (client URLs, comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "admin")]
    etcd: Vec<String>,
    /// Key prefix of the fleet's store on etcd.
    #[arg(long, default_value = meridian_config_service::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
}

fn token(file: Option<&std::path::Path>, variable: &str) -> anyhow::Result<String> {
    match file {
        Some(path) => Ok(std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string()),
        None => Ok(std::env::var(variable)
            .with_context(|| format!("no token: pass --token-file or set {variable}"))?
            .trim()
            .to_string()),
    }
}

pub async fn run(args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let body = match (&args.url, &args.prefix, &args.tag) {
        (Some(url), _, _) => serde_json::json!({ "url": url }),
        (_, Some(prefix), _) => serde_json::json!({ "prefix": prefix }),
        (_, _, Some(tag)) => serde_json::json!({ "tag": tag }),
        _ => bail!("one of --url, --prefix, --tag is required"),
    };
    if let Some(server) = &args.server {
        let token = token(args.token_file.as_deref(), "MERIDIAN_TOKEN")?;
        let mut client = meridian_config_service::ConfigClient::new(server, Some(token))?;
        if let Some(ca) = &args.ca_file {
            client = client.with_ca_file(ca)?;
        }
        let seq = client.purge(&body).await?;
        println!("purge {seq} published to every edge following {server}");
        return Ok(ExitCode::SUCCESS);
    }
    if !args.etcd.is_empty() {
        let revision = meridian_config_service::etcd_follow::publish_purge(
            &args.etcd,
            &args.etcd_prefix,
            &body,
        )
        .await?;
        println!("purge published on etcd at revision {revision}");
        return Ok(ExitCode::SUCCESS);
    }
    let token = token(args.token_file.as_deref(), "MERIDIAN_ADMIN_TOKEN")?;
    let authority = args
        .admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    if authority.contains('/') || authority.starts_with("https:") {
        bail!("--admin takes http://HOST:PORT (the admin listener speaks plain HTTP)");
    }
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .with_context(|| format!("connecting to the admin listener {authority}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::post("/admin/cache/purge")
        .header(http::header::HOST, &authority)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let reply: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        let message = reply["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        eprintln!("purge refused ({status}): {message}");
        return Ok(ExitCode::FAILURE);
    }
    println!("purged {}", reply["purged"].as_u64().unwrap_or(0));
    Ok(ExitCode::SUCCESS)
}
