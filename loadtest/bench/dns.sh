#!/usr/bin/env bash
# GeoDNS side by side: `meridian dns` vs gdnsd 3.8 (geoip plugin, city-auto mode) serving the same zone
# from the same test-world MaxMind DB, measured with dnsperf and the same query file.
# Prints the ratios meridian/gdnsd of queries/s and of average latency (same run, interleaved
# rounds), and where the machine's CPU goes per query (each server's user and system time, dnsperf's)
# with what a server doing no user-space work could reach; writes loadtest/bench/results/dns.w<WORKERS>.md.
#
#   bash loadtest/bench/dns.sh                       # 10 s per run, 2 interleaved rounds, 2 workers
#   WORKERS=1 DURATION=5 ROUNDS=1 bash loadtest/bench/dns.sh
#   Env: DURATION (seconds), ROUNDS, CLIENTS (dnsperf -c, 4), OUTSTANDING (dnsperf -q, 100),
#        WORKERS (Meridian `[dns] workers` = gdnsd `udp_threads`, default 2),
#        DNSSEC=1 (Meridian signs the zone, `[dns.dnssec]` with a key from `meridian dns keygen`, and
#        every query sets DO (dnsperf -D): signed Meridian against unsigned gdnsd),
#        PERF=1 (also count, with `perf stat`, the server's and dnsperf's context switches and the
#        server's receive/send system calls per query: the batch sizes actually achieved),
#        LEGACY_MERIDIAN=1 (a Meridian built before `[dns] workers` existed: the key is left out and
#        it runs one worker per core), MERIDIAN_BIN (skip building), CARGO_TARGET_DIR, OUT.
#
# Traffic stays on 127.0.0.0/8 (ephemeral loopback port); every process started here is stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BENCH="$ROOT/loadtest/bench"
OUT="${OUT:-$BENCH/results}"
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-2}"
CLIENTS="${CLIENTS:-4}"
OUTSTANDING="${OUTSTANDING:-100}"
WORKERS="${WORKERS:-2}"
GDNSD_UDP_THREADS="$WORKERS"
LEGACY_MERIDIAN="${LEGACY_MERIDIAN:-0}"
DNSSEC="${DNSSEC:-0}"
PERF="${PERF:-0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

source "$ROOT/loadtest/bench/lib.sh"
bench_workdir meridian-dnsbench

# --- tools ---------------------------------------------------------------------------------------
missing=()
command -v dnsperf >/dev/null || missing+=(dnsperf)
command -v gdnsd >/dev/null || [ -x /usr/sbin/gdnsd ] || missing+=(gdnsd)
command -v dig >/dev/null || missing+=(bind9-dnsutils)
command -v cmake >/dev/null || missing+=(cmake)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
GDNSD="$(command -v gdnsd || echo /usr/sbin/gdnsd)"
# The Debian package starts a system gdnsd; this benchmark runs its own instance only.
systemctl stop gdnsd >/dev/null 2>&1 || true

if [ -n "${MERIDIAN_BIN:-}" ]; then
  MERIDIAN="$MERIDIAN_BIN"
else
  log "building meridian (release)"
  (cd "$ROOT" && cargo build --release -q -p meridian-gateway --bin meridian)
  MERIDIAN="$CARGO_TARGET_DIR/release/meridian"
fi
mkdir -p "$OUT"
if [ "$DNSSEC" = 1 ]; then
  "$MERIDIAN" dns keygen --out "$WORK/zone.key" >/dev/null
fi

free_port() {
  python3 - <<'PY'
import socket
while True:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port)); print(port); break
    except OSError:
        pass
    finally:
        u.close(); t.close()
PY
}
MERIDIAN_PORT="$(free_port)"
GDNSD_PORT="$(free_port)"
while [ "$GDNSD_PORT" = "$MERIDIAN_PORT" ]; do GDNSD_PORT="$(free_port)"; done

"$MERIDIAN" geoip build-test-world "$WORK/test-world.mmdb" >&2

