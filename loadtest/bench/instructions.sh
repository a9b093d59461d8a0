#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind (callgrind): NGINX, HAProxy, Meridian and the
# bare Pingora proxy in front of the same origin, the same fixed number of keep-alive GETs of 1 KiB.
# Instruction counts do not depend on what else the machine is doing, so this runs (and compares)
# on a busy machine where requests/s cannot; it is a guide to CPU per request, not a speed figure.
#
#   bash loadtest/bench/instructions.sh
#   Env: REQUESTS (20000 measured, after 2000 warm-up), CONNECTIONS (16), MERIDIAN_BIN, PINGORA_BIN,
#        LOADTEST_BIN, CARGO_TARGET_DIR, OUT (loadtest/bench/results), ONLY (a space-separated subset
#        of "nginx haproxy pingora meridian"), KEEP (a directory: the callgrind profiles are copied
#        there, for `callgrind_annotate`), CACHE=1 (count cache hits instead: NGINX `proxy_cache`
#        against Meridian's response cache, same path, every measured request a hit), POST=1
#        (count proxied POSTs of a 16 KiB body instead of GETs: every proxy, same origin),
#        CACHE_SIM=1 (valgrind's cache simulation too: data writes, L1 instruction misses and L1
#        data read and write misses per request beside the instructions — how much code and
#        memory a request touches, which instruction counts alone do not show).
#
# Traffic stays on 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-$ROOT/loadtest/bench/results}"
REQUESTS="${REQUESTS:-20000}"
WARMUP=2000
CONNECTIONS="${CONNECTIONS:-16}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
source "$ROOT/loadtest/bench/lib.sh"
bench_workdir meridian-instr

ensure_tools valgrind:valgrind callgrind_control:valgrind nginx:nginx haproxy:haproxy
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"

if [ -z "${MERIDIAN_BIN:-}" ] || [ -z "${LOADTEST_BIN:-}" ] || [ -z "${PINGORA_BIN:-}" ]; then
  log "building (release)"
  (cd "$ROOT" && cargo build --release -q -p meridian-gateway --bin meridian --example bare_pingora \
    && cargo build --release -q -p meridian-loadtest)
fi
MERIDIAN="${MERIDIAN_BIN:-$CARGO_TARGET_DIR/release/meridian}"
PINGORA="${PINGORA_BIN:-$CARGO_TARGET_DIR/release/examples/bare_pingora}"
LOADTEST="${LOADTEST_BIN:-$CARGO_TARGET_DIR/release/meridian-loadtest}"

ORIGIN_PORT=18200; NGINX_PORT=18201; HAPROXY_PORT=18202
MERIDIAN_PORT=18203; MERIDIAN_ADMIN_PORT=18204; PINGORA_PORT=18205

# Under valgrind a proxy takes a while to start listening.
wait_port_slowly() {
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listening on 127.0.0.1:$1" >&2
  return 1
}

"$LOADTEST" origin --listen "127.0.0.1:$ORIGIN_PORT" --threads 1 --body-bytes 1024 >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
wait_port "$ORIGIN_PORT"

mkdir -p "$WORK/nginx/tmp" "$WORK/nginx/cache"
# CACHE=1: the measured path is cached by NGINX and Meridian (the warm-up fills the entry); HAProxy
# and the bare Pingora proxy have no cache and are left out.
TARGET_PATH=/bench
if [ "${CACHE:-0}" = 1 ]; then TARGET_PATH=/cached; ONLY="${ONLY:-nginx meridian}"; fi
REQUEST_ARGS=()
if [ "${POST:-0}" = 1 ]; then
  head -c 16384 /dev/zero | tr '\0' 'p' >"$WORK/body"
  REQUEST_ARGS=(-m POST --body-file "$WORK/body")
fi
cat >"$WORK/nginx/nginx.conf" <<CONF
master_process off;
daemon off;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
  scgi_temp_path $WORK/nginx/tmp/scgi;
  keepalive_requests 1000000;
  proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=bench:10m max_size=256m inactive=10m;
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location /cached {
      proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache bench; proxy_cache_valid 200 10m;
      add_header x-meridian-cache \$upstream_cache_status;
    }
  }
}
CONF
cat >"$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
defaults
  mode http
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
cat >"$WORK/meridian.toml" <<CONF
schema = 1
[edge]
pop = "bench-1"
http = "127.0.0.1:$MERIDIAN_PORT"
admin = "127.0.0.1:$MERIDIAN_ADMIN_PORT"
threads = 1
shutdown_grace = "1s"
shutdown_timeout = "2s"
[[regions]]
name = "bench"
location = { lat = 50.1, lon = 8.68 }
upstreams = [{ address = "127.0.0.1:$ORIGIN_PORT", weight = 1 }]
[regions.health]
enabled = false
$(bench_routes)
CONF

