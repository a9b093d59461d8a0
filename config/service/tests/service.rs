//! The config service through real sockets: `serve` on 127.0.0.1:0, driven by `ConfigClient`
//! and by raw HTTP/1.1 where the exact wire matters.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meridian_config::content_hash;
use meridian_config_service::{
    serve, ClientError, ConfigClient, ConfigStore, ServiceState, VersionMeta,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TOKEN: &str = "test-token";

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

fn doc_with_host(host: &str) -> String {
    DOC.replace("api.example.test", host)
}

struct Server {
    addr: SocketAddr,
    state: Arc<ServiceState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(dir: &Path) -> Server {
        Self::start_with_limit(dir, ServiceState::DEFAULT_MAX_BODY_BYTES).await
    }

    async fn start_with_limit(dir: &Path, max_body_bytes: usize) -> Server {
        let store = ConfigStore::open(dir).expect("open store");
        let mut state = ServiceState::new(store, TOKEN);
        state.max_body_bytes = max_body_bytes;
        // These tests are about the API; read authorisation is tests/hardening.rs's.
        state.public_reads = true;
        let state = Arc::new(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn client(&self) -> ConfigClient {
        ConfigClient::new(&self.url(), Some(TOKEN.into())).expect("client")
    }

    fn anonymous_client(&self) -> ConfigClient {
        ConfigClient::new(&self.url(), None).expect("client")
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("serve task").expect("serve result");
    }
}

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

/// One request on its own connection (`Connection: close`), read to EOF.
async fn raw(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write head");
    stream.write_all(body).await.expect("write body");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.expect("read");
    let text = String::from_utf8(bytes).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    RawResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn rejected(result: Result<VersionMeta, ClientError>) -> (u16, serde_json::Value) {
    match result {
        Err(ClientError::Rejected { status, body }) => (status, body),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn put_then_get_with_etag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let client = server.client();
    assert!(client.current().await.expect("current").is_none());
    let empty = raw(server.addr, "GET", "/v1/config", &[], b"").await;
    assert_eq!(empty.status, 404);
    assert!(empty.json()["error"].is_string());

    let meta = client
        .push(DOC, "zoë", "first version: 100% ✓", None)
        .await
        .expect("push");
    assert_eq!(meta.version, 1);
    assert_eq!(meta.author, "zoë");
    assert_eq!(meta.sha256, content_hash(DOC));

    let current = client.current().await.expect("current").expect("a version");
    assert_eq!(current.document, DOC);
    assert_eq!(current.meta, meta);

    let response = raw(server.addr, "GET", "/v1/config", &[], b"").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("etag"), Some("\"1\""));
    assert_eq!(response.header("x-meridian-version"), Some("1"));
    assert_eq!(
        response.header("x-meridian-sha256"),
        Some(content_hash(DOC).as_str())
    );
    assert_eq!(response.body, DOC);

    let unchanged = raw(
        server.addr,
        "GET",
        "/v1/config",
        &[("if-none-match", "\"1\"")],
        b"",
    )
    .await;
    assert_eq!(unchanged.status, 304);
    assert!(unchanged.body.is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_as_soon_as_a_version_is_put() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let client = server.client();
    let v1 = client.push(DOC, "a", "one", None).await.expect("push 1");

    let watcher = server.client();
    let poll = tokio::spawn(async move {
        watcher
            .wait_for_newer(v1.version, Duration::from_secs(30))
            .await
    });
    // Readiness: the long-poll has subscribed to the store (it is pending on the server).
    tokio::time::timeout(Duration::from_secs(10), async {
        while server.state.store.watchers() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the long-poll reached the server");

    let v2 = client
        .push(&doc_with_host("api2.example.test"), "a", "two", Some(1))
        .await
        .expect("push 2");
    let newer = poll
        .await
        .expect("poll task")
        .expect("poll")
        .expect("a newer version");
    assert_eq!(newer.meta.version, v2.version);
    assert_eq!(newer.document, doc_with_host("api2.example.test"));
    server.shutdown().await;
}

#[tokio::test]
async fn long_poll_without_a_newer_version_is_304() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let client = server.client();
    client.push(DOC, "a", "one", None).await.expect("push");
    let none = client
        .wait_for_newer(1, Duration::from_millis(50))
        .await
        .expect("poll");
    assert!(none.is_none());
    let response = raw(server.addr, "GET", "/v1/config?after=1&wait=50ms", &[], b"").await;
    assert_eq!(response.status, 304);
    assert!(response.body.is_empty());
    // An older `after` answers at once.
    let older = client
        .wait_for_newer(0, Duration::from_secs(30))
        .await
        .expect("poll")
        .expect("version 1");
    assert_eq!(older.meta.version, 1);
    for bad in [
        "/v1/config?after=x",
        "/v1/config?after=1&wait=5",
        "/v1/config?wait=5s",
        "/v1/config?after=1&colour=red",
    ] {
        let response = raw(server.addr, "GET", bad, &[], b"").await;
        assert_eq!(response.status, 400, "{bad}");
        assert!(response.json()["error"].is_string(), "{bad}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_document_is_422_with_every_error_and_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let client = server.client();
    let invalid = DOC
        .replace("schema = 1", "schema = 1\n[edge]\nthreads = 0")
        .replace("127.1.2.1:7001", "127.1.2.1")
        .replace("regions = \"*\"", "regions = [\"us-east\", \"ap-sout-1\"]");
    let error = client
        .push(&invalid, "a", "bad", None)
        .await
        .expect_err("invalid document");
    let errors = error.validation_errors().expect("validation errors");
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "edge.threads",
            "regions[0].upstreams[0].address",
            "routes[0].regions[1]"
        ]
    );
    assert_eq!(errors[2].message, "unknown region \"ap-sout-1\"");

    let (status, body) = rejected(client.push(&invalid, "a", "bad", None).await);
    assert_eq!(status, 422);
    assert_eq!(body["error"], "invalid config");
    assert_eq!(body["errors"][2]["path"], "routes[0].regions[1]");

    let (status, body) = rejected(client.push("schema = [", "a", "broken", None).await);
    assert_eq!(status, 422);
    assert_eq!(body["errors"][0]["path"], "");
    assert!(body["errors"][0]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert_eq!(body["errors"].as_array().map(Vec::len), Some(1));
    assert!(client.current().await.expect("current").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn if_match_mismatch_is_409() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let client = server.client();
    client
        .push(DOC, "a", "one", Some(0))
        .await
        .expect("push on empty");
    let (status, body) = rejected(client.push(DOC, "a", "stale", Some(0)).await);
    assert_eq!(status, 409);
    assert_eq!(
        body,
        serde_json::json!({ "error": "conflict", "current": 1 })
    );
    client
        .push(DOC, "a", "fresh", Some(1))
        .await
        .expect("matching If-Match");
    let bare = raw(
        server.addr,
        "PUT",
        "/v1/config",
        &[("authorization", "Bearer test-token"), ("if-match", "2")],
        DOC.as_bytes(),
    )
    .await;
    assert_eq!(bare.status, 201);
    assert_eq!(bare.json()["version"], 3);
    server.shutdown().await;
}

#[tokio::test]
async fn writes_need_the_right_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let (status, body) = rejected(server.anonymous_client().push(DOC, "a", "m", None).await);
    assert_eq!(status, 401);
    assert!(body["error"].is_string());
    let wrong = ConfigClient::new(&server.url(), Some("test-token-2".into())).expect("client");
    assert_eq!(rejected(wrong.push(DOC, "a", "m", None).await).0, 401);
    server
        .client()
        .push(DOC, "a", "m", None)
        .await
        .expect("push");
    assert_eq!(rejected(wrong.rollback(1).await).0, 401);
    assert_eq!(rejected(server.anonymous_client().rollback(1).await).0, 401);
    let basic = raw(
        server.addr,
        "PUT",
        "/v1/config",
        &[("authorization", "Basic dGVzdC10b2tlbg==")],
        DOC.as_bytes(),
    )
    .await;
    assert_eq!(basic.status, 401);
    assert_eq!(
        server.state.store.history().await.expect("history").len(),
        1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let big = format!(
        "{DOC}# {}\n",
        "x".repeat(ServiceState::DEFAULT_MAX_BODY_BYTES)
    );
    let (status, body) = rejected(server.client().push(&big, "a", "big", None).await);
    assert_eq!(status, 413);
    assert!(body["error"].is_string());
    server.shutdown().await;

    // A small limit, and a body streamed without Content-Length (chunked).
    let server = Server::start_with_limit(dir.path(), 1024).await;
    let padded = format!("{DOC}# {}\n", "x".repeat(2048));
    let mut request = format!(
        "PUT /v1/config HTTP/1.1\r\nhost: {}\r\nconnection: close\r\nauthorization: Bearer {TOKEN}\r\ntransfer-encoding: chunked\r\n\r\n",
        server.addr
    )
    .into_bytes();
    request.extend_from_slice(format!("{:x}\r\n{padded}\r\n0\r\n\r\n", padded.len()).as_bytes());
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(&request).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    server
        .client()
        .push(DOC, "a", "fits", None)
        .await
        .expect("small push");
    server.shutdown().await;
}

#[tokio::test]
async fn history_is_newest_first_and_versions_are_addressable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let client = server.client();
    for (i, host) in ["a.example.test", "b.example.test", "c.example.test"]
        .iter()
        .enumerate()
    {
        let meta = client
            .push(&doc_with_host(host), "a", &format!("v{}", i + 1), None)
            .await
            .expect("push");
        assert_eq!(meta.version, i as u64 + 1);
    }
    let history = client.history().await.expect("history");
    let versions: Vec<u64> = history.iter().map(|m| m.version).collect();
    assert_eq!(versions, [3, 2, 1]);
    assert_eq!(history[0].message, "v3");

    let v2 = client
        .version(2)
        .await
        .expect("version")
        .expect("version 2");
    assert_eq!(v2.document, doc_with_host("b.example.test"));
    assert_eq!(v2.meta, history[1]);
    assert!(client.version(9).await.expect("version").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn rollback_creates_a_new_version_with_the_old_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let client = server.client();
    client.push(DOC, "a", "one", None).await.expect("push 1");
    client
        .push(&doc_with_host("b.example.test"), "a", "two", None)
        .await
        .expect("push 2");
    let rolled = client.rollback(1).await.expect("rollback");
    assert_eq!(rolled.version, 3);
    assert_eq!(rolled.sha256, content_hash(DOC));
    let current = client.current().await.expect("current").expect("version 3");
    assert_eq!(current.meta.version, 3);
    assert_eq!(current.document, DOC);
    assert_eq!(client.history().await.expect("history").len(), 3);
    assert_eq!(rejected(client.rollback(42).await).0, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn routing_errors_are_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let health = raw(server.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    for (method, target, status) in [
        ("GET", "/nope", 404),
        ("GET", "/v1/versions/1", 404),
        ("GET", "/v1/versions/one", 400),
        ("DELETE", "/v1/config", 405),
        ("POST", "/v1/history", 405),
        ("GET", "/v1/rollback/1", 405),
    ] {
        let response = raw(server.addr, method, target, &[], b"").await;
        assert_eq!(response.status, status, "{method} {target}");
        assert!(response.json()["error"].is_string(), "{method} {target}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_a_pending_long_poll() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let watcher = server.client();
    let poll =
        tokio::spawn(async move { watcher.wait_for_newer(0, Duration::from_secs(60)).await });
    tokio::time::timeout(Duration::from_secs(10), async {
        while server.state.store.watchers() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the long-poll reached the server");
    server.shutdown().await;
    match poll.await.expect("poll task") {
        Err(ClientError::Server { status: 503, .. }) => {}
        other => panic!("expected 503, got {other:?}"),
    }
}

#[test]
fn reopened_store_has_every_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ConfigStore::open(dir.path()).expect("open");
    for host in ["a.example.test", "b.example.test", "c.example.test"] {
        store
            .put(&doc_with_host(host), "a", host, None)
            .expect("put");
    }
    let before = store.history();
    drop(store);
    let store = ConfigStore::open(dir.path()).expect("reopen");
    assert_eq!(store.history(), before);
    assert_eq!(
        store.current().expect("current").document,
        doc_with_host("c.example.test")
    );
    assert_eq!(*store.subscribe().borrow(), 3);
    assert_eq!(
        store.put(DOC, "a", "four", Some(3)).expect("put").version,
        4
    );
}

#[test]
fn crash_leftovers_are_ignored_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ConfigStore::open(dir.path()).expect("open");
    store.put(DOC, "a", "one", None).expect("put 1");
    store
        .put(&doc_with_host("b.example.test"), "a", "two", None)
        .expect("put 2");
    drop(store);
    // Killed mid-write: a temp file, a document whose metadata never landed, metadata whose
    // document rename never happened.
    let temp = dir.path().join(".tmp-4242-0-v0000000003.toml");
    std::fs::write(&temp, "half a docu").expect("temp");
    std::fs::write(
        dir.path().join("v0000000003.toml"),
        doc_with_host("c.example.test"),
    )
    .expect("orphan doc");
    std::fs::write(
        dir.path().join("v0000000004.meta.json"),
        r#"{"version":4,"author":"a","message":"","timestamp":0,"sha256":"00"}"#,
    )
    .expect("orphan meta");

    let store = ConfigStore::open(dir.path()).expect("reopen");
    let versions: Vec<u64> = store.history().iter().map(|m| m.version).collect();
    assert_eq!(versions, [2, 1]);
    assert_eq!(
        store.current().expect("current").document,
        doc_with_host("b.example.test")
    );
    assert!(!temp.exists());
    let next = store.put(DOC, "a", "three", Some(2)).expect("put 3");
    assert_eq!(next.version, 3);
    assert_eq!(store.get(3).expect("version 3").document, DOC);
}

#[test]
fn sha256_in_meta_matches_the_stored_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ConfigStore::open(dir.path()).expect("open");
    let meta = store.put(DOC, "a", "one", None).expect("put");
    let on_disk = std::fs::read_to_string(dir.path().join("v0000000001.toml")).expect("doc");
    let meta_on_disk: VersionMeta = serde_json::from_slice(
        &std::fs::read(dir.path().join("v0000000001.meta.json")).expect("meta"),
    )
    .expect("meta JSON");
    assert_eq!(on_disk, DOC);
    assert_eq!(meta_on_disk, meta);
    assert_eq!(meta.sha256, content_hash(&on_disk));
    assert_eq!(meta.sha256.len(), 64);
}
