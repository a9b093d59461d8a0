//! `kill -9` a process that is writing versions as fast as it can, several times over, and check
//! that every acknowledged version survives intact and the store keeps working.
//!
//! The writer is this same test binary, re-run with `MERIDIAN_CRASH_WRITER_DIR` set, running
//! only `crash_writer`; it prints `committed N` after each `put` returns.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use meridian_config::content_hash;
use meridian_config_service::ConfigStore;

const WRITER_ENV: &str = "MERIDIAN_CRASH_WRITER_DIR";
const ROUNDS: usize = 3;
/// Acknowledged versions per round before the kill.
const ACKS_BEFORE_KILL: usize = 25;

fn document(n: u64) -> String {
    format!(
        r#"schema = 1
[[regions]]
name = "us-east"
location = {{ lat = 38.9, lon = -77.0 }}
upstreams = [{{ address = "127.1.2.1:7001" }}]
[[routes]]
name = "api"
hosts = ["h{n}.example.test"]
regions = "*"
"#
    )
}

/// Not a test on its own: the child process body (a no-op in a normal test run).
#[test]
fn crash_writer() {
    let Some(dir) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let store = ConfigStore::open(Path::new(&dir)).expect("writer opens the store");
    let mut stdout = std::io::stdout().lock();
    // Bounded so an orphaned writer stops on its own.
    for _ in 0..100_000 {
        let next = store.current_version() + 1;
        let meta = store
            .put(&document(next), "writer", "", None)
            .expect("writer put");
        writeln!(stdout, "committed {}", meta.version).expect("stdout");
        stdout.flush().expect("flush");
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill_9_while_writing_loses_no_acknowledged_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut last_acknowledged = 0;
    for _ in 0..ROUNDS {
        let child = Command::new(&exe)
            .args(["--exact", "crash_writer", "--nocapture", "--test-threads=1"])
            .env(WRITER_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn writer");
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().expect("writer stdout");
        let mut acks = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("writer output");
            if let Some(n) = line.strip_prefix("committed ") {
                last_acknowledged = n.parse().expect("version number");
                acks += 1;
                if acks == ACKS_BEFORE_KILL {
                    break;
                }
            }
        }
        assert_eq!(acks, ACKS_BEFORE_KILL, "the writer stopped early");
        // SIGKILL, most likely in the middle of the next put.
        drop(child);

        let store = ConfigStore::open(dir.path()).expect("reopen after kill");
        let history = store.history();
        let newest = history.first().expect("versions").version;
        assert!(newest >= last_acknowledged);
        // Versions are written in order, each only after the previous was acknowledged.
        let numbers: Vec<u64> = history.iter().rev().map(|m| m.version).collect();
        assert_eq!(numbers, (1..=newest).collect::<Vec<_>>());
        for meta in &history {
            let version = store.get(meta.version).expect("listed version");
            assert_eq!(version.document, document(meta.version));
            assert_eq!(meta.sha256, content_hash(&version.document));
        }
        let leftovers: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
