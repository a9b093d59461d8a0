//! The config service as an attacker on the network or a flood of watchers would meet it:
//! TLS with a CA file on clients, read and write tokens kept apart, bounded long-polls and
//! request heads, and fleet-wide purges that only the write token may post.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meridian_config_service::{serve, ClientError, ConfigClient, ConfigStore, ServiceState};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const WRITE: &str = "write-token";
const READ: &str = "read-token";

const DOC: &str = r#"schema = 1
[[regions]]
name = "us-east"
location = { lat = 38.9, lon = -77.0 }
upstreams = [{ address = "127.1.2.1:7001" }]
[[routes]]
name = "api"
hosts = ["api.example.test"]
regions = "*"
"#;

struct Server {
    addr: SocketAddr,
    state: Arc<ServiceState>,
    _stop: oneshot::Sender<()>,
}

async fn start(dir: &Path, edit: impl FnOnce(&mut ServiceState)) -> Server {
    let store = ConfigStore::open(dir).expect("open store");
    let mut state = ServiceState::new(store, WRITE);
    edit(&mut state);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let state = Arc::new(state);
    tokio::spawn(serve(listener, state.clone(), async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        state,
        _stop: stop,
    }
}

fn client(server: &Server, token: Option<&str>) -> ConfigClient {
    ConfigClient::new(&format!("http://{}", server.addr), token.map(str::to_owned)).expect("client")
}

fn status<T: std::fmt::Debug>(result: Result<T, ClientError>) -> u16 {
    match result {
        Err(ClientError::Rejected { status, .. }) => status,
        Err(ClientError::Server { status, .. }) => status,
        Ok(_) => 200,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn reads_need_the_read_token_and_it_cannot_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), |state| {
        state.read_token = Some(READ.into());
    })
    .await;
    client(&server, Some(WRITE))
        .push(DOC, "ana", "first", None)
        .await
        .expect("the write token writes");

    let anonymous = client(&server, None);
    assert_eq!(status(anonymous.current().await), 401, "GET /v1/config");
    assert_eq!(status(anonymous.history().await), 401, "GET /v1/history");
    assert_eq!(
        status(anonymous.version(1).await),
        401,
        "GET /v1/versions/1"
    );
    assert_eq!(
        status(anonymous.wait_for_newer(0, Duration::from_millis(10)).await),
        401
    );
    assert_eq!(status(anonymous.purges(None, Duration::ZERO).await), 401);
    let wrong = client(&server, Some("guess"));
    assert_eq!(status(wrong.current().await), 401);

    let reader = client(&server, Some(READ));
    assert_eq!(
        reader.current().await.expect("read").expect("v1").document,
        DOC
    );
    assert_eq!(reader.history().await.expect("history").len(), 1);
    assert_eq!(status(reader.push(DOC, "eve", "sneaky", None).await), 401);
    assert_eq!(status(reader.rollback(1).await), 401);
    assert_eq!(
        status(reader.purge(&serde_json::json!({"tag": "x"})).await),
        401
    );
    // The write token reads too (operators use one token file).
    assert!(client(&server, Some(WRITE)).current().await.is_ok());
    // The health check stays open for load balancers.
    assert_eq!(
        raw(
            server.addr,
            "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .await
        .0,
        200
    );
}

/// Without a read token the safe default holds: reads (long-polls too) need the write token,
/// and only `public_reads` (`--public-reads`) opens them to anyone.
#[tokio::test]
async fn without_a_read_token_reads_need_the_write_token_unless_public() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), |_| {}).await;
    let writer = client(&server, Some(WRITE));
    writer
        .push(DOC, "ana", "first", None)
        .await
        .expect("the write token writes");
    let anonymous = client(&server, None);
    assert_eq!(status(anonymous.current().await), 401, "GET /v1/config");
    assert_eq!(status(anonymous.history().await), 401, "GET /v1/history");
    assert_eq!(status(anonymous.version(1).await), 401);
    assert_eq!(
        status(anonymous.wait_for_newer(0, Duration::from_millis(10)).await),
        401,
        "the long-poll"
    );
    assert_eq!(status(anonymous.purges(None, Duration::ZERO).await), 401);
    assert_eq!(status(client(&server, Some(READ)).current().await), 401);
    let (code, body) = raw(
        server.addr,
        "GET /v1/config HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 401);
    assert!(
        !body.contains("api.example.test"),
        "no document in a refusal"
    );
    assert_eq!(
        writer.current().await.expect("read").expect("v1").document,
        DOC
    );
    assert_eq!(writer.history().await.expect("history").len(), 1);

    let public = tempfile::tempdir().expect("tempdir");
    let server = start(public.path(), |state| state.public_reads = true).await;
    client(&server, Some(WRITE))
        .push(DOC, "ana", "first", None)
        .await
        .expect("push");
    let anonymous = client(&server, None);
    assert!(anonymous.current().await.expect("public read").is_some());
    assert_eq!(anonymous.history().await.expect("history").len(), 1);
    assert_eq!(
        status(anonymous.push(DOC, "eve", "x", None).await),
        401,
        "public reads never open writes"
    );
}

