#!/usr/bin/env bash
# Meridian's whole test suite, as CI runs it: install missing system packages, then lint and test
# the workspace with one shared build.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure-packages.sh
# etcd-server/etcd-client/redis-server: the fleet tests run the real engines (tests/src/engines.rs).
# protobuf-compiler + libprotobuf-dev: the etcd client generates its gRPC code at build time.
ensure_packages cmake protobuf-compiler libprotobuf-dev prometheus chromium etcd-server etcd-client redis-server bind9-dnsutils
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --no-fail-fast
