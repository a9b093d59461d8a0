#!/usr/bin/env bash
# Side-by-side benchmark: NGINX, HAProxy and Meridian in front of the same fake origin, same load,
# same machine. Writes loadtest/bench/results.md (ratios relative to NGINX) and the JSON reports.
#
#   bash loadtest/bench/run.sh                 # 10 s per run, 2 interleaved rounds
#   DURATION=5s ROUNDS=1 bash loadtest/bench/run.sh
#   Env: DURATION, ROUNDS, CONNECTIONS (64), RATE (open loop, 5000/s), LOADGEN_THREADS (1),
#        OUT (JSON dir), MERIDIAN_BIN / LOADTEST_BIN / PINGORA_BIN (prebuilt binaries: skip building
#        meridian, meridian-loadtest, the bare_pingora example), CARGO_TARGET_DIR,
#        PGO=1 (Meridian built by scripts/build-pgo.sh, profile-guided, unless MERIDIAN_BIN is set),
#        CACHE_ONLY=1 (only the cache-hit scenario), TLS=0 (skip the Meridian-only TLS/QUIC runs),
#        BASELINE_BIN (a second `meridian`, e.g. built from an earlier commit: it runs beside the
#        others as `meridian-base`, so a change is measured against its baseline in the same run),
#        IDLE (10000: kept-alive connections held idle for the RSS-per-connection scenario; 0 skips it),
#        IDLE_SETTLE (3: seconds the idle connections sit before the RSS is read),
#        SLOW (1000: slowloris connections against Meridian while CONNECTIONS normal clients run get-1k;
#        0 skips it), SLOW_HEADER_TIMEOUT (10s: Meridian's edge.limits.client_header_timeout here),
#        SLOW_CAP (30s: a slow connection still open this long after its connect is given up),
#        SLOW_LOAD_DURATION (12s: the normal get-1k runs of the slowloris scenario, alone and beside).
#
# Proxies: NGINX, HAProxy, Meridian and `pingora` — a bare Pingora ProxyHttp to the same origin
# (gateway/examples/bare_pingora.rs), the ceiling of the framework Meridian's TCP front started from.
#
# Traffic stays on 127.0.0.0/8; every process started here is stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BENCH="$ROOT/loadtest/bench"
OUT="${OUT:-$BENCH/results}"
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
RATE="${RATE:-5000}"
LOADGEN_THREADS="${LOADGEN_THREADS:-1}"
IDLE="${IDLE:-10000}"
IDLE_SETTLE="${IDLE_SETTLE:-3}"
IDLE_SETTLE_HOLD="$(( IDLE_SETTLE + 2 ))s"
SLOW="${SLOW:-1000}"
SLOW_HEADER_TIMEOUT="${SLOW_HEADER_TIMEOUT:-10s}"
SLOW_CAP="${SLOW_CAP:-30s}"
# Long enough that the normal load is still running when the slow connections are closed.
SLOW_LOAD_DURATION="${SLOW_LOAD_DURATION:-12s}"
# Every proxy (and the generator) needs a descriptor per idle connection, plus slack.
ulimit -n "$(ulimit -Hn)"
FD_SLACK=1024
NOFILE="$(ulimit -n)"; [ "$NOFILE" = unlimited ] && NOFILE=1048576
MAXCONN=$(( IDLE + SLOW + FD_SLACK > 4096 ? IDLE + SLOW + FD_SLACK : 4096 ))
# HAProxy reserves two descriptors per connection (client and server side) and refuses to start
# when maxconn needs more than the open-file limit, so its maxconn (and its share of the idle
# scenario) may be lower than the others' when the hard limit is tight.
HAPROXY_MAXCONN=$(( (NOFILE - 64) / 2 < MAXCONN ? (NOFILE - 64) / 2 : MAXCONN ))
HAPROXY_IDLE=$(( HAPROXY_MAXCONN - 64 < IDLE ? HAPROXY_MAXCONN - 64 : IDLE ))
if [ "$NOFILE" -lt "$(( IDLE + FD_SLACK ))" ]; then
  echo "IDLE=$IDLE needs an open-file limit above $(( IDLE + FD_SLACK )); the hard limit is $NOFILE" >&2
  exit 1
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

