#!/usr/bin/env bash
# ARM64 devices: cross-compiles edge-agent for aarch64-unknown-linux-gnu (Debian's
# gcc-aarch64-linux-gnu), runs `edge-agent classify` on the seeded Inception V3 fixture
# bundle under qemu-aarch64 (Debian's qemu-user, as a Cortex-A72), and checks its top-5 and
# scores against the x86_64 build within 1e-4. Used by .ci/run; needs EDGE_FIXTURES (scripts/fixtures.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1 || true
fixtures=${EDGE_FIXTURES:-$(scripts/fixtures.sh)}
models=${EDGE_SHARED_DIR:-$(cd .. && pwd)/shared}/models
cargo build --workspace --bins --locked
cargo build --locked --target aarch64-unknown-linux-gnu -p edge-agent --bin edge-agent
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
arm="$target/aarch64-unknown-linux-gnu/debug/edge-agent"
grep -q aarch64 <<<"$(file "$arm")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$target/debug/edge-convert" convert "$fixtures/inception_v3_seeded_nhwc.onnx" -o "$work/inception.bundle" \
    --preset inception --labels "$fixtures/inception_v3_seeded_labels.txt" >/dev/null
images=("$models/coffee.jpg" "$models/camera.jpg")
"$target/debug/edge-agent" classify --json --top-k 5 --bundle "$work/inception.bundle" "${images[@]}" > "$work/x86_64.json"
# A Cortex-A72 (Raspberry Pi 4 class: NEON, no SVE), as edge devices are. qemu's default CPU
# ("max") has SVE, and tract's SVE kernels run far slower emulated than its NEON ones: the two
# images were not done after 25 minutes under Debian's qemu 7.2, and take 82 s as a Cortex-A72.
qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu "$arm" classify --json --top-k 5 --bundle "$work/inception.bundle" "${images[@]}" > "$work/aarch64.json"
python3 - "$work/x86_64.json" "$work/aarch64.json" <<'PY'
import json, sys
x, a = (json.load(open(p)) for p in sys.argv[1:3])
worst = 0.0
for rx, ra in zip(x["results"], a["results"]):
    lx = [p["label"] for p in rx["top"]]
    la = [p["label"] for p in ra["top"]]
    assert lx == la, f"top-5 differ for {rx['image']}: {lx} vs {la}"
    for px, pa in zip(rx["top"], ra["top"]):
        worst = max(worst, abs(px["score"] - pa["score"]))
print(f"aarch64 (qemu) vs x86_64: same top-5 for {len(x['results'])} images, max score difference {worst:.2e}")
assert worst <= 1e-4, worst
PY

# The arm64 Debian package from the same binary (installed on devices, not here).
deb="$(cargo deb -p edge-agent --target aarch64-unknown-linux-gnu --no-build --profile dev 2>/dev/null | tail -1)"
# (no `| grep -q` under pipefail: grep leaving early would SIGPIPE the writer)
grep -q "Architecture: arm64" <<<"$(dpkg-deb --info "$deb")"
echo "arm64 package: $deb"
