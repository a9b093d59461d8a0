#!/usr/bin/env bash
# Run Meridian's demo on a fresh Debian machine: install missing build packages, then build and start.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure-packages.sh
ensure_packages cmake
exec cargo run --release -- demo "$@"
