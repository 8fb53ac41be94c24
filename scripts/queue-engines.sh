#!/usr/bin/env bash
# The queue storage-engine evaluation of issue 15, from nothing: builds LazyFS (from
# ../shared/tools/lazyfs, cached under ${EDGE_CACHE_DIR:-~/.cache/edge-fleet}/lazyfs), builds
# `edge-queue-engines` in release, runs the power cuts and the enqueue benchmark for sled,
# redb and SQLite, and writes docs/queue-engines.md.
#
#   scripts/queue-engines.sh [edge-queue-engines options]   e.g. --cuts 40 --seed 7
#
# Needs root (LazyFS is FUSE; build.sh installs its Debian packages), /dev/fuse, and the
# shared folder beside the repository (or $EDGE_SHARED_DIR). A few minutes once built. Run it
# on an otherwise idle machine: the rates are ratios to a plain fsync'd file measured in the
# same rounds, but two programs fighting for the disk still blur them.
set -euo pipefail
cd "$(dirname "$0")/.."

shared="${EDGE_SHARED_DIR:-../shared}"
"$shared/tools/lazyfs/build.sh" "${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}/lazyfs" >/dev/null
cargo build --release --locked -p edge-e2e --bin edge-queue-engines
target="${CARGO_TARGET_DIR:-target}"
"$target/release/edge-queue-engines" --out docs/queue-engines.md "$@"
