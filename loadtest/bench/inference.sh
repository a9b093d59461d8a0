#!/usr/bin/env bash
# Two inference benchmarks (PART=picking|overhead|all, default all):
#
# picking: replica picking inside a region, model-aware vs least outstanding, same run. Four
#   simulated GPU model servers (`meridian-loadtest model-servers`: 4 slots each, a queue beyond
#   them, a prefix cache of 6 prompts; a cached prefix prefills in 30 ms instead of 300 ms, tokens
#   5 ms apart) behind one region of `meridian serve`, whose `[inference] picking` is
#   `model_aware` or `least_outstanding`. The load (`meridian-loadtest prefix-load`): open loop,
#   RATE calls/s for PICK_DURATION (the first 5 s warm the caches and are not measured), 16 system
#   prompts of 3 KB with Zipf(1) popularity (the hottest takes 30 %), answers of 4, 16 or 64
#   tokens; the same calls at the same times in every run (fixed seed). Each mode starts on fresh
#   servers and a fresh edge; modes alternate over ROUNDS.
#   Reports TTFT p50/p99 (from each call's scheduled start: queueing counts) and completed
#   calls/s, with ratios least-outstanding / model-aware, and the servers' prefix-cache hit rates.
#
# overhead: SSE token streams straight from a simulated model server vs through
# `meridian serve` with a `kind = "inference"` route in front of the same server, same load.
#   - ttft:   8 concurrent streams from a model server that sends its first token at once
#             (--sse-interval 0ms), so time to first byte is the proxy path alone;
#   - paced:  8 concurrent streams, 20 events 5 ms apart (a model streaming tokens);
#   - streams-200: 200 concurrent streams, 50 events 20 ms apart (about 1 s each): events/s, TTLB.
# Prints ratios edge/direct; writes loadtest/bench/results/inference.md and the JSON reports.
#
#   bash loadtest/bench/inference.sh
#   PART=picking RATE=30 PICK_DURATION=30s ROUNDS=2 bash loadtest/bench/inference.sh
#   DURATION=5s ROUNDS=1 PART=overhead bash loadtest/bench/inference.sh
#   Env: PART, RATE (30), PICK_DURATION (30s), SERVER_FLAGS, LOAD_FLAGS, DURATION, ROUNDS, LOADGEN_THREADS (1),
#   EDGE_THREADS (1), MERIDIAN_BIN, CARGO_TARGET_DIR, OUT.
#
# Traffic stays on 127.0.0.0/8; every process started here is stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BENCH="$ROOT/loadtest/bench"
OUT="${OUT:-$BENCH/results}"
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-2}"
LOADGEN_THREADS="${LOADGEN_THREADS:-1}"
PART="${PART:-all}"
RATE="${RATE:-30}"
PICK_DURATION="${PICK_DURATION:-30s}"
# The simulated servers and the workload (see `meridian-loadtest model-servers --help`).
# Times are those of a small GPU server slowed ×5, so that scheduler noise on a busy 2-core
# machine stays small beside them.
SERVER_FLAGS="${SERVER_FLAGS:---slots 4 --prefill 300ms --cached-prefill 30ms --cache-entries 6 --token-interval 5ms}"
LOAD_FLAGS="${LOAD_FLAGS:---groups 16 --zipf 1.0 --prefix-bytes 3000 --warmup 5s}"
EDGE_THREADS="${EDGE_THREADS:-1}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

FAST_PORT=18110      # model server, first token at once
PACED_PORT=18111     # model server, 20 tokens 5 ms apart
LONG_PORT=18112      # model server, 50 tokens 20 ms apart
EDGE_PORT=18113
EDGE_ADMIN_PORT=18114

source "$ROOT/loadtest/bench/lib.sh"
bench_workdir meridian-infbench

