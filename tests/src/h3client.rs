//! The harness's HTTP/3 client: a thin wrapper over the project's shared client
//! (`meridian_testkit::h3client`, also used by the load generator) that binds a chosen source
//! address, so a QUIC request can come from any test-world country (`127.12.0.5` is Singapore),
//! and answers with the harness's [`Reply`].

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use meridian_testkit::h3client::H3Client;

use crate::client::Reply;

/// One QUIC connection carrying HTTP/3 requests.
pub struct H3Connection {
    client: H3Client,
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
}

/// A rustls client config for HTTP/3 (ALPN `h3`) that trusts `roots`.
pub fn client_config(roots: rustls::RootCertStore) -> anyhow::Result<quinn::ClientConfig> {
    Ok(meridian_testkit::h3client::client_config(roots)?)
}

impl H3Connection {
    /// Connects from `source` (UDP bind) to `target`, presenting `server_name` as SNI.
    pub async fn connect(
        source: IpAddr,
        target: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> anyhow::Result<Self> {
        let client = H3Client::connect(source, target, server_name, config).await?;
        Ok(Self {
            endpoint: client.endpoint().clone(),
            connection: client.connection().clone(),
            client,
        })
    }

    /// One request on this connection; `host` goes in `:authority`.
    pub async fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<Reply> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("https://{host}{path}"));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(())?;
        let response = self
            .client
            .request(request, Some(Bytes::from(body)))
            .await?;
        let version = response.version();
        let (parts, body) = response.into_parts();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            version,
        })
    }

    /// Closes the connection politely and waits for the peer to acknowledge.
    pub async fn close(self) {
        self.client.close().await;
    }
}