# --- the zone: PoPs in the test-world cities (as in examples/local.toml) --------------------------
# name lat lon v4 v6
POPS="mexico-city 19.43 -99.13 127.2.1.1 2001:db8:1::1
virginia 38.9 -77.0 127.2.2.1 2001:db8:2::1
singapore 1.35 103.82 127.2.3.1 2001:db8:3::1
kuala-lumpur 3.14 101.69 127.2.4.1 2001:db8:4::1
bangkok 13.75 100.5 127.2.5.1 2001:db8:5::1
seoul 37.57 126.98 127.2.6.1 2001:db8:6::1
manila 14.6 120.98 127.2.7.1 2001:db8:7::1
frankfurt 50.1 8.68 127.2.8.1 2001:db8:8::1"

# Meridian: one answer (nearest PoP), default virginia, no health URLs (always up).
{
  cat <<CONF
schema = 1

[edge]
pop = "dnsbench"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[geoip]
database = "$WORK/test-world.mmdb"

# [dns] needs a valid config around it; this region and route are never used.
[[regions]]
name = "unused"
location = { lat = 0.0, lon = 0.0 }
upstreams = [{ address = "127.0.0.1:9", weight = 1 }]

[[routes]]
name = "unused"
hosts = ["unused.example.test"]
path_prefix = "/"
regions = ["unused"]
default_region = "unused"

[dns]
listen = "127.0.0.1:$MERIDIAN_PORT"
zone = "example.test"
ttl = 30
ns = ["ns1.example.net"]
answers = 1
default_pops = ["virginia"]
soa = { rname = "hostmaster.example.test", serial = 1, refresh = 3600, retry = 600, expire = 86400, minimum = 60 }
limits = { max_udp_payload = 1232, max_tcp_connections = 256, tcp_idle_timeout = "10s" }
$([ "$LEGACY_MERIDIAN" = 1 ] || printf 'workers = %s\n# dnsperf asks the same questions from one address: rate limiting would measure drops.\nrrl = { responses_per_second = 0 }' "$WORKERS")
$([ "$DNSSEC" = 1 ] && printf '\n[dns.dnssec]\nkey_file = "%s"\n' "$WORK/zone.key" || true)

[[dns.records]]
name = "api"

[[dns.records]]
name = "static"
pops = ["virginia", "frankfurt", "singapore"]
CONF
  while read -r name lat lon v4 v6; do
    printf '\n[[pops]]\nname = "%s"\nlocation = { lat = %s, lon = %s }\naddresses = ["%s", "%s"]\n' \
      "$name" "$lat" "$lon" "$v4" "$v6"
  done <<<"$POPS"
} >"$WORK/meridian.toml"
"$MERIDIAN" config validate "$WORK/meridian.toml" >&2

# gdnsd: geoip plugin, city-auto mode over the same coordinates and DB, auto_dc_limit 1 (metafo
# answers the first DC of the list anyway), virginia first in `datacenters` = the default for
# clients the DB cannot place; service_types `up` = no health checks, like the Meridian side.
mkdir -p "$WORK/gdnsd/zones" "$WORK/gdnsd/run" "$WORK/gdnsd/state"
coords() { awk -v want="$1" 'want == "" || index(" " want " ", " " $1 " ") { printf "        %s => [ %s, %s ]\n", $1, $2, $3 }' <<<"$POPS"; }
dcmap() { awk -v want="$1" 'want == "" || index(" " want " ", " " $1 " ") { printf "        %s => { addrs_v4 => %s, addrs_v6 => %s }\n", $1, $4, $5 }' <<<"$POPS"; }
ALL_ORDER="virginia $(awk '$1 != "virginia" {printf "%s ", $1}' <<<"$POPS")"   # default order: virginia first
cat >"$WORK/gdnsd/config" <<CONF
options => {
  listen => [ 127.0.0.1:$GDNSD_PORT ]
  udp_threads => $GDNSD_UDP_THREADS
  tcp_threads => 1
  edns_client_subnet => true
  run_dir => $WORK/gdnsd/run
  state_dir => $WORK/gdnsd/state
}
plugins => { geoip => {
  maps => {
    all => {
      geoip2_db => $WORK/test-world.mmdb
      datacenters => [ $(echo $ALL_ORDER | sed 's/ /, /g') ]
      auto_dc_limit => 1
      auto_dc_coords => {
$(coords "")
      }
    }
    static => {
      geoip2_db => $WORK/test-world.mmdb
      datacenters => [ virginia, frankfurt, singapore ]
      auto_dc_limit => 1
      auto_dc_coords => {
$(coords "virginia frankfurt singapore")
      }
    }
  }
  resources => {
    api => {
      map => all
      service_types => up
      dcmap => {
$(dcmap "")
      }
    }
    static => {
      map => static
      service_types => up
      dcmap => {
$(dcmap "virginia frankfurt singapore")
      }
    }
  }
}}
CONF
cat >"$WORK/gdnsd/zones/example.test" <<'ZONE'
$TTL 30
@       SOA ns1.example.net. hostmaster.example.test. ( 1 3600 600 86400 60 )
@       NS  ns1.example.net.
api     30 DYNA geoip!api
static  30 DYNA geoip!static
ZONE
"$GDNSD" -c "$WORK/gdnsd" checkconf >"$WORK/gdnsd/checkconf.log" 2>&1 || { cat "$WORK/gdnsd/checkconf.log" >&2; exit 1; }

