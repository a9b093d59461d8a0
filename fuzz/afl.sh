#!/usr/bin/env bash
# Coverage-guided campaign for one fuzz target with AFL++ (through cargo-afl), then its figures.
#
#   fuzz/afl.sh TARGET [EXECUTIONS]      # default 1,000,000 executions; targets: dns,
#                                        # cache_headers, config, inference_json, forwarding, paths
#
# Needs `cargo install cargo-afl` once (it builds AFL++ for this rustc). Work files go to
# fuzz/afl/TARGET (ignored by git): in/ (seeds written by the harness), out/ (afl-fuzz's queue,
# crashes, hangs, fuzzer_stats). Exits non-zero if afl-fuzz saved any crash or hang.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: fuzz/afl.sh TARGET [EXECUTIONS]}"
execs="${2:-1000000}"
target_dir="${CARGO_TARGET_DIR:-target}"
cargo afl build --release -p meridian-fuzz --features afl --bin meridian-fuzz-afl
harness="$target_dir/release/meridian-fuzz-afl"
work="fuzz/afl/$target"
rm -rf "$work"
mkdir -p "$work"
"$harness" --seeds "$target" "$work/in"
"$harness" --dict "$target" "$work/dict"
# No UI (logs instead), no CPU binding or frequency checks (shared machines), no core_pattern
# check (containers): none of it changes what is found.
AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
  cargo afl fuzz -i "$work/in" -o "$work/out" -x "$work/dict" -E "$execs" -- "$harness" "$target" \
  > "$work/afl-fuzz.log" 2>&1
stats="$work/out/default/fuzzer_stats"
field() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
crashes=$(field saved_crashes)
hangs=$(field saved_hangs)
echo "| $target | $(field execs_done) | $(field corpus_count) | $(field bitmap_cvg) | $(field edges_found) | $crashes | $hangs | $(field run_time) | $(field execs_per_sec) |"
if [ "${crashes:-1}" != 0 ] || [ "${hangs:-1}" != 0 ]; then
  echo "crashes or hangs in $work/out/default/{crashes,hangs}; replay one with:" >&2
  echo "  $harness $target < FILE" >&2
  exit 1
fi
