//! An HTTP/3 client (quinn + h3) that binds a chosen source address, so a QUIC request can come
//! from any test-world country (`127.12.0.5` is Singapore). The load generator can reuse it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use crate::client::Reply;

/// One QUIC connection carrying HTTP/3 requests.
pub struct H3Connection {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    driver: tokio::task::JoinHandle<()>,
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
}

/// A rustls client config for HTTP/3 (ALPN `h3`) that trusts `roots`.
pub fn client_config(roots: rustls::RootCertStore) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

impl H3Connection {
    /// Connects from `source` (UDP bind) to `target`, presenting `server_name` as SNI.
    pub async fn connect(
        source: IpAddr,
        target: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> anyhow::Result<Self> {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0))?;
        endpoint.set_default_client_config(config);
        let connection = endpoint.connect(target, server_name)?.await?;
        let (mut driver, send) =
            h3::client::new(h3_quinn::Connection::new(connection.clone())).await?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Self {
            send,
            driver,
            endpoint,
            connection,
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
        let mut stream = self.send.send_request(request).await?;
        if !body.is_empty() {
            stream.send_data(Bytes::from(body)).await?;
        }
        stream.finish().await?;
        let response = stream.recv_response().await?;
        let mut collected = BytesMut::new();
        while let Some(mut chunk) = stream.recv_data().await? {
            while chunk.has_remaining() {
                let part = chunk.chunk();
                collected.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        Ok(Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: collected.freeze(),
            version: response.version(),
        })
    }

    /// Closes the connection politely and waits for the peer to acknowledge.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
        self.driver.abort();
    }
}