ORIGIN_PORT=18100
NGINX_PORT=18101
NGINX_CACHE_PORT=18102
HAPROXY_PORT=18103
MERIDIAN_PORT=18104
MERIDIAN_ADMIN_PORT=18105
MERIDIAN_TLS_PORT=18106
BASE_PORT=18107
BASE_ADMIN_PORT=18108
BASE_TLS_PORT=18109
PINGORA_PORT=18110

WORK="$(mktemp -d /tmp/meridian-bench.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

source "$ROOT/loadtest/bench/lib.sh"

# --- tools ---------------------------------------------------------------------------------------
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v cmake >/dev/null || missing+=(cmake)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"
# The Debian packages start system services; this benchmark runs its own instances only.
systemctl stop nginx haproxy >/dev/null 2>&1 || true

if [ "${PGO:-0}" = 1 ] && [ -z "${MERIDIAN_BIN:-}" ]; then
  log "building meridian with profile-guided optimisation (scripts/build-pgo.sh)"
  MERIDIAN_BIN="$(CARGO_TARGET_DIR="$CARGO_TARGET_DIR/pgo" bash "$ROOT/scripts/build-pgo.sh" | tail -1)"
fi
# MERIDIAN_BIN=path uses an already built `meridian` (e.g. one built from a clean checkout).
# The bare Pingora proxy is built from this tree (it is the framework, not Meridian), like the
# generator; LOADTEST_BIN / PINGORA_BIN use prebuilt ones instead (all three set: no cargo at all).
build=()
if [ -z "${MERIDIAN_BIN:-}" ] || [ -z "${PINGORA_BIN:-}" ]; then build+=(-p meridian-gateway); fi
if [ -z "${MERIDIAN_BIN:-}" ]; then build+=(--bin meridian); fi
if [ -z "${PINGORA_BIN:-}" ]; then build+=(--example bare_pingora); fi
if [ -z "${LOADTEST_BIN:-}" ]; then build+=(-p meridian-loadtest --bin meridian-loadtest); fi
if [ "${#build[@]}" -gt 0 ]; then
  log "building (release): ${build[*]}"
  (cd "$ROOT" && cargo build --release -q "${build[@]}")
fi
MERIDIAN="${MERIDIAN_BIN:-$CARGO_TARGET_DIR/release/meridian}"
LOADTEST="${LOADTEST_BIN:-$CARGO_TARGET_DIR/release/meridian-loadtest}"
PINGORA="${PINGORA_BIN:-$CARGO_TARGET_DIR/release/examples/bare_pingora}"