/// A CA and a certificate for 127.0.0.1 and localhost signed by it, written as PEM files.
fn ca_and_leaf(
    dir: &Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("ca key");
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca, ca_key);
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("leaf params");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf cert");
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).expect("write ca");
    std::fs::write(&paths.1, leaf_cert.pem()).expect("write cert");
    std::fs::write(&paths.2, leaf_key.serialize_pem()).expect("write key");
    paths
}

#[tokio::test]
async fn over_tls_clients_trust_only_the_configured_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = ca_and_leaf(dir.path(), "service");
    let (other_ca, _, _) = ca_and_leaf(dir.path(), "other");
    let acceptor = meridian_config_service::tls::acceptor(&cert, &key).expect("acceptor");
    let server = start(&dir.path().join("store"), |state| {
        state.tls = Some(acceptor);
    })
    .await;
    let url = format!("https://{}", server.addr);
    let trusted = ConfigClient::new(&url, Some(WRITE.into()))
        .expect("client")
        .with_ca_file(&ca)
        .expect("ca file");
    let meta = trusted
        .push(DOC, "ana", "over TLS", None)
        .await
        .expect("push");
    let read = trusted.current().await.expect("read").expect("v1");
    assert_eq!(
        (read.meta.version, read.document.as_str()),
        (meta.version, DOC)
    );

    // Another CA's client refuses the certificate; no CA at all is refused before connecting;
    // plain HTTP gets no answer it could read as the API.
    let untrusted = ConfigClient::new(&url, None)
        .expect("client")
        .with_ca_file(&other_ca)
        .expect("ca file");
    assert!(matches!(
        untrusted.current().await,
        Err(ClientError::Connect { .. })
    ));
    let no_ca = ConfigClient::new(&url, None).expect("client");
    assert!(matches!(
        no_ca.current().await,
        Err(ClientError::Request(_))
    ));
    let plain = client(&server, None);
    assert!(plain.current().await.is_err());
}

#[tokio::test]
async fn purges_are_long_polled_in_order_and_only_the_write_token_posts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), |state| {
        state.read_token = Some(READ.into());
    })
    .await;
    let writer = client(&server, Some(WRITE));
    let edge = client(&server, Some(READ));
    let cursor = edge.purges(None, Duration::ZERO).await.expect("cursor");
    assert_eq!(
        (cursor.seq, cursor.purges.len(), cursor.lost),
        (0, 0, false)
    );

    let poll = tokio::spawn({
        let edge = edge.clone();
        async move { edge.purges(Some(0), Duration::from_secs(30)).await }
    });
    let seq = writer
        .purge(&serde_json::json!({ "tag": "product-1" }))
        .await
        .expect("purge");
    let batch = poll.await.expect("poll task").expect("woken by the purge");
    assert_eq!(batch.seq, seq);
    assert_eq!(batch.purges.len(), 1);
    assert_eq!(batch.purges[0].purge["tag"], "product-1");
    // Nothing newer: an empty batch once the wait is over.
    let idle = edge
        .purges(Some(seq), Duration::from_millis(20))
        .await
        .expect("poll");
    assert!(idle.purges.is_empty() && !idle.lost);
    // A cursor this service never handed out (it restarted): everything may be lost.
    assert!(
        edge.purges(Some(seq + 10), Duration::ZERO)
            .await
            .expect("poll")
            .lost
    );

    assert_eq!(
        status(edge.purge(&serde_json::json!({ "tag": "x" })).await),
        401
    );
    assert_eq!(
        status(writer.purge(&serde_json::json!({ "all": true })).await),
        400
    );
}

/// One request on its own connection; the status and the whole answer.
async fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn long_polls_past_the_cap_are_refused_at_once_and_heads_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), |state| {
        state.max_long_polls = 1;
        state.read_token = Some(READ.into());
    })
    .await;
    let edge = client(&server, Some(READ));
    let first = tokio::spawn({
        let edge = edge.clone();
        async move { edge.wait_for_newer(0, Duration::from_secs(30)).await }
    });
    // Once the first long-poll waits it holds the only slot: the next is answered 503 at once.
    while server.state.store.watchers() == 0 {
        assert!(!first.is_finished());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        status(edge.wait_for_newer(0, Duration::from_secs(30)).await),
        503
    );
    // Pushes still get through.
    client(&server, Some(WRITE))
        .push(DOC, "ana", "wakes the poll", None)
        .await
        .expect("push");
    assert!(first.await.expect("task").expect("answer").is_some());

    // A request head larger than the bound is refused instead of buffered.
    let huge = "x".repeat(200 * 1024);
    let (status, _) = raw(
        server.addr,
        &format!(
            "GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: {huge}\r\nconnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(status == 431 || status == 0, "status {status}");
}
