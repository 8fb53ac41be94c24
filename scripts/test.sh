#!/usr/bin/env bash
# The whole test suite, from nothing: fixtures (built once, cached outside git), lint, build,
# every test. Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-deps.sh
EDGE_FIXTURES=$(scripts/fixtures.sh)
export EDGE_FIXTURES
echo "fixtures: $EDGE_FIXTURES" >&2
# Third-party gRPC clients for the pool conformance tests (EDGE_TRITON_PYTHON, EDGE_TFS_*) and
# MLServer, the third-party KServe pool of the offload tests (EDGE_MLSERVER_PYTHON).
while IFS= read -r assignment; do export "${assignment?}"; done < <(scripts/clients.sh)

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
# The device's systemd unit: verify clean, exposure OK or better.
agent/packaging/check-unit.sh