command -v cmake >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null; }
if [ -n "${MERIDIAN_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p meridian-loadtest --bin meridian-loadtest)
  MERIDIAN="$MERIDIAN_BIN"
else
  log "building meridian and meridian-loadtest (release)"
  (cd "$ROOT" && cargo build --release -q -p meridian-gateway --bin meridian -p meridian-loadtest --bin meridian-loadtest)
  MERIDIAN="$CARGO_TARGET_DIR/release/meridian"
fi
LOADTEST="$CARGO_TARGET_DIR/release/meridian-loadtest"
mkdir -p "$OUT"

# --- picking: model-aware vs least outstanding ---------------------------------------------------
REPLICA_PORTS=(18120 18121 18122 18123)
PICK_EDGE_PORT=18124
PICK_ADMIN_PORT=18125

# pick_run MODE ROUND: fresh model servers and a fresh edge, one load run, everything stopped.
pick_run() {
  local mode=$1 round=$2 listen="" upstreams="" p servers edge
  for p in "${REPLICA_PORTS[@]}"; do
    listen="${listen:+$listen,}127.0.0.1:$p"
    upstreams="${upstreams:+$upstreams, }{ address = \"127.0.0.1:$p\" }"
  done
  # shellcheck disable=SC2086
  "$LOADTEST" model-servers --listen "$listen" $SERVER_FLAGS --stats "$OUT/picking.$mode.r$round.servers.json" >"$WORK/servers.log" 2>&1 &
  servers=$!
  PIDS+=($servers)
  cat >"$WORK/picking.toml" <<CONF
schema = 1

[edge]
pop = "bench-picking"
http = "127.0.0.1:$PICK_EDGE_PORT"
admin = "127.0.0.1:$PICK_ADMIN_PORT"
threads = $EDGE_THREADS
shutdown_grace = "1s"
shutdown_timeout = "2s"

[[regions]]
name = "gpu"
location = { lat = 50.1, lon = 8.68 }
upstreams = [$upstreams]
models = ["bench-model"]

[inference]
picking = "$mode"

[[routes]]
name = "inference"
hosts = ["inference.example.test"]
path_prefix = "/"
kind = "inference"
regions = "*"
default_region = "gpu"
timeouts = { connect = "1s", read = "120s", write = "30s" }
CONF
  for p in "${REPLICA_PORTS[@]}"; do wait_port "$p"; done
  "$MERIDIAN" serve --config "$WORK/picking.toml" >"$WORK/picking-edge.log" 2>&1 &
  edge=$!
  PIDS+=($edge)
  wait_port "$PICK_EDGE_PORT"
  # The first model call starts the scraping; wait until every server has been scraped.
  curl -sf -o /dev/null -H 'host: inference.example.test' -H 'content-type: application/json' \
    -d '{"model":"bench-model","max_tokens":1}' "http://127.0.0.1:$PICK_EDGE_PORT/v1/chat/completions"
  for _ in $(seq 1 500); do
    [ "$(curl -sf "http://127.0.0.1:$PICK_ADMIN_PORT/metrics" | grep -c '^meridian_inference_replica_queue{')" -ge 4 ] && break
    sleep 0.01
  done
  "$LOADTEST" prefix-load "http://127.0.0.1:$PICK_EDGE_PORT/v1/chat/completions" --host inference.example.test \
    --rate "$RATE" -d "$PICK_DURATION" $LOAD_FLAGS --label "$mode" --json "$OUT/picking.$mode.r$round.json" >"$WORK/last.txt"
  log "picking / $mode / round $round: $(cat "$WORK/last.txt")"
  kill "$edge" "$servers" 2>/dev/null || true
  wait "$edge" 2>/dev/null || true
  wait "$servers" 2>/dev/null || true
}

if [ "$PART" != overhead ]; then
  rm -f "$OUT"/picking.*.json
  for round in $(seq 1 "$ROUNDS"); do
    order=(model_aware least_outstanding)
    if [ $((round % 2)) -eq 0 ]; then order=(least_outstanding model_aware); fi
    for mode in "${order[@]}"; do pick_run "$mode" "$round"; done
  done
  python3 - "$OUT" "$(nproc)" "$RATE" "$PICK_DURATION" <<'PY' | tee "$OUT/picking.md"
import glob, json, os, statistics, sys
out, cores, rate, duration = sys.argv[1:]
runs, hits = {}, {}
for p in sorted(glob.glob(os.path.join(out, "picking.*.r*.json"))):
    name = os.path.basename(p).split(".")
    mode = name[1]
    if p.endswith(".servers.json"):
        servers = json.load(open(p))
        hits.setdefault(mode, []).append(sum(s["prefix_hits"] for s in servers) / max(1, sum(s["calls"] for s in servers)))
    else:
        runs.setdefault(mode, []).append(json.load(open(p)))
def m(mode, f):
    return statistics.mean(f(r) for r in runs[mode])
print(f"{cores} cores; 4 simulated model servers (4 slots, prefix cache of 6, prefill 300 ms / 30 ms cached, "
      f"tokens 5 ms apart); open loop {rate} calls/s for {duration} (5 s warm-up), 16 prefixes Zipf(1); mean over rounds.\n")
print("| picking | TTFT p50 ms | TTFT p99 ms | completed/s | failed | prefix-cache hits |")
print("|---|---|---|---|---|---|")
for mode in ("model_aware", "least_outstanding"):
    if mode not in runs:
        continue
    print(f"| {mode} | {m(mode, lambda r: r['ttft_ms']['p50']):.1f} | {m(mode, lambda r: r['ttft_ms']['p99']):.1f} | "
          f"{m(mode, lambda r: r['completed_per_s']):.1f} | {sum(r['failed'] for r in runs[mode])} | "
          f"{statistics.mean(hits.get(mode, [0])) * 100:.0f} % |")
if "model_aware" in runs and "least_outstanding" in runs:
    ratio = lambda q: m("least_outstanding", lambda r: r["ttft_ms"][q]) / max(1e-9, m("model_aware", lambda r: r["ttft_ms"][q]))
    tput = m("model_aware", lambda r: r["completed_per_s"]) / max(1e-9, m("least_outstanding", lambda r: r["completed_per_s"]))
    print(f"\nleast_outstanding / model_aware: TTFT p50 {ratio('p50'):.2f}x, TTFT p99 {ratio('p99'):.2f}x; "
          f"completed/s model_aware / least_outstanding {tput:.2f}x")
PY
fi
[ "$PART" = picking ] && exit 0

# --- overhead: direct vs through the edge --------------------------------------------------------
rm -f "$OUT"/inference.*.json


"$LOADTEST" origin --listen "127.0.0.1:$FAST_PORT" --threads 1 --sse-events 20 --sse-interval 0ms >"$WORK/fast.log" 2>&1 &
PIDS+=($!)
"$LOADTEST" origin --listen "127.0.0.1:$PACED_PORT" --threads 1 --sse-events 20 --sse-interval 5ms >"$WORK/paced.log" 2>&1 &
PIDS+=($!)
"$LOADTEST" origin --listen "127.0.0.1:$LONG_PORT" --threads 1 --sse-events 50 --sse-interval 20ms >"$WORK/long.log" 2>&1 &
PIDS+=($!)

# One region per model server, each serving one model; the inference route picks it by `model`.
cat >"$WORK/meridian.toml" <<CONF
schema = 1

[edge]
pop = "bench-inference"
http = "127.0.0.1:$EDGE_PORT"
admin = "127.0.0.1:$EDGE_ADMIN_PORT"
threads = $EDGE_THREADS
shutdown_grace = "1s"
shutdown_timeout = "2s"

[[regions]]
name = "fast"
location = { lat = 50.1, lon = 8.68 }
upstreams = [{ address = "127.0.0.1:$FAST_PORT", weight = 1 }]
models = ["bench-fast"]

[[regions]]
name = "paced"
location = { lat = 50.1, lon = 8.68 }
upstreams = [{ address = "127.0.0.1:$PACED_PORT", weight = 1 }]
models = ["bench-paced"]

[[regions]]
name = "long"
location = { lat = 50.1, lon = 8.68 }
upstreams = [{ address = "127.0.0.1:$LONG_PORT", weight = 1 }]
models = ["bench-long"]

[[routes]]
name = "inference"
hosts = ["inference.example.test"]
path_prefix = "/"
kind = "inference"
regions = "*"
default_region = "fast"
timeouts = { connect = "1s", read = "120s", write = "30s" }
inference = { max_body_bytes = 65536 }
CONF
"$MERIDIAN" config validate "$WORK/meridian.toml" >&2
"$MERIDIAN" serve --config "$WORK/meridian.toml" >"$WORK/meridian.log" 2>&1 &
PIDS+=($!)
EDGE_PID=$!
wait_port "$FAST_PORT"; wait_port "$PACED_PORT"; wait_port "$LONG_PORT"; wait_port "$EDGE_PORT"

for m in fast paced long; do
  printf '{"model":"bench-%s","stream":true,"messages":[{"role":"user","content":"Say hello"}]}' "$m" >"$WORK/$m.json"
done


# run_one SCENARIO TARGET(direct|edge) ROUND MODEL PORT CONNECTIONS
run_one() {
  local scen=$1 target=$2 round=$3 model=$4 port=$5 conns=$6
  local json="$OUT/inference.$scen.$target.r$round.json" before after
  if [ "$target" = edge ]; then port=$EDGE_PORT; fi
  before=$(cpu_ticks "$EDGE_PID")
  "$LOADTEST" "http://127.0.0.1:$port/v1/chat/completions" --host inference.example.test --scenario sse \
    -m POST --body-file "$WORK/$model.json" -H content-type:application/json -c "$conns" -d "$DURATION" \
    --threads "$LOADGEN_THREADS" --timeout 30s -q --json "$json" >"$WORK/last.txt"
  after=$(cpu_ticks "$EDGE_PID")
  python3 - "$json" "$before" "$after" "$(getconf CLK_TCK)" "$target" <<'PY'
import json, sys
path, before, after, hz, target = sys.argv[1:]
r = json.load(open(path))
r["bench"] = {"target": target, "edge_cpu_s": (int(after) - int(before)) / int(hz) if target == "edge" else 0.0}
json.dump(r, open(path, "w"), indent=2)
PY
  log "$scen / $target / round $round: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); s=r["sse"]; print(r["requests"], "events/s", round(s["events_per_s"]), "ttfb p50", s["ttfb_ms"]["p50"], "ttlb p50", s["ttlb_ms"]["p50"])' "$json")"
}

declare -a SCEN=("ttft:fast:$FAST_PORT:8" "paced:paced:$PACED_PORT:8" "streams-200:long:$LONG_PORT:200")
for round in $(seq 1 "$ROUNDS"); do
  for s in "${SCEN[@]}"; do
    IFS=: read -r scen model port conns <<<"$s"
    order=(direct edge)
    if [ $((round % 2)) -eq 0 ]; then order=(edge direct); fi
    for target in "${order[@]}"; do run_one "$scen" "$target" "$round" "$model" "$port" "$conns"; done
  done
done

python3 - "$OUT" "$(nproc)" "$DURATION" "$LOADGEN_THREADS" "$EDGE_THREADS" <<'PY' | tee "$OUT/inference.md"
import glob, json, os, statistics, sys
out, cores, duration, lg, edge_threads = sys.argv[1:]
runs = {}
for p in sorted(glob.glob(os.path.join(out, "inference.*.json"))):
    _, scen, target, _r, _ = os.path.basename(p).split(".")
    runs.setdefault((scen, target), []).append(json.load(open(p)))
def m(rs, f):
    return statistics.mean(f(r) for r in rs)
def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"
print(f"{cores} cores shared by the load generator ({lg} thread), the model servers (1 thread each) and the edge "
      f"({edge_threads} worker); {duration} per run, mean over rounds (direct and edge interleaved). "
      "Ratios edge / direct: 1.00 = no cost.\n")
print("| scenario | streams | TTFB p50 | TTFB p99 | TTLB p50 | TTLB p99 | events/s | failed (direct / edge) |")
print("|---|---|---|---|---|---|---|---|")
for scen in ["ttft", "paced", "streams-200"]:
    d, e = runs.get((scen, "direct")), runs.get((scen, "edge"))
    if not d or not e:
        continue
    cells = []
    for key in ("ttfb_ms", "ttlb_ms"):
        for q in ("p50", "p99"):
            cells.append(ratio(m(e, lambda r: r["sse"][key][q] or 0), m(d, lambda r: r["sse"][key][q] or 0)))
    cells.append(ratio(m(e, lambda r: r["sse"]["events_per_s"]), m(d, lambda r: r["sse"]["events_per_s"])))
    fails = f"{sum(r['requests']['failed'] for r in d)} / {sum(r['requests']['failed'] for r in e)}"
    print(f"| {scen} | {d[0]['connections']} | " + " | ".join(cells) + f" | {fails} |")
print()
for scen in ["ttft", "paced", "streams-200"]:
    for t in ("direct", "edge"):
        rs = runs.get((scen, t), [])
        if rs:
            print(f"  raw {scen:12} {t:6} ttfb p50 {m(rs, lambda r: r['sse']['ttfb_ms']['p50']):.3f} ms, "
                  f"events/s {m(rs, lambda r: r['sse']['events_per_s']):.0f}, streams {sum(r['sse']['streams'] for r in rs)}"
                  + (f", edge CPU s {sum(r['bench']['edge_cpu_s'] for r in rs):.1f}" if t == "edge" else ""))
PY
