//! Client of the config service (HTTP/1.1, plain or over TLS). One connection per request: calls
//! are rare (a push, or one long-poll at a time), and a fresh connection never inherits a broken one.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::store::{StoredVersion, VersionMeta};
use crate::wire::{self, encode_header_text, header_text, parse_version_tag};
use meridian_config::{content_hash, ValidationError};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Whole-exchange limit for ordinary requests.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A long-poll may take this much longer than the `wait` it asked for.
pub const LONG_POLL_GRACE: Duration = Duration::from_secs(5);
/// Largest response body the client accepts.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad config service URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot build the request: {0}")]
    Request(String),
    #[error("cannot connect to config service at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config service request {what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("HTTP error talking to the config service: {0}")]
    Http(#[from] hyper::Error),
    /// A 4xx answer. `body` is the JSON error (for 422 it has every validation error).
    #[error("config service rejected the request ({status}): {body}")]
    Rejected {
        status: u16,
        body: serde_json::Value,
    },
    #[error("config service failed ({status}): {body}")]
    Server { status: u16, body: String },
    #[error("unexpected response from the config service: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Every validation error of a 422 (a parse error comes back as one entry with path `""`).
    pub fn validation_errors(&self) -> Option<Vec<ValidationError>> {
        match self {
            ClientError::Rejected { status: 422, body } => {
                serde_json::from_value(body.get("errors")?.clone()).ok()
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConfigClient {
    /// `host:port`, used both to connect and as the `Host` header.
    authority: String,
    /// Path prefix of the base URL, without a trailing slash (usually empty).
    base_path: String,
    token: Option<String>,
    request_timeout: Duration,
    /// `https://`: the connector trusting the configured CA (`None` until one is given).
    https: bool,
    tls: Option<Connector>,
}

/// The TLS connector (it has no `Debug` of its own).
#[derive(Clone)]
struct Connector(tokio_rustls::TlsConnector);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConnector")
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl ConfigClient {
    /// `base_url` like `http://127.0.0.1:7070` (plain HTTP only). `token` is sent on writes.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = base_url.parse().map_err(|_| bad("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("expected http:// or https://")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed"));
        }
        let authority = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:{}", authority.as_str(), if https { 443 } else { 80 }),
        };
        Ok(Self {
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            token,
            request_timeout: REQUEST_TIMEOUT,
            https,
            tls: None,
        })
    }

    /// Trusts the CA certificates in `ca_file` for an `https://` service.
    pub fn with_ca_file(mut self, ca_file: &std::path::Path) -> Result<Self, ClientError> {
        let connector =
            crate::tls::connector(ca_file).map_err(|e| ClientError::Request(e.to_string()))?;
        self.tls = Some(Connector(connector));
        Ok(self)
    }

    /// Posts a fleet-wide cache purge (`{"url"|"prefix"|"tag": …}`); returns its number.
    pub async fn purge(&self, purge: &serde_json::Value) -> Result<u64, ClientError> {
        let headers = [("content-type", "application/json".to_owned())];
        let body = Bytes::from(purge.to_string());
        let reply = self
            .send(
                Method::POST,
                "/v1/purge",
                &headers,
                body,
                self.request_timeout,
            )
            .await?;
        match reply.status {
            StatusCode::ACCEPTED => {
                let answer: serde_json::Value = json_body(&reply)?;
                answer["seq"]
                    .as_u64()
                    .ok_or_else(|| ClientError::Protocol("a purge answer without seq".into()))
            }
            _ => Err(unexpected(reply)),
        }
    }

    /// The purges after `after` (waiting up to `wait` for one); `None` asks for the cursor.
    pub async fn purges(
        &self,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<crate::PurgeBatch, ClientError> {
        let (path, timeout) = match after {
            Some(after) => (
                format!("/v1/purges?after={after}&wait={}ms", wait.as_millis()),
                wait.min(crate::service::MAX_WAIT) + LONG_POLL_GRACE,
            ),
            None => ("/v1/purges".to_owned(), self.request_timeout),
        };
        let reply = self
            .send(Method::GET, &path, &[], Bytes::new(), timeout)
            .await?;
        match reply.status {
            StatusCode::OK => json_body(&reply),
            _ => Err(unexpected(reply)),
        }
    }

    /// Overrides the whole-exchange timeout of ordinary (non-long-poll) requests.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The current version, or `None` when the service has none yet.
    pub async fn current(&self) -> Result<Option<StoredVersion>, ClientError> {
        let reply = self
            .send(
                Method::GET,
                "/v1/config",
                &[],
                Bytes::new(),
                self.request_timeout,
            )
            .await?;
        match reply.status {
            StatusCode::OK => stored_version(&reply).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(unexpected(reply)),
        }
    }

    /// Long-polls for a version newer than `after`: `None` if none appeared within `wait`
    /// (the service caps `wait` at 60s).
    pub async fn wait_for_newer(
        &self,
        after: u64,
        wait: Duration,
    ) -> Result<Option<StoredVersion>, ClientError> {
        let path = format!("/v1/config?after={after}&wait={}ms", wait.as_millis());
        let timeout = wait.min(crate::service::MAX_WAIT) + LONG_POLL_GRACE;
        let reply = self
            .send(Method::GET, &path, &[], Bytes::new(), timeout)
            .await?;
        match reply.status {
            StatusCode::OK => stored_version(&reply).map(Some),
            StatusCode::NOT_MODIFIED => Ok(None),
            _ => Err(unexpected(reply)),
        }
    }

    /// Pushes a new document. With `if_match`, only if that is still the current version.
    pub async fn push(
        &self,
        document: &str,
        author: &str,
        message: &str,
        if_match: Option<u64>,
    ) -> Result<VersionMeta, ClientError> {
        let mut headers = vec![
            (wire::AUTHOR, encode_header_text(author)),
            (wire::MESSAGE, encode_header_text(message)),
            ("content-type", "application/toml".to_owned()),
        ];
        if let Some(version) = if_match {
            headers.push(("if-match", format!("\"{version}\"")));
        }
        let body = Bytes::copy_from_slice(document.as_bytes());
        let reply = self
            .send(
                Method::PUT,
                "/v1/config",
                &headers,
                body,
                self.request_timeout,
            )
            .await?;
        match reply.status {
            StatusCode::CREATED => json_body(&reply),
            _ => Err(unexpected(reply)),
        }
    }

    /// Metadata of every version, newest first.
    pub async fn history(&self) -> Result<Vec<VersionMeta>, ClientError> {
        let reply = self
            .send(
                Method::GET,
                "/v1/history",
                &[],
                Bytes::new(),
                self.request_timeout,
            )
            .await?;
        match reply.status {
            StatusCode::OK => json_body(&reply),
            _ => Err(unexpected(reply)),
        }
    }

    pub async fn version(&self, version: u64) -> Result<Option<StoredVersion>, ClientError> {
        let path = format!("/v1/versions/{version}");
        let reply = self
            .send(Method::GET, &path, &[], Bytes::new(), self.request_timeout)
            .await?;
        match reply.status {
            StatusCode::OK => stored_version(&reply).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(unexpected(reply)),
        }
    }

    /// Makes version `version`'s document current again, as a new version.
    pub async fn rollback(&self, version: u64) -> Result<VersionMeta, ClientError> {
        let path = format!("/v1/rollback/{version}");
        let reply = self
            .send(Method::POST, &path, &[], Bytes::new(), self.request_timeout)
            .await?;
        match reply.status {
            StatusCode::CREATED => json_body(&reply),
            _ => Err(unexpected(reply)),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let what = format!("{method} {path}");
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base_path))
            .header(header::HOST, &self.authority)
            .header(header::USER_AGENT, "meridian-config-client");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| ClientError::Request(e.to_string()))?;

        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| ClientError::Timeout {
                what: format!("connect to {}", self.authority),
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|source| ClientError::Connect {
                addr: self.authority.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);

        let exchange =
            async {
                if !self.https {
                    return exchange(stream, request).await;
                }
                let connector = self.tls.as_ref().ok_or_else(|| {
                    ClientError::Request("an https:// config service needs a CA file".into())
                })?;
                let host = self
                    .authority
                    .rsplit_once(':')
                    .map_or(self.authority.as_str(), |(host, _)| host)
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let name = rustls::pki_types::ServerName::try_from(host)
                    .map_err(|e| ClientError::Request(format!("TLS server name: {e}")))?;
                let tls = connector.0.connect(name, stream).await.map_err(|source| {
                    ClientError::Connect {
                        addr: self.authority.clone(),
                        source,
                    }
                })?;
                exchange(tls, request).await
            };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                what,
                after: timeout,
            })?
    }
}

