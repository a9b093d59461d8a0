#!/usr/bin/env bash
# Byte ranges through a cache, side by side: NGINX proxy_cache (a whole cached response answers
# ranges), NGINX proxy_cache with the slice module (the object cached as 1 MiB slices) and
# Meridian's cache (a range miss fills the whole response; hits are cut from it without copying),
# in front of the same origin, same load, same machine, one worker/thread each. One run per
# scenario; writes loadtest/bench/range-results.md (ratios relative to NGINX proxy_cache) and the
# JSON.
#
#   bash loadtest/bench/range.sh
#   DURATION=5s CONNECTIONS=64 OBJECT_BYTES=4194304 bash loadtest/bench/range.sh
#   Env: DURATION (10s), CONNECTIONS (64), OBJECT_BYTES (4 MiB: the cached object), OUT,
#        MISS_REQUESTS (600 per proxy and miss scenario), MISS_CONNECTIONS (16), PARTS (hits misses),
#        MERIDIAN_BIN / LOADTEST_BIN (prebuilt binaries, else built --release), CARGO_TARGET_DIR.
#
# Hits: `range-1k` (bytes=0-1023), `range-64k` (64 KiB in the middle), `suffix-64k`
# (bytes=-65536). Every proxy is warmed with one full GET first, so each run measures hits only;
# the script checks a hit is a 206 with the right Content-Range before it measures.
# Misses: `miss-1k`, `miss-64k`, `miss-suffix-64k`, the same ranges, each request for a URL no
# proxy has seen (`&k=N` in the query, which every cache key includes): NGINX proxy_cache and
# Meridian fetch (and store) the whole object for each, the slice cache only the 1 MiB slice(s) the
# range falls in. curl (--parallel, MISS_CONNECTIONS at a time) sends a fixed MISS_REQUESTS, since
# the load generator repeats one URL.
# Traffic stays on 127.0.0.0/8; every process started here is stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BENCH="$ROOT/loadtest/bench"
OUT="${OUT:-$BENCH/range-results}"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-64}"
OBJECT_BYTES="${OBJECT_BYTES:-4194304}"
MISS_REQUESTS="${MISS_REQUESTS:-600}"
MISS_CONNECTIONS="${MISS_CONNECTIONS:-16}"
PARTS="${PARTS:-hits misses}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

ORIGIN_PORT=18200
NGINX_PORT=18201
NGINX_SLICE_PORT=18202
MERIDIAN_PORT=18203
MERIDIAN_ADMIN_PORT=18204

WORK="$(mktemp -d /tmp/meridian-range.XXXXXX)"
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
ensure_tools curl:curl

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  log "installing nginx"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
systemctl stop nginx >/dev/null 2>&1 || true
if ! "$NGINX" -V 2>&1 | grep -q http_slice_module; then
  echo "this nginx has no slice module (--with-http_slice_module)" >&2
  exit 1
fi

build=()
if [ -z "${MERIDIAN_BIN:-}" ]; then build+=(-p meridian-gateway --bin meridian); fi
if [ -z "${LOADTEST_BIN:-}" ]; then build+=(-p meridian-loadtest --bin meridian-loadtest); fi
if [ "${#build[@]}" -gt 0 ]; then
  log "building (release): ${build[*]}"
  (cd "$ROOT" && cargo build --release -q "${build[@]}")
fi
MERIDIAN="${MERIDIAN_BIN:-$CARGO_TARGET_DIR/release/meridian}"
LOADTEST="${LOADTEST_BIN:-$CARGO_TARGET_DIR/release/meridian-loadtest}"