mkdir -p "$OUT"
rm -f "$OUT"/*.json


# --- origin --------------------------------------------------------------------------------------
"$LOADTEST" origin --listen "127.0.0.1:$ORIGIN_PORT" --threads 1 --body-bytes 1024 >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
ORIGIN_PID=$!
wait_port "$ORIGIN_PORT"

# --- NGINX: one worker, upstream keepalive; a second server block with proxy_cache ---------------
mkdir -p "$WORK/nginx/cache" "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<CONF
user root;
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $MAXCONN; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
  scgi_temp_path $WORK/nginx/tmp/scgi;
  client_max_body_size 10m;
  # Keep request bodies in memory like the other proxies (the 16k default spools a 16 KiB POST to a
  # temp file, which made NGINX ~25x slower on post-16k in a trial run).
  client_body_buffer_size 64k;
  keepalive_requests 1000000;
  proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=bench:10m max_size=256m inactive=10m;
  upstream origin {
    server 127.0.0.1:$ORIGIN_PORT;
    keepalive 128;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
    }
  }
  server {
    listen 127.0.0.1:$NGINX_CACHE_PORT;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_valid 200 10m;
      add_header x-meridian-cache \$upstream_cache_status;
    }
  }
}
CONF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" >"$WORK/nginx/stdout.log" 2>&1 &
PIDS+=($!)
NGINX_MASTER=$!

# --- HAProxy: one thread, connection reuse always -------------------------------------------------
cat >"$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn $HAPROXY_MAXCONN
defaults
  mode http
  maxconn $HAPROXY_MAXCONN
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend bench
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend origin
backend origin
  server o1 127.0.0.1:$ORIGIN_PORT maxconn 1000
CONF
"$HAPROXY" -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
HAPROXY_PID=$!

# --- Meridian: one region whose only upstream is the origin, one thread ---------------------------
# TLS for the Meridian-only runs (h1/h2 over TLS, h3 over QUIC): a throwaway CA and a leaf for
# bench.example.test, made with openssl so the script needs nothing from the repo but the binaries.
throwaway_tls "$WORK" bench.example.test bench
cat >"$WORK/meridian.toml" <<CONF
schema = 1

[edge]
pop = "bench-1"
http = "127.0.0.1:$MERIDIAN_PORT"
admin = "127.0.0.1:$MERIDIAN_ADMIN_PORT"
https = "127.0.0.1:$MERIDIAN_TLS_PORT"
h3 = true
threads = 1
shutdown_grace = "1s"
shutdown_timeout = "2s"

[edge.limits]
max_body_bytes = 10485760
client_header_timeout = "$SLOW_HEADER_TIMEOUT"

[[tls.certificates]]
hosts = ["bench.example.test"]
cert = "$WORK/bench.crt"
key = "$WORK/bench.key"

[[regions]]
name = "bench"
location = { lat = 50.1, lon = 8.68 }
upstreams = [{ address = "127.0.0.1:$ORIGIN_PORT", weight = 1 }]

$(bench_routes)
CONF
"$MERIDIAN" config validate "$WORK/meridian.toml" >&2
"$MERIDIAN" serve --config "$WORK/meridian.toml" >"$WORK/meridian.log" 2>&1 &
PIDS+=($!)
MERIDIAN_PID=$!

# --- bare Pingora: a fixed-peer ProxyHttp, one thread, no work stealing, mimalloc --------------------
"$PINGORA" "127.0.0.1:$PINGORA_PORT" "127.0.0.1:$ORIGIN_PORT" >"$WORK/pingora.log" 2>&1 &
PIDS+=($!)
PINGORA_PID=$!

BASE_PID=""
if [ -n "${BASELINE_BIN:-}" ]; then
  sed -e "s/127.0.0.1:$MERIDIAN_PORT/127.0.0.1:$BASE_PORT/" \
      -e "s/127.0.0.1:$MERIDIAN_ADMIN_PORT/127.0.0.1:$BASE_ADMIN_PORT/" \
      -e "s/127.0.0.1:$MERIDIAN_TLS_PORT/127.0.0.1:$BASE_TLS_PORT/" \
      -e 's/pop = "bench-1"/pop = "bench-base"/' "$WORK/meridian.toml" >"$WORK/base.toml"
  "$BASELINE_BIN" serve --config "$WORK/base.toml" >"$WORK/base.log" 2>&1 &
  PIDS+=($!)
  BASE_PID=$!
  wait_port "$BASE_PORT"
fi

wait_port "$NGINX_PORT"; wait_port "$NGINX_CACHE_PORT"; wait_port "$HAPROXY_PORT"; wait_port "$MERIDIAN_PORT"
wait_port "$MERIDIAN_TLS_PORT"; wait_port "$PINGORA_PORT"
# NGINX's worker is the process that does the work (the master only supervises).
NGINX_WORKER="$(pgrep -P "$NGINX_MASTER" | head -1 || true)"
NGINX_WORKER="${NGINX_WORKER:-$NGINX_MASTER}"

head -c 16384 /dev/zero | tr '\0' 'p' >"$WORK/post16k.bin"

peak_rss_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# Resident memory of every proxy before any load: the idle process RSS.
declare -A START_RSS=(["nginx"]="$(rss_kb "$NGINX_WORKER")" ["haproxy"]="$(rss_kb "$HAPROXY_PID")"
                      ["meridian"]="$(rss_kb "$MERIDIAN_PID")" ["pingora"]="$(rss_kb "$PINGORA_PID")")
if [ -n "$BASE_PID" ]; then START_RSS["meridian-base"]="$(rss_kb "$BASE_PID")"; fi

# run_one SCENARIO PROXY PID PORT ROUND [loadtest args...]   (SCHEME=https for the TLS runs)
run_one() {
  local scenario=$1 proxy=$2 pid=$3 port=$4 round=$5
  shift 5
  local json="$OUT/$scenario.$proxy.r$round.json"
  local before after origin_before origin_after
  # The proxy's and the origin's CPU (user and system apart); the generator reports its own.
  before=$(cpu_split "$pid"); origin_before=$(cpu_split "$ORIGIN_PID")
  "$LOADTEST" "${SCHEME:-http}://127.0.0.1:$port$PATH_QUERY" --host bench.example.test --threads "$LOADGEN_THREADS" \
    --timeout 10s -q --json "$json" "$@" >"$WORK/last.txt"
  after=$(cpu_split "$pid"); origin_after=$(cpu_split "$ORIGIN_PID")
  local hz; hz=$(getconf CLK_TCK)
  python3 - "$json" "$before" "$after" "$hz" "$(peak_rss_kb "$pid")" "$proxy" "$scenario" "$round" \
    "$origin_before" "$origin_after" <<'PY'
import json, sys
path, before, after, hz, rss, proxy, scenario, rnd, o_before, o_after = sys.argv[1:]
def spent(b, a):
    (bu, bs), (au, as_) = map(int, b.split()), map(int, a.split())
    return (au - bu) / int(hz), (as_ - bs) / int(hz)
user, system = spent(before, after)
o_user, o_system = spent(o_before, o_after)
r = json.load(open(path))
r["bench"] = {"proxy": proxy, "scenario": scenario, "round": int(rnd),
              "cpu_s": user + system, "cpu_user_s": user, "cpu_system_s": system,
              "origin_cpu_user_s": o_user, "origin_cpu_system_s": o_system,
              "peak_rss_kb": int(rss)}
json.dump(r, open(path, "w"), indent=2)
PY
  log "$scenario / $proxy / round $round: $(grep -E '^  (throughput|latency) ' "$WORK/last.txt" | tr -s ' ' | tr '\n' ';')"
}

# Scenarios: name, path, extra loadtest args. The cache-hit scenario (path /cached) runs against
# NGINX proxy_cache and Meridian's cache-enabled route only.
declare -a SCEN_NAMES=("get-1k" "get-64k" "post-16k" "open-loop-${RATE}rps")
declare -A SCEN_PATH=(["get-1k"]="/bench" ["get-64k"]="/bench?bytes=65536" ["post-16k"]="/bench"
                      ["open-loop-${RATE}rps"]="/bench")
declare -A SCEN_ARGS=(["get-1k"]="-c $CONNECTIONS -d $DURATION"
                      ["get-64k"]="-c $CONNECTIONS -d $DURATION"
                      ["post-16k"]="-c $CONNECTIONS -d $DURATION -m POST --body-file $WORK/post16k.bin"
                      ["open-loop-${RATE}rps"]="-c $CONNECTIONS -d $DURATION --rate $RATE")

# CACHE_ONLY=1: only the cache-hit scenario (NGINX proxy_cache vs Meridian's cache).
if [ "${CACHE_ONLY:-0}" = 1 ]; then SCEN_NAMES=(); fi

for round in $(seq 1 "$ROUNDS"); do
  for scenario in "${SCEN_NAMES[@]}"; do
    PATH_QUERY="${SCEN_PATH[$scenario]}"
    # Interleave: the order of proxies rotates every round.
    order=("nginx:$NGINX_WORKER:$NGINX_PORT" "haproxy:$HAPROXY_PID:$HAPROXY_PORT" "meridian:$MERIDIAN_PID:$MERIDIAN_PORT"
           "pingora:$PINGORA_PID:$PINGORA_PORT")
    if [ $((round % 2)) -eq 0 ]; then
      order=("pingora:$PINGORA_PID:$PINGORA_PORT" "meridian:$MERIDIAN_PID:$MERIDIAN_PORT"
             "haproxy:$HAPROXY_PID:$HAPROXY_PORT" "nginx:$NGINX_WORKER:$NGINX_PORT")
    fi
    if [ -n "$BASE_PID" ]; then order+=("meridian-base:$BASE_PID:$BASE_PORT"); fi
    for entry in "${order[@]}"; do
      IFS=: read -r proxy pid port <<<"$entry"
      # shellcheck disable=SC2086
      run_one "$scenario" "$proxy" "$pid" "$port" "$round" ${SCEN_ARGS[$scenario]}
    done
  done
  PATH_QUERY="/cached"
  cache_order=("nginx-cache:$NGINX_WORKER:$NGINX_CACHE_PORT" "meridian-cache:$MERIDIAN_PID:$MERIDIAN_PORT")
  if [ $((round % 2)) -eq 0 ]; then
    cache_order=("meridian-cache:$MERIDIAN_PID:$MERIDIAN_PORT" "nginx-cache:$NGINX_WORKER:$NGINX_CACHE_PORT")
  fi
  if [ -n "$BASE_PID" ]; then cache_order+=("meridian-base-cache:$BASE_PID:$BASE_PORT"); fi
  for entry in "${cache_order[@]}"; do
    IFS=: read -r proxy pid port <<<"$entry"
    run_one "cache-hit" "$proxy" "$pid" "$port" "$round" -c "$CONNECTIONS" -d "$DURATION"
  done
  # Meridian only: the same GET 1 KiB over TLS (h1, h2) and QUIC (h3) — request throughput on
  # kept-alive connections, then handshake throughput (--reconnect: a new TCP+TLS or QUIC
  # handshake for every request, 16 connections). h2/h3 run 8 connections x 8 streams = 64 lanes.
  if [ "${TLS:-1}" = 1 ] && [ "${CACHE_ONLY:-0}" != 1 ]; then
    PATH_QUERY="/bench"
    tls=(--cacert "$WORK/ca.crt" --sni bench.example.test)
    SCHEME=https run_one "tls-h1" meridian "$MERIDIAN_PID" "$MERIDIAN_TLS_PORT" "$round" \
      -p h1 -c "$CONNECTIONS" -d "$DURATION" "${tls[@]}"
    SCHEME=https run_one "tls-h2" meridian "$MERIDIAN_PID" "$MERIDIAN_TLS_PORT" "$round" \
      -p h2 -c 8 --streams 8 -d "$DURATION" "${tls[@]}"
    SCHEME=https run_one "quic-h3" meridian "$MERIDIAN_PID" "$MERIDIAN_TLS_PORT" "$round" \
      -p h3 -c 8 --streams 8 -d "$DURATION" "${tls[@]}"
    for proto in h1 h2 h3; do
      SCHEME=https run_one "handshake-$proto" meridian "$MERIDIAN_PID" "$MERIDIAN_TLS_PORT" "$round" \
        -p "$proto" -c 16 -d "$DURATION" --reconnect "${tls[@]}"
    done
  fi
done

# --- idle keep-alive connections: RSS per connection ----------------------------------------------
# IDLE connections, each answered once (GET 1 KiB) and then held idle; the proxy's resident memory
# is read just before they open and once they are all open (the NGINX worker, the others' only
# process). The server gets a second after the last answer to finish its per-request work.
idle_one() {
  local proxy=$1 pid=$2 port=$3 count=$4
  local json="$OUT/idle.$proxy.json" txt="$WORK/idle.$proxy.txt"
  local before with lt
  before=$(rss_kb "$pid")
  : >"$txt"  # exists before the poll below reads it
  "$LOADTEST" "http://127.0.0.1:$port/bench" --host bench.example.test --idle "$count" --idle-for "$IDLE_SETTLE_HOLD" \
    --threads "$LOADGEN_THREADS" --timeout 30s --json "$json" >"$txt" 2>&1 &
  lt=$!
  for _ in $(seq 1 1200); do
    if grep -q '^ready:' "$txt" || ! kill -0 "$lt" 2>/dev/null; then break; fi
    sleep 0.1
  done
  # Measured once the connections have sat idle a while: allocators hand the memory freed after
  # the opening burst back to the OS on a delay (mimalloc: 1 s), and an idle connection is what
  # this scenario prices, not the burst that opened it. Every proxy gets the same wait.
  sleep "$IDLE_SETTLE"
  with=$(rss_kb "$pid")
  wait "$lt" || { echo "idle run against $proxy failed: $(cat "$txt")" >&2; return 1; }
  python3 - "$json" "$proxy" "${START_RSS[$proxy]}" "$before" "$with" <<'PY'
import json, sys
path, proxy, start, before, with_ = sys.argv[1:]
r = json.load(open(path))
r["idle_bench"] = {"proxy": proxy, "start_rss_kb": int(start), "before_rss_kb": int(before),
                   "with_rss_kb": int(with_)}
json.dump(r, open(path, "w"), indent=2)
PY
  log "idle / $proxy: $(head -1 "$txt"); RSS ${before} KiB -> ${with} KiB"
}
if [ "$IDLE" -gt 0 ] && [ "${CACHE_ONLY:-0}" != 1 ]; then
  idle_order=("nginx:$NGINX_WORKER:$NGINX_PORT" "haproxy:$HAPROXY_PID:$HAPROXY_PORT"
              "meridian:$MERIDIAN_PID:$MERIDIAN_PORT" "pingora:$PINGORA_PID:$PINGORA_PORT")
  if [ -n "$BASE_PID" ]; then idle_order+=("meridian-base:$BASE_PID:$BASE_PORT"); fi
  for entry in "${idle_order[@]}"; do
    IFS=: read -r proxy pid port <<<"$entry"
    count=$IDLE
    if [ "$proxy" = haproxy ]; then count=$HAPROXY_IDLE; fi
    idle_one "$proxy" "$pid" "$port" "$count"
  done
fi

# --- slowloris against Meridian beside a normal load -----------------------------------------------
# SLOW connections trickle a head that never completes (a byte a second) while CONNECTIONS clients
# run get-1k for SLOW_LOAD_DURATION (past the header timeout, so the closing happens under load);
# the same get-1k right before, unloaded, is the reference for errors and p99. The
# slow connections should be answered 408 and closed at SLOW_HEADER_TIMEOUT; any still open at
# SLOW_CAP is given up and counted as such.
if [ "$SLOW" -gt 0 ] && [ "${CACHE_ONLY:-0}" != 1 ]; then
  PATH_QUERY="/bench"
  run_one "slowloris-unloaded" meridian "$MERIDIAN_PID" "$MERIDIAN_PORT" 1 -c "$CONNECTIONS" -d "$SLOW_LOAD_DURATION"
  "$LOADTEST" "http://127.0.0.1:$MERIDIAN_PORT/bench" --host bench.example.test --slow "$SLOW" \
    --slow-interval 1s --slow-for "$SLOW_CAP" --threads 1 --json "$OUT/slowloris.json" \
    >"$WORK/slowloris.txt" 2>&1 &
  slow_pid=$!
  # The slow connections open within a fraction of a second (256 connects in flight); start the
  # normal load once they have.
  for _ in $(seq 1 100); do
    open=$(ss -Htn state established "( dport = :$MERIDIAN_PORT )" 2>/dev/null | wc -l)
    if [ "$open" -ge "$SLOW" ]; then break; fi
    sleep 0.1
  done
  run_one "slowloris-loaded" meridian "$MERIDIAN_PID" "$MERIDIAN_PORT" 1 -c "$CONNECTIONS" -d "$SLOW_LOAD_DURATION"
  wait "$slow_pid" || { echo "slowloris run failed: $(cat "$WORK/slowloris.txt")" >&2; exit 1; }
  python3 - "$OUT/slowloris.json" "$SLOW_HEADER_TIMEOUT" <<'PY'
import json, sys
path, timeout = sys.argv[1:]
r = json.load(open(path))
r["header_timeout"] = timeout
json.dump(r, open(path, "w"), indent=2)
PY
  log "slowloris / meridian: $(grep -E '^  (closed by server|still open at cap|time to close|server answered)' \
    "$WORK/slowloris.txt" | tr -s ' ' | tr '\n' ';')"
fi

python3 "$BENCH/table.py" "$OUT" "$(nproc)" "$DURATION" "$CONNECTIONS" "$LOADGEN_THREADS" >"$BENCH/results.md"
cat "$BENCH/results.md"