/// One request and its whole (bounded) answer on a fresh connection.
async fn exchange<I>(io: I, request: Request<Full<Bytes>>) -> Result<Reply, ClientError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    {
        {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
            let _driver = AbortOnDrop(tokio::spawn(async move {
                let _ = connection.await;
            }));
            let response = sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(format!("reading the response body: {e}")))?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        }
    }
}

/// Stops the connection task when the exchange ends (or times out and is dropped).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn stored_version(reply: &Reply) -> Result<StoredVersion, ClientError> {
    let document = String::from_utf8(reply.body.to_vec())
        .map_err(|_| ClientError::Protocol("the document is not UTF-8".into()))?;
    let headers = &reply.headers;
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let version = text(wire::VERSION)
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| text("etag").and_then(parse_version_tag))
        .ok_or_else(|| ClientError::Protocol("the response names no version".into()))?;
    let sha256 = content_hash(&document);
    if let Some(claimed) = text(wire::SHA256) {
        if !claimed.trim().eq_ignore_ascii_case(&sha256) {
            return Err(ClientError::Protocol(format!(
                "version {version} does not match its X-Meridian-Sha256"
            )));
        }
    }
    Ok(StoredVersion {
        meta: VersionMeta {
            version,
            author: header_text(headers, wire::AUTHOR).unwrap_or_default(),
            message: header_text(headers, wire::MESSAGE).unwrap_or_default(),
            timestamp: text(wire::TIMESTAMP)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0),
            sha256,
        },
        document,
    })
}