mkdir -p "$OUT"
rm -f "$OUT"/*.json

# --- origin: OBJECT_BYTES at /object?bytes=N ---------------------------------------------------------
"$LOADTEST" origin --listen "127.0.0.1:$ORIGIN_PORT" --threads 1 --body-bytes "$OBJECT_BYTES" \
  >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
wait_port "$ORIGIN_PORT"
OBJECT="/object?bytes=$OBJECT_BYTES"

# --- NGINX: one worker; proxy_cache on one port, proxy_cache + slice on the other --------------------
mkdir -p "$WORK/nginx/cache" "$WORK/nginx/slices" "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<CONF
user root;
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
  scgi_temp_path $WORK/nginx/tmp/scgi;
  keepalive_requests 1000000;
  proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=whole:10m max_size=256m inactive=10m;
  proxy_cache_path $WORK/nginx/slices levels=1:2 keys_zone=slices:10m max_size=256m inactive=10m;
  upstream origin {
    server 127.0.0.1:$ORIGIN_PORT;
    keepalive 128;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache whole;
      proxy_cache_valid 200 10m;
      # The origin sends no Accept-Ranges; without this NGINX answers ranges with the whole 200.
      proxy_force_ranges on;
    }
  }
  server {
    listen 127.0.0.1:$NGINX_SLICE_PORT;
    location / {
      slice 1m;
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Range \$slice_range;
      proxy_cache slices;
      proxy_cache_key \$uri\$is_args\$args\$slice_range;
      proxy_cache_valid 200 206 10m;
      proxy_force_ranges on;
    }
  }
}
CONF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" >"$WORK/nginx/stdout.log" 2>&1 &
PIDS+=($!)
NGINX_MASTER=$!

# --- Meridian: one thread, one cache-enabled route to the origin (default [edge.cache]) --------------
cat >"$WORK/meridian.toml" <<CONF
schema = 1

[edge]
pop = "range-1"
http = "127.0.0.1:$MERIDIAN_PORT"
admin = "127.0.0.1:$MERIDIAN_ADMIN_PORT"
threads = 1
shutdown_grace = "1s"
shutdown_timeout = "2s"

[edge.cache]
max_object_bytes = $((OBJECT_BYTES * 2))

[[regions]]
name = "bench"
location = { lat = 50.1, lon = 8.68 }
upstreams = [{ address = "127.0.0.1:$ORIGIN_PORT", weight = 1 }]

[[routes]]
name = "bench-cache"
hosts = ["bench.example.test"]
path_prefix = "/"
kind = "static"
regions = ["bench"]
default_region = "bench"
cache = { enabled = true, default_ttl = "10m" }
CONF
"$MERIDIAN" config validate "$WORK/meridian.toml" >&2
"$MERIDIAN" serve --config "$WORK/meridian.toml" >"$WORK/meridian.log" 2>&1 &
PIDS+=($!)
MERIDIAN_PID=$!

wait_port "$NGINX_PORT"; wait_port "$NGINX_SLICE_PORT"; wait_port "$MERIDIAN_PORT"
NGINX_WORKER="$(pgrep -P "$NGINX_MASTER" | head -1 || true)"
NGINX_WORKER="${NGINX_WORKER:-$NGINX_MASTER}"

# A 206 with the expected Content-Range from PORT for RANGE, else the script stops.
check_range() {
  local port=$1 range=$2 want=$3 got
  got="$(curl -s -o /dev/null -D - -H "Host: bench.example.test" -H "Range: $range" \
    "http://127.0.0.1:$port$OBJECT" | tr -d '\r' | awk -F': ' '/^HTTP/ {split($0, s, " "); print s[2]} tolower($1)=="content-range" {print $2}' | tr '\n' ' ')"
  if [ "$got" != "206 $want " ]; then
    echo "127.0.0.1:$port answered '$got' for Range: $range (want '206 $want')" >&2
    exit 1
  fi
}

# Warm every cache with one full GET, then once more (NGINX stores after the first completes).
for port in "$NGINX_PORT" "$NGINX_SLICE_PORT" "$MERIDIAN_PORT"; do
  for _ in 1 2; do
    curl -s -o /dev/null -H "Host: bench.example.test" "http://127.0.0.1:$port$OBJECT"
  done
done

half=$((OBJECT_BYTES / 2))
declare -a SCEN_NAMES=("range-1k" "range-64k" "suffix-64k")
declare -A SCEN_RANGE=(["range-1k"]="bytes=0-1023" ["range-64k"]="bytes=$half-$((half + 65535))"
                       ["suffix-64k"]="bytes=-65536")
declare -A SCEN_WANT=(["range-1k"]="bytes 0-1023/$OBJECT_BYTES"
                      ["range-64k"]="bytes $half-$((half + 65535))/$OBJECT_BYTES"
                      ["suffix-64k"]="bytes $((OBJECT_BYTES - 65536))-$((OBJECT_BYTES - 1))/$OBJECT_BYTES")

hz=$(getconf CLK_TCK)
case " $PARTS " in *" hits "*) ;; *) SCEN_NAMES=() ;; esac
for scenario in "${SCEN_NAMES[@]}"; do
  range="${SCEN_RANGE[$scenario]}"
  for entry in "nginx-cache:$NGINX_WORKER:$NGINX_PORT" "nginx-slice:$NGINX_WORKER:$NGINX_SLICE_PORT" \
               "meridian:$MERIDIAN_PID:$MERIDIAN_PORT"; do
    IFS=: read -r proxy pid port <<<"$entry"
    check_range "$port" "$range" "${SCEN_WANT[$scenario]}"
    json="$OUT/$scenario.$proxy.json"
    before=$(cpu_ticks "$pid")
    "$LOADTEST" "http://127.0.0.1:$port$OBJECT" --host bench.example.test -H "range:$range" \
      -c "$CONNECTIONS" -d "$DURATION" --timeout 10s -q --json "$json" >"$WORK/last.txt"
    after=$(cpu_ticks "$pid")
    python3 - "$json" "$before" "$after" "$hz" "$proxy" "$scenario" <<'PY'
import json, sys
path, before, after, hz, proxy, scenario = sys.argv[1:]
r = json.load(open(path))
r["bench"] = {"proxy": proxy, "scenario": scenario, "cpu_s": (int(after) - int(before)) / int(hz)}
json.dump(r, open(path, "w"), indent=2)
PY
    log "$scenario / $proxy: $(grep -E '^  (throughput|latency) ' "$WORK/last.txt" | tr -s ' ' | tr '\n' ';')"
  done
done

# --- misses: MISS_REQUESTS fresh URLs per proxy and scenario ---------------------------------------
declare -a MISS_NAMES=("miss-1k" "miss-64k" "miss-suffix-64k")
declare -A MISS_OF=(["miss-1k"]="range-1k" ["miss-64k"]="range-64k" ["miss-suffix-64k"]="suffix-64k")
case " $PARTS " in *" misses "*) ;; *) MISS_NAMES=() ;; esac
for scenario in "${MISS_NAMES[@]}"; do
  range="${SCEN_RANGE[${MISS_OF[$scenario]}]}"
  for entry in "nginx-cache:$NGINX_WORKER:$NGINX_PORT" "nginx-slice:$NGINX_WORKER:$NGINX_SLICE_PORT" \
               "meridian:$MERIDIAN_PID:$MERIDIAN_PORT"; do
    IFS=: read -r proxy pid port <<<"$entry"
    # A first miss must already be a correct 206.
    OBJECT="/object?bytes=$OBJECT_BYTES&k=check-$scenario" check_range "$port" "$range" \
      "${SCEN_WANT[${MISS_OF[$scenario]}]}"
    for i in $(seq 1 "$MISS_REQUESTS"); do
      printf 'url = "http://127.0.0.1:%s/object?bytes=%s&k=%s-%s"\noutput = "/dev/null"\n' \
        "$port" "$OBJECT_BYTES" "$scenario" "$i"
    done >"$WORK/miss.curl"
    before=$(cpu_ticks "$pid")
    start=$(date +%s.%N)
    curl -s --no-progress-meter --parallel --parallel-max "$MISS_CONNECTIONS" \
      -H "Host: bench.example.test" -H "Range: $range" --max-time 30 \
      -w '%{http_code} %{time_total} %header{x-meridian-cache}\n' -K "$WORK/miss.curl" \
      >"$WORK/miss.out" 2>"$WORK/miss.err" || true
    end=$(date +%s.%N)
    after=$(cpu_ticks "$pid")
    summary="$(python3 - "$OUT/$scenario.$proxy.json" "$WORK/miss.out" "$start" "$end" "$before" \
      "$after" "$hz" "$proxy" "$scenario" <<'PY'
import json, sys
path, results, start, end, before, after, hz, proxy, scenario = sys.argv[1:]
codes, times, cache = {}, [], {}
for line in open(results):
    code, took, *said = line.split()
    codes[code] = codes.get(code, 0) + 1
    times.append(float(took) * 1000)
    for value in said:
        cache[value] = cache.get(value, 0) + 1
times.sort()
wall = float(end) - float(start)
pct = lambda q: times[min(len(times) - 1, int(q * len(times)))] if times else None
json.dump({"throughput_rps": len(times) / wall, "latency_ms": {"p50": pct(0.5), "p99": pct(0.99)},
           "status_codes": codes, "requests": len(times), "wall_s": wall, "x_meridian_cache": cache,
           "bench": {"proxy": proxy, "scenario": scenario,
                     "cpu_s": (int(after) - int(before)) / int(hz)}},
          open(path, "w"), indent=2)
print(f"{len(times) / wall:.0f} req/s, p99 {pct(0.99) or 0:.1f} ms, codes {codes}"
      + (f", x-meridian-cache {cache}" if cache else ""))
PY
)"
    log "$scenario / $proxy: $summary"
  done
done

python3 - "$OUT" "$(nproc)" "$DURATION" "$CONNECTIONS" "$OBJECT_BYTES" "$MISS_REQUESTS" \
  "$MISS_CONNECTIONS" >"$BENCH/range-results.md" <<'PY'
import glob, json, os, sys
out, cpus, duration, conns, size, miss_requests, miss_conns = sys.argv[1:]
runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    r = json.load(open(path))
    b = r["bench"]
    runs[(b["scenario"], b["proxy"])] = r

def field(r, *names):
    for n in names:
        if isinstance(r, dict) and n in r:
            r = r[n]
        else:
            return None
    return r

def rps(r):
    return field(r, "throughput_rps") or field(r, "throughput", "requests_per_second") or 0.0

def p99(r):
    v = field(r, "latency_ms", "p99")
    if v is None:
        v = field(r, "latency", "p99_ms")
    return v

def table(scenarios):
  print("| scenario | proxy | req/s | ratio vs nginx-cache | p99 ms | CPU s | non-206 |")
  print("|---|---|---|---|---|---|---|")
  for scenario in scenarios:
    base = rps(runs.get((scenario, "nginx-cache"), {}))
    for proxy in ["nginx-cache", "nginx-slice", "meridian"]:
        r = runs.get((scenario, proxy))
        if not r:
            continue
        codes = field(r, "status_codes") or {}
        other = sum(v for k, v in codes.items() if str(k) != "206")
        ratio = f"{rps(r) / base:.2f}" if base else "-"
        lat = p99(r)
        lat = f"{lat:.2f}" if isinstance(lat, (int, float)) else "-"
        print(f"| {scenario} | {proxy} | {rps(r):,.0f} | {ratio} | {lat} | "
              f"{r['bench']['cpu_s']:.1f} | {other} |")

load = open("/proc/loadavg").read().split()[:3]
print(f"Byte-range cache hits, {cpus} CPUs shared by generator and proxies, {conns} connections, "
      f"{duration} per run, one run; object {int(size) // 1024} KiB, warmed before measuring. "
      f"Load average at the end: {' '.join(load)}.\n")
table(["range-1k", "range-64k", "suffix-64k"])
print(f"\nByte-range misses: {miss_requests} requests per row, each for a URL not seen before, "
      f"{miss_conns} at a time (curl --parallel); req/s over the wall time of the batch.\n")
table(["miss-1k", "miss-64k", "miss-suffix-64k"])
PY
cat "$BENCH/range-results.md"
