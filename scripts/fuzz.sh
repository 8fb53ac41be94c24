#!/usr/bin/env bash
# Runs the cargo-fuzz targets (fuzz/README.md): each for SECONDS (default 600), two at a time
# (EDGE_FUZZ_PARALLEL), from the seeds of fuzz/src/lib.rs plus the corpus kept from earlier
# runs under $EDGE_CACHE_DIR/fuzz. Prints executions, corpus size and peak RSS per target and
# writes them to $EDGE_CACHE_DIR/fuzz/summary.txt; exits 1 if any target found a crash (its
# input is under $EDGE_CACHE_DIR/fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh                 # every target, 10 minutes each
#   scripts/fuzz.sh 3600 image      # one target for an hour
#   EDGE_FUZZ_NO_BUILD=1 scripts/fuzz.sh 600   # reuse the last build and seeds
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${1:-600}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then TARGETS=(mqtt_request image bundle config); fi
PARALLEL=${EDGE_FUZZ_PARALLEL:-2}

CACHE=${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}
WORK=$CACHE/fuzz
mkdir -p "$WORK"
# The instrumented build has flags of its own: keep it apart from the main target dir.
FUZZ_TARGET_DIR=${EDGE_FUZZ_TARGET_DIR:-$CACHE/fuzz-target}

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz@0.13.2
fi
# cargo-fuzz passes nightly flags (-Zsanitizer=address, sancov passes); this machine has one
# stable toolchain, which accepts them with RUSTC_BOOTSTRAP=1. Only for cargo fuzz: set for the
# main build, the variable would invalidate every artefact of the main target dir.
fuzz() { RUSTC_BOOTSTRAP=1 cargo fuzz "$@"; }

if [ "${EDGE_FUZZ_NO_BUILD:-0}" = 1 ] && [ -d "$WORK/seeds" ]; then
  # Reuse the last build and seeds (e.g. while another cargo holds the main target dir).
  echo "EDGE_FUZZ_NO_BUILD=1: reusing the last instrumented build and seeds" >&2
else
  # Seeds: written by the same harness the targets run (tests/fuzz_seeds.rs). Built as
  # scripts/test.sh builds (the whole workspace: one feature set, so no second build of tract).
  cargo build --workspace --bins --locked
  seeds_bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/edge-fuzz-seeds
  "$seeds_bin" "$WORK/seeds"

  fuzz build --target-dir "$FUZZ_TARGET_DIR"
fi

run_one() {
  local target=$1
  mkdir -p "$WORK/corpus/$target" "$WORK/artifacts/$target"
  # -rss_limit_mb: a target that needs more than 2 GB for one input is a finding too.
  fuzz run --target-dir "$FUZZ_TARGET_DIR" "$target" \
    "$WORK/corpus/$target" "$WORK/seeds/$target" -- \
    -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=30 -max_len=1048576 \
    -print_final_stats=1 -artifact_prefix="$WORK/artifacts/$target/" \
    >"$WORK/$target.log" 2>&1
}

pids=()
names=()
status=0
for target in "${TARGETS[@]}"; do
  echo "fuzzing $target for ${SECONDS_EACH}s (log: $WORK/$target.log)" >&2
  run_one "$target" &
  pids+=($!)
  names+=("$target")
  if [ ${#pids[@]} -ge "$PARALLEL" ]; then
    wait "${pids[0]}" || { echo "$target: FOUND A CRASH (see $WORK/${names[0]}.log)" >&2; status=1; }
    pids=("${pids[@]:1}")
    names=("${names[@]:1}")
  fi
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "${names[$i]}: FOUND A CRASH (see $WORK/${names[$i]}.log)" >&2; status=1; }
done

{
  printf '%-14s %8s %12s %8s %8s %12s\n' target seconds executions exec/s corpus peak_rss_mb
  for target in "${TARGETS[@]}"; do
    log=$WORK/$target.log
    stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
    printf '%-14s %8s %12s %8s %8s %12s\n' "$target" "$SECONDS_EACH" "$(stat number_of_executed_units)" \
      "$(stat average_exec_per_sec)" "$(find "$WORK/corpus/$target" -type f | wc -l)" "$(stat peak_rss_mb)"
  done
} | tee "$WORK/summary.txt"
if [ "$status" -ne 0 ]; then
  echo "crash inputs are in $WORK/artifacts/<target>/: fix the bug, then copy the input to" \
    "fuzz/regressions/<target>/ so the test suite replays it" >&2
fi
exit "$status"