fn json_body<T: serde::de::DeserializeOwned>(reply: &Reply) -> Result<T, ClientError> {
    serde_json::from_slice(&reply.body)
        .map_err(|e| ClientError::Protocol(format!("bad JSON in a {} answer: {e}", reply.status)))
}

fn unexpected(reply: Reply) -> ClientError {
    let status = reply.status.as_u16();
    if reply.status.is_client_error() {
        let body = serde_json::from_slice(&reply.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&reply.body).into_owned())
        });
        ClientError::Rejected { status, body }
    } else if reply.status.is_server_error() {
        ClientError::Server {
            status,
            body: String::from_utf8_lossy(&reply.body).into_owned(),
        }
    } else {
        ClientError::Protocol(format!("unexpected status {}", reply.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let client = ConfigClient::new("http://127.0.0.1:7070", None).expect("plain");
        assert_eq!(client.authority, "127.0.0.1:7070");
        assert_eq!(client.base_path, "");
        let client = ConfigClient::new("http://config.test/meridian/", None).expect("prefix");
        assert_eq!(client.authority, "config.test:80");
        assert_eq!(client.base_path, "/meridian");
        let client = ConfigClient::new("https://config.test", None).expect("https");
        assert_eq!(client.authority, "config.test:443");
        assert!(ConfigClient::new("ftp://127.0.0.1:7070", None).is_err());
        assert!(ConfigClient::new("127.0.0.1:7070", None).is_err());
        assert!(ConfigClient::new("http://u:p@127.0.0.1:7070", None).is_err());
        assert!(ConfigClient::new("http://127.0.0.1:7070/?x=1", None).is_err());
    }
}