# --- start both -----------------------------------------------------------------------------------
"$MERIDIAN" dns --config "$WORK/meridian.toml" >"$WORK/meridian.log" 2>&1 &
PIDS+=($!)
MERIDIAN_PID=$!
"$GDNSD" -c "$WORK/gdnsd" -l -D start >"$WORK/gdnsd.log" 2>&1 &
PIDS+=($!)
GDNSD_PID=$!

wait_dns() {
  for _ in $(seq 1 100); do
    if dig +time=1 +tries=1 @127.0.0.1 -p "$1" example.test SOA +short 2>/dev/null | grep -q hostmaster; then return 0; fi
    sleep 0.1
  done
  echo "no DNS answer on 127.0.0.1:$1" >&2
  return 1
}
wait_dns "$MERIDIAN_PORT" || { cat "$WORK/meridian.log" >&2; exit 1; }
wait_dns "$GDNSD_PORT" || { cat "$WORK/gdnsd.log" >&2; exit 1; }

# Equivalence check: the same answers from both for a few clients (ECS and resolver address).
check() {
  local label=$1; shift
  local m g
  m=$(dig @127.0.0.1 -p "$MERIDIAN_PORT" "$@" +short | sort | paste -sd' ')
  g=$(dig @127.0.0.1 -p "$GDNSD_PORT" "$@" +short | sort | paste -sd' ')
  printf '   %-40s meridian=%-16s gdnsd=%-16s %s\n' "$label" "$m" "$g" "$([ "$m" = "$g" ] && echo same || echo DIFFERENT)" >&2
}
log "answers (meridian port $MERIDIAN_PORT, gdnsd port $GDNSD_PORT)"
check "api A, ECS Seoul" api.example.test A +subnet=127.15.0.0/24
check "api AAAA, ECS Mexico" api.example.test AAAA +subnet=127.10.0.0/24
check "api A, resolver in Germany" api.example.test A -b 127.17.0.3
check "api A, unplaced resolver" api.example.test A
check "static A, ECS Bangkok" static.example.test A +subnet=127.14.0.0/24
for port in "$MERIDIAN_PORT" "$GDNSD_PORT"; do
  printf '   %-40s port %s: %s\n' "nope.example.test A (NXDOMAIN)" "$port" \
    "$(dig @127.0.0.1 -p "$port" nope.example.test A | grep -o 'status: [A-Z]*')" >&2
done
check "SOA" example.test SOA

# --- query mix: steered names (A/AAAA), NXDOMAIN and SOA -------------------------------------------
{
  for _ in 1 2 3 4; do echo "api.example.test A"; done
  for _ in 1 2; do echo "api.example.test AAAA"; done
  echo "static.example.test A"
  echo "nope.example.test A"
  echo "missing.api.example.test A"
  echo "example.test SOA"
} >"$WORK/queries.txt"

