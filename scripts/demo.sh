#!/usr/bin/env bash
# The main job: the device daemon `edge-agent run` on its embedded defaults (embedded MQTT
# broker, queue in a temp dir), classifying photos sent over MQTT 5 with mosquitto_pub, the
# replies read with mosquitto_sub. It builds the fixtures and the binaries, converts the
# models into edge bundles, then serves, in turn:
#   1. Inception V3 (the project's model; SEEDED weights from TensorFlow, not pretrained, so
#      its labels are synthetic `seeded_class_NNNN`) from its TensorFlow SavedModel export;
#   2. EfficientNet-Lite0 with real ImageNet weights (../shared/models), which names the
#      photos correctly.
# Usage: scripts/demo.sh [IMAGE...]   (default: the two photos in ../shared/models)
# Env: EDGE_DEMO_PORT (embedded broker port, default 1883), EDGE_DEMO_DIR (work dir).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto_pub >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto-clients >&2 \
      || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto-clients >&2; }
  else
    echo "error: mosquitto_pub not found: apt-get install mosquitto-clients" >&2
    exit 1
  fi
fi

scripts/build-deps.sh
fixtures=$(scripts/fixtures.sh)
models=${EDGE_SHARED_DIR:-$(cd .. && pwd)/shared}/models
cargo build --workspace --bins --locked >&2
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug
out=${EDGE_DEMO_DIR:-${TMPDIR:-/tmp}/edge-demo}
port=${EDGE_DEMO_PORT:-1883}
mkdir -p "$out"

if [ $# -gt 0 ]; then images=("$@"); else images=("$models/coffee.jpg" "$models/camera.jpg"); fi

agent_pid=
stop_agent() {
  if [ -n "$agent_pid" ]; then kill -TERM "$agent_pid" 2>/dev/null || true; wait "$agent_pid" || true; agent_pid=; fi
}
trap stop_agent EXIT

# serve BUNDLE: start the daemon on the embedded broker, send every image, print the replies.
serve() {
  local bundle=$1 device=demo
  rm -rf "$out/queue"
  "$bin/edge-agent" run --bundle "$bundle" --queue-dir "$out/queue" --device-id "$device" \
    --http-listen 127.0.0.1:0 2>"$out/agent.log" &
  agent_pid=$!
  for _ in $(seq 600); do
    grep -q "connected to the broker" "$out/agent.log" && break
    kill -0 "$agent_pid" 2>/dev/null || { cat "$out/agent.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "connected to the broker" "$out/agent.log" || { cat "$out/agent.log" >&2; exit 1; }
  # Subscribe first, then send each image as an MQTT 5 request with a Response Topic.
  mosquitto_sub -V 5 -p "$port" -t demo/replies -C "${#images[@]}" -W 120 > "$out/replies.json" &
  local sub=$!
  sleep 0.3
  local n=0
  for image in "${images[@]}"; do
    n=$((n + 1))
    mosquitto_pub -V 5 -p "$port" -q 1 -t "edge/$device/classify" -f "$image" \
      -D publish response-topic demo/replies -D publish correlation-data "req-$n" \
      -D publish user-property id "$(basename "$image")" -D publish user-property top_k 3
  done
  wait "$sub"
  python3 - "$out/replies.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"{r['id']}: error {r['error']['code']}: {r['error']['message']}")
        continue
    t = r["timings_ms"]
    print(f"{r['id']}  ({r['model']['name']} on {r['device']}, {r['source']}, "
          f"inference {t['inference']:.0f} ms, total {t['total']:.0f} ms)")
    for p in r["top"]:
        print(f"  {p['score']:.4f}  {p['label']}")
PY
  stop_agent
}

echo "== converting Inception V3 (seeded weights) from its TF Serving SavedModel export" >&2
"$bin/edge-convert" convert "$fixtures/inception_v3_seeded" -o "$out/inception_v3_seeded.bundle" \
  --labels "$fixtures/inception_v3_seeded_labels.txt" --name inception_v3_seeded >&2
echo "== edge-agent run (embedded broker on 127.0.0.1:$port) with Inception V3 (seeded weights: labels are synthetic)" >&2
EDGE_AGENT_EMBEDDED_BROKER__LISTEN=127.0.0.1:$port serve "$out/inception_v3_seeded.bundle"

if [ -f "$models/efficientnet_lite0.onnx" ]; then
  echo "== converting EfficientNet-Lite0 (real ImageNet weights)" >&2
  "$bin/edge-convert" convert "$models/efficientnet_lite0.onnx" -o "$out/efficientnet_lite0.bundle" \
    --preset efficientnet-lite --labels "$models/imagenet_labels.txt" >&2
  echo "== edge-agent run with EfficientNet-Lite0" >&2
  EDGE_AGENT_EMBEDDED_BROKER__LISTEN=127.0.0.1:$port serve "$out/efficientnet_lite0.bundle"
fi