# Runs one proxy under callgrind, counting only the measured requests: instructions per request.
measure() {
  local name=$1 port=$2; shift 2
  case " ${ONLY:-nginx haproxy pingora meridian} " in *" $name "*) ;; *) return 0 ;; esac
  local file="$WORK/callgrind.$name"
  local sim=()
  if [ "${CACHE_SIM:-0}" = 1 ]; then sim=(--cache-sim=yes); fi
  valgrind --tool=callgrind "${sim[@]}" --callgrind-out-file="$file.%p" --instr-atstart=no \
    --trace-children=no "$@" >"$WORK/$name.log" 2>&1 &
  local pid=$!
  PIDS+=($pid)
  wait_port_slowly "$port"
  "$LOADTEST" "http://127.0.0.1:$port$TARGET_PATH" --host bench.example.test -c "$CONNECTIONS" \
    "${REQUEST_ARGS[@]}" --requests "$WARMUP" --timeout 60s >/dev/null
  callgrind_control -i on "$pid" >/dev/null
  "$LOADTEST" "http://127.0.0.1:$port$TARGET_PATH" --host bench.example.test -c "$CONNECTIONS" \
    "${REQUEST_ARGS[@]}" --requests "$REQUESTS" --timeout 60s >"$WORK/$name.load" 2>&1
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$file".* "$KEEP"/; fi
  # Per request, every event counted (Ir first; with the cache simulation also Dr Dw I1mr D1mr
  # D1mw ILmr DLmr DLmw), summed over the dump's parts.
  local per
  per=$(cat "$file".* | awk -v n="$REQUESTS" '/^(summary|totals):/ {
      for (i = 2; i <= NF; i++) s[i] += $i; if (NF > m) m = NF }
    END { for (i = 2; i <= m; i++) printf "%d ", s[i] / n }')
  log "$name: ${per%% *} instructions per request ($(head -1 "$WORK/$name.load"))"
  echo "$name $per" >>"$WORK/results"
}

: >"$WORK/results"
measure nginx "$NGINX_PORT" "$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx"
measure haproxy "$HAPROXY_PORT" "$HAPROXY" -f "$WORK/haproxy.cfg" -db
measure pingora "$PINGORA_PORT" "$PINGORA" "127.0.0.1:$PINGORA_PORT" "127.0.0.1:$ORIGIN_PORT"
measure meridian "$MERIDIAN_PORT" "$MERIDIAN" serve --config "$WORK/meridian.toml"

mkdir -p "$OUT"
REPORT="$OUT/instructions.md"
if [ "${CACHE:-0}" = 1 ]; then REPORT="$OUT/instructions-cache.md"; fi
if [ "${POST:-0}" = 1 ]; then REPORT="$OUT/instructions-post.md"; fi
python3 - "$WORK/results" "$REPORT" "$REQUESTS" "$CONNECTIONS" "${CACHE:-0}" "${POST:-0}" <<'PY'
import sys
path, out, requests, connections, cache, post = sys.argv[1:]
what = ("cache hit (GET 1 KiB" if cache == "1" else
        "proxied POST (16 KiB request body, 1 KiB response" if post == "1" else "proxied GET (1 KiB body")
rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in open(path) if line.strip()}
per = {k: v[0] for k, v in rows.items()}
# With the cache simulation: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
sim = all(len(v) >= 6 for v in rows.values())
best = min(per.get("nginx", 0) or per.get("haproxy", 0) or 1, per.get("haproxy", 0) or per.get("nginx", 0) or 1)
head = "| proxy | instructions / request | ratio to the better of NGINX and HAProxy |"
rule = "|---|---|---|"
if sim:
    head += " data writes | L1 instruction misses | L1 data read misses | L1 data write misses |"
    rule += "---|---|---|---|"
lines = [f"Instructions per {what}, keep-alive, {connections} connections, {requests} requests, callgrind):", "",
         head, rule]
for name in ["nginx", "haproxy", "pingora", "meridian"]:
    if name in per:
        line = f"| {name} | {per[name]:,} | {per[name] / best:.2f} |"
        if sim:
            v = rows[name]
            line += f" {v[2]:,} | {v[3]:,} | {v[4]:,} | {v[5]:,} |"
        lines.append(line)
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