# ECS option (code 8): family 1, source /24, scope 0, 3 address bytes of 127.17.0.0 (Germany).
ECS_DE="8:00011800$(printf '%02x%02x%02x' 127 17 0)"
declare -a SCEN=("plain" "resolver-kr" "ecs-de")
declare -A SCEN_ARGS=(["plain"]="" ["resolver-kr"]="-a 127.15.0.5" ["ecs-de"]="-E $ECS_DE")
declare -A SCEN_DESC=(["plain"]="no EDNS, resolver 127.0.0.1 (not placed: default PoP)"
                      ["resolver-kr"]="no EDNS, resolver 127.15.0.5 (Seoul, by source address)"
                      ["ecs-de"]="EDNS Client Subnet 127.17.0.0/24 (Germany)")

PERF_EXTRA=""
SUFFIX=""
if [ "$DNSSEC" = 1 ]; then
  PERF_EXTRA="-D"
  SUFFIX=".dnssec"
fi
PERF_EVENTS=task-clock,context-switches,cpu-migrations
for call in recvmmsg recvmsg recvfrom sendmmsg sendmsg sendto ppoll epoll_wait poll; do
  PERF_EVENTS+=",syscalls:sys_enter_$call"
done
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
run_one() {
  local server=$1 port=$2 scen=$3 round=$4 pid=$5
  local out="$OUT/dns.$scen.$server.r$round.txt"
  local before after client
  # CPU the server and dnsperf spent (user + system, all threads): on shared cores, every cycle the
  # server spends per query is one the load generator does not get.
  local split_before perf_pid="" wrap=()
  split_before=$(cpu_split "$pid")
  if [ "$PERF" = 1 ]; then
    perf stat -x, -e "$PERF_EVENTS" -p "$pid" -o "$out.perf-server" &
    perf_pid=$!
    wrap=(perf stat -x, -e task-clock,context-switches,cpu-migrations -o "$out.perf-client" --)
  fi
  # shellcheck disable=SC2086
  client=$( { TIMEFORMAT='%U %S'; time "${wrap[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" -l "$DURATION" \
    -c "$CLIENTS" -q "$OUTSTANDING" ${SCEN_ARGS[$scen]} $PERF_EXTRA >"$out" 2>&1; } 2>&1 )
  local split_after
  split_after=$(cpu_split "$pid")
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid"
    wait "$perf_pid" 2>/dev/null || true
  fi
  local qps lost latency completed
  qps=$(awk '/Queries per second:/ {print $4}' "$out")
  lost=$(awk '/Queries lost:/ {print $3}' "$out")
  latency=$(awk '/Average Latency/ {print $4}' "$out")
  completed=$(awk '/Queries completed:/ {print $3}' "$out")
  # Per answered query, in µs: the server's user and system time, and dnsperf's (user + system).
  local server_user server_sys client_us
  read -r server_user server_sys client_us < <(awk -v b="$split_before" -v a="$split_after" \
    -v c="$client" -v hz="$(getconf CLK_TCK)" -v n="${completed:-0}" 'BEGIN {
      split(b, sb, " "); split(a, sa, " "); split(c, p, " ")
      if (!n) { print "0 0 0"; exit }
      printf "%.2f %.2f %.2f\n", (sa[1] - sb[1]) / hz * 1e6 / n, (sa[2] - sb[2]) / hz * 1e6 / n,
        (p[1] + p[2]) * 1e6 / n }')
  local server_us
  server_us=$(awk -v u="$server_user" -v s="$server_sys" 'BEGIN { printf "%.2f", u + s }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$server" "$round" "$qps" "$lost" "$latency" \
    "$server_user" "$server_sys" "$client_us" >>"$RESULTS"
  log "$scen / $server / round $round: $qps qps, average latency $latency s, lost $lost, CPU µs/query server $server_us (user $server_user) dnsperf $client_us"
  if [ "$PERF" = 1 ]; then
    # Per query: the server's user and system CPU, its context switches, its receive and send calls
    # (1 / calls = the average batch), and dnsperf's context switches.
    local perf_line
    perf_line=$(awk -v n="${completed:-0}" -v hz="$(getconf CLK_TCK)" -v sb="$split_before" \
      -v sa="$split_after" -F, '
      FNR == 1 { file++ }
      /^#/ || NF < 3 { next }
      file == 1 { server[$3] += $1 }
      file == 2 { client[$3] += $1 }
      END {
        split(sb, b, " "); split(sa, a, " ")
        recv = server["syscalls:sys_enter_recvmmsg"] + server["syscalls:sys_enter_recvmsg"] + server["syscalls:sys_enter_recvfrom"]
        send = server["syscalls:sys_enter_sendmmsg"] + server["syscalls:sys_enter_sendmsg"] + server["syscalls:sys_enter_sendto"]
        printf "server user %.2f sys %.2f µs, cs %.3f (migrations %.3f), recv calls %.3f (batch %.1f), send calls %.3f (batch %.1f), polls %.3f; dnsperf cs %.3f",
          (a[1] - b[1]) / hz * 1e6 / n, (a[2] - b[2]) / hz * 1e6 / n,
          server["context-switches"] / n, server["cpu-migrations"] / n,
          recv / n, recv ? n / recv : 0, send / n, send ? n / send : 0,
          (server["syscalls:sys_enter_ppoll"] + server["syscalls:sys_enter_epoll_wait"] + server["syscalls:sys_enter_poll"]) / n,
          client["context-switches"] / n
      }' "$out.perf-server" "$out.perf-client")
    log "   per query: $perf_line"
    printf '%s\t%s\t%s\t%s\n' "$scen" "$server" "$round" "$perf_line" >>"$WORK/perf.tsv"
  fi
}
for round in $(seq 1 "$ROUNDS"); do
  for scen in "${SCEN[@]}"; do
    if [ $((round % 2)) -eq 1 ]; then order=("meridian:$MERIDIAN_PORT" "gdnsd:$GDNSD_PORT")
    else order=("gdnsd:$GDNSD_PORT" "meridian:$MERIDIAN_PORT"); fi
    for entry in "${order[@]}"; do
      IFS=: read -r server port <<<"$entry"
      pid=$MERIDIAN_PID
      [ "$server" = gdnsd ] && pid=$GDNSD_PID
      run_one "$server" "$port" "$scen" "$round" "$pid"
    done
  done
done

MERIDIAN_WORKERS="$WORKERS"
[ "$LEGACY_MERIDIAN" = 1 ] && MERIDIAN_WORKERS="$(nproc) (legacy: one per core)"
python3 - "$RESULTS" "$(nproc)" "$DURATION" "$CLIENTS" "$OUTSTANDING" "$GDNSD_UDP_THREADS" "$MERIDIAN_WORKERS" \
  "plain=${SCEN_DESC[plain]}" "resolver-kr=${SCEN_DESC[resolver-kr]}" "ecs-de=${SCEN_DESC[ecs-de]}" \
  <<'PY' | tee "$OUT/dns.w$WORKERS$SUFFIX.md"
import sys, collections
path, cpus, dur, clients, outstanding, gthreads, mworkers, *descs = sys.argv[1:]
desc = dict(d.split("=", 1) for d in descs)
qps = collections.defaultdict(list)
lat = collections.defaultdict(list)
lost = collections.defaultdict(int)
cpu = collections.defaultdict(list)
for line in open(path):
    scen, server, rnd, q, l, a, s_user, s_sys, c_us = line.rstrip("\n").split("\t")
    qps[(scen, server)].append(float(q or 0))
    # (server user + system, dnsperf, server user), µs per query
    cpu[(scen, server)].append((float(s_user or "nan") + float(s_sys or "nan"), float(c_us or "nan"),
                                float(s_user or "nan")))
    lat[(scen, server)].append(float(a or "nan"))
    lost[(scen, server)] += int((l or "0").split()[0])
mean = lambda v: sum(v) / len(v) if v else float("nan")
print(f"dnsperf -c {clients} -q {outstanding}, {dur} s per run, {len(qps[next(iter(qps))])} interleaved rounds (mean); "
      f"{cpus} cores shared by dnsperf and the server; meridian dns: {mworkers} UDP workers; "
      f"gdnsd udp_threads = {gthreads}")
print()
print("| scenario | meridian/gdnsd qps | meridian/gdnsd avg latency | server CPU µs/query (meridian / gdnsd) | lost (meridian / gdnsd) |")
print("|---|---|---|---|---|")
for scen in ["plain", "resolver-kr", "ecs-de"]:
    m = qps[(scen, "meridian")]; g = qps[(scen, "gdnsd")]
    if not m or not g:
        continue
    ratio = mean(m) / mean(g) if sum(g) else float("nan")
    lratio = mean(lat[(scen, "meridian")]) / mean(lat[(scen, "gdnsd")])
    mcpu = mean([c[0] for c in cpu[(scen, "meridian")]])
    gcpu = mean([c[0] for c in cpu[(scen, "gdnsd")]])
    print(f"| {scen}: {desc[scen]} | {ratio:.2f} | {lratio:.2f} | {mcpu:.2f} / {gcpu:.2f} | {lost[(scen, 'meridian')]} / {lost[(scen, 'gdnsd')]} |")
print()
print("Where the machine's CPU goes, µs per answered query (means over the rounds): the server's user and "
      "system time, dnsperf's CPU, and their sum (the machine; nothing else runs). On shared cores the "
      "machine's CPU per query bounds queries/s. `busy`: that CPU / (cores x run time). `no server user "
      "time`: the meridian/gdnsd queries/s a server doing Meridian's system work and none of its user-space "
      "work would reach, the machine as busy as in Meridian's runs (the measured ratio x Meridian's machine "
      "/ (that machine - its user time)); `no server at all`: the same with the whole server free (the "
      "measured ratio x Meridian's machine / dnsperf's CPU against it).")
print()
print("| scenario | server | user | system | dnsperf | machine | busy | no server user time | no server at all |")
print("|---|---|---|---|---|---|---|---|---|")
for scen in ["plain", "resolver-kr", "ecs-de"]:
    rows = {}
    for server in ("gdnsd", "meridian"):
        c = cpu[(scen, server)]
        if not c:
            continue
        user = mean([x[2] for x in c]); total = mean([x[0] for x in c]); client = mean([x[1] for x in c])
        machine = total + client
        busy = machine * mean(qps[(scen, server)]) / 1e6 / int(cpus)
        rows[server] = (user, total - user, client, machine, busy)
    if len(rows) < 2:
        continue
    measured = mean(qps[(scen, "meridian")]) / mean(qps[(scen, "gdnsd")])
    for server, (user, system, client, machine, busy) in rows.items():
        ceiling = f"{measured * machine / (machine - user):.2f}" if server == "meridian" else ""
        free = f"{measured * machine / client:.2f}" if server == "meridian" else ""
        print(f"| {scen} | {server} | {user:.2f} | {system:.2f} | {client:.2f} | {machine:.2f} | {busy:.0%} | {ceiling} | {free} |")
print()
print("raw qps and average latency per round (for the record, not a claim):")
for (scen, server), v in sorted(qps.items()):
    print(f"  {scen:12} {server:9} " + " ".join(f"{x:.0f}" for x in v)
          + "   latency ms: " + " ".join(f"{x * 1000:.3f}" for x in lat[(scen, server)])
          + "   CPU µs/query server: " + " ".join(f"{c[0]:.2f}" for c in cpu[(scen, server)])
          + " dnsperf: " + " ".join(f"{c[1]:.2f}" for c in cpu[(scen, server)]))
PY
if [ "$PERF" = 1 ]; then
  { echo; echo "perf stat, per query (scenario, server, round):"; sed 's/^/  /' "$WORK/perf.tsv"; } \
    | tee -a "$OUT/dns.w$WORKERS$SUFFIX.md"
fi
