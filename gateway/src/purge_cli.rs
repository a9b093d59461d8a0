//! `meridian cache purge`: one `POST /admin/cache/purge` to an edge's admin listener.

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
    /// File holding the admin bearer token (default: the MERIDIAN_ADMIN_TOKEN variable).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
}

pub async fn run(args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string(),
        None => std::env::var("MERIDIAN_ADMIN_TOKEN")
            .context("no admin token: pass --token-file or set MERIDIAN_ADMIN_TOKEN")?
            .trim()
            .to_string(),
    };
    let body = match (&args.url, &args.prefix, &args.tag) {
        (Some(url), _, _) => serde_json::json!({ "url": url }),
        (_, Some(prefix), _) => serde_json::json!({ "prefix": prefix }),
        (_, _, Some(tag)) => serde_json::json!({ "tag": tag }),
        _ => bail!("one of --url, --prefix, --tag is required"),
    };
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
