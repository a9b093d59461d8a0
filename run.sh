#!/usr/bin/env bash
# Run Meridian's demo on a fresh Debian machine: install missing build packages, then build and start.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure-packages.sh
# protobuf-compiler + libprotobuf-dev: the etcd client generates its gRPC code at build time.
ensure_packages cmake protobuf-compiler libprotobuf-dev
exec cargo run --release -- demo "$@"
