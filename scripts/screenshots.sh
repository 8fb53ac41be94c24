#!/usr/bin/env bash
# The README's screenshots of the two pages (docs/img/device-page.png, fleet-dashboard.png):
# a Mosquitto broker on a free port, three agents serving EfficientNet-Lite0 (../shared/models;
# two on a copy whose manifest says version 2), about a minute of requests with mosquitto_pub
# (the two photos, and every fourth round a payload that is not an image), one agent killed,
# then headless chromium screenshots of cam-entrance's device page (thumbnails on) and of
# `edge-agent fleet-status --serve`. Needs mosquitto, mosquitto-clients and chromium.
# Usage: scripts/screenshots.sh [OUT_DIR]   (default docs/img)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath "${1:-docs/img}")
models=${EDGE_SHARED_DIR:-$(cd .. && pwd)/shared}/models
cargo build --workspace --bins --locked >&2
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

"$bin/edge-convert" convert "$models/efficientnet_lite0.onnx" -o "$work/v1.bundle" \
  --preset efficientnet-lite --labels "$models/imagenet_labels.txt" >&2
python3 - "$work/v1.bundle" "$work/v2.bundle" <<'PY'
import io, json, sys, tarfile
src, dst = tarfile.open(sys.argv[1]), tarfile.open(sys.argv[2], "w")
for m in src.getmembers():
    data = src.extractfile(m).read()
    if m.name == "manifest.json":
        doc = json.loads(data); doc["model"]["version"] = "2"
        data = json.dumps(doc).encode(); m.size = len(data)
    dst.addfile(m, io.BytesIO(data))
dst.close()
PY

port=$(free)
mosquitto -p "$port" >"$work/mosquitto.log" 2>&1 & pids+=($!)
sleep 1
agent() { # device bundle http-port [VAR=value...]
  local device=$1 bundle=$2 http=$3; shift 3
  env EDGE_AGENT_MODEL__TUNING=false "$@" "$bin/edge-agent" run --bundle "$bundle" \
    --queue-dir "$work/queue-$device" --device-id "$device" --broker "mqtt://127.0.0.1:$port" \
    --http-listen "127.0.0.1:$http" 2>"$work/$device.log" & pids+=($!)
}
page=$(free); dashboard=$(free)
agent cam-entrance "$work/v1.bundle" "$page" EDGE_AGENT_HTTP__RECENT_IMAGES=6
agent cam-dock "$work/v2.bundle" "$(free)"
agent cam-yard "$work/v2.bundle" "$(free)"; yard=${pids[-1]}
sleep 8
"$bin/edge-agent" fleet-status --serve "127.0.0.1:$dashboard" --broker "mqtt://127.0.0.1:$port" \
  2>"$work/fleet.log" & pids+=($!)
for round in $(seq 1 12); do
  for img in coffee camera; do
    for device in cam-entrance cam-dock; do
      mosquitto_pub -p "$port" -V 5 -q 1 -t "edge/$device/classify" -f "$models/$img.jpg" \
        -D publish response-topic app/replies -D publish user-property id "$device-$img-$round"
    done
  done
  if [ $((round % 4)) = 0 ]; then
    mosquitto_pub -p "$port" -V 5 -q 1 -t edge/cam-entrance/classify -m "not an image" \
      -D publish user-property id "bad-$round"
  fi
  sleep 4
done
kill -9 "$yard"; wait "$yard" 2>/dev/null || true
sleep 2
shot() { # url file width height
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$work/browser" \
    --window-size="$3,$4" --screenshot="$2" "$1" 2>/dev/null
}
mkdir -p "$out"
shot "http://127.0.0.1:$page/" "$out/device-page.png" 1000 1180
shot "http://127.0.0.1:$dashboard/" "$out/fleet-dashboard.png" 1200 330
echo "$out/device-page.png $out/fleet-dashboard.png"
