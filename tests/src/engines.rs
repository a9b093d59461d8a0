//! The real distributed engines the fleet tests run against: a 3-member etcd cluster and a Redis
//! server, each a child process on loopback ports with its data in a temp dir. They are the
//! Debian packages' binaries (`etcd`, `etcdctl`, `redis-server`; test.sh installs them).
//!
//! Every start waits on a readiness check (etcd's `/health` on each member, Redis `PING`), never
//! on a fixed delay. Everything is killed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long an engine may take to become ready before the test gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness probes (the probe itself is the wait condition).
const PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// Whether `binary` can be run (so a test can say clearly that test.sh was not used).
fn require(binary: &str) {
    let found = Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "`{binary}` is not installed: run test.sh (it installs etcd-server, etcd-client, redis-server)"
    );
}

/// Polls `ready` until it is true or [`READY_TIMEOUT`] passes.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not become ready");
        std::thread::sleep(PROBE_INTERVAL);
    }
}

/// A plain HTTP/1.0 GET on loopback; the body when the answer is 200.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    child: Option<Child>,
}

/// A 3-member etcd cluster on loopback addresses. Members can be killed and restarted (same data dir, so
/// a restarted member rejoins with its state).
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    pub fn start() -> EtcdCluster {
        Self::start_members(3)
    }

    pub fn start_members(count: usize) -> EtcdCluster {
        require("etcd");
        let dir = tempfile::tempdir().expect("etcd temp dir");
        let members: Vec<Member> = (0..count)
            .map(|i| Member {
                name: format!("m{i}"),
                client: crate::free_local_addr(),
                peer: crate::free_local_addr(),
                data: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            _dir: dir,
        };
        for i in 0..count {
            cluster.spawn(i);
        }
        cluster.wait_healthy();
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let member = &self.members[i];
        let log = std::fs::File::create(member.data.with_extension("log")).expect("etcd log");
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data)
            .arg("--listen-client-urls")
            .arg(format!("http://{}", member.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", member.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", member.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", member.peer))
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg("meridian-test")
            // Loopback peers: a short heartbeat makes a leader loss noticed (and a new leader
            // elected) quickly, which keeps the leader-kill tests short.
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .arg("--logger")
            .arg("zap")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("etcd starts");
        self.members[i].child = Some(child);
    }

    /// Client URLs of every member, for `--etcd` / `[control] etcd`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }

    /// Comma-separated client URLs (the `--etcd` flag's form).
    pub fn endpoint_list(&self) -> String {
        self.endpoints().join(",")
    }

    /// Waits until every running member reports itself healthy (which in etcd means a leader
    /// exists and the member can serve a quorum read).
    pub fn wait_healthy(&self) {
        for member in self.members.iter().filter(|m| m.child.is_some()) {
            wait_until(&format!("etcd member {}", member.name), || {
                http_get(member.client, "/health").is_some_and(|b| b.contains("\"true\""))
            });
        }
    }

    /// Index of the current leader, asked of the running members.
    pub fn leader(&self) -> usize {
        let mut found = None;
        wait_until("an etcd leader", || {
            found = self.ask_leader();
            found.is_some()
        });
        found.expect("leader found")
    }

    fn ask_leader(&self) -> Option<usize> {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://{}", m.client))
            .collect();
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(running.join(","))
            .args(["endpoint", "status", "-w", "json"])
            .output()
            .ok()?;
        let statuses: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        for status in statuses.as_array()? {
            let endpoint = status["Endpoint"].as_str()?;
            let member_id = status["Status"]["header"]["member_id"].as_u64()?;
            let leader = status["Status"]["leader"].as_u64()?;
            if member_id == leader && leader != 0 {
                return self
                    .members
                    .iter()
                    .position(|m| endpoint.ends_with(&m.client.to_string()));
            }
        }
        None
    }

    /// Compacts the cluster's history up to its current revision (what etcd's periodic
    /// auto-compaction does); returns that revision.
    pub fn compact(&self) -> i64 {
        let running = self.running_endpoints();
        let status = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&running)
            .args(["endpoint", "status", "-w", "json"])
            .output()
            .expect("etcdctl endpoint status");
        let statuses: serde_json::Value =
            serde_json::from_slice(&status.stdout).expect("endpoint status JSON");
        let revision = statuses
            .as_array()
            .and_then(|all| {
                all.iter()
                    .filter_map(|s| s["Status"]["header"]["revision"].as_i64())
                    .max()
            })
            .expect("a revision");
        let compacted = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&running)
            .args(["compact", &revision.to_string()])
            .status()
            .expect("etcdctl compact");
        assert!(compacted.success(), "etcdctl compact {revision}");
        revision
    }

    fn running_endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILLs member `i` and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts a killed member on its old ports and data; waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        if self.members[i].child.is_none() {
            self.spawn(i);
        }
        self.wait_healthy();
    }

    /// Kills every member (the whole cluster is down).
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Restarts every killed member and waits for the cluster to be healthy.
    pub fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        self.wait_healthy();
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A Redis server on a loopback address with no persistence, its working dir a temp dir.
pub struct Redis {
    addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        require("redis-server");
        let dir = tempfile::tempdir().expect("redis temp dir");
        let mut redis = Redis {
            addr: crate::free_local_addr(),
            child: None,
            dir,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("redis log");
        let child = Command::new("redis-server")
            .arg("--bind")
            .arg(self.addr.ip().to_string())
            .arg("--port")
            .arg(self.addr.port().to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let addr = self.addr;
        wait_until("redis-server", || ping(addr));
    }

    /// `redis://127.x.y.z:PORT`, for `[limits] redis`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SIGKILLs the server and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: it keeps no data).
    pub fn restart(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

/// An in-process `meridian config-server --etcd …` replica on an ephemeral port. Several can
/// run against one cluster.
pub struct EtcdConfigService {
    pub addr: SocketAddr,
    pub token: String,
    pub state: std::sync::Arc<meridian_config_service::ServiceState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EtcdConfigService {
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        endpoints: &[String],
        prefix: &str,
    ) -> EtcdConfigService {
        let store = runtime
            .block_on(meridian_config_service::EtcdStore::connect(
                endpoints, prefix, 0,
            ))
            .expect("config store on etcd");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind config service");
        let addr = listener.local_addr().expect("addr");
        let token = "test-token".to_string();
        let state = std::sync::Arc::new(meridian_config_service::ServiceState::with_store(
            std::sync::Arc::new(store),
            token.clone(),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = state.clone();
        let task = runtime.spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            let _ = meridian_config_service::serve(listener, serving, shutdown).await;
        });
        EtcdConfigService {
            addr,
            token,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> meridian_config_service::ConfigClient {
        meridian_config_service::ConfigClient::new(&self.url(), Some(self.token.clone()))
            .expect("client")
    }

    /// Stops the replica and waits for it to finish.
    pub fn stop(&mut self, runtime: &tokio::runtime::Runtime) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = runtime.block_on(task);
        }
    }
}

/// Another edge of `world` (same origins) whose `[control]` is `control`, with its last-good
/// cache in `cache_dir`, on fresh ephemeral ports.
pub fn start_edge_with_control(
    world: &crate::World,
    control: meridian_config::Control,
) -> meridian_gateway::edge::RunningEdge {
    let mut config = world.config.clone();
    config.edge.http = crate::free_local_addr().to_string();
    config.edge.admin.listen = "127.0.0.1:0".into();
    if config.edge.https.is_some() {
        config.edge.https = Some(crate::free_local_addr().to_string());
    }
    config.control = Some(control);
    crate::start_edge_from(config)
}
