#!/usr/bin/env bash
# The benchmark suite, from nothing: fixtures (cached), release build, then `edge-bench`,
# which runs every comparison in interleaved rounds and writes BENCHMARKS.md.
#
#   scripts/bench.sh [edge-bench options]     e.g. --rounds 7, --only inference,pool
#
# Needs the same set-up as scripts/test.sh (Rust, python3-venv, mosquitto). Takes about
# 10-15 minutes on 2 cores once built (the first release build of tract adds 15-20). Run it
# on an otherwise idle machine: every figure is a ratio to a baseline measured in the same
# run, but two programs fighting for the cores still blur them.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-deps.sh
EDGE_FIXTURES=$(scripts/fixtures.sh)
export EDGE_FIXTURES
cache="${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}"
# ONNX Runtime (the baseline) comes from the fixtures venv (scripts/requirements-fixtures.txt).
export EDGE_BENCH_PYTHON="${EDGE_BENCH_PYTHON:-$cache/venv/bin/python}"
"$EDGE_BENCH_PYTHON" -c 'import onnxruntime, numpy' ||
    { echo "bench.sh: $EDGE_BENCH_PYTHON has no onnxruntime" >&2; exit 1; }
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] ||
    { echo "bench.sh: mosquitto is not installed (apt-get install mosquitto)" >&2; exit 1; }

cargo build --release --workspace --bins --locked
target="${CARGO_TARGET_DIR:-target}"
# Scratch (queue benchmark, converted bundles) on the target's disk: fsync must be real.
export EDGE_BENCH_SCRATCH="${EDGE_BENCH_SCRATCH:-$target}"
"$target/release/edge-bench" "$@"   # writes BENCHMARKS.md (--out to change)
