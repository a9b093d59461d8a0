#!/usr/bin/env bash
# Builds the production `meridian` binary with profile-guided optimisation: an instrumented build
# serves a short training load on loopback (HTTP/1.1 proxied GET and POST, large responses, cache
# hits, h2 over TLS, HTTP/3; GeoDNS queries plain, with ECS and with DO), its profile is merged, and the final build lays out and inlines the
# code along the paths that load took. The request path is many small functions spread over
# several crates; the profile is what lets the compiler keep the hot ones together.
#
#   bash scripts/build-pgo.sh            # prints the path of the optimised binary on its last line
#   Env: CARGO_TARGET_DIR (default: target/pgo, kept apart from the ordinary build because every
#        crate is compiled with different flags), PGO_REQUESTS (20000 per training step).
#   The merged profile is kept as $CARGO_TARGET_DIR/merged.profdata.
#
# Needs `llvm-profdata` of the same LLVM major version as rustc (installed from Debian's
# llvm-N package when missing). Traffic stays on 127.0.0.0/8.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source scripts/ensure-packages.sh

LLVM_MAJOR="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
ensure_packages cmake protobuf-compiler dnsperf "llvm-$LLVM_MAJOR"
PROFDATA="$(command -v "llvm-profdata-$LLVM_MAJOR" || echo "/usr/lib/llvm-$LLVM_MAJOR/bin/llvm-profdata")"

TARGET="${CARGO_TARGET_DIR:-$ROOT/target/pgo}"
REQUESTS="${PGO_REQUESTS:-20000}"
source loadtest/bench/lib.sh
bench_workdir meridian-pgo

log "instrumented build"
RUSTFLAGS="-Cprofile-generate=$WORK/profiles" CARGO_TARGET_DIR="$TARGET/instrumented" \
  cargo build --release -q -p meridian-gateway --bin meridian
# The generator is not profiled: an ordinary release build of it.
CARGO_TARGET_DIR="$TARGET/tools" cargo build --release -q -p meridian-loadtest --bin meridian-loadtest
LOADTEST="$TARGET/tools/release/meridian-loadtest"

ORIGIN_PORT=18300 EDGE_PORT=18301 ADMIN_PORT=18302 TLS_PORT=18303 DNS_PORT=18304
"$LOADTEST" origin --listen "127.0.0.1:$ORIGIN_PORT" --threads 1 --body-bytes 1024 >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
wait_port "$ORIGIN_PORT"

throwaway_tls "$WORK" pgo.example.test leaf

# GeoDNS is trained too: code a profile never saw is laid out as cold.
"$TARGET/instrumented/release/meridian" geoip build-test-world "$WORK/test-world.mmdb" >/dev/null
"$TARGET/instrumented/release/meridian" dns keygen --out "$WORK/zone.key" >/dev/null

cat >"$WORK/meridian.toml" <<CONF
schema = 1

[edge]
pop = "pgo-1"
http = "127.0.0.1:$EDGE_PORT"
admin = "127.0.0.1:$ADMIN_PORT"
https = "127.0.0.1:$TLS_PORT"
h3 = true
threads = 1
shutdown_grace = "1s"
shutdown_timeout = "2s"

[[tls.certificates]]
hosts = ["pgo.example.test"]
cert = "$WORK/leaf.crt"
key = "$WORK/leaf.key"

[[regions]]
name = "origin"
location = { lat = 50.1, lon = 8.68 }
upstreams = [{ address = "127.0.0.1:$ORIGIN_PORT", weight = 1 }]

[[routes]]
name = "api"
hosts = ["pgo.example.test"]
path_prefix = "/"
kind = "api"
regions = ["origin"]
default_region = "origin"

[[routes]]
name = "cached"
hosts = ["pgo.example.test"]
path_prefix = "/cached"
kind = "api"
regions = ["origin"]
default_region = "origin"
cache = { enabled = true, default_ttl = "60s" }

[geoip]
database = "$WORK/test-world.mmdb"

[dns]
listen = "127.0.0.1:$DNS_PORT"
zone = "example.test"
ttl = 30
ns = ["ns1.example.net"]
answers = 1
default_pops = ["virginia"]
soa = { rname = "hostmaster.example.test", serial = 1, refresh = 3600, retry = 600, expire = 86400, minimum = 60 }
# One client asks everything: rate limiting would answer most of it with drops.
rrl = { responses_per_second = 0 }

[dns.dnssec]
key_file = "$WORK/zone.key"

[[dns.records]]
name = "api"

[[pops]]
name = "virginia"
location = { lat = 38.9, lon = -77.0 }
addresses = ["127.2.1.1", "2001:db8:1::1"]

[[pops]]
name = "seoul"
location = { lat = 37.57, lon = 126.98 }
addresses = ["127.2.6.1", "2001:db8:6::1"]

[[pops]]
name = "frankfurt"
location = { lat = 50.1, lon = 8.68 }
addresses = ["127.2.8.1", "2001:db8:8::1"]
CONF
"$TARGET/instrumented/release/meridian" config validate "$WORK/meridian.toml" >&2
"$TARGET/instrumented/release/meridian" serve --config "$WORK/meridian.toml" >"$WORK/meridian.log" 2>&1 &
EDGE_PID=$!
PIDS+=("$EDGE_PID")
wait_port "$EDGE_PORT"
wait_port "$TLS_PORT"
wait_port "$DNS_PORT"

head -c 16384 /dev/zero | tr '\0' 'p' >"$WORK/post16k.bin"
train() {
  log "training: $*"
  "$LOADTEST" "$@" --host pgo.example.test -c 32 -q --timeout 10s >/dev/null
}
train "http://127.0.0.1:$EDGE_PORT/bench" -n "$REQUESTS"
train "http://127.0.0.1:$EDGE_PORT/bench" -n "$REQUESTS" -m POST --body-file "$WORK/post16k.bin"
train "http://127.0.0.1:$EDGE_PORT/bench?bytes=65536" -n "$(( REQUESTS / 4 ))"
train "http://127.0.0.1:$EDGE_PORT/cached" -n "$REQUESTS"
train "https://127.0.0.1:$TLS_PORT/bench" -p h2 --cacert "$WORK/ca.crt" -n "$(( REQUESTS / 4 ))"
train "https://127.0.0.1:$TLS_PORT/bench" -p h3 --cacert "$WORK/ca.crt" -n "$(( REQUESTS / 4 ))"

printf '%s\n' "api.example.test A" "api.example.test AAAA" "nope.example.test A" "example.test SOA" \
  >"$WORK/queries.txt"
# ECS option (code 8): family 1, source /24, scope 0, the first three bytes of 127.17.0.0.
for extra in "" "-E 8:00011800$(printf '%02x%02x%02x' 127 17 0)" "-D"; do
  log "training: dnsperf $extra"
  # shellcheck disable=SC2086
  dnsperf -s 127.0.0.1 -p "$DNS_PORT" -d "$WORK/queries.txt" -n 5000 -c 2 -q 20 $extra >/dev/null
done

# The profile is written when the process exits normally.
kill -TERM "$EDGE_PID"
wait "$EDGE_PID" || true
"$PROFDATA" merge -o "$TARGET/merged.profdata" "$WORK/profiles"

log "optimised build"
RUSTFLAGS="-Cprofile-use=$TARGET/merged.profdata" CARGO_TARGET_DIR="$TARGET/optimised" \
  cargo build --release -q -p meridian-gateway --bin meridian
echo "$TARGET/optimised/release/meridian"
