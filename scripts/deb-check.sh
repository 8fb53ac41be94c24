#!/usr/bin/env bash
# Builds the amd64 .deb of edge-agent from the already built binaries (cargo-deb,
# --no-build, dev profile: dependencies at opt-level 3), installs it with dpkg -i, checks the
# installed unit with systemd-analyze, and classifies a photo with the installed binary and
# the installed example configuration's paths. Needs root (dpkg) and cargo-deb
# (installed here if missing). Used by .ci/run on its throwaway machine.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0
cargo build --workspace --bins --locked
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
deb="$(cargo deb -p edge-agent --no-build --profile dev 2>/dev/null | tail -1)"
[[ -f "$deb" ]] || deb="$(ls -t "$target"/debian/edge-agent_*_amd64.deb | head -1)"
echo "package: $deb"
dpkg-deb --info "$deb" | sed -n '1,12p'
dpkg -i "$deb"
test -x /usr/bin/edge-agent
test -f /etc/edge-agent/agent.toml
test -f /lib/systemd/system/edge-agent.service
getent passwd edge-agent >/dev/null
agent/packaging/check-unit.sh /usr/bin/edge-agent

models=${EDGE_SHARED_DIR:-$(cd .. && pwd)/shared}/models
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$target/debug/edge-convert" convert "$models/efficientnet_lite0.onnx" -o "$work/model.bundle" \
    --preset efficientnet-lite --labels "$models/imagenet_labels.txt" >/dev/null
out="$(/usr/bin/edge-agent classify --bundle "$work/model.bundle" --top-k 1 "$models/coffee.jpg")"
echo "$out"
grep -q espresso <<<"$out"
grep -q 'dir = "/var/lib/edge-agent/queue"' <<<"$(/usr/bin/edge-agent run --config /etc/edge-agent/agent.toml --print-config)"
echo "deb-check: installed package classifies (espresso) and its configuration loads"
