//! Helpers shared by the load generator's integration tests: run the binary, read its report.

#![allow(dead_code)] // each test crate uses its own subset

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_meridian-loadtest");

/// Runs `meridian-loadtest ARGS --quiet --threads 2 --json FILE`; panics with its stderr when it
/// fails. Returns the process output and the parsed JSON report.
pub fn run_load(args: &[&str]) -> (Output, Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let output = Command::new(BIN)
        .args(args)
        .args(["--quiet", "--threads", "2", "--json"])
        .arg(&json)
        .output()
        .expect("run meridian-loadtest");
    assert!(
        output.status.success(),
        "meridian-loadtest {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (output, read_json(&json))
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read report");
    serde_json::from_str(&text).expect("report is JSON")
}

/// The count at `pointer` in a report.
pub fn u(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} missing or not a count in {v:#}"))
}
