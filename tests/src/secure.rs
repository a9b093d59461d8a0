//! TLS in the test world: a per-World certificate authority with leaf certificates for the demo
//! hosts, and clients for HTTPS (h1, h2 by ALPN) and HTTP/3 that bind a test-world source address.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meridian_config::{Config, TlsCertificate};
use meridian_testkit::devcerts::DevCa;
use tokio::net::TcpSocket;

use crate::client::Reply;
use crate::h3client::H3Connection;

/// The protocols every conformance test runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secure {
    /// HTTP/1.1 over TLS (ALPN `http/1.1`).
    H1,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
    /// HTTP/3 over QUIC.
    H3,
}

/// A World's certificate authority and where its files are.
pub struct TestTls {
    pub ca: DevCa,
    pub ca_file: PathBuf,
    pub dir: PathBuf,
}

/// Hosts of the certificates a World serves, as in `examples/local.toml`.
pub const API_HOSTS: [&str; 2] = ["api.example.test", "*.api.example.test"];
pub const OTHER_HOSTS: [&str; 3] = [
    "inference.example.test",
    "static.example.test",
    "eu.example.test",
];

impl TestTls {
    /// Generates a CA and the two leaf certificates into `dir/tls`, and points `config` at them.
    pub fn install(config: &mut Config, dir: &Path) -> TestTls {
        let dir = dir.join("tls");
        std::fs::create_dir_all(&dir).expect("tls dir");
        let ca = DevCa::new("Meridian test CA").expect("CA");
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, &ca.pem).expect("write CA");
        // `default = true` on the config's n-th certificate carries over to the n-th one here.
        let defaults: Vec<bool> = config.tls.certificates.iter().map(|c| c.default).collect();
        let mut certificates = Vec::new();
        for (i, (name, hosts)) in [("api", &API_HOSTS[..]), ("other", &OTHER_HOSTS[..])]
            .into_iter()
            .enumerate()
        {
            let (cert, key) = ca
                .leaf(hosts)
                .expect("leaf")
                .write(&dir, name)
                .expect("write leaf");
            certificates.push(TlsCertificate {
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                cert: cert.display().to_string(),
                key: key.display().to_string(),
                default: defaults.get(i).copied().unwrap_or(false),
            });
        }
        config.tls.certificates = certificates;
        TestTls { ca, ca_file, dir }
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        roots_from_pem(self.ca.pem.as_bytes())
    }
}

pub fn roots_from_pem(pem: &[u8]) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.expect("CA PEM")).expect("CA cert");
    }
    roots
}

/// A rustls client config for TCP with `alpn`, trusting `roots`.
pub fn tcp_client_config(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    config
}

/// A TLS connection from `source`; returns the stream (handshake done) for inspection.
pub async fn tls_connect(
    source: IpAddr,
    target: SocketAddr,
    server_name: &str,
    config: rustls::ClientConfig,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(target).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
    Ok(connector.connect(name, stream).await?)
}

/// One request over `protocol` on a fresh connection from `source`; `host` is also the SNI.
#[allow(clippy::too_many_arguments)]
pub async fn request(
    protocol: Secure,
    roots: rustls::RootCertStore,
    target: SocketAddr,
    source: IpAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> anyhow::Result<Reply> {
    let sni = sni_for(host);
    match protocol {
        Secure::H3 => {
            let config = crate::h3client::client_config(roots)?;
            let mut conn = H3Connection::connect(source, target, &sni, config).await?;
            let reply = conn.request(method, host, path, headers, body).await;
            conn.close().await;
            reply
        }
        Secure::H1 | Secure::H2 => {
            let alpn: &[&[u8]] = if protocol == Secure::H2 {
                &[b"h2"]
            } else {
                &[b"http/1.1"]
            };
            let stream = tls_connect(source, target, &sni, tcp_client_config(roots, alpn)).await?;
            let io = TokioIo::new(stream);
            let mut builder = http::Request::builder().method(method);
            builder = match protocol {
                Secure::H1 => builder.uri(path).header("host", host),
                _ => builder.uri(format!("https://{host}{path}")),
            };
            for (name, value) in headers {
                builder = builder.header(*name, *value);
            }
            let request = builder.body(Full::new(Bytes::from(body)))?;
            crate::client::exchange(io, protocol != Secure::H1, request).await
        }
    }
}

/// SNI for a Host value: the host (without port) when a World certificate covers it, else
/// `api.example.test`, so that the handshake succeeds and the edge's HTTP routing is what answers
/// (an unknown host is then refused with 421, as on cleartext).
pub fn sni_for(host: &str) -> String {
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let covered = API_HOSTS
        .iter()
        .chain(OTHER_HOSTS.iter())
        .any(|h| match h.strip_prefix("*.") {
            Some(parent) => name.split_once('.').is_some_and(|(_, rest)| rest == parent),
            None => *h == name,
        });
    if covered {
        name.to_string()
    } else {
        "api.example.test".into()
    }
}
