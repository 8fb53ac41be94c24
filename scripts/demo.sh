#!/usr/bin/env bash
# The main job: build the fixtures and the binaries, convert models into edge bundles, and
# classify photos with `edge-agent classify`.
#   1. Inception V3 (the project's model; SEEDED weights from TensorFlow, not pretrained, so
#      its labels are synthetic `seeded_class_NNNN`) from its TensorFlow SavedModel export;
#   2. EfficientNet-Lite0 with real ImageNet weights (../shared/models), which names the
#      photos correctly.
# Usage: scripts/demo.sh [IMAGE...]   (default: the two photos in ../shared/models)
set -euo pipefail
cd "$(dirname "$0")/.."

fixtures=$(scripts/fixtures.sh)
models=${EDGE_SHARED_DIR:-$(cd .. && pwd)/shared}/models
cargo build --workspace --bins --locked >&2
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug
out=${EDGE_DEMO_DIR:-${TMPDIR:-/tmp}/edge-demo}
mkdir -p "$out"

if [ $# -gt 0 ]; then images=("$@"); else images=("$models/coffee.jpg" "$models/camera.jpg"); fi

echo "== converting Inception V3 (seeded weights) from its TF Serving SavedModel export" >&2
"$bin/edge-convert" convert "$fixtures/inception_v3_seeded" -o "$out/inception_v3_seeded.bundle" \
  --labels "$fixtures/inception_v3_seeded_labels.txt" --name inception_v3_seeded
echo "== edge-agent classify with Inception V3 (seeded weights: labels are synthetic)" >&2
"$bin/edge-agent" classify --bundle "$out/inception_v3_seeded.bundle" "${images[@]}"

if [ -f "$models/efficientnet_lite0.onnx" ]; then
  echo "== converting EfficientNet-Lite0 (real ImageNet weights)" >&2
  "$bin/edge-convert" convert "$models/efficientnet_lite0.onnx" -o "$out/efficientnet_lite0.bundle" \
    --preset efficientnet-lite --labels "$models/imagenet_labels.txt"
  echo "== edge-agent classify with EfficientNet-Lite0" >&2
  "$bin/edge-agent" classify --bundle "$out/efficientnet_lite0.bundle" "${images[@]}"
fi
