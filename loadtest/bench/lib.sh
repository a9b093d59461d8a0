# Sourced by the bench scripts: small helpers they share.

log() { printf '== %s\n' "$*" >&2; }

# Waits (up to 10 s) until something accepts TCP connections on 127.0.0.1:$1.
wait_port() {
  local port=$1
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listening on 127.0.0.1:$port" >&2
  return 1
}

# User + system CPU ticks a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# User and system CPU ticks, apart: "USER SYSTEM".
cpu_split() { awk '{print $14, $15}' "/proc/$1/stat"; }

# Installs, from Debian's packages, every `command:package` pair whose command is missing (on PATH
# or in /usr/sbin).
ensure_tools() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# Writes a throwaway CA ($1/ca.crt, $1/ca.key) and a leaf for host $2 signed by it ($1/$3.crt,
# $1/$3.key), made with openssl so a script needs nothing from the repo but the binaries.
throwaway_tls() {
  local dir=$1 host=$2 leaf=$3
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=$leaf CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$host" \
    -keyout "$dir/$leaf.key" -out "$dir/$leaf.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s\nbasicConstraints=CA:FALSE\n' "$host" >"$dir/$leaf.ext"
  openssl x509 -req -in "$dir/$leaf.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/$leaf.ext" -out "$dir/$leaf.crt" 2>/dev/null
}

# The side-by-side scripts' Meridian routes, as TOML: `bench.example.test` to the region `bench`,
# and the same under `/cached` with the response cache on (the cache-hit scenario; [edge.cache]
# defaults). The scripts write the edge and the region around them.
bench_routes() {
  cat <<'TOML'
[[routes]]
name = "bench"
hosts = ["bench.example.test"]
path_prefix = "/"
kind = "api"
regions = ["bench"]
default_region = "bench"

[[routes]]
name = "bench-cache"
hosts = ["bench.example.test"]
path_prefix = "/cached"
kind = "api"
regions = ["bench"]
default_region = "bench"
cache = { enabled = true, default_ttl = "60s" }
TOML
}

# Makes a temporary work folder ($WORK, named after $1) and an empty $PIDS; on exit every process
# whose pid the script added to $PIDS is stopped and the folder removed.
bench_workdir() {
  WORK="$(mktemp -d "/tmp/$1.XXXXXX")"
  PIDS=()
  trap bench_cleanup EXIT INT TERM
}
bench_cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
